//! The verdict on one packet: the action the program returns and the reason it is counted
//! under, carried together from the path that decides to the one place that counts.
//!
//! BPF functions return scalars only, so a verdict is one `u64` (`repr(transparent)`):
//!
//! ```text
//! bits 0..8    Action (the XDP return code)
//! bits 8..16   Reason
//! bit  16      encapsulation pending (see `Verdict::encapsulate`)
//! bit  17      a target member is recorded (for the live trace)
//! bits 18..28  that member's id
//! bit  28      a search step is pending (see `Verdict::search`; bits 32..64 describe it)
//! bits 32..64  informational reasons that happened on the way, bit i for `Reason::INFO[i]`
//! ```

use cdn_common::{
    counters::{Action, COUNTER_SLOTS, Reason},
    maps::{MAX_MEMBERS, NO_MEMBER},
};

use crate::maps::count_slot;

const ACTION_MASK: u64 = 0xff;
const REASON_SHIFT: u32 = 8;
const ENCAP_PENDING: u64 = 1 << 16;
const HAS_TARGET: u64 = 1 << 17;
const TARGET_SHIFT: u32 = 18;
const TARGET_MASK: u64 = 0x3ff;
const INFO_SHIFT: u32 = 32;
/// A search step is pending (see `Verdict::search`): bits 32..64 say where its packet is.
const SEARCH_PENDING: u64 = 1 << 28;

const _: () = assert!(
    MAX_MEMBERS as u64 <= TARGET_MASK + 1,
    "member ids fit in 10 bits"
);

const _: () = assert!(Reason::INFO_COUNT <= 32, "info reasons are a 32-bit mask");
const _: () = assert!(Reason::COUNT <= 0xff && Action::COUNT <= 0xff);

#[repr(transparent)]
#[derive(Clone, Copy)]
#[must_use]
pub struct Verdict(u64);

impl Verdict {
    #[inline(always)]
    pub const fn new(action: Action, reason: Reason) -> Self {
        Self(action as u64 | (reason as u64) << REASON_SHIFT)
    }

    #[inline(always)]
    pub const fn pass(reason: Reason) -> Self {
        Self::new(Action::Pass, reason)
    }

    #[inline(always)]
    pub const fn drop(reason: Reason) -> Self {
        Self::new(Action::Drop, reason)
    }

    /// A path's request to encapsulate the packet (as the `Encap` it filled in says) and to
    /// count `reason` with the action the transmission ends in. Not a final verdict: the
    /// top-level function runs the encapsulation, so that its stack frame and the paths'
    /// frames are never on the call chain together.
    #[inline(always)]
    pub const fn encapsulate(reason: Reason) -> Self {
        Self(ENCAP_PENDING | Self::drop(reason).0)
    }

    /// A path's request to run the search step (`search::search`) on the packet `packed`
    /// describes (`search::pack`, 32 bits, in place of the informational reasons: none has
    /// happened yet where a path asks). Not a final verdict: the top-level function runs it.
    #[inline(always)]
    pub const fn search(packed: u64) -> Self {
        Self(
            SEARCH_PENDING
                | Self::drop(Reason::LastHopAccept).0
                | (packed & 0xffff_ffff) << INFO_SHIFT,
        )
    }

    #[inline(always)]
    pub const fn is_search(self) -> bool {
        self.0 & SEARCH_PENDING != 0
    }

    /// The packet description of [`Verdict::search`].
    #[inline(always)]
    pub const fn search_packed(self) -> u64 {
        self.0 >> INFO_SHIFT
    }

    #[inline(always)]
    pub const fn is_encapsulate(self) -> bool {
        self.0 & ENCAP_PENDING != 0
    }

    /// The same reason (and informational reasons) with the action it ended in.
    #[inline(always)]
    pub const fn with_action(self, action: Action) -> Self {
        Self(self.0 & !(ACTION_MASK | ENCAP_PENDING) | action as u64)
    }

    /// Records an informational reason, counted on top of the verdict.
    #[inline(always)]
    pub const fn with_info(self, info: Reason) -> Self {
        // `info` is a constant at every call site, so the index is folded at compile time.
        Self(self.0 | 1 << (INFO_SHIFT + info.info_index()))
    }

    /// Records the member the packet is (or was to be) encapsulated for, for the live trace.
    #[inline(always)]
    pub const fn with_target(self, member: u16) -> Self {
        Self(self.0 | HAS_TARGET | (member as u64 & TARGET_MASK) << TARGET_SHIFT)
    }

    /// The member recorded by [`Verdict::with_target`], `NO_MEMBER` if none.
    #[inline(always)]
    pub const fn target(self) -> u16 {
        if self.0 & HAS_TARGET == 0 {
            NO_MEMBER
        } else {
            ((self.0 >> TARGET_SHIFT) & TARGET_MASK) as u16
        }
    }

    /// Index of the verdict's reason.
    #[inline(always)]
    pub const fn reason(self) -> u32 {
        ((self.0 >> REASON_SHIFT) & 0xff) as u32
    }

    /// The informational reasons, bit i for `Reason::INFO[i]`.
    #[inline(always)]
    pub const fn info(self) -> u32 {
        (self.0 >> INFO_SHIFT) as u32
    }

    /// The XDP return code.
    #[inline(always)]
    pub const fn action(self) -> u32 {
        (self.0 & ACTION_MASK) as u32
    }

    /// Slot of this verdict in `COUNTERS` (`cdn_common::counters::counter_slot`).
    #[inline(always)]
    const fn slot(self) -> u32 {
        self.reason() * Action::COUNT + self.action()
    }
}

/// Counts the packet's verdict (and its informational reasons, with the same action) and
/// returns the action: what is counted is by construction what the program returns. Every
/// entry point ends here, once per packet.
#[inline(always)]
pub fn finish(v: Verdict) -> u32 {
    let action = v.action();
    count_slot(v.slot());
    let info = v.0 >> INFO_SHIFT;
    if info != 0 {
        // Fixed trip count (the informational reasons), unrolled.
        for (i, r) in Reason::INFO.iter().enumerate() {
            if info & 1 << i != 0 {
                count_slot(*r as u32 * Action::COUNT + action);
            }
        }
    }
    action
}

/// The verifier bounds map indices itself (an array lookup checks the index); this documents
/// that every slot we can compute is inside the array.
const _: () = assert!(Reason::COUNT * Action::COUNT == COUNTER_SLOTS);
