//! Forwarding one request: canonical path → route → upstream, streaming both bodies, tunnelling
//! upgrades, and turning failures into short, honest status codes.
use std::convert::Infallible;
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
use tracing::{debug, info};

use super::body::{BodyEnd, IdleTimeout, MinRate, Observed};
use super::headers;
use super::keepalive::{self, Activity};
use super::pool::{ConnectError, InUse, Pool};
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
}

/// Sends `request` on a pooled connection to `pool`'s upstream (when `reuse`) or a new one, which
/// `in_use` drives, and waits for the response head.
async fn exchange(
    pool: &Arc<Pool>,
    reuse: bool,
    request: Request<UpstreamBody>,
    in_use: &InUse,
) -> Result<Response<Incoming>, ExchangeError> {
    let pooled = if reuse { pool.checkout() } else { None };
    let mut connection = match pooled {
        Some(connection) => connection,
        None => match pool.connect().await {
            Ok(connection) => connection,
            Err(error) => return Err(ExchangeError::Connect(error, request)),
        },
    };
    let response = connection.send(request);
    in_use.adopt(connection);
    response.await.map_err(|mut error| {
        let returned = error.take_message();
        ExchangeError::Request(error.into_error(), returned)
    })
}

/// Serves one request from `client`.
pub(crate) async fn handle(
    mut request: Request<Incoming>,
    context: Arc<HttpContext>,
    client: RequestClient,
    in_use: InUse,
    activity: Arc<Activity>,
) -> Result<Response<ResponseBody>, Infallible> {
    // Dropped without `complete` (any early answer): the connection is never parked.
    let request_body =
        (!request.body().is_end_stream()).then(|| keepalive::RequestBody::new(&activity));
    if request.method() == Method::CONNECT {
        return Ok(super::tunnel::connect(request, context, client).await);
    }
    let RequestClient {
        peer: client,
        slot,
        tls,
        ..
    } = client;
    let started = Instant::now();
    let target = RouteTarget::of(request.uri(), request.headers());
    let mut access = Access {
        method: request.method().clone(),
        host: target.host,
        path: target.path,
        route: None,
        upstream: None,
        started,
        bytes_in: None,
        metrics: Arc::clone(&context.metrics),
        upstream_latency: None,
    };
    let (raw_host, target_authority) = (target.raw_host, target.target_authority);
    if let Some(refusal) = target.refused {
        return Ok(access.local(text(
            StatusCode::BAD_REQUEST,
            format!("400 bad request: {refusal}"),
        )));
    }
    let Some(route) = context
        .router
        .find(access.host.as_deref(), &access.path)
        .cloned()
    else {
        return Ok(access.local(text(
            StatusCode::NOT_FOUND,
            "404 no route for this host and path".into(),
        )));
    };
    access.route = Some(Arc::clone(&route));
    if route.require_tls && !tls {
        return Ok(access.local(text(
            StatusCode::FORBIDDEN,
            "403 this route is served over HTTPS only: use https://".into(),
        )));
    }
    if let Some(keys) = &route.auth {
        let network = slot.limits().source_network(client.ip());
        if context.auth_failures.throttled(network) {
            let mut response = text(
                StatusCode::TOO_MANY_REQUESTS,
                "429 too many requests without a valid API key from this network; retry later"
                    .into(),
            );
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("60"));
            return Ok(access.local(response));
        }
        if !keys.admit(request.headers()).await {
            context.auth_failures.record(network);
            return Ok(access.local(keys.unauthorized()));
        }
        if !keys.keep_credentials {
            request.headers_mut().remove(AUTHORIZATION);
        }
    }

    let limit = context.settings.max_body_bytes;
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Ok(access.local(failure_response(Failure::BodyTooLarge, &route, limit)));
    }
    let mut upgrade = headers::upgrade_requested(request.headers())
        .filter(|_| request.version() == Version::HTTP_11);
    if let Some(protocol) = &upgrade {
        let asked = protocol.to_str().unwrap_or("").trim();
        if asked.eq_ignore_ascii_case("h2c") {
            // Never tunnelled: the request is served as plain HTTP/1.1 (RFC 9110 §7.8 lets a
            // server ignore Upgrade), so nothing skips the router as HTTP/2.
            headers::drop_h2c_upgrade(request.headers_mut());
            upgrade = None;
        } else if !route.allows_upgrade(asked) {
            return Ok(access.local(text(
                StatusCode::BAD_REQUEST,
                format!(
                    "400 bad request: upgrading to {asked:?} is not allowed on route {} (http.route[].upgrades)",
                    route.name
                ),
            )));
        }
    }
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut request));

    let (mut parts, body) = request.into_parts();
    let bodiless = body.is_end_stream();
    headers::strip_hop_by_hop(&mut parts.headers);
    let trusted = context.settings.trusts(client.ip());
    headers::set_forwarded(
        &mut parts.headers,
        client.ip(),
        raw_host.clone(),
        (trusted, tls),
    );
    match (&route.host_header, &raw_host) {
        (Some(host), _) => {
            parts.headers.insert(HOST, host.clone());
        }
        // HTTP/2 clients send :authority instead of Host; an HTTP/1.1 upstream needs Host. An
        // absolute-form target's authority replaces the client's Host.
        (None, Some(host)) if target_authority || !parts.headers.contains_key(HOST) => {
            parts.headers.insert(HOST, host.clone());
        }
        _ => {}
    }
    if let Some(protocol) = upgrade.clone() {
        headers::set_upgrade(&mut parts.headers, protocol);
    }
    // Origin form (`/path?query`): the upstream connection is already chosen.
    let forwarded_path = route.forwarded_path(&access.path);
    let target = match (parts.uri.path_and_query(), parts.uri.query()) {
        // Path unchanged (already canonical, no prefix stripped): the client's own target,
        // shared rather than copied.
        (Some(original), _) if original.path() == forwarded_path => Ok(Uri::from(original.clone())),
        (_, Some(query)) => Uri::try_from(format!("{forwarded_path}?{query}")),
        (_, None) => Uri::try_from(forwarded_path),
    };
    let Ok(target) = target else {
        return Ok(access.local(text(
            StatusCode::BAD_REQUEST,
            "400 bad request: unusable request target".into(),
        )));
    };

    // A bodiless request needs no body adapters (nor their timer and counter).
    let mut body = (!bodiless).then(|| {
        let bytes_in = Arc::new(AtomicU64::new(0));
        access.bytes_in = Some(Arc::clone(&bytes_in));
        let trickle_slot = Arc::clone(&slot);
        Observed::new(
            MinRate::new(
                IdleTimeout::new(
                    Limited::new(body, limit as usize),
                    context.settings.body_idle_timeout,
                ),
                context.settings.body_min_rate,
                context.settings.body_rate_grace,
                move || trickle_slot.limits().count_timeout(Timeout::BodyTooSlow),
            ),
            bytes_in,
            move |end| {
                if let (BodyEnd::Complete, Some(watch)) = (end, request_body) {
                    watch.complete();
                }
            },
        )
        .boxed_unsync()
    });

    let mut attempt = 0;
    // A request the upstream never received, to send again elsewhere.
    let mut unsent: Option<Request<UpstreamBody>> = None;
    let response = loop {
        let index = route.upstreams.pick();
        access.upstream = Some(index);
        let mut upstream_request = unsent.take().unwrap_or_else(|| {
            let mut request = Request::new(body.take().unwrap_or_else(empty));
            *request.method_mut() = parts.method.clone();
            *request.uri_mut() = target.clone();
            *request.version_mut() = Version::HTTP_11;
            // Only a request that may be retried needs its headers twice.
            *request.headers_mut() = if bodiless && attempt == 0 {
                parts.headers.clone()
            } else {
                std::mem::take(&mut parts.headers)
            };
            request
        });
        if route.host_header.is_none() && raw_host.is_none() {
            // A client without Host (HTTP/1.0): name the upstream, as HTTP/1.1 requires.
            if let Ok(value) = HeaderValue::from_str(route.upstreams.authority(index)) {
                upstream_request.headers_mut().insert(HOST, value);
            }
        }
        let sent_at = Instant::now();
        // The retry goes on a new connection: a second pooled one may be just as stale.
        let sent = exchange(
            route.upstreams.pool(index),
            attempt == 0,
            upstream_request,
            &in_use,
        );
        let result = match route.response_timeout {
            Some(limit) => match tokio::time::timeout(limit, sent).await {
                Ok(result) => result.map_err(Some),
                Err(_) => Err(None),
            },
            None => sent.await.map_err(Some),
        };
        let error = match result {
            Ok(response) => {
                let answered = Instant::now();
                access.upstream_latency = Some(answered.duration_since(sent_at));
                break Ok((response, answered));
            }
            Err(None) => break Err(Failure::Timeout),
            Err(Some(error)) => error,
        };
        debug!(route = %route.name, upstream = route.upstreams.authority(index), error = %error, "upstream request failed");
        match error {
            ExchangeError::Connect(ConnectError::Full { .. }, _) => {
                slot.limits().count_refusal(Refusal::UpstreamFull);
                break Err(Failure::UpstreamFull);
            }
            ExchangeError::Connect(_, request) => {
                route.upstreams.mark_failed(index);
                if attempt == 0 && route.upstreams.len() > 1 {
                    attempt += 1;
                    unsent = Some(request);
                    continue;
                }
                break Err(Failure::Unreachable);
            }
            ExchangeError::Request(error, returned) => {
                if caused_by::<LengthLimitError>(&error).is_some() {
                    break Err(Failure::BodyTooLarge);
                }
                if attempt == 0 {
                    if let Some(request) = returned {
                        attempt += 1;
                        unsent = Some(request);
                        continue;
                    }
                    if bodiless && idempotent(&parts.method) && stale_connection(&error) {
                        attempt += 1;
                        continue;
                    }
                }
                break Err(Failure::Broken);
            }
        }
    };
    let (mut response, answered) = match response {
        Ok(answered) => answered,
        Err(failure) => return Ok(access.local(failure_response(failure, &route, limit))),
    };
    // One clock read serves both figures.
    let ttfb_ms = answered.duration_since(access.started).as_millis() as u64;
    let status = response.status();

    if status == StatusCode::SWITCHING_PROTOCOLS {
        let accepted = upgrade
            .as_ref()
            .is_some_and(|protocol| headers::upgrade_accepted(protocol, response.headers()));
        if !accepted {
            // A 101 nobody asked for, or for another protocol: it must not open a raw tunnel
            // past the router, the limits and the logs.
            return Ok(access.local(text(
                StatusCode::BAD_GATEWAY,
                format!(
                    "502 bad gateway: the upstream of route {} switched to a protocol the client did not ask for",
                    route.name
                ),
            )));
        }
        if let (Some(client_upgrade), Some(protocol)) = (client_upgrade, upgrade) {
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
            return Ok(Response::from_parts(parts, empty()));
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
    Ok(Response::from_parts(parts, body.boxed_unsync()))
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
