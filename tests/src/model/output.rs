//! The frames the program must produce: the steering encapsulation towards a member (with
//! etherparse's header writers and IPv4 checksum) and the decapsulated frame for the local
//! stack.

use std::net::IpAddr;

use cdn_common::{
    counters::{Action, Reason},
    maps::NO_MEMBER,
};
use etherparse::{EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header};

use super::{Env, Expect, Out, Rules, Why, auth};

/// Members are indices of a 1024-entry array.
const MAX_MEMBERS: u16 = 1024;
/// `STEER_INNER_V6`.
pub const FLAG_INNER_V6: u8 = 1 << 0;
/// Spec §4: the encapsulation of a redirected SYN.
pub const FLAG_SYN_REDIRECTED: u8 = 1 << 1;
const OUTER_TTL: u8 = 64;

/// What to wrap and where to send it.
#[derive(Clone, Debug)]
pub struct Encap {
    /// The inner IP packet's position in the input frame.
    pub inner_off: usize,
    pub inner_len: usize,
    pub inner_v6: bool,
    pub target: u16,
    pub remaining: [u16; 2],
    pub budget: u8,
    pub entropy: u16,
    /// Flags besides the inner family (spec §4's mark).
    pub extra_flags: u8,
    /// The inner flow, for the MAC: (client, VIP, client port, VIP port, protocol).
    pub flow: (IpAddr, IpAddr, u16, u16, u8),
    /// A search (README "PoPs"): the PoPs left to search. The header is then version 3
    /// (4 signed), its hop count is this set, its hops `remaining`: the member that started
    /// the search and the walk's position.
    pub search: Option<u8>,
}

/// Version of a search header, and of a signed one.
pub const VERSION_SEARCH: u8 = 3;
pub const VERSION_SEARCH_AUTH: u8 = 4;

/// Wraps and sends: the verdict `reason` with the action transmission ends in, or a drop.
pub fn encap_and_send(
    env: &Env,
    rules: &Rules,
    input: &[u8],
    ifindex: u32,
    e: &Encap,
    reason: impl Into<Why>,
) -> Expect {
    let Some(dst) = (e.target < MAX_MEMBERS)
        .then(|| env.members.get(&e.target))
        .flatten()
    else {
        return Expect::drop(Reason::NoRoute);
    };
    let src = match dst {
        IpAddr::V4(_) if env.cfg.underlay_v4 != [0; 4] => IpAddr::from(env.cfg.underlay_v4),
        IpAddr::V6(_) if env.cfg.underlay_v6 != [0; 16] => IpAddr::from(env.cfg.underlay_v6),
        _ => return Expect::drop(Reason::NoRoute),
    };
    let signed = rules.mac && env.steer_auth;
    let header_len = if signed { auth::HEADER_LEN_AUTH } else { 8 };
    let ip_len = if dst.is_ipv6() { 40 } else { 20 };
    let frame_len = 14 + ip_len + 8 + header_len + e.inner_len;
    if env.cfg.max_frame != 0 && frame_len > env.cfg.max_frame as usize {
        return Expect::drop(Reason::TooBig);
    }
    let (version, hop_count, hops) = match e.search {
        Some(pops) => (
            if signed {
                VERSION_SEARCH_AUTH
            } else {
                VERSION_SEARCH
            },
            pops,
            e.remaining,
        ),
        None => (
            if signed { auth::VERSION_AUTH } else { 1 },
            e.remaining.iter().filter(|h| **h != NO_MEMBER).count() as u8,
            e.remaining,
        ),
    };
    let flags = e.extra_flags | if e.inner_v6 { FLAG_INNER_V6 } else { 0 };
    let mut steer = vec![version, flags, e.budget, hop_count];
    steer.extend_from_slice(&hops[0].to_be_bytes());
    steer.extend_from_slice(&hops[1].to_be_bytes());
    if signed {
        let (client, vip, sport, dport, proto) = e.flow;
        let m = auth::mac(
            env.auth_key,
            &auth::Signed {
                outer_src: src,
                client,
                vip,
                sport,
                dport,
                proto,
                flags,
                budget: e.budget,
                hop_count,
                hops,
                search: e.search.is_some(),
            },
        );
        steer.extend_from_slice(&m.to_le_bytes());
    }
    let udp_len = (8 + header_len + e.inner_len) as u16;
    let mut out = Vec::with_capacity(frame_len);
    let mut eth = Ethernet2Header {
        source: [0; 6],
        destination: [0; 6],
        ether_type: if dst.is_ipv6() {
            EtherType::IPV6
        } else {
            EtherType::IPV4
        },
    };
    let mut info = Vec::new();
    let action = match env.next_hops.get(&e.target) {
        Some(h) if h.fresh && h.ifindex != 0 => {
            eth.source = h.src_mac;
            eth.destination = h.dst_mac;
            if h.ifindex == ifindex {
                Action::Tx
            } else {
                Action::Redirect
            }
        }
        _ => {
            // No route to any member in the test's namespace: the kernel gets the frame,
            // addressed to the MAC the input was sent to.
            info = vec![Reason::FibLookup, Reason::FibMiss];
            let ours: [u8; 6] = input[..6]
                .try_into()
                .expect("frames have an Ethernet header");
            eth.source = ours;
            eth.destination = ours;
            Action::Pass
        }
    };
    out.extend_from_slice(&eth.to_bytes());
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip = Ipv4Header::new(udp_len, OUTER_TTL, IpNumber::UDP, s.octets(), d.octets())
                .expect("small payload");
            ip.dont_fragment = true;
            ip.header_checksum = ip.calc_header_checksum();
            out.extend_from_slice(&ip.to_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let ip = Ipv6Header {
                traffic_class: 0,
                flow_label: Ipv6FlowLabel::try_new(u32::from(e.entropy)).expect("16 bits"),
                payload_length: udp_len,
                next_header: IpNumber::UDP,
                hop_limit: OUTER_TTL,
                source: s.octets(),
                destination: d.octets(),
            };
            out.extend_from_slice(&ip.to_bytes());
        }
        _ => unreachable!("the source is chosen by the destination's family"),
    }
    out.extend_from_slice(&e.entropy.to_be_bytes());
    out.extend_from_slice(&env.cfg.steer_port.to_be_bytes());
    out.extend_from_slice(&udp_len.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&steer);
    out.extend_from_slice(&input[e.inner_off..e.inner_off + e.inner_len]);
    Expect {
        action,
        reason: reason.into(),
        info,
        out: Out::Frame(out),
    }
}

/// The inner packet (and whatever follows it in the frame) behind the input's MAC addresses.
pub fn decapsulated(
    input: &[u8],
    inner_off: usize,
    inner_v6: bool,
    reason: impl Into<Why>,
) -> Expect {
    let mut out = input[..12].to_vec();
    out.extend_from_slice(if inner_v6 {
        &[0x86, 0xdd]
    } else {
        &[0x08, 0x00]
    });
    out.extend_from_slice(&input[inner_off..]);
    Expect {
        out: Out::Frame(out),
        ..Expect::pass(reason)
    }
}
