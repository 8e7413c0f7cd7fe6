//! The HTTP router: serves a sniffed HTTP connection with hyper (HTTP/1.1 and HTTP/2 cleartext)
//! and forwards each request to its route's upstream. Layers, in request order: [`stream`] (the
//! sniffed bytes replayed), [`path`] (one canonical path), [`router`] (route choice), [`headers`]
//! (hop-by-hop, forwarding headers), [`proxy`] (forwarding, upgrades, errors), [`upstream`]
//! (round robin, passive health), [`pool`] (upstream connections,
//! driven by the client connection's task; their writes [`batch`]ed per wake-up), [`body`]
//! (streaming adapters).

pub mod auth;
pub(crate) mod batch;
pub(crate) mod body;
pub(crate) mod headers;
pub(crate) mod keepalive;
pub mod path;
pub mod pool;
pub(crate) mod proxy;
pub mod router;
pub(crate) mod stream;
pub mod target;
pub(crate) mod throttle;
pub(crate) mod tunnel;
pub(crate) mod upstream;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use stream::ClientStream;
use tokio_util::sync::CancellationToken;

use crate::config::{Http, Tunnel};
use crate::limits::{ConnectionSlot, Timeout};
use crate::metrics::HttpMetrics;
use crate::sniff::HttpVersion;

/// One client connection as the router sees it.
#[derive(Debug)]
pub struct ClientConnection {
    /// The client's address (from a trusted PROXY header, or the TCP peer).
    pub peer: SocketAddr,
    /// Bytes moved, for the connection's log line.
    pub traffic: Arc<stream::Traffic>,
    /// The connection's place under the limits; a tunnel or upgrade it becomes keeps it.
    pub slot: Arc<ConnectionSlot>,
    /// Whether muxer terminated TLS for it (HTTPS).
    pub tls: bool,
}

/// What each request's handler knows of its client connection.
#[derive(Clone, Debug)]
pub struct RequestClient {
    /// The client's address.
    pub peer: SocketAddr,
    /// The local address the client reached.
    pub local: SocketAddr,
    /// The connection's slot, handed to the tunnel a request may open.
    pub slot: Arc<ConnectionSlot>,
    /// Whether the request came over HTTPS.
    pub tls: bool,
}

/// How long an HTTP/2 connection whose idle timer fired may take to close gracefully: h2 sends
/// GOAWAY and a PING and waits for the PING's answer, which a silent client never sends.
const HTTP2_CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Closes an HTTP/2 connection that opens no stream in time, or keeps none open for too long.
/// Armed whenever no request is in flight; a request started since re-arms it.
struct Http2Idle {
    first_request: std::time::Duration,
    idle: std::time::Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The request count when the timer was last armed; `None` while a request is in flight.
    armed_at: Option<usize>,
    fired: bool,
}

impl Http2Idle {
    fn new(first_request: std::time::Duration, idle: std::time::Duration) -> Self {
        Http2Idle {
            first_request,
            idle,
            sleep: None,
            armed_at: None,
            fired: false,
        }
    }

    /// What to do with the waiting connection: shut it down when a timeout fires (counted in
    /// `limits`), drop it if it has not closed [`HTTP2_CLOSE_GRACE`] later.
    fn poll_idle(
        &mut self,
        cx: &mut std::task::Context<'_>,
        activity: &keepalive::Activity,
        limits: &crate::limits::ConnectionLimits,
    ) -> WhenIdle {
        match self.poll_expired(cx, activity) {
            Some(timeout) => {
                limits.count_timeout(timeout);
                let grace = tokio::time::Instant::now() + HTTP2_CLOSE_GRACE;
                if let Some(sleep) = &mut self.sleep {
                    sleep.as_mut().reset(grace);
                }
                WhenIdle::ShutDown
            }
            None if self.fired => {
                let grace_over = self
                    .sleep
                    .as_mut()
                    .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
                if grace_over {
                    WhenIdle::Drop
                } else {
                    WhenIdle::Wait
                }
            }
            None => WhenIdle::Wait,
        }
    }

    /// Which timeout fired, once.
    fn poll_expired(
        &mut self,
        cx: &mut std::task::Context<'_>,
        activity: &keepalive::Activity,
    ) -> Option<Timeout> {
        if self.fired {
            return None;
        }
        if !activity.is_idle() {
            self.armed_at = None;
            return None;
        }
        let started = activity.started();
        if self.armed_at != Some(started) {
            self.armed_at = Some(started);
            let limit = if started == 0 {
                self.first_request
            } else {
                self.idle
            };
            let deadline = tokio::time::Instant::now() + limit;
            match &mut self.sleep {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let sleep = self.sleep.as_mut()?;
        if sleep.as_mut().poll(cx).is_pending() {
            return None;
        }
        self.fired = true;
        Some(if started == 0 {
            Timeout::Http2FirstRequest
        } else {
            Timeout::Http2Idle
        })
    }
}

/// Which timeout ended a connection whose serving returned `result`, if one did. An HTTP/1
/// request head's limit is not hyper's: `keepalive` keeps it and counts it where it fires.
fn timeout_of(
    result: &Result<(), hyper::Error>,
    traffic: &stream::Traffic,
    version: HttpVersion,
) -> Option<Timeout> {
    if traffic.write_stalled() {
        return Some(Timeout::WriteStalled);
    }
    match (result, version) {
        (Err(error), HttpVersion::Http2PriorKnowledge) if error.is_timeout() => {
            Some(Timeout::Http2Ping)
        }
        _ => None,
    }
}

/// Everything the router needs, built once per configuration.
#[derive(Debug)]
pub struct HttpContext {
    /// Limits and timeouts.
    pub settings: Http,
    /// The routing table.
    pub router: router::Router,
    /// Named tunnels for `CONNECT`.
    pub tunnels: tunnel::Tunnels,
    /// Requests refused for a missing or wrong API key, per source network.
    pub(crate) auth_failures: throttle::Failures,
    /// TCP keepalive for tunnel upstream sockets (`splice.tcp_keepalive`).
    pub tcp_keepalive: std::time::Duration,
    /// Per-request metrics.
    pub metrics: Arc<HttpMetrics>,
}

impl HttpContext {
    /// Compiles `[http]` and `[[tunnel]]`.
    pub fn new(
        settings: Http,
        tunnels: &[Tunnel],
        tcp_keepalive: std::time::Duration,
        workers: usize,
        metrics: Arc<HttpMetrics>,
    ) -> HttpContext {
        let router = router::Router::new(
            &settings.routes,
            settings.failure_cooldown,
            pool::PoolSettings {
                connect_timeout: settings.connect_timeout,
                idle_timeout: settings.pool_idle_timeout,
                tcp_keepalive,
                workers,
                max_connections: settings.max_connections_per_upstream,
                queue: settings.upstream_queue,
                queue_timeout: settings.upstream_queue_timeout,
            },
            &metrics,
        );
        HttpContext {
            tcp_keepalive,
            metrics,
            router,
            tunnels: tunnel::Tunnels::new(tunnels),
            auth_failures: throttle::Failures::default(),
            settings,
        }
    }
}

/// What [`drive`] does with a waiting connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WhenIdle {
    /// Keep waiting.
    Wait,
    /// End it gracefully (hyper closes an idle HTTP/1 connection at once; HTTP/2 sends GOAWAY).
    ShutDown,
    /// Drop it now: a graceful end did not come in time.
    Drop,
}

/// Drives a hyper server connection, and the upstream connections its requests use, until it
/// ends; on shutdown, lets in-flight requests finish and closes it. Whenever the connection waits,
/// `idle` is asked what to do with it.
async fn drive<C>(
    connection: &mut C,
    in_use: &pool::InUse,
    shutdown: &CancellationToken,
    mut idle: impl FnMut(&mut std::task::Context<'_>) -> WhenIdle,
) -> Result<(), hyper::Error>
where
    C: Future<Output = Result<(), hyper::Error>> + GracefulShutdown + Unpin,
{
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    let mut shutting_down = false;
    std::future::poll_fn(|cx| {
        if !shutting_down && cancelled.as_mut().poll(cx).is_ready() {
            shutting_down = true;
            connection.shut_down_gracefully();
        }
        let polled =
            pool::poll_with_upstreams(in_use, cx, |cx| Pin::new(&mut *connection).poll(cx));
        if polled.is_pending() && !shutting_down {
            match idle(cx) {
                WhenIdle::Wait => {}
                WhenIdle::ShutDown => {
                    connection.shut_down_gracefully();
                    return Pin::new(&mut *connection).poll(cx);
                }
                WhenIdle::Drop => return Poll::Ready(Ok(())),
            }
        }
        polled
    })
    .await
}

/// hyper's graceful shutdown, for [`drive`].
trait GracefulShutdown {
    fn shut_down_gracefully(&mut self);
}

impl<C, S> GracefulShutdown for Box<http1::UpgradeableConnection<keepalive::ClientIo<C>, S>>
where
    C: ClientStream,
    S: HttpService<Incoming, ResBody = keepalive::Tracked, Error = Infallible>,
{
    fn shut_down_gracefully(&mut self) {
        Pin::new(&mut **self).graceful_shutdown();
    }
}

impl<C, S> GracefulShutdown
    for Box<http2::Connection<TokioIo<stream::Replayed<C>>, S, TokioExecutor>>
where
    C: ClientStream,
    S: HttpService<Incoming, ResBody = keepalive::Tracked, Error = Infallible>,
    S::Future: Send + 'static,
{
    fn shut_down_gracefully(&mut self) {
        Pin::new(&mut **self).graceful_shutdown();
    }
}

/// A connection's last response is corked to leave with its FIN when it is at most this long
/// (see [`keepalive::Activity::cork_last_response`]).
const CORK_LIMIT: u64 = 16 * 1024;

/// Whether `request` is its connection's last and its response the last bytes written to the
/// client: not a tunnel (CONNECT) or protocol upgrade, which keep writing after the response.
fn last_plain_request<B>(request: &hyper::Request<B>) -> bool {
    headers::last_on_connection(request.version(), request.headers())
        && request.method() != hyper::Method::CONNECT
        && !request.headers().contains_key(hyper::header::UPGRADE)
}

/// Whether a response body's length is known and at most [`CORK_LIMIT`].
fn short(body: &impl hyper::body::Body) -> bool {
    body.size_hint()
        .exact()
        .is_some_and(|len| len <= CORK_LIMIT)
}

/// The router a request uses: whichever the last reload installed (none while no `[http]` or
/// tunnel is configured).
pub(crate) type CurrentRouter = Arc<arc_swap::ArcSwapOption<HttpContext>>;

/// What an HTTP connection gets from the daemon: the current router and the shutdown signal.
pub(crate) struct Handles {
    /// The router of the last reload.
    pub(crate) current: CurrentRouter,
    /// Fired on SIGTERM: in-flight requests finish, then the connection closes.
    pub(crate) shutdown: tokio_util::sync::CancellationToken,
}

/// What every hyper connection of one client connection is built from: the client as requests
/// see it, the router, and the daemon's handles. Kept while the connection is parked.
pub(crate) struct Served {
    client: ClientConnection,
    context: Arc<HttpContext>,
    handles: Handles,
}

impl Served {
    /// The limits the connection counts under.
    fn limits(&self) -> &crate::limits::ConnectionLimits {
        self.client.slot.limits()
    }

    /// Counts the timeout that ended the connection, if one did (`result`: how serving ended).
    fn count_timeout(&self, result: &Result<(), hyper::Error>, version: HttpVersion) {
        if let Some(timeout) = timeout_of(result, &self.client.traffic, version) {
            self.limits().count_timeout(timeout);
        }
    }

    /// The request service for one hyper connection (HTTP/1 round or HTTP/2 connection) on the
    /// client socket `tcp`.
    fn service(
        &self,
        tcp: &tokio::net::TcpStream,
        in_use: &pool::InUse,
        activity: &Arc<keepalive::Activity>,
    ) -> impl HttpService<
        Incoming,
        ResBody = keepalive::Tracked,
        Error = Infallible,
        Future: Send + 'static,
    > + Unpin
           + Send {
        let local = tcp
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let current = Arc::clone(&self.handles.current);
        let context = Arc::clone(&self.context);
        let request_client = RequestClient {
            peer: self.client.peer,
            local,
            slot: Arc::clone(&self.client.slot),
            tls: self.client.tls,
        };
        let in_use = in_use.clone();
        let activity = Arc::clone(activity);
        hyper::service::service_fn(move |request| {
            let current = current.load_full().unwrap_or_else(|| Arc::clone(&context));
            activity.request_started();
            let last = last_plain_request(&request);
            let in_flight = activity.begin();
            let handled = proxy::handle(
                request,
                current,
                request_client.clone(),
                in_use.clone(),
                &activity,
            );
            let last = last.then(|| Arc::clone(&activity));
            async move {
                let response = handled.await;
                if let Some(activity) = last.filter(|_| short(response.body())) {
                    activity.cork_last_response();
                }
                Ok::<_, Infallible>(response.map(|body| keepalive::Tracked::new(body, in_flight)))
            }
        })
    }
}

/// Serves HTTP on `client` (whose first bytes, `prefix`, were already read) until it closes, or
/// until shutdown, when in-flight requests finish and the connection closes. `version` is what
/// the sniffer saw, so no second detection runs. Each request uses the router current when it
/// arrives, so a reload applies to open keep-alive connections too.
///
/// The future owns everything it needs, to run as a task of its own: an idle HTTP/1 connection
/// is parked as that task (see [`keepalive`]), so nothing else may size it.
pub(crate) fn serve<C: ClientStream>(
    client: C,
    prefix: Vec<u8>,
    connection: ClientConnection,
    context: Arc<HttpContext>,
    handles: Handles,
    version: HttpVersion,
) -> impl Future<Output = Result<(), hyper::Error>> + Send + 'static {
    let served = Served {
        client: connection,
        context,
        handles,
    };
    match version {
        HttpVersion::Http1 => {
            let parked = keepalive::Parked {
                unread: prefix,
                stream: client,
            };
            tokio_util::either::Either::Left(keepalive::serve(parked, served))
        }
        // Boxed: HTTP/2's connection state then does not size every HTTP/1 connection.
        HttpVersion::Http2PriorKnowledge => {
            tokio_util::either::Either::Right(Box::pin(serve_http2(client, prefix, served)))
        }
    }
}

/// Serves an HTTP/2 (prior knowledge) connection until it closes.
async fn serve_http2<C: ClientStream>(
    client: C,
    prefix: Vec<u8>,
    served: Served,
) -> Result<(), hyper::Error> {
    let settings = &served.context.settings;
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(settings.max_header_bytes as u32)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .keep_alive_interval(Some(settings.ping_interval))
        .keep_alive_timeout(settings.ping_timeout);
    let in_use = pool::InUse::default();
    let activity = Arc::new(keepalive::Activity::default());
    let service = served.service(client.tcp(), &in_use, &activity);
    let io = TokioIo::new(
        stream::Replayed::new(prefix, client, Arc::clone(&served.client.traffic))
            .with_write_timeout(settings.write_timeout),
    );
    let mut connection = Box::new(builder.serve_connection(io, service));
    // The first stream must open within the request head's time, like an HTTP/1 request; later
    // silences get the keep-alive idle time.
    let mut timer = Http2Idle::new(settings.header_read_timeout, settings.idle_timeout());
    let limits = served.limits();
    let result = drive(&mut connection, &in_use, &served.handles.shutdown, |cx| {
        timer.poll_idle(cx, &activity, limits)
    })
    .await;
    served.count_timeout(&result, HttpVersion::Http2PriorKnowledge);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_last_requests_and_short_known_bodies_are_corked() {
        let request = |method: &str, upgrade: bool| {
            let mut builder = hyper::Request::builder()
                .method(method)
                .uri("/")
                .header(hyper::header::CONNECTION, "close");
            if upgrade {
                builder = builder.header(hyper::header::UPGRADE, "websocket");
            }
            builder.body(()).unwrap()
        };
        assert!(last_plain_request(&request("GET", false)));
        assert!(!last_plain_request(&request("GET", true)));
        assert!(!last_plain_request(&request("CONNECT", false)));
        let keep_alive = hyper::Request::builder().uri("/").body(()).unwrap();
        assert!(!last_plain_request(&keep_alive));

        let full = |len: usize| http_body_util::Full::new(bytes::Bytes::from(vec![b'x'; len]));
        assert!(short(&full(CORK_LIMIT as usize)));
        assert!(!short(&full(CORK_LIMIT as usize + 1)));
        assert!(!short(&Streamed), "unknown length");
    }

    /// A body of unknown length, like a streamed response.
    struct Streamed;

    impl hyper::body::Body for Streamed {
        type Data = bytes::Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>>>
        {
            std::task::Poll::Ready(None)
        }
    }
}
