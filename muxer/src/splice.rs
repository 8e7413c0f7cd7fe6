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

/// The largest copy buffer: the most a paused connection holds unwritten in each direction.
pub(crate) use buffers::LARGE as LARGEST_BUFFER;

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
    buf: Option<buffers::Buffer>,
    start: usize,
    end: usize,
    read_done: bool,
    finished: bool,
    bytes: u64,
    /// The last read filled at least a small buffer's worth: the next read takes a large one.
    bulk: bool,
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
        self.buf = Some(buffers::Buffer::foreign(bytes));
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
            // Back to the pool: an idle direction holds no buffer.
            self.buf = None;
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
            let mut buf = buffers::Buffer::take(self.bulk);
            match from.try_read(&mut buf) {
                Ok(0) => self.read_done = true,
                Ok(read) => {
                    self.bulk = read >= buffers::SMALL;
                    self.buf = Some(buf);
                    self.start = 0;
                    self.end = read;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Poll::Ready(Err(failure(read_side, error))),
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

/// Copy buffers, kept per thread for the connections a worker serves. Every read takes a small
/// one; a direction whose last read filled that much (bulk) takes a large one, within a
/// process-wide budget. Large buffers carried a single stream 1.3× as fast in both bulk labs
/// (fewer reads, writes and wake-ups per byte; docs/benchmarks.md); small ones keep an
/// interactive session's and a slow reader's memory low.
mod buffers {
    use std::cell::RefCell;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Every direction's first buffer.
    pub(crate) const SMALL: usize = 32 * 1024;
    /// A bulk direction's buffer. Two of them unwritten (one each way) must fit one handover
    /// message, also where `net.core.wmem_max` is the kernel's default (handover/wire.rs).
    pub(crate) const LARGE: usize = 192 * 1024;
    /// Large buffers held at once, by all threads (12 MiB); past it bulk gets small ones.
    const LARGE_BUDGET: usize = 64;
    /// Free buffers kept per thread; more are freed.
    const KEEP_SMALL: usize = 32;
    const KEEP_LARGE: usize = 4;

    /// Large buffers taken and not yet returned.
    static LARGE_TAKEN: AtomicUsize = AtomicUsize::new(0);

    thread_local! {
        static FREE_SMALL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
        static FREE_LARGE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }

    /// Which pool a buffer returns to.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Class {
        Small,
        Large,
        /// Bytes from elsewhere (a resumed connection's): freed, not pooled.
        Foreign,
    }

    /// A copy buffer; dropping it returns it to its pool.
    pub(crate) struct Buffer {
        bytes: Vec<u8>,
        class: Class,
    }

    impl Buffer {
        /// A buffer from this thread's pool: large if `bulk` and the budget allows.
        pub(crate) fn take(bulk: bool) -> Buffer {
            let large = bulk && reserve(&LARGE_TAKEN, LARGE_BUDGET);
            #[cfg(test)]
            if large {
                tests::TAKEN_HERE.with(|taken| taken.set(taken.get() + 1));
            }
            let (pool, len, class) = if large {
                (&FREE_LARGE, LARGE, Class::Large)
            } else {
                (&FREE_SMALL, SMALL, Class::Small)
            };
            let bytes = pool
                .try_with(|free| free.borrow_mut().pop())
                .ok()
                .flatten()
                .unwrap_or_else(|| vec![0u8; len]);
            Buffer { bytes, class }
        }

        /// Wraps bytes that did not come from a pool.
        pub(crate) fn foreign(bytes: Vec<u8>) -> Buffer {
            Buffer {
                bytes,
                class: Class::Foreign,
            }
        }
    }

    /// Counts one more of `budget` as taken, unless all are.
    fn reserve(taken: &AtomicUsize, budget: usize) -> bool {
        taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |count| {
                (count < budget).then_some(count + 1)
            })
            .is_ok()
    }

    impl std::ops::Deref for Buffer {
        type Target = [u8];

        fn deref(&self) -> &[u8] {
            &self.bytes
        }
    }

    impl std::ops::DerefMut for Buffer {
        fn deref_mut(&mut self) -> &mut [u8] {
            &mut self.bytes
        }
    }

    impl Drop for Buffer {
        fn drop(&mut self) {
            let (pool, keep) = match self.class {
                Class::Small => (&FREE_SMALL, KEEP_SMALL),
                Class::Large => {
                    LARGE_TAKEN.fetch_sub(1, Ordering::AcqRel);
                    #[cfg(test)]
                    tests::RETURNED_HERE.with(|returned| returned.set(returned.get() + 1));
                    (&FREE_LARGE, KEEP_LARGE)
                }
                Class::Foreign => return,
            };
            let bytes = std::mem::take(&mut self.bytes);
            // A thread already tearing down its locals just frees the buffer.
            let _ = pool.try_with(|free| {
                let mut free = free.borrow_mut();
                if free.len() < keep {
                    free.push(bytes);
                }
            });
        }
    }

    #[cfg(test)]
    pub(crate) mod tests {
        use super::*;
        use std::cell::Cell;

        /// Held by a test that fills the process-wide budget, and by the tests that expect large
        /// buffers while they run (the tests of a crate share one process).
        pub(crate) static WHOLE_BUDGET: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

        thread_local! {
            /// Large buffers this thread took and returned (the tests' runtimes have one thread).
            pub(crate) static TAKEN_HERE: Cell<usize> = const { Cell::new(0) };
            pub(crate) static RETURNED_HERE: Cell<usize> = const { Cell::new(0) };
        }

        /// Large buffers this thread took, and how many of them it still holds.
        pub(crate) fn large_here() -> (usize, usize) {
            let taken = TAKEN_HERE.with(Cell::get);
            (taken, taken - RETURNED_HERE.with(Cell::get))
        }

        #[test]
        fn the_large_buffer_budget_is_never_exceeded_and_returned_ones_count_again() {
            let taken = AtomicUsize::new(0);
            assert!((0..5).all(|_| reserve(&taken, 5)));
            assert!(!reserve(&taken, 5), "a sixth of five");
            assert_eq!(taken.load(Ordering::Acquire), 5);
            taken.fetch_sub(1, Ordering::AcqRel);
            assert!(reserve(&taken, 5));
            assert!(!reserve(&taken, 5));
        }

        #[test]
        fn a_bulk_take_beyond_the_budget_gets_a_small_buffer() {
            let _alone = WHOLE_BUDGET.blocking_lock();
            // Fill the process-wide budget from here (other tests may hold some: take until
            // one comes back small, which must happen within the budget).
            let mut held = Vec::new();
            let small = loop {
                let buffer = Buffer::take(true);
                if buffer.class == Class::Small {
                    break buffer;
                }
                held.push(buffer);
                assert!(
                    held.len() <= LARGE_BUDGET,
                    "more large buffers than the budget"
                );
            };
            assert_eq!(small.len(), SMALL);
            assert!(held.iter().all(|buffer| buffer.len() == LARGE));
            drop(held);
            assert_eq!(Buffer::take(false).len(), SMALL, "small when not bulk");
        }
    }
}

fn record(bytes: &AtomicU64, last_activity: &AtomicU64, started: Instant, count: usize) {
    bytes.fetch_add(count as u64, Ordering::Relaxed);
    last_activity.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Both ends of a loopback TCP connection.
    async fn connected() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (near, far) = tokio::join!(TcpStream::connect(address), listener.accept());
        (near.unwrap(), far.unwrap().0)
    }

    /// A client, a backend, and a copying splice between them: (client, backend, splice task).
    async fn spliced() -> (TcpStream, TcpStream, tokio::task::JoinHandle<SpliceReport>) {
        let (client, client_far) = connected().await;
        let (upstream, backend) = connected().await;
        let copying = splice(client_far, upstream, Duration::from_secs(30), Method::Copy);
        (client, backend, tokio::spawn(copying))
    }

    /// `len` bytes that differ from any shifted copy of themselves.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
            .collect()
    }

    /// Sends `bytes` through `writer` while `reader` reads them back, then checks them.
    async fn through(
        mut writer: impl AsyncWriteExt + Unpin,
        mut reader: impl AsyncReadExt + Unpin,
        bytes: &[u8],
    ) {
        let mut received = vec![0u8; bytes.len()];
        let (written, read) =
            tokio::join!(writer.write_all(bytes), reader.read_exact(&mut received));
        written.unwrap();
        read.unwrap();
        assert!(received == bytes, "bytes changed on the way");
    }

    #[tokio::test]
    async fn bulk_both_ways_moves_every_byte_through_large_buffers_and_returns_them() {
        let _budget = buffers::tests::WHOLE_BUDGET.lock().await;
        let (mut client, mut backend, task) = spliced().await;
        let (before, _) = buffers::tests::large_here();
        let up = pattern(8 << 20, 1);
        let down = pattern(8 << 20, 2);
        {
            let (client_read, client_write) = client.split();
            let (backend_read, backend_write) = backend.split();
            tokio::join!(
                through(client_write, backend_read, &up),
                through(backend_write, client_read, &down),
            );
        }
        let (taken, _) = buffers::tests::large_here();
        assert!(taken > before, "a bulk transfer never took a large buffer");
        client.shutdown().await.unwrap();
        backend.shutdown().await.unwrap();
        let report = task.await.unwrap();
        assert_eq!(report.reason, CloseReason::Finished);
        assert_eq!(report.client_to_upstream, up.len() as u64);
        assert_eq!(report.upstream_to_client, down.len() as u64);
        assert_eq!(buffers::tests::large_here().1, 0, "a large buffer was kept");
    }

    #[tokio::test]
    async fn an_interactive_session_stays_on_small_buffers_also_after_a_bulk_burst() {
        let _budget = buffers::tests::WHOLE_BUDGET.lock().await;
        let (mut client, mut backend, task) = spliced().await;
        let keystrokes = |round: usize| pattern(64 + round % 100, round as u8);
        for round in 0..200 {
            through(&mut client, &mut backend, &keystrokes(round)).await;
            through(&mut backend, &mut client, &keystrokes(round)).await;
        }
        assert_eq!(
            buffers::tests::large_here().0,
            0,
            "small writes took a large buffer"
        );
        // A burst (an scp) grows the buffers; the next small reads shrink them again.
        through(&mut client, &mut backend, &pattern(4 << 20, 3)).await;
        let (after_burst, _) = buffers::tests::large_here();
        assert!(after_burst > 0, "a burst never took a large buffer");
        for round in 0..200 {
            through(&mut client, &mut backend, &keystrokes(round)).await;
        }
        let (after_typing, held) = buffers::tests::large_here();
        assert!(
            after_typing <= after_burst + 1,
            "typing after a burst kept taking large buffers: {} more",
            after_typing - after_burst
        );
        assert_eq!(held, 0);
        drop((client, backend));
        task.await.unwrap();
    }
}
