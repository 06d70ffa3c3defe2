//! Header layouts, field by field (in the manner of smoltcp's `wire` module): every offset the
//! program reads or writes is named here once, with the width it is accessed with.
//!
//! A [`Field`] is an offset from the start of its header plus the type of the access. The
//! access itself stays a single load or store of that width, exactly what a bare offset
//! compiled to: the names cost nothing at run time. Multi-byte values are as on the wire
//! (network order); callers convert.

use core::marker::PhantomData;

use cdn_common::wire::{STEER_HEADER_LEN, SteerHeader};

/// A field of type `T` at a fixed offset inside a header.
pub struct Field<T> {
    off: usize,
    ty: PhantomData<T>,
}

// Not derived: a derive would require `T: Copy`, which `Field` does not need.
impl<T> Clone for Field<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Field<T> {}

impl<T> Field<T> {
    const fn at(off: usize) -> Self {
        Self {
            off,
            ty: PhantomData,
        }
    }

    /// Offset from the start of the header.
    #[inline(always)]
    pub const fn off(self) -> usize {
        self.off
    }
}

/// Reads `field` of the header at `header`.
///
/// # Safety
/// `header` must point at a bounds-checked region that holds the whole field. Alignment: see
/// `Frame::read`; BPF loads from packet and map memory need none on the kernels we target.
#[inline(always)]
pub unsafe fn load<T>(header: *const u8, field: Field<T>) -> T {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::read(header.add(field.off).cast::<T>()) }
}

/// Writes `value` into `field` of the header at `header`, as one store of `T`'s width.
///
/// # Safety
/// As for [`load`].
#[inline(always)]
pub unsafe fn store<T>(header: *mut u8, field: Field<T>, value: T) {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::write(header.add(field.off).cast::<T>(), value) }
}

/// Ethernet II, and the 802.1Q/802.1ad tags that may follow its addresses.
pub mod eth {
    use super::Field;

    pub const LEN: usize = 14;
    /// Destination MAC, as three half-words.
    pub const DST: Field<[u16; 3]> = Field::at(0);
    /// Source MAC, as three half-words.
    pub const SRC: Field<[u16; 3]> = Field::at(6);
    /// Both MACs at once.
    pub const ADDRS: Field<[u16; 6]> = Field::at(0);
    pub const ETHERTYPE: Field<u16> = Field::at(12);

    pub const TYPE_IPV4: u16 = 0x0800;
    pub const TYPE_IPV6: u16 = 0x86DD;
    pub const TYPE_8021Q: u16 = 0x8100;
    pub const TYPE_8021AD: u16 = 0x88A8;
    /// Pre-standard QinQ outer tag, still emitted by some switches.
    pub const TYPE_QINQ_LEGACY: u16 = 0x9100;

    /// A VLAN tag: TCI, then the ethertype of what follows.
    pub mod vlan {
        use super::Field;

        pub const LEN: usize = 4;
        pub const ETHERTYPE: Field<u16> = Field::at(2);
    }
}

/// IP protocol numbers (IPv4 protocol, IPv6 next header).
pub mod proto {
    pub const HOPOPTS: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const ICMPV6: u8 = 58;
    pub const DSTOPTS: u8 = 60;
}

/// IPv4 header (RFC 791).
pub mod ipv4 {
    use super::Field;

    /// Without options.
    pub const LEN: usize = 20;
    /// Version (high nibble) and header length in words (low nibble).
    pub const VER_IHL: Field<u8> = Field::at(0);
    /// Version/IHL and type of service, written together.
    pub const VER_IHL_TOS: Field<u16> = Field::at(0);
    pub const TOTAL_LEN: Field<u16> = Field::at(2);
    pub const IDENT: Field<u16> = Field::at(4);
    /// Flags (high 3 bits) and fragment offset.
    pub const FLAGS_FRAG: Field<u16> = Field::at(6);
    pub const TTL: Field<u8> = Field::at(8);
    pub const PROTO: Field<u8> = Field::at(9);
    pub const CHECKSUM: Field<u16> = Field::at(10);
    pub const SRC: Field<u32> = Field::at(12);
    pub const DST: Field<u32> = Field::at(16);

    /// `FLAGS_FRAG`, host order: don't fragment.
    pub const DONT_FRAGMENT: u16 = 0x4000;
    /// `FLAGS_FRAG`, host order: more fragments, and the offset.
    pub const MORE_FRAGS_AND_OFFSET: u16 = 0x3fff;
}

/// IPv6 fixed header (RFC 8200) and the generic extension header.
pub mod ipv6 {
    use super::Field;

    pub const LEN: usize = 40;
    /// Version, traffic class and flow label.
    pub const VER_TC_FLOW: Field<u32> = Field::at(0);
    pub const PAYLOAD_LEN: Field<u16> = Field::at(4);
    pub const NEXT_HEADER: Field<u8> = Field::at(6);
    pub const HOP_LIMIT: Field<u8> = Field::at(7);
    pub const SRC: Field<[u32; 4]> = Field::at(8);
    pub const DST: Field<[u32; 4]> = Field::at(24);

    /// Hop-by-hop, routing and destination options headers.
    pub mod ext {
        use super::Field;

        /// Next header (low byte as loaded) and length in 8-byte units beyond the first
        /// (high byte), read together.
        pub const NEXT_AND_LEN: Field<u16> = Field::at(0);
        /// Unit of the length field.
        pub const LEN_UNIT: usize = 8;
    }
}

/// UDP header.
pub mod udp {
    use super::Field;

    pub const LEN: usize = 8;
    pub const SRC_PORT: Field<u16> = Field::at(0);
    pub const DST_PORT: Field<u16> = Field::at(2);
    /// Source and destination port as one load (source in the low half).
    pub const PORTS: Field<u32> = Field::at(0);
    pub const LENGTH: Field<u16> = Field::at(4);
    pub const CHECKSUM: Field<u16> = Field::at(6);
}

/// TCP header, the part the program reads.
pub mod tcp {
    use super::Field;

    /// Without options.
    pub const LEN: usize = 20;
    /// Source and destination port as one load (source in the low half).
    pub const PORTS: Field<u32> = Field::at(0);
    /// Data offset in words (high nibble).
    pub const DATA_OFF: Field<u8> = Field::at(12);
    pub const FLAGS: Field<u8> = Field::at(13);

    pub const SYN: u8 = 0x02;
    pub const ACK: u8 = 0x10;
}

/// ICMP and ICMPv6: the fixed part; an error quotes the offending packet right after it.
pub mod icmp {
    use super::Field;

    pub const LEN: usize = 8;
    pub const TYPE: Field<u8> = Field::at(0);
}

/// The steering header (`cdn_common::wire::SteerHeader`), for the writer.
pub mod steer {
    use core::mem::offset_of;

    use super::{Field, STEER_HEADER_LEN, SteerHeader};

    pub const LEN: usize = STEER_HEADER_LEN;
    /// The whole header as one word: the writer builds a `SteerHeader` and stores it at once.
    pub const WORD: Field<u64> = Field::at(0);
    const _: () = assert!(LEN == 8);

    // Field by field, for readers that look at one part (the trace).
    pub const VERSION: Field<u8> = Field::at(offset_of!(SteerHeader, version));
    pub const HOPS: Field<[u16; 2]> = Field::at(offset_of!(SteerHeader, hops));
}

/// The fields of a next-hop template (`cdn_common::maps::template`) that the program fills in
/// per packet, as offsets from the start of the frame.
pub mod outer {
    use cdn_common::maps::template as t;

    use super::Field;

    pub const IPV4_TOTAL_LEN: Field<u16> = Field::at(t::IPV4_TOTAL_LEN);
    pub const IPV4_CHECKSUM: Field<u16> = Field::at(t::IPV4_CHECKSUM);
    pub const IPV6_FLOW_LOW: Field<u16> = Field::at(t::IPV6_FLOW_LOW);
    pub const IPV6_PAYLOAD_LEN: Field<u16> = Field::at(t::IPV6_PAYLOAD_LEN);
}
