//! The flow hash: SipHash-1-3 keyed with the cluster-wide key, over a fixed layout of the flow's
//! addresses, ports and protocol.
//!
//! SipHash is a keyed PRF: without the key nobody outside the cluster can predict which member a
//! flow lands on, so nobody can aim a flood at one member's buckets. The 1-3 variant (one
//! compression round per word, three finalisation rounds) costs ~10 ns per IPv4 flow in the JIT.
//!
//! The kernel feeds the words exactly as it loads them from the packet (little-endian loads of
//! network-order bytes); the `*_of` helpers build the same words from ordinary address and port
//! values, so userspace computes bit for bit the hash the kernel computes.
//!
//! The hashed message is the little-endian byte string of the words, so the function is plain
//! SipHash-1-3 of a defined byte string and can be checked against any reference implementation.

/// Protocol numbers that take part in the hash.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

#[inline(always)]
fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
}

#[inline(always)]
fn sip_init(key: &[u64; 2]) -> [u64; 4] {
    [
        key[0] ^ 0x736f_6d65_7073_6575,
        key[1] ^ 0x646f_7261_6e64_6f6d,
        key[0] ^ 0x6c79_6765_6e65_7261,
        key[1] ^ 0x7465_6462_7974_6573,
    ]
}

#[inline(always)]
fn sip_word(v: &mut [u64; 4], m: u64) {
    v[3] ^= m;
    sip_round(v);
    v[0] ^= m;
}

#[inline(always)]
fn sip_finish(v: &mut [u64; 4], words: u64) -> u64 {
    // The final block of a message whose length is a multiple of 8 holds only the length byte.
    let b = (words * 8) << 56;
    sip_word(v, b);
    v[2] ^= 0xff;
    sip_round(v);
    sip_round(v);
    sip_round(v);
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// Last word of every flow: ports, protocol and the address family (so an IPv4 flow and an
/// IPv6 flow never share a message layout).
#[inline(always)]
const fn tail_word(ports: u32, proto: u8, family: u8) -> u64 {
    ports as u64 | (proto as u64) << 32 | (family as u64) << 40
}

/// Hash of an IPv4 flow. `src`/`dst` are the addresses and `ports` the first four bytes of the
/// TCP/UDP header, all as little-endian loads of the packet bytes (see [`v4_word`], [`ports_word`]).
#[inline(always)]
pub fn flow_hash_v4(key: &[u64; 2], src: u32, dst: u32, ports: u32, proto: u8) -> u64 {
    let mut v = sip_init(key);
    sip_word(&mut v, src as u64 | (dst as u64) << 32);
    sip_word(&mut v, tail_word(ports, proto, 4));
    sip_finish(&mut v, 2)
}

/// Hash of an IPv6 flow. Each address is two little-endian 8-byte loads (see [`v6_words`]).
#[inline(always)]
pub fn flow_hash_v6(key: &[u64; 2], src: [u64; 2], dst: [u64; 2], ports: u32, proto: u8) -> u64 {
    let mut v = sip_init(key);
    sip_word(&mut v, src[0]);
    sip_word(&mut v, src[1]);
    sip_word(&mut v, dst[0]);
    sip_word(&mut v, dst[1]);
    sip_word(&mut v, tail_word(ports, proto, 6));
    sip_finish(&mut v, 5)
}

/// An IPv4 address as the kernel loads it from the packet.
pub const fn v4_word(octets: [u8; 4]) -> u32 {
    u32::from_le_bytes(octets)
}

/// An IPv6 address as the kernel loads it from the packet.
pub const fn v6_words(octets: [u8; 16]) -> [u64; 2] {
    let mut hi = [0u8; 8];
    let mut lo = [0u8; 8];
    let mut i = 0;
    while i < 8 {
        hi[i] = octets[i];
        lo[i] = octets[i + 8];
        i += 1;
    }
    [u64::from_le_bytes(hi), u64::from_le_bytes(lo)]
}

/// Source and destination port (host order) as the kernel loads the first four bytes of the
/// TCP or UDP header.
pub const fn ports_word(src_port: u16, dst_port: u16) -> u32 {
    let s = src_port.to_be_bytes();
    let d = dst_port.to_be_bytes();
    u32::from_le_bytes([s[0], s[1], d[0], d[1]])
}

/// SipHash-2-4 (two compression rounds per word, four finalisation rounds) of the 64-byte
/// message whose little-endian words are `msg`: the steering MAC (see [`steer_mac_message`]).
/// The stronger variant than the flow hash's, because here a forger gets to try.
#[inline(always)]
pub fn siphash24_words(key: &[u64; 2], msg: &[u64; 8]) -> u64 {
    let mut v = sip_init(key);
    for &m in msg {
        v[3] ^= m;
        sip_round(&mut v);
        sip_round(&mut v);
        v[0] ^= m;
    }
    let b = 64u64 << 56;
    v[3] ^= b;
    sip_round(&mut v);
    sip_round(&mut v);
    v[0] ^= b;
    v[2] ^= 0xff;
    sip_round(&mut v);
    sip_round(&mut v);
    sip_round(&mut v);
    sip_round(&mut v);
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// An IPv4 address (as loaded from the packet, see [`v4_word`]) as the two words of its
/// IPv4-mapped form `::ffff:a.b.c.d`.
#[inline(always)]
pub const fn v4_mapped_words(addr: u32) -> [u64; 2] {
    [0, 0xffff_0000 | (addr as u64) << 32]
}

/// The message the steering MAC covers (README "Steering trust"): the outer source, the
/// inner flow's client and VIP (16 bytes each, IPv4-mapped, as [`v6_words`] /
/// [`v4_mapped_words`]), then the flow's ports ([`ports_word`], client port first) and
/// protocol with the header's flags, hop budget and hop count, then its two hop slots and
/// whether it is a search header (versions 3 and 4: bit 32 of the last word; versions 1 and 2
/// leave it 0, so their MACs are those of before searches existed). `header` is the 8-byte
/// steering header as one little-endian load. Of its version byte only that kind is covered,
/// so that the signer (which builds version 1 or 3) and the receiver (which reads 2 or 4)
/// agree, and a signed header cannot be turned into a search or back.
#[inline(always)]
pub const fn steer_mac_message(
    outer_src: [u64; 2],
    client: [u64; 2],
    vip: [u64; 2],
    ports: u32,
    proto: u8,
    header: u64,
) -> [u64; 8] {
    [
        outer_src[0],
        outer_src[1],
        client[0],
        client[1],
        vip[0],
        vip[1],
        ports as u64 | (proto as u64) << 32 | (header >> 8 & 0xff_ffff) << 40,
        header >> 32 | search_kind(header) << 32,
    ]
}

/// 1 for a search header (version 3 or 4), 0 for versions 1 and 2.
#[inline(always)]
const fn search_kind(header: u64) -> u64 {
    ((header & 0xff).wrapping_sub(1) >> 1) & 1
}

/// Bucket of a flow in a table of `table_size` buckets.
#[inline(always)]
pub const fn bucket_of(flow_hash: u64, table_size: u32) -> u32 {
    (flow_hash % table_size as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::hash::Hasher;
    use siphasher::sip::SipHasher13;

    fn reference(key: &[u64; 2], words: &[u64]) -> u64 {
        let mut h = SipHasher13::new_with_keys(key[0], key[1]);
        for w in words {
            h.write(&w.to_le_bytes());
        }
        h.finish()
    }

    #[test]
    fn v4_hash_is_siphash13_of_the_documented_message() {
        let key = [0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908];
        let src = v4_word([198, 51, 100, 7]);
        let dst = v4_word([203, 0, 113, 10]);
        let ports = ports_word(40000, 443);
        let msg = [
            src as u64 | (dst as u64) << 32,
            ports as u64 | 6 << 32 | 4 << 40,
        ];
        assert_eq!(
            flow_hash_v4(&key, src, dst, ports, 6),
            reference(&key, &msg)
        );
    }

    #[test]
    fn v6_hash_is_siphash13_of_the_documented_message() {
        let key = [1, 2];
        let s = v6_words([0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        let d = v6_words([0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        let ports = ports_word(1, 2);
        let msg = [s[0], s[1], d[0], d[1], ports as u64 | 17 << 32 | 6 << 40];
        assert_eq!(flow_hash_v6(&key, s, d, ports, 17), reference(&key, &msg));
    }

    #[test]
    fn words_match_little_endian_packet_loads() {
        // Bytes as on the wire: 10.0.0.1, ports 0x1234 -> 0x0050.
        assert_eq!(v4_word([10, 0, 0, 1]), 0x0100_000a);
        assert_eq!(
            ports_word(0x1234, 0x0050),
            u32::from_le_bytes([0x12, 0x34, 0x00, 0x50])
        );
    }

    #[test]
    fn steer_mac_is_siphash24_of_the_documented_message() {
        use siphasher::sip::SipHasher24;
        let key = [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210];
        // Outer source 10.0.0.2, client 198.51.100.7:40000, VIP 192.0.2.10:443, TCP, flags
        // 0x02, budget 2, one hop (4) and an empty slot.
        let header = u64::from_le_bytes([2, 0x02, 2, 1, 0, 4, 0xff, 0xff]);
        let msg = steer_mac_message(
            v4_mapped_words(v4_word([10, 0, 0, 2])),
            v4_mapped_words(v4_word([198, 51, 100, 7])),
            v4_mapped_words(v4_word([192, 0, 2, 10])),
            ports_word(40000, 443),
            6,
            header,
        );
        let mut bytes = [0u8; 64];
        for (i, a) in [[10, 0, 0, 2], [198, 51, 100, 7], [192, 0, 2, 10]]
            .into_iter()
            .enumerate()
        {
            bytes[16 * i + 10..16 * i + 12].copy_from_slice(&[0xff, 0xff]);
            bytes[16 * i + 12..16 * i + 16].copy_from_slice(&a);
        }
        bytes[48..52].copy_from_slice(&[0x9c, 0x40, 0x01, 0xbb]); // 40000, 443
        bytes[52..60].copy_from_slice(&[6, 0x02, 2, 1, 0, 4, 0xff, 0xff]);
        let mut h = SipHasher24::new_with_keys(key[0], key[1]);
        h.write(&bytes);
        assert_eq!(siphash24_words(&key, &msg), h.finish());
    }

    #[test]
    fn steer_mac_tells_a_search_header_from_a_plain_one() {
        let words = v4_mapped_words(v4_word([10, 0, 0, 2]));
        let msg = |version: u8| {
            let header = u64::from_le_bytes([version, 0, 2, 1, 0, 4, 0, 0]);
            steer_mac_message(words, words, words, 1, 6, header)
        };
        // Signer and receiver agree on each kind: 1 (signed) and 2 (received), 3 and 4.
        assert_eq!(msg(1), msg(2));
        assert_eq!(msg(3), msg(4));
        // A signed plain header rewritten as a search (or back) no longer verifies.
        assert_ne!(msg(2), msg(4));
        assert_eq!(msg(2)[7], 0x0400);
        assert_eq!(msg(4)[7], 1 << 32 | 0x0400);
    }

    #[test]
    fn key_changes_the_hash() {
        let a = flow_hash_v4(&[1, 2], 1, 2, 3, 6);
        let b = flow_hash_v4(&[1, 3], 1, 2, 3, 6);
        assert_ne!(a, b);
    }
}
