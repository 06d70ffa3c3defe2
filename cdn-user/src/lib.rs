//! The cdn-steer controller as a library, so the integration tests drive the same code the
//! daemon runs. One folder per concern:
//!
//! - [`dataplane`]: the kernel side: loading and pinning the XDP program and its maps, writing
//!   the steering tables, keeping next hops fresh.
//! - [`cluster`]: what every node computes alike: Maglev placement, hop history and its sync
//!   between members, member health.
//! - [`bgp`]: announcing and withdrawing the anycast prefix through BIRD.
//! - [`operator`]: what an operator talks to: metrics, the control socket, the HTTP server.
//! - [`config`]: the configuration file: schema, defaults, checks, example.
//! - [`daemon`]: the orchestrator that starts the parts above and wires them together.

pub mod bgp;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod operator;
