//! Every verdict of the XDP program, for IPv4 and IPv6, with and without VLAN tags, run with
//! BPF_PROG_TEST_RUN; the frames that come out are compared byte for byte with frames built
//! independently by etherparse.

use anyhow::Result;
use cdn_common::{counters::Reason, maps::NODE_DRAINING, wire::entropy_port};
use cdn_tests::{
    packets::{
        ExpectedEncap, Flow, NODE_MAC, Tcp, Vlan, decapsulated, expected_encap, frame,
        icmp_too_big, ip_packet, steering_frame,
    },
    scenario::{
        BUDGET, CLIENT_V4, CLIENT_V6, KEY, SELF_ID, STEER_PORT, Scenario, UNDERLAY_V4, UNDERLAY_V6,
        VIP_V4, VIP_V6, addr, member_addr, member_mac,
    },
    xdp,
};

fn flows() -> [Flow; 2] {
    [
        Flow::tcp(CLIENT_V4, 40001, VIP_V4, 443),
        Flow::tcp(CLIENT_V6, 40001, VIP_V6, 443),
    ]
}

fn underlay_for(target: u16) -> std::net::IpAddr {
    if member_addr(target).is_ipv6() {
        addr(UNDERLAY_V6)
    } else {
        addr(UNDERLAY_V4)
    }
}

#[test]
fn non_vip_traffic_passes_untouched() -> Result<()> {
    let mut s = Scenario::new()?;
    for vlan in Vlan::ALL {
        for f in [
            Flow::tcp(CLIENT_V4, 5555, "203.0.113.1", 443),
            Flow::tcp(CLIENT_V6, 5555, "2001:db8:1::1", 443),
            // Our own underlay address, but not the steering port.
            Flow::udp("10.0.0.2", 5555, UNDERLAY_V4, 53),
        ] {
            let input = frame(&f, Tcp::ACK, vlan, b"hello");
            let run = s.run(&input)?;
            assert_eq!(run.action, xdp::PASS, "{f:?} {vlan:?}");
            assert_eq!(run.out, input, "non-VIP packet modified");
            assert_eq!(run.verdict(), Reason::NonVipPass);
        }
    }
    // Not IP at all (ARP).
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 9, 0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    let run = s.run(&arp)?;
    assert_eq!((run.action, run.verdict()), (xdp::PASS, Reason::NonVipPass));
    assert_eq!(run.out, arp);
    Ok(())
}

#[test]
fn nothing_is_steered_before_the_controller_marks_the_config_ready() -> Result<()> {
    let mut s = Scenario::new()?;
    s.update_config(|c| c.flags = 0)?;
    let f = flows()[0];
    s.set_hops(&f, &[2])?;
    let input = frame(&f, Tcp::ACK, Vlan::None, b"x");
    let run = s.run(&input)?;
    assert_eq!((run.action, run.verdict()), (xdp::PASS, Reason::NotReady));
    assert_eq!(run.out, input);
    Ok(())
}

#[test]
fn ingress_forwards_to_the_first_hop_with_the_rest_of_the_history() -> Result<()> {
    let mut s = Scenario::new()?;
    for f in flows() {
        // Targets in both underlay families: 2 is IPv4, 3 is IPv6.
        for (target, rest) in [(2u16, vec![4u16, 0]), (3, vec![5]), (4, vec![])] {
            let mut hop_list = vec![target];
            hop_list.extend(&rest);
            s.set_hops(&f, &hop_list)?;
            for vlan in Vlan::ALL {
                let payload = vec![0xabu8; 300];
                let input = frame(&f, Tcp::ACK, vlan, &payload);
                let before = s.dp.member_stats(target)?;
                let run = s.run(&input)?;
                assert_eq!(run.action, xdp::TX, "{f:?} -> {target} {vlan:?}");
                assert_eq!(run.verdict(), Reason::Forwarded);
                let expected = expected_encap(&ExpectedEncap {
                    dst_mac: member_mac(target),
                    src_mac: NODE_MAC,
                    outer_src: underlay_for(target),
                    outer_dst: member_addr(target),
                    entropy: entropy_port(f.hash(&KEY)),
                    steer_port: STEER_PORT,
                    budget: BUDGET,
                    hops: &rest,
                    inner: ip_packet(&input, vlan),
                })?;
                assert_eq!(run.out, expected, "{f:?} -> {target} {vlan:?}");
                let after = s.dp.member_stats(target)?;
                assert_eq!(after.packets - before.packets, 1);
                assert_eq!(after.bytes - before.bytes, expected.len() as u64);
            }
        }
    }
    Ok(())
}

#[test]
fn ingress_accepts_locally_when_this_node_owns_new_connections() -> Result<()> {
    let mut s = Scenario::new()?;
    for f in flows() {
        s.set_hops(&f, &[SELF_ID, 2])?;
        for vlan in Vlan::ALL {
            let input = frame(&f, Tcp::SYN, vlan, &[]);
            let run = s.run(&input)?;
            assert_eq!(
                (run.action, run.verdict()),
                (xdp::PASS, Reason::LocalAccept)
            );
            assert_eq!(
                run.out, input,
                "accepted packets go to the stack unmodified"
            );
        }
    }
    Ok(())
}

#[test]
fn ingress_passes_flows_it_does_not_hold_to_the_previous_owner() -> Result<()> {
    let mut s = Scenario::new()?;
    for f in flows() {
        s.set_hops(&f, &[SELF_ID, 2, 4])?;
        for vlan in Vlan::ALL {
            // An ACK of a connection this node has no socket for.
            let input = frame(&f, Tcp::ACK, vlan, b"data");
            let run = s.run(&input)?;
            assert_eq!((run.action, run.verdict()), (xdp::TX, Reason::PassedOn));
            let expected = expected_encap(&ExpectedEncap {
                dst_mac: member_mac(2),
                src_mac: NODE_MAC,
                outer_src: addr(UNDERLAY_V4),
                outer_dst: member_addr(2),
                entropy: entropy_port(f.hash(&KEY)),
                steer_port: STEER_PORT,
                budget: BUDGET - 1,
                hops: &[4],
                inner: ip_packet(&input, vlan),
            })?;
            assert_eq!(run.out, expected);
        }
        // Without a previous owner the node is the last hop and accepts.
        s.set_hops(&f, &[SELF_ID])?;
        let input = frame(&f, Tcp::ACK, Vlan::None, b"data");
        let run = s.run(&input)?;
        assert_eq!(
            (run.action, run.verdict()),
            (xdp::PASS, Reason::LastHopAccept)
        );
        assert_eq!(run.out, input);
    }
    Ok(())
}

#[test]
fn a_draining_node_passes_new_connections_on_but_takes_them_as_last_hop() -> Result<()> {
    let mut s = Scenario::new()?;
    s.update_config(|c| c.flags |= NODE_DRAINING)?;
    for f in flows() {
        s.set_hops(&f, &[SELF_ID, 2])?;
        let input = frame(&f, Tcp::SYN, Vlan::None, &[]);
        let run = s.run(&input)?;
        assert_eq!((run.action, run.verdict()), (xdp::TX, Reason::DrainPassOn));
        let expected = expected_encap(&ExpectedEncap {
            dst_mac: member_mac(2),
            src_mac: NODE_MAC,
            outer_src: addr(UNDERLAY_V4),
            outer_dst: member_addr(2),
            entropy: entropy_port(f.hash(&KEY)),
            steer_port: STEER_PORT,
            budget: BUDGET - 1,
            hops: &[],
            inner: ip_packet(&input, Vlan::None),
        })?;
        assert_eq!(run.out, expected);

        s.set_hops(&f, &[SELF_ID])?;
        let run = s.run(&input)?;
        assert_eq!(
            (run.action, run.verdict()),
            (xdp::PASS, Reason::LocalAccept)
        );
    }
    Ok(())
}

#[test]
fn vip_traffic_outside_the_service_is_dropped() -> Result<()> {
    let mut s = Scenario::new()?;
    for (src, vip) in [(CLIENT_V4, VIP_V4), (CLIENT_V6, VIP_V6)] {
        let f = Flow::tcp(src, 1234, vip, 22);
        s.set_hops(&f, &[2])?;
        let run = s.run(&frame(&f, Tcp::SYN, Vlan::None, &[]))?;
        assert_eq!((run.action, run.verdict()), (xdp::DROP, Reason::PortMiss));
        let f = Flow::udp(src, 1234, vip, 53);
        s.set_hops(&f, &[2])?;
        let run = s.run(&frame(&f, Tcp::SYN, Vlan::None, b"q"))?;
        assert_eq!((run.action, run.verdict()), (xdp::DROP, Reason::PortMiss));
        // Port 80 is served over TCP only.
        let f = Flow::udp(src, 1234, vip, 80);
        s.set_hops(&f, &[2])?;
        let run = s.run(&frame(&f, Tcp::SYN, Vlan::None, b"q"))?;
        assert_eq!((run.action, run.verdict()), (xdp::DROP, Reason::PortMiss));
    }
    Ok(())
}

#[test]
fn empty_buckets_drop_rather_than_guess() -> Result<()> {
    let mut s = Scenario::new()?;
    for f in flows() {
        s.set_hops(&f, &[])?;
        let run = s.run(&frame(&f, Tcp::ACK, Vlan::None, b"x"))?;
        assert_eq!((run.action, run.verdict()), (xdp::DROP, Reason::NoRoute));
    }
    Ok(())
}

#[test]
fn udp_flows_are_steered_like_tcp() -> Result<()> {
    let mut s = Scenario::new()?;
    for (src, vip) in [(CLIENT_V4, VIP_V4), (CLIENT_V6, VIP_V6)] {
        let f = Flow::udp(src, 5353, vip, 443);
        s.set_hops(&f, &[4, 2])?;
        let input = frame(&f, Tcp::ACK, Vlan::Single(7), b"quic initial");
        let run = s.run(&input)?;
        assert_eq!((run.action, run.verdict()), (xdp::TX, Reason::Forwarded));
        let expected = expected_encap(&ExpectedEncap {
            dst_mac: member_mac(4),
            src_mac: NODE_MAC,
            outer_src: addr(UNDERLAY_V4),
            outer_dst: member_addr(4),
            entropy: entropy_port(f.hash(&KEY)),
            steer_port: STEER_PORT,
            budget: BUDGET,
            hops: &[2],
            inner: ip_packet(&input, Vlan::Single(7)),
        })?;
        assert_eq!(run.out, expected);
    }
    Ok(())
}

#[test]
fn icmp_errors_reach_the_owner_of_the_flow_they_quote() -> Result<()> {
    let mut s = Scenario::new()?;
    for (f, router) in [
        (flows()[0], "203.0.113.254"),
        (flows()[1], "2001:db8:ffff::fe"),
    ] {
        // The error is about the flow client -> VIP: it must hash exactly like that flow.
        s.set_hops(&f, &[3, 2])?;
        for vlan in Vlan::ALL {
            let input = icmp_too_big(&f, addr(router), vlan);
            let run = s.run(&input)?;
            assert_eq!(
                (run.action, run.verdict()),
                (xdp::TX, Reason::IcmpForwarded),
                "{vlan:?}"
            );
            let expected = expected_encap(&ExpectedEncap {
                dst_mac: member_mac(3),
                src_mac: NODE_MAC,
                outer_src: addr(UNDERLAY_V6),
                outer_dst: member_addr(3),
                entropy: entropy_port(f.hash(&KEY)),
                steer_port: STEER_PORT,
                budget: BUDGET,
                hops: &[2],
                inner: ip_packet(&input, vlan),
            })?;
            assert_eq!(run.out, expected);
        }
    }
    Ok(())
}

#[test]
fn echo_to_a_vip_is_answered_locally() -> Result<()> {
    let mut s = Scenario::new()?;
    let mut v4 = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 9], NODE_MAC)
        .ipv4(
            addr(CLIENT_V4)
                .to_canonical()
                .to_string()
                .parse::<std::net::Ipv4Addr>()?
                .octets(),
            VIP_V4.parse::<std::net::Ipv4Addr>()?.octets(),
            64,
        )
        .icmpv4_echo_request(1, 1)
        .write(&mut v4, b"ping")?;
    let mut v6 = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 9], NODE_MAC)
        .ipv6(
            CLIENT_V6.parse::<std::net::Ipv6Addr>()?.octets(),
            VIP_V6.parse::<std::net::Ipv6Addr>()?.octets(),
            64,
        )
        .icmpv6_echo_request(1, 1)
        .write(&mut v6, b"ping")?;
    for input in [v4, v6] {
        let run = s.run(&input)?;
        assert_eq!((run.action, run.verdict()), (xdp::PASS, Reason::IcmpLocal));
        assert_eq!(run.out, input);
    }
    Ok(())
}

#[test]
fn owner_path_accepts_new_connections_and_decapsulates() -> Result<()> {
    let mut s = Scenario::new()?;
    for f in flows() {
        let inner_frame = frame(&f, Tcp::SYN, Vlan::None, &[]);
        let inner = ip_packet(&inner_frame, Vlan::None);
        for (member, underlay) in [(2u16, UNDERLAY_V4), (3, UNDERLAY_V6)] {
            let input = steering_frame(
                member_addr(member),
                addr(underlay),
                STEER_PORT,
                2,
                &[4],
                inner,
            )?;
            let run = s.run(&input)?;
            assert_eq!(
                (run.action, run.verdict()),
                (xdp::PASS, Reason::OwnerAccept)
            );
            assert_eq!(run.out, decapsulated(inner));
        }
    }
    Ok(())
}

#[test]
fn new_connections_are_taken_only_by_the_owner_in_this_nodes_own_table() -> Result<()> {
    let mut s = Scenario::new()?;
    for f in flows() {
        let inner_frame = frame(&f, Tcp::SYN, Vlan::None, &[]);
        let inner = ip_packet(&inner_frame, Vlan::None);
        let input = steering_frame(
            member_addr(2),
            addr(UNDERLAY_V4),
            STEER_PORT,
            2,
            &[4],
            inner,
        )?;
        // Our table says member 5 owns the flow (4 before it): the SYN goes there, whatever
        // the sender's table said.
        s.set_hops(&f, &[5, 4])?;
        let run = s.run(&input)?;
        assert_eq!((run.action, run.verdict()), (xdp::TX, Reason::SynRedirect));
        let expected = expected_encap(&ExpectedEncap {
            dst_mac: member_mac(5),
            src_mac: NODE_MAC,
            outer_src: addr(UNDERLAY_V6),
            outer_dst: member_addr(5),
            entropy: 0xc123,
            steer_port: STEER_PORT,
            budget: 1,
            hops: &[4],
            inner,
        })?;
        assert_eq!(run.out, expected);
        // Our table agrees that we own it: accepted.
        s.set_hops(&f, &[SELF_ID, 4])?;
        let run = s.run(&input)?;
        assert_eq!(
            (run.action, run.verdict()),
            (xdp::PASS, Reason::OwnerAccept)
        );
        // Disagreement with no budget left: dropped (the client retries the SYN).
        s.set_hops(&f, &[5])?;
        let input = steering_frame(
            member_addr(2),
            addr(UNDERLAY_V4),
            STEER_PORT,
            0,
            &[4],
            inner,
        )?;
        let run = s.run(&input)?;
        assert_eq!((run.action, run.verdict()), (xdp::DROP, Reason::LoopGuard));
    }
    Ok(())
}

#[test]
fn owner_path_passes_on_what_it_does_not_hold_and_the_last_hop_accepts() -> Result<()> {
    let mut s = Scenario::new()?;
    for f in flows() {
        let inner_frame = frame(&f, Tcp::ACK, Vlan::None, b"more data");
        let inner = ip_packet(&inner_frame, Vlan::None);
        // Remaining hops [5, 4]: passed on to 5 (IPv6 underlay) carrying [4].
        let input = steering_frame(
            member_addr(2),
            addr(UNDERLAY_V4),
            STEER_PORT,
            2,
            &[5, 4],
            inner,
        )?;
        let run = s.run(&input)?;
        assert_eq!((run.action, run.verdict()), (xdp::TX, Reason::PassedOn));
        let expected = expected_encap(&ExpectedEncap {
            dst_mac: member_mac(5),
            src_mac: NODE_MAC,
            outer_src: addr(UNDERLAY_V6),
            outer_dst: member_addr(5),
            // The entropy the first node chose travels on unchanged.
            entropy: 0xc123,
            steer_port: STEER_PORT,
            budget: 1,
            hops: &[4],
            inner,
        })?;
        assert_eq!(run.out, expected);

        // No hop left: accept.
        let input = steering_frame(member_addr(2), addr(UNDERLAY_V4), STEER_PORT, 2, &[], inner)?;
        let run = s.run(&input)?;
        assert_eq!(
            (run.action, run.verdict()),
            (xdp::PASS, Reason::LastHopAccept)
        );
        assert_eq!(run.out, decapsulated(inner));

        // A hop left but no budget: the loop guard drops.
        let input = steering_frame(
            member_addr(2),
            addr(UNDERLAY_V4),
            STEER_PORT,
            0,
            &[4],
            inner,
        )?;
        let run = s.run(&input)?;
        assert_eq!((run.action, run.verdict()), (xdp::DROP, Reason::LoopGuard));
    }
    Ok(())
}

#[test]
fn owner_path_rejects_strangers_bad_headers_and_foreign_inner_packets() -> Result<()> {
    let mut s = Scenario::new()?;
    let f = flows()[0];
    let inner_frame = frame(&f, Tcp::SYN, Vlan::None, &[]);
    let inner = ip_packet(&inner_frame, Vlan::None);

    // Not a member: no open relay.
    let input = steering_frame(
        addr("10.9.9.9"),
        addr(UNDERLAY_V4),
        STEER_PORT,
        2,
        &[],
        inner,
    )?;
    let run = s.run(&input)?;
    assert_eq!((run.action, run.verdict()), (xdp::DROP, Reason::Spoofed));

    // Unknown version.
    let mut input = steering_frame(member_addr(2), addr(UNDERLAY_V4), STEER_PORT, 2, &[], inner)?;
    input[14 + 20 + 8] = 9;
    let run = s.run(&input)?;
    assert_eq!((run.action, run.verdict()), (xdp::DROP, Reason::BadEncap));

    // More hops than the header can hold.
    let mut input = steering_frame(member_addr(2), addr(UNDERLAY_V4), STEER_PORT, 2, &[], inner)?;
    input[14 + 20 + 8 + 3] = 3;
    let run = s.run(&input)?;
    assert_eq!((run.action, run.verdict()), (xdp::DROP, Reason::BadEncap));

    // An inner packet that is not for a VIP is never delivered.
    let other = frame(
        &Flow::tcp(CLIENT_V4, 1, "203.0.113.9", 80),
        Tcp::SYN,
        Vlan::None,
        &[],
    );
    let input = steering_frame(
        member_addr(2),
        addr(UNDERLAY_V4),
        STEER_PORT,
        2,
        &[],
        ip_packet(&other, Vlan::None),
    )?;
    let run = s.run(&input)?;
    assert_eq!((run.action, run.verdict()), (xdp::DROP, Reason::BadEncap));
    Ok(())
}

#[test]
fn fragments_to_a_vip_are_dropped_and_counted() -> Result<()> {
    let mut s = Scenario::new()?;
    let f = flows()[0];
    s.set_hops(&f, &[2])?;
    let mut input = frame(&f, Tcp::ACK, Vlan::None, b"data");
    // Set more-fragments and fix the IPv4 header checksum.
    input[14 + 6] |= 0x20;
    fix_ipv4_checksum(&mut input[14..34]);
    let run = s.run(&input)?;
    assert_eq!((run.action, run.verdict()), (xdp::DROP, Reason::Fragment));

    // IPv6: a fragment header in front of TCP.
    let f6 = flows()[1];
    let plain = frame(&f6, Tcp::ACK, Vlan::None, b"data");
    // Offset 0 with more-fragments set, identification 7.
    let with_frag = insert_ipv6_ext(&plain, 44, &[0, 1, 0, 0, 0, 7]);
    let run = s.run(&with_frag)?;
    assert_eq!((run.action, run.verdict()), (xdp::DROP, Reason::Fragment));
    Ok(())
}

#[test]
fn ipv6_extension_headers_are_walked() -> Result<()> {
    let mut s = Scenario::new()?;
    let f = flows()[1];
    s.set_hops(&f, &[2])?;
    let plain = frame(&f, Tcp::ACK, Vlan::None, b"data");
    // Hop-by-hop options (PadN) and destination options before TCP.
    let once = insert_ipv6_ext(&plain, 60, &[1, 4, 0, 0, 0, 0]);
    let twice = insert_ipv6_ext(&once, 0, &[1, 4, 0, 0, 0, 0]);
    let run = s.run(&twice)?;
    assert_eq!((run.action, run.verdict()), (xdp::TX, Reason::Forwarded));
    let expected = expected_encap(&ExpectedEncap {
        dst_mac: member_mac(2),
        src_mac: NODE_MAC,
        outer_src: addr(UNDERLAY_V4),
        outer_dst: member_addr(2),
        entropy: entropy_port(f.hash(&KEY)),
        steer_port: STEER_PORT,
        budget: BUDGET,
        hops: &[],
        inner: &twice[14..],
    })?;
    assert_eq!(run.out, expected);

    // A chain longer than the program walks is not steered.
    let mut long = twice.clone();
    for _ in 0..3 {
        long = insert_ipv6_ext(&long, 60, &[1, 4, 0, 0, 0, 0]);
    }
    let run = s.run(&long)?;
    assert_eq!(
        (run.action, run.verdict()),
        (xdp::DROP, Reason::Unsupported)
    );
    Ok(())
}

#[test]
fn unknown_protocols_to_a_vip_are_dropped() -> Result<()> {
    let mut s = Scenario::new()?;
    let f = flows()[0];
    let mut input = frame(&f, Tcp::ACK, Vlan::None, b"data");
    input[14 + 9] = 47; // GRE
    fix_ipv4_checksum(&mut input[14..34]);
    let run = s.run(&input)?;
    assert_eq!(
        (run.action, run.verdict()),
        (xdp::DROP, Reason::Unsupported)
    );
    Ok(())
}

#[test]
fn frames_too_big_for_the_underlay_are_dropped_not_truncated() -> Result<()> {
    let mut s = Scenario::new()?;
    let f = flows()[0];
    s.set_hops(&f, &[2])?;
    let input = frame(&f, Tcp::ACK, Vlan::None, &[7u8; 1000]);
    let encapsulated_len = (input.len() - 14 + 50) as u32;
    s.update_config(|c| c.max_frame = encapsulated_len - 1)?;
    let run = s.run(&input)?;
    assert_eq!((run.action, run.verdict()), (xdp::DROP, Reason::TooBig));
    s.update_config(|c| c.max_frame = encapsulated_len)?;
    let run = s.run(&input)?;
    assert_eq!((run.action, run.verdict()), (xdp::TX, Reason::Forwarded));
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
