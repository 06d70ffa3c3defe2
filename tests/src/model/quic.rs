//! QUIC routing by QUIC-LB connection ID, as the README section "QUIC routing in the data
//! plane" states the rules: what the model expects for UDP to a QUIC port of a QUIC service.

use cdn_common::{
    counters::{Action, Reason},
    maps::{NO_MEMBER, SERVICE_QUIC, Service},
};

use super::{
    Env, Expect, Rules, Why,
    frame::{self, Flow, Ip},
    output::{Encap, encap_and_send},
};

const V1: u32 = 1;
const V2: u32 = 0x6b33_43cf;

/// Is UDP to `port` of `svc` QUIC?
pub fn is_quic(svc: &Service, port: u16) -> bool {
    svc.flags & SERVICE_QUIC != 0 && port != 0 && svc.quic_ports.contains(&port)
}

/// What the DCID says: `Ok(Some(server ID))` under the service's config, `Ok(None)` for no
/// routable CID, `Err` for a packet dropped (truncated, or one only servers send).
pub fn server_id(f: &[u8], ip: &Ip, svc: &Service) -> Result<Option<u32>, Reason> {
    let udp_len = frame::be16(f, ip.l4 + 4).map_err(|_| Reason::Malformed)? as usize;
    let p = f.get(ip.l4 + 8..ip.l4 + udp_len).ok_or(Reason::Malformed)?;
    let cid_len = usize::from(svc.quic_cid_len);
    let first = *p.first().ok_or(Reason::QuicTruncated)?;
    let dcid = if first & 0x80 == 0 {
        p.get(1..1 + cid_len).ok_or(Reason::QuicTruncated)?
    } else {
        let fixed = p.get(..6).ok_or(Reason::QuicTruncated)?;
        let version = u32::from_be_bytes([fixed[1], fixed[2], fixed[3], fixed[4]]);
        let dcid_len = usize::from(fixed[5]);
        let ty = (first >> 4) & 3;
        if version == 0 || (version == V1 && ty == 3) || (version == V2 && ty == 0) {
            return Err(Reason::QuicInvalid);
        }
        if (version == V1 || version == V2) && dcid_len > 20 {
            return Err(Reason::QuicInvalid);
        }
        let dcid = p.get(6..6 + dcid_len).ok_or(Reason::QuicTruncated)?;
        if dcid_len != cid_len {
            return Ok(None);
        }
        dcid
    };
    if dcid.len() < 4 || dcid[0] >> 5 != svc.quic_config_id {
        return Ok(None);
    }
    Ok(Some(if svc.quic_server_id_len == 1 {
        u32::from(dcid[1])
    } else {
        u32::from(u16::from_be_bytes([dcid[1], dcid[2]]))
    }))
}

/// The member `QUIC_SERVERS` names for a server ID.
fn member(env: &Env, server: u32) -> Option<u16> {
    env.quic_servers
        .get(&server)
        .copied()
        .filter(|m| *m != NO_MEMBER)
}

/// The CID path's steering entropy: the DCID's first four octets and the ports (as the
/// kernel loads them), multiplied, then as `entropy_port` keeps a hash.
fn cid_entropy(f: &[u8], ip: &Ip, fl: &Flow) -> u16 {
    let p = &f[ip.l4 + 8..];
    let at = if p[0] & 0x80 == 0 { 1 } else { 6 };
    let word = u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]);
    let ports = cdn_common::hash::ports_word(fl.sport, fl.dport);
    let mixed = u64::from(word ^ ports).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    0xc000 | ((mixed >> 50) as u16 & 0x3fff)
}

/// A client's QUIC packet to a VIP. `e` is the encapsulation to the bucket's owner (hash,
/// `hops`) that the hash placement would send.
#[allow(clippy::too_many_arguments)]
pub fn ingress(
    env: &Env,
    rules: &Rules,
    f: &[u8],
    ifindex: u32,
    ip: &Ip,
    fl: &Flow,
    svc: &Service,
    e: Encap,
    bucket: impl FnOnce() -> Result<(u16, u16), Why>,
) -> Result<Expect, Why> {
    let server = server_id(f, ip, svc)?;
    let mut e = Encap {
        remaining: [NO_MEMBER; 2],
        ..e
    };
    if let Some(m) = server.and_then(|s| member(env, s)) {
        if m == env.cfg.self_member {
            return Ok(Expect::pass(Reason::QuicCidAccept));
        }
        e.target = m;
        e.entropy = cid_entropy(f, ip, fl);
        return Ok(encap_and_send(
            env,
            rules,
            f,
            ifindex,
            &e,
            Reason::QuicCidForwarded,
        ));
    }
    let (owner, entropy) = bucket()?;
    if owner == NO_MEMBER {
        return Err(Reason::NoRoute.into());
    }
    let mut verdict = if owner == env.cfg.self_member {
        Expect::pass(Reason::QuicHashAccept)
    } else {
        e.target = owner;
        e.entropy = entropy;
        encap_and_send(env, rules, f, ifindex, &e, Reason::QuicHashForwarded)
    };
    if server.is_some() && verdict.action != Action::Drop {
        verdict.info.push(Reason::QuicUnknownServer);
    }
    Ok(verdict)
}

/// The reason a steering packet carrying QUIC is accepted with.
pub fn owner_reason(env: &Env, f: &[u8], ip: &Ip, svc: &Service) -> Reason {
    match server_id(f, ip, svc) {
        Ok(Some(s)) if member(env, s) == Some(env.cfg.self_member) => Reason::QuicCidAccept,
        _ => Reason::QuicHashAccept,
    }
}
