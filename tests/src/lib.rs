//! Support code for cdn-steer's integration tests, benchmarks and lab: test frames, a data plane
//! in a known state, and the lab. Network namespaces, commands and child processes come from
//! `cdn-test-support`, shared with the controller's unit tests.

pub mod bpf_interp;
pub mod chaos;
pub mod content;
pub mod difftest;
pub mod download;
pub mod h3;
pub mod lab;
pub mod model;
pub mod node_host;
pub mod packets;
pub mod rate;
pub mod scenario;
pub mod udp_flows;

/// Network namespaces and commands (`cdn_tests::netns::{Netns, join, run}`).
pub mod netns {
    pub use cdn_test_support::{cmd::run, netns::*};
}

/// XDP actions, as the program returns them.
pub mod xdp {
    pub const DROP: u32 = 1;
    pub const PASS: u32 = 2;
    pub const TX: u32 = 3;
    pub const REDIRECT: u32 = 4;
}
