//! Listening sockets and the accept loop: the total connection limit, and what happens when the
//! process runs out of file descriptors: the longest-idle HTTP keep-alive connections are closed
//! to make room, and accepting backs off briefly but never crashes.
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use std::task::Poll;

use std::net::TcpListener as StdTcpListener;
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{debug, warn};

use crate::accept_errors::{is_fd_exhaustion, FD_EXHAUSTION_BACKOFF};
use crate::connection;
use crate::limits::{Refusal, TotalPermit};
use crate::log_limit::LogLimit;
use crate::runtime::Runtime;
use crate::steering::{Handoff, Steering, WorkerSteering};

/// Idle HTTP keep-alive connections closed each time accepting hits the descriptor limit: a
/// spliced connection needs two descriptors, and the next few clients are likely queued already.
const EVICT_PER_EXHAUSTION: usize = 8;
/// How long evicted connections get to close before accepting is tried again.
const EVICTION_PAUSE: Duration = Duration::from_millis(5);
/// Least time between two warnings of the same kind, over all accept loops.
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

/// Binds `count` listening sockets on `address` that share its connections (SO_REUSEPORT: the
/// kernel spreads new connections over them), one per worker thread. Large backlog; IPv6 sockets
/// are IPv6-only so `0.0.0.0` and `[::]` on the same port can both be listed.
///
/// A plain bind comes first, so that a port already in use (another muxer included: SO_REUSEPORT
/// would otherwise let two daemons silently share it) fails as it would without sharing.
///
/// The sockets get TCP_NODELAY and `keepalive`, which accepted connections inherit.
pub(crate) fn bind_group(
    address: SocketAddr,
    count: usize,
    keepalive: Duration,
) -> Result<Vec<StdTcpListener>, ListenError> {
    drop(bind_one(address, false)?);
    let first = bind_one(address, true)?;
    // Port 0 picked a port: the others join the group on that one.
    let bound = first.local_addr().unwrap_or(address);
    let mut group = vec![first];
    for _ in 1..count {
        group.push(bind_one(bound, true)?);
    }
    for socket in &group {
        crate::sockets::tune_socket(socket, keepalive);
    }
    Ok(group)
}

fn bind_one(address: SocketAddr, shared: bool) -> Result<StdTcpListener, ListenError> {
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
    if shared {
        socket
            .set_reuse_port(true)
            .map_err(fail("setsockopt(SO_REUSEPORT)"))?;
    }
    if address.is_ipv6() {
        socket
            .set_only_v6(true)
            .map_err(fail("setsockopt(IPV6_V6ONLY)"))?;
    }
    socket
        .set_nonblocking(true)
        .map_err(fail("fcntl(O_NONBLOCK)"))?;
    socket.bind(&address.into()).map_err(fail("bind"))?;
    if shared {
        socket.listen(4096).map_err(fail("listen"))?;
    }
    Ok(socket.into())
}

/// Warnings every worker may repeat under a flood: at most one of each kind per second.
static LIMIT_WARNING: LogLimit = LogLimit::per(WARN_INTERVAL);
static FD_WARNING: LogLimit = LogLimit::per(WARN_INTERVAL);

/// Waits until one of `listeners` has a connection queued and returns its readiness, starting
/// the scan after the listener that won last time so that no listener starves.
async fn ready_listener<'a>(
    listeners: &'a [AsyncFd<StdTcpListener>],
    next: &mut usize,
) -> io::Result<AsyncFdReadyGuard<'a, StdTcpListener>> {
    std::future::poll_fn(|cx| {
        for offset in 0..listeners.len() {
            let index = (*next + offset) % listeners.len();
            if let Poll::Ready(ready) = listeners[index].poll_read_ready(cx) {
                *next = index + 1;
                return Poll::Ready(ready);
            }
        }
        Poll::Pending
    })
    .await
}

/// Accepts one queued connection, non-blocking from the start (one system call).
fn accept(listener: &StdTcpListener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    use rustix::net::{acceptfrom_with, SocketFlags};
    let (fd, peer) = acceptfrom_with(listener, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)?;
    let stream = std::net::TcpStream::from(fd);
    let peer = match peer.map(SocketAddr::try_from) {
        Some(Ok(peer)) => peer,
        _ => stream.peer_addr()?,
    };
    Ok((stream, peer))
}

/// Accepts connections on this worker's `listeners` forever, spawning a task for each.
///
/// A slot of the global connection limit is taken only once a connection is queued on one of
/// this worker's listeners, so a worker with nothing to accept never holds a slot that another
/// worker's client waits for. At the limit, connections wait in the kernel's backlog.
///
/// With steering on, the worker claims its CPU's new connections and hands connections to a less
/// loaded worker when it is far ahead (see [`crate::steering`]); `handoffs` brings the connections
/// other workers hand to this one. Sockets arriving through `adopt` (internal ports bound later)
/// are accepted from too.
pub(crate) async fn accept_loop(
    listeners: Vec<StdTcpListener>,
    mut adopt: UnboundedReceiver<StdTcpListener>,
    runtime: Arc<Runtime>,
    worker: usize,
    steering: Arc<Steering>,
    mut handoffs: UnboundedReceiver<Handoff>,
) -> io::Result<()> {
    let mut listeners = listeners
        .into_iter()
        .map(register)
        .collect::<io::Result<Vec<_>>>()?;
    let limits = Arc::clone(&runtime.limits);
    let mut next = 0;
    let mut steering = WorkerSteering::new(steering, worker);
    // Claim this worker's CPU before the first connection arrives.
    steering.after_accept(steering_enabled(&runtime), &listeners);
    loop {
        let ready = tokio::select! {
            biased;
            Some(handoff) = handoffs.recv() => {
                steering.taken();
                serve_accepted(handoff.stream, handoff.peer, handoff.permit, &runtime);
                continue;
            }
            Some(listener) = adopt.recv() => {
                match register(listener) {
                    Ok(listener) => {
                        steering.adopt(&listener);
                        listeners.push(listener);
                    }
                    Err(error) => warn!(worker, %error, "cannot register a listening socket"),
                }
                continue;
            }
            ready = ready_listener(&listeners, &mut next) => ready,
        };
        let Ok(mut ready) = ready else {
            continue;
        };
        if limits.total_exhausted() {
            if let Some(suppressed) = LIMIT_WARNING.allow() {
                warn!(
                    max_connections = runtime.current.load().config.limits.max_connections,
                    suppressed, "connection limit reached; new connections wait in the backlog"
                );
            }
        }
        let permit = limits.wait_for_total().await;
        let (stream, peer) = match ready.try_io(|listener| accept(listener.get_ref())) {
            Ok(Ok(accepted)) => accepted,
            // Nothing queued after all (the client gave up): the slot goes back.
            Err(_would_block) => continue,
            Ok(Err(error)) if is_fd_exhaustion(&error) => {
                drop(permit);
                let evicted = limits.idle.evict_oldest(EVICT_PER_EXHAUSTION);
                for _ in 0..evicted {
                    limits.count_refusal(Refusal::IdleEvicted);
                }
                if let Some(suppressed) = FD_WARNING.allow() {
                    warn!(%error, evicted, suppressed, "out of file descriptors; closing the longest-idle HTTP keep-alive connections");
                }
                // Evicted connections close on their own workers' threads: give them a moment.
                let pause = if evicted > 0 {
                    EVICTION_PAUSE
                } else {
                    FD_EXHAUSTION_BACKOFF
                };
                tokio::time::sleep(pause).await;
                continue;
            }
            Ok(Err(error)) => {
                // ECONNABORTED and friends: the client gave up before we accepted.
                debug!(%error, "accept failed");
                continue;
            }
        };
        let hand_to = steering.after_accept(steering_enabled(&runtime), &listeners);
        let (stream, peer, permit) = match hand_to {
            Some(to) => match steering.hand_off(
                to,
                Handoff {
                    stream,
                    peer,
                    permit,
                },
            ) {
                Ok(()) => continue,
                Err(back) => (back.stream, back.peer, back.permit),
            },
            None => (stream, peer, permit),
        };
        serve_accepted(stream, peer, permit, &runtime);
    }
}

fn register(listener: StdTcpListener) -> io::Result<AsyncFd<StdTcpListener>> {
    // SAFETY: a TcpListener owns its descriptor until dropped and always returns it, and the
    // AsyncFd owns the listener.
    unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }
        .map_err(|error| error.into_parts().1)
}

fn steering_enabled(runtime: &Runtime) -> bool {
    runtime.current.load().config.listen.cpu_steering
}

/// Registers an accepted connection with this worker's runtime and serves it in a task of its own.
fn serve_accepted(
    stream: std::net::TcpStream,
    peer: SocketAddr,
    permit: TotalPermit,
    runtime: &Arc<Runtime>,
) {
    let stream = match TcpStream::from_std(stream) {
        Ok(stream) => stream,
        Err(error) => {
            warn!(%error, "cannot register an accepted connection");
            return;
        }
    };
    // Per-address admission happens in the connection task, once the real client address is
    // known (it may arrive in a PROXY header).
    // Boxed first: tokio moves a spawned future whole several times on its way into the task
    // (8 copies of the 800-byte future, 1 800 instructions per connection under callgrind);
    // a box is moved as a pointer. The task ends once the connection is handed on, so the box
    // only lives while the connection is sniffed.
    tokio::spawn(Box::pin(connection::serve(
        stream,
        peer,
        Arc::clone(runtime),
        permit,
    )));
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::SockRef;

    #[test]
    fn accepted_sockets_inherit_nodelay_and_keepalive_from_the_group() {
        let keepalive = Duration::from_secs(37);
        let group = bind_group(SocketAddr::from(([127, 0, 0, 1], 0)), 2, keepalive).unwrap();
        assert_eq!(group.len(), 2);
        let address = group[0].local_addr().unwrap();
        assert_eq!(
            group[1].local_addr().unwrap(),
            address,
            "one port for the group"
        );
        let _client = std::net::TcpStream::connect(address).unwrap();
        let accepted = loop {
            if let Some(Ok((stream, _))) =
                group.iter().map(StdTcpListener::accept).find(Result::is_ok)
            {
                break stream;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let socket = SockRef::from(&accepted);
        assert!(socket.tcp_nodelay().unwrap());
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), keepalive);
    }

    #[test]
    fn a_port_in_use_fails_even_though_the_group_shares_its_port() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let error =
            bind_group(taken.local_addr().unwrap(), 2, Duration::from_secs(60)).unwrap_err();
        assert_eq!(error.call, "bind");
        let group = bind_group(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            2,
            Duration::from_secs(60),
        )
        .unwrap();
        let again = bind_group(group[0].local_addr().unwrap(), 2, Duration::from_secs(60));
        assert!(
            again.is_err(),
            "a second daemon must not join the first one's group"
        );
    }
}
