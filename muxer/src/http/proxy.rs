//! Forwarding one request: canonical path → route → upstream, streaming both bodies, tunnelling
//! upgrades, and turning failures into short, honest status codes.
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST, RETRY_AFTER};

use super::target::RouteTarget;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio_util::either::Either;
use tracing::{debug, info};

use super::body::{BodyEnd, IdleTimeout, MinRate, Observed};
use super::headers;
use super::keepalive::{self, Activity};
use super::pool::{ConnectError, InUse, Pool, UpstreamConnection};
use super::router::Route;
use super::upstream::UpstreamBody;
use super::{HttpContext, RequestClient};
use crate::limits::{Class, ConnectionSlot, Refusal, Timeout};
use crate::metrics::HttpMetrics;

/// The body type of responses to clients.
pub(crate) type ResponseBody = UpstreamBody;

/// A short plain-text response.
pub(crate) fn text(status: StatusCode, message: String) -> Response<ResponseBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(message + "\n"))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// What the access log line and the metrics need, filled as the request goes.
struct Access {
    method: Method,
    host: Option<String>,
    path: String,
    route: Option<Arc<Route>>,
    /// Index of the upstream in the route's set.
    upstream: Option<usize>,
    started: Instant,
    /// Request body bytes, counted as the body streams (absent for bodiless requests).
    bytes_in: Option<Arc<AtomicU64>>,
    /// For requests answered before a route was found.
    metrics: Arc<HttpMetrics>,
    /// From sending upstream to the response head.
    upstream_latency: Option<Duration>,
}

impl Access {
    fn log(&self, status: StatusCode, bytes_out: u64, ttfb_ms: Option<u64>, end: &str) {
        let ttfb = ttfb_ms
            .map(Duration::from_millis)
            .or(Some(self.started.elapsed()));
        match &self.route {
            Some(route) => route
                .metrics
                .record(status.as_u16(), self.upstream_latency, ttfb),
            None => self
                .metrics
                .record("-", status.as_u16(), self.upstream_latency, ttfb),
        }
        let route = self.route.as_deref();
        info!(
            target: "muxer::access",
            method = %self.method,
            host = %self.host.as_deref().unwrap_or(""),
            path = %self.path,
            route = %route.map_or("-", |r| r.name.as_str()),
            upstream = %route
                .zip(self.upstream)
                .map_or("-", |(r, index)| r.upstreams.authority(index)),
            status = status.as_u16(),
            bytes_in = self.bytes_in.as_ref().map_or(0, |b| b.load(Ordering::Relaxed)),
            bytes_out,
            duration_ms = self.started.elapsed().as_millis() as u64,
            ttfb_ms = ttfb_ms.unwrap_or(0),
            end,
            "request"
        );
    }

    /// Logs and returns a locally generated response.
    fn local(&self, response: Response<ResponseBody>) -> Response<ResponseBody> {
        self.log(response.status(), 0, None, "local");
        response
    }
}

/// Why forwarding failed.
enum Failure {
    /// The upstream could not be reached (after the allowed retries).
    Unreachable,
    /// The upstream did not answer within the route's response timeout.
    Timeout,
    /// The request body exceeded the limit.
    BodyTooLarge,
    /// The connection to the upstream broke.
    Broken,
    /// The upstream has as many connections as allowed and no queued place freed in time.
    UpstreamFull,
}

fn caused_by<'a, E: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<E>() {
            return Some(found);
        }
        current = error.source();
    }
    None
}

/// A pooled connection the upstream had already closed: safe to retry when nothing of the
/// request body can have been consumed.
fn stale_connection(error: &hyper::Error) -> bool {
    if error.is_incomplete_message() || error.is_canceled() {
        return true;
    }
    caused_by::<std::io::Error>(error).is_some_and(|io| {
        matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        )
    })
}

/// Why an exchange with an upstream failed.
#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    /// No connection could be opened; the request comes back unsent.
    #[error("{0}")]
    Connect(ConnectError, Request<UpstreamBody>),
    /// The connection failed the request; the request comes back if it was never sent.
    #[error("{0}")]
    Request(hyper::Error, Option<Request<UpstreamBody>>),
    /// A pooled connection had been closed (or had broken) before it took the request, which
    /// comes back unsent: the upstream closed it while it sat idle.
    #[error("pooled connection closed before the request was sent")]
    Closed(Request<UpstreamBody>),
}

/// How many pooled connections one request may find closed before the next is counted as an
/// attempt (and the request goes on a new connection). Each takes no network round trip: the
/// connection's first poll reads the upstream's FIN before it writes anything.
const CLOSED_POOLED_TRIES: u32 = 4;

/// Sends `request` on a pooled connection to `pool`'s upstream (when `reuse`) or a new one, which
/// `in_use` drives, and waits for the response head.
///
/// A pooled connection takes the request at once, so the future is only the wait for the
/// response; opening a connection is rare next to reusing one, and its state is boxed rather
/// than sizing every request's (see [`handle`]).
///
/// A pooled connection is not checked before it is used: the upstream may have closed it while
/// it was idle, but then its first poll reads the end of stream before writing the request,
/// and hyper hands the request back unsent ([`ExchangeError::Closed`]). Checking it first, by
/// polling it without a task to wake, cost 760 instructions a keep-alive request (callgrind,
/// 2.5 % of muxer's), and the answer could still be stale by the time the request was written.
fn exchange<'a>(
    pool: &'a Arc<Pool>,
    reuse: bool,
    request: Request<UpstreamBody>,
    in_use: &'a InUse,
) -> impl Future<Output = Result<Response<Incoming>, ExchangeError>> + Send + 'a {
    let pooled = if reuse { pool.checkout() } else { None };
    match pooled {
        Some(connection) => Either::Left(answer(connection, request, in_use, true)),
        None => Either::Right(Box::pin(async move {
            match pool.connect().await {
                Ok(connection) => answer(connection, request, in_use, false).await,
                Err(error) => Err(ExchangeError::Connect(error, request)),
            }
        })),
    }
}

/// Queues `request` on `connection` (taken from the pool when `pooled`), hands the connection
/// to `in_use` to drive, and returns the wait for the response head.
fn answer(
    mut connection: UpstreamConnection,
    request: Request<UpstreamBody>,
    in_use: &InUse,
    pooled: bool,
) -> impl Future<Output = Result<Response<Incoming>, ExchangeError>> + Send + use<> {
    let response = connection.send(request);
    in_use.adopt(connection);
    async move {
        response
            .await
            .map_err(|mut error| match error.take_message() {
                Some(unsent) if pooled => ExchangeError::Closed(unsent),
                returned => ExchangeError::Request(error.into_error(), returned),
            })
    }
}

/// A request as it is forwarded: hyper's, its body taken out when it is wrapped for the upstream.
/// The handler works on it in place rather than on its parts, so that it is stored once.
type Forwarded = Request<Option<Incoming>>;

/// Serves one request from `client`; the future is boxed, as hyper moves the future it is
/// handed.
///
/// Every request's handler state is allocated, written and read once per request, and its size
/// showed in callgrind as copies and cache misses (3.3 KiB before, with each argument stored
/// twice, as an `async fn` does, and the state of a CONNECT tunnel and of opening an upstream
/// connection inline). The phases are therefore plain functions around one `async` block
/// that keeps only what lives across its awaits.
pub(crate) fn handle(
    request: Request<Incoming>,
    context: Arc<HttpContext>,
    client: RequestClient,
    in_use: InUse,
    activity: &Arc<Activity>,
) -> Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send>> {
    // Dropped without `complete` (any early answer): the connection is never parked.
    let request_body =
        (!request.body().is_end_stream()).then(|| keepalive::RequestBody::new(activity));
    if request.method() == Method::CONNECT {
        return Box::pin(async move {
            let _request_body = request_body;
            super::tunnel::connect(request, context, client).await
        });
    }
    Box::pin(forward(
        request.map(Some),
        context,
        client,
        in_use,
        request_body,
    ))
}

/// Routes, checks and forwards a request that is not CONNECT.
#[expect(
    clippy::manual_async_fn,
    reason = "an `async fn` stores each argument it holds across an await twice"
)]
fn forward(
    mut request: Forwarded,
    context: Arc<HttpContext>,
    client: RequestClient,
    in_use: InUse,
    request_body: Option<keepalive::RequestBody>,
) -> impl Future<Output = Response<ResponseBody>> + Send + 'static {
    async move {
        let (mut access, route, host) = match route_request(&request, &context, client.tls) {
            Ok(routed) => routed,
            Err(local) => return *local,
        };
        if let Some(refused) = authorize(&mut request, &route, &context, &client).await {
            return access.local(refused);
        }
        let upstream =
            match prepare_upstream(&mut request, &route, &context, &client, &host, &access.path) {
                Ok(upstream) => upstream,
                Err(refused) => return access.local(*refused),
            };
        let bodiless = request.body().as_ref().is_none_or(Body::is_end_stream);
        let body = match request.body_mut().take().filter(|_| !bodiless) {
            // A bodiless request needs no body adapters (nor their timer and counter).
            None => empty(),
            Some(body) => {
                let bytes_in = Arc::new(AtomicU64::new(0));
                access.bytes_in = Some(Arc::clone(&bytes_in));
                request_body_adapters(body, &context, &client.slot, bytes_in, request_body)
            }
        };
        let attempts = Attempts {
            route: &route,
            in_use: &in_use,
            slot: &client.slot,
            target: &upstream.target,
            name_upstream: route.host_header.is_none() && host.raw.is_none(),
        };
        let limit = context.settings.max_body_bytes;
        match attempts
            .send(body, &mut request, bodiless, &mut access)
            .await
        {
            Ok((response, answered)) => respond(
                response,
                answered,
                access,
                upstream,
                (route, &context, client.slot),
            ),
            Err(failure) => access.local(failure_response(failure, &route, limit)),
        }
    }
}

/// A request's local answer instead of its forwarding: boxed, as it is rare and large.
type Refused = Box<Response<ResponseBody>>;

/// The authority a request was routed on.
struct RoutedHost {
    /// As sent (absolute-form target, `:authority` or Host), forwarded as Host.
    raw: Option<HeaderValue>,
    /// Whether it came from the request target rather than a Host header.
    from_target: bool,
}

/// The request's route, or the local answer when it has none or may not use it; starts its
/// access record.
fn route_request(
    request: &Forwarded,
    context: &HttpContext,
    tls: bool,
) -> Result<(Access, Arc<Route>, RoutedHost), Refused> {
    let target = RouteTarget::of(request.uri(), request.headers());
    let mut access = Access {
        method: request.method().clone(),
        host: target.host,
        path: target.path,
        route: None,
        upstream: None,
        started: Instant::now(),
        bytes_in: None,
        metrics: Arc::clone(&context.metrics),
        upstream_latency: None,
    };
    if let Some(refusal) = target.refused {
        return Err(Box::new(access.local(text(
            StatusCode::BAD_REQUEST,
            format!("400 bad request: {refusal}"),
        ))));
    }
    let Some(route) = context
        .router
        .find(access.host.as_deref(), &access.path)
        .cloned()
    else {
        return Err(Box::new(access.local(text(
            StatusCode::NOT_FOUND,
            "404 no route for this host and path".into(),
        ))));
    };
    access.route = Some(Arc::clone(&route));
    if route.require_tls && !tls {
        return Err(Box::new(access.local(text(
            StatusCode::FORBIDDEN,
            "403 this route is served over HTTPS only: use https://".into(),
        ))));
    }
    let host = RoutedHost {
        raw: target.raw_host,
        from_target: target.target_authority,
    };
    Ok((access, route, host))
}

/// Checks the API key of a request on a route that wants one: the refusal to send, if any.
/// Removes the credentials unless the route keeps them.
async fn authorize(
    request: &mut Forwarded,
    route: &Route,
    context: &HttpContext,
    client: &RequestClient,
) -> Option<Response<ResponseBody>> {
    let keys = route.auth.as_ref()?;
    let network = client.slot.limits().source_network(client.peer.ip());
    if context.auth_failures.throttled(network) {
        let mut response = text(
            StatusCode::TOO_MANY_REQUESTS,
            "429 too many requests without a valid API key from this network; retry later".into(),
        );
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("60"));
        return Some(response);
    }
    if !keys.admit(request.headers()).await {
        context.auth_failures.record(network);
        return Some(keys.unauthorized());
    }
    if !keys.keep_credentials {
        request.headers_mut().remove(AUTHORIZATION);
    }
    None
}

/// What a checked request carries to its upstream, besides the request itself.
struct Upstream {
    /// The origin-form target sent upstream.
    target: Uri,
    /// The protocol the client asked to switch to, if it may.
    upgrade: Option<HeaderValue>,
    /// The client's side of that switch.
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
}

/// Checks the body's declared length and any protocol switch, rewrites the headers for the
/// upstream, and works out the target sent there; or the refusal to send.
fn prepare_upstream(
    request: &mut Forwarded,
    route: &Route,
    context: &HttpContext,
    client: &RequestClient,
    host: &RoutedHost,
    path: &str,
) -> Result<Upstream, Refused> {
    let limit = context.settings.max_body_bytes;
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(Box::new(failure_response(
            Failure::BodyTooLarge,
            route,
            limit,
        )));
    }
    let upgrade = upgrade_to_forward(request, route)?;
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut *request));
    let headers = request.headers_mut();
    headers::strip_hop_by_hop(headers);
    let trusted = context.settings.trusts(client.peer.ip());
    headers::set_forwarded(
        headers,
        client.peer.ip(),
        host.raw.clone(),
        (trusted, client.tls),
    );
    match (&route.host_header, &host.raw) {
        (Some(value), _) => {
            headers.insert(HOST, value.clone());
        }
        // HTTP/2 clients send :authority instead of Host; an HTTP/1.1 upstream needs Host. An
        // absolute-form target's authority replaces the client's Host.
        (None, Some(value)) if host.from_target || !headers.contains_key(HOST) => {
            headers.insert(HOST, value.clone());
        }
        _ => {}
    }
    if let Some(protocol) = upgrade.clone() {
        headers::set_upgrade(headers, protocol);
    }
    let Some(target) = upstream_target(request.uri(), route.forwarded_path(path)) else {
        return Err(Box::new(text(
            StatusCode::BAD_REQUEST,
            "400 bad request: unusable request target".into(),
        )));
    };
    Ok(Upstream {
        target,
        upgrade,
        client_upgrade,
    })
}

/// The protocol switch a request asks for and may have forwarded, or the refusal. `h2c` is
/// never forwarded: its Upgrade is dropped and the request served as plain HTTP/1.1 (RFC 9110
/// §7.8 lets a server ignore Upgrade), so nothing skips the router as HTTP/2.
fn upgrade_to_forward(
    request: &mut Forwarded,
    route: &Route,
) -> Result<Option<HeaderValue>, Refused> {
    let Some(protocol) = headers::upgrade_requested(request.headers())
        .filter(|_| request.version() == Version::HTTP_11)
    else {
        return Ok(None);
    };
    let asked = protocol.to_str().unwrap_or("").trim();
    if asked.eq_ignore_ascii_case("h2c") {
        headers::drop_h2c_upgrade(request.headers_mut());
        return Ok(None);
    }
    if !route.allows_upgrade(asked) {
        return Err(Box::new(text(
            StatusCode::BAD_REQUEST,
            format!(
                "400 bad request: upgrading to {asked:?} is not allowed on route {} (http.route[].upgrades)",
                route.name
            ),
        )));
    }
    Ok(Some(protocol))
}

/// The origin-form target (`/path?query`) sent upstream, with `forwarded_path` (the canonical
/// path, rewritten for the route): the upstream connection is already chosen. `None` when that
/// makes no valid target.
fn upstream_target(uri: &Uri, forwarded_path: &str) -> Option<Uri> {
    match (uri.path_and_query(), uri.query()) {
        // Path unchanged (already canonical, no prefix stripped): the client's own target,
        // shared rather than copied.
        (Some(original), _) if original.path() == forwarded_path => {
            Some(Uri::from(original.clone()))
        }
        (_, Some(query)) => Uri::try_from(format!("{forwarded_path}?{query}")).ok(),
        (_, None) => Uri::try_from(forwarded_path).ok(),
    }
}

/// The request body as sent upstream: limited in size, cut when idle or too slow, counted into
/// `bytes_in`; read to its end, it lets the connection be parked again (`watch`).
fn request_body_adapters(
    body: Incoming,
    context: &HttpContext,
    slot: &Arc<ConnectionSlot>,
    bytes_in: Arc<AtomicU64>,
    watch: Option<keepalive::RequestBody>,
) -> UpstreamBody {
    let settings = &context.settings;
    let trickle_slot = Arc::clone(slot);
    Observed::new(
        MinRate::new(
            IdleTimeout::new(
                Limited::new(body, settings.max_body_bytes as usize),
                settings.body_idle_timeout,
            ),
            settings.body_min_rate,
            settings.body_rate_grace,
            move || trickle_slot.limits().count_timeout(Timeout::BodyTooSlow),
        ),
        bytes_in,
        move |end| {
            if let (BodyEnd::Complete, Some(watch)) = (end, watch) {
                watch.complete();
            }
        },
    )
    .boxed_unsync()
}

/// What every attempt to send one request shares.
struct Attempts<'a> {
    route: &'a Route,
    in_use: &'a InUse,
    slot: &'a ConnectionSlot,
    target: &'a Uri,
    /// The client sent no Host (HTTP/1.0): each attempt names its upstream, as HTTP/1.1 requires.
    name_upstream: bool,
}

impl Attempts<'_> {
    /// Sends `request` with `body` to one of the route's upstreams and waits for the response head, trying a
    /// second upstream once when the first never received the request, or when a pooled
    /// connection turned out closed and the request may be sent twice; notes the upstream and
    /// its latency in `access`. The response comes with when it arrived.
    async fn send(
        &self,
        body: UpstreamBody,
        request: &mut Forwarded,
        bodiless: bool,
        access: &mut Access,
    ) -> Result<(Response<Incoming>, Instant), Failure> {
        let route = self.route;
        let mut attempt = 0;
        let mut closed_pooled = 0;
        // The request the next attempt sends, moved into its exchange so that it is not kept
        // beside it while the upstream answers: a retry sends the request an exchange handed
        // back unsent, or builds it again, so only a bodiless one keeps its headers.
        let mut next = attempt_request(request, self.target, body, bodiless);
        loop {
            let index = route.upstreams.pick();
            access.upstream = Some(index);
            let sent_at = Instant::now();
            let sent = {
                let mut upstream_request = next;
                if self.name_upstream {
                    if let Ok(value) = HeaderValue::from_str(route.upstreams.authority(index)) {
                        upstream_request.headers_mut().insert(HOST, value);
                    }
                }
                // The retry goes on a new connection: a second pooled one may be just as stale.
                exchange(
                    route.upstreams.pool(index),
                    attempt == 0,
                    upstream_request,
                    self.in_use,
                )
            };
            let result = match route.response_timeout {
                Some(limit) => match tokio::time::timeout(limit, sent).await {
                    Ok(result) => result,
                    Err(_) => return Err(Failure::Timeout),
                },
                None => sent.await,
            };
            let error = match result {
                Ok(response) => {
                    let answered = Instant::now();
                    access.upstream_latency = Some(answered.duration_since(sent_at));
                    return Ok((response, answered));
                }
                Err(error) => error,
            };
            debug!(route = %route.name, upstream = route.upstreams.authority(index), error = %error, "upstream request failed");
            let retry = match error {
                // Not an attempt: nothing reached the upstream, and another pooled connection
                // (or a new one) is tried.
                ExchangeError::Closed(unsent) if closed_pooled < CLOSED_POOLED_TRIES => {
                    closed_pooled += 1;
                    next = unsent;
                    continue;
                }
                ExchangeError::Closed(unsent) if attempt == 0 => unsent,
                ExchangeError::Closed(_) => return Err(Failure::Broken),
                ExchangeError::Connect(ConnectError::Full { .. }, _) => {
                    self.slot.limits().count_refusal(Refusal::UpstreamFull);
                    return Err(Failure::UpstreamFull);
                }
                ExchangeError::Connect(_, unsent) => {
                    route.upstreams.mark_failed(index);
                    if attempt > 0 || route.upstreams.len() < 2 {
                        return Err(Failure::Unreachable);
                    }
                    unsent
                }
                ExchangeError::Request(error, returned) => {
                    if caused_by::<LengthLimitError>(&error).is_some() {
                        return Err(Failure::BodyTooLarge);
                    }
                    match returned {
                        Some(unsent) if attempt == 0 => unsent,
                        None if attempt == 0
                            && bodiless
                            && idempotent(request.method())
                            && stale_connection(&error) =>
                        {
                            attempt_request(request, self.target, empty(), false)
                        }
                        _ => return Err(Failure::Broken),
                    }
                }
            };
            attempt += 1;
            next = retry;
        }
    }
}

/// The client's response to the upstream's `response`: a switched protocol becomes a tunnel,
/// anything else is streamed back, logged when its body ends.
fn respond(
    mut response: Response<Incoming>,
    answered: Instant,
    access: Access,
    upstream: Upstream,
    (route, context, slot): (Arc<Route>, &HttpContext, Arc<ConnectionSlot>),
) -> Response<ResponseBody> {
    // One clock read serves both figures.
    let ttfb_ms = answered.duration_since(access.started).as_millis() as u64;
    let status = response.status();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        let accepted = upstream
            .upgrade
            .as_ref()
            .is_some_and(|protocol| headers::upgrade_accepted(protocol, response.headers()));
        if !accepted {
            // A 101 nobody asked for, or for another protocol: it must not open a raw tunnel
            // past the router, the limits and the logs.
            return access.local(text(
                StatusCode::BAD_GATEWAY,
                format!(
                    "502 bad gateway: the upstream of route {} switched to a protocol the client did not ask for",
                    route.name
                ),
            ));
        }
        if let (Some(client_upgrade), Some(protocol)) = (upstream.client_upgrade, upstream.upgrade)
        {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(tunnel(
                client_upgrade,
                upstream_upgrade,
                route.name.clone(),
                slot,
                context.settings.tunnel_idle_timeout,
            ));
            let (mut parts, _) = response.into_parts();
            headers::strip_hop_by_hop(&mut parts.headers);
            headers::set_upgrade(&mut parts.headers, protocol);
            access.log(status, 0, Some(ttfb_ms), "upgraded");
            return Response::from_parts(parts, empty());
        }
    }

    let (mut parts, body) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    let bytes_out = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&bytes_out);
    let body = Observed::new(
        IdleTimeout::new(body, context.settings.body_idle_timeout),
        counted,
        move |end: BodyEnd| {
            access.log(
                status,
                bytes_out.load(Ordering::Relaxed),
                Some(ttfb_ms),
                end.as_str(),
            )
        },
    );
    Response::from_parts(parts, body.boxed_unsync())
}

/// The request one attempt sends upstream: `request`'s method and headers, `target`, HTTP/1.1.
/// The headers are cloned when `keep_headers` (the request may be built again for a retry),
/// taken otherwise.
fn attempt_request(
    request: &mut Forwarded,
    target: &Uri,
    body: UpstreamBody,
    keep_headers: bool,
) -> Request<UpstreamBody> {
    let mut upstream = Request::new(body);
    *upstream.method_mut() = request.method().clone();
    *upstream.uri_mut() = target.clone();
    *upstream.version_mut() = Version::HTTP_11;
    *upstream.headers_mut() = if keep_headers {
        request.headers().clone()
    } else {
        std::mem::take(request.headers_mut())
    };
    upstream
}

/// Whether a request may be sent twice (RFC 9110 §9.2.2): only those are retried when a pooled
/// connection turns out to have been closed after the request may have reached the upstream.
fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

fn empty() -> UpstreamBody {
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn failure_response(failure: Failure, route: &Route, limit: u64) -> Response<ResponseBody> {
    match failure {
        Failure::Unreachable => text(
            StatusCode::BAD_GATEWAY,
            format!(
                "502 bad gateway: the upstream of route {} is unreachable",
                route.name
            ),
        ),
        Failure::Broken => text(
            StatusCode::BAD_GATEWAY,
            format!(
                "502 bad gateway: the upstream of route {} closed the connection",
                route.name
            ),
        ),
        Failure::Timeout => text(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "504 gateway timeout: the upstream of route {} did not answer in time",
                route.name
            ),
        ),
        Failure::BodyTooLarge => text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("413 request body larger than {limit} bytes"),
        ),
        Failure::UpstreamFull => {
            let mut response = text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "503 service unavailable: the upstream of route {} is at its connection limit",
                    route.name
                ),
            );
            response
                .headers_mut()
                .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
    }
}

/// Joins an upgraded client connection to the upgraded upstream connection. The connection keeps
/// its slot (now in the upgraded class) until the tunnel closes, silent `idle` at the most.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    route: String,
    slot: Arc<ConnectionSlot>,
    idle: Duration,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(error) => {
            debug!(%route, %error, "upgrade failed");
            return;
        }
    };
    // HTTP to upgraded: both in the shared pool, so this cannot be refused.
    let _ = slot.classify(Class::Upgraded);
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    let joined = super::tunnel::join(&mut client, &mut upstream, idle).await;
    if joined.idle_timeout {
        slot.limits().count_timeout(Timeout::TunnelIdle);
    }
    info!(target: "muxer::access", %route, bytes_in = joined.client_to_upstream, bytes_out = joined.upstream_to_client, end = joined.end(), "upgraded connection closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_idempotent_methods_are_retried() {
        for method in ["GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"] {
            assert!(idempotent(&method.parse().unwrap()), "{method}");
        }
        for method in ["POST", "PATCH", "CONNECT", "LLM-GENERATE"] {
            assert!(!idempotent(&method.parse().unwrap()), "{method}");
        }
    }
}
