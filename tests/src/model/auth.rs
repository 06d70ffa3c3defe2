//! The steering MAC of spec §5 ("Per-packet MAC"): SipHash-2-4 with a key derived from the
//! cluster hash key, over the outer source, the inner flow and the hop fields.

use std::{hash::Hasher, net::IpAddr};

use siphasher::sip::SipHasher24;

/// Header version that carries a MAC.
pub const VERSION_AUTH: u8 = 2;
/// Bytes of a version-2 header (version-1 fields, then the MAC).
pub const HEADER_LEN_AUTH: usize = 16;

fn siphash24(key: [u64; 2], msg: &[u8]) -> u64 {
    let mut h = SipHasher24::new_with_keys(key[0], key[1]);
    h.write(msg);
    h.finish()
}

/// (k0, k1) from the cluster hash key (the key bytes as the flow hash takes them).
pub fn derive_key(hash_key: [u64; 2]) -> [u64; 2] {
    [
        siphash24(hash_key, b"cdn-steer steering auth 0"),
        siphash24(hash_key, b"cdn-steer steering auth 1"),
    ]
}

/// 16 address bytes, IPv4 as IPv4-mapped.
fn addr16(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// What the MAC covers.
#[derive(Clone, Copy, Debug)]
pub struct Signed {
    pub outer_src: IpAddr,
    pub client: IpAddr,
    pub vip: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// The header fields as written: flags, budget, hop count, the two hop slots.
    pub flags: u8,
    pub budget: u8,
    pub hop_count: u8,
    pub hops: [u16; 2],
    /// A search header (version 4): the MAC says so, so that a signed header cannot be turned
    /// into a search or back.
    pub search: bool,
}

pub fn mac(key: [u64; 2], s: &Signed) -> u64 {
    let mut msg = Vec::with_capacity(64);
    msg.extend_from_slice(&addr16(s.outer_src));
    msg.extend_from_slice(&addr16(s.client));
    msg.extend_from_slice(&addr16(s.vip));
    msg.extend_from_slice(&s.sport.to_be_bytes());
    msg.extend_from_slice(&s.dport.to_be_bytes());
    msg.extend_from_slice(&[s.proto, s.flags, s.budget, s.hop_count]);
    msg.extend_from_slice(&s.hops[0].to_be_bytes());
    msg.extend_from_slice(&s.hops[1].to_be_bytes());
    msg.extend_from_slice(&[s.search as u8, 0, 0, 0]);
    siphash24(key, &msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_is_eight_words_and_every_field_counts() {
        let base = Signed {
            outer_src: "10.0.0.2".parse().unwrap(),
            client: "198.51.100.7".parse().unwrap(),
            vip: "192.0.2.10".parse().unwrap(),
            sport: 40000,
            dport: 443,
            proto: 6,
            flags: 0,
            budget: 2,
            hop_count: 1,
            hops: [4, u16::MAX],
            search: false,
        };
        let key = derive_key([1, 2]);
        let m = mac(key, &base);
        let changed = [
            Signed { budget: 3, ..base },
            Signed {
                search: true,
                ..base
            },
            Signed {
                hops: [5, u16::MAX],
                ..base
            },
            Signed {
                sport: 40001,
                ..base
            },
            Signed {
                outer_src: "10.0.0.4".parse().unwrap(),
                ..base
            },
        ];
        for c in changed {
            assert_ne!(mac(key, &c), m);
        }
        assert_ne!(mac(derive_key([1, 3]), &base), m);
        assert_ne!(key[0], key[1]);
    }
}
