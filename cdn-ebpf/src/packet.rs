//! Bounds-checked access to the frame.
//!
//! Every read and write goes through [`Frame::at`], which compares the end of the access with
//! `data_end` as *pointers*: that is the comparison the verifier understands on every kernel
//! since 4.x. Offsets passed in are always bounded by construction (fixed header sizes, or an
//! explicit `MAX_HEADER_OFFSET` check), so the verifier can track their range.

use aya_ebpf::programs::XdpContext;

use crate::wire::Field;

/// Largest offset at which the program still looks for a header. Anything deeper is dropped as
/// unsupported; keeping offsets below this lets the verifier bound every variable offset.
pub const MAX_HEADER_OFFSET: usize = 512;

/// Largest offset any access starts at: a header that starts by `MAX_HEADER_OFFSET`, plus the
/// deepest field read inside it.
const MAX_ACCESS_OFFSET: usize = MAX_HEADER_OFFSET + 64;

#[derive(Clone, Copy)]
pub struct Frame {
    pub start: usize,
    pub end: usize,
}

impl Frame {
    #[inline(always)]
    pub fn new(ctx: &XdpContext) -> Self {
        Self {
            start: ctx.data(),
            end: ctx.data_end(),
        }
    }

    /// Frame length in bytes.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Pointer to a `T` at `offset`, if the whole `T` lies inside the frame.
    ///
    /// Use it for `T` of two bytes or more: for one byte the compiler rewrites
    /// `ptr + 1 > end` as `ptr >= end`, a form older verifiers do not learn a range from.
    #[inline(always)]
    pub fn at<T>(&self, offset: usize) -> Option<*mut T> {
        // Offsets that travelled through memory (struct fields, function arguments) reach the
        // verifier without a known range; this check gives every access one, at the cost of a
        // compare that is free next to the memory access.
        if offset > MAX_ACCESS_OFFSET {
            return None;
        }
        let ptr = self.start + offset;
        if ptr + core::mem::size_of::<T>() > self.end {
            return None;
        }
        Some(ptr as *mut T)
    }

    /// Reads a `T` at `offset` with one load per field.
    ///
    /// Headers sit at any offset, so the pointer may not be aligned for `T`. BPF loads have no
    /// alignment requirement on packet memory where the kernel runs XDP natively (x86-64,
    /// arm64: the verifier only enforces it with BPF_F_STRICT_ALIGNMENT), and the BPF backend
    /// turns this into plain loads. `read_unaligned` would instead be split into one load per
    /// byte, several times slower on the hot path. Use integer types (`u16`, `u32`, `[u32; 4]`)
    /// rather than byte arrays so the loads are full width.
    #[inline(always)]
    pub fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        // SAFETY: `at` checked that the bytes lie inside the packet; see above on alignment.
        self.at::<T>(offset).map(|p| unsafe { core::ptr::read(p) })
    }

    /// Reads `field` of the header that starts at `header` (see [`Frame::read`]).
    #[inline(always)]
    pub fn get<T: Copy>(&self, header: usize, field: Field<T>) -> Option<T> {
        self.read::<T>(header + field.off())
    }

    /// True if `len` bytes starting at `offset` lie inside the frame.
    #[inline(always)]
    pub fn has(&self, offset: usize, len: usize) -> bool {
        self.start + offset + len <= self.end
    }
}
