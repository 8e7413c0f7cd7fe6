//! One client connection from accept to close: socket options, sniffing, the route decision, and
//! the hand-off to the route's handler. [`dispatch`] is the one place a sniffed connection meets
//! its handler.
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::info;

use std::sync::atomic::Ordering;

use crate::config::{Config, Target};
use crate::http::stream::Traffic;
use crate::http::HttpContext;
use crate::limits::ConnectionSlot;
use crate::sniff::{self, SniffOutcome, Sniffed};
use crate::splice::{self, CloseReason};
use crate::stats::{RouteCounters, Stats};

/// What every connection handler needs, shared by all connections.
#[derive(Debug)]
pub struct Shared {
    /// The configuration in force when the connection was accepted.
    pub config: Arc<Config>,
    /// The daemon's counters.
    pub stats: Arc<Stats>,
    /// The HTTP router, when `[http]` is configured.
    pub http: Option<Arc<HttpContext>>,
}

impl Shared {
    /// Builds what connections share from `config`.
    pub fn new(config: Config, stats: Arc<Stats>) -> Shared {
        let http = config
            .http
            .as_ref()
            .map(|http| Arc::new(HttpContext::new(http)));
        Shared {
            config: Arc::new(config),
            stats,
            http,
        }
    }
}

/// Why a connection ended before or during forwarding; the last field of the log line.
#[derive(Debug)]
enum Closed {
    Spliced(CloseReason),
    NothingSent,
    SniffFailed(std::io::Error),
    NoRoute,
    Refused,
    ConnectFailed(std::io::Error),
    ConnectTimedOut,
    PrefixWriteFailed(std::io::Error),
    HttpFinished,
    HttpFailed(String),
}

impl fmt::Display for Closed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Closed::Spliced(reason) => f.write_str(&reason.label()),
            Closed::NothingSent => f.write_str("client closed before sending"),
            Closed::SniffFailed(e) => write!(f, "client error while sniffing: {e}"),
            Closed::NoRoute => f.write_str("no route configured"),
            Closed::Refused => f.write_str("route is close"),
            Closed::ConnectFailed(e) => write!(f, "upstream connect failed: {e}"),
            Closed::ConnectTimedOut => f.write_str("upstream connect timed out"),
            Closed::PrefixWriteFailed(e) => write!(f, "upstream write failed: {e}"),
            Closed::HttpFinished => f.write_str("finished"),
            Closed::HttpFailed(e) => write!(f, "http error: {e}"),
        }
    }
}

/// Sets the options every forwarded socket gets: no Nagle delay, TCP keepalive.
pub fn tune_socket(stream: &TcpStream, keepalive: Duration) {
    let socket = SockRef::from(stream);
    // Failures here only cost latency or dead-peer detection; the connection still works.
    let _ = socket.set_tcp_nodelay(true);
    let interval = (keepalive / 4).max(Duration::from_secs(1));
    let _ = socket.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(keepalive)
            .with_interval(interval),
    );
}

/// Serves one accepted connection to the end and logs one line about it.
pub async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    slot: ConnectionSlot,
) {
    let _slot = slot;
    let started = Instant::now();
    let config = &shared.config;
    tune_socket(&client, config.splice.tcp_keepalive);

    let sniffed =
        match sniff::sniff(&mut client, config.sniff.timeout, config.sniff.max_bytes).await {
            Ok(sniffed) => sniffed,
            Err(error) => {
                log_line(
                    peer,
                    "none",
                    None,
                    0,
                    0,
                    started,
                    &Closed::SniffFailed(error),
                );
                return;
            }
        };
    let (label, target) = route_for(&sniffed.outcome, config);
    if matches!(sniffed.outcome, SniffOutcome::Timeout) {
        shared
            .stats
            .probe_timeouts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    dispatch(client, peer, sniffed, label, target, &shared, started).await;
}

/// Names the sniffed connection for the logs and picks its route.
fn route_for(outcome: &SniffOutcome, config: &Config) -> (&'static str, Target) {
    match outcome {
        SniffOutcome::Detected(detected) => {
            let protocol = detected.protocol();
            let target = match protocol {
                sniff::Protocol::Ssh => Target::Ssh,
                sniff::Protocol::Http => Target::Http,
                sniff::Protocol::Tls => Target::Tls,
            };
            (protocol.as_str(), target)
        }
        SniffOutcome::Timeout => ("timeout", config.sniff.on_timeout),
        SniffOutcome::Undecided(_) => ("unknown", Target::Fallback),
        SniffOutcome::ClosedEmpty => ("none", Target::Close),
    }
}

fn counters_for(stats: &Stats, target: Target) -> &RouteCounters {
    match target {
        Target::Ssh => &stats.ssh,
        Target::Http => &stats.http,
        Target::Tls => &stats.tls,
        Target::Fallback | Target::Close => &stats.unknown,
    }
}

/// Hands a sniffed connection to the handler of its route.
async fn dispatch(
    client: TcpStream,
    peer: SocketAddr,
    sniffed: Sniffed,
    label: &'static str,
    target: Target,
    shared: &Shared,
    started: Instant,
) {
    let counters = counters_for(&shared.stats, target);
    let open = counters.open_guard();
    let prefix_len = sniffed.prefix.len() as u64;
    let config = &shared.config;
    if let (Target::Http, Some(http)) = (target, &shared.http) {
        let traffic = Arc::new(Traffic::default());
        let result = crate::http::serve(
            client,
            sniffed.prefix,
            peer,
            Arc::clone(http),
            Arc::clone(&traffic),
        )
        .await;
        let (bytes_in, bytes_out) = (
            traffic.read.load(Ordering::Relaxed),
            traffic.written.load(Ordering::Relaxed),
        );
        open.add_bytes(bytes_in, bytes_out);
        let closed = match result {
            Ok(()) => Closed::HttpFinished,
            Err(error) => Closed::HttpFailed(error.to_string()),
        };
        log_line(
            peer,
            label,
            Some("http router"),
            bytes_in,
            bytes_out,
            started,
            &closed,
        );
        return;
    }
    let Some(backend) = config.backend(target) else {
        let closed = match (&sniffed.outcome, target) {
            (SniffOutcome::ClosedEmpty, _) => Closed::NothingSent,
            (_, Target::Close) => Closed::Refused,
            _ => {
                shared
                    .stats
                    .no_route
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Closed::NoRoute
            }
        };
        open.add_bytes(prefix_len, 0);
        log_line(peer, label, None, prefix_len, 0, started, &closed);
        return;
    };
    let upstream_name = backend.upstream.as_str();
    let result = connect_and_splice(client, sniffed.prefix, upstream_name, config).await;
    let (bytes_in, bytes_out, closed) = match result {
        Ok(report) => (
            prefix_len + report.client_to_upstream,
            report.upstream_to_client,
            Closed::Spliced(report.reason),
        ),
        Err(closed) => {
            if matches!(closed, Closed::ConnectFailed(_) | Closed::ConnectTimedOut) {
                shared
                    .stats
                    .upstream_connect_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            (prefix_len, 0, closed)
        }
    };
    open.add_bytes(bytes_in, bytes_out);
    log_line(
        peer,
        label,
        Some(upstream_name),
        bytes_in,
        bytes_out,
        started,
        &closed,
    );
}

/// Connects to the backend, replays the sniffed bytes, then splices.
async fn connect_and_splice(
    client: TcpStream,
    prefix: Vec<u8>,
    upstream: &str,
    config: &Config,
) -> Result<splice::SpliceReport, Closed> {
    let mut upstream =
        match tokio::time::timeout(config.splice.connect_timeout, TcpStream::connect(upstream))
            .await
        {
            Err(_) => return Err(Closed::ConnectTimedOut),
            Ok(Err(error)) => return Err(Closed::ConnectFailed(error)),
            Ok(Ok(stream)) => stream,
        };
    tune_socket(&upstream, config.splice.tcp_keepalive);
    if !prefix.is_empty() {
        upstream
            .write_all(&prefix)
            .await
            .map_err(Closed::PrefixWriteFailed)?;
    }
    drop(prefix);
    Ok(splice::splice(client, upstream, config.splice.idle_timeout).await)
}

fn log_line(
    peer: SocketAddr,
    protocol: &str,
    backend: Option<&str>,
    bytes_in: u64,
    bytes_out: u64,
    started: Instant,
    closed: &Closed,
) {
    info!(
        client = %peer,
        protocol,
        backend = backend.unwrap_or("-"),
        bytes_in,
        bytes_out,
        duration_ms = started.elapsed().as_millis() as u64,
        close = %closed,
        "connection closed"
    );
}
