//! Authenticated messages between members over the peer plane (claims, PoP drains): the MAC
//! keys, the MAC, and the receiver's checks that do not depend on what the message says.
//!
//! Every such message is a fixed header (sender member id, `sent_unix_ms`, a random nonce),
//! its own payload, and a trailing SipHash-2-4 MAC over every byte before it, keyed with a key
//! derived from the cluster hash key and labels of the message kind (so a claim can never pass
//! for a drain). Only a holder of the cluster hash key can make a message that verifies; the
//! [`PeerGate`] then refuses one from a non-member, from an address that is not the sender's,
//! too far from this node's clock, or seen before.

use std::collections::HashMap;
use std::hash::Hasher as _;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use siphasher::sip::SipHasher24;

use crate::config::MemberSettings;

/// Length of the trailing MAC.
pub const MAC_LEN: usize = 8;
/// How far `sent_unix_ms` may be from the receiver's clock, either way (nodes need NTP).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(30);
/// How long a (sender, nonce) pair is remembered; longer than twice the skew, so a message
/// replayed after it is forgotten is stale anyway.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(60);
/// Most (sender, nonce) pairs remembered. Only messages with a valid MAC get here; a member
/// sending more than this in a minute is refused until the window moves on.
pub const MAX_REMEMBERED: usize = 1 << 16;

/// A MAC key for one kind of message: two SipHash-2-4 of `labels` keyed with the cluster hash
/// key, as the steering MAC's key is derived, with labels of the kind's own so keys differ.
pub fn derive_key(hash_key: [u64; 2], labels: [&[u8]; 2]) -> [u64; 2] {
    let derive = |label: &[u8]| {
        let mut h = SipHasher24::new_with_keys(hash_key[0], hash_key[1]);
        h.write(label);
        h.finish()
    };
    [derive(labels[0]), derive(labels[1])]
}

/// The MAC of `bytes` with `key`.
pub fn mac(key: [u64; 2], bytes: &[u8]) -> u64 {
    let mut h = SipHasher24::new_with_keys(key[0], key[1]);
    h.write(bytes);
    h.finish()
}

/// Appends the MAC of everything in `out` to it.
pub fn sign(key: [u64; 2], out: &mut Vec<u8>) {
    let tag = mac(key, out);
    out.extend_from_slice(&tag.to_be_bytes());
}

/// Splits a signed message into the signed bytes and its MAC.
pub fn split_mac(bytes: &[u8]) -> Result<(&[u8], u64), Rejection> {
    let (body, tag) = bytes
        .split_last_chunk::<MAC_LEN>()
        .ok_or(Rejection::Malformed)?;
    Ok((body, u64::from_be_bytes(*tag)))
}

/// Checks `tag` against the MAC of `body`.
pub fn verify(key: [u64; 2], body: &[u8], tag: u64) -> Result<(), Rejection> {
    if mac(key, body) == tag {
        Ok(())
    } else {
        Err(Rejection::BadMac)
    }
}

/// Bytes of the head every peer message starts with: a magic of the kind and its version (6),
/// then the [`Envelope`]: sender (2), `sent_unix_ms` (8), nonce (8), big-endian.
pub const ENVELOPE_LEN: usize = 24;

/// The header fields every peer message has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub sender: u16,
    pub sent_unix_ms: u64,
    pub nonce: u64,
}

impl Envelope {
    /// Appends the head: `magic`, then the fields.
    pub fn encode(&self, magic: &[u8; 6], out: &mut Vec<u8>) {
        out.extend_from_slice(magic);
        out.extend_from_slice(&self.sender.to_be_bytes());
        out.extend_from_slice(&self.sent_unix_ms.to_be_bytes());
        out.extend_from_slice(&self.nonce.to_be_bytes());
    }

    /// Reads the head at the start of `body`, which must begin with `magic`.
    pub fn decode(body: &[u8], magic: &[u8; 6]) -> Result<Envelope, Rejection> {
        let head = body
            .first_chunk::<ENVELOPE_LEN>()
            .ok_or(Rejection::Malformed)?;
        if head[..6] != magic[..] {
            return Err(Rejection::Malformed);
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&head[at..at + 8]);
            u64::from_be_bytes(b)
        };
        Ok(Envelope {
            sender: u16::from_be_bytes([head[6], head[7]]),
            sent_unix_ms: u64_at(8),
            nonce: u64_at(16),
        })
    }
}

/// Why a peer message was refused; [`Rejection::reason`] is the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("malformed message")]
    Malformed,
    #[error("message body too large")]
    TooLarge,
    #[error("MAC does not verify")]
    BadMac,
    #[error("sender is not a configured member")]
    NotMember,
    #[error("message comes from neither the sender's underlay nor its sync address")]
    WrongSource,
    #[error("timestamp more than 30 s from this node's clock")]
    Stale,
    #[error("nonce seen before")]
    Replay,
    #[error("too many messages to remember")]
    Busy,
    /// A PoP drain from a member of another PoP: `drain --pop` drains the sender's own PoP.
    #[error("sender is a member of another PoP")]
    OtherPop,
}

impl Rejection {
    pub const ALL: [Rejection; 9] = [
        Rejection::Malformed,
        Rejection::TooLarge,
        Rejection::BadMac,
        Rejection::NotMember,
        Rejection::WrongSource,
        Rejection::Stale,
        Rejection::Replay,
        Rejection::Busy,
        Rejection::OtherPop,
    ];

    /// The `reason` label of the `*_rejected_total` metrics.
    pub const fn reason(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::TooLarge => "too_large",
            Rejection::BadMac => "bad_mac",
            Rejection::NotMember => "not_member",
            Rejection::WrongSource => "wrong_source",
            Rejection::Stale => "stale",
            Rejection::Replay => "replay",
            Rejection::Busy => "busy",
            Rejection::OtherPop => "other_pop",
        }
    }

    /// The HTTP status the peer plane answers it with.
    pub fn status(self) -> hyper::StatusCode {
        match self {
            Rejection::Malformed => hyper::StatusCode::BAD_REQUEST,
            Rejection::TooLarge => hyper::StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::Busy => hyper::StatusCode::SERVICE_UNAVAILABLE,
            _ => hyper::StatusCode::FORBIDDEN,
        }
    }

    /// Its position in [`Rejection::ALL`] (the index of its counter).
    pub fn index(self) -> usize {
        Rejection::ALL
            .iter()
            .position(|r| *r == self)
            .unwrap_or_default()
    }
}

/// The receiver's checks beyond the MAC, with the memory of recent nonces. One gate per kind
/// of message: nonces are remembered per kind.
#[derive(Debug, Default)]
pub struct PeerGate {
    /// (sender, nonce) -> receive time (ms, the receiver's clock).
    seen: HashMap<(u16, u64), u64>,
}

impl PeerGate {
    /// Checks a verified message's `envelope`, which arrived from `source` at `now_unix_ms`:
    /// the sender among `members`, the source address, the timestamp, and replay. On success
    /// the nonce is remembered and the sender's entry returned.
    pub fn check<'m>(
        &mut self,
        envelope: &Envelope,
        source: IpAddr,
        now_unix_ms: u64,
        members: &'m [MemberSettings],
    ) -> Result<&'m MemberSettings, Rejection> {
        let member = members
            .iter()
            .find(|m| m.id == envelope.sender)
            .ok_or(Rejection::NotMember)?;
        let source = canonical(source);
        let from_member = canonical(member.underlay) == source
            || member.sync.is_some_and(|s| canonical(s.ip()) == source);
        if !from_member {
            return Err(Rejection::WrongSource);
        }
        let skew = u64::try_from(MAX_CLOCK_SKEW.as_millis()).unwrap_or(u64::MAX);
        if envelope.sent_unix_ms.abs_diff(now_unix_ms) > skew {
            return Err(Rejection::Stale);
        }
        let window = u64::try_from(REPLAY_WINDOW.as_millis()).unwrap_or(u64::MAX);
        if self.seen.len() >= MAX_REMEMBERED {
            self.seen
                .retain(|_, at| now_unix_ms.saturating_sub(*at) <= window);
        }
        let key = (envelope.sender, envelope.nonce);
        match self.seen.get(&key) {
            Some(at) if now_unix_ms.saturating_sub(*at) <= window => return Err(Rejection::Replay),
            _ => {}
        }
        if self.seen.len() >= MAX_REMEMBERED {
            return Err(Rejection::Busy);
        }
        self.seen.insert(key, now_unix_ms);
        Ok(member)
    }
}

/// An IPv4-mapped IPv6 address as IPv4 (a dual-stack listener reports IPv4 peers so).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(IpAddr::V6(v6), |v4: Ipv4Addr| IpAddr::V4(v4)),
        v4 => v4,
    }
}
