//! The kernel side of the controller: the XDP program and typed access to its maps
//! ([`program`]), the steering MAC's key ([`auth`]), where they are pinned ([`bpffs`]), the steering tables written into them
//! ([`tables`]), the next hops kept fresh for the program ([`nexthop`]), and the live trace's
//! events ([`trace`]).

pub mod auth;
pub mod bpffs;
pub mod clock;
pub mod learned;
mod member_maps;
pub mod nexthop;
pub mod object;
pub mod program;
pub mod stale_pins;
pub mod tables;
pub mod trace;

pub use auth::steer_auth_key;
pub use bpffs::ensure_bpffs;
pub use clock::monotonic_ns;
pub use program::{Attachment, DataPlane, DataPlaneError, LoadOptions};
pub use trace::TraceReader;
