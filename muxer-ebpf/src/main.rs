//! Kernel fast path of muxer: redirect the public port (22) to the daemon's port without iptables
//! or conntrack, and give replies their public port back.
//!
//! - `tc_ingress` / `xdp_ingress`: a SYN to a public port is redirected only when a socket listens
//!   on the muxer port (otherwise it goes to the original service: fail open even if this program
//!   outlives the daemon); the flow is recorded in `FLOWS`, and its later packets follow it.
//!   Packets of flows that began before the redirect existed are left alone, so SSH sessions
//!   opened while muxer was down survive its return.
//! - `tc_egress`: replies from the muxer port that belong to a recorded flow get the public port
//!   back as their source port. Direct connections to the muxer port are not in `FLOWS` and are
//!   left alone.
//! - `sk_lookup_steer` (the other mode): assigns a new TCP connection to a public port to muxer's
//!   listening socket of its family, held in `LISTENERS`. No packet is rewritten and no flow is
//!   recorded: the connection is an ordinary socket on the public port. Fail-open: a closed
//!   listening socket leaves the map, and the lookup then goes on to the original service.
#![no_std]
#![no_main]

mod packet;

use aya_ebpf::bindings::sk_action::SK_PASS;
use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS};
use aya_ebpf::bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC};
use aya_ebpf::helpers::{bpf_xdp_get_buff_len, bpf_xdp_load_bytes, bpf_xdp_store_bytes};
use aya_ebpf::macros::{classifier, map, sk_lookup, xdp};
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray, SockMap};
use aya_ebpf::programs::{SkLookupContext, TcContext, XdpContext};
use aya_ebpf::EbpfContext;
use aya_log_ebpf::{error, warn};
use muxer_common::{
    Counter, FlowKey, FlowValue, Listener, PortCounter, Setting, MAX_FLOWS, MAX_PUBLIC_PORTS,
};
use packet::{Packet, Parsed, Tcp, TCP_CHECKSUM, TCP_DEST_PORT, TCP_SOURCE_PORT};

#[map(name = "SETTINGS")]
static SETTINGS: Array<u32> = Array::with_max_entries(Setting::COUNT, 0);

#[map(name = "PUBLIC_PORTS")]
static PUBLIC_PORTS: HashMap<u16, u32> = HashMap::with_max_entries(MAX_PUBLIC_PORTS, 0);

#[map(name = "FLOWS")]
static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

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

/// The daemon's port in network byte order, or `None` while unset.
#[inline(always)]
fn muxer_port() -> Option<u16> {
    let port = *SETTINGS.get(Setting::MuxerPort as u32)?;
    (port != 0 && port <= 0xffff).then(|| (port as u16).to_be())
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
    let Some(target) = muxer_port() else {
        return pass(Counter::Passed);
    };
    let key = FlowKey {
        client_addr: segment.saddr,
        local_addr: segment.daddr,
        client_port: segment.sport,
        family: segment.family,
    };
    if segment.dport == target {
        // A connection straight to the muxer port: never rewritten. A new one may reuse the
        // tuple of an old redirected flow, whose record must not rewrite its replies.
        if segment.is_syn() {
            let _ = FLOWS.remove(key);
        }
        return pass(Counter::DirectToMuxerPort);
    }
    let public_port = u16::from_be(segment.dport);
    // SAFETY: the value is copied out at once; the map is only written by the daemon.
    let Some(&slot) = (unsafe { PUBLIC_PORTS.get(public_port) }) else {
        return pass(Counter::Passed);
    };
    if segment.is_syn() {
        if !packet::listener_exists(packet, &segment, target) {
            log_no_listener(packet, u16::from_be(target), public_port);
            return pass(Counter::PassedNoListener);
        }
        let value = FlowValue {
            public_port,
            slot: slot as u16,
        };
        // A client reusing its port finds its previous flow's record, usually with the same
        // value: replacing it costs an LRU node allocation and free per SYN, looking costs a read.
        let recorded = FLOWS.get_ptr(key).is_some_and(|flow| {
            // SAFETY: a valid map value pointer; copied out at once.
            let flow = unsafe { *flow };
            flow.public_port == value.public_port && flow.slot == value.slot
        });
        if !recorded && FLOWS.insert(key, value, 0).is_err() {
            return pass(Counter::PassedNoListener);
        }
        count(Counter::FlowsTracked);
    } else if FLOWS.get_ptr(key).is_none() {
        return pass(Counter::PassedUntracked);
    }
    rewrite(
        packet,
        &segment,
        TCP_DEST_PORT,
        segment.dport,
        target,
        slot,
        PortCounter::InPackets,
        PortCounter::InBytes,
    )
}

#[inline(always)]
fn egress<P: Packet>(packet: &mut P) -> Verdict {
    let Parsed::Tcp(segment) = packet::parse(packet) else {
        return Verdict::Pass;
    };
    let Some(target) = muxer_port() else {
        return Verdict::Pass;
    };
    if segment.sport != target {
        return Verdict::Pass;
    }
    let key = FlowKey {
        client_addr: segment.daddr,
        local_addr: segment.saddr,
        client_port: segment.dport,
        family: segment.family,
    };
    let Some(flow) = FLOWS.get_ptr(key) else {
        return Verdict::Pass;
    };
    // SAFETY: a valid map value pointer; copied out at once.
    let flow = unsafe { *flow };
    rewrite(
        packet,
        &segment,
        TCP_SOURCE_PORT,
        segment.sport,
        flow.public_port.to_be(),
        u32::from(flow.slot),
        PortCounter::OutPackets,
        PortCounter::OutBytes,
    )
}

// The log calls live in functions of their own (BPF-to-BPF calls, never inlined): inlined, the
// compiler reuses their stack slots for other values, and the verifier then refuses the program
// ("attempt to corrupt spilled pointer on stack") when loaded with CAP_BPF but without
// CAP_PERFMON, as the systemd unit does.
#[inline(never)]
fn log_no_listener<P: Packet>(packet: &P, target: u16, public_port: u16) {
    warn!(
        packet,
        "nothing listens on port {}: new connection to port {} left to the original service",
        target,
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
#[allow(clippy::too_many_arguments)]
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

/// Ingress classifier: public port → muxer port.
#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    match ingress(&mut TcPacket(ctx)) {
        Verdict::Pass => TC_ACT_UNSPEC,
        Verdict::Drop => TC_ACT_SHOT,
    }
}

/// Egress classifier: muxer port → public port, for recorded flows only.
#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    match egress(&mut TcPacket(ctx)) {
        Verdict::Pass => TC_ACT_UNSPEC,
        Verdict::Drop => TC_ACT_SHOT,
    }
}

/// XDP ingress: the same redirect as `tc_ingress`, earlier in the receive path.
#[xdp]
pub fn xdp_ingress(ctx: XdpContext) -> u32 {
    match ingress(&mut XdpPacket(ctx)) {
        Verdict::Pass => XDP_PASS,
        Verdict::Drop => XDP_DROP,
    }
}

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
const ENOENT: i32 = 2;

/// sk_lookup: a new TCP connection to a public port, on any address but a loopback one, goes to
/// muxer's listening socket of its family (which the kernel may then trade for another socket of
/// its SO_REUSEPORT group, so the workers and their CPU steering still apply). Every other lookup
/// goes on as usual: loopback addresses keep local clients, and muxer's own connections to sshd,
/// on sshd; without a listening socket in `LISTENERS` the connection reaches the original service.
#[sk_lookup]
pub fn sk_lookup_steer(ctx: SkLookupContext) -> u32 {
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
    match LISTENERS.redirect_sk_lookup(&ctx, listener as u32, 0) {
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

// bpf_sk_lookup_tcp and bpf_sk_release are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
