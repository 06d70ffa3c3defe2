//! The kernel and userspace compute the same flow hash: on 10,000 random flows the bucket the
//! XDP program picks (seen through the member it encapsulates to) and the entropy port it
//! writes both match what `cdn_common::hash` computes in userspace.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Result, ensure};
use cdn_common::{
    maps::{
        Bucket, Link, NO_MEMBER, NODE_READY, NodeConfig, SERVICE_ALL_PORTS, SERVICE_TCP,
        SERVICE_UDP, Service,
    },
    wire::entropy_port,
};
use cdn_tests::{
    packets::{Flow, NODE_MAC, Tcp, Vlan, frame},
    xdp,
};
use cdn_user::dataplane::{DataPlane, LoadOptions};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// One member per bucket, so the member a packet goes to names its bucket.
const BUCKETS: u32 = 1021;
const FLOWS: usize = 10_000;

fn member_ip(id: u16) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, (id >> 8) as u8, id as u8)
}

#[test]
fn kernel_and_userspace_hash_agree_on_10000_random_flows() -> Result<()> {
    let key = [0x9e37_79b9_7f4a_7c15, 0xbf58_476d_1ce4_e5b9];
    let mut dp = DataPlane::load(&LoadOptions {
        table_entries: 2 * BUCKETS,
        pin_dir: None,
    })?;
    let mut table = Vec::new();
    for id in 0..BUCKETS as u16 {
        dp.set_member(id, Some(IpAddr::V4(member_ip(id))))?;
        dp.set_next_hop(
            id,
            &Link {
                dst_mac: [2, 0, 0, 0, 0, 2],
                src_mac: NODE_MAC,
                ifindex: 1,
            },
        )?;
        table.push(Bucket {
            hops: [id, NO_MEMBER, NO_MEMBER],
            _pad: 0,
        });
    }
    dp.write_buckets(0, &table)?;
    dp.write_buckets(BUCKETS, &table)?;
    let service = |offset| Service {
        table_offset: offset,
        table_size: BUCKETS,
        flags: SERVICE_TCP | SERVICE_UDP | SERVICE_ALL_PORTS,
        tcp_ports: [0; 8],
        udp_ports: [0; 8],
        generation: 1,
        ..Service::default()
    };
    dp.set_service("192.0.2.0".parse()?, 24, &service(0))?;
    dp.set_service("2001:db8::".parse()?, 64, &service(BUCKETS))?;
    dp.write_config(&NodeConfig {
        hash_key: key,
        underlay_v4: [10, 0, 0, 1],
        steer_port: 6080,
        self_member: 1023,
        flags: NODE_READY,
        hop_budget: 3,
        ..NodeConfig::default()
    })?;

    let mut rng = StdRng::seed_from_u64(0x5eed);
    for i in 0..FLOWS {
        let v6 = rng.random_bool(0.5);
        let (src, dst) = if v6 {
            let mut vip = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            rng.fill(&mut vip[8..]);
            let client = Ipv6Addr::from(rng.random::<u128>() | (0x2000 << 112));
            (IpAddr::V6(client), IpAddr::V6(Ipv6Addr::from(vip)))
        } else {
            let client = Ipv4Addr::from(rng.random::<u32>() | 0x0100_0000);
            (
                IpAddr::V4(client),
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, rng.random())),
            )
        };
        let flow = Flow {
            src,
            dst,
            sport: rng.random_range(1..=u16::MAX),
            dport: rng.random_range(1..=u16::MAX),
            udp: rng.random_bool(0.3),
        };
        let input = frame(&flow, Tcp::ACK, Vlan::None, b"x");
        let (action, out) = dp.test_run(&input)?;
        ensure!(action == xdp::TX, "flow {i} {flow:?}: action {action}");
        let outer_dst = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        let bucket = u32::from(outer_dst.octets()[2]) << 8 | u32::from(outer_dst.octets()[3]);
        let sport = u16::from_be_bytes([out[34], out[35]]);
        let hash = flow.hash(&key);
        ensure!(
            bucket == (hash % u64::from(BUCKETS)) as u32,
            "flow {i} {flow:?}: kernel bucket {bucket}, userspace {}",
            hash % u64::from(BUCKETS)
        );
        ensure!(
            sport == entropy_port(hash),
            "flow {i} {flow:?}: kernel entropy {sport:#x}, userspace {:#x}",
            entropy_port(hash)
        );
    }
    Ok(())
}

#[test]
fn userspace_hash_depends_on_every_field() -> Result<()> {
    let key = [1, 2];
    let base = Flow::tcp("198.51.100.1", 1000, "192.0.2.1", 443);
    let variants = [
        Flow::tcp("198.51.100.2", 1000, "192.0.2.1", 443),
        Flow::tcp("198.51.100.1", 1001, "192.0.2.1", 443),
        Flow::tcp("198.51.100.1", 1000, "192.0.2.2", 443),
        Flow::tcp("198.51.100.1", 1000, "192.0.2.1", 444),
        Flow::udp("198.51.100.1", 1000, "192.0.2.1", 443),
    ];
    for v in variants {
        ensure!(
            v.hash(&key) != base.hash(&key),
            "{v:?} hashes like {base:?}"
        );
    }
    let swapped = Flow::tcp("192.0.2.1", 443, "198.51.100.1", 1000);
    ensure!(
        swapped.hash(&key) != base.hash(&key),
        "direction must matter"
    );
    Ok(())
}
