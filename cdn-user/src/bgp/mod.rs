//! BGP: the node announces the anycast prefix through BIRD while it can serve, and withdraws
//! it when it cannot. [`bird`] speaks BIRD's control protocol; [`announce`] keeps the wanted
//! state asserted.

pub mod announce;
pub mod bird;
