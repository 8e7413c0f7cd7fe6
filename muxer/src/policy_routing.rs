//! The policy-routing rules that carry a local upstream's replies back to muxer's transparent
//! sockets (docs/lockout.md), installed and removed over netlink, with no iptables:
//!
//! ```text
//! ip rule add from 127.0.0.1 ipproto tcp sport 22 lookup 1022 priority 1022
//! ip route add local 0.0.0.0/0 dev lo table 1022
//! ```
//! (and the same for `::1`). sshd's reply to a connection muxer opened from the client's address
//! is addressed to the client; the rule delivers it locally, to muxer's socket, instead of routing
//! it out. It matches only packets *from* the loopback address's upstream port to another
//! address, which nothing else on a host sends (a loopback source cannot leave the host), so a
//! rule left behind by a crash changes nothing else: replies to local clients still find their
//! own local route first.
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage, RulePortRange};
use netlink_packet_route::{AddressFamily, IpProtocol, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// The routing table holding the `local` default routes.
pub(crate) const ROUTE_TABLE: u32 = 1022;
/// The rules' priority: before the main table (32766), after the local table (0).
pub(crate) const RULE_PRIORITY: u32 = 1022;

/// One upstream whose replies must come back: its loopback address and TCP port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ReplyRule {
    /// The upstream's (loopback) address.
    pub from: IpAddr,
    /// The upstream's port.
    pub port: u16,
}

/// Installed rules and routes, removed when dropped (a clean exit); a crash leaves them, which is
/// harmless (module docs) and repaired by the next start.
#[derive(Debug)]
pub(crate) struct ReplyRouting {
    rules: Vec<ReplyRule>,
    families: Vec<AddressFamily>,
}

impl ReplyRouting {
    /// Installs a rule for each of `rules` and the `local` default route of each family they use.
    /// Entries that already exist (left by a crash) are kept. Fails with `PermissionDenied`
    /// without CAP_NET_ADMIN, having installed nothing.
    pub(crate) fn install(rules: &[ReplyRule]) -> io::Result<ReplyRouting> {
        let mut installed = ReplyRouting {
            rules: Vec::new(),
            families: Vec::new(),
        };
        let netlink = Netlink::open()?;
        for rule in rules {
            let family = family_of(rule.from);
            if !installed.families.contains(&family) {
                netlink.request(route_message(family), Change::Add)?;
                installed.families.push(family);
            }
            netlink.request(rule_message(*rule), Change::Add)?;
            installed.rules.push(*rule);
        }
        Ok(installed)
    }

    /// The rules in force.
    pub(crate) fn rules(&self) -> &[ReplyRule] {
        &self.rules
    }
}

impl Drop for ReplyRouting {
    fn drop(&mut self) {
        let Ok(netlink) = Netlink::open() else { return };
        for rule in &self.rules {
            let _ = netlink.request(rule_message(*rule), Change::Delete);
        }
        for family in &self.families {
            let _ = netlink.request(route_message(*family), Change::Delete);
        }
    }
}

fn family_of(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn rule_message(rule: ReplyRule) -> RouteNetlinkMessage {
    let mut message = RuleMessage::default();
    message.header.family = family_of(rule.from);
    message.header.src_len = if rule.from.is_ipv4() { 32 } else { 128 };
    message.header.action = RuleAction::ToTable;
    message.attributes = vec![
        RuleAttribute::Source(rule.from),
        RuleAttribute::IpProtocol(IpProtocol::Tcp),
        RuleAttribute::SourcePortRange(RulePortRange {
            start: rule.port,
            end: rule.port,
        }),
        RuleAttribute::Table(ROUTE_TABLE),
        RuleAttribute::Priority(RULE_PRIORITY),
    ];
    RouteNetlinkMessage::NewRule(message)
}

fn route_message(family: AddressFamily) -> RouteNetlinkMessage {
    let mut message = RouteMessage::default();
    message.header = RouteHeader {
        address_family: family,
        destination_prefix_length: 0,
        table: RouteHeader::RT_TABLE_UNSPEC,
        protocol: RouteProtocol::Static,
        scope: RouteScope::Host,
        kind: RouteType::Local,
        ..RouteHeader::default()
    };
    let any = match family {
        AddressFamily::Inet6 => RouteAddress::Inet6(Ipv6Addr::UNSPECIFIED),
        _ => RouteAddress::Inet(Ipv4Addr::UNSPECIFIED),
    };
    message.attributes = vec![
        RouteAttribute::Destination(any),
        RouteAttribute::Table(ROUTE_TABLE),
        RouteAttribute::Oif(loopback_index()),
    ];
    RouteNetlinkMessage::NewRoute(message)
}

/// The loopback interface's index (1 on Linux; looked up to be sure).
fn loopback_index() -> u32 {
    nix::net::if_::if_nametoindex("lo").unwrap_or(1)
}

#[derive(Clone, Copy)]
enum Change {
    Add,
    Delete,
}

/// A NETLINK_ROUTE socket sending one request at a time and reading its acknowledgement.
struct Netlink(Socket);

impl Netlink {
    fn open() -> io::Result<Netlink> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Netlink(socket))
    }

    /// Sends `message` as an add (existing entries count as success) or a delete (missing
    /// entries count as success).
    fn request(&self, message: RouteNetlinkMessage, change: Change) -> io::Result<()> {
        let message = match (message, change) {
            (message, Change::Add) => message,
            (RouteNetlinkMessage::NewRule(rule), Change::Delete) => {
                RouteNetlinkMessage::DelRule(rule)
            }
            (RouteNetlinkMessage::NewRoute(route), Change::Delete) => {
                RouteNetlinkMessage::DelRoute(route)
            }
            (other, Change::Delete) => other,
        };
        let mut header = NetlinkHeader::default();
        header.flags = match change {
            Change::Add => NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            Change::Delete => NLM_F_REQUEST | NLM_F_ACK,
        };
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut buffer = vec![0; packet.buffer_len()];
        packet.serialize(&mut buffer);
        self.0.send(&buffer, 0)?;
        let mut answer = Vec::with_capacity(8192);
        self.0.recv(&mut answer, 0)?;
        let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer)
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error.to_string()))?;
        let code = match reply.payload {
            NetlinkPayload::Error(error) => error.raw_code(),
            _ => 0,
        };
        match (code, change) {
            (0, _) => Ok(()),
            (code, Change::Add) if -code == rustix::io::Errno::EXIST.raw_os_error() => Ok(()),
            (code, Change::Delete)
                if -code == rustix::io::Errno::NOENT.raw_os_error()
                    || -code == rustix::io::Errno::SRCH.raw_os_error() =>
            {
                Ok(())
            }
            (code, _) => Err(io::Error::from_raw_os_error(-code)),
        }
    }
}
