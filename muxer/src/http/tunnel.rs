//! Named tunnels: `CONNECT name:port` (frp's tcpmux `httpconnect`) is answered 200 and spliced to
//! the upstream configured for that name. Only configured names are reachable — never an open
//! proxy — optionally behind Basic credentials (compared in constant time) and source networks.
//! An unknown name, a source outside `allow` and wrong credentials all get the same 407, so names
//! cannot be enumerated; a source network with too many such failures gets 429 for a while.
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tracing::{debug, info};

use super::proxy::{text, ResponseBody};
use super::throttle::Failures;
use super::{HttpContext, RequestClient};
use crate::config::{ProxyVersion, Tunnel};
use crate::limits::{Class, Timeout};

#[derive(Debug)]
struct Entry {
    name: String,
    upstream: String,
    /// `user:password`, as the decoded Basic credentials must read.
    credentials: Option<Vec<u8>>,
    allow: Vec<IpNet>,
    proxy_protocol: Option<ProxyVersion>,
}

/// The configured tunnels by lower-cased name.
#[derive(Debug, Default)]
pub struct Tunnels {
    by_name: HashMap<String, Entry>,
    failures: Failures,
}

impl Tunnels {
    /// Compiles `[[tunnel]]`.
    pub fn new(tunnels: &[Tunnel]) -> Tunnels {
        let by_name = tunnels
            .iter()
            .map(|tunnel| {
                let credentials = match (&tunnel.username, &tunnel.password) {
                    (Some(user), Some(password)) => Some(format!("{user}:{password}").into_bytes()),
                    _ => None,
                };
                let entry = Entry {
                    name: tunnel.name.clone(),
                    upstream: tunnel.upstream.as_str().to_owned(),
                    credentials,
                    allow: tunnel.allow.clone(),
                    proxy_protocol: tunnel.proxy_protocol,
                };
                (tunnel.name.to_ascii_lowercase(), entry)
            })
            .collect();
        Tunnels {
            by_name,
            failures: Failures::default(),
        }
    }
}

/// Whether `header` carries Basic credentials equal to `expected` (`user:password`).
fn credentials_match(header: Option<&HeaderValue>, expected: &[u8]) -> bool {
    let Some(encoded) = header.and_then(|header| super::auth::credential(header, b"basic ")) else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
        return false;
    };
    decoded.ct_eq(expected).into()
}

fn log(client: SocketAddr, name: &str, upstream: &str, status: StatusCode, started: Instant) {
    info!(
        target: "muxer::access",
        method = "CONNECT",
        client = %client,
        route = %format!("tunnel:{name}"),
        upstream,
        status = status.as_u16(),
        duration_ms = started.elapsed().as_millis() as u64,
        "request"
    );
}

/// Answers a `CONNECT` request from `client`. An open tunnel keeps the client connection's slot
/// (as a tunnel) and closes when silent both ways for `http.tunnel_idle_timeout`.
pub(crate) async fn connect(
    mut request: Request<Incoming>,
    context: Arc<HttpContext>,
    requester: RequestClient,
) -> Response<ResponseBody> {
    let RequestClient {
        peer: client,
        local,
        slot,
        ..
    } = requester;
    let started = Instant::now();
    let name = request
        .uri()
        .host()
        .unwrap_or("")
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let network = slot.limits().source_network(client.ip());
    let tunnels = &context.tunnels;
    if tunnels.failures.throttled(network) {
        log(client, &name, "-", StatusCode::TOO_MANY_REQUESTS, started);
        let mut response = text(
            StatusCode::TOO_MANY_REQUESTS,
            "429 too many failed tunnel requests from this network; retry later".into(),
        );
        response
            .headers_mut()
            .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("60"));
        return response;
    }
    let source = client.ip().to_canonical();
    let admitted = tunnels.by_name.get(&name).filter(|tunnel| {
        let allowed =
            tunnel.allow.is_empty() || tunnel.allow.iter().any(|net| net.contains(&source));
        let credentials = tunnel.credentials.as_ref().is_none_or(|expected| {
            credentials_match(request.headers().get(PROXY_AUTHORIZATION), expected)
        });
        allowed && credentials
    });
    let Some(tunnel) = admitted else {
        // One answer for an unknown name, a source outside `allow` and wrong credentials: which
        // names exist is nobody's business but the configured clients'.
        tunnels.failures.record(network);
        log(
            client,
            &name,
            "-",
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            started,
        );
        let mut response = text(
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            "407 proxy authentication required".into(),
        );
        response.headers_mut().insert(
            PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"muxer\""),
        );
        return response;
    };
    let opened = async {
        let mut upstream = crate::sockets::connect_tuned(
            &tunnel.upstream,
            context.settings.connect_timeout,
            context.tcp_keepalive,
        )
        .await?;
        if let Some(version) = tunnel.proxy_protocol {
            let header = crate::proxy_protocol::encode(version, client, local);
            upstream.write_all(&header).await?;
        }
        Ok::<_, std::io::Error>(upstream)
    };
    let Ok(mut upstream) = opened.await else {
        log(
            client,
            &tunnel.name,
            &tunnel.upstream,
            StatusCode::BAD_GATEWAY,
            started,
        );
        return text(
            StatusCode::BAD_GATEWAY,
            format!("502 bad gateway: tunnel {} is unreachable", tunnel.name),
        );
    };
    log(
        client,
        &tunnel.name,
        &tunnel.upstream,
        StatusCode::OK,
        started,
    );
    let upgrade = hyper::upgrade::on(&mut request);
    let name = tunnel.name.clone();
    let idle = context.settings.tunnel_idle_timeout;
    tokio::spawn(async move {
        let upgraded = match upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                debug!(tunnel = %name, %error, "CONNECT upgrade failed");
                return;
            }
        };
        // HTTP to tunnel: both in the shared pool, so this cannot be refused.
        let _ = slot.classify(Class::Tunnel);
        let mut client_io = TokioIo::new(upgraded);
        let joined = join(&mut client_io, &mut upstream, idle).await;
        if joined.idle_timeout {
            slot.limits().count_timeout(Timeout::TunnelIdle);
        }
        info!(target: "muxer::access", tunnel = %name, bytes_in = joined.client_to_upstream, bytes_out = joined.upstream_to_client, end = joined.end(), "tunnel closed");
    });
    Response::new(http_body_util::BodyExt::boxed_unsync(
        http_body_util::BodyExt::map_err(
            http_body_util::Empty::<Bytes>::new(),
            |never| match never {},
        ),
    ))
}

/// How a [`join`] ended.
#[derive(Debug)]
pub(crate) struct Joined {
    /// Bytes from the client to the upstream.
    pub client_to_upstream: u64,
    /// Bytes from the upstream to the client.
    pub upstream_to_client: u64,
    /// Closed for silence.
    pub idle_timeout: bool,
    /// The error that ended it, if one did.
    pub error: Option<io::ErrorKind>,
}

impl Joined {
    /// For the log line.
    pub(crate) fn end(&self) -> String {
        match (self.idle_timeout, self.error) {
            (true, _) => "idle timeout".into(),
            (false, Some(kind)) => format!("error: {kind}"),
            (false, None) => "finished".into(),
        }
    }
}

/// Copies both ways between `client` and `upstream` until both finish, one fails, or no byte
/// moves either way for `idle` (a download with a silent uplink is not idle; a peer that stops
/// reading stops the bytes, so it is).
pub(crate) async fn join<A, B>(client: &mut A, upstream: &mut B, idle: Duration) -> Joined
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let base = tokio::time::Instant::now();
    let last = AtomicU64::new(0);
    let mut client = Stamped {
        inner: client,
        base,
        last: &last,
        read: 0,
    };
    let mut upstream = Stamped {
        inner: upstream,
        base,
        last: &last,
        read: 0,
    };
    let outcome = {
        let sleep = tokio::time::sleep(idle);
        tokio::pin!(sleep);
        let copying = tokio::io::copy_bidirectional(&mut client, &mut upstream);
        let mut copying = std::pin::pin!(copying);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = copying.as_mut().poll(cx) {
                return Poll::Ready(Some(result));
            }
            loop {
                let deadline = base + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
                if sleep.deadline() != deadline {
                    sleep.as_mut().reset(deadline);
                }
                match sleep.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) if tokio::time::Instant::now() >= deadline => {
                        return Poll::Ready(None)
                    }
                    Poll::Ready(()) => continue,
                }
            }
        })
        .await
    };
    let (client_to_upstream, upstream_to_client) = (client.read, upstream.read);
    Joined {
        client_to_upstream,
        upstream_to_client,
        idle_timeout: outcome.is_none(),
        error: outcome
            .and_then(|result| result.err())
            .map(|error| error.kind()),
    }
}

/// A stream that stamps `last` (milliseconds since `base`) whenever bytes move, and counts the
/// bytes read from it.
struct Stamped<'a, S> {
    inner: &'a mut S,
    base: tokio::time::Instant,
    last: &'a AtomicU64,
    read: u64,
}

impl<S> Stamped<'_, S> {
    fn stamp(&self) {
        let now = self.base.elapsed().as_millis() as u64;
        self.last.store(now, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Stamped<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.read += read as u64;
            self.stamp();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Stamped<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut *self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.stamp();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials() {
        let expected = b"user:p@ss:word";
        let encode = |s: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(s)
            )
        };
        let header = |s: String| HeaderValue::from_str(&s).unwrap();
        assert!(credentials_match(
            Some(&header(encode("user:p@ss:word"))),
            expected
        ));
        assert!(credentials_match(
            Some(&header(encode("user:p@ss:word").replace("Basic", "basic"))),
            expected
        ));
        assert!(!credentials_match(
            Some(&header(encode("user:wrong"))),
            expected
        ));
        assert!(!credentials_match(
            Some(&header(encode("user:p@ss:wor"))),
            expected
        ));
        assert!(!credentials_match(
            Some(&header("Bearer x".into())),
            expected
        ));
        assert!(!credentials_match(
            Some(&header("Basic !!!".into())),
            expected
        ));
        assert!(!credentials_match(None, expected));
    }

    #[tokio::test(start_paused = true)]
    async fn a_joined_pair_closes_after_silence_but_not_while_bytes_move() {
        use tokio::io::AsyncReadExt;
        let (mut client, mut client_end) = tokio::io::duplex(64);
        let (mut upstream, mut upstream_end) = tokio::io::duplex(64);
        let idle = Duration::from_secs(60);
        let joining =
            tokio::spawn(async move { join(&mut client_end, &mut upstream_end, idle).await });
        // Bytes every 40 s, one way only, keep it open past the idle time.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(40)).await;
            client.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            upstream.read_exact(&mut got).await.unwrap();
        }
        let started = tokio::time::Instant::now();
        let joined = joining.await.unwrap();
        assert!(joined.idle_timeout);
        assert!(
            started.elapsed() >= Duration::from_secs(59),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(joined.client_to_upstream, 12);
    }
}
