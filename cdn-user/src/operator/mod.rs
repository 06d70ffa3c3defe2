//! What operators and their tools talk to: Prometheus metrics and the peer endpoints over HTTP,
//! and the control socket the CLI uses.

pub mod check;
pub mod cli;
pub mod control;
pub mod http;
pub mod lookup;
pub mod metrics;
pub mod preflight;
pub mod report;
