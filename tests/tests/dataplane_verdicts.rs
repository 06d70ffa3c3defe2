//! Every verdict of the XDP program, for IPv4 and IPv6, with and without VLAN tags, run with
//! BPF_PROG_TEST_RUN: one table of cases (input, expected action, reason and output frame) run
//! by one driver. Expected frames are built independently with etherparse. For every case the
//! driver also checks (through `Run::verdict`) that exactly one verdict counter moved and that
//! it was counted with the action the program returned, and at the end that every reason that
//! can be a verdict was seen for both address families.

use std::collections::BTreeSet;

use anyhow::{Context as _, Result};
use cdn_common::{
    counters::Reason,
    maps::{
        NODE_DRAINING, NODE_STEER_AUTH, NODE_UNDERLAY_IFACES, NodeConfig, SERVICE_UDP_LOCAL,
        SERVICE_UDP_OWNER,
    },
    quic_lb::QuicLbConfig,
    wire::entropy_port,
};
use cdn_tests::{
    packets::{
        CLIENT_MAC, ExpectedEncap, Flow, NODE_MAC, QUIC_V1, QUIC_V2, Tcp, Vlan, decapsulated,
        expected_encap, frame, icmp_too_big, ip_packet, quic_cid, quic_cid_entropy, quic_initial,
        quic_long, quic_long_first, quic_short, steering_frame,
    },
    scenario::{
        BUDGET, CLIENT_V4, CLIENT_V6, KEY, NON_QUIC_UDP_PORT, SELF_ID, STEER_PORT, Scenario,
        UNDERLAY_V4, UNDERLAY_V6, VIP_V4, VIP_V6, addr, member_addr, member_mac, node_config,
        service,
    },
    xdp,
};

/// Verdict reasons no BPF_PROG_TEST_RUN input can produce: the test harness always leaves
/// enough headroom for the encapsulation.
const UNREACHABLE_IN_TEST_RUN: [Reason; 1] = [Reason::EncapFailed];

/// Verdicts of the cross-PoP search, which `pop_search.rs` covers for both families (its
/// namespace holds the connection a search finds), and of learned owners (`pop_learned.rs`).
const COVERED_BY_POP_SEARCH: [Reason; 5] = [
    Reason::SearchStart,
    Reason::SearchPassOn,
    Reason::SearchAccept,
    Reason::SearchExhausted,
    Reason::LearnedForward,
];

/// What the frame must look like after the run.
enum Out {
    /// Handed on exactly as it came.
    Unchanged,
    /// Exactly this frame (a decapsulation).
    Frame(Vec<u8>),
    /// Exactly this encapsulation, counted as one packet of its length to `target`.
    Encap { target: u16, frame: Vec<u8> },
    /// Dropped: what is left in the buffer does not matter.
    Dropped,
}

struct Case {
    name: String,
    /// The address family the case exercises (the inner packet's); `None`: not IP.
    v6: Option<bool>,
    config: NodeConfig,
    /// `Service::flags` of both services for the run.
    service_flags: u32,
    /// Buckets written before the run.
    hops: Vec<(Flow, Vec<u16>)>,
    /// QUIC routing of both services (`None`: the plain scenario service).
    quic: Option<QuicLbConfig>,
    /// Whether `quic_unknown_server` must be counted on top of the verdict.
    unknown_server: bool,
    input: Vec<u8>,
    action: u32,
    reason: Reason,
    out: Out,
}

impl Case {
    fn new(name: impl Into<String>, fam: Fam, input: Vec<u8>) -> Self {
        Self {
            name: name.into(),
            v6: Some(fam.v6),
            config: node_config(),
            service_flags: service(0).flags,
            hops: Vec::new(),
            quic: None,
            unknown_server: false,
            input,
            action: xdp::PASS,
            reason: Reason::NonVipPass,
            out: Out::Unchanged,
        }
    }

    fn hops(mut self, flow: Flow, hops: &[u16]) -> Self {
        self.hops.push((flow, hops.to_vec()));
        self
    }

    fn config(mut self, f: impl FnOnce(&mut NodeConfig)) -> Self {
        f(&mut self.config);
        self
    }

    /// Adds a UDP placement flag to the services (none: `connected`).
    fn udp_mode(mut self, flag: u32) -> Self {
        self.service_flags |= flag;
        self
    }

    fn quic(mut self, cfg: QuicLbConfig) -> Self {
        self.quic = Some(cfg);
        self
    }

    fn unknown_server(mut self) -> Self {
        self.unknown_server = true;
        self
    }

    fn expect(mut self, action: u32, reason: Reason, out: Out) -> Self {
        self.action = action;
        self.reason = reason;
        self.out = out;
        self
    }
}

/// One address family's addresses and flows.
#[derive(Clone, Copy, Debug)]
struct Fam {
    v6: bool,
}

impl Fam {
    const BOTH: [Fam; 2] = [Fam { v6: false }, Fam { v6: true }];

    fn client(self) -> &'static str {
        if self.v6 { CLIENT_V6 } else { CLIENT_V4 }
    }
    fn vip(self) -> &'static str {
        if self.v6 { VIP_V6 } else { VIP_V4 }
    }
    fn underlay(self) -> &'static str {
        if self.v6 { UNDERLAY_V6 } else { UNDERLAY_V4 }
    }
    /// A member whose underlay address is of this family.
    fn member(self) -> u16 {
        if self.v6 { 3 } else { 2 }
    }
    fn tcp(self, sport: u16, dport: u16) -> Flow {
        Flow::tcp(self.client(), sport, self.vip(), dport)
    }
    fn udp(self, sport: u16, dport: u16) -> Flow {
        Flow::udp(self.client(), sport, self.vip(), dport)
    }
    /// The flow most cases use.
    fn flow(self) -> Flow {
        self.tcp(40001, 443)
    }
    fn name(self) -> &'static str {
        if self.v6 { "IPv6" } else { "IPv4" }
    }
    /// Outer IP header length of a steering frame of this family.
    fn ip_len(self) -> usize {
        if self.v6 { 40 } else { 20 }
    }
}

fn underlay_for(target: u16) -> std::net::IpAddr {
    if member_addr(target).is_ipv6() {
        addr(UNDERLAY_V6)
    } else {
        addr(UNDERLAY_V4)
    }
}

/// The encapsulation of `input`'s IP packet that this node (as the first node) sends to
/// `target`, carrying `rest`.
fn ingress_encap(
    flow: &Flow,
    input: &[u8],
    vlan: Vlan,
    target: u16,
    rest: &[u16],
    budget: u8,
) -> Result<Out> {
    let frame = expected_encap(&ExpectedEncap {
        dst_mac: member_mac(target),
        src_mac: NODE_MAC,
        outer_src: underlay_for(target),
        outer_dst: member_addr(target),
        entropy: entropy_port(flow.hash(&KEY)),
        steer_port: STEER_PORT,
        budget,
        hops: rest,
        inner: ip_packet(input, vlan),
    })?;
    Ok(Out::Encap { target, frame })
}

/// The encapsulation of `inner` this node sends on to `target` (the entropy the first node
/// chose, 0xc123 in `steering_frame`, travels on unchanged).
fn owner_encap(inner: &[u8], target: u16, rest: &[u16], budget: u8) -> Result<Out> {
    let frame = expected_encap(&ExpectedEncap {
        dst_mac: member_mac(target),
        src_mac: NODE_MAC,
        outer_src: underlay_for(target),
        outer_dst: member_addr(target),
        entropy: 0xc123,
        steer_port: STEER_PORT,
        budget,
        hops: rest,
        inner,
    })?;
    Ok(Out::Encap { target, frame })
}

/// `owner_encap` for a redirected SYN: the header carries `STEER_SYN_REDIRECTED`.
fn redirect_encap(inner: &[u8], target: u16, rest: &[u16], budget: u8) -> Result<Out> {
    let Out::Encap { target, mut frame } = owner_encap(inner, target, rest, budget)? else {
        anyhow::bail!("owner_encap encapsulates");
    };
    let ip_len = if member_addr(target).is_ipv6() {
        40
    } else {
        20
    };
    frame[14 + ip_len + 8 + 1] |= cdn_common::wire::STEER_SYN_REDIRECTED;
    Ok(Out::Encap { target, frame })
}

/// A steering frame from `outer`'s member to this node.
fn steered(outer: Fam, budget: u8, hops: &[u16], inner: &[u8]) -> Result<Vec<u8>> {
    steering_frame(
        member_addr(outer.member()),
        addr(outer.underlay()),
        STEER_PORT,
        budget,
        hops,
        inner,
    )
}

fn echo_request(fam: Fam) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let b = etherparse::PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC);
    if fam.v6 {
        b.ipv6(
            CLIENT_V6.parse::<std::net::Ipv6Addr>()?.octets(),
            VIP_V6.parse::<std::net::Ipv6Addr>()?.octets(),
            64,
        )
        .icmpv6_echo_request(1, 1)
        .write(&mut out, b"ping")?;
    } else {
        b.ipv4(
            CLIENT_V4.parse::<std::net::Ipv4Addr>()?.octets(),
            VIP_V4.parse::<std::net::Ipv4Addr>()?.octets(),
            64,
        )
        .icmpv4_echo_request(1, 1)
        .write(&mut out, b"ping")?;
    }
    Ok(out)
}

/// Client packets that are not for a VIP, and the configuration switch.
fn untouched_cases(t: &mut Vec<Case>) {
    for fam in Fam::BOTH {
        for vlan in Vlan::ALL {
            let other_dst = if fam.v6 {
                "2001:db8:1::1"
            } else {
                "203.0.113.1"
            };
            let peer = member_addr(fam.member()).to_string();
            for f in [
                Flow::tcp(fam.client(), 5555, other_dst, 443),
                // Our own underlay address, but not the steering port.
                Flow::udp(&peer, 5555, fam.underlay(), 53),
            ] {
                let input = frame(&f, Tcp::ACK, vlan, b"hello");
                t.push(Case::new(format!("non-VIP {f:?} {vlan:?}"), fam, input));
            }
        }
        let f = fam.flow();
        t.push(
            Case::new(
                format!("not ready {}", fam.name()),
                fam,
                frame(&f, Tcp::ACK, Vlan::None, b"x"),
            )
            .config(|c| c.flags = 0)
            .hops(f, &[2])
            .expect(xdp::PASS, Reason::NotReady, Out::Unchanged),
        );
        let echo = echo_request(fam).expect("echo request");
        t.push(Case::new(format!("echo {}", fam.name()), fam, echo).expect(
            xdp::PASS,
            Reason::IcmpLocal,
            Out::Unchanged,
        ));
    }
    // Not IP at all (ARP).
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 9, 0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    let mut case = Case::new("ARP", Fam { v6: false }, arp);
    case.v6 = None;
    t.push(case);
}

/// Client packets to a VIP.
fn ingress_cases(t: &mut Vec<Case>) -> Result<()> {
    for fam in Fam::BOTH {
        let f = fam.flow();
        let n = fam.name();
        for vlan in Vlan::ALL {
            // Targets in both underlay families: 2 is IPv4, 3 is IPv6.
            for (target, rest) in [(2u16, vec![4u16, 0]), (3, vec![5]), (4, vec![])] {
                let input = frame(&f, Tcp::ACK, vlan, &[0xab; 300]);
                let mut hops = vec![target];
                hops.extend(&rest);
                let out = ingress_encap(&f, &input, vlan, target, &rest, BUDGET)?;
                t.push(
                    Case::new(format!("forward {n} -> {target} {vlan:?}"), fam, input)
                        .hops(f, &hops)
                        .expect(xdp::TX, Reason::Forwarded, out),
                );
            }
            t.push(
                Case::new(
                    format!("local SYN {n} {vlan:?}"),
                    fam,
                    frame(&f, Tcp::SYN, vlan, &[]),
                )
                .hops(f, &[SELF_ID, 2])
                .expect(xdp::PASS, Reason::LocalAccept, Out::Unchanged),
            );
            // An ACK of a connection this node has no socket for.
            let input = frame(&f, Tcp::ACK, vlan, b"data");
            let out = ingress_encap(&f, &input, vlan, 2, &[4], BUDGET - 1)?;
            t.push(
                Case::new(format!("pass on {n} {vlan:?}"), fam, input)
                    .hops(f, &[SELF_ID, 2, 4])
                    .expect(xdp::TX, Reason::PassedOn, out),
            );
            let input = icmp_too_big(
                &f,
                addr(if fam.v6 {
                    "2001:db8:ffff::fe"
                } else {
                    "203.0.113.254"
                }),
                vlan,
            );
            // The error is about the flow client -> VIP: it must hash exactly like that flow.
            let out = ingress_encap(&f, &input, vlan, 3, &[2], BUDGET)?;
            t.push(
                Case::new(format!("ICMP error {n} {vlan:?}"), fam, input)
                    .hops(f, &[3, 2])
                    .expect(xdp::TX, Reason::IcmpForwarded, out),
            );
        }
        // Without a previous owner the node is the last hop and accepts.
        t.push(
            Case::new(
                format!("last hop {n}"),
                fam,
                frame(&f, Tcp::ACK, Vlan::None, b"data"),
            )
            .hops(f, &[SELF_ID])
            .expect(xdp::PASS, Reason::LastHopAccept, Out::Unchanged),
        );
        // No hop budget to pass on with.
        t.push(
            Case::new(
                format!("ingress loop guard {n}"),
                fam,
                frame(&f, Tcp::ACK, Vlan::None, b"d"),
            )
            .hops(f, &[SELF_ID, 2])
            .config(|c| c.hop_budget = 0)
            .expect(xdp::DROP, Reason::LoopGuard, Out::Dropped),
        );
        // A draining node passes new connections on but takes them as the last hop.
        let syn = frame(&f, Tcp::SYN, Vlan::None, &[]);
        let out = ingress_encap(&f, &syn, Vlan::None, 2, &[], BUDGET - 1)?;
        t.push(
            Case::new(format!("draining pass on {n}"), fam, syn.clone())
                .hops(f, &[SELF_ID, 2])
                .config(|c| c.flags |= NODE_DRAINING)
                .expect(xdp::TX, Reason::DrainPassOn, out),
        );
        t.push(
            Case::new(format!("draining last hop {n}"), fam, syn)
                .hops(f, &[SELF_ID])
                .config(|c| c.flags |= NODE_DRAINING)
                .expect(xdp::PASS, Reason::LocalAccept, Out::Unchanged),
        );
        // Outside the service: TCP 22, UDP 53, and UDP 80 (served over TCP only).
        for g in [fam.tcp(1234, 22), fam.udp(1234, 53), fam.udp(1234, 80)] {
            t.push(
                Case::new(
                    format!("port miss {g:?}"),
                    fam,
                    frame(&g, Tcp::SYN, Vlan::None, b"q"),
                )
                .hops(g, &[2])
                .expect(xdp::DROP, Reason::PortMiss, Out::Dropped),
            );
        }
        t.push(
            Case::new(
                format!("empty bucket {n}"),
                fam,
                frame(&f, Tcp::ACK, Vlan::None, b"x"),
            )
            .hops(f, &[])
            .expect(xdp::DROP, Reason::NoRoute, Out::Dropped),
        );
        // UDP is steered like TCP.
        let u = fam.udp(5353, 443);
        let input = frame(&u, Tcp::ACK, Vlan::Single(7), b"quic initial");
        let out = ingress_encap(&u, &input, Vlan::Single(7), 4, &[2], BUDGET)?;
        t.push(
            Case::new(format!("UDP {n}"), fam, input)
                .hops(u, &[4, 2])
                .expect(xdp::TX, Reason::Forwarded, out),
        );
        // Frames too big for the underlay are dropped, not truncated; one byte less is sent.
        let input = frame(&f, Tcp::ACK, Vlan::None, &[7u8; 1000]);
        let out = ingress_encap(&f, &input, Vlan::None, 2, &[], BUDGET)?;
        let encapsulated_len = match &out {
            Out::Encap { frame, .. } => frame.len() as u32,
            _ => unreachable!("an encapsulation"),
        };
        t.push(
            Case::new(format!("too big {n}"), fam, input.clone())
                .hops(f, &[2])
                .config(|c| c.max_frame = encapsulated_len - 1)
                .expect(xdp::DROP, Reason::TooBig, Out::Dropped),
        );
        t.push(
            Case::new(format!("just fits {n}"), fam, input)
                .hops(f, &[2])
                .config(|c| c.max_frame = encapsulated_len)
                .expect(xdp::TX, Reason::Forwarded, out),
        );
        // Truncated inside the IP header.
        let mut input = frame(&f, Tcp::ACK, Vlan::None, b"x");
        input.truncate(14 + fam.ip_len() - 1);
        t.push(
            Case::new(format!("truncated {n}"), fam, input)
                .hops(f, &[2])
                .expect(xdp::DROP, Reason::Malformed, Out::Dropped),
        );
    }
    Ok(())
}

/// Malformed, fragmented and unsupported packets to a VIP.
fn odd_packet_cases(t: &mut Vec<Case>) -> Result<()> {
    let v4 = Fam { v6: false };
    let v6 = Fam { v6: true };
    let f4 = v4.flow();
    let f6 = v6.flow();

    // IPv4: set more-fragments and fix the header checksum.
    let mut input = frame(&f4, Tcp::ACK, Vlan::None, b"data");
    input[14 + 6] |= 0x20;
    fix_ipv4_checksum(&mut input[14..34]);
    t.push(Case::new("IPv4 fragment", v4, input).hops(f4, &[2]).expect(
        xdp::DROP,
        Reason::Fragment,
        Out::Dropped,
    ));
    // IPv6: a fragment header (offset 0, more-fragments, identification 7) in front of TCP.
    let plain6 = frame(&f6, Tcp::ACK, Vlan::None, b"data");
    t.push(
        Case::new(
            "IPv6 fragment",
            v6,
            insert_ipv6_ext(&plain6, 44, &[0, 1, 0, 0, 0, 7]),
        )
        .hops(f6, &[2])
        .expect(xdp::DROP, Reason::Fragment, Out::Dropped),
    );

    // IPv6 extension headers are walked: hop-by-hop options and destination options (PadN).
    let once = insert_ipv6_ext(&plain6, 60, &[1, 4, 0, 0, 0, 0]);
    let twice = insert_ipv6_ext(&once, 0, &[1, 4, 0, 0, 0, 0]);
    let out = ingress_encap(&f6, &twice, Vlan::None, 2, &[], BUDGET)?;
    t.push(
        Case::new("IPv6 extension headers", v6, twice.clone())
            .hops(f6, &[2])
            .expect(xdp::TX, Reason::Forwarded, out),
    );
    // A chain longer than the program walks is not steered.
    let mut long = twice;
    for _ in 0..3 {
        long = insert_ipv6_ext(&long, 60, &[1, 4, 0, 0, 0, 0]);
    }
    t.push(
        Case::new("IPv6 long extension chain", v6, long)
            .hops(f6, &[2])
            .expect(xdp::DROP, Reason::Unsupported, Out::Dropped),
    );
    // Unknown protocols (GRE) to a VIP.
    let mut input = frame(&f4, Tcp::ACK, Vlan::None, b"data");
    input[14 + 9] = 47;
    fix_ipv4_checksum(&mut input[14..34]);
    t.push(Case::new("IPv4 GRE", v4, input).hops(f4, &[2]).expect(
        xdp::DROP,
        Reason::Unsupported,
        Out::Dropped,
    ));
    let mut input = plain6.clone();
    input[14 + 6] = 47;
    t.push(Case::new("IPv6 GRE", v6, input).hops(f6, &[2]).expect(
        xdp::DROP,
        Reason::Unsupported,
        Out::Dropped,
    ));
    Ok(())
}

/// Steering packets to this node, for every inner and outer family.
fn owner_cases(t: &mut Vec<Case>) -> Result<()> {
    for fam in Fam::BOTH {
        let f = fam.flow();
        let syn_frame = frame(&f, Tcp::SYN, Vlan::None, &[]);
        let syn = ip_packet(&syn_frame, Vlan::None);
        let ack_frame = frame(&f, Tcp::ACK, Vlan::None, b"more data");
        let ack = ip_packet(&ack_frame, Vlan::None);
        for outer in Fam::BOTH {
            let n = format!("inner {} outer {}", fam.name(), outer.name());
            // A new connection, and our table agrees that we own it.
            t.push(
                Case::new(
                    format!("owner accept {n}"),
                    fam,
                    steered(outer, 2, &[4], syn)?,
                )
                .hops(f, &[SELF_ID, 4])
                .expect(
                    xdp::PASS,
                    Reason::OwnerAccept,
                    Out::Frame(decapsulated(syn)),
                ),
            );
            // Our table says member 5 owns the flow (4 before it): the SYN goes there,
            // whatever the sender's table said.
            t.push(
                Case::new(
                    format!("SYN redirect {n}"),
                    fam,
                    steered(outer, 2, &[4], syn)?,
                )
                .hops(f, &[5, 4])
                .expect(
                    xdp::TX,
                    Reason::SynRedirect,
                    redirect_encap(syn, 5, &[4], 1)?,
                ),
            );
            // Disagreement with no budget left: dropped (the client retries the SYN).
            t.push(
                Case::new(
                    format!("SYN loop guard {n}"),
                    fam,
                    steered(outer, 0, &[4], syn)?,
                )
                .hops(f, &[5])
                .expect(xdp::DROP, Reason::LoopGuard, Out::Dropped),
            );
            // Steering trust (README "Steering trust"): a redirected SYN is accepted whatever
            // our table says; steering on an interface not listed as underlay, and a version-1
            // header where `steer_auth` is on, are dropped.
            let mut marked = steered(outer, 2, &[4], syn)?;
            marked[14 + outer.ip_len() + 8 + 1] |= cdn_common::wire::STEER_SYN_REDIRECTED;
            t.push(
                Case::new(format!("redirected SYN accept {n}"), fam, marked)
                    .hops(f, &[5, 4])
                    .expect(
                        xdp::PASS,
                        Reason::RedirectedSynAccept,
                        Out::Frame(decapsulated(syn)),
                    ),
            );
            t.push(
                Case::new(
                    format!("not underlay {n}"),
                    fam,
                    steered(outer, 2, &[4], syn)?,
                )
                .config(|c| c.flags |= NODE_UNDERLAY_IFACES)
                .expect(xdp::DROP, Reason::NotUnderlay, Out::Dropped),
            );
            t.push(
                Case::new(
                    format!("auth failed {n}"),
                    fam,
                    steered(outer, 2, &[4], syn)?,
                )
                .config(|c| c.flags |= NODE_STEER_AUTH)
                .expect(xdp::DROP, Reason::AuthFailed, Out::Dropped),
            );
            // Not held here: passed on to 5 (IPv6 underlay) carrying [4].
            t.push(
                Case::new(
                    format!("owner pass on {n}"),
                    fam,
                    steered(outer, 2, &[5, 4], ack)?,
                )
                .expect(xdp::TX, Reason::PassedOn, owner_encap(ack, 5, &[4], 1)?),
            );
            t.push(
                Case::new(
                    format!("owner last hop {n}"),
                    fam,
                    steered(outer, 2, &[], ack)?,
                )
                .expect(
                    xdp::PASS,
                    Reason::LastHopAccept,
                    Out::Frame(decapsulated(ack)),
                ),
            );
            t.push(
                Case::new(
                    format!("owner loop guard {n}"),
                    fam,
                    steered(outer, 0, &[4], ack)?,
                )
                .expect(xdp::DROP, Reason::LoopGuard, Out::Dropped),
            );

            // Not a member: no open relay.
            let stranger = addr(if outer.v6 { "fd00::99" } else { "10.9.9.9" });
            let input = steering_frame(stranger, addr(outer.underlay()), STEER_PORT, 2, &[], syn)?;
            t.push(Case::new(format!("spoofed {n}"), fam, input).expect(
                xdp::DROP,
                Reason::Spoofed,
                Out::Dropped,
            ));
            let steer_off = 14 + outer.ip_len() + 8;
            // Unknown version.
            let mut input = steered(outer, 2, &[], syn)?;
            input[steer_off] = 9;
            t.push(Case::new(format!("bad version {n}"), fam, input).expect(
                xdp::DROP,
                Reason::BadEncap,
                Out::Dropped,
            ));
            // More hops than the header can hold.
            let mut input = steered(outer, 2, &[], syn)?;
            input[steer_off + 3] = 3;
            t.push(Case::new(format!("too many hops {n}"), fam, input).expect(
                xdp::DROP,
                Reason::BadEncap,
                Out::Dropped,
            ));
            // An inner packet that is not for a VIP is never delivered.
            let other_dst = if fam.v6 {
                "2001:db8:1::9"
            } else {
                "203.0.113.9"
            };
            let other = frame(
                &Flow::tcp(fam.client(), 1, other_dst, 80),
                Tcp::SYN,
                Vlan::None,
                &[],
            );
            let input = steered(outer, 2, &[], ip_packet(&other, Vlan::None))?;
            t.push(Case::new(format!("foreign inner {n}"), fam, input).expect(
                xdp::DROP,
                Reason::BadEncap,
                Out::Dropped,
            ));
            // Cut inside the inner IP header.
            let mut input = steered(outer, 2, &[], syn)?;
            input.truncate(steer_off + 8 + fam.ip_len() - 1);
            t.push(
                Case::new(format!("owner truncated {n}"), fam, input).expect(
                    xdp::DROP,
                    Reason::Malformed,
                    Out::Dropped,
                ),
            );
        }
    }
    Ok(())
}

/// The UDP placement modes (`connected`, `owner`, `local`), at ingress and on the owner path.
/// TCP ignores them.
fn udp_mode_cases(t: &mut Vec<Case>) -> Result<()> {
    const OWNER: u32 = SERVICE_UDP_OWNER;
    const LOCAL: u32 = SERVICE_UDP_LOCAL;
    for fam in Fam::BOTH {
        let n = fam.name();
        let u = fam.udp(5353, 443);
        for vlan in [Vlan::None, Vlan::Single(7)] {
            let input = frame(&u, Tcp::ACK, vlan, b"quic initial");
            // Local: accepted where it lands, although the bucket names another member.
            t.push(
                Case::new(format!("UDP local {n} {vlan:?}"), fam, input.clone())
                    .udp_mode(LOCAL)
                    .hops(u, &[2, 4])
                    .expect(xdp::PASS, Reason::UdpLocalAccept, Out::Unchanged),
            );
            // Owner, this node first: accepted without a socket (connected mode passes on).
            t.push(
                Case::new(format!("UDP owner self {n} {vlan:?}"), fam, input.clone())
                    .udp_mode(OWNER)
                    .hops(u, &[SELF_ID, 2, 4])
                    .expect(xdp::PASS, Reason::UdpOwnerAccept, Out::Unchanged),
            );
            // Owner elsewhere: sent there carrying no further hop (2 is an IPv4 underlay,
            // 3 an IPv6 one).
            for (target, rest) in [(2u16, [4u16, 0]), (3, [5, 2])] {
                let out = ingress_encap(&u, &input, vlan, target, &[], BUDGET)?;
                t.push(
                    Case::new(
                        format!("UDP owner -> {target} {n} {vlan:?}"),
                        fam,
                        input.clone(),
                    )
                    .udp_mode(OWNER)
                    .hops(u, &[target, rest[0], rest[1]])
                    .expect(xdp::TX, Reason::Forwarded, out),
                );
            }
            // Connected (unchanged): first hop here, no connected socket: passed on with the
            // remaining hops.
            let out = ingress_encap(&u, &input, vlan, 2, &[4], BUDGET - 1)?;
            t.push(
                Case::new(format!("UDP connected pass on {n} {vlan:?}"), fam, input)
                    .hops(u, &[SELF_ID, 2, 4])
                    .expect(xdp::TX, Reason::PassedOn, out),
            );
        }
        // TCP ignores the UDP modes: still forwarded with every hop, or passed on.
        let f = fam.flow();
        for mode in [OWNER, LOCAL] {
            let input = frame(&f, Tcp::ACK, Vlan::None, b"data");
            let out = ingress_encap(&f, &input, Vlan::None, 2, &[4], BUDGET)?;
            t.push(
                Case::new(
                    format!("TCP under UDP mode {mode:#x} {n}"),
                    fam,
                    input.clone(),
                )
                .udp_mode(mode)
                .hops(f, &[2, 4])
                .expect(xdp::TX, Reason::Forwarded, out),
            );
            let out = ingress_encap(&f, &input, Vlan::None, 2, &[4], BUDGET - 1)?;
            t.push(
                Case::new(
                    format!("TCP pass on under UDP mode {mode:#x} {n}"),
                    fam,
                    input,
                )
                .udp_mode(mode)
                .hops(f, &[SELF_ID, 2, 4])
                .expect(xdp::TX, Reason::PassedOn, out),
            );
        }

        let udp_frame = frame(&u, Tcp::ACK, Vlan::None, b"datagram");
        let udp = ip_packet(&udp_frame, Vlan::None);
        for outer in Fam::BOTH {
            let m = format!("inner {n} outer {}", outer.name());
            // Further hops listed, no socket, our table naming someone else: still accepted
            // here, never passed on (a budget of 0 would not matter either).
            for (mode, reason) in [
                (OWNER, Reason::UdpOwnerAccept),
                (LOCAL, Reason::UdpLocalAccept),
            ] {
                for budget in [2, 0] {
                    t.push(
                        Case::new(
                            format!("steered UDP mode {mode:#x} budget {budget} {m}"),
                            fam,
                            steered(outer, budget, &[5, 4], udp)?,
                        )
                        .udp_mode(mode)
                        .hops(u, &[5, 4])
                        .expect(
                            xdp::PASS,
                            reason,
                            Out::Frame(decapsulated(udp)),
                        ),
                    );
                }
            }
            // Connected (unchanged): no connected socket here, so passed on.
            t.push(
                Case::new(
                    format!("steered UDP connected {m}"),
                    fam,
                    steered(outer, 2, &[5, 4], udp)?,
                )
                .hops(u, &[SELF_ID, 5, 4])
                .expect(xdp::TX, Reason::PassedOn, owner_encap(udp, 5, &[4], 1)?),
            );
        }
    }
    Ok(())
}

/// QUIC-LB configuration of the QUIC cases.
const QUIC: QuicLbConfig = QuicLbConfig {
    config_id: 1,
    server_id_len: 2,
    cid_len: 8,
};

/// `QUIC_SERVERS` as the QUIC cases see it: server ID -> member.
const QUIC_SERVERS: [(u32, u16); 3] = [(0x0101, SELF_ID), (0x0202, 2), (0x0303, 3)];

/// A server ID no member has.
const UNKNOWN_SERVER: u32 = 0x0999;

/// The encapsulation of a QUIC packet to `target` (no further hop), with the entropy of the
/// CID path (`dcid`) or of the flow hash (`None`).
fn quic_encap(
    flow: &Flow,
    input: &[u8],
    vlan: Vlan,
    target: u16,
    dcid: Option<&[u8]>,
) -> Result<Out> {
    let frame = expected_encap(&ExpectedEncap {
        dst_mac: member_mac(target),
        src_mac: NODE_MAC,
        outer_src: underlay_for(target),
        outer_dst: member_addr(target),
        entropy: match dcid {
            Some(cid) => quic_cid_entropy(flow, cid),
            None => entropy_port(flow.hash(&KEY)),
        },
        steer_port: STEER_PORT,
        budget: BUDGET,
        hops: &[],
        inner: ip_packet(input, vlan),
    })?;
    Ok(Out::Encap { target, frame })
}

/// QUIC routing by connection ID (README "QUIC routing in the data plane").
fn quic_cases(t: &mut Vec<Case>) -> Result<()> {
    for fam in Fam::BOTH {
        let n = fam.name();
        let u = fam.udp(50000, 443);
        let own = quic_cid(&QUIC, 0x0101, 1);
        for vlan in [Vlan::None, Vlan::Single(7)] {
            // Our own server ID: accepted here whatever the bucket says.
            let input = frame(&u, Tcp::ACK, vlan, &quic_short(&own, &[0xaa; 40]));
            t.push(
                Case::new(format!("QUIC CID self {n} {vlan:?}"), fam, input)
                    .quic(QUIC)
                    .hops(u, &[2, 4])
                    .expect(xdp::PASS, Reason::QuicCidAccept, Out::Unchanged),
            );
            // Another member's server ID (2: IPv4 underlay, 3: IPv6): straight there with no
            // further hop, whatever the bucket says.
            for (server, target) in [(0x0202, 2u16), (0x0303, 3)] {
                let cid = quic_cid(&QUIC, server, 9);
                let input = frame(&u, Tcp::ACK, vlan, &quic_short(&cid, &[0xbb; 30]));
                let out = quic_encap(&u, &input, vlan, target, Some(&cid))?;
                t.push(
                    Case::new(format!("QUIC CID -> {target} {n} {vlan:?}"), fam, input)
                        .quic(QUIC)
                        .hops(u, &[SELF_ID, 4, 5])
                        .expect(xdp::TX, Reason::QuicCidForwarded, out),
                );
            }
        }
        // Long header (a Handshake packet, both versions) carrying the server's CID.
        for version in [QUIC_V1, QUIC_V2] {
            let cid = quic_cid(&QUIC, 0x0303, 3);
            let p = quic_long(
                quic_long_first(version, 2),
                version,
                &cid,
                &[7; 8],
                &[1; 20],
            );
            let input = frame(&u, Tcp::ACK, Vlan::None, &p);
            let out = quic_encap(&u, &input, Vlan::None, 3, Some(&cid))?;
            t.push(
                Case::new(
                    format!("QUIC handshake {version:#x} CID -> 3 {n}"),
                    fam,
                    input,
                )
                .quic(QUIC)
                .hops(u, &[2])
                .expect(xdp::TX, Reason::QuicCidForwarded, out),
            );
        }
        // Our config id, a server ID nobody has: by hash, counted.
        let unknown = quic_cid(&QUIC, UNKNOWN_SERVER, 5);
        let input = frame(&u, Tcp::ACK, Vlan::None, &quic_short(&unknown, &[1; 9]));
        let out = quic_encap(&u, &input, Vlan::None, 2, None)?;
        t.push(
            Case::new(
                format!("QUIC unknown server -> hash {n}"),
                fam,
                input.clone(),
            )
            .quic(QUIC)
            .hops(u, &[2, 4])
            .unknown_server()
            .expect(xdp::TX, Reason::QuicHashForwarded, out),
        );
        t.push(
            Case::new(
                format!("QUIC unknown server accept {n}"),
                fam,
                input.clone(),
            )
            .quic(QUIC)
            .hops(u, &[SELF_ID, 4])
            .unknown_server()
            .expect(xdp::PASS, Reason::QuicHashAccept, Out::Unchanged),
        );
        t.push(
            Case::new(format!("QUIC unknown server no route {n}"), fam, input)
                .quic(QUIC)
                .hops(u, &[])
                .expect(xdp::DROP, Reason::NoRoute, Out::Dropped),
        );
        // Another config id (2; and 7, unroutable) naming a known server: by hash.
        for config_id in [2u8, 7] {
            let mut cid = quic_cid(&QUIC, 0x0202, 4);
            cid[0] = config_id << 5 | (cid[0] & 0x1f);
            let input = frame(&u, Tcp::ACK, Vlan::None, &quic_short(&cid, &[2; 9]));
            let out = quic_encap(&u, &input, Vlan::None, 3, None)?;
            t.push(
                Case::new(
                    format!("QUIC config {config_id} -> hash {n}"),
                    fam,
                    input.clone(),
                )
                .quic(QUIC)
                .hops(u, &[3, 2])
                .expect(xdp::TX, Reason::QuicHashForwarded, out),
            );
            t.push(
                Case::new(format!("QUIC config {config_id} accept {n}"), fam, input)
                    .quic(QUIC)
                    .hops(u, &[SELF_ID, 2])
                    .expect(xdp::PASS, Reason::QuicHashAccept, Out::Unchanged),
            );
        }
        // Client Initials with their own DCID (8 octets of another config id, and 16 octets
        // whose first ones would name member 2): by hash, even under `udp_mode = "local"`.
        let long_dcid = [quic_cid(&QUIC, 0x0202, 6), vec![0x77; 8]].concat();
        for dcid in [vec![0xe7, 1, 1, 2, 3, 4, 5, 6], long_dcid] {
            let input = frame(&u, Tcp::ACK, Vlan::None, &quic_initial(&dcid, 1200));
            let out = quic_encap(&u, &input, Vlan::None, 3, None)?;
            t.push(
                Case::new(
                    format!("QUIC Initial {} -> hash {n}", dcid.len()),
                    fam,
                    input,
                )
                .quic(QUIC)
                .udp_mode(SERVICE_UDP_LOCAL)
                .hops(u, &[3, 2])
                .expect(xdp::TX, Reason::QuicHashForwarded, out),
            );
        }
        // What clients never send: Version Negotiation, Retry (v1 type 3, v2 type 0), a
        // version-1 DCID over 20 octets.
        let cid = quic_cid(&QUIC, 0x0101, 1);
        for (what, p) in [
            ("VN", quic_long(0x80, 0, &cid, &[1; 8], &[0, 0, 0, 1])),
            (
                "retry v1",
                quic_long(0xf0, QUIC_V1, &cid, &[1; 8], &[9; 20]),
            ),
            (
                "retry v2",
                quic_long(0xc0, QUIC_V2, &cid, &[1; 8], &[9; 20]),
            ),
            (
                "DCID 21",
                quic_long(0xc0, QUIC_V1, &[3; 21], &[1; 8], &[9; 20]),
            ),
        ] {
            t.push(
                Case::new(
                    format!("QUIC invalid {what} {n}"),
                    fam,
                    frame(&u, Tcp::ACK, Vlan::None, &p),
                )
                .quic(QUIC)
                .hops(u, &[SELF_ID])
                .expect(xdp::DROP, Reason::QuicInvalid, Out::Dropped),
            );
        }
        // Shorter than the header announces: empty, a short header cut inside its CID, a long
        // header cut inside its fixed part and inside its DCID.
        let short = quic_short(&cid, &[]);
        let long = quic_long(quic_long_first(QUIC_V1, 2), QUIC_V1, &cid, &[], &[]);
        for (what, p) in [
            ("empty", &short[..0]),
            ("short", &short[..short.len() - 1]),
            ("long fixed", &long[..5]),
            ("long DCID", &long[..13]),
        ] {
            t.push(
                Case::new(
                    format!("QUIC truncated {what} {n}"),
                    fam,
                    frame(&u, Tcp::ACK, Vlan::None, p),
                )
                .quic(QUIC)
                .hops(u, &[SELF_ID])
                .expect(xdp::DROP, Reason::QuicTruncated, Out::Dropped),
            );
        }
        // The service's other UDP port is plain UDP: it follows `udp_mode`.
        let plain = fam.udp(50000, NON_QUIC_UDP_PORT);
        let input = frame(&plain, Tcp::ACK, Vlan::None, &quic_short(&own, &[1; 9]));
        let out = ingress_encap(&plain, &input, Vlan::None, 2, &[], BUDGET)?;
        t.push(
            Case::new(
                format!("QUIC service plain UDP owner {n}"),
                fam,
                input.clone(),
            )
            .quic(QUIC)
            .udp_mode(SERVICE_UDP_OWNER)
            .hops(plain, &[2, 4])
            .expect(xdp::TX, Reason::Forwarded, out),
        );
        let out = ingress_encap(&plain, &input, Vlan::None, 2, &[4], BUDGET - 1)?;
        t.push(
            Case::new(format!("QUIC service plain UDP connected {n}"), fam, input)
                .quic(QUIC)
                .hops(plain, &[SELF_ID, 2, 4])
                .expect(xdp::TX, Reason::PassedOn, out),
        );

        // Owner path: always accepted and decapsulated, whatever the hops and our table say.
        let other = quic_cid(&QUIC, 0x0202, 2);
        let packets = [
            ("own CID", quic_short(&own, &[3; 20]), Reason::QuicCidAccept),
            (
                "own CID long",
                quic_long(quic_long_first(QUIC_V2, 1), QUIC_V2, &own, &[], &[3; 20]),
                Reason::QuicCidAccept,
            ),
            (
                "other CID",
                quic_short(&other, &[3; 20]),
                Reason::QuicHashAccept,
            ),
            (
                "Initial",
                quic_initial(&[0xe1; 8], 100),
                Reason::QuicHashAccept,
            ),
            (
                "VN",
                quic_long(0x80, 0, &own, &[], &[0, 0, 0, 1]),
                Reason::QuicHashAccept,
            ),
            ("truncated", own[..4].to_vec(), Reason::QuicHashAccept),
        ];
        for (what, p, reason) in packets {
            let inner_frame = frame(&u, Tcp::ACK, Vlan::None, &p);
            let inner = ip_packet(&inner_frame, Vlan::None);
            for outer in Fam::BOTH {
                t.push(
                    Case::new(
                        format!("steered QUIC {what} inner {n} outer {}", outer.name()),
                        fam,
                        steered(outer, 2, &[5, 4], inner)?,
                    )
                    .quic(QUIC)
                    .hops(u, &[5, 4])
                    .expect(xdp::PASS, reason, Out::Frame(decapsulated(inner))),
                );
            }
        }
    }
    Ok(())
}

/// Runs one case; returns an error naming the case on any mismatch.
fn run_case(s: &mut Scenario, case: &Case) -> Result<()> {
    s.dp.write_config(&case.config)?;
    match &case.quic {
        Some(q) => s.set_quic(Some(q), case.service_flags)?,
        None => s.set_service_flags(case.service_flags)?,
    }
    for (flow, hops) in &case.hops {
        s.set_hops(flow, hops)?;
    }
    let target = match &case.out {
        Out::Encap { target, .. } => Some((*target, s.dp.member_stats(*target)?)),
        _ => None,
    };
    let run = s.run(&case.input)?;
    // Checks the action counted against the action returned, too.
    let reason = run.try_verdict()?;
    anyhow::ensure!(
        (run.action, reason) == (case.action, case.reason),
        "got ({}, {reason:?}), expected ({}, {:?})",
        run.action,
        case.action,
        case.reason
    );
    anyhow::ensure!(
        run.counted(Reason::QuicUnknownServer) == u64::from(case.unknown_server),
        "quic_unknown_server: {:?}",
        run.counted
    );
    match &case.out {
        Out::Unchanged => anyhow::ensure!(run.out == case.input, "packet modified"),
        Out::Frame(expected) => anyhow::ensure!(
            &run.out == expected,
            "frame\n got {:02x?}\nwant {expected:02x?}",
            run.out
        ),
        Out::Encap { frame, .. } => anyhow::ensure!(
            &run.out == frame,
            "encapsulation\n got {:02x?}\nwant {frame:02x?}",
            run.out
        ),
        Out::Dropped => {}
    }
    if let Some((target, before)) = target {
        let after = s.dp.member_stats(target)?;
        anyhow::ensure!(
            after.packets - before.packets == 1,
            "member {target} packets"
        );
        anyhow::ensure!(
            after.bytes - before.bytes == run.out.len() as u64,
            "member {target} bytes"
        );
    }
    Ok(())
}

#[test]
fn every_verdict_of_the_table() -> Result<()> {
    let mut table = Vec::new();
    untouched_cases(&mut table);
    ingress_cases(&mut table)?;
    odd_packet_cases(&mut table)?;
    owner_cases(&mut table)?;
    udp_mode_cases(&mut table)?;
    quic_cases(&mut table)?;

    let mut s = Scenario::new()?;
    for (server, member) in QUIC_SERVERS {
        s.dp.set_quic_server(server, Some(member))?;
    }
    let mut seen = BTreeSet::new();
    for case in &table {
        run_case(&mut s, case).with_context(|| case.name.clone())?;
        if let Some(v6) = case.v6 {
            seen.insert((case.reason, v6));
        }
    }
    // Every path: each reason that can be a verdict, for both families.
    for &reason in Reason::ALL {
        if !reason.is_verdict()
            || UNREACHABLE_IN_TEST_RUN.contains(&reason)
            || COVERED_BY_POP_SEARCH.contains(&reason)
        {
            continue;
        }
        for v6 in [false, true] {
            assert!(
                seen.contains(&(reason, v6)),
                "no case for {} over {}",
                reason.name(),
                if v6 { "IPv6" } else { "IPv4" }
            );
        }
    }
    Ok(())
}

/// Recomputes the checksum of a 20-byte IPv4 header.
pub fn fix_ipv4_checksum(h: &mut [u8]) {
    h[10] = 0;
    h[11] = 0;
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let c = !(sum as u16);
    h[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Inserts an IPv6 extension header (`next_header` type, body without the first two bytes)
/// right after the fixed header of an untagged frame.
pub fn insert_ipv6_ext(frame: &[u8], ext_type: u8, body: &[u8]) -> Vec<u8> {
    let mut out = frame[..14 + 40].to_vec();
    let old_next = out[14 + 6];
    out[14 + 6] = ext_type;
    let mut ext = vec![old_next, ((body.len() + 2) / 8 - 1) as u8];
    ext.extend_from_slice(body);
    assert_eq!(ext.len() % 8, 0, "extension header length");
    let payload = u16::from_be_bytes([out[18], out[19]]) + ext.len() as u16;
    out[18..20].copy_from_slice(&payload.to_be_bytes());
    out.extend_from_slice(&ext);
    out.extend_from_slice(&frame[14 + 40..]);
    out
}
