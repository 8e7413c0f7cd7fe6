//! TLS routing by the ClientHello's SNI and ALPN: splice the TLS stream to an upstream
//! (passthrough), or terminate it here ([`crate::tls_termination`]).
use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::ServerConfig;
use tracing::error;

use crate::config::{ProxyVersion, Tls, Upstream};
use crate::sniff::ClientHelloInfo;

/// What a TLS connection gets.
#[derive(Debug)]
pub(crate) enum TlsAction {
    /// Spliced to this upstream, with this PROXY header.
    Splice(Upstream, Option<ProxyVersion>),
    /// Terminated with this configuration; the requests go to the HTTP router.
    Terminate(Arc<ServerConfig>),
}

#[derive(Debug)]
struct Route {
    /// Exact name, or `.example.com` for `*.example.com`.
    name: String,
    wildcard: bool,
    alpn: Vec<Vec<u8>>,
    action: Arc<TlsAction>,
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
    default: Option<Arc<TlsAction>>,
}

impl TlsRouter {
    /// Compiles `[tls]`: exact names before wildcards (longer suffix first), routes that require
    /// an ALPN protocol before those that do not, then config order. Terminating routes load
    /// their certificates now (generating a self-signed one in `state_dir` the first time); one
    /// that fails to load (its file changed since the config was checked) is left out, logged.
    pub(crate) fn new(tls: &Tls, state_dir: &Path) -> TlsRouter {
        let mut default = tls
            .default
            .clone()
            .map(|upstream| Arc::new(TlsAction::Splice(upstream, tls.proxy_protocol)));
        let mut routes = Vec::new();
        for (index, route) in tls.routes.iter().enumerate() {
            let action = match (&route.upstream, route.terminate) {
                (Some(upstream), false) => {
                    TlsAction::Splice(upstream.clone(), route.proxy_protocol)
                }
                _ => match crate::tls_termination::route_config(route, state_dir) {
                    Ok(config) => TlsAction::Terminate(config),
                    Err(problem) => {
                        error!(route = index, %problem, "TLS route left out: its certificate did not load");
                        continue;
                    }
                },
            };
            let action = Arc::new(action);
            if route.default {
                default = Some(Arc::clone(&action));
            }
            let sni = route.sni.to_ascii_lowercase();
            let (name, wildcard) = match sni.strip_prefix('*') {
                Some(suffix) => (suffix.to_owned(), true),
                None => (sni, false),
            };
            routes.push(Route {
                name,
                wildcard,
                alpn: route.alpn.iter().map(|p| p.as_bytes().to_vec()).collect(),
                action,
            });
        }
        routes.sort_by_key(|r| std::cmp::Reverse((!r.wildcard, r.name.len(), !r.alpn.is_empty())));
        TlsRouter { routes, default }
    }

    /// What a ClientHello gets (`None` info: no ClientHello, e.g. a probe timeout routed here),
    /// or `None` to close.
    pub(crate) fn pick(&self, info: Option<&ClientHelloInfo>) -> Option<&TlsAction> {
        info.and_then(|info| self.routes.iter().find(|route| route.matches(info)))
            .map(|route| &*route.action)
            .or(self.default.as_deref())
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
            upstream: Some(upstream.parse().unwrap()),
            proxy_protocol: None,
            terminate: false,
            cert: None,
            key: None,
            self_signed: false,
            default: false,
        }
    }

    fn upstream(action: Option<&TlsAction>) -> Option<&str> {
        match action {
            Some(TlsAction::Splice(upstream, _)) => Some(upstream.as_str()),
            _ => None,
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
        let router = TlsRouter::new(&tls, Path::new("/nonexistent"));
        let pick =
            |sni, alpn: &[&str]| upstream(router.pick(Some(&hello(sni, alpn)))).map(str::to_owned);
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
        assert_eq!(upstream(router.pick(None)), Some("default:1"));
        let closed = TlsRouter::new(
            &Tls {
                default: None,
                proxy_protocol: None,
                routes: vec![],
            },
            Path::new("/nonexistent"),
        );
        assert!(closed.pick(Some(&hello(Some("x"), &[]))).is_none());
    }
}
