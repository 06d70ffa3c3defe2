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
//!
//! The packet-rate benchmark (`cargo xtask bench --rate`) adds a live-frames generator, the bare
//! programs it compares `cdn_steer` with, and a sink; each counts the packets it handles in
//! `BENCH_COUNTS`, so rates are measured where the packets really went.

use aya_ebpf::{
    bindings::xdp_action,
    cty::c_void,
    helpers::generated::{
        bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_get_buff_len, bpf_xdp_load_bytes,
        bpf_xdp_store_bytes,
    },
    macros::{map, xdp},
    maps::{Array, DevMap, PerCpuArray},
    programs::XdpContext,
};

use cdn_common::{
    counters::Action,
    maps::{
        BENCH_FRAME_BYTES, BENCH_GEN_CONF_ENTRIES, BENCH_GEN_IFINDEX, BENCH_GEN_LEN,
        BENCH_SLOT_BARE, BENCH_SLOT_GEN, BENCH_SLOT_SINK, BENCH_SLOTS,
    },
};

use crate::{steer, trace, verdict};

/// Save area size; frames up to 255 bytes can be saved.
const SAVED_BYTES: usize = BENCH_FRAME_BYTES;

#[map(name = "BENCH_SAVED")]
static BENCH_SAVED: PerCpuArray<[u8; SAVED_BYTES]> = PerCpuArray::with_max_entries(1, 0);

/// Length of the saved frame. Kept in a map rather than across the packet path in a stack
/// slot: the path's frame together with the next-hop fallback's leaves none to spare.
#[map(name = "BENCH_SAVED_LEN")]
static BENCH_SAVED_LEN: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

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
fn save(ctx: &XdpContext) -> Option<()> {
    let len = frame_len(ctx);
    if !(14..SAVED_BYTES as u32).contains(&len) {
        return None;
    }
    let len = copy_len(len);
    let saved = BENCH_SAVED.get_ptr_mut(0)?;
    // SAFETY: copies `len` (<= the map value's size) bytes into our map value.
    let rc = unsafe { bpf_xdp_load_bytes(ctx.ctx, 0, saved.cast::<c_void>(), len) };
    let saved_len = BENCH_SAVED_LEN.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot of our map; XDP runs with preemption disabled.
    unsafe { *saved_len = len };
    (rc == 0).then_some(())
}

/// Moves the frame's start back to where it was (the paths only ever grow or shrink the head)
/// and copies the saved bytes back.
#[inline(always)]
fn restore(ctx: &XdpContext) -> Option<()> {
    let len = *BENCH_SAVED_LEN.get(0)?;
    let saved = BENCH_SAVED.get_ptr_mut(0)?;
    write_frame(ctx, len, saved)
}

/// Makes the frame `len` bytes long by moving its start, and copies `len` bytes of `from` into
/// it.
#[inline(always)]
fn write_frame(ctx: &XdpContext, len: u32, from: *mut [u8; SAVED_BYTES]) -> Option<()> {
    let delta = frame_len(ctx) as i32 - len as i32;
    // SAFETY: plain helper call on our context.
    if delta != 0 && unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return None;
    }
    let len = copy_len(len);
    // SAFETY: copies `len` (<= SAVED_BYTES) bytes of a map value into the frame, which has
    // that length.
    let rc = unsafe { bpf_xdp_store_bytes(ctx.ctx, 0, from.cast::<c_void>(), len) };
    (rc == 0).then_some(())
}

/// The real packet path between `save` and `restore`.
#[xdp]
#[inline(always)]
pub fn bench_steer(ctx: XdpContext) -> u32 {
    if save(&ctx).is_none() {
        return xdp_action::XDP_ABORTED;
    }
    let verdict = steer::process(&ctx);
    let verdict = trace::trace(&ctx, verdict);
    // A frame that cannot be put back makes the run invalid: it is counted as aborted, like
    // the action returned.
    let verdict = match restore(&ctx) {
        Some(()) => verdict,
        None => verdict.with_action(Action::Aborted),
    };
    verdict::finish(verdict)
}

/// Nothing between `save` and `restore`: the harness's cost.
#[xdp]
pub fn bench_baseline(ctx: XdpContext) -> u32 {
    if save(&ctx).is_none() {
        return xdp_action::XDP_ABORTED;
    }
    match restore(&ctx) {
        Some(()) => xdp_action::XDP_PASS,
        None => xdp_action::XDP_ABORTED,
    }
}

// --- Packet rate (`cargo xtask bench --rate`) ---

/// The frame the generator sends (its length is `BENCH_GEN_CONF[BENCH_GEN_LEN]`).
#[map(name = "BENCH_GEN_FRAME")]
static BENCH_GEN_FRAME: Array<[u8; BENCH_FRAME_BYTES]> = Array::with_max_entries(1, 0);

/// The generator's settings, indexed by `BENCH_GEN_*`.
#[map(name = "BENCH_GEN_CONF")]
static BENCH_GEN_CONF: Array<u32> = Array::with_max_entries(BENCH_GEN_CONF_ENTRIES, 0);

/// Where the bare redirect program sends frames: index 0.
#[map(name = "BENCH_DEVICES")]
static BENCH_DEVICES: DevMap = DevMap::with_max_entries(1, 0);

/// Packets handled, per program role (`BENCH_SLOT_*`) and CPU.
#[map(name = "BENCH_COUNTS")]
static BENCH_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(BENCH_SLOTS, 0);

#[inline(always)]
fn count(slot: u32) {
    if let Some(n) = BENCH_COUNTS.get_ptr_mut(slot) {
        // SAFETY: this CPU's own value; XDP programs do not nest on a CPU, so nothing else
        // writes it meanwhile.
        unsafe { *n += 1 };
    }
}

/// Live-frames generator: run by BPF_PROG_TEST_RUN with `BPF_F_TEST_XDP_LIVE_FRAMES`, it sends
/// the configured frame out of the configured interface on every repetition. Live mode
/// recycles its pages without rewriting them, and the program under test rewrites the page in
/// place (encapsulation, MACs, a moved start), so the frame is written anew each time.
#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    generate(&ctx).unwrap_or(xdp_action::XDP_ABORTED)
}

#[inline(always)]
fn generate(ctx: &XdpContext) -> Option<u32> {
    let ifindex = *BENCH_GEN_CONF.get(BENCH_GEN_IFINDEX)?;
    let len = *BENCH_GEN_CONF.get(BENCH_GEN_LEN)?;
    if !(14..SAVED_BYTES as u32).contains(&len) {
        return None;
    }
    let frame = BENCH_GEN_FRAME.get_ptr_mut(0)?;
    write_frame(ctx, len, frame)?;
    count(BENCH_SLOT_GEN);
    // SAFETY: plain helper call; XDP_REDIRECT, or XDP_ABORTED for flags it rejects.
    Some(unsafe { bpf_redirect(ifindex, 0) } as u32)
}

/// Bare XDP_TX: the floor for forwarding back out of the receiving interface.
#[xdp]
pub fn bench_tx(_ctx: XdpContext) -> u32 {
    count(BENCH_SLOT_BARE);
    xdp_action::XDP_TX
}

/// Bare redirect through a devmap, as `cdn_steer` redirects to another interface.
#[xdp]
pub fn bench_redirect(_ctx: XdpContext) -> u32 {
    count(BENCH_SLOT_BARE);
    BENCH_DEVICES
        .redirect(0, 0)
        .unwrap_or(xdp_action::XDP_ABORTED)
}

/// Bare XDP_PASS, counting.
#[xdp]
pub fn bench_pass(_ctx: XdpContext) -> u32 {
    count(BENCH_SLOT_BARE);
    xdp_action::XDP_PASS
}

/// Receives forwarded frames on the far end of a veth (a veth only takes redirected frames
/// when its peer has an XDP program) and drops them, counting.
#[xdp]
pub fn bench_sink(_ctx: XdpContext) -> u32 {
    count(BENCH_SLOT_SINK);
    xdp_action::XDP_DROP
}
