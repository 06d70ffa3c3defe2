//! Steering trust (README "Steering trust"), with real frames through BPF_PROG_TEST_RUN:
//! steering packets only on underlay interfaces, inner packets checked like direct ones, the
//! hop budget capped, redirected SYNs never redirected again (two data planes whose tables
//! disagree hand a SYN back and forth at most once), and the optional per-packet MAC.

use std::net::IpAddr;

use anyhow::{Context as _, Result, ensure};
use cdn_common::{
    counters::Reason,
    maps::{NODE_DRAINING, NODE_UNDERLAY_IFACES},
    wire::{STEER_SYN_REDIRECTED, STEER_VERSION, STEER_VERSION_AUTH},
};
use cdn_tests::{
    difftest::run_frame,
    model::auth,
    netns::Netns,
    packets::{
        Flow, Tcp, Vlan, decapsulated, frame, ip_packet, signed_steering_frame, steering_frame,
    },
    scenario::{
        BUDGET, CLIENT_V4, KEY, SELF_ID, STEER_PORT, Scenario, UNDERLAY_V4, VIP_V4, addr,
        member_addr, member_link,
    },
    xdp,
};
use etherparse::PacketBuilder;

/// Offset of the steering header in an untagged frame with an IPv4 underlay.
const SH: usize = 14 + 20 + 8;

/// What one frame did: the action, the frame left behind and the verdict counted.
struct Out {
    action: u32,
    frame: Vec<u8>,
    reason: Reason,
}

/// Runs `frame` as if it arrived on `ifindex`.
fn run_on(s: &mut Scenario, frame: &[u8], ifindex: u32) -> Result<Out> {
    let before = s.dp.counters()?;
    let mut buf = vec![0u8; 4096];
    let (action, len) = run_frame(&mut s.dp, frame, ifindex, &mut buf)?;
    let moved: Vec<_> = s.dp.counters()?.moved_since(&before).collect();
    let verdicts: Vec<_> = moved.iter().filter(|(r, _, _)| r.is_verdict()).collect();
    ensure!(verdicts.len() == 1, "one verdict per frame: {moved:?}");
    buf.truncate(len);
    Ok(Out {
        action,
        frame: buf,
        reason: verdicts[0].0,
    })
}

/// Runs `frame` arriving on `lo` (ifindex 1, where the scenario's next hops point).
fn run(s: &mut Scenario, frame: &[u8]) -> Result<Out> {
    run_on(s, frame, 1)
}

#[track_caller]
fn assert_verdict(out: &Out, action: u32, reason: Reason) {
    assert_eq!(
        (out.action, out.reason),
        (action, reason),
        "expected {reason:?}, frame left: {:02x?}",
        out.frame
    );
}

/// A namespace with an underlay and an uplink interface (veth pairs, up).
fn lab() -> Result<(Netns, u32, u32)> {
    let ns = Netns::new("trust")?;
    ns.ip_batch(
        "link add ul0 type veth peer name ul1\nlink add up0 type veth peer name up1\n\
         link set ul0 up\nlink set ul1 up\nlink set up0 up\nlink set up1 up\n",
    )?;
    let (underlay, uplink) = (ns.ifindex("ul0")?, ns.ifindex("up0")?);
    Ok((ns, underlay, uplink))
}

/// The IP packet of a TCP segment of `flow`.
fn tcp_packet(flow: &Flow, tcp: Tcp) -> Vec<u8> {
    ip_packet(&frame(flow, tcp, Vlan::None, &[0u8; 16]), Vlan::None).to_vec()
}

/// A steering frame from member `from` to this node (member 1) with `budget` and `hops`.
fn steered(from: u16, budget: u8, hops: &[u16], inner: &[u8]) -> Result<Vec<u8>> {
    steering_frame(
        member_addr(from),
        addr(UNDERLAY_V4),
        STEER_PORT,
        budget,
        hops,
        inner,
    )
}

fn client_flow(sport: u16, dport: u16) -> Flow {
    Flow::tcp(CLIENT_V4, sport, VIP_V4, dport)
}

#[test]
fn steering_is_accepted_only_on_underlay_interfaces() -> Result<()> {
    let (ns, underlay, uplink) = lab()?;
    ns.enter(|| -> Result<()> {
        let mut s = Scenario::new()?;
        let flow = client_flow(40001, 443);
        s.set_hops(&flow, &[SELF_ID])?;
        let inner = tcp_packet(&flow, Tcp::ACK);
        let forged = steered(2, 2, &[], &inner)?;
        // No list: every interface is trusted (the outer source alone vouches).
        let out = run_on(&mut s, &forged, uplink)?;
        assert_verdict(&out, xdp::PASS, Reason::LastHopAccept);
        s.dp.set_underlay_ifaces(&[underlay])?;
        s.update_config(|c| c.flags |= NODE_UNDERLAY_IFACES)?;
        let out = run_on(&mut s, &forged, uplink)?;
        assert_verdict(&out, xdp::DROP, Reason::NotUnderlay);
        let out = run_on(&mut s, &forged, underlay)?;
        assert_verdict(&out, xdp::PASS, Reason::LastHopAccept);
        assert_eq!(out.frame, decapsulated(&inner));
        // Dropped before the member check: a non-member source on the uplink says so too.
        let stranger = steering_frame(
            addr("203.0.113.9"),
            addr(UNDERLAY_V4),
            STEER_PORT,
            2,
            &[],
            &inner,
        )?;
        assert_verdict(
            &run_on(&mut s, &stranger, uplink)?,
            xdp::DROP,
            Reason::NotUnderlay,
        );
        assert_verdict(
            &run_on(&mut s, &stranger, underlay)?,
            xdp::DROP,
            Reason::Spoofed,
        );
        // Client traffic is not steering: the uplink still takes it.
        let direct = frame(&flow, Tcp::ACK, Vlan::None, &[0u8; 16]);
        let out = run_on(&mut s, &direct, uplink)?;
        assert_verdict(&out, xdp::PASS, Reason::LastHopAccept);
        Ok(())
    })?
}

#[test]
fn inner_packets_get_the_checks_of_direct_ones() -> Result<()> {
    let (ns, _, _) = lab()?;
    ns.enter(|| -> Result<()> {
        let mut s = Scenario::new()?;
        let vip: std::net::Ipv4Addr = VIP_V4.parse()?;
        let client: std::net::Ipv4Addr = CLIENT_V4.parse()?;
        let mut echo = Vec::new();
        PacketBuilder::ipv4(client.octets(), vip.octets(), 64)
            .icmpv4_echo_request(7, 1)
            .write(&mut echo, &[0u8; 8])?;
        let udp53 = Flow::udp(CLIENT_V4, 5353, VIP_V4, 53);
        let cases = [
            (
                "SYN to an unserved port",
                tcp_packet(&client_flow(40002, 8080), Tcp::SYN),
                Reason::PortMiss,
            ),
            (
                "SYN to BIRD's port",
                tcp_packet(&client_flow(40003, 179), Tcp::SYN),
                Reason::PortMiss,
            ),
            ("ICMP echo", echo, Reason::BadEncap),
            (
                "UDP to port 53",
                tcp_packet(&udp53, Tcp::ACK),
                Reason::PortMiss,
            ),
        ];
        for (what, inner, reason) in cases {
            let out = run(&mut s, &steered(2, 2, &[], &inner)?)?;
            assert_eq!(
                (out.action, out.reason),
                (xdp::DROP, reason),
                "inner {what}"
            );
        }
        // The same SYN to a served port is taken: this node's table names it the owner.
        let served = client_flow(40004, 443);
        s.set_hops(&served, &[SELF_ID])?;
        let inner = tcp_packet(&served, Tcp::SYN);
        let out = run(&mut s, &steered(2, 2, &[], &inner)?)?;
        assert_verdict(&out, xdp::PASS, Reason::OwnerAccept);
        assert_eq!(out.frame, decapsulated(&inner));
        Ok(())
    })?
}

#[test]
fn a_forged_budget_is_capped_at_the_local_one() -> Result<()> {
    let (ns, _, _) = lab()?;
    ns.enter(|| -> Result<()> {
        let mut s = Scenario::new()?;
        // No socket here: passed on to member 4 with the local budget less one, not 254.
        let flow = client_flow(40005, 443);
        let inner = tcp_packet(&flow, Tcp::ACK);
        let out = run(&mut s, &steered(2, 255, &[4], &inner)?)?;
        assert_verdict(&out, xdp::TX, Reason::PassedOn);
        assert_eq!(
            out.frame[SH..SH + 8],
            [STEER_VERSION, 0, BUDGET - 1, 0, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(&out.frame[SH + 8..], inner.as_slice());
        Ok(())
    })?
}

/// `frame` with `flags` set in its (version-1) steering header.
fn with_flags(mut frame: Vec<u8>, flags: u8) -> Vec<u8> {
    frame[SH + 1] |= flags;
    frame
}

#[test]
fn a_redirected_syn_is_accepted_and_never_redirected_again() -> Result<()> {
    let (ns, _, _) = lab()?;
    ns.enter(|| -> Result<()> {
        let mut s = Scenario::new()?;
        let flow = client_flow(40006, 443);
        // This node's own table names member 2 as the owner.
        s.set_hops(&flow, &[2])?;
        let inner = tcp_packet(&flow, Tcp::SYN);
        // Unmarked: redirected to 2, and the redirect is marked.
        let out = run(&mut s, &steered(4, 2, &[], &inner)?)?;
        assert_verdict(&out, xdp::TX, Reason::SynRedirect);
        assert_eq!(
            out.frame[SH..SH + 4],
            [STEER_VERSION, STEER_SYN_REDIRECTED, 1, 0]
        );
        // Marked: accepted here, whatever the table says, even with no budget left.
        for budget in [2, 0] {
            let marked = with_flags(steered(4, budget, &[], &inner)?, STEER_SYN_REDIRECTED);
            let out = run(&mut s, &marked)?;
            assert_verdict(&out, xdp::PASS, Reason::RedirectedSynAccept);
            assert_eq!(out.frame, decapsulated(&inner));
        }
        // Draining: passed on along the hops it carries (mark kept), never back to the sender.
        s.update_config(|c| c.flags |= NODE_DRAINING)?;
        let marked = with_flags(steered(2, 2, &[4], &inner)?, STEER_SYN_REDIRECTED);
        let out = run(&mut s, &marked)?;
        assert_verdict(&out, xdp::TX, Reason::DrainPassOn);
        assert_eq!(
            out.frame[SH..SH + 8],
            [
                STEER_VERSION,
                STEER_SYN_REDIRECTED,
                1,
                0,
                0xff,
                0xff,
                0xff,
                0xff
            ]
        );
        let back = with_flags(steered(4, 2, &[4], &inner)?, STEER_SYN_REDIRECTED);
        let out = run(&mut s, &back)?;
        assert_verdict(&out, xdp::PASS, Reason::RedirectedSynAccept);
        Ok(())
    })?
}

/// Makes `s` member 2 (underlay 10.0.0.2), with a next hop to member 1.
fn become_member_2(s: &mut Scenario) -> Result<()> {
    let IpAddr::V4(own) = member_addr(2) else {
        anyhow::bail!("member 2 has an IPv4 underlay");
    };
    s.update_config(|c| {
        c.self_member = 2;
        c.underlay_v4 = own.octets();
    })?;
    s.dp.set_next_hop(1, &member_link(1))?;
    Ok(())
}

#[test]
fn disagreeing_tables_never_drop_a_syn() -> Result<()> {
    let (ns, _, _) = lab()?;
    ns.enter(|| -> Result<()> {
        for auth_on in [false, true] {
            // Issue #12, item 4: node 1 gives itself weight 0, node 2 too, so each table
            // names the other as the owner of the same buckets.
            let mut node1 = Scenario::new()?;
            let mut node2 = Scenario::new()?;
            become_member_2(&mut node2)?;
            node1.set_steer_auth(auth_on)?;
            node2.set_steer_auth(auth_on)?;
            for sport in 41000..41020 {
                let flow = client_flow(sport, 443);
                node1.set_hops(&flow, &[2, 1])?;
                node2.set_hops(&flow, &[1, 2])?;
                let syn = frame(&flow, Tcp::SYN, Vlan::None, &[0u8; 16]);
                let mut path = Vec::new();
                let mut at_node1 = true;
                let mut packet = syn.clone();
                let accepted = loop {
                    let node = if at_node1 { &mut node1 } else { &mut node2 };
                    let out = run(node, &packet)?;
                    path.push(out.reason);
                    ensure!(out.action != xdp::DROP, "SYN dropped after {path:?}");
                    if out.action == xdp::PASS {
                        break out;
                    }
                    ensure!(path.len() < 4, "SYN still bouncing after {path:?}");
                    packet = out.frame;
                    at_node1 = !at_node1;
                };
                assert_eq!(
                    path,
                    [
                        Reason::Forwarded,
                        Reason::SynRedirect,
                        Reason::RedirectedSynAccept
                    ],
                    "steer_auth {auth_on}"
                );
                assert!(
                    at_node1,
                    "accepted by node 1, the owner node 2's table names"
                );
                assert_eq!(accepted.frame[12..], syn[12..]);
            }
        }
        Ok(())
    })?
}

#[test]
fn the_mac_is_checked_on_every_steering_packet() -> Result<()> {
    let (ns, _, _) = lab()?;
    ns.enter(|| -> Result<()> {
        let mut s = Scenario::new()?;
        let key = auth::derive_key(KEY);
        let flow = client_flow(40007, 443);
        s.set_hops(&flow, &[SELF_ID])?;
        let inner = tcp_packet(&flow, Tcp::ACK);
        let plain = steered(2, 2, &[4], &inner)?;
        // Member 4 is a previous owner: without a socket here the packet would go on, so
        // accept it as the last hop instead to see the decapsulated frame.
        let last = steered(2, 2, &[], &inner)?;
        let good = signed_steering_frame(&last, 0, key, &flow);
        assert_eq!(good[SH], STEER_VERSION_AUTH);

        // Off: version 1 as before, and a valid version 2 is accepted too.
        assert_verdict(&run(&mut s, &last)?, xdp::PASS, Reason::LastHopAccept);
        let out = run(&mut s, &good)?;
        assert_verdict(&out, xdp::PASS, Reason::LastHopAccept);
        assert_eq!(out.frame, decapsulated(&inner));

        s.set_steer_auth(true)?;
        assert_verdict(&run(&mut s, &plain)?, xdp::DROP, Reason::AuthFailed);
        let out = run(&mut s, &good)?;
        assert_verdict(&out, xdp::PASS, Reason::LastHopAccept);
        assert_eq!(out.frame, decapsulated(&inner));

        let wrong_key = signed_steering_frame(&last, 0, auth::derive_key([1, 2]), &flow);
        let mut flipped_mac = good.clone();
        flipped_mac[SH + 12] ^= 0x40;
        // Replays with a hop field changed: more budget, another hop, a forged mark.
        let mut more_budget = good.clone();
        more_budget[SH + 2] = 3;
        let mut other_hop = signed_steering_frame(&plain, 0, key, &flow);
        other_hop[SH + 5] = 5;
        let mut marked = good.clone();
        marked[SH + 1] |= STEER_SYN_REDIRECTED;
        // Another client in the inner packet (its checksum is not the program's business).
        let mut other_client = good.clone();
        other_client[SH + 16 + 15] ^= 1;
        for (what, frame) in [
            ("wrong key", wrong_key),
            ("flipped MAC byte", flipped_mac),
            ("budget raised", more_budget),
            ("hop changed", other_hop),
            ("mark added", marked),
            ("client changed", other_client),
        ] {
            let out = run(&mut s, &frame)?;
            assert_eq!(
                (out.action, out.reason),
                (xdp::DROP, Reason::AuthFailed),
                "{what}"
            );
        }
        // What this node sends carries a MAC the reference model accepts.
        let out = run(&mut s, &signed_steering_frame(&plain, 0, key, &flow))?;
        assert_verdict(&out, xdp::TX, Reason::PassedOn);
        let sh = &out.frame[SH..SH + 16];
        // Budget 2 received (under the local 3), 1 left.
        assert_eq!(sh[..4], [STEER_VERSION_AUTH, 0, 1, 0]);
        let want = auth::mac(
            key,
            &auth::Signed {
                outer_src: addr(UNDERLAY_V4),
                client: flow.src,
                vip: flow.dst,
                sport: flow.sport,
                dport: flow.dport,
                proto: 6,
                flags: 0,
                budget: 1,
                hop_count: 0,
                hops: [u16::MAX; 2],
                search: false,
            },
        );
        assert_eq!(sh[8..], want.to_le_bytes());
        assert_eq!(&out.frame[SH + 16..], inner.as_slice());
        Ok(())
    })
    .context("in the namespace")?
}
