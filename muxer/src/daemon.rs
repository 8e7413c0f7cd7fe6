//! `muxer run`: raise limits, bind every listener, serve until SIGINT or SIGTERM.
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::config::Config;
use crate::connection::Shared;
use crate::limits::ConnectionLimits;
use crate::listener::{self, ListenError};
use crate::stats::Stats;

/// A failure that stops the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A listening socket could not be set up.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
}

/// Raises the soft RLIMIT_NOFILE to the hard limit: every connection costs two descriptors.
pub fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return;
    }
    let before = limit.current;
    limit.current = limit.maximum;
    match setrlimit(Resource::Nofile, limit) {
        Ok(()) => info!(from = ?before, to = ?limit.maximum, "raised open-file limit"),
        Err(error) => warn!(%error, "cannot raise open-file limit"),
    }
}

/// Runs the multiplexer with `config` until a termination signal arrives.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    raise_fd_limit();
    let listeners = config
        .listen
        .addresses
        .iter()
        .map(|&address| listener::bind(address))
        .collect::<Result<Vec<_>, _>>()?;
    let limits = Arc::new(ConnectionLimits::new(
        config.limits.max_connections,
        config.limits.max_connections_per_ip,
    ));
    let shared = Arc::new(Shared {
        config: Arc::new(config),
        stats: Arc::new(Stats::default()),
    });
    let mut terminate = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
    for listener in &listeners {
        if let Ok(address) = listener.local_addr() {
            info!(%address, "listening");
        }
    }
    tokio::spawn(listener::accept_loop(listeners, shared, limits));
    tokio::select! {
        _ = terminate.recv() => info!("SIGTERM: stopping"),
        _ = interrupt.recv() => info!("SIGINT: stopping"),
    }
    Ok(())
}
