//! Upstream HTTP/1.1 connections: a pool of idle ones per upstream, and [`InUse`], the set of
//! connections one client connection is using, which that client connection's own task drives.
//!
//! Why not a pool whose connections run in their own tasks (hyper-util's): every request would
//! then cross tasks twice (request in, response out), each crossing a wake-up and often a thread
//! switch. Here a connection is driven by whichever client connection holds it, so a keep-alive
//! request is read, forwarded, answered and written back by one task. A connection goes back to
//! its pool as soon as its exchange is complete, so an idle client holds no upstream connection.
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::batch::BatchedWrites;
use super::upstream::UpstreamBody;
use crate::sockets::connect_tuned;

thread_local! {
    static THREAD_SHARD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Makes the calling thread use idle-connection shard `index` (each worker thread its own: a
/// socket belongs to the runtime that opened it). Threads that never call this use shard 0.
pub(crate) fn set_thread_shard(index: usize) {
    THREAD_SHARD.with(|cell| cell.set(index));
}

fn thread_shard() -> usize {
    THREAD_SHARD.with(std::cell::Cell::get)
}

/// A connection's I/O (hyper's upgradeable HTTP/1 client connection, which cannot be named).
type Driver = dyn Future<Output = hyper::Result<()>> + Send;

/// How upstream connections are opened and kept.
#[derive(Clone, Copy, Debug)]
pub struct PoolSettings {
    /// Longest wait for the TCP handshake.
    pub connect_timeout: Duration,
    /// An idle connection older than this is closed, not reused.
    pub idle_timeout: Duration,
    /// TCP keepalive on upstream sockets.
    pub tcp_keepalive: Duration,
    /// Worker threads: each keeps its own idle connections, registered with its own runtime.
    pub workers: usize,
    /// Connections open to the upstream at once, idle ones included.
    pub max_connections: usize,
    /// Requests that may wait for a place when the upstream is at `max_connections`.
    pub queue: usize,
    /// How long such a request waits.
    pub queue_timeout: Duration,
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP connection failed or timed out.
    #[error("connecting to {authority}: {source}")]
    Tcp {
        /// The upstream.
        authority: String,
        /// What the connect returned.
        source: std::io::Error,
    },
    /// The upstream has `max_connections` open and no place freed within the queue's time (or
    /// the queue was full).
    #[error("{authority} is at its connection limit")]
    Full {
        /// The upstream.
        authority: String,
    },
    /// The HTTP/1 handshake failed (it does no I/O, so this is not expected).
    #[error("HTTP handshake with {authority}: {source}")]
    Handshake {
        /// The upstream.
        authority: String,
        /// hyper's error.
        source: hyper::Error,
    },
}

/// One upstream connection: the handle that sends requests and the future that does its I/O.
pub struct UpstreamConnection {
    sender: http1::SendRequest<UpstreamBody>,
    driver: Pin<Box<Driver>>,
    pool: Weak<Pool>,
    idle_since: Instant,
    /// The connection's place under the upstream's cap.
    _place: OwnedSemaphorePermit,
}

impl std::fmt::Debug for UpstreamConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConnection").finish_non_exhaustive()
    }
}

impl UpstreamConnection {
    /// Queues `request` on this connection; the returned future yields the response once the
    /// connection is driven (hand the connection to [`InUse::adopt`]). A request the connection
    /// could not take comes back in the error.
    pub fn send(
        &mut self,
        request: hyper::Request<UpstreamBody>,
    ) -> impl Future<
        Output = Result<
            hyper::Response<hyper::body::Incoming>,
            hyper::client::conn::TrySendError<hyper::Request<UpstreamBody>>,
        >,
    > + use<> {
        self.sender.try_send_request(request)
    }
}

/// Idle connections to one upstream, one list per worker thread (a connection's socket belongs
/// to the runtime of the worker that opened it, so it is only reused there).
#[derive(Debug)]
pub struct Pool {
    authority: String,
    settings: PoolSettings,
    shards: Box<[Shard]>,
    /// One permit per connection the upstream may have open.
    places: Arc<Semaphore>,
    /// Requests waiting for a place.
    queued: AtomicUsize,
}

/// One worker's idle connections, most recently used last.
#[derive(Debug, Default)]
struct Shard {
    idle: Mutex<Vec<UpstreamConnection>>,
    reaper_running: AtomicBool,
}

impl Shard {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<UpstreamConnection>> {
        // A panic while holding the lock cannot leave the list inconsistent.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Pool {
    /// An empty pool for `authority` (`host:port`).
    pub fn new(authority: String, settings: PoolSettings) -> Arc<Pool> {
        Arc::new(Pool {
            authority,
            settings,
            shards: (0..settings.workers.max(1))
                .map(|_| Shard::default())
                .collect(),
            places: Arc::new(Semaphore::new(settings.max_connections)),
            queued: AtomicUsize::new(0),
        })
    }

    /// A place for one more connection: at once, by closing an idle connection (which holds
    /// one), or after waiting in the queue.
    async fn place(&self) -> Result<OwnedSemaphorePermit, ConnectError> {
        if let Ok(place) = Arc::clone(&self.places).try_acquire_owned() {
            return Ok(place);
        }
        if let Some(idle) = self.shards.iter().find_map(|shard| {
            let mut idle = shard.lock();
            (!idle.is_empty()).then(|| idle.remove(0))
        }) {
            drop(idle);
            if let Ok(place) = Arc::clone(&self.places).try_acquire_owned() {
                return Ok(place);
            }
        }
        let full = || ConnectError::Full {
            authority: self.authority.clone(),
        };
        if self.queued.fetch_add(1, Ordering::Relaxed) >= self.settings.queue {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(full());
        }
        let waited = tokio::time::timeout(
            self.settings.queue_timeout,
            Arc::clone(&self.places).acquire_owned(),
        )
        .await;
        self.queued.fetch_sub(1, Ordering::Relaxed);
        match waited {
            Ok(Ok(place)) => Ok(place),
            _ => Err(full()),
        }
    }

    /// `host:port`.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    fn shard(&self, index: usize) -> &Shard {
        &self.shards[index % self.shards.len()]
    }

    /// The calling worker's most recently used idle connection, if any within the idle timeout.
    /// The upstream may have closed it meanwhile: then it hands back the first request queued on
    /// it unsent, without writing it.
    pub fn checkout(&self) -> Option<UpstreamConnection> {
        let shard = self.shard(thread_shard());
        let connection = shard.lock().pop()?;
        if connection.idle_since.elapsed() >= self.settings.idle_timeout {
            // The rest are older still.
            let expired = std::mem::take(&mut *shard.lock());
            drop((connection, expired));
            return None;
        }
        Some(connection)
    }

    /// A new connection.
    pub async fn connect(self: &Arc<Self>) -> Result<UpstreamConnection, ConnectError> {
        let place = self.place().await?;
        let stream = connect_tuned(
            &self.authority,
            self.settings.connect_timeout,
            self.settings.tcp_keepalive,
        )
        .await
        .map_err(|source| ConnectError::Tcp {
            authority: self.authority.clone(),
            source,
        })?;
        // hyper copies each body chunk into its one write buffer rather than queueing it for
        // writev, here and on the client side (`keepalive::serve_round`). Callgrind: 690 fewer
        // instructions per keep-alive request with nginx's small responses. Downloading 1 GB
        // through the router costs about 0.05 s more user time for the copy, and was level
        // with writev in total CPU and in time (three runs of five 200 MB downloads each).
        // Each write waits for the worker's other ready tasks (`batch`): the backend then gets
        // the requests of one wake-up together instead of being woken for each.
        let (sender, driver) = http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(BatchedWrites::new(stream)))
            .await
            .map_err(|source| ConnectError::Handshake {
                authority: self.authority.clone(),
                source,
            })?;
        Ok(UpstreamConnection {
            sender,
            driver: Box::pin(driver.with_upgrades()),
            pool: Arc::downgrade(self),
            idle_since: Instant::now(),
            _place: place,
        })
    }

    fn checkin(self: &Arc<Self>, mut connection: UpstreamConnection) {
        connection.idle_since = Instant::now();
        let index = thread_shard() % self.shards.len();
        let shard = self.shard(index);
        shard.lock().push(connection);
        if !shard.reaper_running.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(reap(Arc::downgrade(self), index));
                }
                Err(_) => shard.reaper_running.store(false, Ordering::Release),
            }
        }
    }

    /// Idle connections held, over all workers.
    pub fn idle_count(&self) -> usize {
        self.shards.iter().map(|shard| shard.lock().len()).sum()
    }
}

/// Closes worker `index`'s idle connections that outlived the idle timeout (nobody drives them,
/// so an upstream that closed one would otherwise leave it in CLOSE_WAIT); ends when that list
/// is empty or the pool is gone.
async fn reap(pool: Weak<Pool>, index: usize) {
    loop {
        let Some(idle_timeout) = pool.upgrade().map(|pool| pool.settings.idle_timeout) else {
            return;
        };
        tokio::time::sleep(idle_timeout / 2).await;
        let Some(pool) = pool.upgrade() else { return };
        let shard = pool.shard(index);
        let expired: Vec<UpstreamConnection> = {
            let mut idle = shard.lock();
            let fresh_from = idle
                .iter()
                .position(|c| c.idle_since.elapsed() < idle_timeout)
                .unwrap_or(idle.len());
            idle.drain(..fresh_from).collect()
        };
        drop(expired);
        if shard.lock().is_empty() {
            shard.reaper_running.store(false, Ordering::Release);
            // A checkin between the check and the store saw the flag still set and started no
            // reaper: keep this one.
            if shard.lock().is_empty() || shard.reaper_running.swap(true, Ordering::AcqRel) {
                return;
            }
        }
    }
}

/// The upstream connections one client connection is using, driven by that connection's task
/// through [`poll_with_upstreams`]. Cloned into each request's handler.
#[derive(Clone, Debug)]
pub struct InUse {
    inner: Arc<InUseInner>,
}

#[derive(Debug)]
struct InUseInner {
    connections: Mutex<Vec<UpstreamConnection>>,
    /// Handed to the upstream connections (and woken by [`InUse::adopt`]).
    upstream_waker: Waker,
    /// Handed to the client connection being served.
    server_waker: Waker,
    wakes: Arc<Wakes>,
}

impl Default for InUse {
    fn default() -> Self {
        let wakes = Arc::new(Wakes::default());
        let waker = |side| {
            Waker::from(Arc::new(SideWaker {
                wakes: Arc::clone(&wakes),
                side,
            }))
        };
        InUse {
            inner: Arc::new(InUseInner {
                connections: Mutex::default(),
                upstream_waker: waker(Side::Upstream),
                server_waker: waker(Side::Server),
                wakes,
            }),
        }
    }
}

/// The two halves of a client connection's task, as [`poll_with_upstreams`] polls them.
#[derive(Clone, Copy, Debug)]
enum Side {
    /// The upstream connections in use.
    Upstream,
    /// The client connection being served (hyper's server connection and its handlers).
    Server,
}

/// Wake-ups for one client connection's task, noted rather than sent while the task is inside
/// [`poll_with_upstreams`]: that function polls the half a wake-up is for within the same pass
/// when it can, so the task is not scheduled again for work already done. A response arriving
/// from upstream wakes the server half, which is polled right after; a request queued on an
/// upstream connection wakes the upstream half, which is polled again right after. With every
/// wake-up sent to the task, a keep-alive request cost four polls of the whole task instead of
/// two (counted here), each a pass over hyper's dispatchers; three since each upstream write
/// waits one turn of the run queue on purpose (`batch`).
#[derive(Debug, Default)]
struct Wakes {
    /// The task is inside [`poll_with_upstreams`].
    polling: AtomicBool,
    /// The upstream half was woken since it was last polled.
    upstream: AtomicBool,
    /// The server half was woken since it was last polled.
    server: AtomicBool,
    /// The task's own waker, for wake-ups while it is not being polled.
    task: AtomicWaker,
    /// Upstream connections in use: with none, a wake-up for the upstream half is dropped. It
    /// comes from a connection this task has returned to the pool, whose channel and socket
    /// still hold this task's waker until the connection's next user first polls it: that
    /// user's request, queued on the channel, would wake this task for nothing (half the
    /// keep-alive requests did, 0.5 extra polls of a whole task each).
    connections: AtomicUsize,
}

/// A waker for one half of a client connection's task.
struct SideWaker {
    wakes: Arc<Wakes>,
    side: Side,
}

impl std::task::Wake for SideWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let woken = match self.side {
            Side::Upstream if self.wakes.connections.load(Ordering::SeqCst) == 0 => return,
            Side::Upstream => &self.wakes.upstream,
            Side::Server => &self.wakes.server,
        };
        // SeqCst on both sides (here: store the mark, then read `polling`; in
        // `poll_with_upstreams`: clear `polling`, then read the marks), so that a wake-up racing
        // with the end of a pass is seen by one of them and never lost.
        woken.store(true, Ordering::SeqCst);
        if !self.wakes.polling.load(Ordering::SeqCst) {
            self.wakes.task.wake();
        }
    }
}

impl InUse {
    /// Takes `connection` (with a request queued on it) to drive until its exchange completes.
    pub fn adopt(&self, connection: UpstreamConnection) {
        {
            let mut connections = self.lock();
            connections.push(connection);
            self.count(&connections);
        }
        self.inner.upstream_waker.wake_by_ref();
    }

    /// Notes how many connections are in use, for [`Wakes::connections`].
    fn count(&self, connections: &[UpstreamConnection]) {
        self.inner
            .wakes
            .connections
            .store(connections.len(), Ordering::SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<UpstreamConnection>> {
        self.inner
            .connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Does the I/O of every connection in use; returns those whose exchange is complete to their
    /// pool and drops those that closed (or were upgraded, their socket now a tunnel's).
    fn poll_drive(&self, cx: &mut Context<'_>) {
        let mut connections = self.lock();
        let mut index = 0;
        while index < connections.len() {
            let connection = &mut connections[index];
            let open = connection.driver.as_mut().poll(cx).is_pending();
            if open && !connection.sender.is_ready() {
                index += 1;
                continue;
            }
            let connection = connections.swap_remove(index);
            self.count(&connections);
            if open {
                if let Some(pool) = connection.pool.upgrade() {
                    pool.checkin(connection);
                }
            }
        }
    }

    /// Connections currently in use.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is in use.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Runs `server` (a client connection being served) and the upstream connections its requests
/// use in one task. `server` is polled through `poll_server`, so the caller keeps control of it
/// (graceful shutdown).
pub fn poll_with_upstreams<T>(
    in_use: &InUse,
    cx: &mut Context<'_>,
    poll_server: impl FnOnce(&mut Context<'_>) -> Poll<T>,
) -> Poll<T> {
    let inner = &*in_use.inner;
    let wakes = &*inner.wakes;
    wakes.task.register(cx.waker());
    wakes.polling.store(true, Ordering::SeqCst);
    let mut upstream = Context::from_waker(&inner.upstream_waker);
    // Upstream first: a response that just arrived is then ready for the server side below.
    wakes.upstream.store(false, Ordering::SeqCst);
    in_use.poll_drive(&mut upstream);
    wakes.server.store(false, Ordering::SeqCst);
    let polled = poll_server(&mut Context::from_waker(&inner.server_waker));
    if polled.is_pending() && wakes.upstream.swap(false, Ordering::SeqCst) {
        // A request was just queued (or a response body read): hand it to its connection now,
        // not after a wake-up (the write itself then waits its one turn, `batch`). Once only:
        // whatever wakes a half after this goes to the scheduler, so the task's cooperative
        // budget still decides when it yields.
        in_use.poll_drive(&mut upstream);
    }
    wakes.polling.store(false, Ordering::SeqCst);
    if wakes.server.load(Ordering::SeqCst) || wakes.upstream.load(Ordering::SeqCst) {
        cx.waker().wake_by_ref();
    }
    polled
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const SETTINGS: PoolSettings = PoolSettings {
        connect_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(30),
        tcp_keepalive: Duration::from_secs(60),
        workers: 1,
        max_connections: 64,
        queue: 4,
        queue_timeout: Duration::from_secs(2),
    };

    /// A keep-alive HTTP/1.1 server on loopback answering `ok` to every request; each accepted
    /// connection is closed 50 ms after its `requests`th answer.
    async fn server(requests: usize) -> (String, tokio::task::JoinHandle<()>) {
        slow_server(requests, Duration::ZERO).await
    }

    /// [`server`], answering each request `delay` after reading it.
    async fn slow_server(
        requests: usize,
        delay: Duration,
    ) -> (String, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    for _ in 0..requests {
                        let mut seen = Vec::new();
                        while !seen.ends_with(b"\r\n\r\n") {
                            let n = stream.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            seen.extend_from_slice(&buf[..n]);
                        }
                        tokio::time::sleep(delay).await;
                        let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if stream.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                });
            }
        });
        (address, task)
    }

    fn request() -> hyper::Request<UpstreamBody> {
        let mut request = hyper::Request::new(
            Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
        request
            .headers_mut()
            .insert(hyper::header::HOST, "t".parse().unwrap());
        request
    }

    /// Sends one request on `connection`, driven by `in_use`, and reads the whole response.
    async fn exchange(in_use: &InUse, mut connection: UpstreamConnection) -> String {
        let response = connection.send(request());
        in_use.adopt(connection);
        let drive = std::future::poll_fn(|cx| {
            in_use.poll_drive(cx);
            Poll::<()>::Pending
        });
        let body = async {
            let response = response.await.unwrap();
            response.into_body().collect().await.unwrap().to_bytes()
        };
        let body = tokio::select! {
            body = body => body,
            () = drive => unreachable!(),
        };
        // One more drive: the completed exchange hands the connection back.
        std::future::poll_fn(|cx| {
            in_use.poll_drive(cx);
            Poll::Ready(())
        })
        .await;
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_finished_exchange_returns_its_connection_for_the_next_request() {
        let (address, _server) = server(usize::MAX).await;
        let pool = Pool::new(address, SETTINGS);
        let in_use = InUse::default();
        assert!(pool.checkout().is_none());
        let first = pool.connect().await.unwrap();
        assert_eq!(exchange(&in_use, first).await, "ok");
        assert!(in_use.is_empty());
        assert_eq!(pool.idle_count(), 1, "back in the pool");
        let again = pool.checkout().expect("the same connection, reused");
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(exchange(&in_use, again).await, "ok");
        assert_eq!(pool.idle_count(), 1);
    }

    /// Runs `handler` as a client connection's served half with `in_use`'s upstream connections,
    /// as [`super::super::drive`] does; returns its output and the task polls it took.
    async fn serve_counting_polls<T>(
        in_use: &InUse,
        handler: impl Future<Output = T>,
    ) -> (T, usize) {
        let mut handler = std::pin::pin!(handler);
        let mut polls = 0;
        let output = std::future::poll_fn(|cx| {
            polls += 1;
            poll_with_upstreams(in_use, cx, |cx| handler.as_mut().poll(cx))
        })
        .await;
        (output, polls)
    }

    #[tokio::test]
    async fn a_response_is_taken_in_the_pass_that_reads_it() {
        // The answer comes later than anything the task does itself: each pass of the task
        // is then visible in the count.
        let (address, _server) = slow_server(usize::MAX, Duration::from_millis(30)).await;
        let pool = Pool::new(address, SETTINGS);
        let in_use = InUse::default();
        let mut connection = pool.connect().await.unwrap();
        let handler = async {
            let response = connection.send(request());
            in_use.adopt(connection);
            let response = response.await.unwrap();
            response.into_body().collect().await.unwrap().to_bytes()
        };
        let (body, polls) = serve_counting_polls(&in_use, handler).await;
        assert_eq!(body, "ok");
        // Pass 1 queues the request, whose write waits one turn of the run queue (`batch`).
        // Pass 2 writes it. Pass 3 reads the response, hands the head over, and the body once
        // the handler asks for it. With every wake-up scheduled, the pass that sent the
        // request was followed by one with nothing to do.
        assert_eq!(polls, 3, "polls for one exchange");
        assert_eq!(pool.idle_count(), 1, "the connection is back in the pool");
    }

    #[tokio::test]
    async fn a_request_adopted_by_another_task_is_sent() {
        // HTTP/2 requests are handled in tasks of their own: the driving task must be woken.
        let (address, _server) = server(usize::MAX).await;
        let pool = Pool::new(address, SETTINGS);
        let in_use = InUse::default();
        let mut connection = pool.connect().await.unwrap();
        let adopting = in_use.clone();
        let handler = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let response = connection.send(request());
            adopting.adopt(connection);
            let response = response.await.unwrap();
            response.into_body().collect().await.unwrap().to_bytes()
        });
        let served = serve_counting_polls(&in_use, std::future::pending::<()>());
        let body = tokio::select! {
            body = handler => body.unwrap(),
            _ = served => unreachable!(),
        };
        assert_eq!(body, "ok");
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_hands_its_request_back_unsent() {
        // Answers one request; closes the connection when told, and says so.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (close, close_rx) = tokio::sync::oneshot::channel::<()>();
        let (closed_tx, closed) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            while !seen.ends_with(b"\r\n\r\n") {
                let n = stream.read(&mut buf).await.unwrap();
                seen.extend_from_slice(&buf[..n]);
            }
            let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
            stream.write_all(reply).await.unwrap();
            let _ = close_rx.await;
            drop(stream);
            let _ = closed_tx.send(());
        });
        let pool = Pool::new(address, SETTINGS);
        let in_use = InUse::default();
        let first = pool.connect().await.unwrap();
        assert_eq!(exchange(&in_use, first).await, "ok");
        assert_eq!(pool.idle_count(), 1);
        close.send(()).unwrap();
        closed.await.unwrap();
        // The FIN is in the socket (loopback delivers it within `close`); a yield lets the
        // runtime poll its I/O driver, which marks the socket readable.
        tokio::task::yield_now().await;

        let mut stale = pool.checkout().expect("handed out unchecked");
        let response = stale.send(request());
        in_use.adopt(stale);
        let drive = std::future::poll_fn(|cx| {
            in_use.poll_drive(cx);
            Poll::<()>::Pending
        });
        let error = tokio::select! {
            response = response => response.expect_err("the upstream had closed it"),
            () = drive => unreachable!(),
        };
        let mut error = error;
        assert!(error.take_message().is_some(), "handed back unsent");
        assert!(in_use.is_empty(), "and dropped, not pooled again");
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn idle_connections_past_the_timeout_are_dropped_not_reused() {
        let (address, _server) = server(usize::MAX).await;
        let settings = PoolSettings {
            idle_timeout: Duration::from_millis(200),
            ..SETTINGS
        };
        let pool = Pool::new(address, settings);
        let in_use = InUse::default();
        let first = pool.connect().await.unwrap();
        assert_eq!(exchange(&in_use, first).await, "ok");
        assert_eq!(pool.idle_count(), 1);
        // The reaper (started by the checkin) closes it after the timeout.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(pool.idle_count(), 0, "reaped");
        assert!(pool.checkout().is_none());
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_a_connect_error_naming_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        drop(listener);
        let pool = Pool::new(address.clone(), SETTINGS);
        let error = pool.connect().await.unwrap_err();
        assert!(matches!(error, ConnectError::Tcp { .. }), "{error}");
        assert!(error.to_string().contains(&address), "{error}");
    }

    #[tokio::test]
    async fn a_full_upstream_queues_briefly_then_refuses() {
        let (address, _server) = server(usize::MAX).await;
        let settings = PoolSettings {
            max_connections: 2,
            queue: 1,
            queue_timeout: Duration::from_millis(300),
            ..SETTINGS
        };
        let pool = Pool::new(address, settings);
        let first = pool.connect().await.unwrap();
        let second = pool.connect().await.unwrap();
        // Over the cap: one request may wait; it gets the place the first connection frees.
        let waiting = tokio::spawn({
            let pool = Arc::clone(&pool);
            async move { pool.connect().await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let queue_full = pool.connect().await.unwrap_err();
        assert!(
            matches!(queue_full, ConnectError::Full { .. }),
            "{queue_full}"
        );
        drop(first);
        waiting
            .await
            .unwrap()
            .expect("the queued request got the freed place");
        // Nobody frees a place now: the queued request times out.
        let _third = pool.connect().await.unwrap();
        let timed_out = pool.connect().await.unwrap_err();
        assert!(
            matches!(timed_out, ConnectError::Full { .. }),
            "{timed_out}"
        );
        drop(second);
    }

    #[tokio::test]
    async fn an_idle_connection_gives_its_place_to_a_new_one() {
        let (address, _server) = server(usize::MAX).await;
        let settings = PoolSettings {
            max_connections: 1,
            queue: 0,
            ..SETTINGS
        };
        let pool = Pool::new(address, settings);
        let in_use = InUse::default();
        let first = pool.connect().await.unwrap();
        assert_eq!(exchange(&in_use, first).await, "ok");
        assert_eq!(pool.idle_count(), 1);
        let _second = pool.connect().await.expect("the idle connection made room");
        assert_eq!(pool.idle_count(), 0);
    }
}
