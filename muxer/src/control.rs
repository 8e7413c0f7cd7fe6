//! The local control socket: a unix socket (mode 0600) answering one-line commands with one JSON
//! line. `muxer stats` is its client.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::accept_errors::back_off;
use crate::limits::{ClassSnapshot, ConnectionLimits};
use crate::log_limit::LogLimit;
use crate::redirect::{IngressHook, KernelCounters, Redirect};
use crate::stats::{RouteSnapshot, Stats};
use crate::steering::{Steering, WorkerSnapshot};

/// Longest wait for a control client's command line.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// What the control socket asks of the daemon. The daemon owns the process state and acts on these
/// in its own loop, beside the signals; nothing here calls into it.
#[derive(Debug)]
pub enum Command {
    /// Re-read the config file; the reply says what happened.
    Reload {
        /// Where the outcome goes (the message `muxer reload` prints, or why it was rejected).
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// Start the binary again (or `binary`) and hand it every socket; the reply says whether it
    /// took over.
    Upgrade {
        /// Another binary than the one running, if given.
        binary: Option<PathBuf>,
        /// Where the outcome goes.
        reply: oneshot::Sender<Result<String, String>>,
    },
}

/// A control socket that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Creating, binding or connecting failed.
    #[error("{call} {}: {source}", path.display())]
    Io {
        /// The failing call.
        call: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another daemon answers on the socket.
    #[error("another muxer is running: its control socket {} answers", .0.display())]
    AlreadyRunning(PathBuf),
    /// Nothing listens on the socket.
    #[error("muxer is not running (nothing answers on {})", .0.display())]
    NotRunning(PathBuf),
    /// The daemon's answer was not understood.
    #[error("unexpected answer from {}: {reason}", path.display())]
    BadAnswer {
        /// The socket path.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

/// The state of the kernel redirect, as reported.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RedirectReport {
    /// `attached`, `off` (by config) or `failed`.
    pub state: String,
    /// Why it is off or failed.
    pub reason: Option<String>,
    /// Interfaces attached to.
    pub interfaces: Vec<String>,
    /// Public ports redirected.
    pub ports: Vec<u16>,
    /// muxer's listen port (sk_lookup steers to its sockets).
    pub target_port: Option<u16>,
    /// TC/XDP mode: public port → the internal port its connections are redirected to.
    #[serde(default)]
    pub internal_ports: std::collections::BTreeMap<u16, u16>,
    /// `tc`, `xdp_native` or `xdp_generic`.
    pub ingress: Option<IngressHook>,
}

/// The daemon's own counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DaemonCounters {
    /// Per route: ssh, http, tls, unknown.
    pub routes: BTreeMap<String, RouteSnapshot>,
    /// Clients that sent nothing before the probe timeout.
    pub probe_timeouts: u64,
    /// Open connections and limit per class (sniffing, ssh, http, tls, tunnel, upgraded,
    /// fallback).
    #[serde(default)]
    pub classes: BTreeMap<String, ClassSnapshot>,
    /// Connections refused (or idle ones closed) per reason.
    #[serde(default)]
    pub refused: BTreeMap<String, u64>,
    /// Connections (or request bodies) ended per kind of timeout.
    #[serde(default)]
    pub timeouts: BTreeMap<String, u64>,
    /// Backends that could not be reached.
    pub upstream_connect_errors: u64,
    /// Connections closed for want of a configured route.
    pub no_route: u64,
    /// HTTP/1.1 connections parked now (idle, holding no buffers).
    #[serde(default)]
    pub http_parked: u64,
    /// Per worker thread: the connections it serves and the CPU it claims.
    #[serde(default)]
    pub workers: Vec<WorkerSnapshot>,
}

/// The answer to `stats`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StatsReport {
    /// Seconds since the daemon started.
    pub uptime_seconds: f64,
    /// The daemon's counters.
    pub daemon: DaemonCounters,
    /// The kernel redirect's state.
    pub redirect: RedirectReport,
    /// Kernel counters while the redirect is attached.
    pub kernel: Option<KernelCounters>,
    /// Log lines dropped because the log writer fell behind (never blocking a connection).
    #[serde(default)]
    pub log_lines_dropped: u64,
}

/// What the control socket serves from.
#[derive(Debug)]
pub struct ControlState {
    /// The daemon's counters.
    pub stats: Arc<Stats>,
    /// The connection limits, with their per-class counts, refusals and timeouts.
    pub limits: Arc<ConnectionLimits>,
    /// The redirect, while attached.
    pub redirect: Mutex<Option<Redirect>>,
    /// Its reported state.
    pub redirect_report: Mutex<RedirectReport>,
    /// When the daemon started.
    pub started: Instant,
    /// Commands for the daemon, which owns the process state (`reload`).
    pub commands: UnboundedSender<Command>,
    /// The workers' steering state, once they run.
    pub steering: OnceLock<Arc<Steering>>,
}

impl ControlState {
    /// Builds the `stats` answer.
    pub fn report(&self) -> StatsReport {
        let stats = &self.stats;
        let load = |counter: &std::sync::atomic::AtomicU64| {
            counter.load(std::sync::atomic::Ordering::Relaxed)
        };
        let routes = [
            ("ssh", &stats.ssh),
            ("http", &stats.http),
            ("tls", &stats.tls),
            ("unknown", &stats.unknown),
        ]
        .into_iter()
        .map(|(name, counters)| (name.to_owned(), counters.snapshot()))
        .collect();
        let kernel = self
            .redirect
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .as_ref()
            .and_then(|redirect| match redirect.counters() {
                Ok(counters) => Some(counters),
                Err(error) => {
                    warn!(%error, "cannot read kernel counters");
                    None
                }
            });
        StatsReport {
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            daemon: DaemonCounters {
                routes,
                probe_timeouts: load(&stats.probe_timeouts),
                classes: self.limits.classes(),
                refused: self.limits.refusals(),
                timeouts: self.limits.timeouts(),
                upstream_connect_errors: load(&stats.upstream_connect_errors),
                no_route: load(&stats.no_route),
                http_parked: self.limits.idle.len() as u64,
                workers: self
                    .steering
                    .get()
                    .map(|steering| steering.snapshot())
                    .unwrap_or_default(),
            },
            redirect: self
                .redirect_report
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .clone(),
            kernel,
            log_lines_dropped: crate::logging::lines_dropped(),
        }
    }
}

/// The bound control socket; removes its file when dropped, unless a successor process took it
/// over ([`ControlSocket::keep_file`]).
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    remove_file: Arc<std::sync::atomic::AtomicBool>,
}

impl ControlSocket {
    /// Binds `path` with mode 0600, replacing a stale socket file but refusing to take over one
    /// that a running daemon answers on.
    pub async fn bind(path: &Path) -> Result<ControlSocket, ControlError> {
        let io = |call| io_error(call, path);
        if path.exists() {
            if UnixStream::connect(path).await.is_ok() {
                return Err(ControlError::AlreadyRunning(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(io("remove stale socket"))?;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io("mkdir for"))?;
        }
        // Created 0600 from the start: the umask applies to bind(2).
        let previous = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
        let bound = UnixListener::bind(path);
        rustix::process::umask(previous);
        let listener = bound.map_err(io("bind"))?;
        Ok(ControlSocket {
            listener,
            path: path.to_owned(),
            remove_file: Arc::new(true.into()),
        })
    }

    /// The socket a previous process bound at `path` and handed over.
    pub(crate) fn adopt(
        listener: std::os::unix::net::UnixListener,
        path: &Path,
    ) -> Result<ControlSocket, ControlError> {
        let io = |call| io_error(call, path);
        listener
            .set_nonblocking(true)
            .map_err(io("fcntl(O_NONBLOCK)"))?;
        Ok(ControlSocket {
            listener: UnixListener::from_std(listener).map_err(io("register"))?,
            path: path.to_owned(),
            remove_file: Arc::new(true.into()),
        })
    }

    /// The listening socket (a copy goes to a successor process).
    pub(crate) fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.listener.as_fd()
    }

    /// A switch that, turned off, leaves the socket file in place when this is dropped: a
    /// successor answers on it now.
    pub(crate) fn keep_file(&self) -> Arc<std::sync::atomic::AtomicBool> {
        Arc::clone(&self.remove_file)
    }

    /// Answers commands until the task is dropped.
    pub async fn serve(self, state: Arc<ControlState>) {
        static WARNING: LogLimit = LogLimit::per(Duration::from_secs(1));
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    back_off(&error, "control socket", &WARNING).await;
                    continue;
                }
            };
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                if let Err(error) = answer(stream, &state).await {
                    debug!(%error, "control connection failed");
                }
            });
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if self.remove_file.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn answer(stream: UnixStream, state: &ControlState) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // A local client that never finishes its line does not hold a task forever.
    tokio::time::timeout(
        COMMAND_TIMEOUT,
        BufReader::new(read).take(4096).read_line(&mut line),
    )
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let line = line.trim();
    let (verb, argument) = line.split_once(' ').unwrap_or((line, ""));
    let reply = match (verb, argument) {
        ("stats", "") => serde_json::to_string(&state.report()).map_err(std::io::Error::other)?,
        ("reload", "") => ask(state, |reply| Command::Reload { reply }).await,
        ("upgrade", binary) => {
            let binary = (!binary.is_empty()).then(|| PathBuf::from(binary));
            ask(state, |reply| Command::Upgrade { binary, reply }).await
        }
        _ => serde_json::json!({ "error": format!("unknown command {line:?}") }).to_string(),
    };
    write.write_all(reply.as_bytes()).await?;
    write.write_all(b"\n").await?;
    write.shutdown().await
}

/// Sends the daemon the command `make` builds and returns its answer as a JSON line.
async fn ask(
    state: &ControlState,
    make: impl FnOnce(oneshot::Sender<Result<String, String>>) -> Command,
) -> String {
    let (reply, answer) = oneshot::channel();
    let result = match state.commands.send(make(reply)) {
        Ok(()) => answer
            .await
            .unwrap_or_else(|_| Err("the daemon is shutting down".into())),
        Err(_) => Err("the daemon is shutting down".into()),
    };
    match result {
        Ok(message) => serde_json::json!({ "ok": message }).to_string(),
        Err(message) => serde_json::json!({ "error": message }).to_string(),
    }
}

/// Maps an OS error of `call` on the control socket at `path`.
fn io_error<'a>(
    call: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ControlError + 'a {
    move |source| ControlError::Io {
        call,
        path: path.to_owned(),
        source,
    }
}

/// Sends `command` to the daemon at `path` and returns its one-line JSON answer.
pub async fn request(path: &Path, command: &str) -> Result<serde_json::Value, ControlError> {
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ControlError::NotRunning(path.to_owned())
            }
            _ => ControlError::Io {
                call: "connect",
                path: path.to_owned(),
                source,
            },
        })?;
    let io = |call| io_error(call, path);
    stream
        .write_all(format!("{command}\n").as_bytes())
        .await
        .map_err(io("write"))?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .await
        .map_err(io("read"))?;
    serde_json::from_str(&reply).map_err(|error| ControlError::BadAnswer {
        path: path.to_owned(),
        reason: error.to_string(),
    })
}

/// Asks the daemon at `path` for its stats.
pub async fn request_stats(path: &Path) -> Result<StatsReport, ControlError> {
    let answer = request(path, "stats").await?;
    serde_json::from_value(answer).map_err(|error| ControlError::BadAnswer {
        path: path.to_owned(),
        reason: error.to_string(),
    })
}
