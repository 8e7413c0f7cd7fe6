//! Header parsing and port rewriting over any packet context, so the TC and XDP programs share one
//! implementation. Every read goes through the context's bounds-checked load.
use aya_ebpf::bindings::{
    bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
    bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2, BPF_F_CURRENT_NETNS,
};
use aya_ebpf::helpers::{bpf_sk_lookup_tcp, bpf_sk_release, bpf_skc_lookup_tcp};

const ETH_HEADER_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPV6_HEADER_LEN: usize = 40;
/// Extension headers skipped before giving up on an IPv6 packet.
const MAX_IPV6_EXTENSIONS: usize = 8;
/// Offset of the checksum in the TCP header.
pub(crate) const TCP_CHECKSUM: usize = 16;
/// Offset of the source port in the TCP header.
pub(crate) const TCP_SOURCE_PORT: usize = 0;
/// Offset of the destination port in the TCP header.
pub(crate) const TCP_DEST_PORT: usize = 2;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Access to one packet, implemented by the TC and XDP contexts.
pub(crate) trait Packet: aya_ebpf::EbpfContext {
    /// Reads a `T` at `offset` from the start of the Ethernet header.
    fn load<T: Copy>(&self, offset: usize) -> Option<T>;
    /// Total packet length in bytes.
    fn len(&self) -> u32;
    /// Replaces the big-endian 16-bit port at `l4 + field` (`old` → `new`, both as read from the
    /// packet) and keeps the TCP checksum at `l4 + TCP_CHECKSUM` valid.
    fn rewrite_port(&mut self, l4: usize, field: usize, old: u16, new: u16) -> Result<(), ()>;
}

/// A TCP segment's addressing, as found in its headers.
pub(crate) struct Tcp {
    /// Offset of the TCP header.
    pub l4: usize,
    /// 4 or 6.
    pub family: u16,
    /// Source address, network byte order (IPv4: first word).
    pub saddr: [u32; 4],
    /// Destination address, network byte order.
    pub daddr: [u32; 4],
    /// Source port as read (network byte order).
    pub sport: u16,
    /// Destination port as read (network byte order).
    pub dport: u16,
    /// The TCP flags byte.
    pub flags: u8,
}

impl Tcp {
    /// A connection-opening SYN (not a SYN-ACK).
    pub(crate) fn is_syn(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// What the headers say.
pub(crate) enum Parsed {
    /// A TCP segment, not fragmented.
    Tcp(Tcp),
    /// Not IPv4/IPv6 TCP.
    Other,
    /// An IPv4 fragment or an IPv6 packet with a fragment header.
    Fragment,
    /// Truncated or inconsistent headers.
    Malformed,
}

/// Parses Ethernet → IPv4 (options included) / IPv6 (extension headers included) → TCP.
#[inline(always)]
pub(crate) fn parse<P: Packet>(packet: &P) -> Parsed {
    let Some(ethertype) = packet.load::<u16>(12) else {
        return Parsed::Malformed;
    };
    match u16::from_be(ethertype) {
        ETH_P_IP => ipv4(packet, ETH_HEADER_LEN),
        ETH_P_IPV6 => ipv6(packet, ETH_HEADER_LEN),
        _ => Parsed::Other,
    }
}

/// The fixed part of an IPv4 header, read with one load.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Header {
    version_ihl: u8,
    _tos: u8,
    _total_len: u16,
    _id: u16,
    fragment: u16,
    _ttl: u8,
    protocol: u8,
    _checksum: u16,
    saddr: u32,
    daddr: u32,
}

/// The fixed IPv6 header, read with one load.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Header {
    _version_class_flow: u32,
    _payload_len: u16,
    next: u8,
    _hop_limit: u8,
    saddr: [u32; 4],
    daddr: [u32; 4],
}

/// The fixed part of a TCP header, read with one load.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHeader {
    sport: u16,
    dport: u16,
    _seq: u32,
    _ack: u32,
    data_offset: u8,
    flags: u8,
    _window: u16,
    _checksum: u16,
    _urgent: u16,
}

// Each header is read whole: a load is a helper call in both program types, and one per header
// instead of one per field cut the programs' run time by a fifth.
#[inline(always)]
fn ipv4<P: Packet>(packet: &P, l3: usize) -> Parsed {
    let Some(header) = packet.load::<Ipv4Header>(l3) else {
        return Parsed::Malformed;
    };
    let header_len = usize::from(header.version_ihl & 0x0f) * 4;
    if header.version_ihl >> 4 != 4 || header_len < 20 {
        return Parsed::Malformed;
    }
    // More-fragments flag or a non-zero offset.
    if u16::from_be(header.fragment) & 0x3fff != 0 {
        return Parsed::Fragment;
    }
    if header.protocol != IPPROTO_TCP {
        return Parsed::Other;
    }
    tcp(
        packet,
        l3 + header_len,
        4,
        [header.saddr, 0, 0, 0],
        [header.daddr, 0, 0, 0],
    )
}

#[inline(always)]
fn ipv6<P: Packet>(packet: &P, l3: usize) -> Parsed {
    let Some(header) = packet.load::<Ipv6Header>(l3) else {
        return Parsed::Malformed;
    };
    let (mut next, saddr, daddr) = (header.next, header.saddr, header.daddr);
    let mut offset = l3 + IPV6_HEADER_LEN;
    for _ in 0..MAX_IPV6_EXTENSIONS {
        match next {
            IPPROTO_TCP => return tcp(packet, offset, 6, saddr, daddr),
            // Hop-by-hop, routing, destination options: length in 8-octet units, minus one.
            0 | 43 | 60 => {
                let (Some(following), Some(len)) =
                    (packet.load::<u8>(offset), packet.load::<u8>(offset + 1))
                else {
                    return Parsed::Malformed;
                };
                next = following;
                offset += (usize::from(len) + 1) * 8;
            }
            // Authentication header: length in 4-octet units, minus two.
            51 => {
                let (Some(following), Some(len)) =
                    (packet.load::<u8>(offset), packet.load::<u8>(offset + 1))
                else {
                    return Parsed::Malformed;
                };
                next = following;
                offset += (usize::from(len) + 2) * 4;
            }
            44 => return Parsed::Fragment,
            _ => return Parsed::Other,
        }
    }
    Parsed::Malformed
}

#[inline(always)]
fn tcp<P: Packet>(packet: &P, l4: usize, family: u16, saddr: [u32; 4], daddr: [u32; 4]) -> Parsed {
    let Some(header) = packet.load::<TcpHeader>(l4) else {
        return Parsed::Malformed;
    };
    if header.data_offset >> 4 < 5 {
        return Parsed::Malformed;
    }
    Parsed::Tcp(Tcp {
        l4,
        family,
        saddr,
        daddr,
        sport: header.sport,
        dport: header.dport,
        flags: header.flags,
    })
}

/// `TCP_LISTEN` in the kernel's socket states.
const TCP_LISTEN: u32 = 10;

/// What the kernel's socket table holds for a segment's tuple on some local port.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Socket {
    /// A connection of exactly that tuple: a handshake in progress, established, or closing
    /// (TIME_WAIT included).
    Connection,
    /// No such connection, but a socket listens on the port.
    Listener,
    /// Nothing.
    None,
}

/// Whether a TCP socket in this network namespace listens for connections to `segment`'s
/// destination address on `port` (network byte order): the in-kernel half of failing open.
///
/// The lookup uses source port 0, which no connection has, so it can only find a listener. With
/// the segment's own port, a client reusing a port would find muxer's TIME_WAIT socket of its
/// previous connection, which `bpf_sk_lookup_tcp` reports as no socket at all, and the new
/// connection would wrongly go to the original service.
#[inline(always)]
pub(crate) fn listener_exists<P: Packet>(packet: &P, segment: &Tcp, port: u16) -> bool {
    let socket = with_tuple(segment, 0, port, |tuple, size| {
        // SAFETY: the context pointer is the program's own; the tuple lives on the stack for the
        // call.
        unsafe { bpf_sk_lookup_tcp(packet.as_ptr(), tuple, size, BPF_F_CURRENT_NETNS as u64, 0) }
    });
    if socket.is_null() {
        return false;
    }
    // SAFETY: releasing the reference the lookup took.
    unsafe { bpf_sk_release(socket.cast()) };
    true
}

/// What the socket table holds for `segment`'s tuple with `port` (network byte order) as its
/// local port. This lookup (`bpf_skc_lookup_tcp`) also sees request and TIME_WAIT sockets, so a
/// connection is found from its first SYN-ACK to its last ACK.
#[inline(always)]
pub(crate) fn socket_of<P: Packet>(packet: &P, segment: &Tcp, port: u16) -> Socket {
    let socket = with_tuple(segment, segment.sport, port, |tuple, size| {
        // SAFETY: the context pointer is the program's own; the tuple lives on the stack for the
        // call.
        unsafe { bpf_skc_lookup_tcp(packet.as_ptr(), tuple, size, BPF_F_CURRENT_NETNS as u64, 0) }
    });
    if socket.is_null() {
        return Socket::None;
    }
    // SAFETY: a socket pointer the verifier knows as such; `state` is a readable field of every
    // socket kind the lookup returns.
    let state = unsafe { (*socket).state };
    // SAFETY: releasing the reference the lookup took.
    unsafe { bpf_sk_release(socket.cast()) };
    if state == TCP_LISTEN {
        Socket::Listener
    } else {
        Socket::Connection
    }
}

/// Calls `lookup` with the lookup tuple of `segment` as the receiving host sees it, with the
/// given ports (network byte order), and the tuple's size.
#[inline(always)]
fn with_tuple<R>(
    segment: &Tcp,
    sport: u16,
    dport: u16,
    lookup: impl FnOnce(&mut bpf_sock_tuple, u32) -> R,
) -> R {
    // Each family builds its own tuple, field by field, and uses it where it is built:
    // `mem::zeroed()` would become a memset loop, and a copy of the union would read its
    // uninitialised tail; the verifier refuses both without CAP_PERFMON (the unit grants only
    // CAP_BPF and CAP_NET_ADMIN).
    if segment.family == 4 {
        let ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
            saddr: segment.saddr[0],
            daddr: segment.daddr[0],
            sport,
            dport,
        };
        let mut tuple = bpf_sock_tuple {
            __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 { ipv4 },
        };
        lookup(&mut tuple, 12)
    } else {
        let ipv6 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
            saddr: segment.saddr,
            daddr: segment.daddr,
            sport,
            dport,
        };
        let mut tuple = bpf_sock_tuple {
            __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 { ipv6 },
        };
        lookup(&mut tuple, 36)
    }
}

/// RFC 1624 incremental checksum update for one 16-bit word changing from `old` to `new`. One's
/// complement sums do not depend on byte order, so raw network-order values work as they are.
#[inline(always)]
pub(crate) fn checksum_replace(checksum: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!checksum) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
