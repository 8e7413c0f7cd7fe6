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
//! Measured: 1.08 KiB instead of 24 KiB per idle connection (docs/http.md says what is left).
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
use tokio_util::sync::WaitForCancellationFuture;
use tracing::debug;

use super::pool::InUse;
use super::proxy::ResponseBody;
use super::stream::{ClientStream, Replayed};
use super::upstream::BoxError;
use super::{Served, WhenIdle};
use crate::limits::{ParkedEntry, Timeout};
use crate::sniff::HttpVersion;

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

/// An HTTP/1 client connection between two hyper connections: its socket, and the bytes read
/// from it but not served yet (the sniffed ones at first).
pub(crate) struct Parked<C> {
    pub unread: Vec<u8>,
    pub stream: C,
}

/// Serves HTTP/1.1 on `parked.stream` (`parked.unread`, the sniffed bytes, first) with
/// `served`'s router, parking the connection between requests, until it closes or shutdown
/// fires. A parked connection that stays silent for the idle timeout is closed, as hyper closes
/// one whose next request does not arrive within its header read timeout; so is the
/// longest-parked one when the process runs out of descriptors.
///
/// Each round of serving (a hyper connection, its service, the upstream connections it drives)
/// is one boxed future, freed when the connection parks: a parked connection is this function's
/// small state, its socket and its timer (docs/http.md). So the state held across the parked
/// wait is kept small on purpose: one `parked` reused for every round, a hand-written wait
/// ([`NextRequest`]), and an `async` block rather than an `async fn`, which would hold its
/// arguments twice (measured: 480 bytes against ~330).
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would hold its arguments twice in every parked connection"
)]
pub(crate) fn serve<C: ClientStream>(
    mut parked: Parked<C>,
    served: Served,
) -> impl Future<Output = Result<(), hyper::Error>> + Send + 'static {
    async move {
        let mut counted = false;
        // One timer per connection: the request head's limit, the grace period before parking,
        // then the parked idle limit.
        let mut idle_timer: Option<Pin<Box<Sleep>>> = None;
        // The client sent its next request within PARK_GRACE of the last parking: wait out the
        // grace period before parking again.
        let mut busy = false;
        loop {
            let traffic = Arc::clone(&served.client.traffic);
            let replayed = if counted {
                Replayed::resume(parked.unread, parked.stream, traffic)
            } else {
                Replayed::new(parked.unread, parked.stream, traffic)
            };
            counted = true;
            let replayed = replayed.with_write_timeout(served.context.settings.write_timeout);
            match Box::pin(serve_round(replayed, &served, busy, &mut idle_timer)).await {
                Round::Parked(next) => parked = next,
                Round::Closed(result) => {
                    served.count_timeout(&result, HttpVersion::Http1);
                    return result;
                }
            }
            let parked_at = Instant::now();
            if parked.unread.is_empty() && !parked.stream.has_buffered() {
                let registration = served.limits().idle.park();
                let wake = NextRequest {
                    stream: &parked.stream,
                    deadline: parked_at + served.context.settings.idle_timeout(),
                    timer: &mut idle_timer,
                    cancelled: served.handles.shutdown.cancelled(),
                    registration: &registration,
                }
                .await;
                match wake {
                    Wake::Request => {}
                    Wake::Close(Some(timeout)) => {
                        served.limits().count_timeout(timeout);
                        return Ok(());
                    }
                    Wake::Close(None) => return Ok(()),
                }
            }
            busy = parked_at.elapsed() < PARK_GRACE;
        }
    }
}

/// How one round of serving ended.
enum Round<C> {
    /// The connection went idle and was taken apart to park.
    Parked(Parked<C>),
    /// The connection is over.
    Closed(Result<(), hyper::Error>),
}

/// Serves `replayed` with a new hyper connection until it closes, or goes idle and may be parked
/// (`busy`: only after [`PARK_GRACE`] of silence, timed with `idle_timer`).
async fn serve_round<C: ClientStream>(
    replayed: Replayed<C>,
    served: &Served,
    busy: bool,
    idle_timer: &mut Option<Pin<Box<Sleep>>>,
) -> Round<C> {
    let activity = Arc::new(Activity::default());
    let in_use = InUse::default();
    let service = served.service(replayed.get_ref().tcp(), &in_use, &activity);
    let io = TokioIo::new(Parkable {
        inner: replayed,
        activity: Arc::clone(&activity),
    });
    let settings = &served.context.settings;
    // No timer for hyper: the request head's time limit is kept below, on the connection's one
    // timer. hyper's own boxed, armed and dropped a timer for every request; with the grace
    // timer moved for every request too, that was 1 300 of a keep-alive request's 32 000
    // instructions (callgrind).
    let mut builder = http1::Builder::new();
    builder
        .header_read_timeout(None)
        // One buffer, not a queue of them: see `pool::Pool::connect`.
        .writev(false)
        .max_buf_size(settings.max_header_bytes)
        .keep_alive(true);
    let mut connection = Box::new(builder.serve_connection(io, service).with_upgrades());
    let mut waiting = WaitingForHead::default();
    let result = super::drive(&mut connection, &in_use, &served.handles.shutdown, |cx| {
        if !activity.is_idle() {
            return WhenIdle::Wait;
        }
        let started = activity.started();
        let since = waiting.since(started);
        // A hyper connection is idle only after its first message: before that, a graceful
        // shutdown would not end it but turn keep-alive off (a request whose head arrives in
        // pieces would then be answered with `Connection: close`). So a connection is parked
        // only once it has served a request.
        let parkable = started != 0 && activity.parkable() && in_use.is_empty();
        if parkable && !busy {
            activity.parking.store(true, Ordering::Relaxed);
            return WhenIdle::ShutDown;
        }
        let head_deadline = since + settings.header_read_timeout;
        let deadline = if parkable {
            head_deadline.min(since + PARK_GRACE)
        } else {
            head_deadline
        };
        if poll_deadline(idle_timer, deadline, cx).is_pending() {
            return WhenIdle::Wait;
        }
        if deadline == head_deadline {
            // A slowloris, or a keep-alive client silent past the head's time before parking.
            served.limits().count_timeout(Timeout::HeaderRead);
            return WhenIdle::Drop;
        }
        activity.parking.store(true, Ordering::Relaxed);
        WhenIdle::ShutDown
    })
    .await;
    if result.is_err() || !activity.parking.load(Ordering::Relaxed) {
        return Round::Closed(result);
    }
    match take_apart(connection) {
        Some(parked) => Round::Parked(parked),
        None => Round::Closed(result),
    }
}

/// Since when a connection has been waiting for a request head: from the moment no request was
/// in flight, for the request count then (a later request starts a new wait). Read from the
/// clock once per wait.
#[derive(Default)]
struct WaitingForHead(Option<(usize, Instant)>);

impl WaitingForHead {
    /// When the wait that `started` requests into the connection began (now, if it is new).
    fn since(&mut self, started: usize) -> Instant {
        match self.0 {
            Some((count, since)) if count == started => since,
            _ => {
                let now = Instant::now();
                self.0 = Some((started, now));
                now
            }
        }
    }
}

/// Polls a connection's one timer for `deadline`. The timer is re-armed only when it was armed
/// later than `deadline`, or fires before it: a busy connection's deadlines move on with every
/// request, and moving the timer each time cost a timer-wheel removal and insertion per request.
fn poll_deadline(
    timer: &mut Option<Pin<Box<Sleep>>>,
    deadline: Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let sleep = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
    if sleep.deadline() > deadline {
        sleep.as_mut().reset(deadline);
    }
    loop {
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if sleep.deadline() >= deadline {
            return Poll::Ready(());
        }
        // Armed for an earlier deadline.
        sleep.as_mut().reset(deadline);
    }
}

/// Why a parked connection's wait ended.
enum Wake {
    /// The client sent something (or closed): serve it.
    Request,
    /// Close the connection: idle too long (the timeout to count), evicted or shutting down.
    Close(Option<Timeout>),
}

/// Takes a hyper connection that ended for parking apart: the bytes it read but did not use, and
/// the socket. A function of its own so that everything else —
/// hyper's read buffer, which the unread bytes would otherwise still point into, and the
/// connection's box — is freed here, before the parked wait, not when the caller's loop turns.
// Takes the box itself, so that its allocation is freed here too.
#[allow(
    clippy::boxed_local,
    reason = "taking the box frees its allocation here, before the parked wait"
)]
fn take_apart<C, S>(
    connection: Box<http1::UpgradeableConnection<ClientIo<C>, S>>,
) -> Option<Parked<C>>
where
    C: ClientStream,
    S: HttpService<Incoming, ResBody = Tracked, Error = Infallible>,
{
    let parts = connection.into_parts()?;
    let Parkable { inner, .. } = parts.io.into_inner();
    let (mut unread, stream) = inner.into_parts();
    unread.extend_from_slice(&parts.read_buf);
    Some(Parked { unread, stream })
}

pin_project_lite::pin_project! {
    /// Waits, holding no buffer, until `stream` has bytes (or an end) to read. Ends with a close
    /// instead when the connection is silent past `deadline`, evicted to free its descriptor, or
    /// shutting down. `timer` is the connection's one timer, moved only when it must be
    /// ([`poll_deadline`]). Written out rather than an `async fn`: every parked connection holds it
    /// (112 bytes against 192).
    struct NextRequest<'a, S> {
        stream: &'a S,
        deadline: Instant,
        timer: &'a mut Option<Pin<Box<Sleep>>>,
        #[pin]
        cancelled: WaitForCancellationFuture<'a>,
        registration: &'a ParkedEntry<'a>,
    }
}

impl<S: ClientStream> Future for NextRequest<'_, S> {
    type Output = Wake;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Wake> {
        let this = self.project();
        if this.stream.tcp().poll_read_ready(cx).is_ready() {
            return Poll::Ready(Wake::Request);
        }
        if this.cancelled.poll(cx).is_ready() || this.registration.poll_evicted(cx) {
            return Poll::Ready(Wake::Close(None));
        }
        if poll_deadline(this.timer, *this.deadline, cx).is_ready() {
            return Poll::Ready(Wake::Close(Some(Timeout::KeepAliveIdle)));
        }
        Poll::Pending
    }
}
