//! PoP drains (README "PoPs"): the message one member sends the other members of its PoP,
//! saying "drain" or "undrain", and the receiver's checks (those of claims, see
//! [`super::peer_auth`], with a key of its own).
//!
//! Wire format (`POST /drain` or `POST /undrain` on the peer plane,
//! `application/octet-stream`), big-endian, 33 bytes:
//!
//! ```text
//! 0   magic "CDND", version 1, one zero byte
//! 6   sender member id (u16)
//! 8   sent_unix_ms (u64)
//! 16  nonce (u64, random per message)
//! 24  action (u8): 1 drain, 0 undrain; must match the path
//! 25  MAC (u64): SipHash-2-4 keyed with `control_key(hash_key)` over every byte before it
//! ```
//!
//! The answer is `200` with the text `changed` or `unchanged` (the node was in that state
//! already), `403`/`400`/`503` with the rejection, `404` from a node without PoPs.

use std::net::IpAddr;

use super::peer_auth::{self, ENVELOPE_LEN, Envelope, MAC_LEN, PeerGate, Rejection};
use crate::config::MemberSettings;

/// Path of a drain on the peer plane.
pub const DRAIN_PATH: &str = "/drain";
/// Path of an undrain on the peer plane.
pub const UNDRAIN_PATH: &str = "/undrain";
const MAGIC: [u8; 6] = *b"CDND\x01\x00";
const HEAD_LEN: usize = ENVELOPE_LEN + 1;
/// The length of every drain message; the receiver reads no more.
pub const BODY_LEN: usize = HEAD_LEN + MAC_LEN;
/// The answer body of a node that changed state.
pub const CHANGED: &str = "changed";
/// The answer body of a node that was in the asked-for state already.
pub const UNCHANGED: &str = "unchanged";

/// The key of the drain MAC for `hash_key` (see [`peer_auth::derive_key`]).
pub fn control_key(hash_key: [u64; 2]) -> [u64; 2] {
    peer_auth::derive_key(hash_key, [b"cdn-steer control 0", b"cdn-steer control 1"])
}

/// The path of a drain (`drain` true) or undrain.
pub const fn path(drain: bool) -> &'static str {
    if drain { DRAIN_PATH } else { UNDRAIN_PATH }
}

/// A drain or undrain asked for by `envelope.sender`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainMessage {
    pub envelope: Envelope,
    /// `true` to drain, `false` to undrain.
    pub drain: bool,
}

impl DrainMessage {
    /// The signed wire bytes.
    pub fn encode(&self, key: [u64; 2]) -> Vec<u8> {
        let mut out = Vec::with_capacity(BODY_LEN);
        self.envelope.encode(&MAGIC, &mut out);
        out.push(u8::from(self.drain));
        peer_auth::sign(key, &mut out);
        out
    }

    /// Parses `bytes` and verifies its MAC with `key`. Nothing else is checked here.
    pub fn decode(bytes: &[u8], key: [u64; 2]) -> Result<DrainMessage, Rejection> {
        if bytes.len() > BODY_LEN {
            return Err(Rejection::TooLarge);
        }
        let (body, tag) = peer_auth::split_mac(bytes)?;
        let head: &[u8; HEAD_LEN] = body.try_into().map_err(|_| Rejection::Malformed)?;
        let envelope = Envelope::decode(head, &MAGIC)?;
        let action = head[ENVELOPE_LEN];
        if action > 1 {
            return Err(Rejection::Malformed);
        }
        peer_auth::verify(key, body, tag)?;
        Ok(DrainMessage {
            envelope,
            drain: action == 1,
        })
    }
}

/// The receiver's checks of drain messages: the MAC, the action against the path, then the
/// [`PeerGate`].
#[derive(Debug, Default)]
pub struct DrainGate {
    gate: PeerGate,
}

impl DrainGate {
    /// Checks a body that arrived from `source` at `now_unix_ms` on the path of `drain`. On
    /// success the nonce is remembered and the message and its sender returned.
    pub fn admit<'m>(
        &mut self,
        body: &[u8],
        drain: bool,
        source: IpAddr,
        now_unix_ms: u64,
        hash_key: [u64; 2],
        members: &'m [MemberSettings],
    ) -> Result<(DrainMessage, &'m MemberSettings), Rejection> {
        let message = DrainMessage::decode(body, control_key(hash_key))?;
        // A signed undrain posted to /drain is not what its sender asked for.
        if message.drain != drain {
            return Err(Rejection::Malformed);
        }
        let sender = self
            .gate
            .check(&message.envelope, source, now_unix_ms, members)?;
        Ok((message, sender))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EXAMPLE, parse};

    const KEY: [u64; 2] = [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210];

    fn message(drain: bool, nonce: u64, sent_unix_ms: u64) -> DrainMessage {
        DrainMessage {
            envelope: Envelope {
                sender: 2,
                sent_unix_ms,
                nonce,
            },
            drain,
        }
    }

    #[test]
    fn messages_round_trip_and_differ_from_claims() {
        let m = message(true, 7, 1_000);
        let bytes = m.encode(control_key(KEY));
        assert_eq!(bytes.len(), BODY_LEN);
        assert_eq!(DrainMessage::decode(&bytes, control_key(KEY)), Ok(m));
        // The claim key does not verify a drain, nor does another cluster's.
        let claim_key = super::super::claims::claim_key(KEY);
        assert_ne!(claim_key, control_key(KEY));
        assert_eq!(
            DrainMessage::decode(&bytes, claim_key),
            Err(Rejection::BadMac)
        );
        // Every single changed bit is caught (by the MAC, or the format checks before it).
        for i in 0..bytes.len() * 8 {
            let mut t = bytes.clone();
            t[i / 8] ^= 1 << (i % 8);
            assert!(
                DrainMessage::decode(&t, control_key(KEY)).is_err(),
                "bit {i}"
            );
        }
        assert_eq!(
            DrainMessage::decode(&bytes[..BODY_LEN - 1], control_key(KEY)),
            Err(Rejection::Malformed)
        );
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            DrainMessage::decode(&long, control_key(KEY)),
            Err(Rejection::TooLarge)
        );
    }

    #[test]
    fn the_gate_refuses_wrong_path_source_member_time_and_replay() {
        let cfg = parse(EXAMPLE).expect("example parses");
        let members = &cfg.cluster.members;
        let sender = members.iter().find(|m| m.id == 2).expect("member 2");
        let from = sender.underlay;
        let now = 1_000_000;
        let mut gate = DrainGate::default();
        let body = message(true, 1, now).encode(control_key(KEY));
        // Posted to /undrain: refused, and the nonce is not used up by it.
        assert_eq!(
            gate.admit(&body, false, from, now, KEY, members).err(),
            Some(Rejection::Malformed)
        );
        let stranger: IpAddr = "203.0.113.9".parse().expect("address");
        assert_eq!(
            gate.admit(&body, true, stranger, now, KEY, members).err(),
            Some(Rejection::WrongSource)
        );
        let (m, who) = gate
            .admit(&body, true, from, now, KEY, members)
            .expect("admitted");
        assert_eq!((m.drain, who.id), (true, 2));
        assert_eq!(
            gate.admit(&body, true, from, now + 1, KEY, members).err(),
            Some(Rejection::Replay)
        );
        let stale = message(true, 2, now - 31_000).encode(control_key(KEY));
        assert_eq!(
            gate.admit(&stale, true, from, now, KEY, members).err(),
            Some(Rejection::Stale)
        );
        let mut stranger_msg = message(true, 3, now);
        stranger_msg.envelope.sender = 999;
        let body = stranger_msg.encode(control_key(KEY));
        assert_eq!(
            gate.admit(&body, true, from, now, KEY, members).err(),
            Some(Rejection::NotMember)
        );
        let forged = message(true, 4, now).encode(control_key([1, 2]));
        assert_eq!(
            gate.admit(&forged, true, from, now, KEY, members).err(),
            Some(Rejection::BadMac)
        );
    }
}
