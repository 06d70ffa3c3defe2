//! Without a fresh next-hop entry the program asks the kernel's FIB. A resolved neighbour gives
//! a redirect with the FIB's MACs; an unresolved one hands the encapsulated packet to the kernel
//! (addressed to our own MAC so the stack routes it) instead of dropping it.

use anyhow::Result;
use cdn_common::{counters::Reason, maps::Link, wire::entropy_port};
use cdn_tests::{
    netns::Netns,
    packets::{ExpectedEncap, Flow, NODE_MAC, Tcp, Vlan, expected_encap, frame, ip_packet},
    scenario::{
        BUDGET, CLIENT_V4, KEY, STEER_PORT, Scenario, UNDERLAY_V4, UNDERLAY_V6, VIP_V4, addr,
        member_addr,
    },
    xdp,
};

const NEIGH_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x22, 0x22];

fn mac_of(ns: &Netns, dev: &str) -> Result<[u8; 6]> {
    let text = ns.sh(&format!("cat /sys/class/net/{dev}/address"))?;
    let mut mac = [0u8; 6];
    for (slot, part) in mac.iter_mut().zip(text.trim().split(':')) {
        *slot = u8::from_str_radix(part, 16)?;
    }
    Ok(mac)
}

/// A namespace with a veth whose neighbours 10.0.0.2 (member 2) and fd00::3 (member 3) are
/// resolved; member 4 (10.0.0.4) has no neighbour entry. Returns v0's MAC and ifindex.
fn lab() -> Result<(Netns, [u8; 6], u32)> {
    let ns = Netns::new("fib")?;
    ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"])?;
    ns.ip(&["link", "set", "v0", "up"])?;
    ns.ip(&["link", "set", "v1", "up"])?;
    ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "v0"])?;
    ns.ip(&["addr", "add", "fd00::1/64", "dev", "v0", "nodad"])?;
    ns.sh("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1")?;
    // Member 2 (10.0.0.2) and member 3 (fd00::3) have resolved neighbours; member 4 has none.
    for (a, dev) in [("10.0.0.2", "v0"), ("fd00::3", "v0")] {
        ns.ip(&[
            "neigh",
            "replace",
            a,
            "lladdr",
            "02:00:00:00:22:22",
            "dev",
            dev,
            "nud",
            "permanent",
        ])?;
    }
    let v0_mac = mac_of(&ns, "v0")?;
    let v0_index: u32 = ns.sh("cat /sys/class/net/v0/ifindex")?.trim().parse()?;
    Ok((ns, v0_mac, v0_index))
}

#[test]
fn fib_fallback_redirects_when_resolved_and_hands_to_the_kernel_when_not() -> Result<()> {
    let (ns, v0_mac, v0_index) = lab()?;
    ns.enter(|| -> Result<()> {
        let mut s = Scenario::new()?;
        for id in [2, 3, 4] {
            s.dp.clear_next_hop(id)?;
        }
        let f = Flow::tcp(CLIENT_V4, 40000, VIP_V4, 443);
        let input = frame(&f, Tcp::ACK, Vlan::None, b"payload");
        let inner = ip_packet(&input, Vlan::None);

        for (target, underlay) in [(2u16, UNDERLAY_V4), (3, UNDERLAY_V6)] {
            s.set_hops(&f, &[target])?;
            let run = s.run(&input)?;
            assert_eq!(
                (run.action, run.verdict()),
                (xdp::REDIRECT, Reason::Forwarded)
            );
            assert_eq!(run.counted(Reason::FibLookup), 1);
            assert_eq!(run.counted(Reason::FibMiss), 0);
            let expected = expected_encap(&ExpectedEncap {
                dst_mac: NEIGH_MAC,
                src_mac: v0_mac,
                outer_src: addr(underlay),
                outer_dst: member_addr(target),
                entropy: entropy_port(f.hash(&KEY)),
                steer_port: STEER_PORT,
                budget: BUDGET,
                hops: &[],
                inner,
            })?;
            assert_eq!(
                run.out, expected,
                "member {target} via v0 (ifindex {v0_index})"
            );
        }

        s.set_hops(&f, &[4])?;
        let run = s.run(&input)?;
        assert_eq!((run.action, run.verdict()), (xdp::PASS, Reason::Forwarded));
        assert_eq!(run.counted(Reason::FibMiss), 1);
        let expected = expected_encap(&ExpectedEncap {
            dst_mac: NODE_MAC,
            src_mac: NODE_MAC,
            outer_src: addr(UNDERLAY_V4),
            outer_dst: member_addr(4),
            entropy: entropy_port(f.hash(&KEY)),
            steer_port: STEER_PORT,
            budget: BUDGET,
            hops: &[],
            inner,
        })?;
        assert_eq!(
            run.out, expected,
            "unresolved: the kernel gets the encapsulated packet"
        );

        // A valid next-hop entry wins over the FIB.
        s.dp.set_next_hop(
            4,
            &Link {
                dst_mac: [2, 0, 0, 0, 0x44, 0x44],
                src_mac: v0_mac,
                ifindex: v0_index,
            },
        )?;
        let run = s.run(&input)?;
        assert_eq!(
            (run.action, run.verdict()),
            (xdp::REDIRECT, Reason::Forwarded)
        );
        assert_eq!(run.counted(Reason::FibLookup), 0);
        assert_eq!(&run.out[..6], &[2, 0, 0, 0, 0x44, 0x44]);
        Ok(())
    })?
}

/// The program reads no clock: a next hop stays in use until the controller changes it. What
/// the controller invalidates (an unresolved neighbour, a member's new address, a node address
/// it no longer has) must fall back to the FIB or the kernel at once, never go out with the
/// MACs or addresses of the old entry.
#[test]
fn invalidated_next_hops_fall_back_and_never_use_stale_macs() -> Result<()> {
    const STALE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x5e, 0x5e];
    let (ns, v0_mac, v0_index) = lab()?;
    ns.enter(|| -> Result<()> {
        let mut s = Scenario::new()?;
        let f = Flow::tcp(CLIENT_V4, 40000, VIP_V4, 443);
        let input = frame(&f, Tcp::ACK, Vlan::None, b"payload");
        let inner = ip_packet(&input, Vlan::None);
        let expected = |dst_mac, src_mac, outer_src: &str, target| {
            expected_encap(&ExpectedEncap {
                dst_mac,
                src_mac,
                outer_src: addr(outer_src),
                outer_dst: member_addr(target),
                entropy: entropy_port(f.hash(&KEY)),
                steer_port: STEER_PORT,
                budget: BUDGET,
                hops: &[],
                inner,
            })
        };
        let stale = Link {
            ifindex: v0_index,
            dst_mac: STALE_MAC,
            src_mac: v0_mac,
        };

        // A valid entry is used as it is, whatever the neighbour table says by now.
        s.set_hops(&f, &[2])?;
        s.dp.set_next_hop(2, &stale)?;
        let run = s.run(&input)?;
        assert_eq!(
            (run.action, run.verdict()),
            (xdp::REDIRECT, Reason::Forwarded)
        );
        assert_eq!(run.counted(Reason::FibLookup), 0);
        assert_eq!(run.out, expected(STALE_MAC, v0_mac, UNDERLAY_V4, 2)?);

        // Invalidated (the neighbour could not be resolved): the FIB's MAC, not the old one.
        s.dp.clear_next_hop(2)?;
        assert!(!s.dp.next_hop(2)?.is_valid());
        let run = s.run(&input)?;
        assert_eq!(
            (run.action, run.verdict()),
            (xdp::REDIRECT, Reason::Forwarded)
        );
        assert_eq!(run.counted(Reason::FibLookup), 1);
        assert_eq!(run.out, expected(NEIGH_MAC, v0_mac, UNDERLAY_V4, 2)?);

        // Unresolved in the FIB as well: the kernel gets it, still never the stale MAC.
        s.set_hops(&f, &[4])?;
        s.dp.clear_next_hop(4)?;
        let run = s.run(&input)?;
        assert_eq!((run.action, run.verdict()), (xdp::PASS, Reason::Forwarded));
        assert_eq!(run.counted(Reason::FibMiss), 1);
        assert_eq!(run.out, expected(NODE_MAC, NODE_MAC, UNDERLAY_V4, 4)?);

        // A member that moves to another address: its entry, resolved for the old one, stops
        // being used until the controller resolves the new one; packets go to the new address.
        s.set_hops(&f, &[2])?;
        s.dp.set_next_hop(2, &stale)?;
        s.dp.set_member(2, Some(addr("10.0.0.4")))?;
        assert!(!s.dp.next_hop(2)?.is_valid());
        let run = s.run(&input)?;
        assert_eq!((run.action, run.verdict()), (xdp::PASS, Reason::Forwarded));
        assert_eq!(run.counted(Reason::FibMiss), 1, "10.0.0.4 has no neighbour");
        assert_eq!(&run.out[30..34], &[10, 0, 0, 4]);
        s.dp.set_member(2, Some(member_addr(2)))?;

        // The node's own address changes: entries are rebuilt with the new source address.
        s.dp.set_next_hop(2, &stale)?;
        s.update_config(|c| c.underlay_v4 = [10, 0, 0, 9])?;
        let run = s.run(&input)?;
        assert_eq!(run.counted(Reason::FibLookup), 0);
        assert_eq!(run.out, expected(STALE_MAC, v0_mac, "10.0.0.9", 2)?);
        // ... and invalidated if the node has no address of the member's family any more:
        // the packet is dropped as before templates, not sent from the old address.
        s.update_config(|c| c.underlay_v4 = [0; 4])?;
        assert!(!s.dp.next_hop(2)?.is_valid());
        let run = s.run(&input)?;
        assert_eq!((run.action, run.verdict()), (xdp::DROP, Reason::NoRoute));
        Ok(())
    })?
}
