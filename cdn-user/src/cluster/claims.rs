//! Claims (README "PoPs: learned owners"): the message a member sends to the nodes of the PoP
//! where a search started, saying "this flow is mine", and the receiver's checks.
//!
//! Wire format (`POST /claims` on the peer plane, `application/octet-stream`), big-endian:
//!
//! ```text
//! 0   magic "CDNC", version 1, one zero byte
//! 6   sender member id (u16)
//! 8   sent_unix_ms (u64)
//! 16  nonce (u64, random per message)
//! 24  entry count n (u16, 1 to MAX_ENTRIES)
//! 26  n entries of 37 bytes: client (16), vip (16) (IPv4 as ::ffff:a.b.c.d, both of the same
//!     family), client port (2), vip port (2), protocol (1: 6 or 17)
//! end MAC (u64): SipHash-2-4 keyed with `claim_key(hash_key)` over every byte before it
//! ```
//!
//! The wire bytes are the canonical encoding: the MAC covers exactly what is parsed, so there
//! is nothing a forger can change that the receiver reads without the MAC changing. Only a
//! holder of the cluster hash key can make a claim that verifies.

use std::net::{IpAddr, Ipv6Addr};

use cdn_common::hash::{
    PROTO_TCP, PROTO_UDP, bucket_of, flow_hash_v4, flow_hash_v6, ports_word, v4_word, v6_words,
};
use cdn_common::maps::FlowKey;

use super::peer_auth::{self, ENVELOPE_LEN, Envelope, MAC_LEN, PeerGate};
pub use super::peer_auth::{MAX_CLOCK_SKEW, MAX_REMEMBERED, REPLAY_WINDOW, Rejection};
use crate::config::MemberSettings;

/// Path of the claims endpoint on the peer plane.
pub const CLAIMS_PATH: &str = "/claims";
/// Most entries in one claim message.
pub const MAX_ENTRIES: usize = 1024;
const MAGIC: [u8; 6] = *b"CDNC\x01\x00";
/// The envelope and the entry count.
const HEAD_LEN: usize = ENVELOPE_LEN + 2;
const ENTRY_LEN: usize = 37;
/// Largest valid claim body: the receiver reads no more than this.
pub const MAX_BODY: usize = HEAD_LEN + MAX_ENTRIES * ENTRY_LEN + MAC_LEN;

/// The key of the claim MAC for `hash_key` (see [`peer_auth::derive_key`]).
pub fn claim_key(hash_key: [u64; 2]) -> [u64; 2] {
    peer_auth::derive_key(hash_key, [b"cdn-steer claim 0", b"cdn-steer claim 1"])
}

/// A claim: `sender` holds the flows in `entries`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub sender: u16,
    pub sent_unix_ms: u64,
    pub nonce: u64,
    pub entries: Vec<FlowKey>,
}

impl Claim {
    /// The signed wire bytes. At most [`MAX_ENTRIES`] entries are encoded: the sender batches
    /// below that.
    pub fn encode(&self, key: [u64; 2]) -> Vec<u8> {
        let entries = &self.entries[..self.entries.len().min(MAX_ENTRIES)];
        let mut out = Vec::with_capacity(HEAD_LEN + entries.len() * ENTRY_LEN + MAC_LEN);
        Envelope {
            sender: self.sender,
            sent_unix_ms: self.sent_unix_ms,
            nonce: self.nonce,
        }
        .encode(&MAGIC, &mut out);
        // Fits: at most MAX_ENTRIES.
        out.extend_from_slice(&(entries.len() as u16).to_be_bytes());
        for e in entries {
            out.extend_from_slice(&e.client);
            out.extend_from_slice(&e.vip);
            // FlowKey ports are in network order already: their bytes are the wire's.
            out.extend_from_slice(&e.client_port.to_ne_bytes());
            out.extend_from_slice(&e.vip_port.to_ne_bytes());
            out.push(e.proto);
        }
        peer_auth::sign(key, &mut out);
        out
    }

    /// Parses `bytes` and verifies its MAC with `key`. Nothing else is checked here.
    pub fn decode(bytes: &[u8], key: [u64; 2]) -> Result<Claim, Rejection> {
        if bytes.len() > MAX_BODY {
            return Err(Rejection::TooLarge);
        }
        let (body, tag) = peer_auth::split_mac(bytes)?;
        let head: &[u8; HEAD_LEN] = body.first_chunk::<HEAD_LEN>().ok_or(Rejection::Malformed)?;
        let envelope = Envelope::decode(head, &MAGIC)?;
        let count = usize::from(u16::from_be_bytes([head[24], head[25]]));
        let rest = &body[HEAD_LEN..];
        if count == 0 || count > MAX_ENTRIES || rest.len() != count * ENTRY_LEN {
            return Err(Rejection::Malformed);
        }
        // The MAC before any further reading: an unsigned message gets no more attention.
        peer_auth::verify(key, body, tag)?;
        let entries = rest
            .chunks_exact(ENTRY_LEN)
            .map(parse_entry)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Claim {
            sender: envelope.sender,
            sent_unix_ms: envelope.sent_unix_ms,
            nonce: envelope.nonce,
            entries,
        })
    }
}

fn parse_entry(e: &[u8]) -> Result<FlowKey, Rejection> {
    let mut key = FlowKey::default();
    key.client.copy_from_slice(&e[0..16]);
    key.vip.copy_from_slice(&e[16..32]);
    key.client_port = u16::from_ne_bytes([e[32], e[33]]);
    key.vip_port = u16::from_ne_bytes([e[34], e[35]]);
    key.proto = e[36];
    let same_family = is_v4_mapped(&key.client) == is_v4_mapped(&key.vip);
    if !same_family || !matches!(key.proto, PROTO_TCP | PROTO_UDP) {
        return Err(Rejection::Malformed);
    }
    Ok(key)
}

fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[..10] == [0; 10] && addr[10..12] == [0xff, 0xff]
}

/// The learned map's key of a flow; ports in host order.
pub fn flow_key(
    client: IpAddr,
    client_port: u16,
    vip: IpAddr,
    vip_port: u16,
    proto: u8,
) -> FlowKey {
    let bytes = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    FlowKey {
        client: bytes(client),
        vip: bytes(vip),
        client_port: client_port.to_be(),
        vip_port: vip_port.to_be(),
        proto,
        _pad: [0; 3],
    }
}

/// The client and VIP of `key` as addresses (IPv4-mapped ones as IPv4).
pub fn flow_addrs(key: &FlowKey) -> (IpAddr, IpAddr) {
    let ip = |b: [u8; 16]| {
        let v6 = Ipv6Addr::from(b);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    };
    (ip(key.client), ip(key.vip))
}

/// The flow's bucket index in a table of `table_size` buckets: the hash the program computes
/// for the client's packet (client as source, VIP as destination).
pub fn flow_bucket(hash_key: &[u64; 2], key: &FlowKey, table_size: u32) -> u32 {
    let ports = ports_word(u16::from_be(key.client_port), u16::from_be(key.vip_port));
    let hash = match flow_addrs(key) {
        (IpAddr::V4(c), IpAddr::V4(v)) => flow_hash_v4(
            hash_key,
            v4_word(c.octets()),
            v4_word(v.octets()),
            ports,
            key.proto,
        ),
        _ => flow_hash_v6(
            hash_key,
            v6_words(key.client),
            v6_words(key.vip),
            ports,
            key.proto,
        ),
    };
    bucket_of(hash, table_size.max(1))
}

/// The receiver's checks of claims: the MAC, then the [`PeerGate`].
#[derive(Debug, Default)]
pub struct ClaimGate {
    gate: PeerGate,
}

impl ClaimGate {
    /// Checks a body that arrived from `source` at `now_unix_ms`: the MAC (with the claim key
    /// of `hash_key`), the sender among `members`, the source address, the timestamp, and
    /// replay. On success the nonce is remembered.
    pub fn admit(
        &mut self,
        body: &[u8],
        source: IpAddr,
        now_unix_ms: u64,
        hash_key: [u64; 2],
        members: &[MemberSettings],
    ) -> Result<Claim, Rejection> {
        let claim = Claim::decode(body, claim_key(hash_key))?;
        let envelope = Envelope {
            sender: claim.sender,
            sent_unix_ms: claim.sent_unix_ms,
            nonce: claim.nonce,
        };
        self.gate.check(&envelope, source, now_unix_ms, members)?;
        Ok(claim)
    }
}

#[cfg(test)]
#[path = "claims_tests.rs"]
mod tests;
