//! Everything the XDP program and the controller must agree on, defined once.
//!
//! - [`maps`]: the layout of every BPF map key and value, and the map names.
//! - [`wire`]: the steering encapsulation header carried between nodes.
//! - [`hash`]: the keyed flow hash; the kernel and userspace call the same function.
//! - [`trace`]: the live packet trace's filter and events.
//! - [`quic_lb`]: the QUIC-LB connection-ID layout QUIC packets are routed by.
//! - [`counters`]: why (reason) and what (action) for every packet, and the per-CPU counters
//!   indexed by the pair, with their metric names.
//!
//! All types are `#[repr(C)]`, contain no padding the compiler could fill with garbage (padding is
//! explicit), and are plain data, so the userspace side can implement `aya::Pod` for them.
#![no_std]

pub mod counters;
pub mod hash;
pub mod maps;
pub mod quic_lb;
pub mod trace;
pub mod wire;

#[cfg(feature = "user")]
mod pod {
    //! `aya::Pod` marks types that may be copied to and from the kernel byte for byte.
    use crate::maps::*;

    // SAFETY (all impls below): each type is `#[repr(C)]`, `Copy`, built only from integers and
    // integer arrays, and has explicit padding fields, so every bit pattern is a valid value and
    // no byte is uninitialised.
    unsafe impl aya::Pod for NodeConfig {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Bucket {}
    unsafe impl aya::Pod for QuicServer {}
    unsafe impl aya::Pod for Member {}
    unsafe impl aya::Pod for MemberAddr {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for MemberStats {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Learned {}
    unsafe impl aya::Pod for ClaimEvent {}
    unsafe impl aya::Pod for crate::trace::TraceFilter {}
}
