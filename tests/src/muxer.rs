//! The muxer binary under test, started with a generated config inside a namespace.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::netns::Netns;
use crate::process::Running;

/// Path of the muxer binary: `MUXER_BIN`, or the workspace's debug build.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MUXER_BIN") {
        return path.into();
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/muxer");
    assert!(
        path.exists(),
        "{} missing: run `cargo build -p muxer` or `cargo xtask test`",
        path.display()
    );
    path
}

/// A running `muxer run` and the files it was given.
pub struct Muxer {
    /// The process.
    pub process: Running,
    dir: tempfile::TempDir,
}

impl Muxer {
    /// Writes `config` and starts muxer with it in `netns`, waiting until `ready` accepts.
    pub fn start(netns: &Netns, config: &str, ready: SocketAddr) -> Muxer {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("muxer.toml");
        std::fs::write(&config_path, config).expect("write config");
        let mut command = netns.command(&binary().display().to_string());
        command
            .args(["run", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "info");
        let mut process = Running::spawn("muxer", command, dir.path().join("muxer.log"));
        crate::wait_for("muxer to listen", Duration::from_secs(10), || {
            process.assert_running();
            netns
                .enter(|| std::net::TcpStream::connect(ready).ok())
                .map(drop)
        });
        Muxer { process, dir }
    }

    /// muxer's log so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Waits until muxer's log contains `needle` (log lines follow the close they describe).
    pub fn wait_for_log(&self, needle: &str) {
        crate::wait_for(
            &format!("{needle:?} in muxer's log"),
            Duration::from_secs(5),
            || self.log().contains(needle).then_some(()),
        );
    }

    /// The directory holding the config and the log.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Number of open file descriptors of the muxer process. `ip netns exec` execs muxer in
    /// place, so the child's pid is muxer's.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.process.pid()))
            .expect("read fds")
            .count()
    }

    /// Number of threads of the muxer process.
    pub fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.process.pid()))
            .expect("read tasks")
            .count()
    }
}
