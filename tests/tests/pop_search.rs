//! The cross-PoP search of the XDP program (README "PoPs: the search in the data plane"), run
//! with BPF_PROG_TEST_RUN in a namespace that holds the VIPs and a real established connection
//! per family (a search that reaches the member holding the flow is accepted there). Every
//! search verdict, for IPv4 and IPv6 inner packets and outer headers, with the exact frame
//! out: the search header's version, flags, budget, PoP set (in `hop_count`), the member that
//! started the search in `hops[0]` and the walk's position in `hops[1]` (chain index, and the
//! redirected bit); signed (version 4) where `steer_auth` is on. This node is member 1 in PoP 0
//! of three; the services search PoPs 1 and 2.

use std::{collections::BTreeSet, net::IpAddr};

use anyhow::{Context as _, Result};
use cdn_common::{
    counters::Reason,
    maps::{
        NODE_STEER_AUTH, NodeConfig, SERVICE_PLACE_ELSEWHERE, SERVICE_PLACE_POP_SHIFT,
        SERVICE_UDP_OWNER,
    },
    wire::{STEER_SEARCH_POS_REDIRECTED, STEER_VERSION_AUTH, STEER_VERSION_SEARCH, entropy_port},
};
use cdn_tests::{
    bpf_interp::paths::in_namespace,
    model::auth,
    packets::{
        Flow, Tcp, Vlan, decapsulated, frame, ip_packet, signed_steering_frame, steering_frame,
    },
    scenario::{
        CLIENT_V4, CLIENT_V6, KEY, SEARCH_BUDGET, SELF_ID, STEER_PORT, Scenario, UNDERLAY_V4,
        UNDERLAY_V6, VIP_V4, VIP_V6, addr, encap_to, establish, forwarded_frame, member_addr,
        node_config, service,
    },
    xdp,
};

/// PoPs 1 and 2: every PoP but this node's.
const OTHER_POPS: u8 = 0b110;
/// Only PoP 2 left.
const POP_2: u8 = 0b100;
/// A search header's position (`hops[1]`): chain index `index`, not redirected there yet.
const fn at(index: u16) -> u16 {
    index
}
/// A search header's position: chain index `index`, redirected there once already.
const fn redirected(index: u16) -> u16 {
    index | STEER_SEARCH_POS_REDIRECTED
}
/// The client port of the established connections.
const ESTABLISHED_PORT: u16 = 45000;

#[derive(Clone, Copy)]
struct Fam {
    v6: bool,
}

impl Fam {
    const BOTH: [Fam; 2] = [Fam { v6: false }, Fam { v6: true }];

    fn name(self) -> &'static str {
        if self.v6 { "IPv6" } else { "IPv4" }
    }
    fn tcp(self, sport: u16) -> Flow {
        if self.v6 {
            Flow::tcp(CLIENT_V6, sport, VIP_V6, 443)
        } else {
            Flow::tcp(CLIENT_V4, sport, VIP_V4, 443)
        }
    }
    /// A member whose underlay address is of this family (as an outer header's sender).
    fn member(self) -> u16 {
        if self.v6 { 3 } else { 2 }
    }
    fn underlay(self) -> IpAddr {
        addr(if self.v6 { UNDERLAY_V6 } else { UNDERLAY_V4 })
    }
}

/// Offset of the steering header in an untagged frame whose outer header reaches `member`.
fn steer_off(member: u16) -> usize {
    14 + if member_addr(member).is_ipv6() {
        40
    } else {
        20
    } + 8
}

/// Turns the version-1 frame `frame` (hops `[starter, position]`) into a search header with
/// `pops`.
fn as_search(mut frame: Vec<u8>, sh: usize, pops: u8) -> Vec<u8> {
    frame[sh] = STEER_VERSION_SEARCH;
    frame[sh + 3] = pops;
    frame
}

/// A search frame from a member of `outer`'s family to this node, asking it at `pos`.
fn search_in(
    outer: Fam,
    budget: u8,
    starter: u16,
    pops: u8,
    pos: u16,
    inner: &[u8],
) -> Result<Vec<u8>> {
    let f = steering_frame(
        member_addr(outer.member()),
        outer.underlay(),
        STEER_PORT,
        budget,
        &[starter, pos],
        inner,
    )?;
    Ok(as_search(f, steer_off(outer.member()), pops))
}

/// The search this node sends to `target`, asking it at `pos`.
#[allow(clippy::too_many_arguments)]
fn search_out(
    target: u16,
    entropy: u16,
    budget: u8,
    starter: u16,
    pops: u8,
    pos: u16,
    inner: &[u8],
) -> Result<Vec<u8>> {
    let f = encap_to(target, entropy, budget, &[starter, pos], inner)?;
    Ok(as_search(f, steer_off(target), pops))
}

/// `frame` (a search header, untagged) signed as a member would sign it: version 4.
fn signed(frame: &[u8], flow: &Flow) -> Vec<u8> {
    signed_steering_frame(frame, 0, auth::derive_key(KEY), flow)
}

enum Out {
    Unchanged,
    Frame(Vec<u8>),
    Dropped,
}

struct Case {
    name: String,
    v6: bool,
    config: NodeConfig,
    /// Hops of the flow's bucket in PoPs 0 (this node's), 1 and 2.
    chains: [Vec<u16>; 3],
    flow: Flow,
    input: Vec<u8>,
    action: u32,
    reason: Reason,
    out: Out,
}

impl Case {
    fn new(name: String, fam: Fam, flow: Flow, input: Vec<u8>) -> Self {
        let mut config = node_config();
        config.search_budget = SEARCH_BUDGET;
        Self {
            name,
            v6: fam.v6,
            config,
            chains: [vec![SELF_ID], vec![], vec![]],
            flow,
            input,
            action: xdp::PASS,
            reason: Reason::NonVipPass,
            out: Out::Unchanged,
        }
    }
    fn chains(mut self, own: &[u16], pop1: &[u16], pop2: &[u16]) -> Self {
        self.chains = [own.to_vec(), pop1.to_vec(), pop2.to_vec()];
        self
    }
    fn auth(mut self) -> Self {
        self.config.flags |= NODE_STEER_AUTH;
        self
    }
    fn expect(mut self, action: u32, reason: Reason, out: Out) -> Self {
        (self.action, self.reason, self.out) = (action, reason, out);
        self
    }
}

/// Cases of client packets that reach the end of this PoP's chain here.
fn ingress_cases(t: &mut Vec<Case>, fam: Fam) -> Result<()> {
    let flow = fam.tcp(40001);
    let input = frame(&flow, Tcp::ACK, Vlan::None, b"data");
    let inner = ip_packet(&input, Vlan::None).to_vec();
    let entropy = entropy_port(flow.hash(&KEY));
    let n = fam.name();
    let case = |name: &str| Case::new(format!("{name} {n}"), fam, flow, input.clone());
    t.push(
        case("ingress: search starts in PoP 1")
            .chains(&[SELF_ID], &[2, 4], &[5])
            .expect(
                xdp::TX,
                Reason::SearchStart,
                Out::Frame(search_out(
                    2,
                    entropy,
                    SEARCH_BUDGET,
                    SELF_ID,
                    POP_2,
                    at(0),
                    &inner,
                )?),
            ),
    );
    t.push(
        case("ingress: PoP 1 names nobody, search starts in PoP 2")
            .chains(&[SELF_ID], &[], &[3])
            .expect(
                xdp::TX,
                Reason::SearchStart,
                Out::Frame(search_out(
                    3,
                    entropy,
                    SEARCH_BUDGET,
                    SELF_ID,
                    0,
                    at(0),
                    &inner,
                )?),
            ),
    );
    t.push(
        case("ingress: PoP 1 names this node, search starts in PoP 2")
            .chains(&[SELF_ID], &[SELF_ID], &[5])
            .expect(
                xdp::TX,
                Reason::SearchStart,
                Out::Frame(search_out(
                    5,
                    entropy,
                    SEARCH_BUDGET,
                    SELF_ID,
                    0,
                    at(0),
                    &inner,
                )?),
            ),
    );
    t.push(
        case("ingress: this PoP's table never named anyone, search starts in PoP 1")
            .chains(&[], &[2, 4], &[5])
            .expect(
                xdp::TX,
                Reason::SearchStart,
                Out::Frame(search_out(
                    2,
                    entropy,
                    SEARCH_BUDGET,
                    SELF_ID,
                    POP_2,
                    at(0),
                    &inner,
                )?),
            ),
    );
    t.push(
        case("ingress: no other PoP names an owner")
            .chains(&[SELF_ID], &[], &[])
            .expect(xdp::PASS, Reason::LastHopAccept, Out::Unchanged),
    );
    let signed_out = signed(
        &search_out(2, entropy, SEARCH_BUDGET, SELF_ID, POP_2, at(0), &inner)?,
        &flow,
    );
    t.push(
        case("ingress: signed search (version 4)")
            .auth()
            .chains(&[SELF_ID], &[2], &[4])
            .expect(xdp::TX, Reason::SearchStart, Out::Frame(signed_out)),
    );
    let syn = frame(&flow, Tcp::SYN, Vlan::None, &[]);
    t.push(
        Case::new(
            format!("ingress: a SYN is taken here, not searched {n}"),
            fam,
            flow,
            syn,
        )
        .chains(&[SELF_ID], &[2], &[4])
        .expect(xdp::PASS, Reason::LocalAccept, Out::Unchanged),
    );
    let syn = frame(&flow, Tcp::SYN, Vlan::None, &[]);
    t.push(
        Case::new(
            format!("ingress: a SYN with nobody to place it is dropped, not searched {n}"),
            fam,
            flow,
            syn,
        )
        .chains(&[], &[2], &[4])
        .expect(xdp::DROP, Reason::NoRoute, Out::Dropped),
    );
    Ok(())
}

/// Cases of steering packets (version 1 at the end of the chain, and searches) from a member
/// of `outer`'s family, about a client flow of `fam`.
fn owner_cases(t: &mut Vec<Case>, fam: Fam, outer: Fam) -> Result<()> {
    let flow = fam.tcp(40002);
    let ack = ip_packet(&frame(&flow, Tcp::ACK, Vlan::None, b"more"), Vlan::None).to_vec();
    let syn = ip_packet(&frame(&flow, Tcp::SYN, Vlan::None, &[]), Vlan::None).to_vec();
    let n = format!("inner {} outer {}", fam.name(), outer.name());
    let case = |name: &str, input: Vec<u8>| Case::new(format!("{name} {n}"), fam, flow, input);
    // The entropy the first node chose (`steering_frame`'s) travels on.
    const E: u16 = 0xc123;
    let v1_last = steering_frame(
        member_addr(outer.member()),
        outer.underlay(),
        STEER_PORT,
        2,
        &[],
        &ack,
    )?;
    t.push(
        case("version 1, last hop: search starts", v1_last)
            .chains(&[2, SELF_ID], &[4], &[5])
            .expect(
                xdp::TX,
                Reason::SearchStart,
                Out::Frame(search_out(
                    4,
                    E,
                    SEARCH_BUDGET,
                    SELF_ID,
                    POP_2,
                    at(0),
                    &ack,
                )?),
            ),
    );
    let search = |budget, pops, pos| search_in(outer, budget, 4, pops, pos, &ack);
    let out = |target, pops, pos| search_out(target, E, 4, 4, pops, pos, &ack);
    t.push(
        case(
            "search: index 0 is this node, on to index 1",
            search(5, POP_2, at(0))?,
        )
        .chains(&[SELF_ID, 5, 2], &[4], &[3])
        .expect(
            xdp::TX,
            Reason::SearchPassOn,
            Out::Frame(out(5, POP_2, at(1))?),
        ),
    );
    t.push(
        case(
            "search: this PoP's chain done after index 1, on to PoP 2 at index 0",
            search(5, POP_2, at(1))?,
        )
        .chains(&[2, SELF_ID], &[4], &[3])
        .expect(xdp::TX, Reason::SearchPassOn, Out::Frame(out(3, 0, at(0))?)),
    );
    // Views that differ: the sender's chain had this node at index 0, this node's names
    // member 5 there (and does not list this node): 5 is asked, at the same index, once.
    t.push(
        case(
            "search: another member at index 0 in this view, redirected to it",
            search(5, POP_2, at(0))?,
        )
        .chains(&[5, 2], &[4], &[3])
        .expect(
            xdp::TX,
            Reason::SearchPassOn,
            Out::Frame(out(5, POP_2, redirected(0))?),
        ),
    );
    t.push(
        case(
            "search: another member at index 1 in this view, redirected to it",
            search(5, POP_2, at(1))?,
        )
        .chains(&[2, 5, SELF_ID], &[4], &[3])
        .expect(
            xdp::TX,
            Reason::SearchPassOn,
            Out::Frame(out(5, POP_2, redirected(1))?),
        ),
    );
    t.push(
        case(
            "search: another member at index 2 in this view, redirected to it",
            search(5, POP_2, at(2))?,
        )
        .chains(&[2, 5, 4], &[4], &[3])
        .expect(
            xdp::TX,
            Reason::SearchPassOn,
            Out::Frame(out(4, POP_2, redirected(2))?),
        ),
    );
    // Redirected at an index already: never again, whatever this view names there.
    t.push(
        case(
            "search: redirected at index 0 already, index 1 is this node: on to index 2",
            search(5, POP_2, redirected(0))?,
        )
        .chains(&[2, SELF_ID, 5], &[4], &[3])
        .expect(
            xdp::TX,
            Reason::SearchPassOn,
            Out::Frame(out(5, POP_2, at(2))?),
        ),
    );
    t.push(
        case(
            "search: redirected at index 0 already, on to index 1",
            search(5, POP_2, redirected(0))?,
        )
        .chains(&[5, 2], &[4], &[3])
        .expect(
            xdp::TX,
            Reason::SearchPassOn,
            Out::Frame(out(2, POP_2, at(1))?),
        ),
    );
    t.push(
        case(
            "search: redirected at the last index already, on to PoP 2",
            search(5, POP_2, redirected(2))?,
        )
        .chains(&[2, 5, 4], &[4], &[3])
        .expect(xdp::TX, Reason::SearchPassOn, Out::Frame(out(3, 0, at(0))?)),
    );
    // Two views in opposite orders ([1, 2] here, [2, 1] at member 2): asked as index 1 by
    // member 2, this node asks member 2 at index 1 once; member 2 moves on from there, and
    // if it comes back redirected, the walk goes on past the chain, not back.
    t.push(
        case(
            "search: views in opposite orders, redirected back once",
            search(5, 0, at(1))?,
        )
        .chains(&[SELF_ID, 2], &[4], &[3])
        .expect(
            xdp::TX,
            Reason::SearchPassOn,
            Out::Frame(out(2, 0, redirected(1))?),
        ),
    );
    t.push(
        case(
            "search: views in opposite orders, not redirected twice",
            search(5, 0, redirected(1))?,
        )
        .chains(&[SELF_ID, 2], &[4], &[3])
        .expect(
            xdp::PASS,
            Reason::SearchExhausted,
            Out::Frame(decapsulated(&ack)),
        ),
    );
    t.push(
        case(
            "search: budget capped by the search budget",
            search(200, 0, at(0))?,
        )
        .chains(&[SELF_ID, 2], &[], &[])
        .expect(
            xdp::TX,
            Reason::SearchPassOn,
            Out::Frame(search_out(2, E, SEARCH_BUDGET - 1, 4, 0, at(1), &ack)?),
        ),
    );
    t.push(
        case("search: nobody left", search(5, 0, at(0))?)
            .chains(&[SELF_ID], &[4], &[3])
            .expect(
                xdp::PASS,
                Reason::SearchExhausted,
                Out::Frame(decapsulated(&ack)),
            ),
    );
    t.push(
        case(
            "search: the PoPs left name nobody",
            search(5, OTHER_POPS, at(0))?,
        )
        .chains(&[SELF_ID], &[], &[SELF_ID])
        .expect(
            xdp::PASS,
            Reason::SearchExhausted,
            Out::Frame(decapsulated(&ack)),
        ),
    );
    t.push(
        case("search: budget spent", search(0, POP_2, at(0))?)
            .chains(&[SELF_ID, 5], &[4], &[3])
            .expect(xdp::DROP, Reason::LoopGuard, Out::Dropped),
    );
    t.push(
        case("search: a SYN", search_in(outer, 5, 4, POP_2, at(0), &syn)?)
            .chains(&[SELF_ID], &[4], &[3])
            .expect(xdp::DROP, Reason::BadEncap, Out::Dropped),
    );
    // The position is an index 0..=2 and the redirected bit, nothing else (the chain the
    // node has would pass a valid one on).
    for pos in [3, redirected(3), 4, 9, 0x0100, 0x4000] {
        t.push(
            case(
                &format!("search: position {pos:#06x}"),
                search(5, POP_2, pos)?,
            )
            .chains(&[2, 5, 4], &[4], &[3])
            .expect(xdp::DROP, Reason::BadEncap, Out::Dropped),
        );
    }
    t.push(
        case("search: unsigned under steer_auth", search(5, 0, at(0))?)
            .auth()
            .expect(xdp::DROP, Reason::AuthFailed, Out::Dropped),
    );
    let good = signed(&search(5, 0, at(0))?, &flow);
    t.push(
        case("search: signed, nobody left", good.clone())
            .auth()
            .expect(
                xdp::PASS,
                Reason::SearchExhausted,
                Out::Frame(decapsulated(&ack)),
            ),
    );
    // The MAC covers the header's kind: the same signed fields read as a plain version-2
    // header do not verify.
    let mut demoted = good.clone();
    demoted[steer_off(outer.member())] = STEER_VERSION_AUTH;
    t.push(
        case("search: signed, rewritten as version 2", demoted)
            .auth()
            .expect(xdp::DROP, Reason::AuthFailed, Out::Dropped),
    );
    let mut forged = good;
    let last = forged.len() - ack.len() - 1;
    forged[last] ^= 1;
    t.push(case("search: signed, MAC wrong", forged).auth().expect(
        xdp::DROP,
        Reason::AuthFailed,
        Out::Dropped,
    ));
    t.push(
        case(
            "search: signed, redirected signed",
            signed(&search(5, POP_2, at(0))?, &flow),
        )
        .auth()
        .chains(&[5, SELF_ID], &[4], &[3])
        .expect(
            xdp::TX,
            Reason::SearchPassOn,
            Out::Frame(signed(&out(5, POP_2, redirected(0))?, &flow)),
        ),
    );
    t.push(
        case(
            "search: signed, passed on signed",
            signed(&search(5, POP_2, at(0))?, &flow),
        )
        .auth()
        .chains(&[SELF_ID, 5], &[4], &[3])
        .expect(
            xdp::TX,
            Reason::SearchPassOn,
            Out::Frame(signed(&out(5, POP_2, at(1))?, &flow)),
        ),
    );
    Ok(())
}

/// A search for the established connection reaches this node: accepted.
fn accept_cases(t: &mut Vec<Case>, fam: Fam, outer: Fam) -> Result<()> {
    let flow = fam.tcp(ESTABLISHED_PORT);
    let ack = ip_packet(&frame(&flow, Tcp::ACK, Vlan::None, b"more"), Vlan::None).to_vec();
    t.push(
        Case::new(
            format!(
                "search: held here (asked after a redirect) inner {} outer {}",
                fam.name(),
                outer.name()
            ),
            fam,
            flow,
            search_in(outer, 5, 4, POP_2, redirected(1), &ack)?,
        )
        .chains(&[2, 5], &[4], &[3])
        .expect(
            xdp::PASS,
            Reason::SearchAccept,
            Out::Frame(decapsulated(&ack)),
        ),
    );
    Ok(())
}

fn run_case(s: &mut Scenario, case: &Case) -> Result<()> {
    s.dp.write_config(&case.config)?;
    for (pop, chain) in case.chains.iter().enumerate() {
        s.set_pop_hops(pop, &case.flow, chain)?;
    }
    let run = s.run(&case.input)?;
    let reason = run.try_verdict()?;
    anyhow::ensure!(
        (run.action, reason) == (case.action, case.reason),
        "got ({}, {reason:?}), expected ({}, {:?})",
        run.action,
        case.action,
        case.reason
    );
    match &case.out {
        Out::Unchanged => anyhow::ensure!(run.out == case.input, "packet modified"),
        Out::Frame(want) => anyhow::ensure!(
            &run.out == want,
            "frame\n got {:02x?}\nwant {want:02x?}",
            run.out
        ),
        Out::Dropped => {}
    }
    Ok(())
}

#[test]
fn every_search_verdict() -> Result<()> {
    let mut table = Vec::new();
    for fam in Fam::BOTH {
        ingress_cases(&mut table, fam)?;
        for outer in Fam::BOTH {
            owner_cases(&mut table, fam, outer)?;
            accept_cases(&mut table, fam, outer)?;
        }
    }
    let seen = in_namespace(|| {
        let _open = [
            establish(&Fam::BOTH[0].tcp(ESTABLISHED_PORT))?,
            establish(&Fam::BOTH[1].tcp(ESTABLISHED_PORT))?,
        ];
        let mut s = Scenario::new()?;
        s.set_search_pops(OTHER_POPS, service(0).flags)?;
        let mut seen = BTreeSet::new();
        for case in &table {
            run_case(&mut s, case).with_context(|| case.name.clone())?;
            seen.insert((case.reason, case.v6));
        }
        Ok(seen)
    })?;
    for reason in [
        Reason::SearchStart,
        Reason::SearchPassOn,
        Reason::SearchAccept,
        Reason::SearchExhausted,
    ] {
        for v6 in [false, true] {
            assert!(
                seen.contains(&(reason, v6)),
                "no case for {reason:?} v6 {v6}"
            );
        }
    }
    Ok(())
}

/// Without other PoPs (`search_pops` 0, a cluster without PoPs), the end of the chain accepts
/// as it always did, and a search header still finds the flow where it is held.
#[test]
fn one_pop_never_searches() -> Result<()> {
    in_namespace(|| {
        let _open = establish(&Fam::BOTH[0].tcp(ESTABLISHED_PORT))?;
        let mut s = Scenario::new()?;
        for fam in Fam::BOTH {
            let flow = fam.tcp(40003);
            let input = frame(&flow, Tcp::ACK, Vlan::None, b"data");
            for pop in 0..3 {
                s.set_pop_hops(pop, &flow, &[if pop == 0 { SELF_ID } else { 2 }])?;
            }
            let run = s.run(&input)?;
            assert_eq!(run.verdict(), Reason::LastHopAccept, "{}", fam.name());
            assert_eq!(run.out, input);
        }
        let flow = Fam::BOTH[0].tcp(ESTABLISHED_PORT);
        let ack = ip_packet(&frame(&flow, Tcp::ACK, Vlan::None, b"x"), Vlan::None).to_vec();
        let run = s.run(&search_in(Fam::BOTH[0], 3, 4, 0, at(0), &ack)?)?;
        assert_eq!(run.verdict(), Reason::SearchAccept);
        assert_eq!(run.out, decapsulated(&ack));
        Ok(())
    })
}

/// This node's PoP has no eligible member (README "PoPs: fallback"): the entry names PoP 2 as
/// the PoP that places new connections. A SYN and a UDP flow of `udp_mode = "owner"` go to
/// PoP 2's owner (the SYN carrying the rest of PoP 2's chain), while an established flow's
/// packet still follows this node's own PoP's chain, where its drained members hold their
/// flows. Without the flag, the same SYN follows this PoP's chain.
#[test]
fn a_pop_without_eligible_members_places_new_connections_in_another() -> Result<()> {
    in_namespace(|| {
        let mut s = Scenario::new()?;
        let plain = service(0).flags | SERVICE_UDP_OWNER;
        let elsewhere = plain | SERVICE_PLACE_ELSEWHERE | 2 << SERVICE_PLACE_POP_SHIFT;
        for fam in Fam::BOTH {
            let n = fam.name();
            let flow = fam.tcp(40020);
            let syn = frame(&flow, Tcp::SYN, Vlan::None, &[]);
            let ack = frame(&flow, Tcp::ACK, Vlan::None, b"data");
            // A UDP flow in another bucket than the TCP one (the tables have 13).
            let u = (40021..)
                .map(|port| {
                    if fam.v6 {
                        Flow::udp(CLIENT_V6, port, VIP_V6, 443)
                    } else {
                        Flow::udp(CLIENT_V4, port, VIP_V4, 443)
                    }
                })
                .find(|u| s.pop_bucket_index(0, u) != s.pop_bucket_index(0, &flow))
                .context("a UDP flow in another bucket")?;
            let datagram = frame(&u, Tcp::ACK, Vlan::None, b"dns?");
            for (f, own, pop2) in [(&flow, &[4, 2][..], &[5, 3][..]), (&u, &[4], &[0])] {
                s.set_pop_hops(0, f, own)?;
                s.set_pop_hops(1, f, &[2])?;
                s.set_pop_hops(2, f, pop2)?;
            }
            s.set_search_pops(OTHER_POPS, elsewhere)?;
            let cases = [
                (
                    "SYN",
                    &syn,
                    Reason::Forwarded,
                    forwarded_frame(5, &flow, &syn, &[3])?,
                ),
                (
                    "ACK",
                    &ack,
                    Reason::Forwarded,
                    forwarded_frame(4, &flow, &ack, &[2])?,
                ),
                (
                    "UDP owner",
                    &datagram,
                    Reason::Forwarded,
                    forwarded_frame(0, &u, &datagram, &[])?,
                ),
            ];
            for (what, input, reason, want) in cases {
                let run = s.run(input)?;
                anyhow::ensure!(
                    (run.action, run.try_verdict()?) == (xdp::TX, reason),
                    "{what} {n}: {:?}",
                    run.try_verdict()
                );
                anyhow::ensure!(
                    run.out == want,
                    "{what} {n}: frame\n got {:02x?}\nwant {want:02x?}",
                    run.out
                );
            }
            s.set_search_pops(OTHER_POPS, plain)?;
            let run = s.run(&syn)?;
            anyhow::ensure!(
                run.out == forwarded_frame(4, &flow, &syn, &[2])?,
                "SYN {n} without the flag: not to this PoP's owner"
            );
        }
        Ok(())
    })
}
