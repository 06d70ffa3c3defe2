//! The reference model's frame parser: what the README and the program's documented rules say
//! a frame is made of, read byte by byte from the wire format (no code shared with the
//! program). Each function answers the question one step of the packet path asks, and fails
//! with the reason the program counts when a frame cannot answer it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use cdn_common::counters::Reason;

/// Deepest offset at which a header may start (the program's verifier bound); deeper is
/// `unsupported`.
pub const MAX_HEADER_OFFSET: usize = 512;
/// IPv6 extension headers (hop-by-hop, routing, destination options) walked at most.
pub const MAX_EXT_HEADERS: usize = 4;

pub const PROTO_HOPOPTS: u8 = 0;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ROUTING: u8 = 43;
pub const PROTO_FRAGMENT: u8 = 44;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_DSTOPTS: u8 = 60;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

type Parsed<T> = Result<T, Reason>;

/// `len` bytes at `off`, or `malformed` if the frame ends first.
pub fn bytes(f: &[u8], off: usize, len: usize) -> Parsed<&[u8]> {
    f.get(off..off + len).ok_or(Reason::Malformed)
}

pub fn be16(f: &[u8], off: usize) -> Parsed<u16> {
    let b = bytes(f, off, 2)?;
    Ok(u16::from_be_bytes([b[0], b[1]]))
}

fn is_vlan_tag(ethertype: u16) -> bool {
    matches!(ethertype, 0x8100 | 0x88a8 | 0x9100)
}

/// Where the IP header starts and its family; `None` for anything that is not IP after at
/// most `max_tags` VLAN tags (a deeper tag is "not IP").
pub fn l2(f: &[u8], max_tags: usize) -> Parsed<Option<(usize, bool)>> {
    let mut ethertype = be16(f, 12)?;
    let mut off = 14;
    for _ in 0..max_tags {
        if !is_vlan_tag(ethertype) {
            break;
        }
        ethertype = be16(f, off + 2)?;
        off += 4;
    }
    Ok(match ethertype {
        0x0800 => Some((off, false)),
        0x86dd => Some((off, true)),
        _ => None,
    })
}

/// Source or destination address of the fixed IP header at `l3` (present: checked before).
pub fn addr_at(f: &[u8], off: usize, v6: bool) -> Parsed<IpAddr> {
    if v6 {
        let b: [u8; 16] = bytes(f, off, 16)?
            .try_into()
            .map_err(|_| Reason::Malformed)?;
        Ok(IpAddr::V6(Ipv6Addr::from(b)))
    } else {
        let b: [u8; 4] = bytes(f, off, 4)?
            .try_into()
            .map_err(|_| Reason::Malformed)?;
        Ok(IpAddr::V4(Ipv4Addr::from(b)))
    }
}

pub fn src_off(l3: usize, v6: bool) -> usize {
    l3 + if v6 { 8 } else { 12 }
}

pub fn dst_off(l3: usize, v6: bool) -> usize {
    l3 + if v6 { 24 } else { 16 }
}

/// The cheap steering-port test: the UDP destination port right after the fixed header
/// (IPv4: after IHL words, whatever IHL says), `None` if the protocol byte is not UDP.
pub fn peek_udp_dport(f: &[u8], l3: usize, v6: bool) -> Parsed<Option<u16>> {
    let (next, l4) = if v6 {
        (bytes(f, l3, 40)?[6], l3 + 40)
    } else {
        let h = bytes(f, l3, 20)?;
        (h[9], l3 + (h[0] & 0x0f) as usize * 4)
    };
    if next != PROTO_UDP {
        return Ok(None);
    }
    Ok(Some(be16(f, l4 + 2)?))
}

/// A validated IP packet.
#[derive(Clone, Copy, Debug)]
pub struct Ip {
    pub v6: bool,
    pub l3: usize,
    /// Length from the header (never past the end of the frame).
    pub len: usize,
    pub l4: usize,
    pub proto: u8,
}

impl Ip {
    pub fn end(&self) -> usize {
        self.l3 + self.len
    }
    pub fn src(&self, f: &[u8]) -> Parsed<IpAddr> {
        addr_at(f, src_off(self.l3, self.v6), self.v6)
    }
    pub fn dst(&self, f: &[u8]) -> Parsed<IpAddr> {
        addr_at(f, dst_off(self.l3, self.v6), self.v6)
    }
}

pub fn ip(f: &[u8], l3: usize, v6: bool) -> Parsed<Ip> {
    if l3 > MAX_HEADER_OFFSET {
        return Err(Reason::Unsupported);
    }
    if v6 { ipv6(f, l3) } else { ipv4(f, l3) }
}

fn ipv4(f: &[u8], l3: usize) -> Parsed<Ip> {
    let h = bytes(f, l3, 20)?;
    if h[0] >> 4 != 4 {
        return Err(Reason::Malformed);
    }
    let ihl = (h[0] & 0x0f) as usize * 4;
    let total = u16::from_be_bytes([h[2], h[3]]) as usize;
    if ihl < 20 || total < ihl || l3 + total > f.len() {
        return Err(Reason::Malformed);
    }
    // MF set or a non-zero offset; DF and the reserved bit do not make a fragment.
    if u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
        return Err(Reason::Fragment);
    }
    Ok(Ip {
        v6: false,
        l3,
        len: total,
        l4: l3 + ihl,
        proto: h[9],
    })
}

fn is_walked_ext(next: u8) -> bool {
    matches!(next, PROTO_HOPOPTS | PROTO_ROUTING | PROTO_DSTOPTS)
}

fn ipv6(f: &[u8], l3: usize) -> Parsed<Ip> {
    let h = bytes(f, l3, 40)?;
    if h[0] >> 4 != 6 {
        return Err(Reason::Malformed);
    }
    let total = 40 + u16::from_be_bytes([h[4], h[5]]) as usize;
    if l3 + total > f.len() {
        return Err(Reason::Malformed);
    }
    let mut next = h[6];
    let mut off = l3 + 40;
    // A fragment header anywhere in the walked part makes a fragment; the walk reads each
    // header's first two bytes from the frame (not bounded by the payload length).
    for _ in 0..MAX_EXT_HEADERS {
        if is_walked_ext(next) {
            let e = bytes(f, off, 2)?;
            next = e[0];
            off += (e[1] as usize + 1) * 8;
            if off > MAX_HEADER_OFFSET {
                return Err(Reason::Unsupported);
            }
        } else if next == PROTO_FRAGMENT {
            return Err(Reason::Fragment);
        } else {
            break;
        }
    }
    if is_walked_ext(next) {
        return Err(Reason::Unsupported);
    }
    if off > l3 + total {
        return Err(Reason::Malformed);
    }
    Ok(Ip {
        v6: true,
        l3,
        len: total,
        l4: off,
        proto: next,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Udp,
    /// ICMP error quoting a TCP/UDP packet: the flow is the quoted one, reversed.
    IcmpError,
    /// Any other ICMP (echo, informational, errors about other protocols).
    IcmpLocal,
}

/// A flow client -> VIP.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub kind: Kind,
    pub v6: bool,
    /// TCP or UDP (an ICMP error: the quoted protocol; ICMP-local: the ICMP protocol).
    pub proto: u8,
    pub tcp_flags: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

impl Flow {
    pub fn is_syn(&self) -> bool {
        self.kind == Kind::Tcp && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// The transport header of a validated IP packet, as a flow.
pub fn flow(f: &[u8], ip: &Ip) -> Parsed<Flow> {
    if ip.l4 > MAX_HEADER_OFFSET {
        return Err(Reason::Unsupported);
    }
    let mut fl = Flow {
        kind: Kind::Tcp,
        v6: ip.v6,
        proto: ip.proto,
        tcp_flags: 0,
        src: ip.src(f)?,
        dst: ip.dst(f)?,
        sport: 0,
        dport: 0,
    };
    match ip.proto {
        PROTO_TCP => {
            let t = bytes(f, ip.l4, 20)?;
            let doff = (t[12] >> 4) as usize * 4;
            if doff < 20 || ip.l4 + doff > ip.end() {
                return Err(Reason::Malformed);
            }
            fl.sport = u16::from_be_bytes([t[0], t[1]]);
            fl.dport = u16::from_be_bytes([t[2], t[3]]);
            fl.tcp_flags = t[13];
        }
        PROTO_UDP => {
            let u = bytes(f, ip.l4, 8)?;
            let len = u16::from_be_bytes([u[4], u[5]]) as usize;
            if len < 8 || ip.l4 + len > ip.end() {
                return Err(Reason::Malformed);
            }
            fl.kind = Kind::Udp;
            fl.sport = u16::from_be_bytes([u[0], u[1]]);
            fl.dport = u16::from_be_bytes([u[2], u[3]]);
        }
        PROTO_ICMP if !ip.v6 => icmp(f, ip, &mut fl)?,
        PROTO_ICMPV6 if ip.v6 => icmp(f, ip, &mut fl)?,
        _ => return Err(Reason::Unsupported),
    }
    Ok(fl)
}

/// ICMP: errors (v4: unreachable, time exceeded, parameter problem; v6: types 1-4) quoting a
/// TCP or UDP packet sent by the VIP belong to that packet's flow, turned around.
fn icmp(f: &[u8], ip: &Ip, fl: &mut Flow) -> Parsed<()> {
    if ip.l4 + 8 > ip.end() {
        return Err(Reason::Malformed);
    }
    let icmp_type = bytes(f, ip.l4, 8)?[0];
    fl.kind = Kind::IcmpLocal;
    let is_error = if ip.v6 {
        (1..=4).contains(&icmp_type)
    } else {
        matches!(icmp_type, 3 | 11 | 12)
    };
    if !is_error {
        return Ok(());
    }
    // The quoted header is read from the frame; it may run past the ICMP packet's length.
    let q = ip.l4 + 8;
    let (qproto, ports_at) = if ip.v6 {
        (bytes(f, q, 40)?[6], q + 40)
    } else {
        let h = bytes(f, q, 20)?;
        let ihl = (h[0] & 0x0f) as usize * 4;
        if h[0] >> 4 != 4 || ihl < 20 {
            return Err(Reason::Malformed);
        }
        (h[9], q + ihl)
    };
    if qproto != PROTO_TCP && qproto != PROTO_UDP {
        return Ok(());
    }
    if ports_at > MAX_HEADER_OFFSET {
        return Err(Reason::Unsupported);
    }
    let p = bytes(f, ports_at, 4)?;
    fl.kind = Kind::IcmpError;
    fl.proto = qproto;
    fl.src = addr_at(f, dst_off(q, ip.v6), ip.v6)?;
    fl.dst = addr_at(f, src_off(q, ip.v6), ip.v6)?;
    fl.sport = u16::from_be_bytes([p[2], p[3]]);
    fl.dport = u16::from_be_bytes([p[0], p[1]]);
    Ok(())
}
