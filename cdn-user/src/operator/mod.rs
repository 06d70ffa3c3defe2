//! What operators and their tools talk to: Prometheus metrics and the peer endpoints over HTTP,
//! and the control socket the CLI uses.

pub mod cli;
pub mod control;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod report;
