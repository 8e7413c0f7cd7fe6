//! Everything the kernel side (`muxer-ebpf`) and the daemon (`muxer`) must agree on: map names,
//! counter indices and default ports. `no_std` so the eBPF programs can use it.
#![no_std]

/// Port the daemon listens on when the config does not say otherwise (the seed's sslh port).
pub const DEFAULT_LISTEN_PORT: u16 = 2222;

/// Public port redirected to the daemon when the config does not say otherwise.
pub const DEFAULT_PUBLIC_PORT: u16 = 22;

/// Name of the per-CPU array holding [`Counter`] values.
pub const COUNTERS_MAP: &str = "COUNTERS";

/// Indices into the [`COUNTERS_MAP`] per-CPU array.
///
/// The discriminants are the map indices; add new counters at the end only, because a `muxer stats`
/// of one version may read the maps of a running daemon of another.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Packets seen by the ingress program.
    IngressPackets = 0,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 1] = [Counter::IngressPackets];

    /// Number of slots the counters map needs.
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// Stable snake_case name, used by `muxer stats` and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::IngressPackets => "ingress_packets",
        }
    }
}
