//! `muxer run`: raise limits, bind every listener, attach the kernel redirect, tell systemd we are
//! ready, serve; reload on SIGHUP (or `muxer reload`); on SIGTERM stop accepting (which makes the
//! kernel pass new connections to the original services), let in-flight HTTP requests finish
//! within the grace period, detach the redirect, and exit.
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::client_source::Planner;
use crate::config::{Config, RedirectMode};
use crate::control::{Command, ControlError, ControlSocket, ControlState, RedirectReport};
use crate::exporter::{self, Metrics};
use crate::internal_ports::InternalPorts;
use crate::limits::ConnectionLimits;
use crate::listener::{self, ListenError};
use crate::metrics::HttpMetrics;
use crate::redirect::{Redirect, Targets};
use crate::runtime::{Generation, Runtime};
use crate::stats::Stats;
use crate::workers::{WorkerError, Workers};

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
    /// A worker thread could not start.
    #[error(transparent)]
    Worker(#[from] WorkerError),
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

fn off_report(config: &Config, reason: String) -> RedirectReport {
    RedirectReport {
        state: "off".into(),
        reason: Some(reason),
        interfaces: Vec::new(),
        ports: config.redirect.ports.clone(),
        target_port: config.redirect_target_port(),
        internal_ports: Default::default(),
        ingress: None,
    }
}

fn attached_report(redirect: &Redirect) -> RedirectReport {
    RedirectReport {
        state: "attached".into(),
        reason: None,
        interfaces: redirect.interfaces(),
        ports: redirect.ports(),
        target_port: Some(redirect.target_port),
        internal_ports: redirect.internal_ports().clone(),
        ingress: Some(redirect.ingress),
    }
}

/// The internal ports `config`'s redirect needs (binding the missing ones), or none.
fn internal_ports_for(
    config: &Config,
    internal: &mut InternalPorts,
) -> Result<std::collections::BTreeMap<u16, u16>, ListenError> {
    if !Redirect::needs_internal_ports(&config.redirect) {
        return Ok(Default::default());
    }
    internal.ensure(&config.redirect.ports).cloned()
}

/// Attaches the redirect if configured. Failing to attach is not fatal: the daemon still serves
/// its listen port, and says why the redirect is off.
fn attach_redirect(
    config: &Config,
    listeners: &[OwnedFd],
    internal: &mut InternalPorts,
) -> (Option<Redirect>, RedirectReport) {
    if config.redirect.mode == RedirectMode::Off {
        info!("kernel redirect off by config; clients use the listen port directly");
        return (None, off_report(config, "redirect.mode = \"off\"".into()));
    }
    let target = config
        .redirect_target_port()
        .expect("validated: one listen port");
    let listeners: Vec<BorrowedFd<'_>> = listeners.iter().map(AsFd::as_fd).collect();
    let attached = internal_ports_for(config, internal)
        .map_err(|error| error.to_string())
        .and_then(|internal_ports| {
            let targets = Targets {
                listen_port: target,
                listeners: &listeners,
                internal_ports: &internal_ports,
            };
            Redirect::attach(&config.redirect, &targets).map_err(|error| {
                if error.is_permission() {
                    format!("{error} (needs CAP_BPF and CAP_NET_ADMIN)")
                } else {
                    error.to_string()
                }
            })
        });
    // Parsing and loading the eBPF object allocates and frees ~26 MB on this thread; without this
    // the allocator would keep it resident for the daemon's life.
    crate::memory::release_freed();
    match attached {
        Ok(redirect) => {
            let report = attached_report(&redirect);
            (Some(redirect), report)
        }
        Err(error) => {
            let ports = &config.redirect.ports;
            warn!(%error, "kernel redirect OFF: public ports {ports:?} are not steered; still serving on port {target}");
            let mut report = off_report(config, error);
            report.state = "failed".into();
            (None, report)
        }
    }
}

/// The daemon: the one owner of the process state. Signals and the control socket's commands
/// reach it in [`run`]'s loop; the data path gets narrow handles ([`Runtime`]) and never calls
/// back up.
struct Daemon {
    runtime: Arc<Runtime>,
    control: Arc<ControlState>,
    /// The reply rules for transparent connections to local upstreams; removed at a clean exit.
    sources: Planner,
    /// One listening socket per listen address (copies of the first worker's), for the sk_lookup
    /// program's map; closed when the daemon stops accepting.
    listeners: Vec<OwnedFd>,
    /// The TC/XDP redirect's internal ports.
    internal_ports: InternalPorts,
}

impl Daemon {
    /// Attaches the redirect `config` asks for, with the daemon's sockets.
    fn attach_redirect(&mut self, config: &Config) -> (Option<Redirect>, RedirectReport) {
        attach_redirect(config, &self.listeners, &mut self.internal_ports)
    }

    /// Acts on a command from the control socket.
    fn command(&mut self, command: Command) {
        match command {
            Command::Reload { reply } => {
                let _ = reply.send(self.reload());
            }
        }
    }

    /// Re-reads the config file and applies it to new connections and requests. An invalid file
    /// changes nothing. Returns what happened, for `muxer reload`.
    fn reload(&mut self) -> Result<String, String> {
        let config = match Config::load(&self.runtime.config_path) {
            Ok(config) => config,
            Err(error) => {
                error!(%error, "reload rejected; the running configuration stays");
                return Err(error.to_string());
            }
        };
        let old = self.runtime.current.load_full();
        let mut notes = Vec::new();
        if config.listen.addresses != old.config.listen.addresses {
            notes.push("listen.addresses changed: restart to apply".to_owned());
        }
        if config.listen.workers != old.config.listen.workers {
            notes.push("listen.workers changed: restart to apply".to_owned());
        }
        if config.listen.pin_workers != old.config.listen.pin_workers {
            notes.push("listen.pin_workers changed: restart to apply".to_owned());
        }
        if config.control.socket != old.config.control.socket {
            notes.push("control.socket changed: restart to apply".to_owned());
        }
        if config.metrics.listen != old.config.metrics.listen {
            notes.push("metrics.listen changed: restart to apply".to_owned());
        }
        self.runtime.limits.resize(&config.limits);
        self.reload_redirect(&config, &old.config, &mut notes);
        let sources = self.sources.apply(&config);
        let generation = Generation::new(
            config,
            Arc::clone(&self.runtime.stats),
            Arc::clone(&self.runtime.http_metrics),
            sources,
        );
        self.runtime.install(generation);
        for note in &notes {
            warn!("{note}");
        }
        info!("configuration reloaded");
        Ok(if notes.is_empty() {
            "reloaded".into()
        } else {
            format!("reloaded; {}", notes.join("; "))
        })
    }

    fn reload_redirect(&mut self, config: &Config, old: &Config, notes: &mut Vec<String>) {
        // The control state is shared with the control socket's reader, hence the locks.
        let control = Arc::clone(&self.control);
        let mut slot = control
            .redirect
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let mut report = control
            .redirect_report
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if config.redirect_target_port() != old.redirect_target_port() {
            notes.push("the redirect target (listen port) changed: restart to apply".into());
            return;
        }
        match (slot.as_mut(), config.redirect.mode) {
            (Some(redirect), mode) if mode == redirect.requested_mode() => {
                let internal_ports = internal_ports_for(config, &mut self.internal_ports);
                let updated =
                    internal_ports
                        .map_err(|error| error.to_string())
                        .and_then(|internal_ports| {
                            redirect
                                .update(&config.redirect, &internal_ports)
                                .map_err(|error| error.to_string())
                        });
                match updated {
                    Ok(()) => *report = attached_report(redirect),
                    Err(error) => notes.push(format!(
                        "redirect update failed, previous attachment kept: {error}"
                    )),
                }
            }
            (Some(_), _) => {
                // A mode change: detach (port 22 reaches sshd directly for that instant), attach anew.
                drop(slot.take());
                let (redirect, new_report) = self.attach_redirect(config);
                *slot = redirect;
                *report = new_report;
            }
            (None, RedirectMode::Off) => {
                *report = off_report(config, "redirect.mode = \"off\"".into())
            }
            (None, _) => {
                let (redirect, new_report) = self.attach_redirect(config);
                *slot = redirect;
                *report = new_report;
            }
        }
    }
}

fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        warn!(%error, "cannot notify systemd");
    }
}

/// Runs the multiplexer with `config` (read from `config_path`) until SIGTERM or SIGINT.
pub async fn run(config: Config, config_path: &Path) -> Result<(), DaemonError> {
    let started = Instant::now();
    raise_fd_limit();
    let worker_count = config.listen.worker_count();
    let groups = config
        .listen
        .addresses
        .iter()
        .map(|&address| listener::bind_group(address, worker_count, config.splice.tcp_keepalive))
        .collect::<Result<Vec<_>, _>>()?;
    let control_socket = ControlSocket::bind(&config.control.socket).await?;
    let mut terminate = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(DaemonError::Signal)?;
    for group in &groups {
        if let Some(Ok(address)) = group.first().map(std::net::TcpListener::local_addr) {
            info!(%address, workers = worker_count, "listening");
        }
    }
    // The sk_lookup program steers to one socket per address; the kernel's SO_REUSEPORT group
    // then picks the worker.
    let listeners: Vec<OwnedFd> = groups
        .iter()
        .filter_map(|group| group.first())
        .filter_map(|socket| socket.as_fd().try_clone_to_owned().ok())
        .collect();
    // Worker `i` takes socket `i` of every address.
    let mut per_worker: Vec<Vec<std::net::TcpListener>> =
        (0..worker_count).map(|_| Vec::new()).collect();
    for group in groups {
        for (index, socket) in group.into_iter().enumerate() {
            per_worker[index].push(socket);
        }
    }
    // Only once the listeners accept may port 22 be redirected to them.
    // The reply rules for transparent connections come first: once the redirect is attached (and
    // says so), everything a steered connection needs is in place.
    let mut planner = Planner::default();
    let sources = planner.apply(&config);
    let (mut internal_ports, adopt) = InternalPorts::new(
        &config.listen.addresses,
        worker_count,
        config.splice.tcp_keepalive,
    );
    let (redirect, redirect_report) = attach_redirect(&config, &listeners, &mut internal_ports);
    let stats = Arc::new(Stats::default());
    let limits = ConnectionLimits::new(&config.limits);
    let (commands, mut command_queue) = tokio::sync::mpsc::unbounded_channel();
    let control = Arc::new(ControlState {
        stats: Arc::clone(&stats),
        limits: Arc::clone(&limits),
        redirect: Mutex::new(redirect),
        redirect_report: Mutex::new(redirect_report),
        started,
        commands,
        steering: std::sync::OnceLock::new(),
    });
    let http_metrics = Arc::new(HttpMetrics::default());
    let metrics = Arc::new(Metrics::new(Arc::clone(&control), &http_metrics));
    let metrics_listener = match config.metrics.listen {
        Some(address) => exporter::bind(address).await,
        None => None,
    };
    let shutdown_grace = config.shutdown_grace;
    let listener_keepalive = config.splice.tcp_keepalive;
    let pin_workers = config.listen.pin_workers;
    let generation = Generation::new(
        config,
        Arc::clone(&stats),
        Arc::clone(&http_metrics),
        sources,
    );
    let runtime = Arc::new(Runtime {
        limits,
        current_http: Arc::new(ArcSwapOption::new(generation.http.clone())),
        current: ArcSwap::from_pointee(generation),
        stats,
        http_metrics: Arc::clone(&http_metrics),
        shutdown: CancellationToken::new(),
        http_connections: TaskTracker::new(),
        config_path: PathBuf::from(config_path),
        listener_keepalive,
    });
    let mut daemon = Daemon {
        runtime: Arc::clone(&runtime),
        control: Arc::clone(&control),
        sources: planner,
        listeners,
        internal_ports,
    };

    let workers = Workers::start(per_worker, adopt, &runtime, pin_workers)?;
    let _ = control.steering.set(workers.steering());
    let controlling = tokio::spawn(control_socket.serve(Arc::clone(&control)));
    let metrics_task = metrics_listener.map(|listener| {
        if let Ok(address) = listener.local_addr() {
            info!(%address, "metrics at /metrics");
        }
        tokio::spawn(exporter::serve(listener, metrics))
    });
    notify(&[sd_notify::NotifyState::Ready]);

    loop {
        tokio::select! {
            _ = terminate.recv() => { info!("SIGTERM: stopping"); break; }
            _ = interrupt.recv() => { info!("SIGINT: stopping"); break; }
            _ = hangup.recv() => {
                info!("SIGHUP: reloading {}", runtime.config_path.display());
                let _ = daemon.reload();
            }
            Some(command) = command_queue.recv() => daemon.command(command),
        }
    }
    notify(&[sd_notify::NotifyState::Stopping]);
    // 0. sk_lookup mode: the sockets leave the program's map, and the daemon's copies close with
    //    the workers' sockets below, so nothing steers new connections to a closing socket.
    if let Some(redirect) = control
        .redirect
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
        .as_mut()
    {
        redirect.stop_steering();
    }
    daemon.listeners.clear();
    // 1. Stop accepting. With no listener on the internal ports the kernel program stops
    //    redirecting new connections at once: from here on port 22 reaches sshd directly again.
    //    Connections already redirected keep their sockets, hence their rewrite, so in-flight
    //    requests through port 22 can finish.
    workers.stop_accepting().await;
    info!("stopped accepting; new connections to the public ports reach their own services");
    // 2. Let in-flight HTTP requests finish, up to the grace period.
    runtime.shutdown.cancel();
    runtime.http_connections.close();
    if tokio::time::timeout(shutdown_grace, runtime.http_connections.wait())
        .await
        .is_err()
    {
        warn!(grace = ?shutdown_grace, "grace period over; closing remaining HTTP connections");
    }
    // 3. Detach the programs.
    drop(
        control
            .redirect
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take(),
    );
    controlling.abort();
    let _ = controlling.await;
    if let Some(task) = metrics_task {
        task.abort();
    }
    workers.exit();
    // 4. Remove the reply rules (a crash leaves them: harmless, docs/lockout.md).
    drop(daemon);
    info!("stopped");
    Ok(())
}
