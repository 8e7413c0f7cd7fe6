//! HTTP/1.1 client connections between requests.
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB write buffer for as long as a connection lives,
//! and most of a keep-alive connection's life is spent idle. So each time a client connection
//! goes idle — no request in flight, its body fully read, every response byte written — muxer
//! ends the hyper connection without closing the socket, keeps only the socket while it waits for
//! the next request, and serves that request with a new hyper connection. Bytes hyper had already
//! read are replayed to the next one. A connection is never parked in the middle of a message:
//! hyper reports a connection idle only at a message boundary, and, as a second guard, one whose
//! request body was not read to its end is left to hyper for good (hyper drains or closes it), so
//! leftover body bytes can never be read as a request.
//!
//! Parking costs no system call: the socket is already registered, and the wait is the same
//! readiness wait hyper would do. Rebuilding the hyper connection afterwards does cost a few
//! microseconds, so a busy connection is parked only after a grace period (`PARK_GRACE`).
//! Measured: 3.2 KiB instead of 24 KiB per idle connection (docs/benchmarks.md).
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::HttpService;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::pool::InUse;
use super::proxy::ResponseBody;
use super::stream::{ClientStream, Replayed, Traffic};
use super::upstream::BoxError;
use super::WhenIdle;
use crate::limits::{ConnectionLimits, Eviction, Timeout};

/// How long a busy connection stays idle in hyper's hands before it is parked. A connection is
/// parked as soon as it goes idle the first time; if its next request then comes within this
/// time, it counts as busy and later idle spells must last this long before it is parked again.
/// Rebuilding the hyper connection costs a few microseconds, which a busy keep-alive client
/// would otherwise pay on every request (measured: 7 % of keep-alive throughput), while a client
/// that goes quiet still gives its buffers back at once, or after this grace period.
const PARK_GRACE: Duration = Duration::from_millis(100);

/// The client stream as a hyper HTTP/1 connection sees it.
pub(crate) type ClientIo<C> = TokioIo<Parkable<Replayed<C>>>;

/// What one client connection is doing, shared by its requests and its socket wrapper.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    /// Requests whose response (or request body) is not finished.
    in_flight: AtomicUsize,
    /// Requests started on this client connection, ever.
    started: AtomicUsize,
    /// The last write or flush did not complete: hyper still holds bytes to send.
    write_pending: AtomicBool,
    /// A request body ended early: leave the connection to hyper from now on.
    unparkable: AtomicBool,
    /// The hyper connection is being ended to park the socket: do not shut it down.
    parking: AtomicBool,
    /// The response about to be written is the connection's last and small: cork the socket so
    /// that it leaves with the FIN of the shutdown that follows it.
    cork_last_response: AtomicBool,
}

impl Activity {
    /// Counts one piece of work (a response, a request body) until the returned token drops.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// Counts a request as started; see [`Activity::begin`] for its response.
    pub(crate) fn request_started(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests started on this connection, ever.
    pub(crate) fn started(&self) -> usize {
        self.started.load(Ordering::Relaxed)
    }

    /// Whether no request is in flight (no response or request body unfinished).
    pub(crate) fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
    }

    /// Marks the response about to be written as the connection's last, complete and small: it
    /// is corked and leaves in one segment with the connection's FIN (hyper shuts the connection
    /// down right after it). Two segments fewer per connection for the client and muxer to
    /// process: 7 % more new connections per second measured here. Only for responses of known,
    /// small length: TCP_CORK would hold a streamed response's partial segments for up to 200 ms.
    pub(crate) fn cork_last_response(&self) {
        self.cork_last_response.store(true, Ordering::Relaxed);
    }

    /// Marks the connection as one that must not be parked.
    pub(crate) fn forbid_parking(&self) {
        self.unparkable.store(true, Ordering::Relaxed);
    }

    fn parkable(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
            && !self.write_pending.load(Ordering::Relaxed)
            && !self.unparkable.load(Ordering::Relaxed)
    }
}

/// One unfinished piece of a connection's work; see [`Activity::begin`].
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request body being forwarded: counts its connection busy until the body ends, and keeps
/// the connection from ever being parked unless the body was read to its end (hyper then closes
/// the connection rather than leave unread body bytes in front of the next request).
#[derive(Debug)]
pub(crate) struct RequestBody {
    in_flight: InFlight,
    complete: bool,
}

impl RequestBody {
    /// Watches a request body on `activity`'s connection.
    pub(crate) fn new(activity: &Arc<Activity>) -> Self {
        RequestBody {
            in_flight: activity.begin(),
            complete: false,
        }
    }

    /// The body was read to its end.
    pub(crate) fn complete(mut self) {
        self.complete = true;
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if !self.complete {
            self.in_flight.0.forbid_parking();
        }
    }
}

/// A response body that keeps its connection counted busy until hyper drops it (written or
/// abandoned).
pub(crate) struct Tracked {
    inner: ResponseBody,
    _in_flight: InFlight,
}

impl Tracked {
    /// `inner`, counted by `in_flight`.
    pub(crate) fn new(inner: ResponseBody, in_flight: InFlight) -> Self {
        Tracked {
            inner,
            _in_flight: in_flight,
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// The client socket as hyper sees it: records whether hyper's last write completed, and
    /// ignores hyper's shutdown while the connection is being parked.
    pub struct Parkable<S> {
        #[pin]
        inner: S,
        activity: Arc<Activity>,
    }
}

impl<S: AsFd> Parkable<S> {
    /// Corks the socket before the first write of a response marked with
    /// [`Activity::cork_last_response`].
    fn cork_if_last(&self) {
        if self
            .activity
            .cork_last_response
            .swap(false, Ordering::Relaxed)
        {
            if let Err(error) = rustix::net::sockopt::set_tcp_cork(&self.inner, true) {
                debug!(%error, "setsockopt(TCP_CORK) failed; the FIN follows on its own");
            }
        }
    }
}

impl<S> Parkable<S> {
    fn record<T>(&self, polled: &Poll<io::Result<T>>) {
        self.activity
            .write_pending
            .store(polled.is_pending(), Ordering::Relaxed);
    }
}

impl<S: AsyncRead> AsyncRead for Parkable<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + AsFd> AsyncWrite for Parkable<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.cork_if_last();
        let polled = self.as_mut().project().inner.poll_write(cx, data);
        self.record(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.cork_if_last();
        let polled = self.as_mut().project().inner.poll_write_vectored(cx, bufs);
        self.record(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = self.as_mut().project().inner.poll_flush(cx);
        self.record(&polled);
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.activity.parking.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        self.project().inner.poll_shutdown(cx)
    }
}

/// The client stream of an HTTP/1 connection.
pub(crate) struct Client<C> {
    /// The stream (TCP, or TLS over it).
    pub stream: C,
    /// Its first bytes, already read by the sniffer.
    pub prefix: Vec<u8>,
    /// Its byte counters.
    pub traffic: Arc<Traffic>,
    /// A client that takes no response bytes for this long is disconnected.
    pub write_timeout: Duration,
}

/// What happens to a parked connection.
pub(crate) struct Idle<'a> {
    /// Closed after this long without a next request.
    pub timeout: Duration,
    /// Where it is registered while parked (closable at the descriptor limit) and its timeout
    /// counted.
    pub limits: &'a ConnectionLimits,
}

/// Serves HTTP/1.1 on `client` (whose first bytes, `prefix`, were already read), parking it
/// between requests, until it closes or `shutdown` fires. A parked connection that stays silent
/// for the idle timeout is closed, as hyper closes one whose next request does not arrive within
/// its header read timeout; so is the longest-parked one when the process runs out of descriptors.
pub(crate) async fn serve<C, S>(
    client: Client<C>,
    builder: &http1::Builder,
    mut service: S,
    in_use: &InUse,
    activity: &Arc<Activity>,
    shutdown: &CancellationToken,
    idle: Idle<'_>,
) -> Result<(), hyper::Error>
where
    C: ClientStream,
    S: HttpService<Incoming, ResBody = Tracked, Error = Infallible> + Unpin + Send,
    S::Future: Send + 'static,
{
    let write_timeout = client.write_timeout;
    let mut replayed = Replayed::new(client.prefix, client.stream, client.traffic)
        .with_write_timeout(write_timeout);
    // One timer per connection: the grace period before parking, then the parked idle limit.
    let mut idle_timer: Option<Pin<Box<Sleep>>> = None;
    // The client sent its next request within PARK_GRACE of the last parking: wait out the
    // grace period before parking again.
    let mut busy = false;
    loop {
        activity.parking.store(false, Ordering::Relaxed);
        let io = TokioIo::new(Parkable {
            inner: replayed,
            activity: Arc::clone(activity),
        });
        // Boxed: freed while parked, instead of sizing the parked connection's state.
        let mut connection = Box::new(builder.serve_connection(io, service).with_upgrades());
        // A hyper connection is idle only after its first message: before that, a graceful
        // shutdown would not end it but turn keep-alive off (a request whose head arrives in
        // pieces would then be answered with `Connection: close`). So a connection is parked only
        // once it has served a request.
        let started_before = activity.started();
        // The request count when the grace period last started: a later request restarts it.
        let mut grace_started_at: Option<usize> = None;
        let result = super::drive(&mut connection, in_use, shutdown, |cx| {
            let started = activity.started();
            let idle = started != started_before && activity.parkable() && in_use.is_empty();
            if !idle {
                return WhenIdle::Wait;
            }
            if !busy {
                activity.parking.store(true, Ordering::Relaxed);
                return WhenIdle::ShutDown;
            }
            let grace = idle_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(PARK_GRACE)));
            if grace_started_at != Some(started) {
                grace_started_at = Some(started);
                grace.as_mut().reset(Instant::now() + PARK_GRACE);
            }
            if grace.as_mut().poll(cx).is_pending() {
                return WhenIdle::Wait;
            }
            activity.parking.store(true, Ordering::Relaxed);
            WhenIdle::ShutDown
        })
        .await;
        if result.is_err() || !activity.parking.load(Ordering::Relaxed) {
            return result;
        }
        let Some((unread, mut stream, traffic, next_service)) = take_apart(connection) else {
            return result;
        };
        service = next_service;
        let parked_at = Instant::now();
        if unread.is_empty() {
            let deadline = parked_at + idle.timeout;
            let parked = idle.limits.idle.park();
            match next_request(
                &mut stream,
                deadline,
                &mut idle_timer,
                shutdown,
                &parked.eviction,
            )
            .await
            {
                Wake::Request => {}
                Wake::Close(Some(timeout)) => {
                    idle.limits.count_timeout(timeout);
                    return Ok(());
                }
                Wake::Close(None) => return Ok(()),
            }
        }
        busy = parked_at.elapsed() < PARK_GRACE;
        replayed = Replayed::resume(unread, stream, traffic).with_write_timeout(write_timeout);
    }
}

/// Why a parked connection's wait ended.
enum Wake {
    /// The client sent something (or closed): serve it.
    Request,
    /// Close the connection: idle too long (the timeout to count), evicted or shutting down.
    Close(Option<Timeout>),
}

/// Takes a hyper connection that ended for parking apart: the bytes it read but did not use, the
/// socket, its byte counters and the service. A function of its own so that everything else —
/// hyper's read buffer, which the unread bytes would otherwise still point into, and the
/// connection's box — is freed here, before the parked wait, not when the caller's loop turns.
// Takes the box itself, so that its allocation is freed here too.
#[allow(
    clippy::boxed_local,
    reason = "taking the box frees its allocation here, before the parked wait"
)]
fn take_apart<C, S>(
    connection: Box<http1::UpgradeableConnection<ClientIo<C>, S>>,
) -> Option<(Vec<u8>, C, Arc<Traffic>, S)>
where
    C: ClientStream,
    S: HttpService<Incoming, ResBody = Tracked, Error = Infallible>,
{
    let parts = connection.into_parts()?;
    let Parkable { inner, .. } = parts.io.into_inner();
    let traffic = Arc::clone(inner.traffic());
    let (mut unread, stream) = inner.into_parts();
    unread.extend_from_slice(&parts.read_buf);
    Some((unread, stream, traffic, parts.service))
}

/// Waits, holding no buffer, until `stream` has bytes (or an end) to read. Ends with a close
/// instead when the connection is silent past `deadline`, evicted to free its descriptor, or
/// shutting down. `timer` is kept across waits and re-armed only when it fires early, not once
/// per request.
async fn next_request(
    stream: &mut impl ClientStream,
    deadline: Instant,
    timer: &mut Option<Pin<Box<Sleep>>>,
    shutdown: &CancellationToken,
    eviction: &Eviction,
) -> Wake {
    if stream.has_buffered() {
        return Wake::Request;
    }
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    std::future::poll_fn(|cx| {
        if stream.tcp().poll_read_ready(cx).is_ready() {
            return Poll::Ready(Wake::Request);
        }
        if cancelled.as_mut().poll(cx).is_ready() || eviction.poll_evicted(cx) {
            return Poll::Ready(Wake::Close(None));
        }
        let sleep = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            match sleep.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if Instant::now() >= deadline => {
                    return Poll::Ready(Wake::Close(Some(Timeout::KeepAliveIdle)))
                }
                // Armed for an earlier wait.
                Poll::Ready(()) => sleep.as_mut().reset(deadline),
            }
        }
    })
    .await
}
