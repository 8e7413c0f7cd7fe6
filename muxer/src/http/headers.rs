//! Header hygiene between client and upstream: hop-by-hop headers (RFC 9110 §7.6.1, plus those the
//! `Connection` header names) never cross, and the `X-Forwarded-*` headers are set.
use std::net::IpAddr;

use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE,
    TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use hyper::Version;

use crate::address_text::{write_ip, MAX_ADDRESS_LEN};

/// Hop-by-hop headers that are never forwarded. Typed names: removing by `&str` would parse the
/// name again for every request.
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The options listed in `Connection` headers, as sent (trimmed, case preserved).
fn connection_options(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Drops what an `h2c` upgrade request carries (`HTTP2-Settings`): muxer serves it as HTTP/1.1.
pub(crate) fn drop_h2c_upgrade(headers: &mut HeaderMap) {
    headers.remove(HTTP2_SETTINGS);
}

/// Whether an upstream's 101 answers the upgrade the client asked for: the same protocol, and for
/// WebSocket the handshake's `Sec-WebSocket-Accept`. Anything else must not become a raw tunnel.
pub(crate) fn upgrade_accepted(requested: &HeaderValue, response: &HeaderMap) -> bool {
    let same = response
        .get(UPGRADE)
        .and_then(|value| value.to_str().ok())
        .zip(requested.to_str().ok())
        .is_some_and(|(answered, asked)| answered.trim().eq_ignore_ascii_case(asked.trim()));
    let websocket = requested
        .to_str()
        .is_ok_and(|asked| asked.trim().eq_ignore_ascii_case("websocket"));
    same && (!websocket || response.contains_key("sec-websocket-accept"))
}

/// Whether the request asks for a protocol upgrade (HTTP/1.1 `Connection: upgrade` + `Upgrade`).
pub(crate) fn upgrade_requested(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = connection_options(headers).any(|option| option.eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(UPGRADE).cloned()).flatten()
}

/// Whether a request is its client's last on the connection, which is then closed once it is
/// answered (RFC 9112 §9.3): HTTP/1.1 with `Connection: close`, HTTP/1.0 without
/// `Connection: keep-alive`.
pub(crate) fn last_on_connection(version: Version, headers: &HeaderMap) -> bool {
    let (mut close, mut keep_alive) = (false, false);
    for option in connection_options(headers) {
        close |= option.eq_ignore_ascii_case("close");
        keep_alive |= option.eq_ignore_ascii_case("keep-alive");
    }
    match version {
        Version::HTTP_10 => close || !keep_alive,
        Version::HTTP_11 => close,
        _ => false,
    }
}

/// Removes hop-by-hop headers and every header `Connection` names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names notes which hop-by-hop headers are there; only those are removed.
    // Most messages carry one (`Connection`, which nginx sends on every response) or none, and
    // each removal hashes its name again: removing all nine cost more than the rest of this.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(index) = HOP_BY_HOP.iter().position(|hop| hop == name) {
            present |= 1 << index;
        }
    }
    if present == 0 {
        return;
    }
    // `Connection` is HOP_BY_HOP[0]: only then can headers be nominated.
    if present & 1 != 0 {
        // A nominated header is removed as soon as it is found: the option borrows from the
        // `Connection` header, so collecting them first would copy every one (usually just
        // "close"). Each round removes a header, so this ends.
        loop {
            let nominated = connection_options(headers)
                .find(|option| has_header_named(headers, option))
                .and_then(|option| HeaderName::from_bytes(option.as_bytes()).ok());
            let Some(nominated) = nominated else { break };
            headers.remove(nominated);
        }
    }
    for (index, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << index) != 0 {
            headers.remove(name);
        }
    }
}

/// Whether `headers` has one named `name`, in any case. A look along the names rather than
/// `contains_key`, which parses and hashes `name` first: mostly length comparisons for the
/// handful of headers a message has (callgrind: 110 fewer instructions for every response's
/// `Connection: keep-alive`).
fn has_header_named(headers: &HeaderMap, name: &str) -> bool {
    headers
        .keys()
        .any(|present| present.as_str().eq_ignore_ascii_case(name))
}

/// Restores the headers an upgrade needs on its hop, after [`strip_hop_by_hop`].
pub(crate) fn set_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, protocol);
}

const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Sets the forwarding headers for `client`. From a trusted proxy (`http.trusted_proxies`) the
/// client is appended to `X-Forwarded-For` and the proxy's `Forwarded` and `X-Real-IP` are kept.
/// From anyone else those headers could be forged, so `X-Forwarded-For` is replaced by the client
/// alone, and a `Forwarded` or `X-Real-IP` the client sent is replaced by muxer's own value.
/// `X-Forwarded-Proto` (`https` when muxer terminated TLS) and `X-Forwarded-Host` are set either
/// way.
pub(crate) fn set_forwarded(
    headers: &mut HeaderMap,
    client: IpAddr,
    original_host: Option<HeaderValue>,
    (trusted, tls): (bool, bool),
) {
    if !trusted {
        // One look along the names instead of three lookups, each hashing a name, for headers
        // clients rarely send (callgrind: 400 instructions a request).
        let (mut chain_sent, mut claims_sent) = (false, ClaimsSent::default());
        for name in headers.keys() {
            chain_sent |= *name == X_FORWARDED_FOR;
            claims_sent.forwarded |= *name == FORWARDED;
            claims_sent.real_ip |= *name == X_REAL_IP;
        }
        if chain_sent {
            headers.remove(X_FORWARDED_FOR);
        }
        if claims_sent.forwarded || claims_sent.real_ip {
            replace_client_claims(headers, client, claims_sent);
        }
    }
    append_forwarded_for(headers, client, original_host, (trusted, tls));
}

/// Which of the client-address headers a client sent.
#[derive(Clone, Copy, Default)]
struct ClaimsSent {
    forwarded: bool,
    real_ip: bool,
}

/// Replaces the `Forwarded` and `X-Real-IP` a client `sent` with the client's real address
/// (rare: only when a client sent one of them).
fn replace_client_claims(headers: &mut HeaderMap, client: IpAddr, sent: ClaimsSent) {
    if sent.forwarded {
        let forwarded = match client {
            IpAddr::V4(v4) => format!("for={v4}"),
            IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
        };
        if let Ok(value) = HeaderValue::from_str(&forwarded) {
            headers.insert(FORWARDED, value);
        }
    }
    if sent.real_ip {
        if let Ok(value) = HeaderValue::from_str(&client.to_string()) {
            headers.insert(X_REAL_IP, value);
        }
    }
}

/// Appends the client to `X-Forwarded-For`, and sets `X-Forwarded-Proto` and `X-Forwarded-Host`.
fn append_forwarded_for(
    headers: &mut HeaderMap,
    client: IpAddr,
    original_host: Option<HeaderValue>,
    (keep_previous, tls): (bool, bool),
) {
    // Room for the three headers at once: inserting them one by one can grow the map twice.
    headers.reserve(3);
    let mut address = [0u8; MAX_ADDRESS_LEN];
    let address_len = write_ip(client, &mut address);
    // Nothing to look up when the client's own chain was just removed.
    let previous = || {
        keep_previous
            .then(|| headers.get_all(&X_FORWARDED_FOR).iter())
            .into_iter()
            .flatten()
            .filter_map(|value| value.to_str().ok())
    };
    // Sized exactly, so that `Bytes` takes this one allocation over as it is.
    let mut chain =
        Vec::with_capacity(previous().map(|value| value.len() + 2).sum::<usize>() + address_len);
    for value in previous() {
        chain.extend_from_slice(value.as_bytes());
        chain.extend_from_slice(b", ");
    }
    chain.extend_from_slice(&address[..address_len]);
    if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(chain)) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    let proto = if tls { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    match original_host {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST, host);
        }
        None => {
            headers.remove(X_FORWARDED_HOST);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_request_on_a_connection_is_recognised_by_version_and_connection_options() {
        let with = |value: Option<&'static str>| {
            let mut headers = HeaderMap::new();
            if let Some(value) = value {
                headers.insert(CONNECTION, HeaderValue::from_static(value));
            }
            headers
        };
        for (version, connection, last) in [
            (Version::HTTP_11, None, false),
            (Version::HTTP_11, Some("close"), true),
            (Version::HTTP_11, Some("Upgrade, CLOSE"), true),
            (Version::HTTP_11, Some("keep-alive"), false),
            (Version::HTTP_10, None, true),
            (Version::HTTP_10, Some("Keep-Alive"), false),
            (Version::HTTP_10, Some("keep-alive, close"), true),
            (Version::HTTP_2, Some("close"), false),
        ] {
            assert_eq!(
                last_on_connection(version, &with(connection)),
                last,
                "{version:?} {connection:?}"
            );
        }
    }

    /// The header names left after [`strip_hop_by_hop`] on these headers (appended in order).
    fn left_after_strip(headers: &[(&'static str, &'static str)]) -> Vec<String> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, HeaderValue::from_static(value));
        }
        strip_hop_by_hop(&mut map);
        map.keys().map(|name| name.as_str().to_owned()).collect()
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let left = left_after_strip(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("authorization", "Bearer x"),
            ("content-type", "application/json"),
        ]);
        assert_eq!(left, ["authorization", "content-type"]);
    }

    #[test]
    fn connection_options_repeated_in_any_case_or_absent_are_handled() {
        let left = left_after_strip(&[
            ("connection", "close, X-A, , x-a"),
            ("connection", "X-B,not a name,x-missing"),
            ("x-a", "1"),
            ("x-b", "2"),
            ("close", "3"),
            ("x-kept", "4"),
        ]);
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn hop_by_hop_headers_go_without_a_connection_header() {
        let left = left_after_strip(&[
            ("x-kept", "1"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic eDp5"),
            ("trailer", "x-checksum"),
            ("proxy-connection", "keep-alive"),
        ]);
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn forwarded_for_appends() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        set_forwarded(
            &mut headers,
            "198.18.0.1".parse().unwrap(),
            Some(HeaderValue::from_static("gpu.example:22")),
            (true, false),
        );
        assert_eq!(headers["x-forwarded-for"], "203.0.113.9, 198.18.0.1");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["x-forwarded-host"], "gpu.example:22");
    }

    #[test]
    fn forwarded_for_joins_several_previous_lines_and_starts_a_chain() {
        let mut headers = HeaderMap::new();
        headers.append("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        headers.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        set_forwarded(
            &mut headers,
            "fd00::1".parse().unwrap(),
            None,
            (true, false),
        );
        let chain: Vec<_> = headers.get_all("x-forwarded-for").iter().collect();
        assert_eq!(chain, ["203.0.113.9, 10.0.0.1, fd00::1"]);
        assert!(!headers.contains_key("x-forwarded-host"));

        let mut fresh = HeaderMap::new();
        set_forwarded(
            &mut fresh,
            "198.18.0.1".parse().unwrap(),
            None,
            (true, true),
        );
        assert_eq!(fresh["x-forwarded-for"], "198.18.0.1");
        assert_eq!(fresh["x-forwarded-proto"], "https", "muxer terminated TLS");
    }

    #[test]
    fn an_untrusted_clients_forwarding_claims_are_replaced_not_appended_to() {
        let mut headers = HeaderMap::new();
        headers.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        headers.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        headers.insert(
            "forwarded",
            HeaderValue::from_static("for=10.0.0.1;proto=https"),
        );
        headers.insert("x-real-ip", HeaderValue::from_static("10.0.0.1"));
        set_forwarded(
            &mut headers,
            "fd00::1".parse().unwrap(),
            None,
            (false, false),
        );
        let chain: Vec<_> = headers.get_all("x-forwarded-for").iter().collect();
        assert_eq!(chain, ["fd00::1"]);
        assert_eq!(headers["forwarded"], "for=\"[fd00::1]\"");
        assert_eq!(headers["x-real-ip"], "fd00::1");
        // Nothing is added that the client did not send, besides X-Forwarded-*.
        let mut plain = HeaderMap::new();
        set_forwarded(
            &mut plain,
            "198.18.0.1".parse().unwrap(),
            None,
            (false, false),
        );
        assert_eq!(plain["x-forwarded-for"], "198.18.0.1");
        assert!(!plain.contains_key("forwarded") && !plain.contains_key("x-real-ip"));
    }

    #[test]
    fn each_forwarding_claim_is_replaced_on_its_own() {
        for (name, replaced) in [("x-real-ip", "198.18.0.1"), ("forwarded", "for=198.18.0.1")] {
            let mut headers = HeaderMap::new();
            headers.insert("host", HeaderValue::from_static("a"));
            headers.insert(name, HeaderValue::from_static("10.0.0.1"));
            set_forwarded(
                &mut headers,
                "198.18.0.1".parse().unwrap(),
                None,
                (false, false),
            );
            assert_eq!(headers[name], replaced);
            assert_eq!(
                headers.len(),
                4,
                "host, {name} and two X-Forwarded-*: {headers:?}"
            );
        }
    }

    #[test]
    fn messages_without_hop_by_hop_headers_keep_every_header() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("a"));
        headers.append("accept", HeaderValue::from_static("*/*"));
        headers.append("accept", HeaderValue::from_static("text/html"));
        let before = headers.clone();
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers, before);
    }

    #[test]
    fn a_101_must_answer_the_upgrade_that_was_asked_for() {
        let websocket = HeaderValue::from_static("websocket");
        let mut answer = HeaderMap::new();
        answer.insert(UPGRADE, HeaderValue::from_static("WebSocket"));
        assert!(
            !upgrade_accepted(&websocket, &answer),
            "no Sec-WebSocket-Accept"
        );
        answer.insert(
            "sec-websocket-accept",
            HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        );
        assert!(upgrade_accepted(&websocket, &answer));
        let mut other = HeaderMap::new();
        other.insert(UPGRADE, HeaderValue::from_static("h2c"));
        assert!(!upgrade_accepted(&websocket, &other), "another protocol");
        assert!(
            !upgrade_accepted(&websocket, &HeaderMap::new()),
            "no Upgrade at all"
        );
        let custom = HeaderValue::from_static("foo/2");
        let mut answer = HeaderMap::new();
        answer.insert(UPGRADE, HeaderValue::from_static("foo/2"));
        assert!(upgrade_accepted(&custom, &answer));
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
