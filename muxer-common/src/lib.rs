//! Everything the kernel side (`muxer-ebpf`) and the daemon (`muxer`) must agree on: program and
//! map names, map layouts, counter indices and default ports. `no_std` so the eBPF programs can
//! use it.
#![no_std]

/// Port the daemon listens on when the config does not say otherwise (the seed's sslh port).
pub const DEFAULT_LISTEN_PORT: u16 = 2222;

/// Public port redirected to the daemon when the config does not say otherwise.
pub const DEFAULT_PUBLIC_PORT: u16 = 22;

/// TC ingress program: public port → internal port.
pub const PROGRAM_TC_INGRESS: &str = "tc_ingress";
/// TC egress program: internal port → public port on every packet leaving an internal port.
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

/// `HashMap<u16, PublicPort>`: public port (host byte order) → its counter slot and, in TC/XDP
/// mode, the internal port its connections are redirected to.
pub const PUBLIC_PORTS_MAP: &str = "PUBLIC_PORTS";
/// `Array<Steered>` indexed by port (host byte order): for each internal port, the public port
/// its replies leave from. An entry with public port 0 is not an internal port.
pub const INTERNAL_PORTS_MAP: &str = "INTERNAL_PORTS";
/// `PerCpuArray<u64>` indexed by [`Counter`].
pub const COUNTERS_MAP: &str = "COUNTERS";
/// `PerCpuArray<u64>` indexed by `slot * PortCounter::COUNT + PortCounter`.
pub const PORT_COUNTERS_MAP: &str = "PORT_COUNTERS";

/// Most public ports one daemon can redirect.
pub const MAX_PUBLIC_PORTS: u32 = 16;
/// Entries of [`INTERNAL_PORTS_MAP`]: one per port number.
pub const PORT_COUNT: u32 = 65_536;

/// What the programs know about one public port.
///
/// In TC/XDP mode each public port has an internal port of its own, where muxer listens for the
/// connections redirected from it and nothing else: a packet's port then says which public port
/// it belongs to, in both directions, and the kernel's own socket table says whether a packet
/// belongs to one of muxer's connections. No flow is recorded anywhere (docs/redirect.md).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublicPort {
    /// Its slot in [`PORT_COUNTERS_MAP`].
    pub slot: u16,
    /// The internal port its new connections are redirected to (host byte order); 0 in sk_lookup
    /// mode, which needs none.
    pub internal_port: u16,
}

/// What the egress program needs to restore a reply from an internal port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Steered {
    /// The public port the client connected to, host byte order; 0 for a port that is not an
    /// internal port.
    pub public_port: u16,
    /// Its slot in [`PORT_COUNTERS_MAP`].
    pub slot: u16,
}

#[cfg(feature = "user")]
// SAFETY: plain-old-data, repr(C), no padding.
unsafe impl aya::Pod for PublicPort {}
#[cfg(feature = "user")]
// SAFETY: plain-old-data, repr(C), no padding.
unsafe impl aya::Pod for Steered {}

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
    /// Packets to a public port that belong to no connection of muxer's: those of connections the
    /// original service accepted directly (before the redirect was attached, or while muxer was
    /// down), which keep going to it.
    PassedUntracked = 2,
    /// IP fragments, passed untouched.
    PassedFragment = 3,
    /// Packets whose headers could not be parsed, passed untouched.
    ParseFailures = 4,
    /// Packets dropped because rewriting them failed half-way.
    Dropped = 5,
    /// New connections (SYNs) to a public port redirected to its internal port.
    ConnectionsRedirected = 6,
    /// Packets from outside addressed straight to an internal port, dropped: only redirected
    /// connections may reach it.
    DroppedDirectToInternal = 7,
    /// New connections to a public port assigned to muxer's listening socket (sk_lookup).
    SkLookupAssigned = 8,
    /// New connections to a public port on a loopback address, left to the original service
    /// (sk_lookup): muxer's own connections to sshd among them.
    SkLookupLocal = 9,
    /// Assigning a connection to muxer's socket failed; it went to the original service.
    SkLookupErrors = 10,
    /// Packets to a public port of no known connection, handed to the internal port's listening
    /// socket so that the kernel answers them there (a SYN-cookie handshake completes; anything
    /// else gets the reset the original service would have sent).
    RedirectedStrays = 11,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 12] = [
        Counter::Passed,
        Counter::PassedNoListener,
        Counter::PassedUntracked,
        Counter::PassedFragment,
        Counter::ParseFailures,
        Counter::Dropped,
        Counter::ConnectionsRedirected,
        Counter::DroppedDirectToInternal,
        Counter::SkLookupAssigned,
        Counter::SkLookupLocal,
        Counter::SkLookupErrors,
        Counter::RedirectedStrays,
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
            Counter::ConnectionsRedirected => "connections_redirected",
            Counter::DroppedDirectToInternal => "dropped_direct_to_internal",
            Counter::SkLookupAssigned => "sk_lookup_assigned",
            Counter::SkLookupLocal => "sk_lookup_local",
            Counter::SkLookupErrors => "sk_lookup_errors",
            Counter::RedirectedStrays => "redirected_strays",
        }
    }
}

/// Per-public-port counters; see [`PORT_COUNTERS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortCounter {
    /// Packets redirected to the internal port.
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
