//! `muxer run`: raise limits, bind every listener, attach the kernel redirect, tell systemd we are
//! ready, serve; reload on SIGHUP (or `muxer reload`); on SIGTERM stop accepting (which makes the
//! kernel pass new connections to the original services), let in-flight HTTP requests finish
//! within the grace period, detach the redirect, and exit.
use std::ffi::OsString;
use std::net::TcpListener as StdTcpListener;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::client_source::Planner;
use crate::config::{Config, RedirectMode};
use crate::connection;
use crate::control::{Command, ControlError, ControlSocket, ControlState, RedirectReport};
use crate::exporter::{self, Metrics};
use crate::handover::fd_store::{self, FdStore, Restored, RestoredConnection};
use crate::handover::{
    self, Channel, ConnectionMeta, HandoverError, Inheritance, Parcel, Role, Successor,
};
use crate::internal_ports::InternalPorts;
use crate::limits::ConnectionLimits;
use crate::listener::{self, ListenError};
use crate::metrics::HttpMetrics;
use crate::redirect::{Redirect, Targets};
use crate::runtime::{Generation, HandoverHub, Runtime};
use crate::stats::Stats;
use crate::steering::Steering;
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
    /// The sockets a previous process passed could not be taken over.
    #[error(transparent)]
    Handover(#[from] HandoverError),
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
    successor: bool,
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
                successor,
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
    /// The binary `muxer upgrade` starts unless told another.
    executable: Option<PathBuf>,
    /// Copies of the listening sockets (listen addresses, control, metrics) for a successor.
    sockets: Vec<(Role, OwnedFd)>,
    /// Turned off once a successor answers on the control socket, so that its file stays.
    control_file: Arc<std::sync::atomic::AtomicBool>,
}

impl Daemon {
    /// Attaches the redirect `config` asks for, with the daemon's sockets.
    fn attach_redirect(&mut self, config: &Config) -> (Option<Redirect>, RedirectReport) {
        attach_redirect(config, &self.listeners, &mut self.internal_ports, false)
    }

    /// Acts on a command from the control socket (an upgrade is the loop's: it may end it).
    fn command(&mut self, command: Command) {
        match command {
            Command::Reload { reply } => {
                let _ = reply.send(self.reload());
            }
            Command::Upgrade { reply, .. } => {
                let _ = reply.send(Err("upgrade is handled by the daemon's loop".into()));
            }
        }
    }

    /// Starts `binary` (by default the running one) as a successor, hands it every listening
    /// socket and waits until it serves. On failure nothing changed: this process serves on.
    async fn upgrade(
        &mut self,
        binary: Option<PathBuf>,
    ) -> Result<(Successor, u32), HandoverError> {
        let binary = binary
            .or_else(|| self.executable.clone())
            .ok_or(HandoverError::Protocol(
                "no binary: the running one's path is unknown",
            ))?;
        let pin_dir = self.runtime.current.load().config.redirect.pin_dir.clone();
        if let Some(redirect) = self.redirect().as_mut() {
            redirect
                .offer_links(&pin_dir)
                .map_err(|error| HandoverError::Redirect(error.to_string()))?;
        }
        let mut sockets: Vec<(Role, OwnedFd)> = Vec::new();
        let internal = self
            .internal_ports
            .sockets()
            .map(|(public_port, fd)| (Role::Internal { public_port }, fd));
        let all = self
            .sockets
            .iter()
            .map(|(role, fd)| (*role, fd.as_fd()))
            .chain(internal);
        for (role, fd) in all {
            sockets.push((role, fd.try_clone_to_owned()?));
        }
        let args: Vec<OsString> = std::env::args_os().skip(1).collect();
        info!(binary = %binary.display(), "starting the new process");
        let started = tokio::task::spawn_blocking(move || {
            let borrowed: Vec<(Role, BorrowedFd<'_>)> = sockets
                .iter()
                .map(|(role, fd)| (*role, fd.as_fd()))
                .collect();
            Successor::start(&binary, &args, &borrowed, SUCCESSOR_READY_TIMEOUT)
        })
        .await
        .map_err(|error| HandoverError::Channel(std::io::Error::other(error)))?;
        if started.is_err() {
            if let Some(redirect) = self.redirect().as_mut() {
                redirect.withdraw_links();
            }
        }
        started
    }

    /// Closes every copy of a listening socket this process keeps (for the sk_lookup map and
    /// for a successor): one left open on an internal port would keep the kernel program
    /// steering port 22's new connections to a socket nobody accepts from.
    fn close_listening_copies(&mut self) {
        self.listeners.clear();
        self.sockets.clear();
        self.internal_ports.close_copies();
    }

    fn redirect(&self) -> std::sync::MutexGuard<'_, Option<Redirect>> {
        self.control
            .redirect
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
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
        if config.access_log != old.config.access_log || config.log_format != old.config.log_format
        {
            notes.push("access_log or log_format changed: restart to apply".to_owned());
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
            Arc::clone(&self.runtime.handover),
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

/// Longest wait for a successor (`muxer upgrade`) to load its config, take the sockets over,
/// attach its programs and answer.
const SUCCESSOR_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Binds each listen address's SO_REUSEPORT group, or takes over the one a previous process
/// passed (or systemd's descriptor store kept); freshly bound ones go to the store.
fn listen_groups(
    config: &Config,
    worker_count: usize,
    mut inheritance: Option<&mut Inheritance>,
    fd_store: &FdStore,
) -> Result<Vec<Vec<StdTcpListener>>, ListenError> {
    config
        .listen
        .addresses
        .iter()
        .map(|&address| {
            let inherited = inheritance
                .as_deref_mut()
                .map(|inheritance| inheritance.take_listen(address))
                .unwrap_or_default();
            if !inherited.is_empty() {
                return Ok(inherited);
            }
            let group = listener::bind_group(address, worker_count, config.splice.tcp_keepalive)?;
            fd_store.keep_listeners(group.iter().map(AsFd::as_fd));
            Ok(group)
        })
        .collect()
}

/// Goes on splicing the connections systemd's descriptor store gave back, each on the least
/// loaded worker. Bytes that were in flight when the previous process died are lost
/// (docs/handover.md); idle sessions go on.
fn resume_restored(
    connections: Vec<RestoredConnection>,
    runtime: &Arc<Runtime>,
    steering: &Steering,
) {
    for restored in connections {
        let peer = |fd: &OwnedFd| {
            socket2::SockRef::from(fd)
                .peer_addr()
                .ok()
                .and_then(|address| address.as_socket())
        };
        let (Some(client), Some(backend)) = (peer(&restored.client), peer(&restored.upstream))
        else {
            // Ended while no process ran: closing ours (systemd's copy went with the restart's
            // hand-out) finishes it.
            restored.close_in_store(&runtime.handover.fd_store);
            continue;
        };
        let parcel = Parcel {
            meta: ConnectionMeta {
                client,
                protocol: match restored.target {
                    crate::config::Target::Tls => "tls",
                    crate::config::Target::Fallback => "unknown",
                    _ => "ssh",
                }
                .to_owned(),
                target: restored.target,
                backend: backend.to_string(),
                upstream_source: None,
                bytes: (0, 0),
                age_ms: 0,
                pending: (0, 0),
                stored: Some(restored.stored),
            },
            client: restored.client,
            upstream: restored.upstream,
            pending_up: Vec::new(),
            pending_down: Vec::new(),
        };
        let runtime = Arc::clone(runtime);
        steering
            .least_loaded_runtime()
            .spawn(async move { connection::resume(parcel, &runtime) });
    }
}

/// Takes in the connections a previous process hands over, each on the least loaded worker,
/// until it is done. Runs on a thread of its own: receiving blocks.
fn receive_handed_over(mut channel: Channel, runtime: Arc<Runtime>, steering: Arc<Steering>) {
    let spawned = std::thread::Builder::new()
        .name("muxer-handover".into())
        .spawn(move || {
            let mut count = 0usize;
            handover::receive_connections(&mut channel, |parcel| {
                count += 1;
                let runtime = Arc::clone(&runtime);
                steering
                    .least_loaded_runtime()
                    .spawn(async move { connection::resume(parcel, &runtime) });
            });
            info!(connections = count, "handover complete");
        });
    if let Err(error) = spawned {
        error!(%error, "cannot start the thread receiving handed-over connections");
    }
}

/// Runs the multiplexer with `config` (read from `config_path`) until SIGTERM or SIGINT, or until
/// a successor took over (`muxer upgrade`, SIGUSR2).
pub async fn run(config: Config, config_path: &Path) -> Result<(), DaemonError> {
    let started = Instant::now();
    // The binary `muxer upgrade` starts by default: the path this one was started from, read
    // now, before a package upgrade replaces the file.
    let executable = std::env::current_exe().ok();
    raise_fd_limit();
    let handover = Arc::new(HandoverHub::new(FdStore::from_environment()));
    let mut inheritance = handover::inherit()?;
    let mut restored = Restored::default();
    if inheritance.is_none() && handover.fd_store.enabled() {
        restored = fd_store::restored();
        info!(
            listen_sockets = restored.listeners.len(),
            connections = restored.connections.len(),
            "systemd's descriptor store gave back"
        );
        inheritance = Some(Inheritance::from_store(std::mem::take(
            &mut restored.listeners,
        )));
    }
    let worker_count = config.listen.worker_count();
    let groups = listen_groups(
        &config,
        worker_count,
        inheritance.as_mut(),
        &handover.fd_store,
    )?;
    let control_socket = match inheritance.as_mut().and_then(Inheritance::take_control) {
        Some(listener) => ControlSocket::adopt(listener, &config.control.socket)?,
        None => ControlSocket::bind(&config.control.socket).await?,
    };
    let mut signals = Signals::install()?;
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
    // Copies of every listening socket, for a successor.
    let mut sockets: Vec<(Role, OwnedFd)> = groups
        .iter()
        .flatten()
        .filter_map(|socket| socket.as_fd().try_clone_to_owned().ok())
        .map(|fd| (Role::Listen, fd))
        .collect();
    sockets.extend(
        control_socket
            .as_fd()
            .try_clone_to_owned()
            .ok()
            .map(|fd| (Role::Control, fd)),
    );
    // Worker `i` takes socket `i` of every address.
    let mut per_worker: Vec<Vec<StdTcpListener>> = (0..worker_count).map(|_| Vec::new()).collect();
    for group in groups {
        for (index, socket) in group.into_iter().enumerate() {
            per_worker[index % worker_count].push(socket);
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
        Arc::clone(&handover),
    );
    if let Some(inheritance) = inheritance.as_mut() {
        internal_ports.adopt(inheritance.take_internal());
    }
    internal_ports.prefer(std::mem::take(&mut restored.internal_ports));
    let successor = inheritance
        .as_ref()
        .is_some_and(Inheritance::has_predecessor);
    let (redirect, redirect_report) =
        attach_redirect(&config, &listeners, &mut internal_ports, successor);
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
        Some(address) => {
            let inherited = inheritance
                .as_mut()
                .and_then(|inheritance| inheritance.take_metrics(address));
            match inherited {
                Some(listener) => exporter::adopt(listener),
                None => exporter::bind(address).await,
            }
        }
        None => None,
    };
    if let Some(listener) = &metrics_listener {
        sockets.extend(
            listener
                .as_fd()
                .try_clone_to_owned()
                .ok()
                .map(|fd| (Role::Metrics, fd)),
        );
    }
    let shutdown_grace = config.shutdown_grace;
    let listener_keepalive = config.splice.tcp_keepalive;
    let pin_workers = config.listen.pin_workers;
    let generation = Generation::new(
        config,
        Arc::clone(&stats),
        Arc::clone(&http_metrics),
        sources,
        Arc::clone(&handover),
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
        handover,
    });
    let mut daemon = Daemon {
        runtime: Arc::clone(&runtime),
        control: Arc::clone(&control),
        sources: planner,
        listeners,
        internal_ports,
        executable,
        sockets,
        control_file: control_socket.keep_file(),
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
    if let Some(channel) = inheritance.map(Inheritance::ready).transpose()?.flatten() {
        info!("took over from the previous process");
        receive_handed_over(channel, Arc::clone(&runtime), workers.steering());
    }
    resume_restored(restored.connections, &runtime, &workers.steering());
    notify(&[sd_notify::NotifyState::Ready]);

    let stop = loop {
        tokio::select! {
            _ = signals.terminate.recv() => { info!("SIGTERM: stopping"); break Stop::Exit; }
            _ = signals.interrupt.recv() => { info!("SIGINT: stopping"); break Stop::Exit; }
            _ = signals.hangup.recv() => {
                info!("SIGHUP: reloading {}", runtime.config_path.display());
                let _ = daemon.reload();
            }
            _ = signals.upgrade.recv() => {
                info!("SIGUSR2: upgrading");
                match daemon.upgrade(None).await {
                    Ok(successor) => break Stop::HandOver(successor),
                    Err(error) => error!(%error, "upgrade failed; this process serves on"),
                }
            }
            Some(command) = command_queue.recv() => match command {
                Command::Upgrade { binary, reply } => match daemon.upgrade(binary).await {
                    Ok(successor) => {
                        let _ = reply.send(Ok(format!("process {} took over", successor.1)));
                        break Stop::HandOver(successor);
                    }
                    Err(error) => {
                        error!(%error, "upgrade failed; this process serves on");
                        let _ = reply.send(Err(error.to_string()));
                    }
                },
                command => daemon.command(command),
            },
        }
    };
    let ending = Ending {
        runtime: &runtime,
        control: &control,
        workers,
        shutdown_grace,
    };
    match stop {
        Stop::Exit => ending.stop(daemon).await,
        Stop::HandOver(successor) => ending.hand_over(daemon, successor).await,
    }
    controlling.abort();
    let _ = controlling.await;
    if let Some(task) = metrics_task {
        task.abort();
    }
    info!("stopped");
    Ok(())
}

/// The signals the daemon acts on.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
    upgrade: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals, DaemonError> {
        let install = |kind| signal(kind).map_err(DaemonError::Signal);
        Ok(Signals {
            terminate: install(SignalKind::terminate())?,
            interrupt: install(SignalKind::interrupt())?,
            hangup: install(SignalKind::hangup())?,
            upgrade: install(SignalKind::user_defined2())?,
        })
    }
}

/// How the daemon's loop ended.
enum Stop {
    /// SIGTERM or SIGINT: stop serving.
    Exit,
    /// A successor (and its pid) serves now.
    HandOver((Successor, u32)),
}

/// What the end of the daemon needs.
struct Ending<'a> {
    runtime: &'a Arc<Runtime>,
    control: &'a Arc<ControlState>,
    workers: Workers,
    shutdown_grace: Duration,
}

impl Ending<'_> {
    fn redirect(&self) -> std::sync::MutexGuard<'_, Option<Redirect>> {
        self.control
            .redirect
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Stop accepting (which gives port 22 back to sshd), let in-flight HTTP requests finish,
    /// detach the redirect, and remove the reply rules.
    async fn stop(self, mut daemon: Daemon) {
        notify(&[sd_notify::NotifyState::Stopping]);
        // 0. sk_lookup mode: the sockets leave the program's map, and the daemon's copies close
        //    with the workers' sockets below, so nothing steers new connections to a closing
        //    socket.
        if let Some(redirect) = self.redirect().as_mut() {
            redirect.stop_steering();
        }
        daemon.close_listening_copies();
        // 1. Stop accepting. With no listener on the internal ports the kernel program stops
        //    redirecting new connections at once: from here on port 22 reaches sshd directly
        //    again. Connections already redirected keep their sockets, hence their rewrite, so
        //    in-flight requests through port 22 can finish.
        self.workers.stop_accepting().await;
        info!("stopped accepting; new connections to the public ports reach their own services");
        // 2. Let in-flight HTTP requests finish, up to the grace period.
        self.drain_http().await;
        // 3. Detach the programs.
        drop(self.redirect().take());
        self.workers.exit();
        // 4. Remove the reply rules (a crash leaves them: harmless, docs/lockout.md).
        drop(daemon);
    }

    /// The successor serves: stop accepting, send it every spliced connection (also those that
    /// start splicing meanwhile), let HTTP requests in flight finish here, and leave everything
    /// the successor uses in place.
    async fn hand_over(self, mut daemon: Daemon, (successor, pid): (Successor, u32)) {
        // systemd follows the successor from now on.
        notify(&[sd_notify::NotifyState::MainPid(pid)]);
        let deadline = tokio::time::Instant::now() + self.shutdown_grace;
        if let Some(redirect) = self.redirect().as_mut() {
            redirect.stop_steering();
        }
        // The successor holds its own copies. Should it die while this process drains, nothing
        // of ours may keep listening on an internal port.
        daemon.close_listening_copies();
        self.workers.stop_accepting().await;
        info!(
            pid,
            "the new process accepts now; handing spliced connections over"
        );
        let (parcels, mut queue) = tokio::sync::mpsc::unbounded_channel::<Parcel>();
        self.runtime.handover.start(parcels);
        let forwarding = tokio::task::spawn_blocking(move || {
            let mut sent = 0usize;
            while let Some(parcel) = queue.blocking_recv() {
                match successor.send_connection(&parcel) {
                    Ok(()) => sent += 1,
                    Err(error) => {
                        warn!(client = %parcel.meta.client, %error, "a connection could not be handed over; closed")
                    }
                }
            }
            successor.finish();
            sent
        });
        self.drain_http().await;
        // Connections still sniffing go over once spliced; wait for every task to be gone.
        let steering = self.workers.steering();
        while steering.live_tasks() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.runtime.handover.close();
        match forwarding.await {
            Ok(sent) => info!(connections = sent, "spliced connections handed over"),
            Err(error) => warn!(%error, "handing connections over failed"),
        }
        if let Some(mut redirect) = self.redirect().take() {
            redirect.leave_to_successor();
        }
        daemon
            .control_file
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.workers.exit();
        daemon.sources.leave_rules();
    }

    async fn drain_http(&self) {
        self.runtime.shutdown.cancel();
        self.runtime.http_connections.close();
        if tokio::time::timeout(self.shutdown_grace, self.runtime.http_connections.wait())
            .await
            .is_err()
        {
            warn!(grace = ?self.shutdown_grace, "grace period over; closing remaining HTTP connections");
        }
    }
}
