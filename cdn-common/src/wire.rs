//! The steering encapsulation, as it travels between nodes:
//!
//! ```text
//! | Ethernet | outer IPv4 or IPv6 | UDP (dst = steering port) | SteerHeader (8 bytes) | inner IP packet |
//! ```
//!
//! The inner packet is the client's IP packet exactly as it arrived (its Ethernet header and VLAN
//! tags are dropped). The UDP source port carries flow entropy so that ECMP and RSS on the
//! underlay spread flows. The outer UDP checksum is zero: the inner packet carries its own
//! transport checksum, and RFC 6935/6936 allow a zero checksum for tunnels over IPv6; the
//! receiving node decapsulates in XDP and never hands the outer packet to a UDP socket.

/// Version carried in every header; a node drops (and counts) any other version.
pub const STEER_VERSION: u8 = 1;

/// Version of a header followed by a MAC (`[cluster] steer_auth`): the version-1 fields,
/// then the 8-byte MAC ([`crate::hash::steer_mac`]), stored as the little-endian bytes of the
/// u64. Nodes without steering authentication drop it as an unknown version.
pub const STEER_VERSION_AUTH: u8 = 2;

/// Version of a *search* header (README "PoPs"): the same eight bytes, read differently. A
/// flow that no member of the PoP where it landed holds is looked for in the other PoPs:
///
/// - `hop_count` is the set of PoPs still to search after the addressee's own PoP (bit `i`:
///   the PoP of index `i`, see `cdn_common::maps::MAX_POPS`);
/// - `hops[0]` is the member that started the search (network order);
/// - `hops[1]` is the walk's position in the addressee's PoP chain for the flow's bucket
///   (network order): the index it is asked as ([`STEER_SEARCH_POS_INDEX`], 0..=2) and
///   whether a node already redirected the search at that index
///   ([`STEER_SEARCH_POS_REDIRECTED`]). Any other bit, or index 3, is `bad_encap`.
///
/// The addressee accepts the packet if it holds the flow. Otherwise, if its own view of the
/// chain names another member at that index and nobody redirected there yet, it redirects the
/// search to that member at the same index (views differ for a moment: the sender's may be
/// stale). Else it passes it on to the next member of its chain after that index (neither
/// missing nor itself), and once the chain is done, to the current owner of the lowest PoP
/// left in the set, at index 0. With the set empty, it accepts. The position is carried, not
/// found again by each receiver in its own view, so that views that order the chain
/// differently can neither skip a member nor bounce the search between two: the index only
/// grows, redirected once per index. Nodes of earlier releases drop it as an unknown version
/// (`bad_encap`).
pub const STEER_VERSION_SEARCH: u8 = 3;

/// A search header's `hops[1]` (host order): the chain index the addressee is asked as.
pub const STEER_SEARCH_POS_INDEX: u16 = 0x0003;

/// A search header's `hops[1]` (host order): the search was already redirected at this index
/// once; it is not redirected there again.
pub const STEER_SEARCH_POS_REDIRECTED: u16 = 0x8000;

/// A search header followed by a MAC, as [`STEER_VERSION_AUTH`] is to [`STEER_VERSION`].
pub const STEER_VERSION_SEARCH_AUTH: u8 = 4;

/// Bytes of the MAC that follows the header in version [`STEER_VERSION_AUTH`].
pub const STEER_MAC_LEN: usize = 8;

/// `SteerHeader::flags`: the inner packet is IPv6 (otherwise IPv4).
pub const STEER_INNER_V6: u8 = 1 << 0;

/// `SteerHeader::flags`: a new connection redirected by a node whose own table named another
/// owner. The receiver never redirects it again: it accepts it, or (draining) passes it on to
/// the next hop listed, never back to the sender.
pub const STEER_SYN_REDIRECTED: u8 = 1 << 1;

/// Hops a header can still carry after the one it is addressed to.
pub const STEER_MAX_REMAINING: usize = 2;

/// Default hop budget: an encapsulation may be passed on at most this many times.
pub const DEFAULT_HOP_BUDGET: u8 = 3;

/// Steering header, right after the outer UDP header. Multi-byte fields are network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerHeader {
    /// [`STEER_VERSION`].
    pub version: u8,
    /// `STEER_*` flags.
    pub flags: u8,
    /// Pass-ons left; a node that would pass the packet on with a budget of 0 drops it instead.
    pub hop_budget: u8,
    /// How many entries of `hops` are valid (0..=2). In a search header: the PoPs left.
    pub hop_count: u8,
    /// Member ids (network order) to try after the addressee, in order. In a search header:
    /// the member that started the search, and the walk's position.
    pub hops: [u16; STEER_MAX_REMAINING],
}

pub const STEER_HEADER_LEN: usize = core::mem::size_of::<SteerHeader>();
pub const ETH_HEADER_LEN: usize = 14;
pub const IPV4_HEADER_LEN: usize = 20;
pub const IPV6_HEADER_LEN: usize = 40;
pub const UDP_HEADER_LEN: usize = 8;

/// Bytes added in front of the inner IP packet (Ethernet included) for an IPv4 underlay.
pub const ENCAP_LEN_V4: usize =
    ETH_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN + STEER_HEADER_LEN;
/// Bytes added in front of the inner IP packet (Ethernet included) for an IPv6 underlay.
pub const ENCAP_LEN_V6: usize =
    ETH_HEADER_LEN + IPV6_HEADER_LEN + UDP_HEADER_LEN + STEER_HEADER_LEN;

/// TTL / hop limit of the outer header.
pub const OUTER_TTL: u8 = 64;

/// UDP source port for a flow: the top bits of the flow hash, kept in the dynamic port range
/// (49152..=65535) so it never collides with a well-known port.
#[inline(always)]
pub const fn entropy_port(flow_hash: u64) -> u16 {
    0xC000 | ((flow_hash >> 50) as u16 & 0x3FFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_eight_bytes() {
        assert_eq!(STEER_HEADER_LEN, 8);
        assert_eq!(ENCAP_LEN_V4, 50);
        assert_eq!(ENCAP_LEN_V6, 70);
    }

    #[test]
    fn entropy_port_stays_in_dynamic_range() {
        for h in [0u64, u64::MAX, 0x1234_5678_9abc_def0, 1 << 50, 1 << 63] {
            assert!(entropy_port(h) >= 49152);
        }
        assert_ne!(entropy_port(0), entropy_port(u64::MAX));
    }
}
