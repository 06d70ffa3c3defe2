//! The cluster logic every node computes alike from the shared configuration: where flows go
//! (Maglev), where they went before (hop history, and its sync between members), and which
//! members can take them (health).

pub mod claims;
pub mod flap_guard;
pub mod health;
pub mod history;
pub mod maglev;
pub mod peer_auth;
pub mod peer_control;
pub mod peer_http;
pub mod pops;
pub mod probe;
pub mod sync;
