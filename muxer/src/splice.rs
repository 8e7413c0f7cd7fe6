//! Layer-4 forwarding between the client and a backend: both directions at once, a FIN on one side
//! passed on to the other, an idle timeout over both directions, and both sockets closed as soon
//! as either side fails.
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Size of a copy buffer, taken from the pool only while bytes flow.
const BUFFER_LEN: usize = 32 * 1024;

/// Why a spliced connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
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
    pub fn label(&self) -> String {
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
pub struct SpliceReport {
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
pub async fn splice(
    mut client: TcpStream,
    mut upstream: TcpStream,
    idle_timeout: Duration,
) -> SpliceReport {
    let started = Instant::now();
    // Milliseconds since `started` of the last byte moved in either direction.
    let last_activity = AtomicU64::new(0);
    let up_bytes = AtomicU64::new(0);
    let down_bytes = AtomicU64::new(0);

    let (mut client_read, mut client_write) = client.split();
    let (mut upstream_read, mut upstream_write) = upstream.split();
    let up = copy_until_eof(
        &mut client_read,
        &mut upstream_write,
        (Side::Client, Side::Upstream),
        &up_bytes,
        &last_activity,
        started,
    );
    let down = copy_until_eof(
        &mut upstream_read,
        &mut client_write,
        (Side::Upstream, Side::Client),
        &down_bytes,
        &last_activity,
        started,
    );
    tokio::pin!(up, down);
    let mut up_done = false;
    let mut down_done = false;

    let reason = loop {
        if up_done && down_done {
            break CloseReason::Finished;
        }
        let idle_deadline =
            started + Duration::from_millis(last_activity.load(Ordering::Relaxed)) + idle_timeout;
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
    };
    SpliceReport {
        client_to_upstream: up_bytes.load(Ordering::Relaxed),
        upstream_to_client: down_bytes.load(Ordering::Relaxed),
        reason,
    }
}

/// Copies `reader` to `writer` until EOF, then shuts `writer` down so the peer sees the FIN.
///
/// A copy buffer is held only while bytes are flowing: between bursts it goes back to a
/// per-thread pool, so an idle connection costs no buffer at all (10 000 idle SSH sessions must
/// not pin 640 MiB of buffers).
async fn copy_until_eof(
    reader: &mut ReadHalf<'_>,
    writer: &mut WriteHalf<'_>,
    (read_side, write_side): (Side, Side),
    bytes: &AtomicU64,
    last_activity: &AtomicU64,
    started: Instant,
) -> Result<(), CloseReason> {
    let fail = |side: Side, error: io::Error| match side {
        Side::Client => CloseReason::ClientError(error.kind()),
        Side::Upstream => CloseReason::UpstreamError(error.kind()),
    };
    loop {
        reader.readable().await.map_err(|e| fail(read_side, e))?;
        let mut buf = pool::take();
        let drained = loop {
            match reader.try_read(&mut buf) {
                Ok(0) => break true,
                Ok(read) => {
                    if let Err(error) = writer.write_all(&buf[..read]).await {
                        pool::give(buf);
                        return Err(fail(write_side, error));
                    }
                    record(bytes, last_activity, started, read);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break false,
                Err(error) => {
                    pool::give(buf);
                    return Err(fail(read_side, error));
                }
            }
        };
        pool::give(buf);
        if drained {
            return writer.shutdown().await.map_err(|e| fail(write_side, e));
        }
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
    pub fn take() -> Vec<u8> {
        FREE.with(|free| free.borrow_mut().pop())
            .unwrap_or_else(|| vec![0u8; super::BUFFER_LEN])
    }

    /// Returns a buffer from [`take`].
    pub fn give(buf: Vec<u8>) {
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
