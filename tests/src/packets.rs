//! Crafted Ethernet/IP/TCP packets for running the eBPF programs with `BPF_PROG_TEST_RUN`, and an
//! independent checksum verifier.
use std::net::IpAddr;

/// TCP SYN flag.
pub const SYN: u8 = 0x02;
/// TCP ACK flag.
pub const ACK: u8 = 0x10;
/// TCP RST flag.
pub const RST: u8 = 0x04;
/// TCP FIN flag.
pub const FIN: u8 = 0x01;

/// What to build.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Source address (family decides IPv4 or IPv6).
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// TCP source port.
    pub sport: u16,
    /// TCP destination port.
    pub dport: u16,
    /// TCP flags.
    pub flags: u8,
    /// TCP payload.
    pub payload: Vec<u8>,
    /// IPv4 options (padded to 4 bytes).
    pub ipv4_options: Vec<u8>,
    /// IPv6 extension headers before TCP, by next-header number (0, 43, 60 or 51).
    pub ipv6_extensions: Vec<u8>,
    /// Make it a first fragment (IPv4 MF flag, or an IPv6 fragment header).
    pub fragment: bool,
    /// IP protocol instead of TCP (e.g. 17 for UDP); the "TCP" bytes are sent as that protocol.
    pub protocol: u8,
}

impl Spec {
    /// A TCP segment from `src:sport` to `dst:dport` with `flags`.
    pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Spec {
        Spec {
            src,
            dst,
            sport,
            dport,
            flags,
            payload: b"payload bytes".to_vec(),
            ipv4_options: Vec::new(),
            ipv6_extensions: Vec::new(),
            fragment: false,
            protocol: 6,
        }
    }
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn sum_words(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum()
}

fn pseudo_header(src: IpAddr, dst: IpAddr, protocol: u8, length: usize) -> Vec<u8> {
    let mut out = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
            out.extend_from_slice(&[0, protocol]);
            out.extend_from_slice(&(length as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
            out.extend_from_slice(&(length as u32).to_be_bytes());
            out.extend_from_slice(&[0, 0, 0, protocol]);
        }
        _ => panic!("mixed address families"),
    }
    out
}

/// Builds the packet with correct IPv4 header and TCP checksums.
pub fn build(spec: &Spec) -> Vec<u8> {
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&spec.sport.to_be_bytes());
    tcp.extend_from_slice(&spec.dport.to_be_bytes());
    tcp.extend_from_slice(&0x0102_0304u32.to_be_bytes());
    tcp.extend_from_slice(
        &(if spec.flags & ACK != 0 {
            0x0506_0708u32
        } else {
            0
        })
        .to_be_bytes(),
    );
    tcp.extend_from_slice(&[5 << 4, spec.flags]);
    tcp.extend_from_slice(&64240u16.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    tcp.extend_from_slice(&spec.payload);
    let mut pseudo = pseudo_header(spec.src, spec.dst, spec.protocol, tcp.len());
    pseudo.extend_from_slice(&tcp);
    let checksum = !fold(sum_words(&pseudo));
    tcp[16..18].copy_from_slice(&checksum.to_be_bytes());

    let mut packet = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    match (spec.src, spec.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            packet.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut options = spec.ipv4_options.clone();
            while !options.len().is_multiple_of(4) {
                options.push(0); // end of options list
            }
            let header_len = 20 + options.len();
            let mut ip = vec![0x40 | (header_len / 4) as u8, 0];
            ip.extend_from_slice(&((header_len + tcp.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&[0x12, 0x34]);
            let flags: u16 = if spec.fragment { 0x2000 } else { 0x4000 }; // MF or DF
            ip.extend_from_slice(&flags.to_be_bytes());
            ip.extend_from_slice(&[64, spec.protocol, 0, 0]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            ip.extend_from_slice(&options);
            let checksum = !fold(sum_words(&ip));
            ip[10..12].copy_from_slice(&checksum.to_be_bytes());
            packet.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            packet.extend_from_slice(&0x86ddu16.to_be_bytes());
            let mut chain: Vec<u8> = spec.ipv6_extensions.clone();
            if spec.fragment {
                chain.push(44);
            }
            let mut extensions = Vec::new();
            for (index, &kind) in chain.iter().enumerate() {
                let next = chain.get(index + 1).copied().unwrap_or(spec.protocol);
                match kind {
                    // 8 bytes: next header, length 0 (8-octet units minus one), PadN.
                    0 | 60 | 43 => extensions.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]),
                    // AH: 12-byte minimum header + 4 bytes ICV = 16 bytes → length (16/4)-2 = 2.
                    51 => {
                        extensions.extend_from_slice(&[next, 2, 0, 0]);
                        extensions.extend_from_slice(&[0; 12]);
                    }
                    // Fragment header: offset 0, more fragments.
                    44 => extensions.extend_from_slice(&[next, 0, 0, 1, 0, 0, 0, 7]),
                    other => panic!("unsupported extension {other}"),
                }
            }
            let first = chain.first().copied().unwrap_or(spec.protocol);
            packet.extend_from_slice(&[0x60, 0, 0, 0]);
            packet.extend_from_slice(&((extensions.len() + tcp.len()) as u16).to_be_bytes());
            packet.extend_from_slice(&[first, 64]);
            packet.extend_from_slice(&s.octets());
            packet.extend_from_slice(&d.octets());
            packet.extend_from_slice(&extensions);
        }
        _ => panic!("mixed address families"),
    }
    packet.extend_from_slice(&tcp);
    packet
}

/// Where the TCP header starts, found by walking the headers independently of the programs.
pub fn tcp_offset(packet: &[u8]) -> usize {
    match u16::from_be_bytes([packet[12], packet[13]]) {
        0x0800 => 14 + usize::from(packet[14] & 0x0f) * 4,
        0x86dd => {
            let mut next = packet[14 + 6];
            let mut offset = 14 + 40;
            loop {
                match next {
                    6 | 17 => return offset,
                    0 | 43 | 60 | 44 => {
                        next = packet[offset];
                        offset += (usize::from(packet[offset + 1]) + 1) * 8;
                    }
                    51 => {
                        next = packet[offset];
                        offset += (usize::from(packet[offset + 1]) + 2) * 4;
                    }
                    other => panic!("unexpected next header {other}"),
                }
            }
        }
        other => panic!("unexpected ethertype {other:#x}"),
    }
}

/// `(source port, destination port)` of the TCP header.
pub fn ports(packet: &[u8]) -> (u16, u16) {
    let l4 = tcp_offset(packet);
    (
        u16::from_be_bytes([packet[l4], packet[l4 + 1]]),
        u16::from_be_bytes([packet[l4 + 2], packet[l4 + 3]]),
    )
}

/// Whether the TCP checksum of `packet` is correct, computed from scratch.
pub fn tcp_checksum_ok(packet: &[u8]) -> bool {
    let l4 = tcp_offset(packet);
    let (src, dst, protocol): (IpAddr, IpAddr, u8) =
        match u16::from_be_bytes([packet[12], packet[13]]) {
            0x0800 => {
                let s: [u8; 4] = packet[26..30].try_into().unwrap();
                let d: [u8; 4] = packet[30..34].try_into().unwrap();
                (s.into(), d.into(), packet[23])
            }
            _ => {
                let s: [u8; 16] = packet[22..38].try_into().unwrap();
                let d: [u8; 16] = packet[38..54].try_into().unwrap();
                (s.into(), d.into(), 6)
            }
        };
    let segment = &packet[l4..];
    let mut data = pseudo_header(src, dst, protocol, segment.len());
    data.extend_from_slice(segment);
    fold(sum_words(&data)) == 0xffff
}

/// Sends, from the calling thread's network namespace (enter a test namespace first), `pairs`
/// spoofed SYN-then-ACK pairs to `dst:dport` from pseudo-random sources in 198.19.0.0/16 — the
/// flood that evicted flow records from an LRU table — and returns how many packets went out.
/// Bounded by `pairs`; the sources are test-network addresses that route nowhere.
pub fn spoofed_syn_ack_pairs(dst: std::net::Ipv4Addr, dport: u16, pairs: usize) -> usize {
    let mut random = crate::DataGenerator::new();
    let mut next = |bits: u32| -> u32 {
        (0..bits / 8).fold(0u32, |value, _| value << 8 | u32::from(random.next_byte()))
    };
    let sources: Vec<(IpAddr, u16)> = (0..pairs)
        .map(|_| {
            let host = next(16);
            let source = std::net::Ipv4Addr::new(198, 19, (host >> 8) as u8, host as u8);
            (IpAddr::V4(source), 1024 + (next(16) % 60_000) as u16)
        })
        .collect();
    let frames = sources.iter().flat_map(|&(src, sport)| {
        [SYN, ACK].map(|flags| build(&Spec::tcp(src, sport, IpAddr::V4(dst), dport, flags)))
    });
    send_raw_ipv4(dst, frames)
}

/// Sends each Ethernet frame's IPv4 packet (the frame without its 14-byte header) to `dst` on a
/// raw socket; returns how many were sent.
pub fn send_raw_ipv4(dst: std::net::Ipv4Addr, frames: impl Iterator<Item = Vec<u8>>) -> usize {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(255)), // IPPROTO_RAW: the header is ours
    )
    .expect("raw socket (needs CAP_NET_RAW)");
    let to: socket2::SockAddr = std::net::SocketAddr::from((dst, 0)).into();
    let mut sent = 0;
    for frame in frames {
        if socket.send_to(&frame[14..], &to).is_ok() {
            sent += 1;
        }
    }
    sent
}
