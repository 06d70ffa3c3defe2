//! QUIC routing by QUIC-LB connection ID (README "QUIC routing in the data plane";
//! `cdn_common::quic_lb` for the CID layout).
//!
//! UDP to a QUIC port of a `SERVICE_QUIC` service is QUIC. The destination connection ID of
//! every packet after the client's first flight was chosen by the server that holds the
//! connection, and names that server: such a packet goes straight to its member, whatever the
//! flow's bucket says, so a connection survives table changes and client address migration.
//! Everything else (a client's Initial with its own DCID, another config id, a server ID no
//! member has) is placed by flow hash like `udp_mode = "owner"`: one forward at most, and
//! the receiver accepts whatever it is sent.
//!
//! The DCID is never walked: its length (from the packet or the service) is only compared,
//! and the config octet and server ID (at most two octets right after it) are read with one
//! load at a fixed offset from the UDP payload.

use aya_ebpf::programs::XdpContext;
use cdn_common::{
    counters::Reason,
    maps::{NO_MEMBER, NodeConfig, QUIC_SERVER_SET, Service},
    quic_lb::MAX_CID_LEN,
    wire::entropy_port,
};

use crate::{
    encap::Encap,
    maps::QUIC_SERVERS,
    packet::Frame,
    parse::{Flow, Ip},
    placement::{lists_port, new_flow_bucket_of, signed},
    verdict::Verdict,
    wire::udp,
};

/// `Cid::server` when the packet names no server of our configuration.
const NO_SERVER: u32 = u32::MAX;

/// QUIC version 1 (RFC 9000) and 2 (RFC 9369): the versions whose packet types we know.
const VERSION_1: u32 = 0x0000_0001;
const VERSION_2: u32 = 0x6b33_43cf;

/// Offset of the DCID in a long header (first octet, version, DCID length).
const LONG_DCID_OFF: usize = 6;

/// What a QUIC packet's destination connection ID says.
#[derive(Clone, Copy)]
struct Cid {
    /// The server ID it carries under the service's configuration, or [`NO_SERVER`].
    server: u32,
    /// The DCID's first four octets, big-endian (0 without a routable DCID): mixed into the
    /// steering entropy instead of the flow hash, which the CID path does not need otherwise.
    word: u32,
}

const NOT_ROUTABLE: Cid = Cid {
    server: NO_SERVER,
    word: 0,
};

/// Is UDP to `port` of `svc` QUIC? For services without `SERVICE_QUIC` this is one flag test.
#[inline(always)]
pub fn is_quic(svc: &Service, port: u16) -> bool {
    svc.flags & cdn_common::maps::SERVICE_QUIC != 0 && lists_port(&svc.quic_ports, port)
}

/// Reads the DCID of the QUIC packet in the UDP datagram at `udp_off` (already validated by
/// `parse_flow`: its length field fits the IP packet). `Err`: a packet dropped as truncated or
/// as one a client never sends.
#[inline(always)]
fn read_cid(frame: &Frame, udp_off: usize, svc: &Service) -> Result<Cid, Reason> {
    let udp_len = u16::from_be(frame.get(udp_off, udp::LENGTH).ok_or(Reason::Malformed)?);
    // The payload's length as the datagram states it (the frame may carry padding after it).
    let len = (udp_len as usize).wrapping_sub(udp::LEN);
    let p = udp_off + udp::LEN;
    if len == 0 || len > u16::MAX as usize {
        return Err(Reason::QuicTruncated);
    }
    // The first octet, read as the low half of a two-octet load that starts in the UDP
    // checksum: a one-octet bounds check is one older verifiers learn no range from.
    let first = u16::from_be(frame.read::<u16>(p - 1).ok_or(Reason::QuicTruncated)?) as u8;
    let cid_len = svc.quic_cid_len as usize;
    let dcid_off = if first & 0x80 == 0 {
        // Short header: the DCID has the length our servers give it.
        if len < 1 + cid_len {
            return Err(Reason::QuicTruncated);
        }
        p + 1
    } else {
        if len < LONG_DCID_OFF {
            return Err(Reason::QuicTruncated);
        }
        let version = u32::from_be(frame.read::<u32>(p + 1).ok_or(Reason::QuicTruncated)?);
        // Octets 4 and 5: the last of the version, then the DCID length.
        let dcid_len =
            (u16::from_be(frame.read::<u16>(p + 4).ok_or(Reason::QuicTruncated)?) & 0xff) as usize;
        if version == 0 {
            // Version Negotiation: only servers send it.
            return Err(Reason::QuicInvalid);
        }
        let packet_type = (first >> 4) & 3;
        let known = version == VERSION_1 || version == VERSION_2;
        let retry = (version == VERSION_1 && packet_type == 3)
            || (version == VERSION_2 && packet_type == 0);
        if retry || (known && dcid_len > MAX_CID_LEN) {
            return Err(Reason::QuicInvalid);
        }
        // Other versions may carry up to 255 octets (QUIC invariants): only compared.
        if len < LONG_DCID_OFF + dcid_len {
            return Err(Reason::QuicTruncated);
        }
        if dcid_len != cid_len {
            return Ok(NOT_ROUTABLE);
        }
        p + LONG_DCID_OFF
    };
    // A configuration the controller accepted has at least six octets of CID; a shorter one
    // (never written) routes nothing rather than reading past the DCID's datagram.
    let Some(word) = frame.read::<u32>(dcid_off) else {
        return Ok(NOT_ROUTABLE);
    };
    let word = u32::from_be(word);
    if cid_len < 4 || (word >> 29) as u8 != svc.quic_config_id {
        return Ok(NOT_ROUTABLE);
    }
    let server = if svc.quic_server_id_len == 1 {
        (word >> 16) & 0xff
    } else {
        (word >> 8) & 0xffff
    };
    Ok(Cid { server, word })
}

/// The member `QUIC_SERVERS` names for `server`, `NO_MEMBER` if none.
#[inline(always)]
fn member_of(server: u32) -> u16 {
    match QUIC_SERVERS.get(server) {
        Some(entry) if entry.flags & QUIC_SERVER_SET != 0 => entry.member,
        _ => NO_MEMBER,
    }
}

/// A client's QUIC packet to a VIP (data-plane rules 1 to 4 of the README section).
#[inline(always)]
pub fn ingress(
    ctx: &XdpContext,
    cfg: &NodeConfig,
    frame: &Frame,
    ip: &Ip,
    flow: &Flow,
    svc: &Service,
    out: &mut Encap,
) -> Result<Verdict, Reason> {
    let cid = read_cid(frame, ip.l4_off, svc)?;
    // Our config id: the CID names a server, which is unknown unless a member has its ID.
    let names_server = cid.server != NO_SERVER;
    if names_server {
        let member = member_of(cid.server);
        if member != NO_MEMBER {
            // Its connections live there, healthy or not.
            if member == cfg.self_member {
                return Ok(Verdict::pass(Reason::QuicCidAccept));
            }
            // Stable for the connection on this path, and no SipHash: the CID's octets and
            // the ports, multiplied to spread them into the bits `entropy_port` keeps.
            let mixed = (cid.word ^ flow.ports) as u64;
            let entropy = entropy_port(mixed.wrapping_mul(ENTROPY_MUL));
            let e = to_member(cfg, ip, member, entropy);
            return signed(ctx, cfg, flow, out, e, Reason::QuicCidForwarded);
        }
    }
    // A client's first flight: a new connection, placed where new connections go.
    let (hash, hops) = new_flow_bucket_of(cfg, frame, flow, svc)?;
    if hops[0] == NO_MEMBER {
        return Err(Reason::NoRoute);
    }
    let verdict = if hops[0] == cfg.self_member {
        Verdict::pass(Reason::QuicHashAccept)
    } else {
        // Built here, not before the lookups: kept across them it would take stack slots the
        // entry point's frame has no room for.
        let e = to_member(cfg, ip, hops[0], entropy_port(hash));
        signed(ctx, cfg, flow, out, e, Reason::QuicHashForwarded)?
    };
    Ok(if names_server {
        verdict.with_info(Reason::QuicUnknownServer)
    } else {
        verdict
    })
}

/// The encapsulation of the packet `ip` to `target`, with no further hop: the receiver
/// accepts without looking further.
#[inline(always)]
fn to_member(cfg: &NodeConfig, ip: &Ip, target: u16, entropy: u16) -> Encap {
    Encap {
        inner_off: ip.l3_off,
        inner_len: ip.ip_len,
        inner_v6: ip.v6,
        target,
        remaining: [NO_MEMBER; 2],
        budget: cfg.hop_budget,
        entropy,
        flags: 0,
    }
}

/// Multiplier of the CID path's entropy (2^64 / golden ratio, odd).
pub const ENTROPY_MUL: u64 = 0x9e37_79b9_7f4a_7c15;

/// The reason a steering packet carrying QUIC is accepted with (rule 5): the sender decided,
/// so it is always accepted; `QuicCidAccept` only if its DCID names this member. Malformed
/// QUIC is no reason to drop here.
#[inline(always)]
pub fn owner_reason(cfg: &NodeConfig, frame: &Frame, ip: &Ip, svc: &Service) -> Reason {
    match read_cid(frame, ip.l4_off, svc) {
        Ok(cid) if cid.server != NO_SERVER => {
            let member = member_of(cid.server);
            if member != NO_MEMBER && member == cfg.self_member {
                Reason::QuicCidAccept
            } else {
                Reason::QuicHashAccept
            }
        }
        _ => Reason::QuicHashAccept,
    }
}
