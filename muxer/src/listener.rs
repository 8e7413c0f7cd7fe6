//! Listening sockets and the accept loop: limits, and back-off when the process runs out of file
//! descriptors, so accepting pauses but never crashes.
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use std::task::Poll;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::connection;
use crate::runtime::Runtime;

/// How long the accept loop sleeps after the process or system ran out of descriptors.
const FD_EXHAUSTION_BACKOFF: Duration = Duration::from_millis(100);
/// Least time between two warnings of the same kind from one accept loop.
const WARN_INTERVAL: Duration = Duration::from_secs(1);

/// A listening socket that could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address}: {call}: {source}")]
pub struct ListenError {
    /// The configured address.
    pub address: SocketAddr,
    /// The failing call.
    pub call: &'static str,
    /// The OS error.
    pub source: io::Error,
}

/// Binds `address` with a large backlog; IPv6 sockets are IPv6-only so `0.0.0.0` and `[::]` on
/// the same port can both be listed.
pub fn bind(address: SocketAddr) -> Result<TcpListener, ListenError> {
    let fail = |call| {
        move |source| ListenError {
            address,
            call,
            source,
        }
    };
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .map_err(fail("socket"))?;
    socket
        .set_reuse_address(true)
        .map_err(fail("setsockopt(SO_REUSEADDR)"))?;
    if address.is_ipv6() {
        socket
            .set_only_v6(true)
            .map_err(fail("setsockopt(IPV6_V6ONLY)"))?;
    }
    socket
        .set_nonblocking(true)
        .map_err(fail("fcntl(O_NONBLOCK)"))?;
    socket.bind(&address.into()).map_err(fail("bind"))?;
    socket.listen(4096).map_err(fail("listen"))?;
    TcpListener::from_std(socket.into()).map_err(fail("register with tokio"))
}

/// Rate limiter for repeated warnings.
struct Throttle(Option<Instant>);

impl Throttle {
    fn ready(&mut self) -> bool {
        let now = Instant::now();
        if self
            .0
            .is_some_and(|last| now.duration_since(last) < WARN_INTERVAL)
        {
            return false;
        }
        self.0 = Some(now);
        true
    }
}

fn is_fd_exhaustion(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(code) if code == rustix::io::Errno::MFILE.raw_os_error() || code == rustix::io::Errno::NFILE.raw_os_error() || code == rustix::io::Errno::NOBUFS.raw_os_error() || code == rustix::io::Errno::NOMEM.raw_os_error())
}

/// Accepts whichever listener has a connection first, starting the scan after the listener that
/// won last time so that no listener starves.
async fn accept_any(
    listeners: &[TcpListener],
    next: &mut usize,
) -> io::Result<(TcpStream, SocketAddr)> {
    std::future::poll_fn(|cx| {
        for offset in 0..listeners.len() {
            let index = (*next + offset) % listeners.len();
            if let Poll::Ready(result) = listeners[index].poll_accept(cx) {
                *next = index + 1;
                return Poll::Ready(result);
            }
        }
        Poll::Pending
    })
    .await
}

/// Accepts connections on every listener forever, spawning a task for each.
///
/// One loop serves all listeners so that the global limit's slot, taken before accepting, is
/// never held by a listener that has nothing to accept while another's clients wait.
pub async fn accept_loop(listeners: Vec<TcpListener>, runtime: Arc<Runtime>) {
    let limits = Arc::clone(&runtime.limits);
    let mut next = 0;
    let mut limit_warning = Throttle(None);
    let mut fd_warning = Throttle(None);
    loop {
        if limits.global_exhausted() && limit_warning.ready() {
            warn!(
                max_connections = runtime.current.load().config.limits.max_connections,
                "connection limit reached; new connections wait in the backlog"
            );
        }
        let permit = limits.wait_for_global().await;
        let (stream, peer) = match accept_any(&listeners, &mut next).await {
            Ok(accepted) => accepted,
            Err(error) if is_fd_exhaustion(&error) => {
                if fd_warning.ready() {
                    warn!(%error, "out of file descriptors; accepting paused briefly");
                }
                tokio::time::sleep(FD_EXHAUSTION_BACKOFF).await;
                continue;
            }
            Err(error) => {
                // ECONNABORTED and friends: the client gave up before we accepted.
                debug!(%error, "accept failed");
                continue;
            }
        };
        // Per-address admission happens in the connection task, once the real client address is
        // known (it may arrive in a PROXY header).
        tokio::spawn(connection::serve(
            stream,
            peer,
            Arc::clone(&runtime),
            permit,
        ));
    }
}
