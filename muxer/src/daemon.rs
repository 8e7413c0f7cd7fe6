//! `muxer run`: raise limits, bind every listener, attach the kernel redirect, serve until SIGINT
//! or SIGTERM, and detach the redirect first on the way out.
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::config::{Config, RedirectMode};
use crate::connection::Shared;
use crate::control::{ControlError, ControlSocket, ControlState, RedirectReport};
use crate::limits::ConnectionLimits;
use crate::listener::{self, ListenError};
use crate::redirect::Redirect;
use crate::stats::Stats;

/// A failure that stops the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A listening socket could not be set up.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// The control socket could not be set up.
    #[error(transparent)]
    Control(#[from] ControlError),
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

/// Attaches the redirect if configured. Failing to attach is not fatal: the daemon still serves
/// its listen port, and says why the redirect is off.
fn attach_redirect(config: &Config) -> (Option<Redirect>, RedirectReport) {
    let mut report = RedirectReport {
        state: "off".into(),
        reason: None,
        interfaces: Vec::new(),
        ports: config.redirect.ports.clone(),
        target_port: config.redirect_target_port(),
        ingress: None,
    };
    if config.redirect.mode == RedirectMode::Off {
        report.reason = Some("redirect.mode = \"off\"".into());
        info!("kernel redirect off by config; clients use the listen port directly");
        return (None, report);
    }
    let target = config
        .redirect_target_port()
        .expect("validated: one listen port");
    match Redirect::attach(&config.redirect, target) {
        Ok(redirect) => {
            report.state = "attached".into();
            report.interfaces = redirect.interfaces.clone();
            report.ingress = Some(redirect.ingress);
            (Some(redirect), report)
        }
        Err(error) => {
            warn!(
                %error,
                "kernel redirect OFF: public ports {:?} are not redirected (needs CAP_BPF and CAP_NET_ADMIN); still serving on port {target}",
                config.redirect.ports
            );
            report.state = "failed".into();
            report.reason = Some(error.to_string());
            (None, report)
        }
    }
}

/// Runs the multiplexer with `config` until a termination signal arrives.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let started = Instant::now();
    raise_fd_limit();
    let listeners = config
        .listen
        .addresses
        .iter()
        .map(|&address| listener::bind(address))
        .collect::<Result<Vec<_>, _>>()?;
    let control = ControlSocket::bind(&config.control.socket).await?;
    let mut terminate = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;

    let limits = Arc::new(ConnectionLimits::new(
        config.limits.max_connections,
        config.limits.max_connections_per_ip,
    ));
    let stats = Arc::new(Stats::default());
    for listener in &listeners {
        if let Ok(address) = listener.local_addr() {
            info!(%address, "listening");
        }
    }
    // Only once the listeners accept may port 22 be redirected to them.
    let (redirect, redirect_report) = attach_redirect(&config);
    let shared = Arc::new(Shared::new(config, Arc::clone(&stats)));
    let accepting = tokio::spawn(listener::accept_loop(listeners, shared, limits));
    let state = Arc::new(ControlState {
        stats,
        redirect: Mutex::new(redirect),
        redirect_report: Mutex::new(redirect_report),
        started,
    });
    let controlling = tokio::spawn(control.serve(Arc::clone(&state)));

    tokio::select! {
        _ = terminate.recv() => info!("SIGTERM: stopping"),
        _ = interrupt.recv() => info!("SIGINT: stopping"),
    }
    // Detach first: from here on port 22 reaches sshd directly again.
    drop(
        state
            .redirect
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take(),
    );
    accepting.abort();
    controlling.abort();
    let _ = controlling.await;
    Ok(())
}
