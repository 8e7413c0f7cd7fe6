//! TC programs loaded by `muxer run`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_PIPE,
    macros::{classifier, map},
    maps::PerCpuArray,
    programs::TcContext,
};
use muxer_common::Counter;

/// Per-CPU counters indexed by [`Counter`].
#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[inline(always)]
fn bump(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU map; nothing else writes it
        // concurrently.
        unsafe { *slot += 1 };
    }
}

/// Ingress classifier: counts packets and lets them pass.
#[classifier]
pub fn tc_ingress(_ctx: TcContext) -> i32 {
    bump(Counter::IngressPackets);
    TC_ACT_PIPE
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
