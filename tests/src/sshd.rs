//! A real OpenSSH server with a generated host key and a generated client key, and the matching
//! `ssh`/`scp` command lines.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::netns::Netns;
use crate::process::Running;

/// A running sshd (as root, key authentication only) and its client key.
pub struct Sshd {
    _process: Running,
    dir: tempfile::TempDir,
}

fn keygen(path: &Path) {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .expect("run ssh-keygen (install openssh-client)");
    assert!(status.success(), "ssh-keygen failed");
}

impl Sshd {
    /// Starts sshd in `netns`, listening on each of `listen` (`address:port`).
    pub fn start(netns: &Netns, listen: &[&str]) -> Sshd {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = |name: &str| dir.path().join(name);
        keygen(&path("host_key"));
        keygen(&path("client_key"));
        std::fs::copy(path("client_key.pub"), path("authorized_keys")).expect("authorized_keys");
        // sshd insists on its privilege-separation directory.
        std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let mut config = format!(
            "HostKey {host}\nAuthorizedKeysFile {auth}\nPidFile none\nUsePAM no\nStrictModes no\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             LogLevel VERBOSE\nSubsystem sftp internal-sftp\n",
            host = path("host_key").display(),
            auth = path("authorized_keys").display(),
        );
        for address in listen {
            config.push_str(&format!("ListenAddress {address}\n"));
        }
        std::fs::write(path("sshd_config"), config).expect("write sshd_config");
        // Sessions run root's login shell, which reads root's dotfiles. Those belong to the
        // machine, not to the test: on the CI machine `.bashrc` ran `pyenv init`, whose rehash
        // lock, left behind by a session a test ended, made every later login wait 60 s. sshd
        // therefore gets an empty home (a tmpfs over it, in the mount namespace `ip netns exec`
        // creates, so nothing outside sees it); keys and copied files live in `dir`.
        let home = root_home();
        let mut command = netns.command("sh");
        command
            .args([
                "-c",
                "mount -t tmpfs -o mode=0700 muxer-test-home \"$1\" && shift && exec \"$@\"",
                "sh",
            ])
            .arg(&home)
            .arg(which_sshd())
            .args(["-D", "-e", "-f"])
            .arg(path("sshd_config"));
        let mut process = Running::spawn("sshd", command, path("sshd.log"));
        for address in listen {
            let socket: std::net::SocketAddr = address.parse().expect("sshd listen address");
            crate::wait_for(
                &format!("sshd on {address}"),
                Duration::from_secs(10),
                || {
                    process.assert_running();
                    netns
                        .enter(|| std::net::TcpStream::connect(socket).ok())
                        .map(drop)
                },
            );
        }
        Sshd {
            _process: process,
            dir,
        }
    }

    /// The client's private key.
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }

    /// Options every `ssh`/`scp` invocation needs: the key, batch mode, no host-key prompts.
    pub fn client_options(&self) -> Vec<String> {
        vec![
            // Not the machine's ~/.ssh/config: the test decides every option.
            "-F".into(),
            "/dev/null".into(),
            "-i".into(),
            self.client_key().display().to_string(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "StrictHostKeyChecking=no".into(),
            "-o".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
            "-o".into(),
            "ConnectTimeout=10".into(),
        ]
    }

    /// `ssh` arguments running `remote_command` as root on `host` port `port`.
    pub fn ssh_args(&self, host: &str, port: u16, remote_command: &str) -> Vec<String> {
        let mut args = self.client_options();
        args.extend([
            "-p".into(),
            port.to_string(),
            format!("root@{host}"),
            remote_command.into(),
        ]);
        args
    }
}

/// One session's `$SSH_CONNECTION`, as sshd saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshConnection {
    /// The client address sshd saw.
    pub client: String,
    /// The local address sshd accepted on: a loopback address when muxer forwarded the session,
    /// the address the client dialled when it reached sshd directly.
    pub server: String,
}

impl SshConnection {
    /// Whether the session came through muxer (sshd accepted it on a loopback address).
    pub fn through_muxer(&self) -> bool {
        self.server
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
    }
}

impl Sshd {
    /// Logs in from `client` to `host`:`port` (more `ssh` options first, e.g. `-b ADDRESS`) and
    /// returns the session's `$SSH_CONNECTION`.
    pub fn connection(
        &self,
        client: &Netns,
        host: &str,
        port: u16,
        options: &[&str],
    ) -> SshConnection {
        let mut args: Vec<String> = options.iter().map(|o| o.to_string()).collect();
        args.extend(self.ssh_args(host, port, "echo $SSH_CONNECTION"));
        let out = client.run_ok("ssh", &args.iter().map(String::as_str).collect::<Vec<_>>());
        let fields: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(fields.len(), 4, "SSH_CONNECTION: {out:?}");
        SshConnection {
            client: fields[0].to_owned(),
            server: fields[2].to_owned(),
        }
    }

    /// sshd's log so far (`LogLevel VERBOSE`: one `Connection from A port P on L port 22` line
    /// per connection).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

/// Root's home directory, as the password database gives it to sshd.
fn root_home() -> String {
    let output = Command::new("getent")
        .args(["passwd", "root"])
        .output()
        .expect("run getent");
    let entry = String::from_utf8_lossy(&output.stdout);
    let home = entry.trim_end().split(':').nth(5).unwrap_or_default();
    assert!(home.starts_with('/'), "root's home in {entry:?}");
    home.to_owned()
}

/// sshd must be started by absolute path.
fn which_sshd() -> String {
    for candidate in ["/usr/sbin/sshd", "/usr/bin/sshd"] {
        if Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    panic!("sshd not found: install openssh-server (cargo xtask setup does)");
}
