//! Support code shared by cdn-steer's tests and its network-namespace lab: commands with useful
//! error messages, network namespaces and child processes that clean up after themselves (also
//! when a test fails), BIRD instances, private bpf filesystems, the workspace's built binaries,
//! waiting for a condition, and log capture.
//!
//! Nothing here depends on the controller crate: `cdn-user` uses this crate in its own unit
//! tests.

pub mod binaries;
pub mod bird;
pub mod bpffs;
pub mod cmd;
pub mod logcap;
pub mod netns;
pub mod process;
pub mod scratch;
pub mod wait;

pub use bpffs::BpfMount;
pub use cmd::{run, run_with_input};
pub use netns::Netns;
pub use process::Process;
