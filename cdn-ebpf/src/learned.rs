//! Learned owners (README "PoPs: learned owners").
//!
//! A flow found by a search in another PoP is claimed by its owner there; the controller turns
//! the claim into a `LEARNED` entry and sets the flow's bucket bit. At ingress, a searchable
//! flow of a bucket whose bit is set is looked up, and one with an entry naming another member
//! goes straight to that member: one cross-PoP hop instead of a search.
//!
//! The bit test is inlined (the only cost for every other bucket); the lookup and the claim
//! event run in BPF functions of their own, so that the 40-byte key never takes a slot of the
//! entry point's frame, which has none to spare.

use aya_ebpf::{bindings::xdp_md, programs::XdpContext};
use cdn_common::{
    maps::{CLAIM_BUDGET_UNKNOWN, ClaimEvent, FlowKey, NO_MEMBER},
    wire::{
        STEER_HEADER_LEN, STEER_MAC_LEN, STEER_VERSION_SEARCH, STEER_VERSION_SEARCH_AUTH,
        SteerHeader,
    },
};

use crate::{
    maps::{CLAIM_EVENTS, LEARNED, LEARNED_BUCKETS},
    packet::Frame,
    parse::Flow,
};

/// `FlowKey` as the program writes it: ten words.
type KeyWords = [u32; 10];
const _: () = assert!(core::mem::size_of::<FlowKey>() == core::mem::size_of::<KeyWords>());
const _: () = assert!(core::mem::offset_of!(ClaimEvent, key) == 0);
const _: () = assert!(core::mem::offset_of!(ClaimEvent, starter) == 40);
const _: () = assert!(core::mem::offset_of!(ClaimEvent, budget_left) == 42);

/// Whether some learned flow has bucket index `bucket` (`hash % table_size`).
#[inline(always)]
pub fn marked(bucket: u32) -> bool {
    LEARNED_BUCKETS
        .get(bucket / 32)
        .is_some_and(|word| word & (1 << (bucket % 32)) != 0)
}

/// The flow's addresses, ports and protocol, in one register for a BPF function's argument:
/// source offset (bits 0..16), destination offset (16..32), protocol (32..40), IPv6 (bit 40).
#[inline(always)]
fn pack(flow: &Flow) -> u64 {
    (flow.src_off as u64 & 0xffff)
        | (flow.dst_off as u64 & 0xffff) << 16
        | (flow.proto as u64) << 32
        | (flow.v6 as u64) << 40
}

/// The member a claim taught for the flow (a TCP or UDP flow, not an ICMP error: its offsets
/// are the client's packet's), with the packet counted against the entry if it is another
/// member than `me`; `NO_MEMBER` if there is no entry.
#[inline(always)]
pub fn member(ctx: &XdpContext, flow: &Flow, me: u16) -> u16 {
    lookup(ctx.ctx, pack(flow), flow.ports as u64, me as u64) as u16
}

/// Reports an accepted search for the flow (`starter`: the member that started it; its
/// inner packet at `inner_off`) to the controller. False if the ring is full (the claim is
/// lost).
#[inline(always)]
pub fn claim(ctx: &XdpContext, flow: &Flow, starter: u16, inner_off: usize) -> bool {
    // One register for both: the caller's frame has no room for another live value.
    let who = starter as u64 | (inner_off as u64 & 0xffff) << 16;
    emit_claim(ctx.ctx, pack(flow), flow.ports as u64, who) != 0
}

/// The hop budget the search header in front of the inner packet at `inner_off` arrived with
/// (it tells the controller how many hops the search took), or `CLAIM_BUDGET_UNKNOWN`. Read
/// here rather than passed by the caller, whose frame has no slot to spare; the header is
/// found again as the one, right before the inner packet (version 3) or before its MAC
/// (version 4), whose version and starter match.
#[inline(always)]
fn budget_left(frame: &Frame, inner_off: usize, starter: u16) -> u8 {
    const BACK: usize = STEER_HEADER_LEN + STEER_MAC_LEN;
    const _: () = assert!(
        STEER_HEADER_LEN == 8 && STEER_MAC_LEN == 8,
        "two words back"
    );
    // One read of the two words before the inner packet. Masked, so that the compiler
    // checks the bounds of this offset rather than folding it into `inner_off` and reading
    // behind a checked pointer, which the verifier refuses.
    let Some(words) = frame.read::<[u64; 2]>(inner_off.wrapping_sub(BACK) & 0xffff) else {
        return CLAIM_BUDGET_UNKNOWN;
    };
    let matches = |sh: &SteerHeader, version: u8| {
        sh.version == version && u16::from_be(sh.hops[0]) == starter
    };
    // SAFETY: SteerHeader is 8 bytes of plain integers, any bit pattern is valid.
    let (signed, plain) = unsafe {
        (
            core::mem::transmute::<u64, SteerHeader>(words[0]),
            core::mem::transmute::<u64, SteerHeader>(words[1]),
        )
    };
    if matches(&plain, STEER_VERSION_SEARCH) {
        plain.hop_budget
    } else if matches(&signed, STEER_VERSION_SEARCH_AUTH) {
        signed.hop_budget
    } else {
        CLAIM_BUDGET_UNKNOWN
    }
}

/// Writes the flow's key (see `pack`) at `key`; false if the addresses are not in the frame.
///
/// # Safety
///
/// `key` points at 40 writable bytes, 4-byte aligned.
#[inline(always)]
unsafe fn write_key(frame: &Frame, packed: u64, ports: u64, key: *mut KeyWords) -> bool {
    let src_off = (packed & 0xffff) as usize;
    let dst_off = ((packed >> 16) & 0xffff) as usize;
    let proto = ((packed >> 32) & 0xff) as u32;
    let v6 = packed & 1 << 40 != 0;
    // IPv4 as IPv4-mapped IPv6: ::ffff:a.b.c.d, the third word's bytes 00 00 ff ff.
    let mapped = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
    let (src, dst) = if v6 {
        let (Some(src), Some(dst)) = (
            frame.read::<[u32; 4]>(src_off),
            frame.read::<[u32; 4]>(dst_off),
        ) else {
            return false;
        };
        (src, dst)
    } else {
        let (Some(src), Some(dst)) = (frame.read::<u32>(src_off), frame.read::<u32>(dst_off))
        else {
            return false;
        };
        ([0, 0, mapped, src], [0, 0, mapped, dst])
    };
    // SAFETY: the caller's promise; word stores only.
    unsafe {
        let k = &mut *key;
        k[0] = src[0];
        k[1] = src[1];
        k[2] = src[2];
        k[3] = src[3];
        k[4] = dst[0];
        k[5] = dst[1];
        k[6] = dst[2];
        k[7] = dst[3];
        // The ports as loaded from the packet: client port then VIP port, network order.
        k[8] = ports as u32;
        // The protocol byte, then three bytes of padding.
        k[9] = proto;
    }
    true
}

/// The packet's bounds, read from the context inside the BPF function. Volatile: plain
/// loads let the compiler hoist them into the caller and pass the packet pointers as
/// arguments instead of the context, as 32-bit values the callee widens with shifts, which
/// the verifier refuses on packet pointers.
#[inline(always)]
fn frame_of(ctx: *mut xdp_md) -> Frame {
    // SAFETY: `ctx` is the program's context, valid for the whole run.
    unsafe {
        Frame {
            start: core::ptr::read_volatile(&raw const (*ctx).data) as usize,
            end: core::ptr::read_volatile(&raw const (*ctx).data_end) as usize,
        }
    }
}

#[inline(never)]
fn lookup(ctx: *mut xdp_md, packed: u64, ports: u64, me: u64) -> u64 {
    let frame = frame_of(ctx);
    let mut key: KeyWords = [0; 10];
    // SAFETY: `key` is 40 bytes of this frame's stack, 4-byte aligned.
    if !unsafe { write_key(&frame, packed, ports, &mut key) } {
        return NO_MEMBER as u64;
    }
    // SAFETY: FlowKey is ten words' worth of plain integers (size checked above), any bit
    // pattern is a valid key.
    let key = unsafe { &*(&key as *const KeyWords).cast::<FlowKey>() };
    let Some(entry) = LEARNED.get_ptr_mut(key) else {
        return NO_MEMBER as u64;
    };
    // SAFETY: a non-NULL lookup result points at the map's value, valid until the program
    // returns. Concurrent CPUs may lose an increment: the count only tells the controller
    // whether the entry is still in use.
    unsafe {
        let member = (*entry).member;
        if member != NO_MEMBER && member as u64 != me {
            (*entry).packets += 1;
        }
        member as u64
    }
}

#[inline(never)]
fn emit_claim(ctx: *mut xdp_md, packed: u64, ports: u64, who: u64) -> u64 {
    let frame = frame_of(ctx);
    let starter = who as u16;
    let budget = budget_left(&frame, (who >> 16) as usize & 0xffff, starter);
    let Some(mut entry) = CLAIM_EVENTS.reserve::<ClaimEvent>(0) else {
        return 0;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: the reserved record is a `ClaimEvent` (48 bytes, 8-byte aligned), its key first.
    let written = unsafe { write_key(&frame, packed, ports, event.cast::<KeyWords>()) };
    if !written {
        entry.discard(0);
        return 1;
    }
    // SAFETY: as above; the starter, the budget left and the padding are the last two
    // words (little-endian: the starter in the low half of the first, then the budget).
    unsafe {
        let tail = event.cast::<u32>().add(10);
        *tail = starter as u32 | (budget as u32) << 16;
        *tail.add(1) = 0;
    }
    entry.submit(0);
    1
}
