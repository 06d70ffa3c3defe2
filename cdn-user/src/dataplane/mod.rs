//! The kernel side of the controller: the XDP program and typed access to its maps
//! ([`program`]), where they are pinned ([`bpffs`]), the steering tables written into them
//! ([`tables`]), and the next hops kept fresh for the program ([`nexthop`]).

pub mod bpffs;
pub mod nexthop;
pub mod object;
pub mod program;
pub mod tables;

pub use bpffs::ensure_bpffs;
pub use program::{Attachment, DataPlane, DataPlaneError, LoadOptions};
