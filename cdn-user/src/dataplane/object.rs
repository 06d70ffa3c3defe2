//! The XDP program, compiled by `build.rs` and embedded in the binary.

/// The ELF object of the XDP program, aligned for aya's parser.
pub fn bytes() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cdn-steer"))
}
