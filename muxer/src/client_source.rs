//! Which source address a local upstream (sshd) sees for a forwarded connection, so that sshd's
//! per-source defences (`PerSourcePenalties`, `MaxStartups`, `Match Address`, `from=`, fail2ban,
//! its logs) apply to each client rather than to muxer as a whole (docs/lockout.md):
//! - `transparent`: the client's own address and port (IP_TRANSPARENT), with the reply rule of
//!   [`crate::policy_routing`];
//! - `per-client-loopback`: 127.a.b.c from a keyed hash of the client's address, when the rule
//!   cannot be installed (no CAP_NET_ADMIN): sshd still tells clients apart;
//! - `muxer`: muxer's own loopback address.
//!
//! Only an upstream on a loopback address is reached this way: replies from another host would not
//! come back through this one.
use std::hash::BuildHasher;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};
use tracing::{debug, info, warn};

use crate::config::{Config, SourceMode};
use crate::policy_routing::{ReplyRouting, ReplyRule};

/// How connections to one backend are made, as decided at start (or reload), with the loopback
/// upstream resolved then, not per connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Effective {
    /// Bound to the client's address; the reply rule for this upstream is installed.
    Transparent(SocketAddr),
    /// Bound to a per-client loopback address; connects to this upstream.
    PerClientLoopback(SocketAddr),
    /// muxer's own address.
    Muxer,
}

/// The source a connection was actually made from, for the log line. Compact: it lives as long
/// as the spliced connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum UsedSource {
    /// The client's own address and port.
    Transparent,
    /// A per-client loopback address.
    PerClientLoopback(SocketAddrV4),
    /// muxer's own address.
    Muxer,
}

impl UsedSource {
    /// What the upstream saw, for a connection from `client`.
    pub(crate) fn describe(self, client: SocketAddr) -> String {
        match self {
            UsedSource::Transparent => format!("{client} (transparent)"),
            UsedSource::PerClientLoopback(address) => format!("{address} (per-client-loopback)"),
            UsedSource::Muxer => "muxer".into(),
        }
    }
}

/// The loopback upstream that `upstream` (`host:port`) names, if it is one. Names are resolved
/// (e.g. `localhost:22`); the first loopback address wins.
pub(crate) fn loopback_upstream(upstream: &str) -> Option<SocketAddr> {
    use std::net::ToSocketAddrs;
    upstream
        .to_socket_addrs()
        .ok()?
        .find(|address| address.ip().is_loopback())
}

/// The reply rules a transparent connection to `upstream` needs: one per family, since an IPv6
/// client reaches the upstream's port on `::1` and an IPv4 client on `127.0.0.1` (or the
/// configured loopback address of that family).
pub(crate) fn reply_rules(upstream: SocketAddr) -> [ReplyRule; 2] {
    let (v4, v6) = match upstream.ip() {
        IpAddr::V4(v4) => (v4, Ipv6Addr::LOCALHOST),
        IpAddr::V6(v6) => (Ipv4Addr::LOCALHOST, v6),
    };
    [
        ReplyRule {
            from: IpAddr::V4(v4),
            port: upstream.port(),
        },
        ReplyRule {
            from: IpAddr::V6(v6),
            port: upstream.port(),
        },
    ]
}

/// What the connect path needs: each backend's effective mode and the per-client hash key.
#[derive(Clone, Debug)]
pub(crate) struct Sources {
    /// For `[ssh]`.
    pub ssh: Effective,
    /// For `[fallback]`.
    pub fallback: Effective,
    key: std::hash::RandomState,
}

impl Default for Sources {
    fn default() -> Self {
        Sources::new(Effective::Muxer, Effective::Muxer)
    }
}

impl Sources {
    /// Modes for `[ssh]` and `[fallback]`, with a fresh random hash key.
    pub(crate) fn new(ssh: Effective, fallback: Effective) -> Sources {
        Sources {
            ssh,
            fallback,
            key: std::hash::RandomState::new(),
        }
    }

    /// The same key with new modes (a reload keeps each client's loopback address).
    pub(crate) fn with_modes(&self, ssh: Effective, fallback: Effective) -> Sources {
        Sources {
            ssh,
            fallback,
            key: self.key.clone(),
        }
    }

    /// The loopback address standing for `client` in `per-client-loopback` mode: 127.a.b.c with
    /// a in 1..=254 and c in 1..=254, from a keyed hash of the address (not the port), so one
    /// client keeps one address and others cannot choose theirs.
    pub(crate) fn loopback_for(&self, client: IpAddr) -> Ipv4Addr {
        let hash = self.key.hash_one(client.to_canonical());
        let a = 1 + (hash % 254) as u8;
        let b = (hash >> 8) as u8;
        let c = 1 + ((hash >> 16) % 254) as u8;
        Ipv4Addr::new(127, a, b, c)
    }
}

/// The mode a config asks for, given the upstream's loopback address (none: another host) and
/// whether the reply rule could be installed.
pub(crate) fn effective(
    requested: SourceMode,
    local_upstream: Option<SocketAddr>,
    rule_installed: bool,
) -> Effective {
    match (requested, local_upstream) {
        (_, None) | (SourceMode::Muxer, _) => Effective::Muxer,
        (SourceMode::Transparent, Some(local)) if rule_installed => Effective::Transparent(local),
        (SourceMode::Transparent | SourceMode::PerClientLoopback, Some(local)) => {
            Effective::PerClientLoopback(local)
        }
    }
}

/// Owns the reply rules in force and decides, per configuration, each backend's mode.
#[derive(Debug, Default)]
pub(crate) struct Planner {
    routing: Option<ReplyRouting>,
    sources: Option<Sources>,
}

impl Planner {
    /// Gives up the reply rules without removing them: a successor process relies on the same
    /// rules now (it installed them too, finding them in place).
    pub(crate) fn leave_rules(mut self) {
        if let Some(routing) = self.routing.take() {
            std::mem::forget(routing);
        }
    }

    /// Installs the reply rules `config` needs (or keeps those in force) and returns the modes
    /// connections use. Without CAP_NET_ADMIN, says once why sshd sees per-client loopback
    /// addresses instead of real ones.
    pub(crate) fn apply(&mut self, config: &Config) -> Sources {
        let backends = [
            ("ssh", config.ssh.as_ref()),
            ("fallback", config.fallback.as_ref()),
        ];
        let locals: Vec<Option<SocketAddr>> = backends
            .iter()
            .map(|(_, backend)| {
                backend
                    .filter(|backend| backend.source != SourceMode::Muxer)
                    .and_then(|backend| loopback_upstream(backend.upstream.as_str()))
            })
            .collect();
        let mut rules: Vec<ReplyRule> = backends
            .iter()
            .zip(&locals)
            .filter(|((_, backend), _)| {
                backend.is_some_and(|backend| backend.source == SourceMode::Transparent)
            })
            .filter_map(|(_, local)| *local)
            .flat_map(reply_rules)
            .collect();
        rules.sort();
        rules.dedup();
        let unchanged = self
            .routing
            .as_ref()
            .is_some_and(|routing| routing.rules() == rules.as_slice());
        let mut installed = !rules.is_empty() && unchanged;
        if !unchanged {
            // The old rules go first: some may be in the new set too.
            self.routing = None;
            if !rules.is_empty() {
                match ReplyRouting::install(&rules) {
                    Ok(routing) => {
                        info!(
                            table = crate::policy_routing::ROUTE_TABLE,
                            "local upstreams see each client's real address (transparent connections)"
                        );
                        self.routing = Some(routing);
                        installed = true;
                    }
                    Err(error) => warn!(
                        %error,
                        "source = \"transparent\" needs CAP_NET_ADMIN to install its reply rule; \
                         sshd sees a per-client loopback address (127.x.y.z) for each client instead"
                    ),
                }
            }
        }
        let mode = |index: usize| {
            let requested = backends[index].1.map_or(SourceMode::Muxer, |b| b.source);
            effective(requested, locals[index], installed)
        };
        let sources = match &self.sources {
            Some(previous) => previous.with_modes(mode(0), mode(1)),
            None => Sources::new(mode(0), mode(1)),
        };
        self.sources = Some(sources.clone());
        sources
    }
}

/// Connects to `upstream` for `client` in `mode` within `timeout`. A client on this machine is
/// connected from muxer's own address. A transparent or per-client connect that cannot be made
/// (the client's address is in use here, the upstream does not listen on that family's loopback
/// address) falls back to the next simpler mode.
pub(crate) async fn connect(
    upstream: &str,
    client: SocketAddr,
    mode: Effective,
    sources: &Sources,
    timeout: Duration,
) -> io::Result<(TcpStream, UsedSource)> {
    let client_ip = client.ip().to_canonical();
    // A client on this machine is connected as itself: it already has a loopback address.
    let local = match mode {
        Effective::Muxer => None,
        _ if client_ip.is_loopback() => None,
        Effective::Transparent(local) | Effective::PerClientLoopback(local) => Some(local),
    };
    if let (Some(local), Effective::Transparent(_)) = (local, mode) {
        let client = SocketAddr::new(client_ip, client.port());
        let target = same_family(local, client_ip);
        match within(timeout, bound_connect(client, target, true)).await {
            Ok(stream) => return Ok((stream, UsedSource::Transparent)),
            Err(error) => {
                debug!(%error, %client, "transparent connect failed; per-client loopback instead")
            }
        }
    }
    if let Some(local) = local {
        let source = sources.loopback_for(client_ip);
        let target = same_family(local, IpAddr::V4(source));
        let from = SocketAddr::new(IpAddr::V4(source), 0);
        match within(timeout, bound_connect(from, target, false)).await {
            Ok(stream) => {
                let port = stream.local_addr().map_or(0, |address| address.port());
                let used = UsedSource::PerClientLoopback(SocketAddrV4::new(source, port));
                return Ok((stream, used));
            }
            Err(error) => {
                debug!(%error, %source, "per-client loopback connect failed; muxer's own address instead")
            }
        }
    }
    let stream = within(timeout, TcpStream::connect(upstream)).await?;
    Ok((stream, UsedSource::Muxer))
}

/// `connecting`, failed with `TimedOut` after `timeout`.
async fn within<T>(
    timeout: Duration,
    connecting: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

/// `upstream`, moved to the loopback address of `family`'s family when it is of the other one.
fn same_family(upstream: SocketAddr, family: IpAddr) -> SocketAddr {
    match (upstream.ip(), family) {
        (IpAddr::V4(_), IpAddr::V6(_)) => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), upstream.port())
        }
        (IpAddr::V6(_), IpAddr::V4(_)) => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), upstream.port())
        }
        _ => upstream,
    }
}

/// Connects from `from` (a foreign address when `transparent`) to `to`.
async fn bound_connect(
    from: SocketAddr,
    to: SocketAddr,
    transparent: bool,
) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
    if transparent {
        if to.is_ipv4() {
            socket.set_ip_transparent_v4(true)?;
        } else {
            socket.set_ip_transparent_v6(true)?;
        }
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&from.into())?;
    let socket = TcpSocket::from_std_stream(socket.into());
    socket.connect(to).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_client_loopback_addresses_are_stable_distinct_and_loopback() {
        let sources = Sources::default();
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "198.18.0.3".parse().unwrap();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(sources.loopback_for(a), sources.loopback_for(a));
        assert_ne!(sources.loopback_for(a), sources.loopback_for(b));
        assert_ne!(sources.loopback_for(a), sources.loopback_for(v6));
        for ip in [a, b, v6] {
            let octets = sources.loopback_for(ip).octets();
            assert_eq!(octets[0], 127);
            assert!(octets[1] != 0 && octets[1] != 255 && octets[3] != 0 && octets[3] != 255);
        }
        let mapped: IpAddr = "::ffff:198.18.0.1".parse().unwrap();
        assert_eq!(sources.loopback_for(mapped), sources.loopback_for(a));
        let other_key = Sources::default();
        let reloaded = sources.with_modes(Effective::Muxer, Effective::Muxer);
        assert_eq!(reloaded.loopback_for(a), sources.loopback_for(a));
        assert!(
            [a, b, v6]
                .iter()
                .any(|ip| other_key.loopback_for(*ip) != sources.loopback_for(*ip)),
            "keyed"
        );
    }

    #[test]
    fn the_mode_in_effect() {
        use SourceMode::*;
        let sshd: SocketAddr = "127.0.0.1:22".parse().unwrap();
        let local = Some(sshd);
        assert_eq!(
            effective(Transparent, local, true),
            Effective::Transparent(sshd)
        );
        assert_eq!(
            effective(Transparent, local, false),
            Effective::PerClientLoopback(sshd)
        );
        assert_eq!(
            effective(PerClientLoopback, local, true),
            Effective::PerClientLoopback(sshd)
        );
        assert_eq!(effective(Transparent, None, true), Effective::Muxer);
        assert_eq!(effective(Muxer, local, true), Effective::Muxer);
    }

    #[test]
    fn reply_rules_cover_both_families() {
        let rules = reply_rules("127.0.0.1:22".parse().unwrap());
        assert_eq!(rules[0].from, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(rules[1].from, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert!(rules.iter().all(|rule| rule.port == 22));
        assert_eq!(
            loopback_upstream("127.0.0.1:22"),
            Some("127.0.0.1:22".parse().unwrap())
        );
        assert_eq!(loopback_upstream("198.18.0.9:22"), None);
    }

    #[tokio::test]
    async fn per_client_loopback_connects_from_the_clients_loopback_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let upstream = address.to_string();
        let sources = Sources::default();
        let client: SocketAddr = "198.18.0.1:40000".parse().unwrap();
        let (stream, used) = connect(
            &upstream,
            client,
            Effective::PerClientLoopback(address),
            &sources,
            Duration::from_secs(2),
        )
        .await
        .unwrap();
        let (_, seen) = listener.accept().await.unwrap();
        assert_eq!(seen.ip(), IpAddr::V4(sources.loopback_for(client.ip())));
        let SocketAddr::V4(local) = stream.local_addr().unwrap() else {
            panic!("an IPv4 loopback source")
        };
        assert_eq!(used, UsedSource::PerClientLoopback(local));
        assert!(used.describe(client).ends_with("(per-client-loopback)"));
    }
}
