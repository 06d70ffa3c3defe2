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

use cdn_common::counters::Counter;

use crate::packet::{Frame, MAX_HEADER_OFFSET};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
/// Pre-standard QinQ outer tag, still emitted by some switches.
const ETH_P_QINQ_LEGACY: u16 = 0x9100;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;

/// IPv6 extension headers skipped before giving up on a packet.
const MAX_IPV6_EXT_HEADERS: usize = 4;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// Where the IP header starts and which family it is.
#[derive(Clone, Copy)]
pub struct L2 {
    pub l3_off: usize,
    pub v6: bool,
}

#[inline(always)]
fn is_vlan(ethertype: u16) -> bool {
    ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD || ethertype == ETH_P_QINQ_LEGACY
}

/// Walks Ethernet and up to two 802.1Q/802.1ad (or legacy 0x9100 QinQ) tags. `Ok(None)`: not IP, leave it alone.
#[inline(always)]
pub fn parse_l2(frame: &Frame) -> Result<Option<L2>, Counter> {
    let mut ethertype = u16::from_be(frame.read::<u16>(12).ok_or(Counter::Malformed)?);
    let mut off = 14;
    if is_vlan(ethertype) {
        ethertype = u16::from_be(frame.read::<u16>(16).ok_or(Counter::Malformed)?);
        off = 18;
        if is_vlan(ethertype) {
            ethertype = u16::from_be(frame.read::<u16>(20).ok_or(Counter::Malformed)?);
            off = 22;
        }
    }
    Ok(match ethertype {
        ETH_P_IP => Some(L2 {
            l3_off: off,
            v6: false,
        }),
        ETH_P_IPV6 => Some(L2 {
            l3_off: off,
            v6: true,
        }),
        _ => None,
    })
}

/// Offset of the source address in an IP header at `l3`.
#[inline(always)]
pub const fn src_addr_off(l3: usize, v6: bool) -> usize {
    if v6 { l3 + 8 } else { l3 + 12 }
}

/// Offset of the destination address in an IP header at `l3`.
#[inline(always)]
pub const fn dst_addr_off(l3: usize, v6: bool) -> usize {
    if v6 { l3 + 24 } else { l3 + 16 }
}

/// Requires the fixed IP header to be present, so that its addresses can be read.
#[inline(always)]
pub fn require_ip_header(frame: &Frame, l2: L2) -> Result<(), Counter> {
    let len = if l2.v6 { 40 } else { 20 };
    if frame.has(l2.l3_off, len) {
        Ok(())
    } else {
        Err(Counter::Malformed)
    }
}

/// UDP destination port (host order) of the IP packet at `l3_off`, `Ok(None)` if it is not
/// UDP; extension headers are not walked. Used to recognise steering packets cheaply; the
/// caller validates the packet fully afterwards. A UDP packet too short for its header is
/// malformed.
#[inline(always)]
pub fn peek_udp_dport(frame: &Frame, l2: L2) -> Result<Option<u16>, Counter> {
    let (proto, l4) = if l2.v6 {
        let h = frame.at::<[u8; 40]>(l2.l3_off).ok_or(Counter::Malformed)?;
        // SAFETY: inside the 40 bytes checked above.
        (unsafe { (*h)[6] }, l2.l3_off + 40)
    } else {
        let h = frame.at::<[u8; 20]>(l2.l3_off).ok_or(Counter::Malformed)?;
        // SAFETY: inside the 20 bytes checked above.
        let (ver_ihl, proto) = unsafe { ((*h)[0], (*h)[9]) };
        (proto, l2.l3_off + (ver_ihl & 0x0f) as usize * 4)
    };
    if proto != IPPROTO_UDP {
        return Ok(None);
    }
    let port = frame.read::<u16>(l4 + 2).ok_or(Counter::Malformed)?;
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
pub fn parse_ip(frame: &Frame, l3_off: usize, v6: bool) -> Result<Ip, Counter> {
    if l3_off > MAX_HEADER_OFFSET {
        return Err(Counter::Unsupported);
    }
    if v6 {
        parse_ipv6(frame, l3_off)
    } else {
        parse_ipv4(frame, l3_off)
    }
}

#[inline(always)]
fn parse_ipv4(frame: &Frame, l3: usize) -> Result<Ip, Counter> {
    let h = frame
        .at::<[u8; 20]>(l3)
        .ok_or(Counter::Malformed)?
        .cast::<u8>();
    // SAFETY: the 20 bytes at `h` are inside the packet (alignment: see `Frame::read`).
    let (ver_ihl, total, frag, proto) = unsafe {
        (
            *h,
            u16::from_be(core::ptr::read(h.add(2).cast::<u16>())) as usize,
            u16::from_be(core::ptr::read(h.add(6).cast::<u16>())),
            *h.add(9),
        )
    };
    if ver_ihl >> 4 != 4 {
        return Err(Counter::Malformed);
    }
    let ihl = (ver_ihl & 0x0f) as usize * 4;
    if ihl < 20 || total < ihl || l3 + total > frame.len() {
        return Err(Counter::Malformed);
    }
    // More-fragments flag or a non-zero offset: a fragment.
    if frag & 0x3fff != 0 {
        return Err(Counter::Fragment);
    }
    Ok(Ip {
        v6: false,
        l3_off: l3,
        ip_len: total,
        l4_off: l3 + ihl,
        proto,
    })
}

#[inline(always)]
fn parse_ipv6(frame: &Frame, l3: usize) -> Result<Ip, Counter> {
    let h = frame
        .at::<[u8; 40]>(l3)
        .ok_or(Counter::Malformed)?
        .cast::<u8>();
    // SAFETY: the 40 bytes at `h` are inside the packet.
    let (ver, payload, mut next) = unsafe {
        (
            *h >> 4,
            u16::from_be(core::ptr::read(h.add(4).cast::<u16>())) as usize,
            *h.add(6),
        )
    };
    if ver != 6 {
        return Err(Counter::Malformed);
    }
    let total = 40 + payload;
    if l3 + total > frame.len() {
        return Err(Counter::Malformed);
    }
    let mut off = l3 + 40;
    // Bounded walk: a fixed number of extension headers, each at a bounded offset.
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let ext = frame
                    .read::<u16>(off)
                    .ok_or(Counter::Malformed)?
                    .to_le_bytes();
                next = ext[0];
                off += (ext[1] as usize + 1) * 8;
                if off > MAX_HEADER_OFFSET {
                    return Err(Counter::Unsupported);
                }
            }
            IPPROTO_FRAGMENT => return Err(Counter::Fragment),
            _ => break,
        }
    }
    if matches!(next, IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS) {
        // Chain longer than we walk.
        return Err(Counter::Unsupported);
    }
    if off > l3 + total {
        return Err(Counter::Malformed);
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
pub fn parse_flow(frame: &Frame, ip: &Ip) -> Result<Flow, Counter> {
    let l4 = ip.l4_off;
    if l4 > MAX_HEADER_OFFSET {
        return Err(Counter::Unsupported);
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
        IPPROTO_TCP => {
            let th = frame
                .at::<[u8; 20]>(l4)
                .ok_or(Counter::Malformed)?
                .cast::<u8>();
            // SAFETY: the 20 bytes at `th` are inside the packet.
            let (ports, doff, flags) = unsafe {
                (
                    core::ptr::read(th.cast::<u32>()),
                    (*th.add(12) >> 4) as usize * 4,
                    *th.add(13),
                )
            };
            if doff < 20 || l4 + doff > l4_end {
                return Err(Counter::Malformed);
            }
            flow.ports = ports;
            flow.tcp_flags = flags;
            Ok(flow)
        }
        IPPROTO_UDP => {
            let uh = frame
                .at::<[u8; 8]>(l4)
                .ok_or(Counter::Malformed)?
                .cast::<u8>();
            // SAFETY: the 8 bytes at `uh` are inside the packet.
            let (ports, len) = unsafe {
                (
                    core::ptr::read(uh.cast::<u32>()),
                    u16::from_be(core::ptr::read(uh.add(4).cast::<u16>())) as usize,
                )
            };
            if len < 8 || l4 + len > l4_end {
                return Err(Counter::Malformed);
            }
            flow.kind = Kind::Udp;
            flow.ports = ports;
            Ok(flow)
        }
        IPPROTO_ICMP if !ip.v6 => parse_icmp(frame, ip, flow),
        IPPROTO_ICMPV6 if ip.v6 => parse_icmp(frame, ip, flow),
        _ => Err(Counter::Unsupported),
    }
}

/// ICMP errors carry the start of the packet that caused them: a packet *from* the VIP. The flow
/// they belong to is that packet's tuple reversed.
#[inline(always)]
fn parse_icmp(frame: &Frame, ip: &Ip, mut flow: Flow) -> Result<Flow, Counter> {
    let l4 = ip.l4_off;
    if l4 + 8 > ip.l3_off + ip.ip_len {
        return Err(Counter::Malformed);
    }
    let header = frame.at::<[u8; 8]>(l4).ok_or(Counter::Malformed)?;
    // SAFETY: inside the 8 bytes checked above.
    let icmp_type = unsafe { (*header)[0] };
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
    let quoted = l4 + 8;
    let (proto, ports_off) = if ip.v6 {
        let h = frame
            .at::<[u8; 40]>(quoted)
            .ok_or(Counter::Malformed)?
            .cast::<u8>();
        // SAFETY: the 40 bytes at `h` are inside the packet.
        (unsafe { *h.add(6) }, quoted + 40)
    } else {
        let h = frame
            .at::<[u8; 20]>(quoted)
            .ok_or(Counter::Malformed)?
            .cast::<u8>();
        // SAFETY: the 20 bytes at `h` are inside the packet.
        let (ver_ihl, proto) = unsafe { (*h, *h.add(9)) };
        let ihl = (ver_ihl & 0x0f) as usize * 4;
        if ver_ihl >> 4 != 4 || ihl < 20 {
            return Err(Counter::Malformed);
        }
        (proto, quoted + ihl)
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        // About a flow we do not steer (or behind extension headers): the local stack decides.
        return Ok(flow);
    }
    if ports_off > MAX_HEADER_OFFSET {
        return Err(Counter::Unsupported);
    }
    let ports = frame.read::<u32>(ports_off).ok_or(Counter::Malformed)?;
    flow.kind = Kind::IcmpError;
    flow.proto = proto;
    // The quoted packet went VIP -> client; the flow is client -> VIP.
    flow.src_off = dst_addr_off(quoted, ip.v6);
    flow.dst_off = src_addr_off(quoted, ip.v6);
    flow.ports = ports.rotate_left(16);
    Ok(flow)
}
