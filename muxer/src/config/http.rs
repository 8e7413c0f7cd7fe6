//! `[http]` and `[[http.route]]`: the HTTP router's routes, limits and timeouts.
use std::time::Duration;

use serde::Deserialize;

use super::{valid_host_pattern, Upstream};

/// `[http]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http {
    /// Longest time a client may take to send a request's headers (slowloris defence).
    #[serde(
        default = "Http::default_header_read_timeout",
        with = "humantime_serde"
    )]
    pub header_read_timeout: Duration,
    /// Largest request head accepted; larger gets 431.
    #[serde(default = "Http::default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Largest request body accepted; larger gets 413.
    #[serde(default = "Http::default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// How long connecting to an upstream may take; then 502.
    #[serde(default = "Http::default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Idle upstream connections are kept this long: shorter than common upstream keep-alives
    /// (uvicorn: 5 s) so the pool rarely hands out a connection the upstream is closing.
    #[serde(default = "Http::default_pool_idle_timeout", with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Longest silence between two body chunks, either direction.
    #[serde(default = "Http::default_body_idle_timeout", with = "humantime_serde")]
    pub body_idle_timeout: Duration,
    /// How long an upstream that failed to connect is skipped by round robin.
    #[serde(default = "Http::default_failure_cooldown", with = "humantime_serde")]
    pub failure_cooldown: Duration,
    /// A keep-alive connection with no request in flight (HTTP/1) or no open stream (HTTP/2) is
    /// closed after this long; default: `header_read_timeout`. An HTTP/2 connection must also open
    /// its first stream within it.
    #[serde(default, with = "humantime_serde::option")]
    pub idle_timeout: Option<Duration>,
    /// Streams one HTTP/2 connection may have open at once.
    #[serde(default = "Http::default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// HTTP/2 keep-alive PING interval.
    #[serde(default = "Http::default_ping_interval", with = "humantime_serde")]
    pub ping_interval: Duration,
    /// An HTTP/2 connection whose PING is not acknowledged within this is closed.
    #[serde(default = "Http::default_ping_timeout", with = "humantime_serde")]
    pub ping_timeout: Duration,
    /// A client that takes no response bytes for this long while some wait to be sent (it stopped
    /// reading) is disconnected, and its upstream connection released.
    #[serde(default = "Http::default_write_timeout", with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Request bodies must arrive at least this fast, in bytes per second, on average over the
    /// time spent waiting for them (trickled bodies); 0: no minimum.
    #[serde(default = "Http::default_body_min_rate")]
    pub body_min_rate: u64,
    /// Waiting time every request body is allowed on top of `body_min_rate`.
    #[serde(default = "Http::default_body_rate_grace", with = "humantime_serde")]
    pub body_rate_grace: Duration,
    /// `CONNECT` tunnels and upgraded connections (WebSocket) silent both ways this long are
    /// closed.
    #[serde(
        default = "Http::default_tunnel_idle_timeout",
        with = "humantime_serde"
    )]
    pub tunnel_idle_timeout: Duration,
    /// Connections one upstream may have open from muxer (per route); more requests queue.
    #[serde(default = "Http::default_max_connections_per_upstream")]
    pub max_connections_per_upstream: usize,
    /// Requests that may wait for a connection to a full upstream; more get 503.
    #[serde(default = "Http::default_upstream_queue")]
    pub upstream_queue: usize,
    /// How long a queued request waits for a connection to a full upstream; then 503.
    #[serde(
        default = "Http::default_upstream_queue_timeout",
        with = "humantime_serde"
    )]
    pub upstream_queue_timeout: Duration,
    /// Proxies in front of muxer whose `X-Forwarded-For`, `Forwarded` and `X-Real-IP` are kept
    /// (appended to); from anyone else they are replaced.
    #[serde(default)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The routes, matched most specific host first, then longest path prefix.
    #[serde(default, rename = "route")]
    pub routes: Vec<HttpRoute>,
}

impl Http {
    fn default_header_read_timeout() -> Duration {
        Duration::from_secs(10)
    }
    fn default_max_header_bytes() -> usize {
        64 * 1024
    }
    fn default_max_body_bytes() -> u64 {
        64 * 1024 * 1024
    }
    fn default_connect_timeout() -> Duration {
        Duration::from_secs(3)
    }
    fn default_pool_idle_timeout() -> Duration {
        Duration::from_secs(4)
    }
    fn default_body_idle_timeout() -> Duration {
        Duration::from_secs(300)
    }
    fn default_failure_cooldown() -> Duration {
        Duration::from_secs(10)
    }
    fn default_max_concurrent_streams() -> u32 {
        100
    }
    fn default_ping_interval() -> Duration {
        Duration::from_secs(20)
    }
    fn default_ping_timeout() -> Duration {
        Duration::from_secs(10)
    }
    fn default_write_timeout() -> Duration {
        Duration::from_secs(30)
    }
    fn default_body_min_rate() -> u64 {
        1024
    }
    fn default_body_rate_grace() -> Duration {
        Duration::from_secs(20)
    }
    fn default_tunnel_idle_timeout() -> Duration {
        Duration::from_secs(3600)
    }
    fn default_max_connections_per_upstream() -> usize {
        1024
    }
    fn default_upstream_queue() -> usize {
        256
    }
    fn default_upstream_queue_timeout() -> Duration {
        Duration::from_secs(3)
    }

    /// Whether `client` is one of `trusted_proxies`.
    pub fn trusts(&self, client: std::net::IpAddr) -> bool {
        let client = client.to_canonical();
        self.trusted_proxies.iter().any(|net| net.contains(&client))
    }

    /// The keep-alive idle timeout in force.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout.unwrap_or(self.header_read_timeout)
    }
}

impl Default for Http {
    /// Every limit at its default, no routes (the router then only serves tunnels).
    fn default() -> Self {
        Http {
            header_read_timeout: Self::default_header_read_timeout(),
            max_header_bytes: Self::default_max_header_bytes(),
            max_body_bytes: Self::default_max_body_bytes(),
            connect_timeout: Self::default_connect_timeout(),
            pool_idle_timeout: Self::default_pool_idle_timeout(),
            body_idle_timeout: Self::default_body_idle_timeout(),
            failure_cooldown: Self::default_failure_cooldown(),
            idle_timeout: None,
            max_concurrent_streams: Self::default_max_concurrent_streams(),
            ping_interval: Self::default_ping_interval(),
            ping_timeout: Self::default_ping_timeout(),
            write_timeout: Self::default_write_timeout(),
            body_min_rate: Self::default_body_min_rate(),
            body_rate_grace: Self::default_body_rate_grace(),
            tunnel_idle_timeout: Self::default_tunnel_idle_timeout(),
            max_connections_per_upstream: Self::default_max_connections_per_upstream(),
            upstream_queue: Self::default_upstream_queue(),
            upstream_queue_timeout: Self::default_upstream_queue_timeout(),
            trusted_proxies: Vec::new(),
            routes: Vec::new(),
        }
    }
}

/// `[[http.route]]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRoute {
    /// Name for logs and error pages; derived from host and path when absent.
    pub name: Option<String>,
    /// `api.example.com` or `*.example.com`, case-insensitive, port ignored.
    pub host: Option<String>,
    /// Path prefix matched on segment boundaries. `/a/` matches `/a/…` but not `/a`; `/a`
    /// matches `/a` and `/a/…`; neither matches `/ab`.
    pub path: Option<String>,
    /// Remove the prefix before forwarding (`/a/v1/x` → `/v1/x`).
    #[serde(default)]
    pub strip_prefix: bool,
    /// `host:port` upstreams, used round robin.
    pub upstreams: Vec<Upstream>,
    /// Send this `Host` upstream instead of the client's.
    pub host_header: Option<String>,
    /// Longest wait for the upstream's response head; none by default, because long generations
    /// must not be cut.
    #[serde(default, with = "humantime_serde::option")]
    pub response_timeout: Option<Duration>,
    /// Protocols a client may upgrade to on this route (`Upgrade` tokens, case-insensitive).
    /// `h2c` is never tunnelled: such a request is served as plain HTTP/1.1.
    #[serde(default = "HttpRoute::default_upgrades")]
    pub upgrades: Vec<String>,
    /// Who may use the route (`[http.route.auth]`); everyone when absent.
    pub auth: Option<RouteAuth>,
    /// Serve the route only over HTTPS (TLS terminated by muxer); a plain HTTP request gets 403
    /// and reaches no upstream.
    #[serde(default)]
    pub require_tls: bool,
}

/// `[http.route.auth]`: the API keys a route requires, sent as `Authorization: Bearer KEY` (how
/// OpenAI-compatible clients send them).
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteAuth {
    /// Keys written in the file itself.
    #[serde(default)]
    pub bearer: Vec<String>,
    /// An environment variable holding one more key (keeps it out of the file).
    pub bearer_env: Option<String>,
    /// A file holding more keys, one per line; blank lines and `#` comments are skipped.
    pub bearer_file: Option<std::path::PathBuf>,
    /// Basic-auth users as `user:PHC-hash` (`muxer hash-password` makes the hash; argon2id).
    #[serde(default)]
    pub basic: Vec<String>,
    /// A file holding more `user:PHC-hash` lines.
    pub basic_file: Option<std::path::PathBuf>,
    /// Forward `Authorization` to the upstream; by default it is removed, so the key never
    /// reaches the backend.
    #[serde(default)]
    pub keep_credentials: bool,
    /// Every accepted key, gathered from the three places when the config is loaded.
    #[serde(skip)]
    pub keys: Vec<String>,
    /// Every Basic user and their password hash, gathered from `basic` and `basic_file`.
    #[serde(skip)]
    pub users: Vec<(String, String)>,
}

impl std::fmt::Debug for RouteAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves: a Debug print must not leak them.
        f.debug_struct("RouteAuth")
            .field("keys", &self.keys.len())
            .field("users", &self.users.len())
            .field("bearer_env", &self.bearer_env)
            .field("bearer_file", &self.bearer_file)
            .field("keep_credentials", &self.keep_credentials)
            .finish()
    }
}

/// The most a key file may hold: keys, not data (a device or a huge file is a mistake).
const MAX_KEY_FILE: u64 = 64 * 1024;

impl RouteAuth {
    /// Gathers the keys from the file, the environment variable and the key file; errors name
    /// the key (`prefix` is the route's `http.route[N].auth`) and never show a secret.
    fn gather(&mut self, prefix: &str) -> Result<(), (String, String)> {
        let key = |field: &str| format!("{prefix}.{field}");
        let mut keys = Vec::new();
        for (index, value) in self.bearer.iter().enumerate() {
            keys.push((format!("{prefix}.bearer[{index}]"), value.clone()));
        }
        if let Some(variable) = &self.bearer_env {
            match std::env::var(variable) {
                Ok(value) => keys.push((key("bearer_env"), value.trim().to_owned())),
                Err(_) => {
                    return Err((
                        key("bearer_env"),
                        format!("environment variable {variable} is not set (or not UTF-8)"),
                    ))
                }
            }
        }
        if let Some(path) = &self.bearer_file {
            keys.extend(key_file_lines(path, &key("bearer_file"))?);
        }
        let mut users = Vec::new();
        for (index, line) in self.basic.iter().enumerate() {
            users.push((format!("{prefix}.basic[{index}]"), line.clone()));
        }
        if let Some(path) = &self.basic_file {
            users.extend(key_file_lines(path, &key("basic_file"))?);
        }
        if keys.is_empty() && users.is_empty() {
            return Err((
                key("bearer"),
                "no key and no user: set bearer, bearer_env, bearer_file, basic or basic_file"
                    .into(),
            ));
        }
        self.users = users
            .into_iter()
            .map(|(place, line)| {
                let (user, hash) = line
                    .split_once(':')
                    .filter(|(user, _)| !user.is_empty())
                    .ok_or_else(|| (place.clone(), "must be user:hash".to_owned()))?;
                argon2::PasswordHash::new(hash).map_err(|_| {
                    (
                        place,
                        "the hash is not a PHC string (make one with `muxer hash-password`)"
                            .to_owned(),
                    )
                })?;
                Ok((user.to_owned(), hash.to_owned()))
            })
            .collect::<Result<_, (String, String)>>()?;
        for (place, value) in &keys {
            // RFC 6750 token68 characters; anything else could never be sent in a header.
            let valid = !value.is_empty()
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b));
            if !valid {
                return Err((
                    place.clone(),
                    "a key must be letters, digits and -._~+/= only".into(),
                ));
            }
        }
        self.keys = keys.into_iter().map(|(_, value)| value).collect();
        Ok(())
    }
}

/// The lines of the key file at `path` that are neither blank nor `#` comments, each with the
/// place it came from (`key (line N)`) for errors.
fn key_file_lines(
    path: &std::path::Path,
    key: &str,
) -> Result<Vec<(String, String)>, (String, String)> {
    let text = read_key_file(path).map_err(|problem| (key.to_owned(), problem))?;
    Ok(text
        .lines()
        .enumerate()
        .map(|(number, line)| (number, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
        .map(|(number, line)| (format!("{key} (line {})", number + 1), line.to_owned()))
        .collect())
}

fn read_key_file(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|error| format!("{}: {error}", path.display()))?;
    let metadata = file
        .metadata()
        .map_err(|error| format!("{}: {error}", path.display()))?;
    if !metadata.is_file() || metadata.len() > MAX_KEY_FILE {
        return Err(format!(
            "{}: not a regular file of at most {MAX_KEY_FILE} bytes",
            path.display()
        ));
    }
    let mut text = String::new();
    file.take(MAX_KEY_FILE)
        .read_to_string(&mut text)
        .map_err(|error| format!("{}: {error}", path.display()))?;
    Ok(text)
}

impl HttpRoute {
    fn default_upgrades() -> Vec<String> {
        vec!["websocket".into()]
    }

    /// The route's name: configured, or `host` + `path`, or `default`.
    pub fn display_name(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        match (&self.host, &self.path) {
            (None, None) => "default".into(),
            (host, path) => format!(
                "{}{}",
                host.as_deref().unwrap_or(""),
                path.as_deref().unwrap_or("")
            ),
        }
    }
}

impl Http {
    /// Reads every route's keys (`auth.bearer_env`, `auth.bearer_file`); errors name the key.
    pub(super) fn gather_secrets(&mut self) -> Result<(), (String, String)> {
        for (index, route) in self.routes.iter_mut().enumerate() {
            if let Some(auth) = &mut route.auth {
                auth.gather(&format!("http.route[{index}].auth"))?;
            }
        }
        Ok(())
    }

    /// Checks what serde cannot; errors name the key.
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        for (key, value) in [
            ("http.header_read_timeout", self.header_read_timeout),
            ("http.connect_timeout", self.connect_timeout),
            ("http.pool_idle_timeout", self.pool_idle_timeout),
            ("http.body_idle_timeout", self.body_idle_timeout),
            ("http.idle_timeout", self.idle_timeout()),
            ("http.ping_interval", self.ping_interval),
            ("http.ping_timeout", self.ping_timeout),
            ("http.write_timeout", self.write_timeout),
            ("http.body_rate_grace", self.body_rate_grace),
            ("http.tunnel_idle_timeout", self.tunnel_idle_timeout),
            ("http.upstream_queue_timeout", self.upstream_queue_timeout),
        ] {
            if value.is_zero() {
                return Err((key.into(), "must be greater than 0".into()));
            }
        }
        if !(8192..=16 << 20).contains(&self.max_header_bytes) {
            return Err((
                "http.max_header_bytes".into(),
                "must be between 8192 and 16777216".into(),
            ));
        }
        if self.max_concurrent_streams == 0 {
            return Err((
                "http.max_concurrent_streams".into(),
                "must be greater than 0".into(),
            ));
        }
        if self.max_connections_per_upstream == 0 {
            return Err((
                "http.max_connections_per_upstream".into(),
                "must be greater than 0".into(),
            ));
        }
        if self.max_body_bytes == 0 {
            return Err((
                "http.max_body_bytes".into(),
                "must be greater than 0".into(),
            ));
        }
        if self.routes.is_empty() {
            return Err((
                "http.route".into(),
                "[http] needs at least one [[http.route]]".into(),
            ));
        }
        let mut seen = Vec::new();
        for (index, route) in self.routes.iter().enumerate() {
            let key = |field: &str| format!("http.route[{index}].{field}");
            if let Some(host) = &route.host {
                if !valid_host_pattern(host) {
                    return Err((
                        key("host"),
                        format!("{host:?} is not a host name or *.domain pattern"),
                    ));
                }
            }
            if let Some(path) = &route.path {
                if !path.starts_with('/')
                    || path.contains(['?', '#', '%', '\\'])
                    || path.contains("//")
                {
                    return Err((
                        key("path"),
                        format!("{path:?} must be a plain path starting with /"),
                    ));
                }
                if path
                    .split('/')
                    .any(|segment| segment == "." || segment == "..")
                {
                    return Err((key("path"), format!("{path:?} contains a dot segment")));
                }
            }
            if route.strip_prefix && route.path.is_none() {
                return Err((key("strip_prefix"), "needs a path to strip".into()));
            }
            if route.upstreams.is_empty() {
                return Err((key("upstreams"), "must list at least one upstream".into()));
            }
            for (position, token) in route.upgrades.iter().enumerate() {
                let valid = !token.is_empty()
                    && token.bytes().all(|b| b.is_ascii_graphic() && b != b',')
                    && !token.eq_ignore_ascii_case("h2c");
                if !valid {
                    return Err((
                        format!("http.route[{index}].upgrades[{position}]"),
                        format!("{token:?} is not an upgrade token muxer can tunnel"),
                    ));
                }
            }
            if route.response_timeout.is_some_and(|t| t.is_zero()) {
                return Err((key("response_timeout"), "must be greater than 0".into()));
            }
            if let Some(host) = &route.host_header {
                if host.is_empty() || hyper::header::HeaderValue::from_str(host).is_err() {
                    return Err((
                        key("host_header"),
                        format!("{host:?} is not a usable Host header value"),
                    ));
                }
            }
            let identity = (
                route.host.as_deref().map(str::to_ascii_lowercase),
                route.path.clone(),
            );
            if seen.contains(&identity) {
                return Err((
                    key("path"),
                    "another route has the same host and path".into(),
                ));
            }
            seen.push(identity);
        }
        Ok(())
    }
}
