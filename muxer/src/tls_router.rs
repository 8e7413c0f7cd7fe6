//! TLS passthrough routing by the ClientHello's SNI and ALPN.
use crate::config::{ProxyVersion, Tls, Upstream};
use crate::sniff::ClientHelloInfo;

#[derive(Debug)]
struct Route {
    /// Exact name, or `.example.com` for `*.example.com`.
    name: String,
    wildcard: bool,
    alpn: Vec<Vec<u8>>,
    upstream: Upstream,
    proxy_protocol: Option<ProxyVersion>,
}

impl Route {
    fn matches(&self, info: &ClientHelloInfo) -> bool {
        let name_ok = match &info.sni {
            None => false,
            Some(sni) if self.wildcard => sni.len() > self.name.len() && sni.ends_with(&self.name),
            Some(sni) => *sni == self.name,
        };
        name_ok
            && (self.alpn.is_empty() || info.alpn.iter().any(|offered| self.alpn.contains(offered)))
    }
}

/// The compiled `[tls]` section.
#[derive(Debug)]
pub(crate) struct TlsRouter {
    routes: Vec<Route>,
    default: Option<(Upstream, Option<ProxyVersion>)>,
}

impl TlsRouter {
    /// Compiles `[tls]`: exact names before wildcards (longer suffix first), routes that require
    /// an ALPN protocol before those that do not, then config order.
    pub(crate) fn new(tls: &Tls) -> TlsRouter {
        let mut routes: Vec<Route> = tls
            .routes
            .iter()
            .map(|route| {
                let sni = route.sni.to_ascii_lowercase();
                let (name, wildcard) = match sni.strip_prefix('*') {
                    Some(suffix) => (suffix.to_owned(), true),
                    None => (sni, false),
                };
                Route {
                    name,
                    wildcard,
                    alpn: route.alpn.iter().map(|p| p.as_bytes().to_vec()).collect(),
                    upstream: route.upstream.clone(),
                    proxy_protocol: route.proxy_protocol,
                }
            })
            .collect();
        routes.sort_by_key(|r| std::cmp::Reverse((!r.wildcard, r.name.len(), !r.alpn.is_empty())));
        TlsRouter {
            routes,
            default: tls.default.clone().map(|u| (u, tls.proxy_protocol)),
        }
    }

    /// The upstream for a ClientHello (`None` info: no ClientHello, e.g. a probe timeout routed
    /// here), or `None` to close.
    pub(crate) fn pick(
        &self,
        info: Option<&ClientHelloInfo>,
    ) -> Option<(&Upstream, Option<ProxyVersion>)> {
        info.and_then(|info| self.routes.iter().find(|route| route.matches(info)))
            .map(|route| (&route.upstream, route.proxy_protocol))
            .or(self
                .default
                .as_ref()
                .map(|(upstream, proxy)| (upstream, *proxy)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsRoute;

    fn route(sni: &str, alpn: &[&str], upstream: &str) -> TlsRoute {
        TlsRoute {
            sni: sni.into(),
            alpn: alpn.iter().map(|s| s.to_string()).collect(),
            upstream: upstream.parse().unwrap(),
            proxy_protocol: None,
        }
    }

    fn hello(sni: Option<&str>, alpn: &[&str]) -> ClientHelloInfo {
        ClientHelloInfo {
            sni: sni.map(str::to_owned),
            alpn: alpn.iter().map(|p| p.as_bytes().to_vec()).collect(),
        }
    }

    #[test]
    fn sni_then_alpn_then_default() {
        let tls = Tls {
            default: Some("default:1".parse().unwrap()),
            proxy_protocol: None,
            routes: vec![
                route("*.example.com", &[], "wild:1"),
                route("b.example.com", &[], "b:1"),
                route("B.example.com", &["h2"], "b-h2:1"),
                route("a.example.com", &[], "a:1"),
            ],
        };
        let router = TlsRouter::new(&tls);
        let pick = |sni, alpn: &[&str]| {
            router
                .pick(Some(&hello(sni, alpn)))
                .map(|(u, _)| u.as_str().to_owned())
        };
        assert_eq!(pick(Some("a.example.com"), &[]).as_deref(), Some("a:1"));
        assert_eq!(
            pick(Some("b.example.com"), &["h2", "http/1.1"]).as_deref(),
            Some("b-h2:1")
        );
        assert_eq!(
            pick(Some("b.example.com"), &["http/1.1"]).as_deref(),
            Some("b:1")
        );
        assert_eq!(pick(Some("c.example.com"), &[]).as_deref(), Some("wild:1"));
        assert_eq!(pick(Some("example.com"), &[]).as_deref(), Some("default:1"));
        assert_eq!(pick(None, &[]).as_deref(), Some("default:1"));
        assert_eq!(
            router.pick(None).map(|(u, _)| u.as_str()),
            Some("default:1")
        );
        let closed = TlsRouter::new(&Tls {
            default: None,
            proxy_protocol: None,
            routes: vec![],
        });
        assert!(closed.pick(Some(&hello(Some("x"), &[]))).is_none());
    }
}
