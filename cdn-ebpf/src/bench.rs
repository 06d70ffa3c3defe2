//! Benchmark programs, loaded only by `cargo xtask bench`, never attached.
//!
//! BPF_PROG_TEST_RUN with `repeat > 1` runs a program again and again on the same buffer, so a
//! program that rewrites the packet would see its own output from the second run on. These
//! wrappers save the frame, run the real packet path, and put the frame back as it was, so
//! every repetition handles the original packet. The baseline wrapper does the same saving
//! and restoring around nothing; the difference between the two is the cost of the path.
//!
//! Saving and restoring use the 5.18 helpers `bpf_xdp_{get_buff_len,load_bytes,store_bytes}`:
//! one call each and no loop, so the verifier does not multiply the path's states, and
//! benchmarks only run on the machines that build them.

use aya_ebpf::{
    bindings::xdp_action,
    cty::c_void,
    helpers::generated::{
        bpf_xdp_adjust_head, bpf_xdp_get_buff_len, bpf_xdp_load_bytes, bpf_xdp_store_bytes,
    },
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};

use cdn_common::counters::Action;

use crate::{steer, trace, verdict};

/// Save area size; frames up to 255 bytes can be saved.
const SAVED_BYTES: usize = 256;

#[map(name = "BENCH_SAVED")]
static BENCH_SAVED: PerCpuArray<[u8; SAVED_BYTES]> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn frame_len(ctx: &XdpContext) -> u32 {
    // SAFETY: plain helper call on our context.
    unsafe { bpf_xdp_get_buff_len(ctx.ctx) as u32 }
}

/// `len` in a form whose range the verifier can see (14..=255) for the copy helpers, which need
/// a bounded, non-zero size. The volatile round trip keeps the compiler from folding the mask
/// away on the strength of the caller's range check, which the verifier cannot follow.
#[inline(always)]
fn copy_len(len: u32) -> u32 {
    // SAFETY: reads a local we own.
    let hidden = unsafe { core::ptr::read_volatile(&len) };
    (hidden & 0xff).max(14)
}

/// Copies the frame into the per-CPU save area; its length, or `None` if it cannot be saved.
#[inline(always)]
fn save(ctx: &XdpContext) -> Option<u32> {
    let len = frame_len(ctx);
    if !(14..SAVED_BYTES as u32).contains(&len) {
        return None;
    }
    let len = copy_len(len);
    let saved = BENCH_SAVED.get_ptr_mut(0)?;
    // SAFETY: copies `len` (<= the map value's size) bytes into our map value.
    let rc = unsafe { bpf_xdp_load_bytes(ctx.ctx, 0, saved.cast::<c_void>(), len) };
    (rc == 0).then_some(len)
}

/// Moves the frame's start back to where it was (the paths only ever grow or shrink the head)
/// and copies the saved bytes back.
#[inline(always)]
fn restore(ctx: &XdpContext, len: u32) -> Option<()> {
    let delta = frame_len(ctx) as i32 - len as i32;
    // SAFETY: plain helper call on our context.
    if delta != 0 && unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return None;
    }
    let len = copy_len(len);
    let saved = BENCH_SAVED.get_ptr_mut(0)?;
    // SAFETY: copies `len` bytes of our map value back into the frame, which has that length.
    let rc = unsafe { bpf_xdp_store_bytes(ctx.ctx, 0, saved.cast::<c_void>(), len) };
    (rc == 0).then_some(())
}

/// The real packet path between `save` and `restore`.
#[xdp]
pub fn bench_steer(ctx: XdpContext) -> u32 {
    let Some(len) = save(&ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    let verdict = steer::process(&ctx);
    let verdict = trace::trace(&ctx, verdict);
    // A frame that cannot be put back makes the run invalid: it is counted as aborted, like
    // the action returned.
    let verdict = match restore(&ctx, len) {
        Some(()) => verdict,
        None => verdict.with_action(Action::Aborted),
    };
    verdict::finish(verdict)
}

/// Nothing between `save` and `restore`: the harness's cost.
#[xdp]
pub fn bench_baseline(ctx: XdpContext) -> u32 {
    let Some(len) = save(&ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    match restore(&ctx, len) {
        Some(()) => xdp_action::XDP_PASS,
        None => xdp_action::XDP_ABORTED,
    }
}
