//! Layer-4 forwarding between the client and a backend: both directions at once, a FIN on one side
//! passed on to the other, an idle timeout over both directions, and both sockets closed as soon
//! as either side fails.
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Size of a copy buffer, taken from the pool only while bytes flow.
const BUFFER_LEN: usize = 32 * 1024;

/// How bytes move between the two sockets.
#[derive(Clone, Copy, Debug, Default, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// read(2)/write(2) through a user-space buffer: the faster on the benchmark machine
    /// (docs/benchmarks.md), so the default.
    #[default]
    Copy,
    /// splice(2) through a pipe: zero-copy, slightly less CPU per byte, but slower there.
    Splice,
}

/// Why a spliced connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// Both sides finished sending (FIN both ways).
    Finished,
    /// Reading from or writing to the client failed.
    ClientError(io::ErrorKind),
    /// Reading from or writing to the backend failed.
    UpstreamError(io::ErrorKind),
    /// No bytes moved either way for the idle timeout.
    IdleTimeout,
}

impl CloseReason {
    /// Short label for the per-connection log line.
    pub(crate) fn label(&self) -> String {
        match self {
            CloseReason::Finished => "finished".into(),
            CloseReason::ClientError(kind) => format!("client error: {kind}"),
            CloseReason::UpstreamError(kind) => format!("upstream error: {kind}"),
            CloseReason::IdleTimeout => "idle timeout".into(),
        }
    }
}

/// What a finished splice moved.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SpliceReport {
    /// Bytes from the client to the backend.
    pub client_to_upstream: u64,
    /// Bytes from the backend to the client.
    pub upstream_to_client: u64,
    /// Why it ended.
    pub reason: CloseReason,
}

/// Which socket an I/O error came from.
#[derive(Clone, Copy)]
enum Side {
    Client,
    Upstream,
}

/// Forwards between `client` and `upstream` until both directions finish, one fails, or nothing
/// moves for `idle_timeout`. Dropping the streams on return closes both sockets.
///
/// A plain function returning a concrete future, not an `async fn`: every spliced connection's
/// task carries this future for its whole life, and an `async fn` would add room for its
/// arguments beside the state they move into.
pub(crate) fn splice(
    client: TcpStream,
    upstream: TcpStream,
    idle_timeout: Duration,
    method: Method,
) -> Splice {
    match method {
        Method::Copy => Splice::Copy {
            copying: Copying::new(client, upstream, idle_timeout),
        },
        // Boxed: the common path's task should not carry this future's state.
        Method::Splice => {
            let shared = Arc::new(PipeShared::default());
            let raw = (client.as_raw_fd(), upstream.as_raw_fd());
            Splice::Pipe {
                piping: Box::pin(pipe_splice(
                    client,
                    upstream,
                    idle_timeout,
                    Arc::clone(&shared),
                )),
                paused: Box::new((shared, raw)),
            }
        }
    }
}

/// Resumes a connection another process paused: `pending` (client → backend, backend →
/// client) is written first. With pending bytes the connection continues through buffers
/// whatever `method` says, since they are in user space already.
pub(crate) fn resume(
    client: TcpStream,
    upstream: TcpStream,
    (pending_up, pending_down): (Vec<u8>, Vec<u8>),
    idle_timeout: Duration,
    method: Method,
) -> Splice {
    if pending_up.is_empty() && pending_down.is_empty() {
        return splice(client, upstream, idle_timeout, method);
    }
    let mut copying = Copying::new(client, upstream, idle_timeout);
    copying.up.preload(pending_up);
    copying.down.preload(pending_down);
    Splice::Copy { copying }
}

/// A connection taken out of its splice between two writes, for another process.
#[derive(Debug)]
pub(crate) struct Paused {
    /// The client's socket.
    pub(crate) client: OwnedFd,
    /// The backend's socket.
    pub(crate) upstream: OwnedFd,
    /// Read from the client, not yet written to the backend.
    pub(crate) pending_up: Vec<u8>,
    /// Read from the backend, not yet written to the client.
    pub(crate) pending_down: Vec<u8>,
    /// Bytes moved so far: client → backend, backend → client.
    pub(crate) bytes: (u64, u64),
}

impl Splice {
    /// Takes the connection out of the splice: copies of both sockets and the bytes read but not
    /// yet written. The splice must not be polled again (drop it); dropping it closes only its
    /// own descriptors, so the connection stays open through the copies.
    pub(crate) fn pause(self: Pin<&mut Self>) -> io::Result<Paused> {
        match self.project() {
            SpliceProjection::Copy { copying } => {
                let this = copying.project();
                Ok(Paused {
                    client: this.client.as_fd().try_clone_to_owned()?,
                    upstream: this.upstream.as_fd().try_clone_to_owned()?,
                    pending_up: this.up.pending().to_vec(),
                    pending_down: this.down.pending().to_vec(),
                    bytes: (this.up.bytes, this.down.bytes),
                })
            }
            SpliceProjection::Pipe { piping, paused } => {
                let (shared, (client, upstream)) = &**paused;
                // SAFETY: the splice future owns both sockets until it is dropped, which happens
                // only after these copies are made (it is still alive here).
                let (client, upstream) = unsafe {
                    (
                        BorrowedFd::borrow_raw(*client).try_clone_to_owned()?,
                        BorrowedFd::borrow_raw(*upstream).try_clone_to_owned()?,
                    )
                };
                // The future is parked at an await: no splice(2) runs, and a pipe with bytes in
                // it is in its direction's slot. Dropping the future ends its borrows.
                *piping = Box::pin(std::future::pending());
                Ok(Paused {
                    client,
                    upstream,
                    pending_up: shared.up.drain(),
                    pending_down: shared.down.drain(),
                    bytes: (
                        shared.up.bytes.load(Ordering::Relaxed),
                        shared.down.bytes.load(Ordering::Relaxed),
                    ),
                })
            }
        }
    }
}

/// What a splice(2) connection shares with whoever pauses it: per direction, the pipe holding
/// bytes while the writer waits, and the byte count.
#[derive(Default)]
struct PipeShared {
    up: PipeDirection,
    down: PipeDirection,
}

#[derive(Default)]
struct PipeDirection {
    /// The pipe with bytes not yet written, while its direction waits for the writer.
    waiting: std::sync::Mutex<Option<pipes::Pipe>>,
    bytes: AtomicU64,
}

impl PipeDirection {
    /// The bytes in the waiting pipe, if any (the pipe goes back to the pool, empty). Reading a
    /// pipe this process owns does not fail; if it did, the bytes would be lost and the
    /// connection's stream broken, which its peers detect.
    fn drain(&self) -> Vec<u8> {
        let pipe = self
            .waiting
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take();
        let mut pending = Vec::new();
        if let Some(pipe) = pipe {
            let mut chunk = [0u8; 16 * 1024];
            loop {
                match rustix::io::read(&pipe.read, &mut chunk) {
                    Ok(0) | Err(rustix::io::Errno::AGAIN) => break,
                    Ok(read) => pending.extend_from_slice(&chunk[..read]),
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(errno) => {
                        tracing::warn!(%errno, "cannot read a paused connection's pipe");
                        return pending;
                    }
                }
            }
            pipes::give(pipe);
        }
        pending
    }
}

pin_project_lite::pin_project! {
    /// The future [`splice`] returns.
    #[project = SpliceProjection]
    pub(crate) enum Splice {
        /// read/write through pooled buffers.
        Copy {
            #[pin]
            copying: Copying,
        },
        /// splice(2) through pipes.
        Pipe {
            piping: Pin<Box<dyn Future<Output = SpliceReport> + Send>>,
            // What pausing needs: the shared state, and the sockets' numbers (owned by `piping`).
            paused: Box<(Arc<PipeShared>, (RawFd, RawFd))>,
        },
    }
}

impl Future for Splice {
    type Output = SpliceReport;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SpliceReport> {
        match self.project() {
            SpliceProjection::Copy { copying } => copying.poll(cx),
            SpliceProjection::Pipe { piping, .. } => piping.as_mut().poll(cx),
        }
    }
}

/// [`splice`] with splice(2) through pipes.
async fn pipe_splice(
    mut client: TcpStream,
    mut upstream: TcpStream,
    idle_timeout: Duration,
    shared: Arc<PipeShared>,
) -> SpliceReport {
    let started = Instant::now();
    // Milliseconds since `started` of the last byte moved in either direction.
    let last_activity = AtomicU64::new(0);

    // The halves and both directions borrow the sockets only in here.
    let reason = {
        let (mut client_read, mut client_write) = client.split();
        let (mut upstream_read, mut upstream_write) = upstream.split();
        let up = splice_until_eof(
            &mut client_read,
            &mut upstream_write,
            (Side::Client, Side::Upstream),
            &shared.up,
            &last_activity,
            started,
        );
        let down = splice_until_eof(
            &mut upstream_read,
            &mut client_write,
            (Side::Upstream, Side::Client),
            &shared.down,
            &last_activity,
            started,
        );
        tokio::pin!(up, down);
        let mut up_done = false;
        let mut down_done = false;

        loop {
            if up_done && down_done {
                break CloseReason::Finished;
            }
            let idle_deadline = started
                + Duration::from_millis(last_activity.load(Ordering::Relaxed))
                + idle_timeout;
            tokio::select! {
                result = &mut up, if !up_done => match result {
                    Ok(()) => up_done = true,
                    Err(reason) => break reason,
                },
                result = &mut down, if !down_done => match result {
                    Ok(()) => down_done = true,
                    Err(reason) => break reason,
                },
                _ = tokio::time::sleep_until(idle_deadline) => {
                    let last = started + Duration::from_millis(last_activity.load(Ordering::Relaxed));
                    if last.elapsed() >= idle_timeout {
                        break CloseReason::IdleTimeout;
                    }
                }
            }
        }
    };
    shut_down(&client, &upstream);
    SpliceReport {
        client_to_upstream: shared.up.bytes.load(Ordering::Relaxed),
        upstream_to_client: shared.down.bytes.load(Ordering::Relaxed),
        reason,
    }
}

/// Ends both connections now, whoever else holds their sockets: systemd's descriptor store keeps
/// copies, and closing ours alone would leave the peers waiting.
fn shut_down(client: &TcpStream, upstream: &TcpStream) {
    for socket in [client, upstream] {
        let _ = socket2::SockRef::from(socket).shutdown(std::net::Shutdown::Both);
    }
}

fn failure(side: Side, error: io::Error) -> CloseReason {
    match side {
        Side::Client => CloseReason::ClientError(error.kind()),
        Side::Upstream => CloseReason::UpstreamError(error.kind()),
    }
}

/// Moves `reader` to `writer` with splice(2) through a pipe, so the bytes never enter user space,
/// until EOF; then shuts `writer` down. Like the copy buffers, a pipe is taken from a per-thread
/// pool only while bytes flow, so idle connections hold no pipe (and no descriptors beyond their
/// two sockets).
async fn splice_until_eof(
    reader: &mut ReadHalf<'_>,
    writer: &mut WriteHalf<'_>,
    (read_side, write_side): (Side, Side),
    direction: &PipeDirection,
    last_activity: &AtomicU64,
    started: Instant,
) -> Result<(), CloseReason> {
    use rustix::pipe::{splice as splice_fds, SpliceFlags};
    use tokio::io::Interest;

    let source: &TcpStream = reader.as_ref();
    let sink: &TcpStream = writer.as_ref();
    let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
    loop {
        source.readable().await.map_err(|e| failure(read_side, e))?;
        let mut pipe = pipes::take().map_err(|e| failure(read_side, e))?;
        let mut eof = false;
        let mut in_pipe = 0usize;
        loop {
            let filled = source.try_io(Interest::READABLE, || {
                splice_fds(
                    source.as_fd(),
                    None,
                    pipe.write.as_fd(),
                    None,
                    PIPE_CHUNK,
                    flags,
                )
                .map_err(io::Error::from)
            });
            let progressed = match filled {
                Ok(0) => {
                    eof = true;
                    false
                }
                Ok(moved) => {
                    in_pipe += moved;
                    true
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => false,
                Err(error) => return Err(failure(read_side, error)),
            };
            while in_pipe > 0 {
                let drained = sink.try_io(Interest::WRITABLE, || {
                    splice_fds(pipe.read.as_fd(), None, sink.as_fd(), None, in_pipe, flags)
                        .map_err(io::Error::from)
                });
                match drained {
                    Ok(moved) => {
                        in_pipe -= moved;
                        record(&direction.bytes, last_activity, started, moved);
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        // Parked with bytes in the pipe: the pipe waits where a pause finds it.
                        direction.park(pipe);
                        let writable = sink.writable().await;
                        pipe = direction.unpark();
                        writable.map_err(|e| failure(write_side, e))?;
                    }
                    Err(error) => return Err(failure(write_side, error)),
                }
            }
            if eof || !progressed {
                break;
            }
        }
        pipes::give(pipe);
        if eof {
            return writer.shutdown().await.map_err(|e| failure(write_side, e));
        }
    }
}

impl PipeDirection {
    fn park(&self, pipe: pipes::Pipe) {
        *self
            .waiting
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = Some(pipe);
    }

    fn unpark(&self) -> pipes::Pipe {
        self.waiting
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take()
            .expect("parked before the await that is resumed now")
    }
}

/// Bytes asked of one splice(2) call: the default pipe capacity.
const PIPE_CHUNK: usize = 64 * 1024;

/// Pipes for splice(2), shared by the connections a worker thread serves.
mod pipes {
    use std::cell::RefCell;
    use std::os::fd::OwnedFd;

    /// Pipes kept per thread; more are closed.
    const KEEP: usize = 16;

    /// Both ends of an (empty) pipe.
    pub(crate) struct Pipe {
        pub(crate) read: OwnedFd,
        pub(crate) write: OwnedFd,
    }

    thread_local! {
        static FREE: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    }

    /// An empty pipe.
    pub(crate) fn take() -> std::io::Result<Pipe> {
        if let Some(pipe) = FREE.with(|free| free.borrow_mut().pop()) {
            return Ok(pipe);
        }
        let (read, write) = rustix::pipe::pipe_with(
            rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
        )?;
        Ok(Pipe { read, write })
    }

    /// Returns a pipe from [`take`]; it must be empty.
    pub(crate) fn give(pipe: Pipe) {
        FREE.with(|free| {
            let mut free = free.borrow_mut();
            if free.len() < KEEP {
                free.push(pipe);
            }
        });
    }
}

/// One direction of [`Copying`].
#[derive(Default)]
struct Direction {
    /// Held only while it has bytes not yet written; otherwise back in the pool.
    buf: Option<Vec<u8>>,
    start: usize,
    end: usize,
    read_done: bool,
    finished: bool,
    bytes: u64,
}

impl Direction {
    /// Bytes read but not yet written.
    fn pending(&self) -> &[u8] {
        match &self.buf {
            Some(buf) => &buf[self.start..self.end],
            None => &[],
        }
    }

    /// Starts with `bytes` waiting to be written (a resumed connection).
    fn preload(&mut self, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        self.start = 0;
        self.end = bytes.len();
        self.buf = Some(bytes);
    }

    /// Moves bytes `from` → `to` until it would block (`Pending`), the source ends and the FIN is
    /// passed on (`Ready(Ok)`), or a socket fails. Returns whether any byte moved.
    fn poll_move(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        (read_side, write_side): (Side, Side),
        moved: &mut bool,
    ) -> Poll<Result<(), CloseReason>> {
        loop {
            if let Some(buf) = &self.buf {
                while self.start < self.end {
                    if let Err(error) = ready!(to.poll_write_ready(cx)) {
                        return Poll::Ready(Err(failure(write_side, error)));
                    }
                    match to.try_write(&buf[self.start..self.end]) {
                        Ok(written) => {
                            self.start += written;
                            self.bytes += written as u64;
                            *moved = true;
                        }
                        Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                        Err(error) => return Poll::Ready(Err(failure(write_side, error))),
                    }
                }
            }
            if let Some(buf) = self.buf.take() {
                pool::give(buf);
            }
            if self.read_done {
                if !self.finished {
                    // Pass the FIN on. A peer that already went away is no error here: the other
                    // direction reports it.
                    let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
                    self.finished = true;
                }
                return Poll::Ready(Ok(()));
            }
            if let Err(error) = ready!(from.poll_read_ready(cx)) {
                return Poll::Ready(Err(failure(read_side, error)));
            }
            let mut buf = pool::take();
            match from.try_read(&mut buf) {
                Ok(0) => {
                    self.read_done = true;
                    pool::give(buf);
                }
                Ok(read) => {
                    self.buf = Some(buf);
                    self.start = 0;
                    self.end = read;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => pool::give(buf),
                Err(error) => {
                    pool::give(buf);
                    return Poll::Ready(Err(failure(read_side, error)));
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// [`splice`] with read/write through pooled buffers, as a hand-written future: every open
    /// connection is one of these, so it is kept small (no per-direction futures, no buffer while
    /// idle).
    pub(crate) struct Copying {
        client: TcpStream,
        upstream: TcpStream,
        up: Direction,
        down: Direction,
        idle_timeout: Duration,
        last_activity: Instant,
        #[pin]
        idle: tokio::time::Sleep,
    }
}

impl Copying {
    fn new(client: TcpStream, upstream: TcpStream, idle_timeout: Duration) -> Self {
        let now = Instant::now();
        Copying {
            client,
            upstream,
            up: Direction::default(),
            down: Direction::default(),
            idle_timeout,
            last_activity: now,
            idle: tokio::time::sleep_until(now + idle_timeout),
        }
    }
}

impl std::future::Future for Copying {
    type Output = SpliceReport;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SpliceReport> {
        let mut this = self.project();
        let mut moved = false;
        let up = this.up.poll_move(
            cx,
            this.client,
            this.upstream,
            (Side::Client, Side::Upstream),
            &mut moved,
        );
        let down = this.down.poll_move(
            cx,
            this.upstream,
            this.client,
            (Side::Upstream, Side::Client),
            &mut moved,
        );
        let report = |reason| {
            shut_down(this.client, this.upstream);
            SpliceReport {
                client_to_upstream: this.up.bytes,
                upstream_to_client: this.down.bytes,
                reason,
            }
        };
        match (up, down) {
            (Poll::Ready(Err(reason)), _) | (_, Poll::Ready(Err(reason))) => {
                return Poll::Ready(report(reason))
            }
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => {
                return Poll::Ready(report(CloseReason::Finished))
            }
            _ => {}
        }
        if moved {
            *this.last_activity = Instant::now();
        }
        // The timer is reset only when it fires, not on every byte.
        while this.idle.as_mut().poll(cx).is_ready() {
            let deadline = *this.last_activity + *this.idle_timeout;
            if Instant::now() >= deadline {
                return Poll::Ready(report(CloseReason::IdleTimeout));
            }
            this.idle.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

/// Copy buffers shared by the connections a worker thread serves.
mod pool {
    use std::cell::RefCell;

    /// Buffers kept per thread; more are freed.
    const KEEP: usize = 32;

    thread_local! {
        static FREE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }

    /// A buffer of `super::BUFFER_LEN` bytes.
    pub(crate) fn take() -> Vec<u8> {
        FREE.with(|free| free.borrow_mut().pop())
            .unwrap_or_else(|| vec![0u8; super::BUFFER_LEN])
    }

    /// Returns a buffer from [`take`] (others, such as a resumed connection's, are freed).
    pub(crate) fn give(buf: Vec<u8>) {
        if buf.len() != super::BUFFER_LEN {
            return;
        }
        FREE.with(|free| {
            let mut free = free.borrow_mut();
            if free.len() < KEEP {
                free.push(buf);
            }
        });
    }
}

fn record(bytes: &AtomicU64, last_activity: &AtomicU64, started: Instant, count: usize) {
    bytes.fetch_add(count as u64, Ordering::Relaxed);
    last_activity.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
}
