//! Frames for the differential test: valid templates for every packet path, then mutations
//! at the IP layer (options, extension headers, fragments, lying lengths) and at the frame
//! layer (VLAN tags, truncation, trailing bytes, flipped bytes). Seeded, so a run replays.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::PacketBuilder;

use crate::model::{auth, frame};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom as _};

use cdn_common::quic_lb::MAX_CID_LEN;

use super::world::{
    CLIENT_V4, CLIENT_V6, KEY, LIVE_TCP_PORT, LIVE_UDP_PORT, Links, MEMBERS, NODE_MAC, PEER_MAC,
    QUIC_SERVER_IDS, QUIC_VIPS, STEER_PORT, STRANGERS, UNDERLAY_V4, UNDERLAY_V6, addr,
};

/// One generated frame.
pub struct Sample {
    /// The template it was made from.
    pub class: &'static str,
    /// Mutations applied, in order.
    pub mutations: Vec<&'static str>,
    pub frame: Vec<u8>,
    pub ifindex: u32,
}

pub struct Gen {
    rng: StdRng,
    ifindexes: [u32; 3],
}

const VIPS_V4: [&str; 5] = [
    "192.0.2.10",
    "192.0.2.20",
    "192.0.2.30",
    "192.0.2.40",
    "192.0.2.50",
];
const VIPS_V6: [&str; 5] = [
    "2001:db8::10",
    "2001:db8::20",
    "2001:db8::30",
    "2001:db8::40",
    "2001:db8::50",
];
const TCP_FLAGS: [u8; 7] = [0x02, 0x10, 0x12, 0x11, 0x04, 0x18, 0x03];

/// A builder for an IP packet from `src` to `dst` (same family).
fn ip_builder(src: IpAddr, dst: IpAddr) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!("one family per packet"),
    }
}

impl Gen {
    pub fn new(seed: u64, links: &Links) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            ifindexes: [links.underlay, links.uplink, links.lo],
        }
    }

    fn chance(&mut self, percent: u32) -> bool {
        self.rng.random_range(0..100) < percent
    }

    fn payload(&mut self, max: usize) -> Vec<u8> {
        let n = self.rng.random_range(0..=max);
        (0..n).map(|_| self.rng.random()).collect()
    }

    fn vip(&mut self, v6: bool) -> IpAddr {
        if self.chance(15) {
            // Any host of the prefixes.
            return if v6 {
                IpAddr::V6(Ipv6Addr::new(
                    0x2001,
                    0xdb8,
                    0,
                    0,
                    0,
                    0,
                    0,
                    self.rng.random(),
                ))
            } else {
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, self.rng.random()))
            };
        }
        let list = if v6 { &VIPS_V6 } else { &VIPS_V4 };
        // The first VIP holds the live sockets: pick it half the time.
        let i = if self.chance(50) {
            0
        } else {
            self.rng.random_range(0..list.len())
        };
        addr(list[i])
    }

    fn client(&mut self, v6: bool) -> IpAddr {
        if self.chance(50) {
            return addr(if v6 { CLIENT_V6 } else { CLIENT_V4 });
        }
        if v6 {
            IpAddr::V6(Ipv6Addr::from(self.rng.random::<u128>() | 1 << 125))
        } else {
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, self.rng.random()))
        }
    }

    fn port(&mut self, common: &[u16]) -> u16 {
        if self.chance(75) {
            *common.choose(&mut self.rng).expect("ports")
        } else {
            self.rng.random()
        }
    }

    fn tcp(&mut self, src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
        let mut out = Vec::new();
        let payload = self.payload(48);
        ip_builder(src, dst)
            .tcp(sport, dport, self.rng.random(), 64240)
            .write(&mut out, &payload)
            .expect("writing to a Vec");
        let l4 = if src.is_ipv6() { 40 } else { 20 };
        out[l4 + 13] = if self.chance(90) {
            *TCP_FLAGS.choose(&mut self.rng).expect("flags")
        } else {
            self.rng.random()
        };
        out
    }

    /// A QUIC packet as clients (and attackers) send them: short or long header, a DCID of
    /// one of the worlds' QUIC-LB configurations (or random, or of another config id), any
    /// version, packet type and DCID length, sometimes cut short.
    fn quic(&mut self) -> Vec<u8> {
        let (_, cfg) = *QUIC_VIPS.choose(&mut self.rng).expect("QUIC VIPs");
        let mut dcid = if self.chance(80) {
            let mut out = [0u8; MAX_CID_LEN];
            let server = self.rng.random_range(0..QUIC_SERVER_IDS);
            let len = cfg
                .encode(server, &self.rng.random(), &mut out)
                .expect("valid world configuration");
            out[..len].to_vec()
        } else {
            self.payload(24)
        };
        if self.chance(10) && !dcid.is_empty() {
            dcid[0] = self.rng.random();
        }
        let mut p = if self.chance(50) {
            let mut p = vec![self.rng.random::<u8>() & 0x7f];
            p.extend_from_slice(&dcid);
            p
        } else {
            let version: u32 = match self.rng.random_range(0..10) {
                0 => 0,
                1 => self.rng.random(),
                2..6 => 1,
                _ => 0x6b33_43cf,
            };
            let mut p = vec![0x80 | self.rng.random::<u8>()];
            p.extend_from_slice(&version.to_be_bytes());
            p.push(if self.chance(90) {
                dcid.len() as u8
            } else {
                self.rng.random()
            });
            p.extend_from_slice(&dcid);
            p
        };
        let rest = self.payload(24);
        p.extend_from_slice(&rest);
        if self.chance(15) {
            let cut = self.rng.random_range(0..=p.len());
            p.truncate(cut);
        }
        p
    }

    fn udp(&mut self, src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
        let mut out = Vec::new();
        let payload = if dport == 443 && self.chance(60) {
            self.quic()
        } else {
            self.payload(48)
        };
        ip_builder(src, dst)
            .udp(sport, dport)
            .write(&mut out, &payload)
            .expect("writing to a Vec");
        out
    }

    fn icmp(&mut self, src: IpAddr, dst: IpAddr, ty: u8, code: u8, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let b = ip_builder(src, dst);
        let rest = [0, 0, 0x05, 0xdc];
        if src.is_ipv6() {
            b.icmpv6_raw(ty, code, rest).write(&mut out, body)
        } else {
            b.icmpv4_raw(ty, code, rest).write(&mut out, body)
        }
        .expect("writing to a Vec");
        out
    }

    /// A client packet to a VIP (or, with `any_dst`, sometimes to anybody): the IP packet
    /// and its class.
    fn client_packet(&mut self, v6: bool, any_dst: bool) -> (&'static str, Vec<u8>) {
        let src = self.client(v6);
        let dst = if any_dst && self.chance(10) {
            if v6 {
                IpAddr::V6(Ipv6Addr::from(self.rng.random::<u128>()))
            } else {
                IpAddr::V4(Ipv4Addr::from(self.rng.random::<u32>()))
            }
        } else {
            self.vip(v6)
        };
        match self.rng.random_range(0..100) {
            0..40 => {
                let sport = if self.chance(40) {
                    LIVE_TCP_PORT
                } else {
                    self.rng.random()
                };
                let dport = self.port(&[443, 443, 80, 22]);
                ("tcp", self.tcp(src, dst, sport, dport))
            }
            40..70 => {
                let sport = if self.chance(40) {
                    LIVE_UDP_PORT
                } else {
                    self.rng.random()
                };
                let dport = self.port(&[443, 443, 4433, 53]);
                ("udp", self.udp(src, dst, sport, dport))
            }
            70..80 => {
                let (echo, other) = if v6 {
                    (128, [129, 135, 136, 0, 5])
                } else {
                    (8, [0, 13, 5, 4, 9])
                };
                let ty = if self.chance(60) {
                    echo
                } else {
                    *other.choose(&mut self.rng).expect("types")
                };
                let body = self.payload(32);
                ("icmp", self.icmp(src, dst, ty, 0, &body))
            }
            _ => ("icmp_error", self.icmp_error(src, dst)),
        }
    }

    /// An ICMP error from `router` to `vip` quoting a packet the VIP sent (to the live client
    /// port or another one), TCP, UDP or other.
    fn icmp_error(&mut self, router: IpAddr, vip: IpAddr) -> Vec<u8> {
        let v6 = vip.is_ipv6();
        let client = self.client(v6);
        let live = self.chance(50);
        let quoted = match self.rng.random_range(0..10) {
            0..5 => {
                let cport = if live {
                    LIVE_TCP_PORT
                } else {
                    self.rng.random()
                };
                let vport = self.port(&[443, 80]);
                self.tcp(vip, client, vport, cport)
            }
            5..9 => {
                let cport = if live {
                    LIVE_UDP_PORT
                } else {
                    self.rng.random()
                };
                let vport = self.port(&[443, 4433]);
                self.udp(vip, client, vport, cport)
            }
            _ => self.icmp(vip, client, if v6 { 128 } else { 8 }, 0, &[1, 2, 3, 4]),
        };
        // Routers quote the IP header and at least 8 bytes; some quote it all, some less.
        let keep = match self.rng.random_range(0..10) {
            0 => self.rng.random_range(0..quoted.len()),
            1..5 => quoted.len(),
            _ => (if v6 { 48 } else { 28 }).min(quoted.len()),
        };
        let (types, others): (&[u8], &[u8]) = if v6 {
            (&[1, 2, 3, 4], &[128, 129, 5])
        } else {
            (&[3, 11, 12], &[0, 8, 5])
        };
        let ty = if self.chance(90) {
            *types.choose(&mut self.rng).expect("types")
        } else {
            *others.choose(&mut self.rng).expect("types")
        };
        self.icmp(router, vip, ty, 4, &quoted[..keep])
    }

    fn member_or_stranger(&mut self) -> (&'static str, IpAddr) {
        if self.chance(88) {
            let (_, a) = MEMBERS.choose(&mut self.rng).expect("members");
            ("steer", addr(a))
        } else {
            (
                "steer_stranger",
                addr(STRANGERS.choose(&mut self.rng).expect("strangers")),
            )
        }
    }

    fn hop(&mut self) -> u16 {
        match self.rng.random_range(0..12) {
            0 => u16::MAX,
            1 => 9,
            2 => 1500,
            3 => self.rng.random(),
            n => n - 4,
        }
    }

    /// A steering packet (outer IP packet) to our underlay address.
    fn steering(&mut self) -> (&'static str, Vec<&'static str>, Vec<u8>) {
        let (mut class, src) = self.member_or_stranger();
        let dst = match src {
            IpAddr::V4(_) => IpAddr::from(UNDERLAY_V4),
            IpAddr::V6(_) => addr(UNDERLAY_V6),
        };
        let inner_v6 = self.chance(50);
        let (inner_class, mut inner) = self.client_packet(inner_v6, true);
        let mut muts = vec![inner_class];
        self.mutate_ip(&mut inner, &mut muts);
        let forged = self.chance(30);
        if forged {
            class = if class == "steer" {
                "steer_forged"
            } else {
                class
            };
        }
        let version = if forged && self.chance(30) {
            *[0u8, 2, 3, 4, 255].choose(&mut self.rng).expect("versions")
        } else if self.chance(25) {
            // A search (README "PoPs"), signed half of the time.
            *[3u8, 4].choose(&mut self.rng).expect("versions")
        } else {
            1
        };
        let search = !forged && version >= 3;
        let mut flags = if inner_v6 { 1 } else { 0 };
        if forged && self.chance(20) {
            flags ^= 1;
        }
        if self.chance(10) {
            flags |= 1 << 1;
        }
        if forged && self.chance(10) {
            flags |= self.rng.random::<u8>() & 0xfc;
        }
        let budget = if forged {
            *[0u8, 1, 255, 4, 254]
                .choose(&mut self.rng)
                .expect("budgets")
        } else {
            self.rng.random_range(0..=3)
        };
        let hop_count = if search {
            // The PoPs left: any set, mostly small ones.
            if self.chance(70) {
                self.rng.random_range(0..8) << 1
            } else {
                self.rng.random()
            }
        } else if forged && self.chance(30) {
            *[3u8, 4, 255].choose(&mut self.rng).expect("counts")
        } else {
            self.rng.random_range(0..=2)
        };
        let (h0, h1) = (self.hop(), self.hop());
        // A search's second hop is the walk's position: an index 0..=2, redirected there or
        // not (anything else is malformed).
        let h1 = if search && self.chance(95) {
            let pos = *[0u16, 1, 2, 0x8000, 0x8001, 0x8002]
                .choose(&mut self.rng)
                .expect("positions");
            if pos & 0x8000 != 0 {
                muts.push("search_redirected");
            }
            pos
        } else if search && self.chance(50) {
            // Just outside: index 3, or a reserved bit.
            *[3u16, 0x8003, 0x0004, 0x4000, 0x0100]
                .choose(&mut self.rng)
                .expect("positions")
        } else {
            h1
        };
        let mut header = vec![version, flags, budget, hop_count];
        header.extend_from_slice(&h0.to_be_bytes());
        header.extend_from_slice(&h1.to_be_bytes());
        if version == 2 || version == 4 {
            // Mostly the MAC a member would compute (spec §5), else a forgery.
            let signed = frame::ip(&inner, 0, flags & 1 != 0)
                .and_then(|ip| frame::flow(&inner, &ip))
                .ok()
                .filter(|_| self.chance(70))
                .map(|fl| {
                    auth::mac(
                        auth::derive_key(KEY),
                        &auth::Signed {
                            outer_src: src,
                            client: fl.src,
                            vip: fl.dst,
                            sport: fl.sport,
                            dport: fl.dport,
                            proto: fl.proto,
                            flags,
                            budget,
                            hop_count,
                            hops: [h0, h1],
                            search: version == 4,
                        },
                    )
                });
            let mac = signed.unwrap_or_else(|| self.rng.random());
            header.extend_from_slice(&mac.to_le_bytes());
        }
        header.extend_from_slice(&inner);
        let dport = if self.chance(95) {
            STEER_PORT
        } else {
            self.rng.random()
        };
        let mut out = Vec::new();
        ip_builder(src, dst)
            .udp(self.rng.random_range(0xc000..=0xffff), dport)
            .write(&mut out, &header)
            .expect("writing to a Vec");
        if self.chance(5) {
            muts.push("outer");
            self.mutate_ip(&mut out, &mut muts);
        }
        (class, muts, out)
    }

    pub fn sample(&mut self) -> Sample {
        let v6 = self.chance(50);
        let mut muts = Vec::new();
        let (class, ip) = match self.rng.random_range(0..100) {
            0..45 => {
                let (class, mut ip) = self.client_packet(v6, false);
                self.mutate_ip(&mut ip, &mut muts);
                (class, ip)
            }
            45..85 => {
                let (class, m, ip) = self.steering();
                muts = m;
                (class, ip)
            }
            85..92 => {
                let src = self.client(v6);
                let dst = if v6 {
                    IpAddr::V6(Ipv6Addr::from(self.rng.random::<u128>()))
                } else {
                    IpAddr::V4(Ipv4Addr::from(self.rng.random::<u32>()))
                };
                ("non_vip", self.tcp(src, dst, 1234, 80))
            }
            92..96 => {
                // To our underlay address, but not steering.
                let src = self.client(v6);
                let dst = if v6 {
                    addr(UNDERLAY_V6)
                } else {
                    IpAddr::from(UNDERLAY_V4)
                };
                let dport = self.rng.random();
                let mut ip = if self.chance(50) {
                    self.udp(src, dst, 5000, dport)
                } else {
                    self.tcp(src, dst, 5000, 6080)
                };
                self.mutate_ip(&mut ip, &mut muts);
                ("to_underlay", ip)
            }
            _ => ("random", self.payload(200)),
        };
        let frame = self.frame(class, ip, &mut muts);
        let ifindex = match self.rng.random_range(0..100) {
            0..60 => self.ifindexes[0],
            60..85 => self.ifindexes[1],
            _ => self.ifindexes[2],
        };
        Sample {
            class,
            mutations: muts,
            frame,
            ifindex,
        }
    }

    /// Ethernet (and VLAN tags) around `ip`, then frame-level mutations.
    fn frame(&mut self, class: &str, ip: Vec<u8>, muts: &mut Vec<&'static str>) -> Vec<u8> {
        let mut f = Vec::with_capacity(ip.len() + 30);
        f.extend_from_slice(&NODE_MAC);
        f.extend_from_slice(&PEER_MAC);
        let v6 = ip.first().is_some_and(|b| b >> 4 == 6);
        let mut ethertype: u16 = if v6 { 0x86dd } else { 0x0800 };
        if class == "random" && self.chance(50) || self.chance(1) {
            ethertype = *[0x0806u16, 0x0800, 0x86dd, 0x88cc]
                .choose(&mut self.rng)
                .expect("types");
            muts.push("ethertype");
        }
        let tags = match self.rng.random_range(0..100) {
            0..70 => 0,
            70..85 => 1,
            85..95 => 2,
            _ => 3,
        };
        for _ in 0..tags {
            let tpid: u16 = *[0x8100u16, 0x88a8, 0x9100]
                .choose(&mut self.rng)
                .expect("tpids");
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&self.rng.random_range(0u16..4096).to_be_bytes());
        }
        muts.push(["vlan0", "vlan1", "vlan2", "vlan3"][tags]);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(&ip);
        if self.chance(5) {
            let junk = self.payload(40);
            f.extend_from_slice(&junk);
            muts.push("trailing");
        }
        if self.chance(6) && f.len() > 15 {
            let n = self.rng.random_range(14..f.len());
            f.truncate(n);
            muts.push("truncated");
        }
        if self.chance(4) {
            for _ in 0..self.rng.random_range(1..=3) {
                let i = self.rng.random_range(0..f.len());
                f[i] = self.rng.random();
            }
            muts.push("flipped");
        }
        if f.len() < 14 {
            f.resize(14, 0);
        }
        f
    }

    /// Mutations of an IP packet (the client's, or a steering packet's outer one).
    fn mutate_ip(&mut self, ip: &mut Vec<u8>, muts: &mut Vec<&'static str>) {
        let v6 = ip.first().is_some_and(|b| b >> 4 == 6) && ip.len() >= 40;
        let v4 = !v6 && ip.len() >= 20 && ip[0] >> 4 == 4;
        if v4 && self.chance(8) {
            insert_v4_options(ip, self.rng.random_range(1..=10), &mut self.rng);
            muts.push("ipv4_options");
        }
        if v4 && self.chance(3) {
            ip[0] = 0x40 | self.rng.random_range(0..16);
            muts.push("bad_ihl");
        }
        if v6 && self.chance(10) {
            let n = self.rng.random_range(1..=5);
            let chain: Vec<u8> = (0..n)
                .map(|_| {
                    *[0u8, 43, 60, 60, 43, 44]
                        .choose(&mut self.rng)
                        .expect("types")
                })
                .collect();
            insert_v6_ext(ip, &chain, &mut self.rng);
            muts.push(["ext1", "ext2", "ext3", "ext4", "ext5"][n - 1]);
        }
        if self.chance(4) {
            if v4 {
                let field: u16 = *[0x2000u16, 0x0001, 0x1fff, 0x4000, 0x8000, 0x2abc]
                    .choose(&mut self.rng)
                    .expect("fragment fields");
                ip[6..8].copy_from_slice(&field.to_be_bytes());
            } else if v6 {
                insert_v6_ext(ip, &[44], &mut self.rng);
            }
            muts.push("fragment");
        }
        if self.chance(5) {
            if v4 {
                let total = self.rng.random_range(0..ip.len() as u16 + 24);
                ip[2..4].copy_from_slice(&total.to_be_bytes());
            } else if v6 {
                let payload = self.rng.random_range(0..ip.len() as u16);
                ip[4..6].copy_from_slice(&payload.to_be_bytes());
            } else if !ip.is_empty() {
                ip[0] = self.rng.random();
            }
            muts.push("length_lie");
        }
        if self.chance(3) && (v4 || v6) {
            // The transport header's own length: TCP data offset or UDP length.
            let l4 = if v6 { 40 } else { (ip[0] & 0x0f) as usize * 4 };
            if let Some(b) = ip.get_mut(l4 + 12) {
                *b = self.rng.random();
            }
            if let Some(b) = ip.get_mut(l4 + 5) {
                *b = self.rng.random();
            }
            muts.push("l4_length_lie");
        }
    }
}

/// Inserts `words` 4-byte words of options (NOPs, or random bytes) after the fixed IPv4
/// header and updates IHL and total length.
fn insert_v4_options(ip: &mut Vec<u8>, words: usize, rng: &mut StdRng) {
    let words = words.min(10);
    let opts: Vec<u8> = if rng.random_bool(0.5) {
        vec![1; words * 4]
    } else {
        (0..words * 4).map(|_| rng.random()).collect()
    };
    ip.splice(20..20, opts);
    ip[0] = 0x40 | (5 + words as u8);
    let total = u16::from_be_bytes([ip[2], ip[3]]).wrapping_add(words as u16 * 4);
    ip[2..4].copy_from_slice(&total.to_be_bytes());
}

/// Inserts extension headers of the types in `chain` after the fixed IPv6 header.
fn insert_v6_ext(ip: &mut Vec<u8>, chain: &[u8], rng: &mut StdRng) {
    let mut bytes = Vec::new();
    for (i, ty) in chain.iter().enumerate() {
        let next = chain.get(i + 1).copied().unwrap_or(ip[6]);
        let units = if *ty == 44 {
            0
        } else {
            rng.random_range(0..3u8)
        };
        bytes.push(next);
        bytes.push(units);
        bytes.extend((0..usize::from(units) * 8 + 6).map(|_| 0u8));
    }
    ip[6] = chain[0];
    let payload = u16::from_be_bytes([ip[4], ip[5]]).wrapping_add(bytes.len() as u16);
    ip[4..6].copy_from_slice(&payload.to_be_bytes());
    ip.splice(40..40, bytes);
}
