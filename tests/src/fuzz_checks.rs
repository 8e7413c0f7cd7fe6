//! The properties the fuzz targets in `fuzz/` check, one function per target, here so that the
//! committed seeds and every crash ever found (`fuzz/regressions/TARGET/`) also run as ordinary
//! tests (`tests/tests/fuzz_regressions.rs`) without nightly or libFuzzer.
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::header::{HeaderMap, HeaderName, HeaderValue, HOST};
use hyper::Uri;
use muxer::config::{Config, HttpRoute};
use muxer::http::path::canonicalize;
use muxer::http::pool::PoolSettings;
use muxer::http::router::Router;
use muxer::http::target::{Refusal, RouteTarget};
use muxer::metrics::HttpMetrics;
use muxer::proxy_protocol::{complete_header, looks_like_header};
use muxer::sniff::{classify, Verdict, PROBES};

/// A target's property: panics when `bytes` break it.
pub type Check = fn(&[u8]);

/// Every target: its name (as `fuzz/Cargo.toml` has it) and its check.
pub const TARGETS: &[(&str, Check)] = &[
    ("probes", probes),
    ("proxy_header", proxy_header),
    ("path", path),
    ("request_head", request_head),
    ("config", config),
];

/// The protocol probes over any first bytes: no panic, and a verdict once final stays final — a
/// probe that said `NoMatch` or `Match` on a prefix says the same with more bytes, so the sniffer's
/// early decision is the one it would have made later.
pub fn probes(bytes: &[u8]) {
    let _ = classify(bytes);
    for probe in PROBES {
        let full = probe(bytes);
        for end in 0..bytes.len() {
            match probe(&bytes[..end]) {
                Verdict::NoMatch => assert_eq!(full, Verdict::NoMatch, "prefix {end} said NoMatch"),
                Verdict::Match(early) => match &full {
                    Verdict::Match(late) => assert_eq!(early.protocol(), late.protocol()),
                    other => panic!("prefix {end} matched {early:?}, all bytes say {other:?}"),
                },
                Verdict::NeedMore => {}
            }
        }
    }
}

/// The PROXY v1/v2 header parser over any bytes: no panic, a complete header never claims more
/// bytes than were given, and the same header followed by a stream parses to the same length.
pub fn proxy_header(bytes: &[u8]) {
    let _ = looks_like_header(bytes);
    if let Ok(Some((_, used))) = complete_header(bytes) {
        assert!(
            used > 0 && used <= bytes.len(),
            "header of {used} bytes in {}",
            bytes.len()
        );
        let mut longer = bytes[..used].to_vec();
        longer.extend_from_slice(b"SSH-2.0-x\r\n");
        match complete_header(&longer) {
            Ok(Some((_, again))) => assert_eq!(again, used),
            other => panic!("the header alone parsed, with bytes after it: {other:?}"),
        }
    }
}

/// Path canonicalisation over any path: no panic, and an accepted path is canonical — absolute, no
/// empty, `.` or `..` segments (`;parameters` included), no escape an upstream would decode into
/// one, and canonicalising it again changes nothing.
pub fn path(bytes: &[u8]) {
    let Ok(raw) = std::str::from_utf8(bytes) else {
        return;
    };
    let Ok(path) = canonicalize(raw) else {
        return;
    };
    if path == "*" {
        assert_eq!(raw, "*");
        return;
    }
    assert!(path.starts_with('/'), "{path:?}");
    let segments: Vec<&str> = path[1..].split('/').collect();
    for (index, segment) in segments.iter().enumerate() {
        let name = segment.split(';').next().unwrap_or("");
        assert!(
            name != "." && name != "..",
            "dot segment in {path:?} from {raw:?}"
        );
        let last = index + 1 == segments.len();
        assert!(
            !segment.is_empty() || last,
            "empty segment in {path:?} from {raw:?}"
        );
    }
    let upper = path.to_ascii_uppercase();
    for escape in ["%2E", "%2F", "%5C", "%00", "%C0", "%C1"] {
        assert!(
            !upper.contains(escape),
            "{escape} left in {path:?} from {raw:?}"
        );
    }
    assert_eq!(
        canonicalize(&path).as_deref(),
        Ok(path.as_str()),
        "not idempotent"
    );
}

/// The routes of [`router`]: name, host, path prefix, whether the prefix is stripped.
const ROUTES: &[(&str, Option<&str>, &str, bool)] = &[
    ("api", Some("api.example"), "/v1/", false),
    ("admin", None, "/admin/", true),
];

fn route(name: &str, host: Option<&str>, path: &str, strip: bool) -> HttpRoute {
    HttpRoute {
        name: Some(name.into()),
        host: host.map(str::to_owned),
        path: Some(path.into()),
        strip_prefix: strip,
        upstreams: vec!["127.0.0.1:1".parse().expect("an address")],
        host_header: None,
        response_timeout: None,
        upgrades: vec!["websocket".into()],
        auth: None,
        require_tls: false,
    }
}

fn router() -> Router {
    let pool = PoolSettings {
        connect_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        tcp_keepalive: Duration::from_secs(60),
        workers: 1,
        max_connections: 4,
        queue: 1,
        queue_timeout: Duration::from_secs(1),
    };
    let routes: Vec<HttpRoute> = ROUTES
        .iter()
        .map(|&(name, host, path, strip)| route(name, host, path, strip))
        .collect();
    Router::new(
        &routes,
        Duration::from_secs(1),
        pool,
        &Arc::new(HttpMetrics::default()),
    )
}

/// An HTTP/1 request head as the router sees it, parsed from any bytes as hyper would (httparse):
/// no panic, duplicate Host headers and bad paths refused, the host routed on is the request
/// target's authority when there is one, and a request routed to a prefix route has a canonical
/// path inside that prefix.
pub fn request_head(bytes: &[u8]) {
    thread_local! {
        static ROUTER: Arc<Router> = Arc::new(router());
    }
    let mut parsed_headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut parsed_headers);
    let Ok(httparse::Status::Complete(_)) = request.parse(bytes) else {
        return;
    };
    let Some(Ok(uri)) = request.path.map(str::parse::<Uri>) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for header in request.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(header.name.as_bytes()),
            HeaderValue::from_bytes(header.value),
        ) else {
            return; // hyper answers 400 itself
        };
        headers.append(name, value);
    }
    let target = RouteTarget::of(&uri, &headers);
    let hosts = headers.get_all(HOST).iter().count();
    match target.refused {
        Some(Refusal::DuplicateHost) => assert!(hosts > 1),
        Some(Refusal::Path(_)) => {}
        None => {
            assert!(hosts <= 1, "{hosts} Host headers accepted");
            if let Some(authority) = uri.authority() {
                assert_eq!(
                    target.raw_host.as_ref().map(|h| h.as_bytes()),
                    Some(authority.as_str().as_bytes())
                );
            }
            ROUTER.with(|router| {
                if let Some(route) = router.find(target.host.as_deref(), &target.path) {
                    let (_, host, prefix, _) = ROUTES
                        .iter()
                        .find(|(name, ..)| *name == route.name)
                        .expect("a route of ROUTES");
                    assert!(
                        target.path.starts_with(prefix),
                        "{:?} routed to {prefix}",
                        target.path
                    );
                    if host.is_some() {
                        assert_eq!(target.host.as_deref(), *host);
                    }
                }
            });
        }
    }
}

/// Config parsing over any text: no panic, and every error is one line naming the file.
pub fn config(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    if let Err(error) = Config::parse(text, Path::new("fuzz.toml")) {
        let message = error.to_string();
        assert!(!message.contains('\n'), "multi-line error: {message:?}");
        assert!(
            message.contains("fuzz.toml"),
            "error without the file: {message:?}"
        );
    }
}
