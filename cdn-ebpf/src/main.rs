//! cdn-steer's XDP program: steers every packet of a flow to a VIP to the member that owns the
//! flow, whichever anycast node it reaches. See the README for the packet path.
#![no_std]
#![no_main]

mod auth;
mod bench;
mod encap;
mod learned;
mod maps;
mod packet;
mod parse;
mod placement;
mod quic;
mod search;
mod sockets;
mod steer;
mod trace;
mod verdict;
mod wire;

use aya_ebpf::{macros::xdp, programs::XdpContext};

// Inlined into the entry point the macro generates: a call here would cost every packet.
#[xdp]
#[inline(always)]
pub fn cdn_steer(ctx: XdpContext) -> u32 {
    let verdict = steer::process(&ctx);
    let verdict = trace::trace(&ctx, verdict);
    verdict::finish(verdict)
}

/// Benchmark baseline: the cheapest possible XDP program. Timed beside `cdn_steer` in the same
/// run, it measures the harness's own cost so that it can be subtracted. Never attached.
#[xdp]
pub fn baseline_pass(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable: the verifier rejects programs that could panic, since they cannot return.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
