//! The cdn-steer controller as a library, so the integration tests drive the same code the
//! daemon runs.

pub mod dataplane;
pub mod ebpf_object;
pub mod config;
pub mod history;
pub mod maglev;
