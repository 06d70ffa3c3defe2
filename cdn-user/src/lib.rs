//! The cdn-steer controller as a library, so the integration tests drive the same code the
//! daemon runs.

pub mod announce;
pub mod bird;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod ebpf_object;
pub mod health;
pub mod history;
pub mod http;
pub mod maglev;
pub mod metrics;
pub mod nexthop;
pub mod sync;
pub mod tables;
