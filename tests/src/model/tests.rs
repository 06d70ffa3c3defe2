//! The model on hand-built frames: the steering-trust rules of issue #12 (each against the
//! rules before it), and the flow hash against `cdn_common::hash`.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
};

use cdn_common::{
    counters::{Action, Reason},
    hash::{flow_hash_v4, flow_hash_v6, ports_word, v4_word, v6_words},
    maps::{
        Bucket, NO_MEMBER, NODE_DRAINING, NODE_READY, NodeConfig, SERVICE_TCP, SERVICE_UDP, Service,
    },
};
use etherparse::PacketBuilder;

use super::{
    Env, Expect, Hop, Out, Rules, Why, auth, expect,
    frame::{Flow, Kind},
    output::{FLAG_SYN_REDIRECTED, decapsulated},
    steer::flow_hash,
};

const UNDERLAY: u32 = 5;
const UPLINK: u32 = 6;
const VIP: [u8; 4] = [192, 0, 2, 10];
const CLIENT: [u8; 4] = [198, 51, 100, 7];
const ME: [u8; 4] = [10, 0, 0, 1];
const PEER2: [u8; 4] = [10, 0, 0, 2];
const BEFORE: Rules = Rules::BEFORE_TRUST;
const TRUST: Rules = Rules::TRUST;

/// This node is member 1; members 2 and 3 are peers; one bucket whose hops are `owner`.
fn env(owner: &[u16]) -> Env {
    let mut hops = [NO_MEMBER; 3];
    hops[..owner.len()].copy_from_slice(owner);
    let mut ports = [0u16; 8];
    ports[0] = 443;
    let hop = |id: u8| Hop {
        dst_mac: [2, 0, 0, 0, 0x10, id],
        src_mac: [2, 0, 0, 0, 0, 1],
        ifindex: UNDERLAY,
        fresh: true,
    };
    Env {
        cfg: NodeConfig {
            hash_key: [7, 8],
            underlay_v4: ME,
            steer_port: 6080,
            self_member: 1,
            flags: NODE_READY,
            hop_budget: 3,
            ..NodeConfig::default()
        },
        services: vec![(
            IpAddr::from(VIP),
            32,
            Service {
                table_offset: 0,
                table_size: 1,
                flags: SERVICE_TCP | SERVICE_UDP,
                tcp_ports: ports,
                udp_ports: ports,
                generation: 1,
                ..Service::default()
            },
        )],
        table: vec![Bucket { hops, _pad: 0 }],
        members: BTreeMap::from([
            (1, IpAddr::from(ME)),
            (2, IpAddr::from(PEER2)),
            (3, IpAddr::from([10, 0, 0, 3])),
        ]),
        next_hops: BTreeMap::from([(2, hop(2)), (3, hop(3))]),
        tcp_established: HashSet::new(),
        udp_connected: HashSet::new(),
        underlay_ifindexes: vec![UNDERLAY],
        steer_auth: false,
        auth_key: auth::derive_key([7, 8]),
        quic_servers: BTreeMap::new(),
        learned: BTreeMap::new(),
        learned_buckets: Default::default(),
    }
}

fn tcp(dport: u16, flags: u8) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(CLIENT, VIP, 64)
        .tcp(40000, dport, 1, 1000)
        .write(&mut out, &[])
        .expect("vec");
    out[33] = flags;
    out
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn echo() -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(CLIENT, VIP, 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut out, &[])
        .expect("vec");
    out
}

/// Header fields of a steering frame.
#[derive(Clone, Copy)]
struct Hdr {
    version: u8,
    flags: u8,
    budget: u8,
    hops: [u16; 2],
    count: u8,
}

const V1: Hdr = Hdr {
    version: 1,
    flags: 0,
    budget: 3,
    hops: [NO_MEMBER; 2],
    count: 0,
};

fn hops(h: Hdr, list: &[u16]) -> Hdr {
    let mut hops = [NO_MEMBER; 2];
    hops[..list.len()].copy_from_slice(list);
    Hdr {
        hops,
        count: list.len() as u8,
        ..h
    }
}

/// The MAC a sender at `src` computes for `inner` (a TCP packet client -> VIP) under `h`.
fn mac_for(env: &Env, src: [u8; 4], h: Hdr, inner: &[u8]) -> u64 {
    auth::mac(
        env.auth_key,
        &auth::Signed {
            outer_src: IpAddr::from(src),
            client: IpAddr::from(CLIENT),
            vip: IpAddr::from(VIP),
            sport: u16::from_be_bytes([inner[20], inner[21]]),
            dport: u16::from_be_bytes([inner[22], inner[23]]),
            proto: inner[9],
            flags: h.flags,
            budget: h.budget,
            hop_count: h.count,
            hops: h.hops,
            search: h.version >= 3,
        },
    )
}

/// A steering frame from `src` to this node carrying `inner`.
fn steering(src: [u8; 4], h: Hdr, mac: Option<u64>, inner: &[u8]) -> Vec<u8> {
    let mut payload = vec![h.version, h.flags, h.budget, h.count];
    payload.extend_from_slice(&h.hops[0].to_be_bytes());
    payload.extend_from_slice(&h.hops[1].to_be_bytes());
    if let Some(m) = mac {
        payload.extend_from_slice(&m.to_le_bytes());
    }
    payload.extend_from_slice(inner);
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
        .ipv4(src, ME, 64)
        .udp(0xc123, 6080)
        .write(&mut out, &payload)
        .expect("vec");
    out
}

fn verdict(e: &Expect) -> (Action, Why) {
    (e.action, e.reason)
}

fn is(r: Reason) -> Why {
    Why::Is(r)
}

/// Offset of the steering header in an IPv4 frame the node sends.
const SH: usize = 14 + 20 + 8;

#[test]
fn steering_is_accepted_only_on_underlay_interfaces() {
    let e = env(&[1]);
    let f = steering(PEER2, V1, None, &tcp(443, SYN));
    let accepted = (Action::Pass, is(Reason::OwnerAccept));
    assert_eq!(verdict(&expect(&e, &BEFORE, &f, UPLINK)), accepted);
    assert_eq!(verdict(&expect(&e, &TRUST, &f, UNDERLAY)), accepted);
    assert_eq!(
        verdict(&expect(&e, &TRUST, &f, UPLINK)),
        (Action::Drop, Why::NOT_UNDERLAY)
    );
    // Before the member check: a stranger on the uplink is not_underlay too.
    let stranger = steering([10, 0, 0, 99], V1, None, &tcp(443, SYN));
    assert_eq!(
        expect(&e, &TRUST, &stranger, UPLINK).reason,
        Why::NOT_UNDERLAY
    );
    // No underlay list: every interface is trusted.
    let open = Env {
        underlay_ifindexes: Vec::new(),
        ..env(&[1])
    };
    assert_eq!(verdict(&expect(&open, &TRUST, &f, UPLINK)), accepted);
}

#[test]
fn inner_packets_get_the_port_checks_of_direct_ones() {
    let e = env(&[1]);
    for (inner, trust) in [
        (tcp(22, SYN), is(Reason::PortMiss)),
        (echo(), is(Reason::BadEncap)),
        (tcp(443, SYN), is(Reason::OwnerAccept)),
    ] {
        let f = steering(PEER2, V1, None, &inner);
        assert_eq!(
            expect(&e, &BEFORE, &f, UNDERLAY).reason,
            is(Reason::OwnerAccept)
        );
        assert_eq!(expect(&e, &TRUST, &f, UNDERLAY).reason, trust);
    }
    // Direct, the same SYN to port 22 is a port miss either way.
    let mut direct = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 8, 0];
    direct.extend_from_slice(&tcp(22, SYN));
    assert_eq!(
        expect(&e, &BEFORE, &direct, UPLINK).reason,
        is(Reason::PortMiss)
    );
}

#[test]
fn hop_budget_is_capped_at_the_local_one() {
    let e = env(&[1]);
    // An ACK of a flow nobody holds here: passed on to member 3.
    let f = steering(
        PEER2,
        hops(Hdr { budget: 255, ..V1 }, &[3]),
        None,
        &tcp(443, ACK),
    );
    let budget = |rules: &Rules| match expect(&e, rules, &f, UNDERLAY) {
        Expect {
            reason: Why::Is(Reason::PassedOn),
            out: Out::Frame(out),
            ..
        } => out[SH + 2],
        other => panic!("not passed on: {other:?}"),
    };
    assert_eq!(budget(&BEFORE), 254);
    assert_eq!(budget(&TRUST), 2);
}

#[test]
fn redirected_syns_are_marked_and_never_redirected_again() {
    // This node's table names member 3 as the owner.
    let e = env(&[3]);
    let syn = tcp(443, SYN);
    let unmarked = steering(PEER2, V1, None, &syn);
    let flags_out = |rules: &Rules| match expect(&e, rules, &unmarked, UNDERLAY) {
        Expect {
            reason: Why::Is(Reason::SynRedirect),
            out: Out::Frame(out),
            ..
        } => out[SH + 1],
        other => panic!("not redirected: {other:?}"),
    };
    assert_eq!(flags_out(&BEFORE), 0);
    assert_eq!(flags_out(&TRUST), FLAG_SYN_REDIRECTED);

    let marked = Hdr {
        flags: FLAG_SYN_REDIRECTED,
        ..V1
    };
    let f = steering(PEER2, marked, None, &syn);
    assert_eq!(
        expect(&e, &BEFORE, &f, UNDERLAY).reason,
        is(Reason::SynRedirect)
    );
    let accepted = expect(&e, &TRUST, &f, UNDERLAY);
    assert_eq!(
        accepted,
        decapsulated(&f, SH + 8, false, Why::REDIRECTED_SYN_ACCEPT)
    );
    // A spent budget: accepted, never dropped as loop_guard.
    let spent = steering(
        PEER2,
        Hdr {
            budget: 0,
            ..marked
        },
        None,
        &syn,
    );
    assert_eq!(
        expect(&e, &BEFORE, &spent, UNDERLAY).reason,
        is(Reason::LoopGuard)
    );
    assert_eq!(
        expect(&e, &TRUST, &spent, UNDERLAY).reason,
        Why::REDIRECTED_SYN_ACCEPT
    );

    // Draining: passed on to the next hop with the mark, but never back to the sender.
    let mut draining = env(&[3]);
    draining.cfg.flags |= NODE_DRAINING;
    let on = steering(PEER2, hops(marked, &[3]), None, &syn);
    match expect(&draining, &TRUST, &on, UNDERLAY) {
        Expect {
            action: Action::Tx,
            reason: Why::Is(Reason::DrainPassOn),
            out: Out::Frame(out),
            ..
        } => {
            assert_eq!(out[14 + 16..14 + 20], [10, 0, 0, 3]);
            assert_eq!(out[SH + 1], FLAG_SYN_REDIRECTED);
            assert_eq!(out[SH + 2], 2);
        }
        other => panic!("not passed on: {other:?}"),
    }
    let back = steering(PEER2, hops(marked, &[2]), None, &syn);
    assert_eq!(
        expect(&draining, &TRUST, &back, UNDERLAY).reason,
        Why::REDIRECTED_SYN_ACCEPT
    );
}

#[test]
fn authenticated_headers() {
    let inner = tcp(443, SYN);
    let mut strict = env(&[1]);
    strict.steer_auth = true;
    let lax = env(&[1]);
    let v2 = Hdr { version: 2, ..V1 };
    let good = steering(PEER2, v2, Some(mac_for(&strict, PEER2, v2, &inner)), &inner);
    let bad = steering(
        PEER2,
        v2,
        Some(mac_for(&strict, PEER2, v2, &inner) ^ 1),
        &inner,
    );
    let v1 = steering(PEER2, V1, None, &inner);
    let v3 = steering(PEER2, Hdr { version: 3, ..V1 }, None, &inner);
    let accept = is(Reason::OwnerAccept);
    let cases = [
        (&strict, &good, accept),
        (&strict, &bad, Why::AUTH_FAILED),
        (&strict, &v1, Why::AUTH_FAILED),
        (&strict, &v3, is(Reason::BadEncap)),
        (&lax, &good, accept),
        (&lax, &bad, Why::AUTH_FAILED),
        (&lax, &v1, accept),
    ];
    for (i, (e, f, want)) in cases.into_iter().enumerate() {
        assert_eq!(expect(e, &TRUST, f, UNDERLAY).reason, want, "case {i}");
    }
    // Before the rules, version 2 is an unknown version.
    assert_eq!(
        expect(&lax, &BEFORE, &good, UNDERLAY).reason,
        is(Reason::BadEncap)
    );
    // The decapsulation skips the 16-byte header.
    assert_eq!(
        expect(&strict, &TRUST, &good, UNDERLAY),
        decapsulated(&good, SH + 16, false, Reason::OwnerAccept)
    );

    // A node with steer_auth signs what it passes on; the next node verifies it.
    let mut sender = env(&[1]);
    sender.steer_auth = true;
    let ack = tcp(443, ACK);
    let f = steering(
        PEER2,
        hops(v2, &[3]),
        Some(mac_for(&sender, PEER2, hops(v2, &[3]), &ack)),
        &ack,
    );
    let Expect {
        out: Out::Frame(out),
        ..
    } = expect(&sender, &TRUST, &f, UNDERLAY)
    else {
        panic!("not passed on");
    };
    assert_eq!(out[SH], 2);
    let sent = Hdr {
        version: 2,
        flags: out[SH + 1],
        budget: out[SH + 2],
        count: out[SH + 3],
        hops: [NO_MEMBER; 2],
    };
    let mac = u64::from_le_bytes(out[SH + 8..SH + 16].try_into().expect("8 bytes"));
    assert_eq!(mac, mac_for(&sender, ME, sent, &ack));
}

#[test]
fn flow_hash_is_the_shared_one() {
    let key = [0x0123_4567_89ab_cdef, 0x0fed_cba9_8765_4321];
    for (src, dst, sport, dport, proto) in [
        ("198.51.100.7", "192.0.2.10", 40000u16, 443u16, 6u8),
        ("2001:db8:ffff::7", "2001:db8::10", 1, 65535, 17),
    ] {
        let fl = Flow {
            kind: Kind::Tcp,
            v6: src.contains(':'),
            proto,
            tcp_flags: 0,
            src: src.parse().expect("addr"),
            dst: dst.parse().expect("addr"),
            sport,
            dport,
        };
        let shared = match (fl.src, fl.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => flow_hash_v4(
                &key,
                v4_word(s.octets()),
                v4_word(d.octets()),
                ports_word(sport, dport),
                proto,
            ),
            (IpAddr::V6(s), IpAddr::V6(d)) => flow_hash_v6(
                &key,
                v6_words(s.octets()),
                v6_words(d.octets()),
                ports_word(sport, dport),
                proto,
            ),
            _ => unreachable!(),
        };
        assert_eq!(flow_hash(key, &fl), shared);
    }
}

/// The search (README "PoPs"): PoPs 1 and 2 have one-bucket tables at 1 and 2, naming
/// members 2 and 3; this node (member 1) ends its own PoP's chain.
#[test]
fn a_flow_nobody_here_holds_is_searched_for_in_the_other_pops() {
    let mut e = env(&[1]);
    e.table.push(Bucket {
        hops: [2, NO_MEMBER, NO_MEMBER],
        _pad: 0,
    });
    e.table.push(Bucket {
        hops: [3, NO_MEMBER, NO_MEMBER],
        _pad: 0,
    });
    e.services[0].2.search_pops = 0b110;
    e.services[0].2.pop_tables[..3].copy_from_slice(&[0, 1, 2]);
    e.cfg.search_budget = 6;
    let search = |budget, pops, starter| Hdr {
        version: 3,
        budget,
        hops: [starter, 0],
        count: pops,
        ..V1
    };
    let header = |x: &Expect| match &x.out {
        Out::Frame(f) => f[SH..SH + 8].to_vec(),
        other => panic!("no frame: {other:?}"),
    };
    // An ACK at the end of the chain: to PoP 1's owner, PoP 2 left, started here.
    let start = steering(PEER2, V1, None, &tcp(443, ACK));
    let x = expect(&e, &TRUST, &start, UNDERLAY);
    assert_eq!(x.reason, is(Reason::SearchStart));
    assert_eq!(header(&x), [3, 0, 6, 0b100, 0, 1, 0, 0]);
    // Received with PoP 2 left: on to member 3, one hop spent; with none left: accepted.
    let on = steering(PEER2, search(5, 0b100, 1), None, &tcp(443, ACK));
    let x = expect(&e, &TRUST, &on, UNDERLAY);
    assert_eq!(x.reason, is(Reason::SearchPassOn));
    assert_eq!(header(&x), [3, 0, 4, 0, 0, 1, 0, 0]);
    let last = steering(PEER2, search(5, 0, 1), None, &tcp(443, ACK));
    assert_eq!(
        expect(&e, &TRUST, &last, UNDERLAY).reason,
        is(Reason::SearchExhausted)
    );
    // Never a SYN, never a second hop, never unsigned under steer_auth.
    let syn = steering(PEER2, search(5, 0, 1), None, &tcp(443, SYN));
    assert_eq!(
        expect(&e, &TRUST, &syn, UNDERLAY).reason,
        is(Reason::BadEncap)
    );
    // Never a position other than an index 0..=2 with the redirected bit.
    for (byte, value) in [(7, 3), (6, 1), (6, 0x40), (7, 0x80)] {
        let mut bad = steering(PEER2, search(5, 0, 1), None, &tcp(443, ACK));
        bad[SH + byte] = value;
        assert_eq!(
            expect(&e, &TRUST, &bad, UNDERLAY).reason,
            is(Reason::BadEncap),
            "position byte {byte} = {value:#x}"
        );
    }
    let mut strict = e.clone();
    strict.steer_auth = true;
    assert_eq!(
        expect(&strict, &TRUST, &last, UNDERLAY).reason,
        Why::AUTH_FAILED
    );
    // No budget left where a pass-on is needed.
    let spent = steering(PEER2, search(0, 0b100, 1), None, &tcp(443, ACK));
    assert_eq!(
        expect(&e, &TRUST, &spent, UNDERLAY).reason,
        is(Reason::LoopGuard)
    );
}

/// The search's walk through this node's PoP chain follows the header's position, not where
/// this node finds itself in its own view: own chain [3, 1, 2] (this node is member 1), PoP
/// 1's owner member 2.
#[test]
fn a_search_walks_from_the_position_in_its_header() {
    let mut e = env(&[3, 1, 2]);
    e.table.push(Bucket {
        hops: [2, NO_MEMBER, NO_MEMBER],
        _pad: 0,
    });
    e.services[0].2.search_pops = 0b10;
    e.services[0].2.pop_tables[..2].copy_from_slice(&[0, 1]);
    e.cfg.search_budget = 6;
    let at = |pos: u16, pops| Hdr {
        version: 3,
        budget: 5,
        hops: [2, pos],
        count: pops,
        ..V1
    };
    let header = |x: &Expect| match &x.out {
        Out::Frame(f) => f[SH..SH + 8].to_vec(),
        other => panic!("no frame: {other:?}"),
    };
    let cases: [(u16, u8, [u8; 8]); 5] = [
        // Asked as index 0, where this view has member 3: redirected there, once.
        (0, 0b10, [3, 0, 4, 0b10, 0, 2, 0x80, 0]),
        // Already redirected at 0: on past index 1 (this node) to index 2, member 2.
        (0x8000, 0b10, [3, 0, 4, 0b10, 0, 2, 0, 2]),
        // Asked as index 1, where this view has this node: on to index 2.
        (1, 0b10, [3, 0, 4, 0b10, 0, 2, 0, 2]),
        // Asked as index 2, where this view has member 2: redirected there.
        (2, 0b10, [3, 0, 4, 0b10, 0, 2, 0x80, 2]),
        // Redirected at 2 already: the chain is done, on to PoP 1's owner at index 0.
        (0x8002, 0b10, [3, 0, 4, 0, 0, 2, 0, 0]),
    ];
    for (pos, pops, want) in cases {
        let f = steering(PEER2, at(pos, pops), None, &tcp(443, ACK));
        let x = expect(&e, &TRUST, &f, UNDERLAY);
        assert_eq!(x.reason, is(Reason::SearchPassOn), "position {pos:#x}");
        assert_eq!(header(&x), want, "position {pos:#x}");
    }
    // Redirected at 2 with no PoP left: the search is done here.
    let f = steering(PEER2, at(0x8002, 0), None, &tcp(443, ACK));
    assert_eq!(
        expect(&e, &TRUST, &f, UNDERLAY).reason,
        is(Reason::SearchExhausted)
    );
}
