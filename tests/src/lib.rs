//! Support code for cdn-steer's integration tests, benchmarks and lab: test frames, a data plane
//! in a known state, and network namespaces that clean up after themselves.

pub mod content;
pub mod download;
pub mod lab;
pub mod netns;
pub mod packets;
pub mod scenario;

/// XDP actions, as the program returns them.
pub mod xdp {
    pub const DROP: u32 = 1;
    pub const PASS: u32 = 2;
    pub const TX: u32 = 3;
    pub const REDIRECT: u32 = 4;
}
