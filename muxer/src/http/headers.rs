//! Header hygiene between client and upstream: hop-by-hop headers (RFC 9110 §7.6.1, plus those the
//! `Connection` header names) never cross, and the `X-Forwarded-*` headers are set.
use std::net::IpAddr;

use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, UPGRADE};

/// Hop-by-hop headers that are never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The header names listed in `Connection` headers, lower-cased.
fn connection_options(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| {
            HeaderName::from_bytes(token.trim().to_ascii_lowercase().as_bytes()).ok()
        })
        .collect()
}

/// Whether the request asks for a protocol upgrade (HTTP/1.1 `Connection: upgrade` + `Upgrade`).
pub fn upgrade_requested(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = connection_options(headers)
        .iter()
        .any(|name| name.as_str() == "upgrade");
    asks.then(|| headers.get(UPGRADE).cloned()).flatten()
}

/// Removes hop-by-hop headers and every header `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in connection_options(headers) {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

/// Restores the headers an upgrade needs on its hop, after [`strip_hop_by_hop`].
pub fn set_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, protocol);
}

/// Appends the client to `X-Forwarded-For`, and sets `X-Forwarded-Proto` and `X-Forwarded-Host`.
pub fn set_forwarded(headers: &mut HeaderMap, client: IpAddr, original_host: Option<&str>) {
    const FOR: &str = "x-forwarded-for";
    let previous: Vec<String> = headers
        .get_all(FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_owned)
        .collect();
    let mut chain = previous.join(", ");
    if !chain.is_empty() {
        chain.push_str(", ");
    }
    chain.push_str(&client.to_string());
    if let Ok(value) = HeaderValue::from_str(&chain) {
        headers.insert(FOR, value);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    match original_host.and_then(|host| HeaderValue::from_str(host).ok()) {
        Some(host) => {
            headers.insert("x-forwarded-host", host);
        }
        None => {
            headers.remove("x-forwarded-host");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("authorization", HeaderValue::from_static("Bearer x"));
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["authorization", "content-type"]);
    }

    #[test]
    fn forwarded_for_appends() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        set_forwarded(
            &mut headers,
            "198.18.0.1".parse().unwrap(),
            Some("gpu.example:22"),
        );
        assert_eq!(headers["x-forwarded-for"], "203.0.113.9, 198.18.0.1");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["x-forwarded-host"], "gpu.example:22");
    }

    #[test]
    fn upgrade_detection() {
        let mut headers = HeaderMap::new();
        headers.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(
            upgrade_requested(&headers).is_none(),
            "Upgrade without Connection: upgrade"
        );
        headers.insert(
            "connection",
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert_eq!(upgrade_requested(&headers).unwrap(), "websocket");
    }
}
