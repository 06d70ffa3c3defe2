//! `cargo xtask chaos`: downloads through the lab while controllers, BIRD, web servers and
//! whole nodes are killed and restarted, bad configurations are reloaded, SYNs and ACKs are
//! flooded and routes flip, all drawn from a seeded schedule. Every lost download must be
//! explained by its owner's death.
//!
//! - [`schedule`]: the kinds of fault and the seeded episodes;
//! - [`faults`]: what each episode does to the lab and how it is repaired;
//! - [`flood`]: bounded floods of forged segments from the client namespace;
//! - [`accounting`]: blaming each lost download, and the report;
//! - [`runner`]: the run itself.

pub mod accounting;
pub mod faults;
pub mod flood;
pub mod runner;
pub mod schedule;
