//! Named tunnels: `CONNECT name:port` (frp's tcpmux `httpconnect`) is answered 200 and spliced to
//! the upstream configured for that name. Only configured names are reachable — never an open
//! proxy — optionally behind Basic credentials (compared in constant time) and source networks.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use subtle::ConstantTimeEq;
use tokio::io::AsyncWriteExt;
use tracing::{debug, info};

use super::proxy::{text, ResponseBody};
use super::HttpContext;
use crate::config::{ProxyVersion, Tunnel};

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
        Tunnels { by_name }
    }
}

/// Whether `header` carries Basic credentials equal to `expected` (`user:password`).
fn credentials_match(header: Option<&HeaderValue>, expected: &[u8]) -> bool {
    let Some(encoded) = header.and_then(|h| h.to_str().ok()).and_then(|h| {
        let (scheme, rest) = h.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("basic").then_some(rest.trim())
    }) else {
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

/// Answers a `CONNECT` request from `client` (which reached `local`).
pub async fn connect(
    mut request: Request<Incoming>,
    context: Arc<HttpContext>,
    client: SocketAddr,
    local: SocketAddr,
) -> Response<ResponseBody> {
    let started = Instant::now();
    let name = request
        .uri()
        .host()
        .unwrap_or("")
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let Some(tunnel) = context.tunnels.by_name.get(&name) else {
        log(client, &name, "-", StatusCode::FORBIDDEN, started);
        return text(
            StatusCode::FORBIDDEN,
            "403 forbidden: no tunnel by that name".into(),
        );
    };
    let source = client.ip().to_canonical();
    if !tunnel.allow.is_empty() && !tunnel.allow.iter().any(|net| net.contains(&source)) {
        log(client, &tunnel.name, "-", StatusCode::FORBIDDEN, started);
        return text(
            StatusCode::FORBIDDEN,
            "403 forbidden: not allowed from this address".into(),
        );
    }
    if let Some(expected) = &tunnel.credentials {
        if !credentials_match(request.headers().get(PROXY_AUTHORIZATION), expected) {
            log(
                client,
                &tunnel.name,
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
        }
    }
    let opened = async {
        let mut upstream = crate::connection::connect_tuned(
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
    tokio::spawn(async move {
        let upgraded = match upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                debug!(tunnel = %name, %error, "CONNECT upgrade failed");
                return;
            }
        };
        let mut client_io = TokioIo::new(upgraded);
        match tokio::io::copy_bidirectional(&mut client_io, &mut upstream).await {
            Ok((up, down)) => {
                info!(target: "muxer::access", tunnel = %name, bytes_in = up, bytes_out = down, "tunnel closed")
            }
            Err(error) => debug!(tunnel = %name, %error, "tunnel failed"),
        }
    });
    Response::new(http_body_util::BodyExt::boxed_unsync(
        http_body_util::BodyExt::map_err(
            http_body_util::Empty::<Bytes>::new(),
            |never| match never {},
        ),
    ))
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
}
