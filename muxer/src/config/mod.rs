//! The TOML configuration: serde types with their defaults, and validation that names the failing
//! key. A config is parsed and validated once, then shared read-only.
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use muxer_common::DEFAULT_LISTEN_PORT;
use serde::Deserialize;

mod http;
mod tls;

pub use http::{Http, HttpRoute, RouteAuth};
pub use tls::{InboundProxy, ProxyVersion, Tls, TlsRoute, Tunnel};

/// A config file that could not be used. Displays as one line naming the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {}: {source}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// Why reading failed.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config error in {}: line {line}: {problem}", path.display())]
    Syntax {
        /// The config file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// What the TOML parser said.
        problem: String,
    },
    /// A key has a bad value, is unknown, or is missing.
    #[error("config error in {}: {key}: {problem}", path.display())]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// Dotted path of the key, e.g. `sniff.timeout`.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `human` (default) or `json` log lines.
    #[serde(default)]
    pub log_format: LogFormat,
    /// One `muxer::access` line per HTTP request (off by default: each costs 5–7 µs of CPU, and
    /// journald's rate limit drops most of them under load; docs/benchmarks.md). Each
    /// connection's own line stays. `RUST_LOG`, when set, decides instead. Takes effect at start.
    #[serde(default)]
    pub access_log: bool,
    /// On SIGTERM, how long in-flight HTTP requests may take to finish.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Where the daemon accepts connections.
    #[serde(default)]
    pub listen: Listen,
    /// How connections are classified.
    #[serde(default)]
    pub sniff: Sniff,
    /// Connection limits.
    #[serde(default)]
    pub limits: Limits,
    /// Layer-4 forwarding settings.
    #[serde(default)]
    pub splice: Splice,
    /// The kernel redirect of public ports to the listen port.
    #[serde(default)]
    pub redirect: Redirect,
    /// The local control socket (`muxer stats`, `muxer reload`).
    #[serde(default)]
    pub control: Control,
    /// Where SSH connections go; without it they are closed.
    pub ssh: Option<Backend>,
    /// The HTTP router; without it HTTP connections are closed.
    pub http: Option<Http>,
    /// TLS passthrough routing; without it TLS connections are closed.
    pub tls: Option<Tls>,
    /// Named tunnels reached with HTTP `CONNECT name:port`.
    #[serde(default, rename = "tunnel")]
    pub tunnels: Vec<Tunnel>,
    /// Inbound PROXY protocol.
    #[serde(default)]
    pub proxy_protocol: InboundProxy,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: Metrics,
    /// Where connections that no probe recognises go; without it they are closed.
    pub fallback: Option<Backend>,
    /// Where muxer keeps what it generates and must find again after a restart (the self-signed
    /// key and certificate). The installed unit's `StateDirectory=`.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
}

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/muxer")
}

/// The log line format.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable text (with colours on a terminal).
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// `[metrics]`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Address of the Prometheus endpoint (`GET /metrics`); absent: off. Keep it on loopback
    /// unless something else protects it.
    pub listen: Option<SocketAddr>,
}

/// `[listen]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Addresses to accept on; an IPv6 wildcard accepts IPv6 only, so list both families.
    #[serde(default = "Listen::default_addresses")]
    pub addresses: Vec<SocketAddr>,
    /// Threads that accept and serve connections, each with its own listening socket per address
    /// (SO_REUSEPORT); default: one per CPU.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Steer each new connection to the worker running on the CPU that received it, while the
    /// workers' loads stay close (SO_INCOMING_CPU; see `muxer::steering`); off: spread by hash.
    #[serde(default = "Listen::default_cpu_steering")]
    pub cpu_steering: bool,
    /// Pin worker i to the i-th CPU the daemon may run on, so the scheduler moves other busy
    /// threads away from a worker rather than the worker next to them (see `muxer::affinity`);
    /// only when every allowed CPU gets a worker. Off (the default): workers float, and can leave
    /// a CPU that a client or a backend keeps busy (docs/benchmarks.md). Takes effect at start.
    #[serde(default = "Listen::default_pin_workers")]
    pub pin_workers: bool,
}

impl Listen {
    /// Worker threads to run: as configured, else one per CPU.
    pub fn worker_count(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }

    fn default_cpu_steering() -> bool {
        true
    }

    fn default_pin_workers() -> bool {
        false
    }

    fn default_addresses() -> Vec<SocketAddr> {
        vec![
            SocketAddr::from(([0, 0, 0, 0], DEFAULT_LISTEN_PORT)),
            SocketAddr::from(([0u16; 8], DEFAULT_LISTEN_PORT)),
        ]
    }
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            addresses: Self::default_addresses(),
            workers: None,
            cpu_steering: Self::default_cpu_steering(),
            pin_workers: Self::default_pin_workers(),
        }
    }
}

/// `[sniff]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sniff {
    /// How long a connection may stay undecided; then it goes to `on_timeout`.
    #[serde(default = "Sniff::default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Where silent clients go (SSH clients wait for the server's banner).
    #[serde(default = "Sniff::default_on_timeout")]
    pub on_timeout: Target,
    /// Most bytes buffered while probing; a probe still undecided then sends the connection to
    /// the fallback.
    #[serde(default = "Sniff::default_max_bytes")]
    pub max_bytes: usize,
}

impl Sniff {
    fn default_timeout() -> Duration {
        Duration::from_secs(2)
    }
    fn default_on_timeout() -> Target {
        Target::Ssh
    }
    fn default_max_bytes() -> usize {
        16 * 1024
    }
}

impl Default for Sniff {
    fn default() -> Self {
        Sniff {
            timeout: Self::default_timeout(),
            on_timeout: Self::default_on_timeout(),
            max_bytes: Self::default_max_bytes(),
        }
    }
}

/// A route a connection can be sent to when no probe named its protocol.
#[derive(Clone, Copy, Debug, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The `[ssh]` backend.
    Ssh,
    /// The HTTP router (`[http]`).
    Http,
    /// The `[tls]` backend.
    Tls,
    /// The `[fallback]` backend.
    Fallback,
    /// Close the connection.
    Close,
}

/// `[limits]`: capacity by class and per source network (docs/lockout.md).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Connections open at once, every class together; only at this limit does accepting wait.
    #[serde(default = "Limits::default_max_connections")]
    pub max_connections: usize,
    /// Of `max_connections`, how many only connections being sniffed and SSH may use: HTTP, TLS,
    /// tunnels, upgrades and the fallback share the rest. Default: a tenth.
    #[serde(default)]
    pub ssh_reserve: Option<usize>,
    /// Connections open at once from one source network, every class together.
    #[serde(
        default = "Limits::default_max_connections_per_source",
        alias = "max_connections_per_ip"
    )]
    pub max_connections_per_source: usize,
    /// Connections still being sniffed at once from one source network.
    #[serde(default = "Limits::default_max_sniffing_per_source")]
    pub max_sniffing_per_source: usize,
    /// SSH connections younger than `ssh_startup_window` at once from one source network: kept
    /// below sshd's `MaxStartups` start (10) for two sources, so that unauthenticated
    /// connections from one attacker cannot make sshd drop everyone's.
    #[serde(default = "Limits::default_ssh_startups_per_source")]
    pub ssh_startups_per_source: usize,
    /// How long an SSH connection counts as a startup: sshd's `LoginGraceTime`.
    #[serde(
        default = "Limits::default_ssh_startup_window",
        with = "humantime_serde"
    )]
    pub ssh_startup_window: Duration,
    /// IPv4 prefix length of a source network (sshd's `PerSourceNetBlockSize`: 32).
    #[serde(default = "Limits::default_source_prefix_v4")]
    pub source_prefix_v4: u8,
    /// IPv6 prefix length of a source network: 64, one customer's network.
    #[serde(default = "Limits::default_source_prefix_v6")]
    pub source_prefix_v6: u8,
}

impl Limits {
    fn default_max_connections() -> usize {
        20_000
    }
    fn default_max_connections_per_source() -> usize {
        1_000
    }
    fn default_max_sniffing_per_source() -> usize {
        64
    }
    fn default_ssh_startups_per_source() -> usize {
        4
    }
    fn default_ssh_startup_window() -> Duration {
        Duration::from_secs(120)
    }
    fn default_source_prefix_v4() -> u8 {
        32
    }
    fn default_source_prefix_v6() -> u8 {
        64
    }

    /// The SSH reserve in force.
    pub fn ssh_reserve(&self) -> usize {
        self.ssh_reserve.unwrap_or(self.max_connections / 10)
    }

    /// How many connections HTTP, TLS, tunnels, upgrades and the fallback may hold together.
    pub fn shared_capacity(&self) -> usize {
        self.max_connections.saturating_sub(self.ssh_reserve())
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        let positive = [
            ("limits.max_connections", self.max_connections),
            (
                "limits.max_connections_per_source",
                self.max_connections_per_source,
            ),
            (
                "limits.max_sniffing_per_source",
                self.max_sniffing_per_source,
            ),
            (
                "limits.ssh_startups_per_source",
                self.ssh_startups_per_source,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err((key, "must be greater than 0".into()));
            }
        }
        if self.ssh_reserve() >= self.max_connections {
            return Err((
                "limits.ssh_reserve",
                format!(
                    "must be below limits.max_connections ({})",
                    self.max_connections
                ),
            ));
        }
        if self.ssh_startup_window.is_zero() {
            return Err(("limits.ssh_startup_window", "must be greater than 0".into()));
        }
        if !(1..=32).contains(&self.source_prefix_v4) {
            return Err(("limits.source_prefix_v4", "must be between 1 and 32".into()));
        }
        if !(1..=128).contains(&self.source_prefix_v6) {
            return Err((
                "limits.source_prefix_v6",
                "must be between 1 and 128".into(),
            ));
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: Self::default_max_connections(),
            ssh_reserve: None,
            max_connections_per_source: Self::default_max_connections_per_source(),
            max_sniffing_per_source: Self::default_max_sniffing_per_source(),
            ssh_startups_per_source: Self::default_ssh_startups_per_source(),
            ssh_startup_window: Self::default_ssh_startup_window(),
            source_prefix_v4: Self::default_source_prefix_v4(),
            source_prefix_v6: Self::default_source_prefix_v6(),
        }
    }
}

/// `[splice]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Splice {
    /// A spliced connection with no bytes in either direction for this long is closed.
    #[serde(default = "Splice::default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Idle time before TCP keepalive probes start, on both sockets.
    #[serde(default = "Splice::default_tcp_keepalive", with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    /// How long connecting to a backend may take.
    #[serde(default = "Splice::default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// `splice` (zero-copy splice(2) through a pipe) or `copy` (read/write through a buffer).
    #[serde(default)]
    pub method: crate::splice::Method,
}

impl Splice {
    fn default_idle_timeout() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    fn default_tcp_keepalive() -> Duration {
        Duration::from_secs(60)
    }
    fn default_connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
}

impl Default for Splice {
    fn default() -> Self {
        Splice {
            idle_timeout: Self::default_idle_timeout(),
            tcp_keepalive: Self::default_tcp_keepalive(),
            connect_timeout: Self::default_connect_timeout(),
            method: crate::splice::Method::default(),
        }
    }
}

/// How the public ports reach the daemon.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RedirectMode {
    /// TC programs on ingress and egress.
    Tc,
    /// An XDP program on ingress (native where the driver allows, generic otherwise), TC on egress.
    Xdp,
    /// A `BPF_PROG_TYPE_SK_LOOKUP` program on the network namespace assigns new connections to
    /// the public ports to muxer's listening sockets: no packet rewritten, no per-flow state.
    #[serde(rename = "sk_lookup")]
    SkLookup,
    /// No kernel redirect; clients connect to the listen port (or an iptables rule redirects).
    Off,
}

/// `[redirect]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    /// Whether and how to redirect. Without a `[redirect]` section: off.
    #[serde(default = "Redirect::default_mode")]
    pub mode: RedirectMode,
    /// Interfaces to attach to; empty means every up, non-loopback interface with an address.
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// Public ports redirected to the listen port.
    #[serde(default = "Redirect::default_ports")]
    pub ports: Vec<u16>,
    /// bpffs directory where the counter maps are pinned for other processes.
    #[serde(default = "Redirect::default_pin_dir")]
    pub pin_dir: PathBuf,
}

impl Redirect {
    fn default_mode() -> RedirectMode {
        RedirectMode::Off
    }
    fn default_ports() -> Vec<u16> {
        vec![muxer_common::DEFAULT_PUBLIC_PORT]
    }
    fn default_pin_dir() -> PathBuf {
        PathBuf::from("/sys/fs/bpf/muxer")
    }
}

impl Default for Redirect {
    fn default() -> Self {
        Redirect {
            mode: Self::default_mode(),
            interfaces: Vec::new(),
            ports: Self::default_ports(),
            pin_dir: Self::default_pin_dir(),
        }
    }
}

/// `[control]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Control {
    /// Path of the unix control socket (created with mode 0600).
    #[serde(default = "Control::default_socket")]
    pub socket: PathBuf,
}

impl Control {
    /// Where the control socket lives unless configured otherwise.
    pub fn default_socket() -> PathBuf {
        PathBuf::from("/run/muxer/muxer.sock")
    }
}

impl Default for Control {
    fn default() -> Self {
        Control {
            socket: Self::default_socket(),
        }
    }
}

/// A spliced backend section: `[ssh]`, `[fallback]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// `host:port` to forward to.
    pub upstream: Upstream,
    /// PROXY header to send first. Never set it for sshd: OpenSSH rejects it.
    pub proxy_protocol: Option<ProxyVersion>,
    /// The source address the upstream sees, when it is on this machine (a loopback address).
    #[serde(default)]
    pub source: SourceMode,
}

/// `[ssh] source`, `[fallback] source`: which address a local upstream (sshd) sees connections
/// come from. See docs/lockout.md.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SourceMode {
    /// The client's own address and port (IP_TRANSPARENT, with a policy-routing rule muxer
    /// installs); `per-client-loopback` without CAP_NET_ADMIN.
    #[default]
    Transparent,
    /// A loopback address (127.a.b.c) derived from the client's address by a keyed hash.
    PerClientLoopback,
    /// muxer's own loopback address: every client looks the same to the upstream.
    Muxer,
}

/// A `host:port` (`[v6]:port` for IPv6 literals). Host names are resolved at connect time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream(String);

impl Upstream {
    /// The address as written, suitable for `TcpStream::connect`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Upstream {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.parse::<SocketAddr>().is_ok() {
            return Ok(Upstream(s.to_owned()));
        }
        let invalid = || format!("{s:?} is not host:port");
        let (host, port) = s.rsplit_once(':').ok_or_else(invalid)?;
        port.parse::<u16>().map_err(|_| invalid())?;
        let host_ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !host_ok {
            return Err(invalid());
        }
        Ok(Upstream(s.to_owned()))
    }
}

impl<'de> Deserialize<'de> for Upstream {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Loads `path` like [`Config::load`], but reads no secret (key files, environment
    /// variables) and leaves the routes' keys unchecked: for commands that look at the config
    /// without serving it (`muxer cert`), run by someone who may not have the daemon's
    /// environment.
    pub fn load_without_secrets(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_with(&text, path, false)
    }

    /// Parses and validates `text`; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Self::parse_with(text, path, true)
    }

    fn parse_with(text: &str, path: &Path, secrets: bool) -> Result<Config, ConfigError> {
        let deserializer =
            toml::de::Deserializer::parse(text).map_err(|error| ConfigError::Syntax {
                path: path.to_owned(),
                line: line_of(text, error.span()),
                problem: error.message().to_owned(),
            })?;
        let mut config: Config =
            serde_path_to_error::deserialize(deserializer).map_err(|error| {
                let key = error.path().to_string();
                let inner = error.into_inner();
                ConfigError::Invalid {
                    path: path.to_owned(),
                    key: if key == "." {
                        "(top level)".into()
                    } else {
                        key
                    },
                    problem: inner.message().to_owned(),
                }
            })?;
        let invalid = |key: String, problem: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            problem,
        };
        config
            .validate()
            .map_err(|(key, problem)| invalid(key.into(), problem))?;
        if let Some(http) = config.http.as_mut().filter(|_| secrets) {
            http.gather_secrets()
                .map_err(|(key, problem)| invalid(key, problem))?;
            http.validate()
                .map_err(|(key, problem)| invalid(key, problem))?;
        }
        if let Some(tls) = &config.tls {
            tls.validate(config.http.is_some())
                .map_err(|(key, problem)| invalid(key, problem))?;
            tls::check_certificates(tls, &config.state_dir)
                .map_err(|(key, problem)| invalid(key, problem))?;
        }
        tls::validate_tunnels(&config.tunnels).map_err(|(key, problem)| invalid(key, problem))?;
        Ok(config)
    }

    /// The spliced backend a [`Target`] names, if configured (HTTP and TLS have routers).
    pub fn backend(&self, target: Target) -> Option<&Backend> {
        match target {
            Target::Ssh => self.ssh.as_ref(),
            Target::Fallback => self.fallback.as_ref(),
            Target::Http | Target::Tls | Target::Close => None,
        }
    }

    /// Whether `target` leads anywhere.
    pub fn has_route(&self, target: Target) -> bool {
        match target {
            Target::Http => self.http.is_some() || !self.tunnels.is_empty(),
            Target::Tls => self.tls.is_some(),
            Target::Close => true,
            other => self.backend(other).is_some(),
        }
    }

    /// Checks relations and ranges serde cannot express.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if !self.state_dir.is_absolute() {
            return Err(("state_dir", "must be an absolute path".into()));
        }
        if self.listen.workers.is_some_and(|n| n == 0 || n > 1024) {
            return Err(("listen.workers", "must be between 1 and 1024".into()));
        }
        if self.listen.addresses.is_empty() {
            return Err(("listen.addresses", "must list at least one address".into()));
        }
        for (index, address) in self.listen.addresses.iter().enumerate() {
            if self.listen.addresses[..index].contains(address) {
                return Err(("listen.addresses", format!("{address} is listed twice")));
            }
        }
        if self.sniff.timeout.is_zero() {
            return Err(("sniff.timeout", "must be greater than 0".into()));
        }
        if !(64..=1 << 20).contains(&self.sniff.max_bytes) {
            return Err(("sniff.max_bytes", "must be between 64 and 1048576".into()));
        }
        let target = self.sniff.on_timeout;
        if !self.has_route(target) {
            let name = format!("{target:?}").to_lowercase();
            return Err((
                "sniff.on_timeout",
                format!("is \"{name}\" but the config has no [{name}] section"),
            ));
        }
        self.limits.validate()?;
        self.validate_redirect()?;
        for (key, value) in [
            ("splice.idle_timeout", self.splice.idle_timeout),
            ("splice.tcp_keepalive", self.splice.tcp_keepalive),
            ("splice.connect_timeout", self.splice.connect_timeout),
        ] {
            if value.is_zero() {
                return Err((key, "must be greater than 0".into()));
            }
        }
        Ok(())
    }
}

impl Config {
    /// The port the kernel redirect targets: the one port every listen address shares.
    pub fn redirect_target_port(&self) -> Option<u16> {
        let first = self.listen.addresses.first()?.port();
        self.listen
            .addresses
            .iter()
            .all(|a| a.port() == first)
            .then_some(first)
    }

    fn validate_redirect(&self) -> Result<(), (&'static str, String)> {
        let redirect = &self.redirect;
        if redirect.mode == RedirectMode::Off {
            return Ok(());
        }
        let Some(target) = self.redirect_target_port() else {
            return Err((
                "redirect.mode",
                "needs every listen address on the same port (the redirect target)".into(),
            ));
        };
        if redirect.ports.is_empty() {
            return Err(("redirect.ports", "must list at least one port".into()));
        }
        if redirect.ports.len() > muxer_common::MAX_PUBLIC_PORTS as usize {
            return Err((
                "redirect.ports",
                format!("at most {} ports", muxer_common::MAX_PUBLIC_PORTS),
            ));
        }
        for (index, &port) in redirect.ports.iter().enumerate() {
            if port == 0 {
                return Err(("redirect.ports", "port 0 is not a port".into()));
            }
            if port == target {
                return Err((
                    "redirect.ports",
                    format!("{port} is the listen port itself"),
                ));
            }
            if redirect.ports[..index].contains(&port) {
                return Err(("redirect.ports", format!("{port} is listed twice")));
            }
        }
        for name in &redirect.interfaces {
            let valid = !name.is_empty() && name.len() < 16 && !name.contains(['/', ' ', '\0']);
            if !valid {
                return Err((
                    "redirect.interfaces",
                    format!("{name:?} is not an interface name"),
                ));
            }
            if name == "lo" {
                return Err((
                    "redirect.interfaces",
                    "the loopback interface cannot be redirected".into(),
                ));
            }
        }
        if !redirect.pin_dir.is_absolute() {
            return Err(("redirect.pin_dir", "must be an absolute path".into()));
        }
        Ok(())
    }
}

/// `host.example.com` or `*.example.com`.
fn valid_host_pattern(pattern: &str) -> bool {
    let name = pattern.strip_prefix("*.").unwrap_or(pattern);
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.starts_with('.')
        && !name.ends_with('.')
}

fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> usize {
    let offset = span.map_or(0, |span| span.start.min(text.len()));
    text[..offset].bytes().filter(|&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("test.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn bundled_config_is_valid_and_mirrors_the_seed() {
        let text = include_str!("../../../muxer.toml");
        let config = parse(text).unwrap();
        assert_eq!(
            config.ssh.as_ref().unwrap().upstream.as_str(),
            "127.0.0.1:22"
        );
        let routes = &config.http.as_ref().unwrap().routes;
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].path.as_deref(), Some("/embedding-model/"));
        assert!(routes[0].strip_prefix);
        assert_eq!(routes[0].upstreams[0].as_str(), "127.0.0.1:30001");
        assert_eq!(
            (routes[1].path.as_deref(), routes[1].host.as_deref()),
            (None, None)
        );
        assert_eq!(routes[1].upstreams[0].as_str(), "127.0.0.1:30000");
        let addresses: Vec<String> = config
            .listen
            .addresses
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(addresses, ["0.0.0.0:2222", "[::]:2222"]);
        assert_eq!(config.sniff.timeout, Duration::from_secs(2));
        assert_eq!(config.sniff.on_timeout, Target::Ssh);
        assert_eq!(config.redirect.mode, RedirectMode::SkLookup);
        assert_eq!(config.redirect.ports, [22]);
        assert!(config.redirect.interfaces.is_empty());
        assert_eq!(config.redirect_target_port(), Some(2222));
    }

    #[test]
    fn api_keys_come_from_the_file_the_environment_and_a_key_file_and_never_show_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::write(&keys, "# rotated monthly\nsk-from-file\n\n  sk-second  \n").unwrap();
        // SAFETY: no other test reads or writes this variable, and this test starts no threads.
        unsafe { std::env::set_var("MUXER_TEST_KEY_5D1C", "sk-from-env\n") };
        let text = format!(
            "[[http.route]]\nupstreams = [\"a:1\"]\n[http.route.auth]\nbearer = [\"sk-inline\"]\n\
             bearer_env = \"MUXER_TEST_KEY_5D1C\"\nbearer_file = \"{}\"\n[ssh]\nupstream = \"a:1\"",
            keys.display()
        );
        let config = parse(&text).unwrap();
        let auth = config.http.unwrap().routes[0].auth.clone().unwrap();
        assert_eq!(
            auth.keys,
            ["sk-inline", "sk-from-env", "sk-from-file", "sk-second"]
        );
        assert!(!format!("{auth:?}").contains("sk-"), "Debug shows no key");
        let bad = "[[http.route]]\nupstreams = [\"a:1\"]\n[http.route.auth]\nbearer = [\"secret value\"]\n[ssh]\nupstream = \"a:1\"";
        let error = parse(bad).unwrap_err().to_string();
        assert!(!error.contains("secret"), "{error}");
    }

    #[test]
    fn commands_that_only_look_read_no_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("muxer.toml");
        std::fs::write(
            &path,
            "[ssh]\nupstream = \"a:1\"\n[http]\n[[http.route]]\nupstreams = [\"a:2\"]\n\
             [http.route.auth]\nbearer_env = \"MUXER_TEST_VARIABLE_NOBODY_SETS\"\n",
        )
        .unwrap();
        let error = Config::load(&path).unwrap_err().to_string();
        assert!(error.contains("bearer_env"), "{error}");
        let config = Config::load_without_secrets(&path).expect("no secret read");
        assert!(config.http.is_some());
    }

    #[test]
    fn errors_are_one_line_naming_file_and_key() {
        let cases = [
            (
                "[sniff]\ntimeout = \"2x\"\n[ssh]\nupstream=\"127.0.0.1:22\"",
                "sniff.timeout",
            ),
            ("[ssh]\nupstream = \"nowhere\"", "ssh.upstream"),
            ("[ssh]\nupstream = \"127.0.0.1:99999\"", "ssh.upstream"),
            (
                "[listen]\naddresses = [\"1.2.3.4\"]\n[ssh]\nupstream=\"a:1\"",
                "listen.addresses[0]",
            ),
            ("[listen]\nadresses = []", "listen.adresses"),
            ("[listen]\nworkers = 0\n[ssh]\nupstream=\"a:1\"", "listen.workers"),
            ("[listen]\nworkers = -1\n[ssh]\nupstream=\"a:1\"", "listen.workers"),
            (
                "[sniff]\non_timeout = \"http\"\n[ssh]\nupstream=\"a:1\"",
                "sniff.on_timeout",
            ),
            ("[sniff]\non_timeout = \"smtp\"", "sniff.on_timeout"),
            ("[sniff]\nmax_bytes = 1", "sniff.max_bytes"),
            ("[[tls.route]]\nsni = \"*\"\nupstream = \"a:1\"\n[ssh]\nupstream = \"a:1\"", "tls.route[0].sni"),
            ("[[tls.route]]\nsni = \"a.b\"\n[ssh]\nupstream = \"a:1\"", "tls.route[0].upstream"),
            ("[[tls.route]]\nsni = \"a.b\"\nterminate = true\nself_signed = true\n[ssh]\nupstream = \"a:1\"", "tls.route[0].terminate"),
            ("[http]\n[[http.route]]\nupstreams = [\"a:1\"]\n[[tls.route]]\nsni = \"a.b\"\nterminate = true\ncert = \"/c\"\n[ssh]\nupstream = \"a:1\"", "tls.route[0].key"),
            ("[http]\n[[http.route]]\nupstreams = [\"a:1\"]\n[[tls.route]]\nsni = \"a.b\"\nterminate = true\n[ssh]\nupstream = \"a:1\"", "tls.route[0].cert"),
            (
                "[http]\n[[http.route]]\nupstreams = [\"a:1\"]\n[[tls.route]]\nsni = \"a.b\"\nterminate = true\nself_signed = true\ncert = \"/c\"\nkey = \"/k\"\n[ssh]\nupstream = \"a:1\"",
                "tls.route[0].self_signed",
            ),
            ("[http]\n[[http.route]]\nupstreams = [\"a:1\"]\n[[tls.route]]\nsni = \"a.b\"\nterminate = true\nself_signed = true\nupstream = \"a:1\"\n[ssh]\nupstream = \"a:1\"", "tls.route[0].upstream"),
            ("[[tls.route]]\nsni = \"a.b\"\nupstream = \"a:1\"\nself_signed = true\n[ssh]\nupstream = \"a:1\"", "tls.route[0].self_signed"),
            (
                "[http]\n[[http.route]]\nupstreams = [\"a:1\"]\n[tls]\ndefault = \"a:1\"\n[[tls.route]]\nsni = \"a.b\"\nterminate = true\nself_signed = true\ndefault = true\n[ssh]\nupstream = \"a:1\"",
                "tls.route[0].default",
            ),
            (
                "[http]\n[[http.route]]\nupstreams = [\"a:1\"]\n[[tls.route]]\nsni = \"a.b\"\nterminate = true\ncert = \"/nonexistent.pem\"\nkey = \"/nonexistent.key\"\n[ssh]\nupstream = \"a:1\"",
                "tls.route[0].cert",
            ),
            ("state_dir = \"relative\"\n[ssh]\nupstream = \"a:1\"", "state_dir"),
            ("[tls]\nproxy_protocol = \"v3\"\n[ssh]\nupstream = \"a:1\"", "tls.proxy_protocol"),
            ("[[tunnel]]\nname = \"n 2\"\nupstream = \"a:1\"\n[ssh]\nupstream = \"a:1\"", "tunnel[0].name"),
            ("[[tunnel]]\nname = \"n\"\nupstream = \"a:1\"\nusername = \"u\"\n[ssh]\nupstream = \"a:1\"", "tunnel[0].password"),
            ("[[tunnel]]\nname = \"n\"\nupstream = \"a:1\"\nallow = [\"10.0.0.0/33\"]\n[ssh]\nupstream = \"a:1\"", "tunnel[0].allow[0]"),
            ("[[tunnel]]\nname = \"n\"\nupstream = \"a:1\"\n[[tunnel]]\nname = \"N\"\nupstream = \"a:1\"\n[ssh]\nupstream = \"a:1\"", "tunnel[1].name"),
            ("[proxy_protocol]\ntrusted = [\"nonsense\"]\n[ssh]\nupstream = \"a:1\"", "proxy_protocol.trusted[0]"),
            ("[http]\nheader_read_timeout = \"0s\"\n[[http.route]]\nupstreams = [\"a:1\"]\n[ssh]\nupstream = \"a:1\"", "http.header_read_timeout"),
            ("[http]\n\n[ssh]\nupstream = \"a:1\"", "http.route"),
            ("[[http.route]]\nupstreams = []\n[ssh]\nupstream = \"a:1\"", "http.route[0].upstreams"),
            ("[[http.route]]\nupstreams = [\"a\"]\n[ssh]\nupstream = \"a:1\"", "http.route[0].upstreams[0]"),
            ("[[http.route]]\npath = \"v1\"\nupstreams = [\"a:1\"]\n[ssh]\nupstream = \"a:1\"", "http.route[0].path"),
            ("[[http.route]]\npath = \"/a/../b\"\nupstreams = [\"a:1\"]\n[ssh]\nupstream = \"a:1\"", "http.route[0].path"),
            ("[[http.route]]\nhost = \"*.\"\nupstreams = [\"a:1\"]\n[ssh]\nupstream = \"a:1\"", "http.route[0].host"),
            ("[[http.route]]\nstrip_prefix = true\nupstreams = [\"a:1\"]\n[ssh]\nupstream = \"a:1\"", "http.route[0].strip_prefix"),
            ("[[http.route]]\nhost_header = \"a\\nb\"\nupstreams = [\"a:1\"]\n[ssh]\nupstream = \"a:1\"", "http.route[0].host_header"),
            ("[[http.route]]\nhost_header = \"\"\nupstreams = [\"a:1\"]\n[ssh]\nupstream = \"a:1\"", "http.route[0].host_header"),
            (
                "[[http.route]]\npath = \"/a\"\nupstreams = [\"a:1\"]\n[[http.route]]\npath = \"/a\"\nupstreams = [\"b:1\"]\n[ssh]\nupstream = \"a:1\"",
                "http.route[1].path",
            ),
            ("[[http.route]]\nupstreams = [\"a:1\"]\nretries = 3\n[ssh]\nupstream = \"a:1\"", "http.route[0].retries"),
            ("[[http.route]]\nupstreams = [\"a:1\"]\nupgrades = [\"h2c\"]\n[ssh]\nupstream = \"a:1\"", "http.route[0].upgrades[0]"),
            ("[[http.route]]\nupstreams = [\"a:1\"]\n[http.route.auth]\nbearer_env = \"MUXER_SURELY_UNSET_7F3A\"\n[ssh]\nupstream = \"a:1\"", "http.route[0].auth.bearer_env"),
            ("[[http.route]]\nupstreams = [\"a:1\"]\n[http.route.auth]\nbearer_file = \"/\"\n[ssh]\nupstream = \"a:1\"", "http.route[0].auth.bearer_file"),
            ("[[http.route]]\nupstreams = [\"a:1\"]\n[http.route.auth]\nbearer_file = \"/nonexistent/keys\"\n[ssh]\nupstream = \"a:1\"", "http.route[0].auth.bearer_file"),
            ("[[http.route]]\nupstreams = [\"a:1\"]\n[http.route.auth]\n[ssh]\nupstream = \"a:1\"", "http.route[0].auth.bearer"),
            ("[[http.route]]\nupstreams = [\"a:1\"]\n[http.route.auth]\nbasic = [\"alice:not-a-hash\"]\n[ssh]\nupstream = \"a:1\"", "http.route[0].auth.basic[0]"),
            ("[[http.route]]\nupstreams = [\"a:1\"]\n[http.route.auth]\nbasic = [\"no-colon\"]\n[ssh]\nupstream = \"a:1\"", "http.route[0].auth.basic[0]"),
            ("[[http.route]]\nupstreams = [\"a:1\"]\n[http.route.auth]\nbearer = [\"ok\", \"has space\"]\n[ssh]\nupstream = \"a:1\"", "http.route[0].auth.bearer[1]"),
            ("[limits]\nssh_reserve = 20000\n[ssh]\nupstream = \"a:1\"", "limits.ssh_reserve"),
            ("[limits]\nsource_prefix_v6 = 0\n[ssh]\nupstream = \"a:1\"", "limits.source_prefix_v6"),
            ("[ssh]\nupstream = \"a:1\"\nsource = \"spoofed\"", "ssh.source"),
            ("[http]\nwrite_timeout = \"0s\"\n[[http.route]]\nupstreams = [\"a:1\"]\n[ssh]\nupstream = \"a:1\"", "http.write_timeout"),
            ("[http]\ntrusted_proxies = [\"x\"]\n[[http.route]]\nupstreams = [\"a:1\"]\n[ssh]\nupstream = \"a:1\"", "http.trusted_proxies[0]"),
            (
                "[limits]\nmax_connections = 0\n[ssh]\nupstream=\"a:1\"",
                "limits.max_connections",
            ),
            ("[limits]\nmax_connections = -1", "limits.max_connections"),
            ("[redirect]\nmode = \"ebpf\"", "redirect.mode"),
            ("[redirect]\nmode = \"tc\"\nports = [2222]\n[ssh]\nupstream=\"a:1\"", "redirect.ports"),
            ("[redirect]\nmode = \"tc\"\nports = [22, 22]\n[ssh]\nupstream=\"a:1\"", "redirect.ports"),
            ("[redirect]\nmode = \"tc\"\nports = [70000]", "redirect.ports[0]"),
            ("[redirect]\nmode = \"tc\"\ninterfaces = [\"lo\"]\n[ssh]\nupstream=\"a:1\"", "redirect.interfaces"),
            (
                "[listen]\naddresses = [\"0.0.0.0:1\", \"[::]:2\"]\n[redirect]\nmode = \"xdp\"\n[ssh]\nupstream=\"a:1\"",
                "redirect.mode",
            ),
        ];
        for (text, key) in cases {
            let message = parse(text).expect_err(text);
            assert!(
                message.starts_with("config error in test.toml: "),
                "{message}"
            );
            assert!(
                message.contains(&format!(": {key}: ")),
                "{key} not named in: {message}"
            );
            assert!(!message.contains('\n'), "not one line: {message}");
        }
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let message = parse("[sniff]\ntimeout = \n").unwrap_err();
        assert!(
            message.starts_with("config error in test.toml: line 2: "),
            "{message}"
        );
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn defaults_fill_an_almost_empty_file() {
        let config = parse("[ssh]\nupstream = \"localhost:22\"").unwrap();
        assert_eq!(config.listen.addresses.len(), 2);
        assert_eq!(config.sniff.max_bytes, 16 * 1024);
        assert!(config.http.is_none());
    }

    #[test]
    fn upstream_forms() {
        for ok in [
            "127.0.0.1:22",
            "[::1]:22",
            "localhost:22",
            "node-2.internal:2222",
        ] {
            assert!(ok.parse::<Upstream>().is_ok(), "{ok}");
        }
        for bad in ["", ":22", "host", "host:", "host:x", "a b:1", "[::1]"] {
            assert!(bad.parse::<Upstream>().is_err(), "{bad}");
        }
    }
}
