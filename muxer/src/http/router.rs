//! Route selection: most specific host first, then longest path prefix on segment boundaries; a
//! route with neither host nor path is the fallback.
use std::sync::Arc;
use std::time::Duration;

use hyper::header::HeaderValue;

use crate::config::HttpRoute;

use super::pool::PoolSettings;
use super::upstream::UpstreamSet;
use crate::metrics::{HttpMetrics, RouteMetrics};

/// How a route matches the request's host.
#[derive(Clone, Debug, PartialEq, Eq)]
enum HostMatch {
    Any,
    Exact(String),
    /// `*.example.com`: stored as `.example.com`; matches any host ending with it.
    Suffix(String),
}

impl HostMatch {
    fn matches(&self, host: Option<&str>) -> bool {
        match (self, host) {
            (HostMatch::Any, _) => true,
            (HostMatch::Exact(want), Some(host)) => host == want,
            (HostMatch::Suffix(suffix), Some(host)) => {
                host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
            (_, None) => false,
        }
    }

    /// Larger is more specific.
    fn specificity(&self) -> (u8, usize) {
        match self {
            HostMatch::Exact(host) => (2, host.len()),
            HostMatch::Suffix(suffix) => (1, suffix.len()),
            HostMatch::Any => (0, 0),
        }
    }
}

/// A path prefix. `/a/` requires the slash (`/a` alone does not match); `/a` matches `/a` and
/// `/a/…`. Neither matches `/ab`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Prefix {
    /// Without the trailing slash ("" for "/").
    base: String,
    slash_required: bool,
}

impl Prefix {
    fn new(path: &str) -> Prefix {
        let slash_required = path.len() > 1 && path.ends_with('/');
        let base = path.trim_end_matches('/').to_owned();
        Prefix {
            base,
            slash_required,
        }
    }

    /// The rest of `path` after the prefix (always starting with `/`), if it matches.
    fn strip<'a>(&self, path: &'a str) -> Option<&'a str> {
        let rest = path.strip_prefix(self.base.as_str())?;
        if rest.starts_with('/') {
            Some(rest)
        } else if rest.is_empty() && !self.slash_required {
            Some("/")
        } else {
            None
        }
    }
}

/// One compiled `[[http.route]]`.
#[derive(Debug)]
pub struct Route {
    /// For logs and error pages.
    pub name: String,
    host: HostMatch,
    prefix: Option<Prefix>,
    strip_prefix: bool,
    /// Where requests go.
    pub upstreams: UpstreamSet,
    /// `Host` override for the upstream request (validated with the config).
    pub host_header: Option<HeaderValue>,
    /// Longest wait for the response head.
    pub response_timeout: Option<Duration>,
    /// Upgrade protocols allowed (lower case).
    pub upgrades: Vec<String>,
    /// The API keys the route requires, if any.
    pub(crate) auth: Option<super::auth::Keys>,
    /// Served only over HTTPS.
    pub require_tls: bool,
    /// This route's request metrics.
    pub metrics: RouteMetrics,
}

impl Route {
    /// Whether a client may upgrade to `protocol` (an `Upgrade` header value) on this route.
    pub fn allows_upgrade(&self, protocol: &str) -> bool {
        self.upgrades
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(protocol.trim()))
    }

    /// The path to forward: `path` with the prefix removed when the route strips it.
    pub fn forwarded_path<'a>(&self, path: &'a str) -> &'a str {
        match (&self.prefix, self.strip_prefix) {
            (Some(prefix), true) => prefix.strip(path).unwrap_or(path),
            _ => path,
        }
    }
}

/// The routing table, sorted so that the first match is the most specific.
#[derive(Debug)]
pub struct Router {
    routes: Vec<Arc<Route>>,
}

/// Lower-cases `host`, drops a port and a trailing dot.
pub fn normalize_host(host: &str) -> String {
    let host = if let Some(rest) = host.strip_prefix('[') {
        // IPv6 literal: keep the brackets' content.
        rest.split(']').next().unwrap_or(rest)
    } else {
        host.rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host, |(h, _)| h)
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

impl Router {
    /// Compiles the configured routes.
    pub fn new(
        routes: &[HttpRoute],
        failure_cooldown: Duration,
        pool: PoolSettings,
        metrics: &Arc<HttpMetrics>,
    ) -> Router {
        let mut compiled: Vec<Arc<Route>> = routes
            .iter()
            .map(|route| {
                let host = match route.host.as_deref().map(str::to_ascii_lowercase) {
                    None => HostMatch::Any,
                    Some(host) => match host.strip_prefix('*') {
                        Some(suffix) => HostMatch::Suffix(suffix.to_owned()),
                        None => HostMatch::Exact(host),
                    },
                };
                let name = route.display_name();
                Arc::new(Route {
                    metrics: RouteMetrics::new(Arc::clone(metrics), &name),
                    name,
                    host,
                    prefix: route.path.as_deref().map(Prefix::new),
                    strip_prefix: route.strip_prefix,
                    upstreams: UpstreamSet::new(&route.upstreams, failure_cooldown, pool),
                    host_header: route
                        .host_header
                        .as_deref()
                        .and_then(|host| HeaderValue::from_str(host).ok()),
                    response_timeout: route.response_timeout,
                    upgrades: route
                        .upgrades
                        .iter()
                        .map(|token| token.to_ascii_lowercase())
                        .collect(),
                    auth: route.auth.as_ref().map(super::auth::Keys::new),
                    require_tls: route.require_tls,
                })
            })
            .collect();
        // Stable sort: equally specific routes keep their config order.
        compiled.sort_by_key(|route| {
            let path_len = route
                .prefix
                .as_ref()
                .map_or(0, |p| p.base.len() + usize::from(p.slash_required));
            std::cmp::Reverse((route.host.specificity(), route.prefix.is_some(), path_len))
        });
        Router { routes: compiled }
    }

    /// The route for a request to `host` (normalised) and canonical `path`.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|route| {
            route.host.matches(host)
                && route
                    .prefix
                    .as_ref()
                    .is_none_or(|prefix| prefix.strip(path).is_some())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, host: Option<&str>, path: Option<&str>, strip: bool) -> HttpRoute {
        HttpRoute {
            name: Some(name.into()),
            host: host.map(str::to_owned),
            path: path.map(str::to_owned),
            strip_prefix: strip,
            upstreams: vec!["127.0.0.1:1".parse().unwrap()],
            host_header: None,
            response_timeout: None,
            upgrades: vec!["websocket".into()],
            auth: None,
            require_tls: false,
        }
    }

    const POOL: PoolSettings = PoolSettings {
        connect_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        tcp_keepalive: Duration::from_secs(60),
        workers: 1,
        max_connections: 64,
        queue: 4,
        queue_timeout: Duration::from_secs(1),
    };

    fn table() -> Router {
        Router::new(
            &[
                route("default", None, None, false),
                route("embedding", None, Some("/embedding-model/"), true),
                route("v1", None, Some("/v1"), false),
                route("v1-chat", None, Some("/v1/chat"), false),
                route("wild", Some("*.example.com"), None, false),
                route("api", Some("api.example.com"), None, false),
                route("api-admin", Some("API.example.com"), Some("/admin"), false),
            ],
            Duration::from_secs(1),
            POOL,
            &Arc::new(HttpMetrics::default()),
        )
    }

    #[test]
    fn the_readme_table() {
        let router = table();
        let cases = [
            (None, "/", "default"),
            (None, "/v1/models", "v1"),
            (None, "/v1", "v1"),
            (None, "/v1x", "default"),
            (None, "/v1/chat/completions", "v1-chat"),
            (None, "/v1/chatty", "v1"),
            (None, "/embedding-model/v1/models", "embedding"),
            (None, "/embedding-model/", "embedding"),
            (None, "/embedding-model", "default"),
            (None, "/embedding-modelx", "default"),
            (Some("api.example.com"), "/admin/users", "api-admin"),
            (Some("api.example.com"), "/v1/models", "api"),
            (Some("www.example.com"), "/v1/models", "wild"),
            (Some("example.com"), "/v1/models", "v1"),
            (Some("other.org"), "/embedding-model/x", "embedding"),
        ];
        for (host, path, want) in cases {
            let got = router.find(host, path).map(|r| r.name.as_str());
            assert_eq!(got, Some(want), "{host:?} {path}");
        }
    }

    #[test]
    fn no_fallback_means_no_match() {
        let router = Router::new(
            &[route("only", None, Some("/a/"), false)],
            Duration::from_secs(1),
            POOL,
            &Arc::new(HttpMetrics::default()),
        );
        assert!(router.find(None, "/b").is_none());
        assert!(router.find(None, "/a").is_none());
        assert!(router.find(None, "/a/x").is_some());
    }

    #[test]
    fn stripping() {
        let router = table();
        let embedding = router.find(None, "/embedding-model/v1/models").unwrap();
        assert_eq!(
            embedding.forwarded_path("/embedding-model/v1/models"),
            "/v1/models"
        );
        assert_eq!(embedding.forwarded_path("/embedding-model/"), "/");
        let v1 = router.find(None, "/v1").unwrap();
        assert_eq!(
            v1.forwarded_path("/v1/models"),
            "/v1/models",
            "v1 does not strip"
        );
        let bare = Router::new(
            &[route("bare", None, Some("/svc"), true)],
            Duration::from_secs(1),
            POOL,
            &Arc::new(HttpMetrics::default()),
        );
        let route = bare.find(None, "/svc").unwrap();
        assert_eq!(route.forwarded_path("/svc"), "/");
        assert_eq!(route.forwarded_path("/svc/x"), "/x");
    }

    #[test]
    fn host_normalisation() {
        assert_eq!(normalize_host("API.Example.com:8080"), "api.example.com");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("[fd00::2]:22"), "fd00::2");
        assert_eq!(normalize_host("198.18.0.2:22"), "198.18.0.2");
    }
}
