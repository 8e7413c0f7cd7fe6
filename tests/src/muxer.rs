//! The muxer binary under test, started with a generated config inside a namespace.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::netns::Netns;
use crate::process::Running;
use crate::systemd::FakeSystemd;

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

/// Writes `config` (with a control socket in the new directory unless it has `[control]`) to a
/// new directory every user may enter.
fn write_config(config: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    // Usable by an unprivileged muxer too.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    let config_path = dir.path().join("muxer.toml");
    let mut config = config.to_owned();
    if !config.contains("[control]") {
        let socket = dir.path().join("muxer.sock");
        config.push_str(&format!("\n[control]\nsocket = \"{}\"\n", socket.display()));
    }
    std::fs::write(&config_path, &config).expect("write config");
    (dir, config)
}

/// `muxer run --config CONFIG` in `netns`, behind `wrapper` if any.
fn command(netns: &Netns, wrapper: &[&str], config_path: &Path) -> std::process::Command {
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = netns.command(program);
            command.args(args).arg(binary());
            command
        }
        None => netns.command(&binary().display().to_string()),
    };
    command.args(["run", "--config"]).arg(config_path).env(
        "RUST_LOG",
        std::env::var("MUXER_TEST_LOG").unwrap_or_else(|_| "info".into()),
    );
    command
}

fn wait_listening(process: &mut Running, netns: &Netns, ready: SocketAddr) {
    crate::wait_for("muxer to listen", Duration::from_secs(10), || {
        process.assert_running();
        netns
            .enter(|| std::net::TcpStream::connect(ready).ok())
            .map(drop)
    });
}

/// Whether `config` attaches the kernel redirect.
fn redirecting(config: &str) -> bool {
    ["tc", "xdp", "sk_lookup"]
        .iter()
        .any(|mode| config.contains(&format!("mode = \"{mode}\"")))
}

/// A running `muxer run` and the files it was given.
pub struct Muxer {
    /// The process.
    pub process: Running,
    dir: tempfile::TempDir,
}

impl Muxer {
    /// Writes `config` and starts muxer with it in `netns`, waiting until `ready` accepts (and,
    /// when the config enables the redirect, until it is attached). Unless the config has a
    /// `[control]` section, the control socket goes to the test's own directory.
    pub fn start(netns: &Netns, config: &str, ready: SocketAddr) -> Muxer {
        Self::start_as(netns, config, ready, &[])
    }

    /// Like [`Muxer::start`], with `wrapper` (e.g. `setpriv ...`) in front of the muxer command;
    /// then it does not wait for the redirect.
    pub fn start_as(netns: &Netns, config: &str, ready: SocketAddr, wrapper: &[&str]) -> Muxer {
        let (dir, config) = write_config(config);
        let command = command(netns, wrapper, &dir.path().join("muxer.toml"));
        Self::launch(command, dir, netns, ready, &config, wrapper.is_empty())
    }

    /// Like [`Muxer::start`], as a service of `systemd` (its notify socket and descriptor store).
    pub fn start_under(
        netns: &Netns,
        config: &str,
        ready: SocketAddr,
        systemd: &mut FakeSystemd,
    ) -> Muxer {
        let (dir, config) = write_config(config);
        let command = systemd.wrap(&command(netns, &[], &dir.path().join("muxer.toml")));
        Self::launch(command, dir, netns, ready, &config, true)
    }

    /// Starts muxer again with the same config as `systemd` restarts a service (the stored
    /// descriptors passed), after the previous process ended.
    pub fn restart_under(&mut self, netns: &Netns, ready: SocketAddr, systemd: &mut FakeSystemd) {
        let config = std::fs::read_to_string(self.config_path()).expect("read config");
        let attached = || self.log().matches("kernel redirect attached").count();
        let before = attached();
        let command = systemd.wrap(&command(netns, &[], &self.config_path()));
        let mut process = Running::spawn("muxer", command, self.dir.path().join("muxer.log"));
        wait_listening(&mut process, netns, ready);
        if redirecting(&config) {
            crate::wait_for("the redirect again", Duration::from_secs(10), || {
                (attached() > before).then_some(())
            });
        }
        drop(std::mem::replace(&mut self.process, process));
    }

    fn launch(
        command: std::process::Command,
        dir: tempfile::TempDir,
        netns: &Netns,
        ready: SocketAddr,
        config: &str,
        wait_for_redirect: bool,
    ) -> Muxer {
        let mut process = Running::spawn("muxer", command, dir.path().join("muxer.log"));
        wait_listening(&mut process, netns, ready);
        let muxer = Muxer { process, dir };
        if redirecting(config) && wait_for_redirect {
            muxer.wait_for_log("kernel redirect attached");
        }
        muxer
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
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The control socket's path.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("muxer.sock")
    }

    /// The config file muxer was started with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("muxer.toml")
    }

    /// Replaces the config file with `text` and runs `muxer reload`; returns its output.
    pub fn reload(&self, text: &str) -> std::process::Output {
        std::fs::write(self.config_path(), text).expect("write config");
        std::process::Command::new(binary())
            .args(["reload", "--socket"])
            .arg(self.socket())
            .output()
            .expect("run muxer reload")
    }

    /// Runs `muxer upgrade` (with `new_binary`, if given) and returns its output; when it says a new
    /// process took over, waits for this one to exit and follows the new one.
    pub fn upgrade(&mut self, new_binary: Option<&Path>) -> std::process::Output {
        let mut command = std::process::Command::new(binary());
        command.args(["upgrade", "--socket"]).arg(self.socket());
        if let Some(new_binary) = new_binary {
            command.arg("--binary").arg(new_binary);
        }
        let output = command.output().expect("run muxer upgrade");
        let stdout = String::from_utf8_lossy(&output.stdout);
        if let Some(pid) = stdout
            .strip_prefix("muxer: process ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|pid| pid.parse().ok())
        {
            self.process.succeeded_by(pid, Duration::from_secs(60));
        }
        output
    }

    /// `muxer stats --json`, parsed.
    pub fn stats(&self) -> serde_json::Value {
        let output = std::process::Command::new(binary())
            .args(["stats", "--json", "--socket"])
            .arg(self.socket())
            .output()
            .expect("run muxer stats");
        assert!(
            output.status.success(),
            "muxer stats: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("stats JSON")
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
