//! Empty library target: lets `cdn-user` declare a build-dependency on this crate, so cargo
//! rebuilds the embedded XDP object whenever this crate changes. The program is the binary.
#![no_std]
