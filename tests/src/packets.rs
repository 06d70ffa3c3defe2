//! Frames for the tests, built with `etherparse` (an implementation independent of the program
//! under test), and the encapsulations the program is expected to produce, built the same way.

use std::net::IpAddr;

use anyhow::{Context as _, Result, bail};
use cdn_common::{
    hash::{PROTO_TCP, PROTO_UDP, flow_hash_v4, flow_hash_v6, ports_word, v4_word, v6_words},
    wire::{STEER_INNER_V6, STEER_VERSION},
};
use etherparse::{
    EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, PacketBuilder,
    UdpHeader, VlanId,
};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc1];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// 802.1Q/802.1ad tagging of a test frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vlan {
    None,
    Single(u16),
    Double(u16, u16),
}

impl Vlan {
    pub const ALL: [Vlan; 3] = [Vlan::None, Vlan::Single(100), Vlan::Double(200, 300)];

    /// Bytes of Ethernet header and tags in front of the IP header.
    pub fn l2_len(self) -> usize {
        match self {
            Vlan::None => 14,
            Vlan::Single(_) => 18,
            Vlan::Double(..) => 22,
        }
    }
}

/// A TCP or UDP flow, client to VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub udp: bool,
}

impl Flow {
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self {
            src: src.parse().expect("test address"),
            dst: dst.parse().expect("test address"),
            sport,
            dport,
            udp: false,
        }
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self {
            udp: true,
            ..Self::tcp(src, sport, dst, dport)
        }
    }

    pub fn proto(&self) -> u8 {
        if self.udp { PROTO_UDP } else { PROTO_TCP }
    }

    pub fn is_v6(&self) -> bool {
        self.src.is_ipv6()
    }

    /// The keyed flow hash, computed in userspace with the shared function.
    pub fn hash(&self, key: &[u64; 2]) -> u64 {
        let ports = ports_word(self.sport, self.dport);
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => flow_hash_v4(
                key,
                v4_word(s.octets()),
                v4_word(d.octets()),
                ports,
                self.proto(),
            ),
            (IpAddr::V6(s), IpAddr::V6(d)) => flow_hash_v6(
                key,
                v6_words(s.octets()),
                v6_words(d.octets()),
                ports,
                self.proto(),
            ),
            _ => panic!("mixed address families in a test flow"),
        }
    }
}

/// TCP flags of a test segment.
#[derive(Clone, Copy, Debug)]
pub struct Tcp {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub seq: u32,
    pub ack_no: u32,
}

impl Tcp {
    pub const SYN: Tcp = Tcp {
        syn: true,
        ack: false,
        fin: false,
        seq: 1000,
        ack_no: 0,
    };
    pub const ACK: Tcp = Tcp {
        syn: false,
        ack: true,
        fin: false,
        seq: 1001,
        ack_no: 5001,
    };
    pub const SYN_ACK: Tcp = Tcp {
        syn: true,
        ack: true,
        fin: false,
        seq: 1000,
        ack_no: 5001,
    };
}

fn vlan_id(id: u16) -> VlanId {
    VlanId::try_new(id).expect("test VLAN id in range")
}

/// Builds an Ethernet frame for `flow` carrying `payload`.
pub fn frame(flow: &Flow, tcp: Tcp, vlan: Vlan, payload: &[u8]) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC);
    macro_rules! finish {
        ($ip:expr) => {{
            let b = $ip;
            let mut out = Vec::new();
            if flow.udp {
                let b = b.udp(flow.sport, flow.dport);
                b.write(&mut out, payload).expect("building a test frame");
            } else {
                let mut b = b.tcp(flow.sport, flow.dport, tcp.seq, 64000);
                if tcp.syn {
                    b = b.syn();
                }
                if tcp.ack {
                    b = b.ack(tcp.ack_no);
                }
                if tcp.fin {
                    b = b.fin();
                }
                b.write(&mut out, payload).expect("building a test frame");
            }
            out
        }};
    }
    macro_rules! with_ip {
        ($l2:expr) => {{
            let l2 = $l2;
            match (flow.src, flow.dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => finish!(l2.ipv4(s.octets(), d.octets(), 61)),
                (IpAddr::V6(s), IpAddr::V6(d)) => finish!(l2.ipv6(s.octets(), d.octets(), 61)),
                _ => panic!("mixed address families in a test flow"),
            }
        }};
    }
    match vlan {
        Vlan::None => with_ip!(eth),
        Vlan::Single(id) => with_ip!(eth.single_vlan(vlan_id(id))),
        Vlan::Double(outer, inner) => with_ip!(eth.double_vlan(vlan_id(outer), vlan_id(inner))),
    }
}

/// The IP packet inside a frame built by [`frame`].
pub fn ip_packet(frame: &[u8], vlan: Vlan) -> &[u8] {
    &frame[vlan.l2_len()..]
}

/// What an encapsulation must look like, field by field.
#[derive(Clone, Debug)]
pub struct ExpectedEncap<'a> {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub outer_src: IpAddr,
    pub outer_dst: IpAddr,
    pub entropy: u16,
    pub steer_port: u16,
    pub budget: u8,
    pub hops: &'a [u16],
    pub inner: &'a [u8],
}

/// Builds the expected encapsulated frame with etherparse's header writers and checksum.
pub fn expected_encap(e: &ExpectedEncap<'_>) -> Result<Vec<u8>> {
    let inner_v6 = match e.inner.first() {
        Some(b) if b >> 4 == 6 => true,
        Some(b) if b >> 4 == 4 => false,
        _ => bail!("inner packet is not IP"),
    };
    let mut steer = vec![
        STEER_VERSION,
        if inner_v6 { STEER_INNER_V6 } else { 0 },
        e.budget,
        e.hops.len() as u8,
    ];
    for i in 0..2 {
        let hop = e
            .hops
            .get(i)
            .copied()
            .unwrap_or(cdn_common::maps::NO_MEMBER);
        steer.extend_from_slice(&hop.to_be_bytes());
    }
    let udp_len = u16::try_from(8 + steer.len() + e.inner.len()).context("UDP length")?;
    let udp = UdpHeader {
        source_port: e.entropy,
        destination_port: e.steer_port,
        length: udp_len,
        checksum: 0,
    };
    let mut out = Vec::new();
    match (e.outer_src, e.outer_dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            Ethernet2Header {
                source: e.src_mac,
                destination: e.dst_mac,
                ether_type: EtherType::IPV4,
            }
            .write(&mut out)?;
            let mut ip = Ipv4Header::new(udp_len, 64, IpNumber::UDP, s.octets(), d.octets())?;
            ip.dont_fragment = true;
            ip.identification = 0;
            ip.header_checksum = ip.calc_header_checksum();
            ip.write(&mut out)?;
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            Ethernet2Header {
                source: e.src_mac,
                destination: e.dst_mac,
                ether_type: EtherType::IPV6,
            }
            .write(&mut out)?;
            Ipv6Header {
                traffic_class: 0,
                flow_label: Ipv6FlowLabel::try_new(u32::from(e.entropy))?,
                payload_length: udp_len,
                next_header: IpNumber::UDP,
                hop_limit: 64,
                source: s.octets(),
                destination: d.octets(),
            }
            .write(&mut out)?;
        }
        _ => bail!("mixed outer address families"),
    }
    udp.write(&mut out)?;
    out.extend_from_slice(&steer);
    out.extend_from_slice(e.inner);
    Ok(out)
}

/// A frame as a member sends it to this node: the encapsulation of `inner` (the IP packet)
/// from `outer_src` to `outer_dst`.
pub fn steering_frame(
    outer_src: IpAddr,
    outer_dst: IpAddr,
    steer_port: u16,
    budget: u8,
    hops: &[u16],
    inner: &[u8],
) -> Result<Vec<u8>> {
    expected_encap(&ExpectedEncap {
        dst_mac: NODE_MAC,
        src_mac: CLIENT_MAC,
        outer_src,
        outer_dst,
        entropy: 0xc123,
        steer_port,
        budget,
        hops,
        inner,
    })
}

/// The frame the local stack must receive after decapsulation of a frame built by
/// [`steering_frame`]: the outer MACs and the inner packet.
pub fn decapsulated(inner: &[u8]) -> Vec<u8> {
    let ether_type = if inner[0] >> 4 == 6 {
        EtherType::IPV6
    } else {
        EtherType::IPV4
    };
    let mut out = Ethernet2Header {
        source: CLIENT_MAC,
        destination: NODE_MAC,
        ether_type,
    }
    .to_bytes()
    .to_vec();
    out.extend_from_slice(inner);
    out
}

/// An ICMPv4 "fragmentation needed" (or ICMPv6 "packet too big") sent by a router to the VIP,
/// quoting a packet of `flow`'s reply direction (VIP -> client).
pub fn icmp_too_big(flow: &Flow, router: IpAddr, vlan: Vlan) -> Vec<u8> {
    let reply = Flow {
        src: flow.dst,
        dst: flow.src,
        sport: flow.dport,
        dport: flow.sport,
        udp: flow.udp,
    };
    let quoted_frame = frame(&reply, Tcp::ACK, Vlan::None, &[0u8; 64]);
    let quoted = &quoted_frame[14..];
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC);
    let mut out = Vec::new();
    macro_rules! finish {
        ($l2:expr) => {{
            match (router, flow.dst) {
                (IpAddr::V4(r), IpAddr::V4(vip)) => {
                    let q = &quoted[..28.min(quoted.len())];
                    $l2.ipv4(r.octets(), vip.octets(), 64)
                        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                                next_hop_mtu: 1400,
                            },
                        ))
                        .write(&mut out, q)
                        .expect("building ICMP");
                }
                (IpAddr::V6(r), IpAddr::V6(vip)) => {
                    $l2.ipv6(r.octets(), vip.octets(), 64)
                        .icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu: 1280 })
                        .write(&mut out, quoted)
                        .expect("building ICMPv6");
                }
                _ => panic!("mixed families"),
            }
        }};
    }
    match vlan {
        Vlan::None => finish!(eth),
        Vlan::Single(id) => finish!(eth.single_vlan(vlan_id(id))),
        Vlan::Double(o, i) => finish!(eth.double_vlan(vlan_id(o), vlan_id(i))),
    }
    out
}

/// `frame`, a version-1 steering frame (untagged, as [`steering_frame`] builds it), turned
/// into version 2 with `flags` set and the MAC the reference model computes
/// ([`crate::model::auth`]) for `flow` (client -> VIP) under `key` (`NodeConfig::auth_key`).
pub fn signed_steering_frame(frame: &[u8], flags: u8, key: [u64; 2], flow: &Flow) -> Vec<u8> {
    let v6 = frame[12..14] == [0x86, 0xdd];
    let l4 = if v6 { 14 + 40 } else { 14 + 20 };
    let sh = l4 + 8;
    let outer_src: IpAddr = if v6 {
        <[u8; 16]>::try_from(&frame[22..38])
            .expect("IPv6 source")
            .into()
    } else {
        <[u8; 4]>::try_from(&frame[26..30])
            .expect("IPv4 source")
            .into()
    };
    let mut out = frame[..sh + 8].to_vec();
    // A search header (version 3) becomes its signed form, 4; anything else version 2.
    let search = out[sh] == cdn_common::wire::STEER_VERSION_SEARCH;
    out[sh] = if search {
        cdn_common::wire::STEER_VERSION_SEARCH_AUTH
    } else {
        crate::model::auth::VERSION_AUTH
    };
    out[sh + 1] |= flags;
    let mac = crate::model::auth::mac(
        key,
        &crate::model::auth::Signed {
            outer_src,
            client: flow.src,
            vip: flow.dst,
            sport: flow.sport,
            dport: flow.dport,
            proto: if flow.udp { 17 } else { 6 },
            flags: out[sh + 1],
            budget: out[sh + 2],
            hop_count: out[sh + 3],
            hops: [
                u16::from_be_bytes([out[sh + 4], out[sh + 5]]),
                u16::from_be_bytes([out[sh + 6], out[sh + 7]]),
            ],
            search,
        },
    );
    out.extend_from_slice(&mac.to_le_bytes());
    out.extend_from_slice(&frame[sh + 8..]);
    // Lengths grow by the MAC's 8 bytes; the outer IPv4 checksum follows.
    let grow = |b: &mut [u8], at: usize| {
        let v = u16::from_be_bytes([b[at], b[at + 1]]) + 8;
        b[at..at + 2].copy_from_slice(&v.to_be_bytes());
    };
    grow(&mut out, l4 + 4);
    if v6 {
        grow(&mut out, 14 + 4);
    } else {
        grow(&mut out, 14 + 2);
        out[24..26].fill(0);
        let sum: u32 = out[14..34]
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        let folded = (sum & 0xffff) + (sum >> 16);
        let folded = (folded & 0xffff) + (folded >> 16);
        out[24..26].copy_from_slice(&(!(folded as u16)).to_be_bytes());
    }
    out
}

/// QUIC version 1 and 2 (RFC 9000, RFC 9369).
pub const QUIC_V1: u32 = 0x0000_0001;
pub const QUIC_V2: u32 = 0x6b33_43cf;

/// A QUIC-LB connection ID of `cfg` for `server_id` (see `cdn_common::quic_lb`), its nonce
/// derived from `nonce`.
pub fn quic_cid(cfg: &cdn_common::quic_lb::QuicLbConfig, server_id: u32, nonce: u8) -> Vec<u8> {
    let mut out = [0u8; cdn_common::quic_lb::MAX_CID_LEN];
    let nonce = std::array::from_fn(|i| nonce.wrapping_add((i as u8).wrapping_mul(37)));
    let len = cfg
        .encode(server_id, &nonce, &mut out)
        .expect("valid test QUIC-LB configuration");
    out[..len].to_vec()
}

/// [`quic_cid`] in hex, as `cdn-steer lookup --cid` takes it.
pub fn quic_cid_hex(cfg: &cdn_common::quic_lb::QuicLbConfig, server_id: u32, nonce: u8) -> String {
    quic_cid(cfg, server_id, nonce)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A QUIC short-header packet (1-RTT) with destination connection ID `dcid`, then `rest`
/// (packet number and protected payload, opaque here).
pub fn quic_short(dcid: &[u8], rest: &[u8]) -> Vec<u8> {
    // Fixed bit set, spin and key phase clear, 2-octet packet number.
    let mut p = vec![0x41];
    p.extend_from_slice(dcid);
    p.extend_from_slice(rest);
    p
}

/// A QUIC long-header packet: `first` octet, `version`, DCID, SCID, then `rest`.
pub fn quic_long(first: u8, version: u32, dcid: &[u8], scid: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    p.extend_from_slice(&version.to_be_bytes());
    p.push(dcid.len() as u8);
    p.extend_from_slice(dcid);
    p.push(scid.len() as u8);
    p.extend_from_slice(scid);
    p.extend_from_slice(rest);
    p
}

/// First octet of a QUIC long header of `version` and packet type (the version-1 numbering:
/// 0 Initial, 1 0-RTT, 2 Handshake, 3 Retry; translated for version 2).
pub fn quic_long_first(version: u32, v1_type: u8) -> u8 {
    let bits = if version == QUIC_V2 {
        (v1_type + 1) & 3
    } else {
        v1_type & 3
    };
    0xc0 | bits << 4 | 0x01
}

/// A client's Initial (version 1) with its own DCID `dcid`, padded to `pad` octets.
pub fn quic_initial(dcid: &[u8], pad: usize) -> Vec<u8> {
    let mut p = quic_long(
        quic_long_first(QUIC_V1, 0),
        QUIC_V1,
        dcid,
        &[0x5c; 8],
        &[0, 0x44, 0x00, 0],
    );
    p.resize(p.len().max(pad), 0);
    p
}

/// The steering entropy (outer UDP source port) of a packet the program forwards by connection
/// ID: the DCID's first four octets and the flow's ports, mixed, instead of the flow hash.
pub fn quic_cid_entropy(flow: &Flow, dcid: &[u8]) -> u16 {
    let word = u32::from_be_bytes([dcid[0], dcid[1], dcid[2], dcid[3]]);
    let mixed = u64::from(word ^ ports_word(flow.sport, flow.dport));
    cdn_common::wire::entropy_port(mixed.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}
