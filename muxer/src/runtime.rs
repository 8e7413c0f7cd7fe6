//! What the data path gets from the daemon, across reloads: the current configuration generation
//! (swapped atomically by a reload), counters, limits, and the shutdown signal. Handles flow down
//! from here; nothing in the data path reaches the daemon.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

use crate::client_source::Sources;
use crate::config::Config;
use crate::handover::fd_store::FdStore;
use crate::handover::Parcel;
use crate::http::{CurrentRouter, HttpContext};
use crate::limits::ConnectionLimits;
use crate::metrics::HttpMetrics;
use crate::stats::Stats;
use crate::tls_router::TlsRouter;

/// Daemon-wide state.
#[derive(Debug)]
pub(crate) struct Runtime {
    /// The configuration and what is compiled from it; each new connection and each HTTP request
    /// takes the one current when it starts.
    pub current: ArcSwap<Generation>,
    /// The current generation's HTTP router alone: the narrow handle HTTP connections get, so
    /// that each request uses the router of the last reload.
    pub current_http: CurrentRouter,
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
    /// Tells spliced connections when a successor process takes them over.
    pub handover: Arc<HandoverHub>,
}

/// Where spliced connections go when a successor process takes over (`muxer upgrade`): once
/// [`HandoverHub::start`] ran, every spliced connection pauses at its next poll and sends itself
/// there, and so does every connection that starts splicing later.
#[derive(Debug, Default)]
pub(crate) struct HandoverHub {
    started: CancellationToken,
    /// `started`, readable without the lock `CancellationToken::is_cancelled` takes: spliced
    /// connections look at it on every poll.
    fired: AtomicBool,
    parcels: Mutex<Option<UnboundedSender<Parcel>>>,
    /// systemd's descriptor store, where spliced connections are also kept (if the unit has one).
    pub(crate) fd_store: FdStore,
}

impl HandoverHub {
    /// A hub whose connections are also kept in `fd_store`.
    pub(crate) fn new(fd_store: FdStore) -> HandoverHub {
        HandoverHub {
            fd_store,
            ..HandoverHub::default()
        }
    }

    /// Sends every spliced connection to `parcels` from now on.
    pub(crate) fn start(&self, parcels: UnboundedSender<Parcel>) {
        *self
            .parcels
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = Some(parcels);
        self.fired.store(true, Ordering::Release);
        self.started.cancel();
    }

    /// Whether [`HandoverHub::start`] ran.
    pub(crate) fn fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// A future that is ready once the handover started (polled once, it wakes its task then).
    pub(crate) fn started(&self) -> WaitForCancellationFutureOwned {
        self.started.clone().cancelled_owned()
    }

    /// Stops sending connections (the successor gets `Done` once those sent are through).
    pub(crate) fn close(&self) {
        self.parcels
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take();
    }

    /// Sends a paused connection to the successor; whether there was one to take it (if not,
    /// the connection is dropped: the process is exiting).
    pub(crate) fn deliver(&self, parcel: Parcel) -> bool {
        let parcels = self
            .parcels
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        parcels
            .as_ref()
            .is_some_and(|sender| sender.send(parcel).is_ok())
    }
}

impl Runtime {
    /// Makes `generation` the one new connections and requests use.
    pub(crate) fn install(&self, generation: Generation) {
        self.current_http.store(generation.http.clone());
        self.current.store(Arc::new(generation));
    }
}

/// One configuration generation and what is compiled from it: what every connection handler
/// needs, shared by all connections that start while it is current.
#[derive(Debug)]
pub(crate) struct Generation {
    /// The configuration in force when the connection was accepted.
    pub(crate) config: Arc<Config>,
    /// The daemon's counters.
    pub(crate) stats: Arc<Stats>,
    /// The HTTP router (with the tunnels), when `[http]` or `[[tunnel]]` is configured.
    pub(crate) http: Option<Arc<HttpContext>>,
    /// The TLS router, when `[tls]` is configured.
    pub(crate) tls: Option<TlsRouter>,
    /// The source address local upstreams see, per spliced backend.
    pub(crate) sources: Sources,
    /// [`Runtime::handover`], also here because every connection keeps its generation: a spliced
    /// connection reaching the hub through it keeps its set-up task 8 bytes smaller.
    pub(crate) handover: Arc<HandoverHub>,
}

impl Generation {
    /// Builds what connections share from `config`.
    pub(crate) fn new(
        config: Config,
        stats: Arc<Stats>,
        http_metrics: Arc<HttpMetrics>,
        sources: Sources,
        handover: Arc<HandoverHub>,
    ) -> Generation {
        let http = (config.http.is_some() || !config.tunnels.is_empty()).then(|| {
            let settings = config.http.clone().unwrap_or_default();
            let keepalive = config.splice.tcp_keepalive;
            Arc::new(HttpContext::new(
                settings,
                &config.tunnels,
                keepalive,
                config.listen.worker_count(),
                http_metrics,
            ))
        });
        let tls = config
            .tls
            .as_ref()
            .map(|tls| TlsRouter::new(tls, &config.state_dir));
        Generation {
            config: Arc::new(config),
            stats,
            http,
            tls,
            sources,
            handover,
        }
    }
}
