//! The live trace in the data plane, with BPF_PROG_TEST_RUN: with `NODE_TRACE` set, every
//! packet that passes the `TRACE_FILTER` produces exactly one event whose fields (flow, reason,
//! action, member, steering header, interface) are checked field by field; packets the filter
//! rejects, and every packet while tracing is off, produce none.

use std::net::IpAddr;

use anyhow::{Context as _, Result, ensure};
use cdn_common::{
    counters::{Action, Reason},
    maps::{NO_MEMBER, NODE_TRACE},
    trace::{
        TRACE_EV_FLOW, TRACE_EV_STEERED, TRACE_EV_UNDERLAY_V6, TRACE_EV_V6, TRACE_MATCH_CLIENT,
        TRACE_MATCH_PORT, TRACE_MATCH_V6, TRACE_MATCH_VIP, TraceEvent, TraceFilter,
    },
};
use cdn_tests::{
    packets::{Flow, Tcp, Vlan, frame, ip_packet, steering_frame},
    scenario::{
        BUDGET, CLIENT_V4, CLIENT_V6, SELF_ID, STEER_PORT, Scenario, UNDERLAY_V4, UNDERLAY_V6,
        VIP_V4, VIP_V6, addr, member_addr,
    },
    xdp,
};
use cdn_user::dataplane::{TraceReader, monotonic_ns};

/// The interface BPF_PROG_TEST_RUN runs on (loopback), which is also the interface of the
/// scenario's next hops: forwarded packets leave with XDP_TX.
const TEST_RUN_IFINDEX: u32 = 1;

fn bytes16(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => {
            let mut b = [0; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    }
}

/// The event of a packet of `flow` that the program left unencapsulated.
fn plain_event(flow: &Flow, tcp_flags: u8, reason: Reason, action: Action) -> TraceEvent {
    TraceEvent {
        src: bytes16(flow.src),
        dst: bytes16(flow.dst),
        ifindex: TEST_RUN_IFINDEX,
        src_port: flow.sport,
        dst_port: flow.dport,
        target: NO_MEMBER,
        steer_hops: [NO_MEMBER; 2],
        reason: reason as u8,
        action: action as u8,
        proto: flow.proto(),
        tcp_flags,
        flags: TRACE_EV_FLOW | if flow.is_v6() { TRACE_EV_V6 } else { 0 },
        ..TraceEvent::default()
    }
}

/// The event of a packet of `flow` that leaves (or arrived) inside a steering header.
fn steered_event(
    flow: &Flow,
    reason: Reason,
    action: Action,
    target: u16,
    underlay: (IpAddr, IpAddr),
    budget: u8,
    hops: [u16; 2],
) -> TraceEvent {
    let mut e = plain_event(flow, TCP_ACK, reason, action);
    e.target = target;
    e.flags |= TRACE_EV_STEERED
        | if underlay.0.is_ipv6() {
            TRACE_EV_UNDERLAY_V6
        } else {
            0
        };
    e.underlay_src = bytes16(underlay.0);
    e.underlay_dst = bytes16(underlay.1);
    e.steer_budget = budget;
    e.steer_hops = hops;
    e
}

const TCP_ACK: u8 = 0x10;
const TCP_SYN: u8 = 0x02;

/// One packet, the verdict it must get, and the event it must produce when traced.
struct Case {
    name: &'static str,
    input: Vec<u8>,
    action: u32,
    reason: Reason,
    event: TraceEvent,
}

fn underlay_of(member: u16) -> IpAddr {
    if member_addr(member).is_ipv6() {
        addr(UNDERLAY_V6)
    } else {
        addr(UNDERLAY_V4)
    }
}

/// Every kind of decision: forwarded (IPv4 and IPv6 underlay), local accept, non-VIP pass,
/// a port-miss drop, a spoofed steering packet (dropped as it came), and a pass-on of a
/// steering packet (re-encapsulated for the next hop).
fn cases(s: &mut Scenario) -> Result<Vec<Case>> {
    let mut cases = Vec::new();
    for (client, vip, member, rest) in [(CLIENT_V4, VIP_V4, 2, 4), (CLIENT_V6, VIP_V6, 3, 5)] {
        let fwd = Flow::tcp(client, 40001, vip, 443);
        s.set_hops(&fwd, &[member, rest])?;
        cases.push(Case {
            name: "forwarded",
            input: frame(&fwd, Tcp::ACK, Vlan::None, b"data"),
            action: xdp::TX,
            reason: Reason::Forwarded,
            event: steered_event(
                &fwd,
                Reason::Forwarded,
                Action::Tx,
                member,
                (underlay_of(member), member_addr(member)),
                BUDGET,
                [rest, NO_MEMBER],
            ),
        });
    }
    let local = Flow::tcp(CLIENT_V4, 40002, VIP_V4, 443);
    ensure!(
        s.bucket_index(&local) != s.bucket_index(&Flow::tcp(CLIENT_V4, 40001, VIP_V4, 443)),
        "the local flow needs a bucket of its own"
    );
    s.set_hops(&local, &[SELF_ID, 2])?;
    cases.push(Case {
        name: "local accept",
        input: frame(&local, Tcp::SYN, Vlan::Single(7), b""),
        action: xdp::PASS,
        reason: Reason::LocalAccept,
        event: plain_event(&local, TCP_SYN, Reason::LocalAccept, Action::Pass),
    });
    let non_vip = Flow::udp(CLIENT_V6, 5000, "2001:db8:1::1", 53);
    cases.push(Case {
        name: "non-VIP pass",
        input: frame(&non_vip, Tcp::ACK, Vlan::None, b"q"),
        action: xdp::PASS,
        reason: Reason::NonVipPass,
        event: plain_event(&non_vip, 0, Reason::NonVipPass, Action::Pass),
    });
    let miss = Flow::tcp(CLIENT_V4, 40003, VIP_V4, 8080);
    cases.push(Case {
        name: "port-miss drop",
        input: frame(&miss, Tcp::ACK, Vlan::None, b""),
        action: xdp::DROP,
        reason: Reason::PortMiss,
        event: plain_event(&miss, TCP_ACK, Reason::PortMiss, Action::Drop),
    });
    let steered = Flow::tcp(CLIENT_V4, 40004, VIP_V4, 443);
    let inner = frame(&steered, Tcp::ACK, Vlan::None, b"x");
    let stranger = addr("10.0.0.99");
    cases.push(Case {
        name: "spoofed steering packet",
        input: steering_frame(
            stranger,
            addr(UNDERLAY_V4),
            STEER_PORT,
            2,
            &[4],
            ip_packet(&inner, Vlan::None),
        )?,
        action: xdp::DROP,
        reason: Reason::Spoofed,
        event: steered_event(
            &steered,
            Reason::Spoofed,
            Action::Drop,
            NO_MEMBER,
            (stranger, addr(UNDERLAY_V4)),
            2,
            [4, NO_MEMBER],
        ),
    });
    cases.push(Case {
        name: "pass-on",
        input: steering_frame(
            member_addr(2),
            addr(UNDERLAY_V4),
            STEER_PORT,
            2,
            &[4, 0],
            ip_packet(&inner, Vlan::None),
        )?,
        action: xdp::TX,
        reason: Reason::PassedOn,
        event: steered_event(
            &steered,
            Reason::PassedOn,
            Action::Tx,
            4,
            (addr(UNDERLAY_V4), member_addr(4)),
            1,
            [0, NO_MEMBER],
        ),
    });
    Ok(cases)
}

/// Runs `case`, checks its verdict, and returns the events it produced.
fn run(s: &mut Scenario, reader: &mut TraceReader, case: &Case) -> Result<Vec<TraceEvent>> {
    let before = monotonic_ns();
    let run = s.run(&case.input)?;
    let after = monotonic_ns();
    ensure!(
        (run.action, run.verdict()) == (case.action, case.reason),
        "{}: got {:?} {:?}",
        case.name,
        run.action,
        run.counted
    );
    let mut events = Vec::new();
    while let Some(mut e) = reader.next_event() {
        ensure!(
            (before..=after).contains(&e.time_ns),
            "{}: event time {} outside the run ({before}..{after})",
            case.name,
            e.time_ns
        );
        e.time_ns = 0;
        events.push(e);
    }
    Ok(events)
}

fn set_tracing(s: &mut Scenario, on: bool) -> Result<()> {
    s.update_config(|c| {
        if on {
            c.flags |= NODE_TRACE;
        } else {
            c.flags &= !NODE_TRACE;
        }
    })
}

fn v4_filter_addr(a: &str) -> [u8; 16] {
    bytes16(addr(a))
}

#[test]
fn traced_packets_report_their_decision_and_filters_select_them() -> Result<()> {
    let mut s = Scenario::new()?;
    let mut reader = s.dp.take_trace_reader().context("the trace reader")?;
    let cases = cases(&mut s)?;

    // Tracing off (filter open): nothing, whatever the packet.
    s.dp.set_trace_filter(&TraceFilter::default())?;
    for case in &cases {
        let events = run(&mut s, &mut reader, case)?;
        ensure!(events.is_empty(), "{}: traced while off", case.name);
    }

    // On, open filter: one exact event per packet.
    set_tracing(&mut s, true)?;
    for case in &cases {
        let events = run(&mut s, &mut reader, case)?;
        assert_eq!(events, vec![case.event], "{}", case.name);
    }

    // A filter that matches nothing: a VIP no packet goes to, and a reason no packet gets.
    for nothing in [
        TraceFilter {
            vip: v4_filter_addr("192.0.2.99"),
            fields: TRACE_MATCH_VIP,
            ..TraceFilter::default()
        },
        TraceFilter {
            reasons: 1 << Reason::TooBig as u32,
            ..TraceFilter::default()
        },
    ] {
        s.dp.set_trace_filter(&nothing)?;
        for case in &cases {
            let events = run(&mut s, &mut reader, case)?;
            ensure!(
                events.is_empty(),
                "{}: {nothing:?} let it through",
                case.name
            );
        }
    }

    // Each filter field selects exactly the packets it names.
    let only = |filter: TraceFilter| -> Result<Vec<&'static str>> {
        s.dp.set_trace_filter(&filter)?;
        let mut traced = Vec::new();
        for case in &cases {
            let events = run(&mut s, &mut reader, case)?;
            if !events.is_empty() {
                assert_eq!(events, vec![case.event], "{}", case.name);
                traced.push(case.name);
            }
        }
        Ok(traced)
    };
    // A filter closure borrows the scenario: run them one after another.
    let selections = [
        (
            TraceFilter {
                vip: v4_filter_addr(VIP_V4),
                port: 443,
                fields: TRACE_MATCH_VIP | TRACE_MATCH_PORT,
                ..TraceFilter::default()
            },
            vec![
                "forwarded",
                "local accept",
                "spoofed steering packet",
                "pass-on",
            ],
        ),
        (
            TraceFilter {
                client: bytes16(addr(CLIENT_V6)),
                fields: TRACE_MATCH_CLIENT | TRACE_MATCH_V6,
                ..TraceFilter::default()
            },
            vec!["forwarded", "non-VIP pass"],
        ),
        (
            TraceFilter {
                port: 8080,
                fields: TRACE_MATCH_PORT,
                ..TraceFilter::default()
            },
            vec!["port-miss drop"],
        ),
        (
            TraceFilter {
                reasons: 1 << Reason::PortMiss as u32 | 1 << Reason::Spoofed as u32,
                ..TraceFilter::default()
            },
            vec!["port-miss drop", "spoofed steering packet"],
        ),
    ];
    let mut only = only;
    for (filter, expected) in selections {
        assert_eq!(only(filter)?, expected, "{filter:?}");
    }

    // Off again: nothing.
    set_tracing(&mut s, false)?;
    s.dp.set_trace_filter(&TraceFilter::default())?;
    for case in &cases {
        let events = run(&mut s, &mut reader, case)?;
        ensure!(events.is_empty(), "{}: traced after turning off", case.name);
    }
    ensure!(s.dp.trace_lost()? == 0, "no event lost");
    Ok(())
}

/// A ring the reader does not keep up with loses events, and every lost event is counted:
/// events read plus events lost is exactly the packets traced.
#[test]
fn a_full_ring_counts_what_it_loses() -> Result<()> {
    let mut s = Scenario::new()?;
    let mut reader = s.dp.take_trace_reader().context("the trace reader")?;
    s.dp.set_trace_filter(&TraceFilter::default())?;
    set_tracing(&mut s, true)?;
    // More events than the ring holds (about 4,600 of 104 bytes plus the ring's 8-byte
    // headers), from a packet the program leaves untouched, so that every repetition of
    // the test run sees the same frame.
    let packets = 6000;
    let frame = frame(
        &Flow::tcp(CLIENT_V4, 1, "203.0.113.1", 443),
        Tcp::ACK,
        Vlan::None,
        b"",
    );
    let lost_before = s.dp.trace_lost()?;
    let (action, _) =
        s.dp.time_run(cdn_common::maps::PROGRAM_NAME, &frame, packets)?;
    ensure!(action == xdp::PASS);
    let mut read = 0u64;
    while reader.next_event().is_some() {
        read += 1;
    }
    let lost = s.dp.trace_lost()? - lost_before;
    ensure!(lost > 0 && read > 4000, "read {read}, lost {lost}");
    assert_eq!(read + lost, u64::from(packets));
    Ok(())
}
