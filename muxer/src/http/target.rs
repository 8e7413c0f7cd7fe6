//! What the router sees of a request head: the host it is routed on, the canonical path, and
//! whether the request is refused before routing. One pure function, so routing decisions can be
//! tested (and fuzzed) without a connection.
use hyper::header::{HeaderMap, HeaderValue, HOST};
use hyper::Uri;

use super::path::{canonicalize, PathError};
use super::router::normalize_host;

/// Why a request is answered 400 before routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The path cannot be canonicalised.
    #[error("{0}")]
    Path(#[from] PathError),
    /// Which of several Host headers an upstream would believe is anyone's guess (RFC 9112 §3.2).
    #[error("more than one Host header")]
    DuplicateHost,
}

/// A request's routing inputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteTarget {
    /// The authority routed on, as sent: an absolute-form target's or HTTP/2's `:authority`, else
    /// the Host header. Forwarded as Host and X-Forwarded-Host.
    pub raw_host: Option<HeaderValue>,
    /// `raw_host` normalised for matching (lower case, no port).
    pub host: Option<String>,
    /// The canonical path (the raw one when it cannot be canonicalised, for the log).
    pub path: String,
    /// Whether the authority came from the request target rather than a Host header.
    pub target_authority: bool,
    /// Why the request must be refused, if it must.
    pub refused: Option<Refusal>,
}

impl RouteTarget {
    /// The routing inputs of a request with this target and these headers.
    pub fn of(uri: &Uri, headers: &HeaderMap) -> RouteTarget {
        // The authority of an absolute-form target or HTTP/2's `:authority` is the one routed on,
        // so it is also the one sent upstream as Host (not whatever Host the client added).
        let target_authority = uri.authority().is_some();
        // One lookup for both the Host header and whether there is a second one.
        let mut hosts = headers.get_all(HOST).iter();
        let first_host = hosts.next();
        let duplicate_host = hosts.next().is_some();
        // As a header value: forwarding it (Host, X-Forwarded-Host) is then a reference count.
        let raw_host = match uri.authority() {
            Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
            None => first_host.cloned(),
        }
        .filter(|value| value.to_str().is_ok());
        let host = raw_host
            .as_ref()
            .and_then(|value| value.to_str().ok())
            .map(normalize_host);
        let (path, mut refused) = match canonicalize(uri.path()) {
            Ok(path) => (path, None),
            Err(error) => (uri.path().to_owned(), Some(Refusal::Path(error))),
        };
        if refused.is_none() && duplicate_host {
            refused = Some(Refusal::DuplicateHost);
        }
        RouteTarget {
            raw_host,
            host,
            path,
            target_authority,
            refused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(uri: &str, hosts: &[&str]) -> RouteTarget {
        let mut headers = HeaderMap::new();
        for host in hosts {
            headers.append(HOST, HeaderValue::from_str(host).unwrap());
        }
        RouteTarget::of(&uri.parse().unwrap(), &headers)
    }

    #[test]
    fn the_target_authority_beats_the_host_header() {
        let routed = target("http://API.example:8080/v1/x", &["other.example"]);
        assert_eq!(routed.host.as_deref(), Some("api.example"));
        assert_eq!(routed.raw_host.unwrap(), "API.example:8080");
        assert!(routed.target_authority && routed.refused.is_none());
        let routed = target("/v1/x", &["Other.example:22"]);
        assert_eq!(routed.host.as_deref(), Some("other.example"));
        assert!(!routed.target_authority);
    }

    #[test]
    fn duplicate_hosts_and_bad_paths_are_refused_with_the_raw_path_kept() {
        assert_eq!(
            target("/x", &["a", "b"]).refused,
            Some(Refusal::DuplicateHost)
        );
        let climbing = target("/a/..;/../x", &["a"]);
        assert_eq!(
            climbing.refused,
            Some(Refusal::Path(PathError::EscapesRoot))
        );
        assert_eq!(climbing.path, "/a/..;/../x");
        assert_eq!(target("/a/./b/../c", &["a"]).path, "/a/c");
    }
}
