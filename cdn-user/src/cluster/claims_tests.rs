use std::net::Ipv6Addr;

use std::hash::Hasher as _;

use siphasher::sip::SipHasher24;

use super::*;
use crate::config::{EXAMPLE, parse};

const KEY: [u64; 2] = [0x0011_2233_4455_6677, 0x8899_aabb_ccdd_eeff];
const NOW: u64 = 1_800_000_000_000;

fn members() -> Vec<MemberSettings> {
    parse(EXAMPLE)
        .unwrap_or_else(|e| panic!("{e}"))
        .cluster
        .members
}

fn claim(sender: u16, nonce: u64) -> Claim {
    Claim {
        sender,
        sent_unix_ms: NOW,
        nonce,
        entries: vec![
            flow_key(
                "192.0.2.7".parse().unwrap(),
                40000,
                "198.51.100.1".parse().unwrap(),
                443,
                PROTO_TCP,
            ),
            flow_key(
                "2001:db8::7".parse().unwrap(),
                5353,
                "2001:db8:1::1".parse().unwrap(),
                53,
                PROTO_UDP,
            ),
        ],
    }
}

/// node-b (id 1) has underlay 10.0.0.2 and no sync address; node-a (id 0) has sync 10.0.0.1.
fn node_b() -> IpAddr {
    "10.0.0.2".parse().unwrap()
}

#[test]
fn round_trip_and_layout() {
    let c = claim(1, 99);
    let bytes = c.encode(claim_key(KEY));
    assert_eq!(bytes.len(), HEAD_LEN + 2 * ENTRY_LEN + MAC_LEN);
    assert_eq!(&bytes[..6], b"CDNC\x01\x00");
    assert_eq!(&bytes[6..8], &[0, 1]);
    assert_eq!(&bytes[8..16], &NOW.to_be_bytes());
    assert_eq!(&bytes[16..24], &99u64.to_be_bytes());
    assert_eq!(&bytes[24..26], &[0, 2]);
    // First entry: ::ffff:192.0.2.7, then the VIP, ports big-endian, protocol.
    assert_eq!(&bytes[26 + 10..26 + 16], &[0xff, 0xff, 192, 0, 2, 7]);
    assert_eq!(&bytes[26 + 32..26 + 37], &[0x9c, 0x40, 0x01, 0xbb, 6]);
    // The MAC is plain SipHash-2-4 of everything before it, keyed with the claim key.
    let k = claim_key(KEY);
    let mut h = SipHasher24::new_with_keys(k[0], k[1]);
    h.write(&bytes[..bytes.len() - 8]);
    assert_eq!(&bytes[bytes.len() - 8..], &h.finish().to_be_bytes());
    assert_eq!(Claim::decode(&bytes, k), Ok(c));
}

#[test]
fn claim_key_differs_from_the_steering_key_and_follows_the_hash_key() {
    let k = claim_key(KEY);
    assert_ne!(k[0], k[1]);
    // Not the steering MAC's key, whose labels are "cdn-steer steering auth 0/1".
    let mut h = SipHasher24::new_with_keys(KEY[0], KEY[1]);
    h.write(b"cdn-steer steering auth 0");
    assert_ne!(k[0], h.finish());
    let mut h = SipHasher24::new_with_keys(KEY[0], KEY[1]);
    h.write(b"cdn-steer claim 0");
    assert_eq!(k[0], h.finish());
    assert_ne!(k, claim_key([KEY[0], KEY[1] ^ 1]));
}

#[test]
fn every_changed_byte_breaks_the_mac_or_the_parse() {
    let k = claim_key(KEY);
    let bytes = claim(1, 5).encode(k);
    for i in 0..bytes.len() {
        let mut t = bytes.clone();
        t[i] ^= 0x40;
        assert!(
            Claim::decode(&t, k).is_err(),
            "byte {i} flipped still decodes"
        );
    }
    assert_eq!(
        Claim::decode(&bytes, claim_key([1, 2])),
        Err(Rejection::BadMac)
    );
}

#[test]
fn malformed_bodies_are_refused_without_panicking() {
    let k = claim_key(KEY);
    let good = claim(1, 5).encode(k);
    for len in 0..good.len() {
        assert!(Claim::decode(&good[..len], k).is_err(), "prefix of {len}");
    }
    let mut long = good.clone();
    long.extend_from_slice(&[0; 37]);
    assert_eq!(Claim::decode(&long, k), Err(Rejection::Malformed));
    assert_eq!(
        Claim::decode(&vec![0; MAX_BODY + 1], k),
        Err(Rejection::TooLarge)
    );
    // Signed but nonsensical entries: protocol 1, mixed families, no entries.
    let mut bad = claim(1, 5);
    bad.entries[0].proto = 1;
    assert_eq!(Claim::decode(&bad.encode(k), k), Err(Rejection::Malformed));
    let mut mixed = claim(1, 5);
    mixed.entries[0].vip = Ipv6Addr::LOCALHOST.octets();
    assert_eq!(
        Claim::decode(&mixed.encode(k), k),
        Err(Rejection::Malformed)
    );
    let empty = Claim {
        entries: vec![],
        ..claim(1, 5)
    };
    assert_eq!(
        Claim::decode(&empty.encode(k), k),
        Err(Rejection::Malformed)
    );
    // The most entries fit, one more is cut by the encoder.
    let full = Claim {
        entries: vec![claim(1, 5).entries[0]; MAX_ENTRIES + 1],
        ..claim(1, 5)
    };
    let bytes = full.encode(k);
    assert_eq!(bytes.len(), MAX_BODY);
    assert_eq!(
        Claim::decode(&bytes, k).map(|c| c.entries.len()),
        Ok(MAX_ENTRIES)
    );
}

#[test]
fn gate_checks_member_source_time_and_replay() {
    let members = members();
    let k = claim_key(KEY);
    let mut gate = ClaimGate::default();
    let ok = claim(1, 7).encode(k);
    assert_eq!(
        gate.admit(&ok, node_b(), NOW, KEY, &members),
        Ok(claim(1, 7))
    );
    assert_eq!(
        gate.admit(&ok, node_b(), NOW + 1000, KEY, &members),
        Err(Rejection::Replay)
    );
    // After the window the nonce is forgotten, but such a message is stale by then.
    assert_eq!(
        gate.admit(&ok, node_b(), NOW + 61_000, KEY, &members),
        Err(Rejection::Stale)
    );
    let other_key = claim(1, 8).encode(claim_key([5, 6]));
    assert_eq!(
        gate.admit(&other_key, node_b(), NOW, KEY, &members),
        Err(Rejection::BadMac)
    );
    let stranger = claim(77, 9).encode(k);
    assert_eq!(
        gate.admit(&stranger, node_b(), NOW, KEY, &members),
        Err(Rejection::NotMember)
    );
    let elsewhere = claim(1, 10).encode(k);
    assert_eq!(
        gate.admit(&elsewhere, "10.0.0.3".parse().unwrap(), NOW, KEY, &members),
        Err(Rejection::WrongSource)
    );
    // node-a's sync address IP counts, also as seen by a dual-stack socket.
    let from_a = claim(0, 11).encode(k);
    let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
    assert!(gate.admit(&from_a, mapped, NOW, KEY, &members).is_ok());
    for (at, ok) in [
        (NOW - 30_000, true),
        (NOW + 30_000, true),
        (NOW - 30_001, false),
        (NOW + 30_001, false),
    ] {
        let c = Claim {
            sent_unix_ms: at,
            ..claim(1, at)
        };
        let result = gate.admit(&c.encode(k), node_b(), NOW, KEY, &members);
        assert_eq!(result.is_ok(), ok, "sent at {at}: {result:?}");
        if !ok {
            assert_eq!(result, Err(Rejection::Stale));
        }
    }
}

#[test]
fn buckets_are_the_programs_flow_hash() {
    let v4 = claim(1, 1).entries[0];
    let expected = bucket_of(
        flow_hash_v4(
            &KEY,
            v4_word([192, 0, 2, 7]),
            v4_word([198, 51, 100, 1]),
            ports_word(40000, 443),
            PROTO_TCP,
        ),
        65537,
    );
    assert_eq!(flow_bucket(&KEY, &v4, 65537), expected);
    let v6 = claim(1, 1).entries[1];
    let client: Ipv6Addr = "2001:db8::7".parse().unwrap();
    let vip: Ipv6Addr = "2001:db8:1::1".parse().unwrap();
    let expected = bucket_of(
        flow_hash_v6(
            &KEY,
            v6_words(client.octets()),
            v6_words(vip.octets()),
            ports_word(5353, 53),
            PROTO_UDP,
        ),
        65537,
    );
    assert_eq!(flow_bucket(&KEY, &v6, 65537), expected);
    assert_eq!(
        flow_addrs(&v4),
        (
            "192.0.2.7".parse().unwrap(),
            "198.51.100.1".parse().unwrap()
        )
    );
}
