//! Header parsing: Ethernet and VLAN tags, IPv4 (with options) and IPv6 (with a bounded chain of
//! extension headers), then TCP, UDP and ICMP/ICMPv6 into a [`Flow`].
//!
//! Parsing is split so that the common case, a packet not addressed to us, costs only the L2
//! walk and one address read ([`parse_l2`], [`peek_dst`]); the full validation ([`parse_ip`],
//! [`parse_flow`]) runs only for packets to a VIP or to the steering port.
//!
//! Headers are read field by field straight from the packet after one bounds check per header,
//! and flows refer to their addresses by offset instead of copying them: the BPF stack is 512
//! bytes for the whole call chain, and every copy would also cost time.

use cdn_common::{counters::Reason, maps::MemberAddr};

use crate::{
    packet::{Frame, MAX_HEADER_OFFSET},
    wire::{eth, icmp, ipv4, ipv6, load, proto, tcp, udp},
};

/// IPv6 extension headers skipped before giving up on a packet.
const MAX_IPV6_EXT_HEADERS: usize = 4;

/// Where the IP header starts and which family it is.
#[derive(Clone, Copy)]
pub struct L2 {
    pub l3_off: usize,
    pub v6: bool,
}

#[inline(always)]
fn is_vlan(ethertype: u16) -> bool {
    ethertype == eth::TYPE_8021Q
        || ethertype == eth::TYPE_8021AD
        || ethertype == eth::TYPE_QINQ_LEGACY
}

/// Walks Ethernet and up to two 802.1Q/802.1ad (or legacy 0x9100 QinQ) tags. `Ok(None)`: not IP, leave it alone.
#[inline(always)]
pub fn parse_l2(frame: &Frame) -> Result<Option<L2>, Reason> {
    let ethertype_at = |off: usize| {
        frame
            .get(off, eth::vlan::ETHERTYPE)
            .map(u16::from_be)
            .ok_or(Reason::Malformed)
    };
    // Each tag (TCI, then the ethertype of what follows) sits where the previous header ends.
    let mut off = eth::LEN;
    let mut ethertype = u16::from_be(frame.get(0, eth::ETHERTYPE).ok_or(Reason::Malformed)?);
    if is_vlan(ethertype) {
        ethertype = ethertype_at(off)?;
        off += eth::vlan::LEN;
        if is_vlan(ethertype) {
            ethertype = ethertype_at(off)?;
            off += eth::vlan::LEN;
        }
    }
    Ok(match ethertype {
        eth::TYPE_IPV4 => Some(L2 {
            l3_off: off,
            v6: false,
        }),
        eth::TYPE_IPV6 => Some(L2 {
            l3_off: off,
            v6: true,
        }),
        _ => None,
    })
}

/// IPv4 header length in bytes, from the version/IHL byte.
#[inline(always)]
const fn ihl_bytes(ver_ihl: u8) -> usize {
    (ver_ihl & 0x0f) as usize * 4
}

/// Offset of the source address in an IP header at `l3`.
#[inline(always)]
pub const fn src_addr_off(l3: usize, v6: bool) -> usize {
    if v6 {
        l3 + ipv6::SRC.off()
    } else {
        l3 + ipv4::SRC.off()
    }
}

/// Offset of the destination address in an IP header at `l3`.
#[inline(always)]
pub const fn dst_addr_off(l3: usize, v6: bool) -> usize {
    if v6 {
        l3 + ipv6::DST.off()
    } else {
        l3 + ipv4::DST.off()
    }
}

/// Requires the fixed IP header to be present, so that its addresses can be read.
#[inline(always)]
pub fn require_ip_header(frame: &Frame, l2: L2) -> Result<(), Reason> {
    let len = if l2.v6 { ipv6::LEN } else { ipv4::LEN };
    if frame.has(l2.l3_off, len) {
        Ok(())
    } else {
        Err(Reason::Malformed)
    }
}

/// UDP destination port (host order) of the IP packet at `l3_off`, `Ok(None)` if it is not
/// UDP; extension headers are not walked. Used to recognise steering packets cheaply; the
/// caller validates the packet fully afterwards. A UDP packet too short for its header is
/// malformed.
#[inline(always)]
pub fn peek_udp_dport(frame: &Frame, l2: L2) -> Result<Option<u16>, Reason> {
    let (next, l4) = if l2.v6 {
        let h = frame
            .at::<[u8; ipv6::LEN]>(l2.l3_off)
            .ok_or(Reason::Malformed)?
            .cast::<u8>();
        // SAFETY: inside the 40 bytes checked above.
        (unsafe { load(h, ipv6::NEXT_HEADER) }, l2.l3_off + ipv6::LEN)
    } else {
        let h = frame
            .at::<[u8; ipv4::LEN]>(l2.l3_off)
            .ok_or(Reason::Malformed)?
            .cast::<u8>();
        // SAFETY: inside the 20 bytes checked above.
        let (ver_ihl, next) = unsafe { (load(h, ipv4::VER_IHL), load(h, ipv4::PROTO)) };
        (next, l2.l3_off + ihl_bytes(ver_ihl))
    };
    if next != proto::UDP {
        return Ok(None);
    }
    let port = frame.get(l4, udp::DST_PORT).ok_or(Reason::Malformed)?;
    Ok(Some(u16::from_be(port)))
}

/// A validated IP header.
#[derive(Clone, Copy)]
pub struct Ip {
    pub v6: bool,
    pub l3_off: usize,
    /// Length of the IP packet according to its header (never beyond the frame).
    pub ip_len: usize,
    pub l4_off: usize,
    pub proto: u8,
}

impl Ip {
    #[inline(always)]
    pub fn src_off(&self) -> usize {
        src_addr_off(self.l3_off, self.v6)
    }

    #[inline(always)]
    pub fn dst_off(&self) -> usize {
        dst_addr_off(self.l3_off, self.v6)
    }
}

/// Validates the IP header at `l3_off`: version, header and total lengths, fragments, and the
/// IPv6 extension header chain.
#[inline(always)]
pub fn parse_ip(frame: &Frame, l3_off: usize, v6: bool) -> Result<Ip, Reason> {
    if l3_off > MAX_HEADER_OFFSET {
        return Err(Reason::Unsupported);
    }
    if v6 {
        parse_ipv6(frame, l3_off)
    } else {
        parse_ipv4(frame, l3_off)
    }
}

#[inline(always)]
fn parse_ipv4(frame: &Frame, l3: usize) -> Result<Ip, Reason> {
    let h = frame
        .at::<[u8; ipv4::LEN]>(l3)
        .ok_or(Reason::Malformed)?
        .cast::<u8>();
    // SAFETY: the 20 bytes at `h` are inside the packet (alignment: see `Frame::read`).
    let (ver_ihl, total, frag, next) = unsafe {
        (
            load(h, ipv4::VER_IHL),
            u16::from_be(load(h, ipv4::TOTAL_LEN)) as usize,
            u16::from_be(load(h, ipv4::FLAGS_FRAG)),
            load(h, ipv4::PROTO),
        )
    };
    if ver_ihl >> 4 != 4 {
        return Err(Reason::Malformed);
    }
    let ihl = ihl_bytes(ver_ihl);
    if ihl < ipv4::LEN || total < ihl || l3 + total > frame.len() {
        return Err(Reason::Malformed);
    }
    // More-fragments flag or a non-zero offset: a fragment.
    if frag & ipv4::MORE_FRAGS_AND_OFFSET != 0 {
        return Err(Reason::Fragment);
    }
    Ok(Ip {
        v6: false,
        l3_off: l3,
        ip_len: total,
        l4_off: l3 + ihl,
        proto: next,
    })
}

#[inline(always)]
fn parse_ipv6(frame: &Frame, l3: usize) -> Result<Ip, Reason> {
    let h = frame
        .at::<[u8; ipv6::LEN]>(l3)
        .ok_or(Reason::Malformed)?
        .cast::<u8>();
    // SAFETY: the 40 bytes at `h` are inside the packet. The version is the high nibble of
    // the first byte.
    let (ver, payload, mut next) = unsafe {
        (
            *h >> 4,
            u16::from_be(load(h, ipv6::PAYLOAD_LEN)) as usize,
            load(h, ipv6::NEXT_HEADER),
        )
    };
    if ver != 6 {
        return Err(Reason::Malformed);
    }
    let total = ipv6::LEN + payload;
    if l3 + total > frame.len() {
        return Err(Reason::Malformed);
    }
    let mut off = l3 + ipv6::LEN;
    // Bounded walk: a fixed number of extension headers, each at a bounded offset.
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            proto::HOPOPTS | proto::ROUTING | proto::DSTOPTS => {
                let ext = frame
                    .get(off, ipv6::ext::NEXT_AND_LEN)
                    .ok_or(Reason::Malformed)?
                    .to_le_bytes();
                next = ext[0];
                off += (ext[1] as usize + 1) * ipv6::ext::LEN_UNIT;
                if off > MAX_HEADER_OFFSET {
                    return Err(Reason::Unsupported);
                }
            }
            proto::FRAGMENT => return Err(Reason::Fragment),
            _ => break,
        }
    }
    if matches!(next, proto::HOPOPTS | proto::ROUTING | proto::DSTOPTS) {
        // Chain longer than we walk.
        return Err(Reason::Unsupported);
    }
    if off > l3 + total {
        return Err(Reason::Malformed);
    }
    Ok(Ip {
        v6: true,
        l3_off: l3,
        ip_len: total,
        l4_off: off,
        proto: next,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Udp,
    /// An ICMP error about a flow to a VIP; the flow fields describe that flow.
    IcmpError,
    /// Any other ICMP: for the local stack (echo, neighbour discovery...).
    IcmpLocal,
}

/// A flow in the client -> VIP direction. Addresses are referred to by their offset in the
/// packet (for ICMP errors, inside the quoted packet, swapped).
#[derive(Clone, Copy)]
pub struct Flow {
    pub kind: Kind,
    pub v6: bool,
    /// TCP or UDP (for ICMP errors: the protocol of the flow the error is about).
    pub proto: u8,
    pub tcp_flags: u8,
    pub src_off: usize,
    pub dst_off: usize,
    /// Source and destination port as loaded from the packet (source in the low half).
    pub ports: u32,
}

impl Flow {
    /// VIP-side port, host order.
    #[inline(always)]
    pub fn dst_port(&self) -> u16 {
        u16::from_be((self.ports >> 16) as u16)
    }
}

/// Parses the transport header of a validated IP packet into the flow it belongs to.
#[inline(always)]
pub fn parse_flow(frame: &Frame, ip: &Ip) -> Result<Flow, Reason> {
    let l4 = ip.l4_off;
    if l4 > MAX_HEADER_OFFSET {
        return Err(Reason::Unsupported);
    }
    let l4_end = ip.l3_off + ip.ip_len;
    let mut flow = Flow {
        kind: Kind::Tcp,
        v6: ip.v6,
        proto: ip.proto,
        tcp_flags: 0,
        src_off: ip.src_off(),
        dst_off: ip.dst_off(),
        ports: 0,
    };
    match ip.proto {
        proto::TCP => {
            let th = frame
                .at::<[u8; tcp::LEN]>(l4)
                .ok_or(Reason::Malformed)?
                .cast::<u8>();
            // SAFETY: the 20 bytes at `th` are inside the packet.
            let (ports, doff, flags) = unsafe {
                (
                    load(th, tcp::PORTS),
                    (load(th, tcp::DATA_OFF) >> 4) as usize * 4,
                    load(th, tcp::FLAGS),
                )
            };
            if doff < tcp::LEN || l4 + doff > l4_end {
                return Err(Reason::Malformed);
            }
            flow.ports = ports;
            flow.tcp_flags = flags;
            Ok(flow)
        }
        proto::UDP => {
            let uh = frame
                .at::<[u8; udp::LEN]>(l4)
                .ok_or(Reason::Malformed)?
                .cast::<u8>();
            // SAFETY: the 8 bytes at `uh` are inside the packet.
            let (ports, len) = unsafe {
                (
                    load(uh, udp::PORTS),
                    u16::from_be(load(uh, udp::LENGTH)) as usize,
                )
            };
            if len < udp::LEN || l4 + len > l4_end {
                return Err(Reason::Malformed);
            }
            flow.kind = Kind::Udp;
            flow.ports = ports;
            Ok(flow)
        }
        proto::ICMP if !ip.v6 => parse_icmp(frame, ip, flow),
        proto::ICMPV6 if ip.v6 => parse_icmp(frame, ip, flow),
        _ => Err(Reason::Unsupported),
    }
}

/// ICMP errors carry the start of the packet that caused them: a packet *from* the VIP. The flow
/// they belong to is that packet's tuple reversed.
#[inline(always)]
fn parse_icmp(frame: &Frame, ip: &Ip, mut flow: Flow) -> Result<Flow, Reason> {
    let l4 = ip.l4_off;
    if l4 + icmp::LEN > ip.l3_off + ip.ip_len {
        return Err(Reason::Malformed);
    }
    let header = frame
        .at::<[u8; icmp::LEN]>(l4)
        .ok_or(Reason::Malformed)?
        .cast::<u8>();
    // SAFETY: inside the 8 bytes checked above.
    let icmp_type = unsafe { load(header, icmp::TYPE) };
    let is_error = if ip.v6 {
        // Destination unreachable, packet too big, time exceeded, parameter problem.
        (1..=4).contains(&icmp_type)
    } else {
        // Destination unreachable (fragmentation needed among them), time exceeded,
        // parameter problem.
        icmp_type == 3 || icmp_type == 11 || icmp_type == 12
    };
    flow.kind = Kind::IcmpLocal;
    if !is_error {
        return Ok(flow);
    }
    let quoted = l4 + icmp::LEN;
    let (quoted_proto, ports_off) = if ip.v6 {
        let h = frame
            .at::<[u8; ipv6::LEN]>(quoted)
            .ok_or(Reason::Malformed)?
            .cast::<u8>();
        // SAFETY: the 40 bytes at `h` are inside the packet.
        (unsafe { load(h, ipv6::NEXT_HEADER) }, quoted + ipv6::LEN)
    } else {
        let h = frame
            .at::<[u8; ipv4::LEN]>(quoted)
            .ok_or(Reason::Malformed)?
            .cast::<u8>();
        // SAFETY: the 20 bytes at `h` are inside the packet.
        let (ver_ihl, next) = unsafe { (load(h, ipv4::VER_IHL), load(h, ipv4::PROTO)) };
        let ihl = ihl_bytes(ver_ihl);
        if ver_ihl >> 4 != 4 || ihl < ipv4::LEN {
            return Err(Reason::Malformed);
        }
        (next, quoted + ihl)
    };
    if quoted_proto != proto::TCP && quoted_proto != proto::UDP {
        // About a flow we do not steer (or behind extension headers): the local stack decides.
        return Ok(flow);
    }
    if ports_off > MAX_HEADER_OFFSET {
        return Err(Reason::Unsupported);
    }
    // The quoted transport header starts with the ports, for TCP and UDP alike.
    let ports = frame.get(ports_off, udp::PORTS).ok_or(Reason::Malformed)?;
    flow.kind = Kind::IcmpError;
    flow.proto = quoted_proto;
    // The quoted packet went VIP -> client; the flow is client -> VIP.
    flow.src_off = dst_addr_off(quoted, ip.v6);
    flow.dst_off = src_addr_off(quoted, ip.v6);
    flow.ports = ports.rotate_left(16);
    Ok(flow)
}

/// Key of the member-address map for the address at `off`, built as four words: built from
/// bytes, the zeros of an IPv4-mapped key compile to a byte-wise `memset` call.
#[inline(always)]
pub fn member_key(frame: &Frame, off: usize, v6: bool) -> Option<MemberAddr> {
    let words: [u32; 4] = if v6 {
        frame.read::<[u32; 4]>(off)?
    } else {
        // `::ffff:a.b.c.d`, as `MemberAddr::v4` lays it out.
        let mapped = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
        [0, 0, mapped, frame.read::<u32>(off)?]
    };
    // SAFETY: [u32; 4] and [u8; 16] have the same size and no invalid bit patterns.
    Some(MemberAddr {
        addr: unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) },
    })
}
