//! Learned owners in the XDP program (README "PoPs: learned owners"), run with
//! BPF_PROG_TEST_RUN in a namespace holding the VIPs and a real established connection per
//! family. Ingress: a flow with a `LEARNED` entry naming another member, in a bucket whose
//! `LEARNED_BUCKETS` bit is set, goes straight to that member (version-1 header, no hops), byte
//! for byte, and the entry counts the packet; every way of not qualifying (no entry, bit clear,
//! a SYN, the entry naming this node, a service without PoPs, UDP in `owner` mode) leaves
//! today's verdict. Owner: a search accepted here puts exactly one claim event (the flow and
//! the member that started the search) in `CLAIM_EVENTS`; a plain owner accept puts none.
//! This node is member 1 in PoP 0 of three.

use anyhow::{Context as _, Result};
use cdn_common::{
    counters::Reason,
    maps::{ClaimEvent, SERVICE_UDP_OWNER},
    wire::STEER_VERSION_SEARCH,
};
use cdn_tests::{
    bpf_interp::paths::in_namespace,
    model::auth,
    packets::{
        Flow, Tcp, Vlan, decapsulated, frame, ip_packet, signed_steering_frame, steering_frame,
    },
    scenario::{
        CLIENT_V4, CLIENT_V6, KEY, SELF_ID, STEER_PORT, Scenario, UNDERLAY_V4, UNDERLAY_V6, VIP_V4,
        VIP_V6, addr, establish, forwarded_frame, learned_key, member_addr, service,
    },
    xdp,
};

/// PoPs 1 and 2: every PoP but this node's.
const OTHER_POPS: u8 = 0b110;
/// The client port of the established connections.
const ESTABLISHED_PORT: u16 = 45100;
/// The member the claims name (in PoP 2).
const LEARNED: u16 = 4;

fn tcp(v6: bool, sport: u16) -> Flow {
    if v6 {
        Flow::tcp(CLIENT_V6, sport, VIP_V6, 443)
    } else {
        Flow::tcp(CLIENT_V4, sport, VIP_V4, 443)
    }
}

fn udp(v6: bool, sport: u16) -> Flow {
    Flow {
        udp: true,
        ..tcp(v6, sport)
    }
}

fn fam(v6: bool) -> &'static str {
    if v6 { "IPv6" } else { "IPv4" }
}

/// Runs `input` and checks the verdict and the exact frame out.
fn expect_frame(
    s: &mut Scenario,
    name: &str,
    input: &[u8],
    reason: Reason,
    want: &[u8],
) -> Result<()> {
    let run = s.run(input)?;
    let got = run.try_verdict().context(name.to_string())?;
    anyhow::ensure!(
        (run.action, got) == (xdp::TX, reason),
        "{name}: got ({}, {got:?}), expected (TX, {reason:?})",
        run.action
    );
    anyhow::ensure!(
        run.out == want,
        "{name}: frame\n got {:02x?}\nwant {want:02x?}",
        run.out
    );
    Ok(())
}

/// Ingress with learned entries, one family. The bucket's own chain is [2, 5]: today's
/// verdict forwards to member 2 carrying 5.
fn ingress(s: &mut Scenario, v6: bool) -> Result<()> {
    let n = fam(v6);
    let flow = tcp(v6, 40100);
    let ack = frame(&flow, Tcp::ACK, Vlan::None, b"data");
    let syn = frame(&flow, Tcp::SYN, Vlan::None, &[]);
    s.set_hops(&flow, &[2, 5])?;
    let today = forwarded_frame(2, &flow, &ack, &[5])?;
    let learned = forwarded_frame(LEARNED, &flow, &ack, &[])?;

    s.set_learned(&flow, Some(LEARNED))?;
    s.set_learned_bit(&flow, true)?;
    expect_frame(
        s,
        &format!("learned forward {n}"),
        &ack,
        Reason::LearnedForward,
        &learned,
    )?;
    let entry = s.learned(&flow)?.context("entry")?;
    assert_eq!(entry.packets, 1, "the entry counts the packet {n}");
    assert_eq!(entry.member, LEARNED);

    // Signed under steer_auth: version 2, the MAC over the same header.
    s.set_steer_auth(true)?;
    let signed = signed_steering_frame(&learned, 0, auth::derive_key(KEY), &flow);
    expect_frame(
        s,
        &format!("learned forward signed {n}"),
        &ack,
        Reason::LearnedForward,
        &signed,
    )?;
    s.set_steer_auth(false)?;

    // A SYN is a new connection: placed by this PoP's table.
    let syn_today = forwarded_frame(2, &flow, &syn, &[5])?;
    expect_frame(
        s,
        &format!("SYN with an entry {n}"),
        &syn,
        Reason::Forwarded,
        &syn_today,
    )?;

    // The bit gates the lookup: with it clear, the entry is not even read.
    s.set_learned_bit(&flow, false)?;
    expect_frame(
        s,
        &format!("entry, bit clear {n}"),
        &ack,
        Reason::Forwarded,
        &today,
    )?;
    assert_eq!(
        s.learned(&flow)?.context("entry")?.packets,
        2,
        "SYN and bit clear count nothing"
    );

    // Bit set, no entry (another flow of the bucket was learned).
    s.set_learned_bit(&flow, true)?;
    s.set_learned(&flow, None)?;
    expect_frame(
        s,
        &format!("bit, no entry {n}"),
        &ack,
        Reason::Forwarded,
        &today,
    )?;

    // An entry naming this node: the flow is looked for here, as today.
    s.set_learned(&flow, Some(SELF_ID))?;
    expect_frame(
        s,
        &format!("entry naming self {n}"),
        &ack,
        Reason::Forwarded,
        &today,
    )?;
    assert_eq!(s.learned(&flow)?.context("entry")?.packets, 0);

    // A service without PoPs never reads the learned maps.
    s.set_learned(&flow, Some(LEARNED))?;
    s.set_search_pops(0, service(0).flags)?;
    expect_frame(s, &format!("no PoPs {n}"), &ack, Reason::Forwarded, &today)?;
    s.set_search_pops(OTHER_POPS, service(0).flags)?;

    // UDP: `connected` flows are searchable and learned; `owner` flows are not.
    let u = udp(v6, 40101);
    let datagram = frame(&u, Tcp::ACK, Vlan::None, b"dgram");
    s.set_hops(&u, &[2, 5])?;
    s.set_learned(&u, Some(LEARNED))?;
    s.set_learned_bit(&u, true)?;
    let u_learned = forwarded_frame(LEARNED, &u, &datagram, &[])?;
    expect_frame(
        s,
        &format!("UDP connected {n}"),
        &datagram,
        Reason::LearnedForward,
        &u_learned,
    )?;
    s.set_search_pops(OTHER_POPS, service(0).flags | SERVICE_UDP_OWNER)?;
    let u_owner = forwarded_frame(2, &u, &datagram, &[])?;
    expect_frame(
        s,
        &format!("UDP owner {n}"),
        &datagram,
        Reason::Forwarded,
        &u_owner,
    )?;
    s.set_search_pops(OTHER_POPS, service(0).flags)?;
    s.set_learned(&u, None)?;
    s.set_learned(&flow, None)?;
    s.set_learned_bit(&flow, false)?;
    s.set_learned_bit(&u, false)?;
    Ok(())
}

/// Every event now in the ring.
fn drain(ring: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<ClaimEvent> {
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        assert_eq!(item.len(), size_of::<ClaimEvent>(), "event size");
        // SAFETY: the length is checked; ClaimEvent is plain integers, read unaligned.
        events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<ClaimEvent>()) });
    }
    events
}

/// A search (started by member 4) and a plain version-1 packet for the established
/// connection reach this node, from a member of either family.
fn claims(s: &mut Scenario, v6: bool) -> Result<()> {
    let flow = tcp(v6, ESTABLISHED_PORT);
    let ack = ip_packet(&frame(&flow, Tcp::ACK, Vlan::None, b"more"), Vlan::None).to_vec();
    let mut ring = s.claim_events()?;
    drain(&mut ring);
    for sender in [2u16, 3] {
        let name = format!("inner {} from member {sender}", fam(v6));
        let outer_dst = if member_addr(sender).is_ipv6() {
            addr(UNDERLAY_V6)
        } else {
            addr(UNDERLAY_V4)
        };
        let v1 = steering_frame(member_addr(sender), outer_dst, STEER_PORT, 3, &[], &ack)?;
        // The budget the search arrives with goes into the event.
        let budget = if sender == 2 { 3 } else { 7 };
        let mut search = steering_frame(
            member_addr(sender),
            outer_dst,
            STEER_PORT,
            budget,
            &[4, 0],
            &ack,
        )?;
        let sh =
            14 + if member_addr(sender).is_ipv6() {
                40
            } else {
                20
            } + 8;
        search[sh] = STEER_VERSION_SEARCH;
        search[sh + 3] = 0;

        let run = s.run(&v1)?;
        assert_eq!(run.verdict(), Reason::OwnerAccept, "{name}");
        assert!(
            drain(&mut ring).is_empty(),
            "an owner accept claims nothing: {name}"
        );

        let run = s.run(&search)?;
        assert_eq!(run.verdict(), Reason::SearchAccept, "{name}");
        assert_eq!(run.counted(Reason::ClaimLost), 0, "{name}");
        assert_eq!(run.out, decapsulated(&ack), "{name}");
        let events = drain(&mut ring);
        assert_eq!(
            events,
            [ClaimEvent {
                key: learned_key(&flow),
                starter: 4,
                budget_left: budget,
                _pad: [0; 5],
            }],
            "{name}"
        );

        // Signed (version 4): the header sits before the MAC, its budget is found there.
        let signed = signed_steering_frame(&search, 0, auth::derive_key(KEY), &flow);
        let run = s.run(&signed)?;
        assert_eq!(run.verdict(), Reason::SearchAccept, "signed {name}");
        let events = drain(&mut ring);
        assert_eq!(
            events
                .iter()
                .map(|e| (e.starter, e.budget_left))
                .collect::<Vec<_>>(),
            [(4, budget)],
            "signed {name}"
        );
    }
    Ok(())
}

#[test]
fn learned_forward_and_claim_events() -> Result<()> {
    in_namespace(|| {
        let _open = [
            establish(&tcp(false, ESTABLISHED_PORT))?,
            establish(&tcp(true, ESTABLISHED_PORT))?,
        ];
        let mut s = Scenario::new()?;
        s.set_search_pops(OTHER_POPS, service(0).flags)?;
        for v6 in [false, true] {
            ingress(&mut s, v6)?;
            claims(&mut s, v6)?;
        }
        Ok(())
    })
}
