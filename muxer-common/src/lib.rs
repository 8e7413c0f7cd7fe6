//! Everything the kernel side (`muxer-ebpf`) and the daemon (`muxer`) must agree on: program and
//! map names, map layouts, counter indices and default ports. `no_std` so the eBPF programs can
//! use it.
#![no_std]

/// Port the daemon listens on when the config does not say otherwise (the seed's sslh port).
pub const DEFAULT_LISTEN_PORT: u16 = 2222;

/// Public port redirected to the daemon when the config does not say otherwise.
pub const DEFAULT_PUBLIC_PORT: u16 = 22;

/// TC ingress program: public port → muxer port.
pub const PROGRAM_TC_INGRESS: &str = "tc_ingress";
/// TC egress program: muxer port → public port on replies of redirected flows.
pub const PROGRAM_TC_EGRESS: &str = "tc_egress";
/// XDP ingress program, the alternative to [`PROGRAM_TC_INGRESS`].
pub const PROGRAM_XDP_INGRESS: &str = "xdp_ingress";
/// sk_lookup program: assigns new connections to public ports to muxer's listening sockets,
/// without rewriting any packet (the alternative to the TC/XDP programs).
pub const PROGRAM_SK_LOOKUP: &str = "sk_lookup_steer";

/// `SockMap` of muxer's listening sockets for the sk_lookup program, indexed by [`Listener`].
pub const LISTENERS_MAP: &str = "LISTENERS";

/// Slots of [`LISTENERS_MAP`]: one listening socket per address family.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// The IPv4 listening socket.
    V4 = 0,
    /// The IPv6 listening socket.
    V6 = 1,
}

impl Listener {
    /// Number of slots [`LISTENERS_MAP`] needs.
    pub const COUNT: u32 = 2;
}

/// `Array<u32>` of [`Setting`] values written by the daemon before attaching.
pub const SETTINGS_MAP: &str = "SETTINGS";
/// `HashMap<u16, u32>`: public port (host byte order) → its slot in [`PORT_COUNTERS_MAP`].
pub const PUBLIC_PORTS_MAP: &str = "PUBLIC_PORTS";
/// `LruHashMap<FlowKey, FlowValue>`: redirected flows, so replies get their public port back.
pub const FLOWS_MAP: &str = "FLOWS";
/// `PerCpuArray<u64>` indexed by [`Counter`].
pub const COUNTERS_MAP: &str = "COUNTERS";
/// `PerCpuArray<u64>` indexed by `slot * PortCounter::COUNT + PortCounter`.
pub const PORT_COUNTERS_MAP: &str = "PORT_COUNTERS";

/// Most public ports one daemon can redirect.
pub const MAX_PUBLIC_PORTS: u32 = 16;
/// Capacity of [`FLOWS_MAP`]; the least recently used flow is evicted beyond it.
pub const MAX_FLOWS: u32 = 131_072;

/// Indices into [`SETTINGS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// The daemon's listening port (host byte order); 0 means "redirect nothing".
    MuxerPort = 0,
}

impl Setting {
    /// Number of slots [`SETTINGS_MAP`] needs.
    pub const COUNT: u32 = 1;
}

/// Identifies a redirected TCP flow from the host's point of view. Addresses are in network byte
/// order; IPv4 addresses use the first word only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The remote client's address.
    pub client_addr: [u32; 4],
    /// The local address the client connected to.
    pub local_addr: [u32; 4],
    /// The client's port, network byte order.
    pub client_port: u16,
    /// 4 or 6.
    pub family: u16,
}

/// What the egress program needs to restore a reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowValue {
    /// The public port the client connected to, host byte order.
    pub public_port: u16,
    /// Its slot in [`PORT_COUNTERS_MAP`].
    pub slot: u16,
}

#[cfg(feature = "user")]
// SAFETY: plain-old-data, repr(C), no padding-dependent invariants.
unsafe impl aya::Pod for FlowKey {}
#[cfg(feature = "user")]
// SAFETY: plain-old-data, repr(C).
unsafe impl aya::Pod for FlowValue {}

/// Indices into the [`COUNTERS_MAP`] per-CPU array.
///
/// The discriminants are the map indices; add new counters at the end only.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Ingress packets left untouched (not for a public port, or one of the reasons below).
    Passed = 0,
    /// New connections to a public port passed to the original service because nothing listens
    /// on the muxer port (the in-kernel fail-open).
    PassedNoListener = 1,
    /// Packets to a public port of a flow that started before the redirect was attached; they keep
    /// going to the original service.
    PassedUntracked = 2,
    /// IP fragments, passed untouched.
    PassedFragment = 3,
    /// Packets whose headers could not be parsed, passed untouched.
    ParseFailures = 4,
    /// Packets dropped because rewriting them failed half-way.
    Dropped = 5,
    /// Redirected flows recorded in [`FLOWS_MAP`].
    FlowsTracked = 6,
    /// Packets sent straight to the muxer port from outside (not redirected).
    DirectToMuxerPort = 7,
    /// New connections to a public port assigned to muxer's listening socket (sk_lookup).
    SkLookupAssigned = 8,
    /// New connections to a public port on a loopback address, left to the original service
    /// (sk_lookup): muxer's own connections to sshd among them.
    SkLookupLocal = 9,
    /// Assigning a connection to muxer's socket failed; it went to the original service.
    SkLookupErrors = 10,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 11] = [
        Counter::Passed,
        Counter::PassedNoListener,
        Counter::PassedUntracked,
        Counter::PassedFragment,
        Counter::ParseFailures,
        Counter::Dropped,
        Counter::FlowsTracked,
        Counter::DirectToMuxerPort,
        Counter::SkLookupAssigned,
        Counter::SkLookupLocal,
        Counter::SkLookupErrors,
    ];

    /// Number of slots [`COUNTERS_MAP`] needs.
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// Stable snake_case name, used by `muxer stats` and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Passed => "passed",
            Counter::PassedNoListener => "passed_no_listener",
            Counter::PassedUntracked => "passed_untracked",
            Counter::PassedFragment => "passed_fragment",
            Counter::ParseFailures => "parse_failures",
            Counter::Dropped => "dropped",
            Counter::FlowsTracked => "flows_tracked",
            Counter::DirectToMuxerPort => "direct_to_muxer_port",
            Counter::SkLookupAssigned => "sk_lookup_assigned",
            Counter::SkLookupLocal => "sk_lookup_local",
            Counter::SkLookupErrors => "sk_lookup_errors",
        }
    }
}

/// Per-public-port counters; see [`PORT_COUNTERS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortCounter {
    /// Packets redirected to the muxer port.
    InPackets = 0,
    /// Bytes (whole packets) redirected to the muxer port.
    InBytes = 1,
    /// Reply packets given the public port back.
    OutPackets = 2,
    /// Bytes of those replies.
    OutBytes = 3,
}

impl PortCounter {
    /// Every per-port counter, in index order.
    pub const ALL: [PortCounter; 4] = [
        PortCounter::InPackets,
        PortCounter::InBytes,
        PortCounter::OutPackets,
        PortCounter::OutBytes,
    ];

    /// Counters per port.
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// Stable snake_case name.
    pub const fn name(self) -> &'static str {
        match self {
            PortCounter::InPackets => "in_packets",
            PortCounter::InBytes => "in_bytes",
            PortCounter::OutPackets => "out_packets",
            PortCounter::OutBytes => "out_bytes",
        }
    }

    /// Index of this counter for the port in `slot`.
    pub const fn index(self, slot: u32) -> u32 {
        slot * Self::COUNT + self as u32
    }
}
