//! Kernel fast path of muxer: steer the public port (22) to the daemon without iptables or
//! conntrack, and without any per-flow state a flood could evict.
//!
//! - `tc_ingress` / `xdp_ingress`: each public port has an internal port where only muxer's
//!   connections from that public port land. A SYN to a public port is redirected to its internal
//!   port only when a socket listens there (otherwise it goes to the original service: fail open
//!   even if this program outlives the daemon). Every later packet is redirected when the kernel's
//!   socket table holds a connection of that tuple on the internal port (a handshake in progress,
//!   an established or closing connection), and left alone when it holds one on the public port:
//!   SSH sessions opened while muxer was down survive its return. Nothing is recorded, so nothing
//!   can be evicted or deleted by spoofed packets. Packets sent from outside straight to an
//!   internal port are dropped.
//! - `tc_egress`: every packet leaving an internal port gets its public port back as its source
//!   port; only muxer's redirected connections use an internal port.
//! - `sk_lookup_steer` (the other mode): assigns a new TCP connection to a public port to muxer's
//!   listening socket of its family, held in `LISTENERS`. No packet is rewritten: the connection
//!   is an ordinary socket on the public port. Fail-open: a closed listening socket leaves the
//!   map, and the lookup then goes on to the original service.
#![no_std]
#![no_main]

mod packet;

use aya_ebpf::bindings::sk_action::SK_PASS;
use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS};
use aya_ebpf::bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC};
use aya_ebpf::helpers::{bpf_xdp_get_buff_len, bpf_xdp_load_bytes, bpf_xdp_store_bytes};
use aya_ebpf::macros::{classifier, map, sk_lookup, xdp};
use aya_ebpf::maps::{Array, HashMap, PerCpuArray, SockMap};
use aya_ebpf::programs::{SkLookupContext, TcContext, XdpContext};
use aya_ebpf::EbpfContext;
use aya_log_ebpf::{error, warn};
use muxer_common::{
    Counter, Listener, PortCounter, PublicPort, Steered, MAX_PUBLIC_PORTS, PORT_COUNT,
};
use packet::{Packet, Parsed, Socket, Tcp, TCP_CHECKSUM, TCP_DEST_PORT, TCP_SOURCE_PORT};

#[map(name = "PUBLIC_PORTS")]
static PUBLIC_PORTS: HashMap<u16, PublicPort> = HashMap::with_max_entries(MAX_PUBLIC_PORTS, 0);

// An array indexed by port, not a hash map: egress looks up every TCP packet the host sends, and
// an array lookup is a bounds check and an offset.
#[map(name = "INTERNAL_PORTS")]
static INTERNAL_PORTS: Array<Steered> = Array::with_max_entries(PORT_COUNT, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[map(name = "PORT_COUNTERS")]
static PORT_COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(MAX_PUBLIC_PORTS * PortCounter::COUNT, 0);

#[map(name = "LISTENERS")]
static LISTENERS: SockMap = SockMap::with_max_entries(Listener::COUNT, 0);

#[inline(always)]
fn add(map: &PerCpuArray<u64>, index: u32, amount: u64) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // SAFETY: this CPU's slot of a per-CPU map; nothing else writes it concurrently.
        unsafe { *slot += amount };
    }
}

#[inline(always)]
fn count(counter: Counter) {
    add(&COUNTERS, counter as u32, 1);
}

#[inline(always)]
fn count_port(slot: u32, packets: PortCounter, bytes: PortCounter, len: u32) {
    add(&PORT_COUNTERS, packets.index(slot), 1);
    add(&PORT_COUNTERS, bytes.index(slot), u64::from(len));
}

/// The public port an internal port (host byte order) serves, if it is one.
#[inline(always)]
fn steered(internal_port: u16) -> Option<Steered> {
    let steered = *INTERNAL_PORTS.get(u32::from(internal_port))?;
    (steered.public_port != 0).then_some(steered)
}

enum Verdict {
    Pass,
    Drop,
}

#[inline(always)]
fn ingress<P: Packet>(packet: &mut P) -> Verdict {
    let segment = match packet::parse(packet) {
        Parsed::Tcp(segment) => segment,
        Parsed::Other => return pass(Counter::Passed),
        Parsed::Fragment => return pass(Counter::PassedFragment),
        Parsed::Malformed => return pass(Counter::ParseFailures),
    };
    let dport = u16::from_be(segment.dport);
    if steered(dport).is_some() {
        // Only redirected connections may reach an internal port: its replies leave from the
        // public port, and no lookup below may be bypassed.
        count(Counter::DroppedDirectToInternal);
        return Verdict::Drop;
    }
    // SAFETY: the value is copied out at once; the map is only written by the daemon.
    let Some(&public) = (unsafe { PUBLIC_PORTS.get(dport) }) else {
        return pass(Counter::Passed);
    };
    if public.internal_port == 0 {
        return pass(Counter::Passed);
    }
    let internal = public.internal_port.to_be();
    if segment.is_syn() {
        if !packet::listener_exists(packet, &segment, internal) {
            log_no_listener(packet, public.internal_port, dport);
            return pass(Counter::PassedNoListener);
        }
        count(Counter::ConnectionsRedirected);
    } else {
        match packet::socket_of(packet, &segment, internal) {
            Socket::Connection => {}
            Socket::None => return pass(Counter::PassedUntracked),
            // No connection of muxer's: the original service's own, or a stray packet, which
            // the internal port's listener answers (it may complete a SYN-cookie handshake).
            Socket::Listener => {
                if packet::socket_of(packet, &segment, segment.dport) == Socket::Connection {
                    return pass(Counter::PassedUntracked);
                }
                count(Counter::RedirectedStrays);
            }
        }
    }
    rewrite(
        packet,
        &segment,
        TCP_DEST_PORT,
        segment.dport,
        internal,
        u32::from(public.slot),
        PortCounter::InPackets,
        PortCounter::InBytes,
    )
}

#[inline(always)]
fn egress<P: Packet>(packet: &mut P) -> Verdict {
    let Parsed::Tcp(segment) = packet::parse(packet) else {
        return Verdict::Pass;
    };
    let Some(steered) = steered(u16::from_be(segment.sport)) else {
        return Verdict::Pass;
    };
    rewrite(
        packet,
        &segment,
        TCP_SOURCE_PORT,
        segment.sport,
        steered.public_port.to_be(),
        u32::from(steered.slot),
        PortCounter::OutPackets,
        PortCounter::OutBytes,
    )
}

// The log calls live in functions of their own (BPF-to-BPF calls, never inlined): inlined, the
// compiler reuses their stack slots for other values, and the verifier then refuses the program
// ("attempt to corrupt spilled pointer on stack") when loaded with CAP_BPF but without
// CAP_PERFMON, as the systemd unit does.
#[inline(never)]
fn log_no_listener<P: Packet>(packet: &P, internal_port: u16, public_port: u16) {
    warn!(
        packet,
        "nothing listens on internal port {}: new connection to port {} left to the original service",
        internal_port,
        public_port
    );
}

#[inline(never)]
fn log_rewrite_failed<P: Packet>(packet: &P) {
    error!(packet, "rewriting a TCP port failed; packet dropped");
}

#[inline(always)]
fn pass(reason: Counter) -> Verdict {
    count(reason);
    Verdict::Pass
}

#[inline(always)]
#[allow(
    clippy::too_many_arguments,
    reason = "always inlined: the arguments are the rewrite's parts, not a call's cost"
)]
fn rewrite<P: Packet>(
    packet: &mut P,
    segment: &Tcp,
    field: usize,
    old: u16,
    new: u16,
    slot: u32,
    packets: PortCounter,
    bytes: PortCounter,
) -> Verdict {
    if packet.rewrite_port(segment.l4, field, old, new).is_err() {
        // The checksum may already be adjusted: a half-rewritten packet must not go on.
        log_rewrite_failed(packet);
        count(Counter::Dropped);
        return Verdict::Drop;
    }
    count_port(slot, packets, bytes, packet.len());
    Verdict::Pass
}

struct TcPacket(TcContext);

impl EbpfContext for TcPacket {
    fn as_ptr(&self) -> *mut core::ffi::c_void {
        self.0.as_ptr()
    }
}

impl Packet for TcPacket {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        self.0.load::<T>(offset).ok()
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        self.0.len()
    }

    #[inline(always)]
    fn rewrite_port(&mut self, l4: usize, field: usize, old: u16, new: u16) -> Result<(), ()> {
        // The checksum helper copes with CHECKSUM_PARTIAL and GSO packets, which a hand-computed
        // update would corrupt.
        self.0
            .l4_csum_replace(l4 + TCP_CHECKSUM, u64::from(old), u64::from(new), 2)
            .map_err(drop)?;
        self.0.store(l4 + field, &new, 0).map_err(drop)
    }
}

struct XdpPacket(XdpContext);

impl EbpfContext for XdpPacket {
    fn as_ptr(&self) -> *mut core::ffi::c_void {
        self.0.as_ptr()
    }
}

impl XdpPacket {
    #[inline(always)]
    fn store<T>(&self, offset: usize, value: &T) -> Result<(), ()> {
        // SAFETY: the helper bounds-checks `offset..offset + size_of::<T>()` against the packet.
        let result = unsafe {
            bpf_xdp_store_bytes(
                self.0.ctx,
                offset as u32,
                value as *const T as *mut core::ffi::c_void,
                core::mem::size_of::<T>() as u32,
            )
        };
        if result == 0 {
            Ok(())
        } else {
            Err(())
        }
    }
}

impl Packet for XdpPacket {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        let mut value = core::mem::MaybeUninit::<T>::uninit();
        // SAFETY: the helper bounds-checks the read and fills `value` completely on success.
        let result = unsafe {
            bpf_xdp_load_bytes(
                self.0.ctx,
                offset as u32,
                value.as_mut_ptr().cast(),
                core::mem::size_of::<T>() as u32,
            )
        };
        // SAFETY: initialised by the successful helper call.
        (result == 0).then(|| unsafe { value.assume_init() })
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        // The helper, not `data_end - data`: pointer subtraction needs CAP_PERFMON.
        // SAFETY: the context pointer is the program's own.
        unsafe { bpf_xdp_get_buff_len(self.0.ctx) as u32 }
    }

    #[inline(always)]
    fn rewrite_port(&mut self, l4: usize, field: usize, old: u16, new: u16) -> Result<(), ()> {
        // XDP has no checksum helper. Before an skb exists the checksum is complete (a NIC
        // delivers it so, and veth resolves partial checksums before running XDP), so the
        // RFC 1624 update is exact.
        let checksum = self.load::<u16>(l4 + TCP_CHECKSUM).ok_or(())?;
        let updated = packet::checksum_replace(checksum, old, new);
        self.store(l4 + TCP_CHECKSUM, &updated)?;
        self.store(l4 + field, &new)
    }
}

/// Ingress classifier: public port → internal port.
#[classifier]
fn tc_ingress(ctx: TcContext) -> i32 {
    match ingress(&mut TcPacket(ctx)) {
        Verdict::Pass => TC_ACT_UNSPEC,
        Verdict::Drop => TC_ACT_SHOT,
    }
}

/// Egress classifier: internal port → public port.
#[classifier]
fn tc_egress(ctx: TcContext) -> i32 {
    match egress(&mut TcPacket(ctx)) {
        Verdict::Pass => TC_ACT_UNSPEC,
        Verdict::Drop => TC_ACT_SHOT,
    }
}

/// XDP ingress: the same redirect as `tc_ingress`, earlier in the receive path.
#[xdp]
fn xdp_ingress(ctx: XdpContext) -> u32 {
    match ingress(&mut XdpPacket(ctx)) {
        Verdict::Pass => XDP_PASS,
        Verdict::Drop => XDP_DROP,
    }
}

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
const ENOENT: i32 = 2;
/// `bpf_sk_assign` flag: replace a socket an earlier program selected.
const BPF_SK_LOOKUP_F_REPLACE: u64 = 1;

/// sk_lookup: a new TCP connection to a public port, on any address but a loopback one, goes to
/// muxer's listening socket of its family (which the kernel may then trade for another socket of
/// its SO_REUSEPORT group, so the workers and their CPU steering still apply). Every other lookup
/// goes on as usual: loopback addresses keep local clients, and muxer's own connections to sshd,
/// on sshd; without a listening socket in `LISTENERS` the connection reaches the original service.
#[sk_lookup]
fn sk_lookup_steer(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands the program a valid context for the duration of the call.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let port = lookup.local_port as u16;
    // SAFETY: the value is only tested for presence; the map is only written by the daemon.
    if unsafe { PUBLIC_PORTS.get(port) }.is_none() {
        return SK_PASS;
    }
    let (listener, loopback) = match lookup.family {
        AF_INET => (Listener::V4, u32::from_be(lookup.local_ip4) >> 24 == 127),
        AF_INET6 => {
            let ip = lookup.local_ip6;
            let loopback = ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && u32::from_be(ip[3]) == 1;
            (Listener::V6, loopback)
        }
        _ => return SK_PASS,
    };
    if loopback {
        count(Counter::SkLookupLocal);
        return SK_PASS;
    }
    // REPLACE: programs run in the order they were attached, so the newest muxer's choice wins
    // over a program an earlier muxer, still alive, left on the namespace.
    match LISTENERS.redirect_sk_lookup(&ctx, listener as u32, BPF_SK_LOOKUP_F_REPLACE) {
        Ok(()) => count(Counter::SkLookupAssigned),
        Err(error) if error == -ENOENT => count(Counter::PassedNoListener),
        Err(_) => count(Counter::SkLookupErrors),
    }
    SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// bpf_sk_lookup_tcp, bpf_skc_lookup_tcp and bpf_sk_release are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
