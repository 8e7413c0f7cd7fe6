//! `muxer install`: the binary, a default config (only if none exists), a system user, and a
//! hardened systemd unit that grants exactly the capabilities muxer needs.
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::Config;

/// The bundled default configuration, installed when no config exists yet.
pub const DEFAULT_CONFIG: &str = include_str!("../../muxer.toml");

/// Where things go; every path is inside `root` (normally `/`).
#[derive(Clone, Debug)]
pub struct Layout {
    /// Prefix for every path (a staging directory in tests).
    pub root: PathBuf,
    /// The binary.
    pub binary: PathBuf,
    /// The config file.
    pub config: PathBuf,
    /// The unit file.
    pub unit: PathBuf,
    /// The system user the daemon runs as.
    pub user: String,
    /// Create the user and run `systemctl daemon-reload` (off when staging into a directory).
    pub system_setup: bool,
}

impl Layout {
    fn under_root(&self, path: &Path) -> PathBuf {
        self.root.join(path.strip_prefix("/").unwrap_or(path))
    }
}

/// A step of the installation that failed.
#[derive(Debug, thiserror::Error)]
#[error("{step} {}: {source}", path.display())]
pub struct InstallError {
    /// What was being done.
    pub step: &'static str,
    /// On what.
    pub path: PathBuf,
    /// Why it failed.
    pub source: std::io::Error,
}

/// The systemd unit for `layout`; `bind_low_ports` adds CAP_NET_BIND_SERVICE.
pub fn unit(layout: &Layout, bind_low_ports: bool) -> String {
    let mut capabilities = String::from("CAP_BPF CAP_NET_ADMIN");
    if bind_low_ports {
        capabilities.push_str(" CAP_NET_BIND_SERVICE");
    }
    format!(
        "[Unit]
Description=muxer: one public port for SSH, HTTP and TLS
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
User={user}
Group={user}
# Pins live under /sys/fs/bpf/muxer; preparing it is the only step that needs root.
ExecStartPre=+/bin/sh -c 'mkdir -p /sys/fs/bpf/muxer && chown {user}:{user} /sys/fs/bpf/muxer'
ExecStart={binary} run --config {config}
ExecReload=/bin/kill -HUP $MAINPID
# `muxer upgrade` (or SIGUSR2) starts a new process that takes over; it becomes the main process.
NotifyAccess=all
Restart=on-failure
# Short: while no process runs, a session's packets reach port 22 unrewritten (docs/handover.md).
RestartSec=200ms
# Listen sockets and spliced connections are kept here, so that idle SSH sessions outlive a crash.
# (MUXER_FD_STORE tells muxer so on systemd before 254, which does not set $FDSTORE.)
FileDescriptorStoreMax=65536
Environment=MUXER_FD_STORE=1
# Stop: detach the redirect, drain HTTP for shutdown_grace (30 s), then exit.
TimeoutStopSec=45s
AmbientCapabilities={capabilities}
CapabilityBoundingSet={capabilities}
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
RuntimeDirectory=muxer
RuntimeDirectoryMode=0700
# The self-signed TLS key and certificate (state_dir).
StateDirectory=muxer
StateDirectoryMode=0700
LimitNOFILE=1048576
# One access line per request can outrun journald: past 10 000 lines in 30 s it drops this unit's
# lines (and says how many) instead of the journal filling with them.
LogRateLimitIntervalSec=30s
LogRateLimitBurst=10000

[Install]
WantedBy=multi-user.target
",
        user = layout.user,
        binary = layout.binary.display(),
        config = layout.config.display(),
    )
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |step| {
        move |source| InstallError {
            step,
            path: path.to_owned(),
            source,
        }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail("create directory for"))?;
    }
    let temporary = path.with_extension("muxer-new");
    std::fs::write(&temporary, contents).map_err(fail("write"))?;
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(mode))
        .map_err(fail("chmod"))?;
    std::fs::rename(&temporary, path).map_err(fail("rename into"))
}

/// The installed config's mode: owner root read-write, the service's group read-only.
const CONFIG_MODE: u32 = 0o640;

/// Makes `config` root:`group`, so the service (running as that group) can read it; returns the
/// line to show the user.
fn give_config_to_group(config: &Path, group: &str) -> String {
    let gid = Command::new("getent")
        .args(["group", group])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| {
            let line = String::from_utf8_lossy(&output.stdout).into_owned();
            line.split(':').nth(2)?.trim().parse::<u32>().ok()
        });
    let changed = gid.is_some_and(|gid| {
        rustix::fs::chown(
            config,
            Some(rustix::process::Uid::ROOT),
            Some(rustix::process::Gid::from_raw(gid)),
        )
        .is_ok()
    });
    if changed {
        format!("{} is root:{group}, mode 0640", config.display())
    } else {
        format!(
            "could not give {} to group {group}: run chown root:{group} on it so the service can read it",
            config.display()
        )
    }
}

/// Installs muxer according to `layout`. Returns the lines to show the user.
pub fn install(layout: &Layout) -> Result<Vec<String>, InstallError> {
    let mut report = Vec::new();
    let binary = layout.under_root(&layout.binary);
    let current = std::env::current_exe().map_err(|source| InstallError {
        step: "locate",
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    let bytes = std::fs::read(&current).map_err(|source| InstallError {
        step: "read",
        path: current.clone(),
        source,
    })?;
    write_file(&binary, &bytes, 0o755)?;
    report.push(format!("installed {}", layout.binary.display()));

    let config_path = layout.under_root(&layout.config);
    let wrote_config = !config_path.exists();
    if wrote_config {
        // Not world-readable: a config may hold tunnel passwords. The service reads it through its
        // group (below).
        write_file(&config_path, DEFAULT_CONFIG.as_bytes(), CONFIG_MODE)?;
        report.push(format!("wrote default {}", layout.config.display()));
    } else {
        report.push(format!("kept existing {}", layout.config.display()));
    }
    let bind_low_ports = Config::load(&config_path)
        .map(|config| {
            config
                .listen
                .addresses
                .iter()
                .any(|address| address.port() < 1024)
        })
        .unwrap_or(false);
    write_file(
        &layout.under_root(&layout.unit),
        unit(layout, bind_low_ports).as_bytes(),
        0o644,
    )?;
    report.push(format!("wrote {}", layout.unit.display()));

    if layout.system_setup {
        let exists = Command::new("getent")
            .args(["passwd", &layout.user])
            .output()
            .is_ok_and(|o| o.status.success());
        if !exists {
            let status = Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    &layout.user,
                ])
                .status();
            match status {
                Ok(status) if status.success() => {
                    report.push(format!("created system user {}", layout.user))
                }
                _ => report.push(format!(
                    "could not create system user {}: create it by hand",
                    layout.user
                )),
            }
        }
        if wrote_config {
            report.push(give_config_to_group(&config_path, &layout.user));
        }
        let reloaded = Command::new("systemctl")
            .arg("daemon-reload")
            .status()
            .is_ok_and(|s| s.success());
        if !reloaded {
            report.push("systemctl daemon-reload failed: is systemd running?".into());
        }
        report.push("start it with: systemctl enable --now muxer".into());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(root: &Path) -> Layout {
        Layout {
            root: root.to_owned(),
            binary: "/usr/local/bin/muxer".into(),
            config: "/etc/muxer/muxer.toml".into(),
            unit: "/etc/systemd/system/muxer.service".into(),
            user: "muxer".into(),
            system_setup: false,
        }
    }

    #[test]
    fn unit_grants_exactly_the_needed_capabilities() {
        let dir = tempfile::tempdir().unwrap();
        let text = unit(&layout(dir.path()), false);
        for line in [
            "Type=notify",
            "User=muxer",
            "AmbientCapabilities=CAP_BPF CAP_NET_ADMIN\n",
            "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN\n",
            "NoNewPrivileges=yes",
            "Restart=on-failure",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "ExecReload=/bin/kill -HUP $MAINPID",
            "ExecStart=/usr/local/bin/muxer run --config /etc/muxer/muxer.toml",
            "NotifyAccess=all",
            "FileDescriptorStoreMax=65536",
            "Environment=MUXER_FD_STORE=1",
        ] {
            assert!(text.contains(line), "missing {line:?}");
        }
        assert!(unit(&layout(dir.path()), true)
            .contains("AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_NET_BIND_SERVICE\n"));
    }

    #[test]
    fn install_into_a_root_keeps_an_existing_config() {
        // Removed when dropped, also when an assertion fails.
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        let layout = layout(dir);
        let report = install(&layout).unwrap();
        assert!(report.iter().any(|line| line.starts_with("wrote default")));
        let config = dir.join("etc/muxer/muxer.toml");
        std::fs::write(&config, "# mine\n[ssh]\nupstream = \"127.0.0.1:22\"\n").unwrap();
        let report = install(&layout).unwrap();
        assert!(report.iter().any(|line| line.starts_with("kept existing")));
        assert_eq!(
            std::fs::read_to_string(&config).unwrap(),
            "# mine\n[ssh]\nupstream = \"127.0.0.1:22\"\n"
        );
        assert!(dir.join("usr/local/bin/muxer").exists());
        assert!(dir.join("etc/systemd/system/muxer.service").exists());
    }

    #[test]
    fn the_written_config_is_not_world_readable() {
        use std::os::unix::fs::PermissionsExt;
        let temp = tempfile::tempdir().unwrap();
        install(&layout(temp.path())).unwrap();
        let config = temp.path().join("etc/muxer/muxer.toml");
        let mode = std::fs::metadata(&config).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
    }

    #[test]
    fn the_config_goes_to_the_services_group() {
        use std::os::unix::fs::MetadataExt;
        if !rustix::process::geteuid().is_root() {
            return;
        }
        let temp = tempfile::tempdir().unwrap();
        let config = temp.path().join("muxer.toml");
        std::fs::write(&config, "").unwrap();
        // Every Debian system has the group `adm`.
        let line = give_config_to_group(&config, "adm");
        assert!(line.ends_with("is root:adm, mode 0640"), "{line}");
        let gid = std::fs::metadata(&config).unwrap().gid();
        let adm = String::from_utf8(
            Command::new("getent")
                .args(["group", "adm"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        assert_eq!(adm.split(':').nth(2).unwrap().trim(), gid.to_string());
        assert!(give_config_to_group(&config, "no-such-group-here").starts_with("could not"));
    }
}
