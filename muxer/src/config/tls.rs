//! `[tls]`, `[[tls.route]]`, `[[tunnel]]` and `[proxy_protocol]`: TLS passthrough by SNI/ALPN,
//! named tunnels (HTTP CONNECT), and the real client address.
use ipnet::IpNet;
use serde::Deserialize;

use super::{valid_host_pattern, Upstream};

/// Which PROXY protocol header to send upstream.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    /// The text header (`PROXY TCP4 …\r\n`).
    V1,
    /// The binary header.
    V2,
}

/// `[tls]`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// Where a ClientHello without SNI, or with no matching route, goes; closed without it.
    pub default: Option<Upstream>,
    /// PROXY header for the default upstream.
    pub proxy_protocol: Option<ProxyVersion>,
    /// Routes by SNI (and ALPN).
    #[serde(default, rename = "route")]
    pub routes: Vec<TlsRoute>,
}

/// `[[tls.route]]`: either passthrough (`upstream`: the TLS stream is spliced there) or
/// termination (`terminate = true`: muxer holds the certificate and serves the decrypted HTTP with
/// its router).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsRoute {
    /// `host.example.com` or `*.example.com`, case-insensitive.
    pub sni: String,
    /// Match only clients offering one of these ALPN protocols.
    #[serde(default)]
    pub alpn: Vec<String>,
    /// Where matching connections are spliced (TLS is not terminated).
    pub upstream: Option<Upstream>,
    /// PROXY header to send first.
    pub proxy_protocol: Option<ProxyVersion>,
    /// Terminate TLS here and serve the requests with the `[http]` router.
    #[serde(default)]
    pub terminate: bool,
    /// The certificate chain (PEM), for `terminate`; re-read on reload.
    pub cert: Option<std::path::PathBuf>,
    /// Its private key (PEM: PKCS#8, SEC1 or PKCS#1).
    pub key: Option<std::path::PathBuf>,
    /// Instead of `cert` and `key`: a key and certificate muxer generates once and keeps in
    /// `state_dir` (`muxer cert` prints its pin).
    #[serde(default)]
    pub self_signed: bool,
    /// Also serve clients that send no SNI, or one no route names (access by IP address).
    #[serde(default)]
    pub default: bool,
}

/// `[[tunnel]]`: `CONNECT name:port` reaches `upstream`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tunnel {
    /// The name clients ask for (case-insensitive); the port they give is ignored.
    pub name: String,
    /// Where the tunnel leads.
    pub upstream: Upstream,
    /// Basic credentials required in `Proxy-Authorization` (both or neither).
    pub username: Option<String>,
    /// See `username`.
    pub password: Option<String>,
    /// Client networks allowed; empty allows all.
    #[serde(default)]
    pub allow: Vec<IpNet>,
    /// PROXY header to send first (never to sshd: OpenSSH rejects it).
    pub proxy_protocol: Option<ProxyVersion>,
}

/// `[proxy_protocol]`: inbound PROXY headers.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundProxy {
    /// Sources (e.g. the provider's load balancer) whose PROXY header is believed. A PROXY
    /// header from anyone else closes the connection.
    #[serde(default)]
    pub trusted: Vec<IpNet>,
}

impl Tls {
    pub(super) fn validate(&self, has_http: bool) -> Result<(), (String, String)> {
        let mut seen = Vec::new();
        let mut default = self.default.is_some().then_some("tls.default");
        for (index, route) in self.routes.iter().enumerate() {
            let key = |field: &str| format!("tls.route[{index}].{field}");
            validate_termination(route, has_http, index)?;
            if route.default {
                if let Some(other) = default {
                    return Err((
                        key("default"),
                        format!("{other} already serves clients without a matching SNI"),
                    ));
                }
                default = Some("another route");
            }
            if !valid_host_pattern(&route.sni) {
                return Err((
                    key("sni"),
                    format!("{:?} is not a host name or *.domain pattern", route.sni),
                ));
            }
            if route.alpn.iter().any(|p| p.is_empty() || p.len() > 255) {
                return Err((key("alpn"), "protocol names are 1 to 255 bytes".into()));
            }
            let mut alpn = route.alpn.clone();
            alpn.sort();
            let identity = (route.sni.to_ascii_lowercase(), alpn);
            if seen.contains(&identity) {
                return Err((key("sni"), "another route has the same sni and alpn".into()));
            }
            seen.push(identity);
        }
        Ok(())
    }
}

/// Checks that `route` is a passthrough or a termination, with what each needs.
fn validate_termination(
    route: &TlsRoute,
    has_http: bool,
    index: usize,
) -> Result<(), (String, String)> {
    let key = |field: &str| format!("tls.route[{index}].{field}");
    if !route.terminate {
        if route.upstream.is_none() {
            return Err((
                key("upstream"),
                "missing: a route either splices to an upstream or sets terminate = true".into(),
            ));
        }
        for (field, set) in [
            ("cert", route.cert.is_some()),
            ("key", route.key.is_some()),
            ("self_signed", route.self_signed),
            ("default", route.default),
        ] {
            if set {
                return Err((key(field), "only for a route with terminate = true".into()));
            }
        }
        return Ok(());
    }
    if route.upstream.is_some() {
        return Err((
            key("upstream"),
            "a terminating route serves with the [http] router; remove upstream".into(),
        ));
    }
    if route.proxy_protocol.is_some() {
        return Err((key("proxy_protocol"), "only for passthrough routes".into()));
    }
    if !has_http {
        return Err((
            key("terminate"),
            "needs an [http] section: the decrypted requests go to its routes".into(),
        ));
    }
    match (&route.cert, &route.key, route.self_signed) {
        (Some(_), Some(_), false) | (None, None, true) => Ok(()),
        (Some(_), None, false) => Err((key("key"), "missing: cert needs its key".into())),
        (None, Some(_), false) => Err((key("cert"), "missing: key needs its cert".into())),
        (None, None, false) => Err((
            key("cert"),
            "missing: set cert and key, or self_signed = true".into(),
        )),
        (_, _, true) => Err((
            key("self_signed"),
            "either cert and key, or self_signed, not both".into(),
        )),
    }
}

/// Checks every terminating route's certificate and key as the config is loaded, so that a bad
/// file is a config error naming its key. A self-signed one not generated yet is fine.
pub(crate) fn check_certificates(
    tls: &Tls,
    state_dir: &std::path::Path,
) -> Result<(), (String, String)> {
    for (index, route) in tls.routes.iter().enumerate() {
        if !route.terminate {
            continue;
        }
        let (cert, key, field) = match (&route.cert, &route.key) {
            (Some(cert), Some(key), ..) => (cert.clone(), key.clone(), "cert"),
            _ => {
                let (key, cert) = crate::certs::self_signed_paths(state_dir);
                if !key.exists() {
                    continue;
                }
                (cert, key, "self_signed")
            }
        };
        crate::certs::read_identity(&cert, &key)
            .and_then(|(certs, key)| crate::certs::server_config(certs, key).map(drop))
            .map_err(|problem| (format!("tls.route[{index}].{field}"), problem))?;
    }
    Ok(())
}

/// Checks every `[[tunnel]]`.
pub(super) fn validate_tunnels(tunnels: &[Tunnel]) -> Result<(), (String, String)> {
    for (index, tunnel) in tunnels.iter().enumerate() {
        let key = |field: &str| format!("tunnel[{index}].{field}");
        let name_ok = !tunnel.name.is_empty()
            && tunnel
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
        if !name_ok {
            return Err((
                key("name"),
                format!("{:?} is not a host-like name", tunnel.name),
            ));
        }
        if tunnels[..index]
            .iter()
            .any(|t| t.name.eq_ignore_ascii_case(&tunnel.name))
        {
            return Err((key("name"), format!("{:?} is defined twice", tunnel.name)));
        }
        match (&tunnel.username, &tunnel.password) {
            (Some(_), None) => return Err((key("password"), "username needs a password".into())),
            (None, Some(_)) => return Err((key("username"), "password needs a username".into())),
            (Some(user), Some(_)) if user.contains(':') || user.is_empty() => {
                return Err((
                    key("username"),
                    "must be non-empty and contain no ':'".into(),
                ))
            }
            _ => {}
        }
    }
    Ok(())
}
