//! What operators and their tools talk to: Prometheus metrics and the peer endpoints over HTTP,
//! the control socket the CLI uses, and what the CLI computes itself: `check` (the file, then
//! the host's `preflight`) and `lookup --offline`.

pub mod check;
pub mod cli;
pub mod control;
pub mod http;
pub mod logging;
pub mod lookup;
pub mod metrics;
pub mod pop_drain;
pub mod preflight;
pub mod quic;
pub mod report;
pub mod status_text;
