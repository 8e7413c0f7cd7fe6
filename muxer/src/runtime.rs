//! What lives for the whole daemon, across reloads: the current configuration (swapped atomically
//! by a reload), counters, limits, and the shutdown signal.
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connection::Shared;
use crate::limits::ConnectionLimits;
use crate::metrics::HttpMetrics;
use crate::stats::Stats;

/// Daemon-wide state.
#[derive(Debug)]
pub struct Runtime {
    /// The configuration and what is compiled from it; each new connection and each HTTP request
    /// takes the one current when it starts.
    pub current: ArcSwap<Shared>,
    /// Counters, kept across reloads.
    pub stats: Arc<Stats>,
    /// Per-request HTTP metrics, kept across reloads.
    pub http_metrics: Arc<HttpMetrics>,
    /// Connection limits (resized by reloads).
    pub limits: Arc<ConnectionLimits>,
    /// Fired on SIGTERM: HTTP connections finish their requests and close.
    pub shutdown: CancellationToken,
    /// HTTP connections still being served, awaited on shutdown.
    pub http_connections: TaskTracker,
    /// The config file reloads read.
    pub config_path: PathBuf,
    /// TCP keepalive set on the listening sockets, which accepted connections inherit (with
    /// TCP_NODELAY).
    pub listener_keepalive: std::time::Duration,
}
