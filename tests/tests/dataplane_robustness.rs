//! Hostile input: every truncation of valid packets, and a corpus of randomly mutated packets.
//! An independent parser (etherparse) is the oracle: whatever it parses as a well-formed packet
//! for a service must be forwarded, byte-exact; nothing else may ever be forwarded; and every
//! packet gets exactly one verdict.

use anyhow::{Result, ensure};
use cdn_common::maps::Bucket;
use cdn_common::{counters::Reason, wire::entropy_port};
use cdn_tests::{
    packets::{
        ExpectedEncap, Flow, NODE_MAC, Tcp, Vlan, expected_encap, frame, icmp_too_big, ip_packet,
        steering_frame,
    },
    scenario::{
        BUDGET, CLIENT_V4, CLIENT_V6, KEY, STEER_PORT, Scenario, TABLE_SIZE, UNDERLAY_V4,
        UNDERLAY_V6, VIP_V4, VIP_V6, addr, member_addr, member_mac,
    },
    xdp,
};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// Every bucket of both services forwards to member 2, with member 4 as previous owner.
fn scenario() -> Result<Scenario> {
    let mut s = Scenario::new()?;
    let all = vec![
        Bucket {
            hops: [2, 4, cdn_common::maps::NO_MEMBER],
            _pad: 0,
        };
        (2 * TABLE_SIZE) as usize
    ];
    s.dp.write_buckets(0, &all)?;
    Ok(s)
}

fn valid_packets() -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for vlan in Vlan::ALL {
        for f in [
            Flow::tcp(CLIENT_V4, 1234, VIP_V4, 443),
            Flow::tcp(CLIENT_V6, 1234, VIP_V6, 80),
            Flow::udp(CLIENT_V4, 1234, VIP_V4, 443),
            Flow::udp(CLIENT_V6, 1234, VIP_V6, 443),
        ] {
            out.push(frame(&f, Tcp::ACK, vlan, b"0123456789abcdef"));
        }
        out.push(icmp_too_big(
            &Flow::tcp(CLIENT_V4, 1234, VIP_V4, 443),
            addr("203.0.113.1"),
            vlan,
        ));
        out.push(icmp_too_big(
            &Flow::tcp(CLIENT_V6, 1234, VIP_V6, 443),
            addr("2001:db8:1::1"),
            vlan,
        ));
    }
    let inner = frame(
        &Flow::tcp(CLIENT_V4, 1, VIP_V4, 443),
        Tcp::SYN,
        Vlan::None,
        &[],
    );
    let inner6 = frame(
        &Flow::tcp(CLIENT_V6, 1, VIP_V6, 443),
        Tcp::SYN,
        Vlan::None,
        &[],
    );
    out.push(steering_frame(
        member_addr(2),
        addr(UNDERLAY_V4),
        STEER_PORT,
        2,
        &[4],
        ip_packet(&inner, Vlan::None),
    )?);
    out.push(steering_frame(
        member_addr(3),
        addr(UNDERLAY_V6),
        STEER_PORT,
        2,
        &[],
        ip_packet(&inner6, Vlan::None),
    )?);
    Ok(out)
}

#[test]
fn every_truncation_of_a_valid_packet_is_dropped_as_malformed() -> Result<()> {
    let mut s = scenario()?;
    let mut runs = 0;
    for pkt in valid_packets()? {
        let full = s.run(&pkt)?;
        ensure!(
            full.action != xdp::DROP,
            "the untruncated packet must not be dropped"
        );
        // BPF_PROG_TEST_RUN needs at least an Ethernet header.
        for len in 14..pkt.len() {
            let run = s.run(&pkt[..len])?;
            ensure!(
                run.action == xdp::DROP && run.verdict() == Reason::Malformed,
                "truncated to {len} of {}: action {} verdict {:?}",
                pkt.len(),
                run.action,
                run.counted
            );
            runs += 1;
        }
    }
    ensure!(runs > 1000, "too few truncations tested: {runs}");
    Ok(())
}

/// What the oracle makes of a frame.
enum Oracle {
    /// A well-formed TCP/UDP packet to a service port of a VIP: must be forwarded.
    Forward { flow: Flow, ip: Vec<u8> },
    /// Anything else.
    Other,
}

fn vip_prefix(a: std::net::IpAddr) -> bool {
    match a {
        std::net::IpAddr::V4(v) => v.octets()[..3] == [192, 0, 2],
        std::net::IpAddr::V6(v) => v.segments()[..4] == [0x2001, 0x0db8, 0, 0],
    }
}

fn oracle(frame: &[u8]) -> Oracle {
    let Ok(p) = SlicedPacket::from_ethernet(frame) else {
        return Oracle::Other;
    };
    let Some(net) = &p.net else {
        return Oracle::Other;
    };
    // Where the IP header starts: after Ethernet and up to two VLAN tags.
    let mut start = 14;
    while start < 22
        && matches!(
            u16::from_be_bytes([frame[start - 2], frame[start - 1]]),
            0x8100 | 0x88a8 | 0x9100
        )
    {
        start += 4;
    }
    let (src, dst, total) = match net {
        NetSlice::Ipv4(v4) => {
            let h = v4.header();
            if h.is_fragmenting_payload() || v4.extensions().auth.is_some() {
                return Oracle::Other;
            }
            (
                std::net::IpAddr::V4(h.source_addr()),
                std::net::IpAddr::V4(h.destination_addr()),
                usize::from(h.total_len()),
            )
        }
        NetSlice::Ipv6(v6) => {
            let h = v6.header();
            // A zero payload length is only valid for jumbograms (with a hop-by-hop option);
            // etherparse reads it as "to the end of the frame", Linux as an empty packet.
            if h.payload_length() == 0
                || v6.is_payload_fragmented()
                || v6.extensions().first_header().is_some()
            {
                // Extension headers: the program walks a bounded chain; keep the oracle simple.
                return Oracle::Other;
            }
            (
                std::net::IpAddr::V6(h.source_addr()),
                std::net::IpAddr::V6(h.destination_addr()),
                40 + usize::from(h.payload_length()),
            )
        }
        _ => return Oracle::Other,
    };
    let Some(ip) = frame.get(start..start + total) else {
        return Oracle::Other;
    };
    if !vip_prefix(dst) {
        return Oracle::Other;
    }
    let (sport, dport, udp) = match &p.transport {
        Some(TransportSlice::Tcp(t)) => (t.source_port(), t.destination_port(), false),
        // Linux drops UDP whose length field is below the header size (etherparse reads a
        // zero length as "up to the end of the IP payload").
        Some(TransportSlice::Udp(u)) if u.length() >= 8 => {
            (u.source_port(), u.destination_port(), true)
        }
        _ => return Oracle::Other,
    };
    // The scenario's services: TCP 80 and 443, UDP 443.
    if !(dport == 443 || (dport == 80 && !udp)) {
        return Oracle::Other;
    }
    Oracle::Forward {
        flow: Flow {
            src,
            dst,
            sport,
            dport,
            udp,
        },
        ip: ip.to_vec(),
    }
}

#[test]
fn mutated_packets_never_get_a_wrong_verdict() -> Result<()> {
    let mut s = scenario()?;
    let mut rng = StdRng::seed_from_u64(0xc0ffee);
    let corpus = valid_packets()?;
    let (mut forwarded, mut checked) = (0, 0);
    for round in 0..12_000 {
        let mut pkt = corpus[round % corpus.len()].clone();
        for _ in 0..rng.random_range(1..=3) {
            let i = rng.random_range(0..pkt.len());
            pkt[i] = match rng.random_range(0..3) {
                0 => rng.random(),
                1 => pkt[i] ^ (1 << rng.random_range(0..8)),
                _ => [0, 0xff, 0x40, 0x45, 0x60, 6, 17, 44][rng.random_range(0..8)],
            };
        }
        let run = s.run(&pkt)?;
        let verdict = run.verdict();
        checked += 1;
        match oracle(&pkt) {
            Oracle::Forward { flow, ip } => {
                ensure!(
                    run.action == xdp::TX && verdict == Reason::Forwarded,
                    "round {round}: well-formed {flow:?} got action {} {verdict:?}\n{pkt:02x?}",
                    run.action
                );
                let expected = expected_encap(&ExpectedEncap {
                    dst_mac: member_mac(2),
                    src_mac: NODE_MAC,
                    outer_src: addr(UNDERLAY_V4),
                    outer_dst: member_addr(2),
                    entropy: entropy_port(flow.hash(&KEY)),
                    steer_port: STEER_PORT,
                    budget: BUDGET,
                    hops: &[4],
                    inner: &ip,
                })?;
                ensure!(
                    run.out == expected,
                    "round {round}: wrong encapsulation of {flow:?}\nin  {pkt:02x?}\nout {:02x?}\nexp {expected:02x?}",
                    run.out
                );
                forwarded += 1;
            }
            Oracle::Other => match run.action {
                xdp::PASS => ensure!(
                    run.out == pkt
                        || matches!(
                            verdict,
                            Reason::OwnerAccept
                                | Reason::LastHopAccept
                                | Reason::RedirectedSynAccept
                        ),
                    "round {round}: passed packet was modified ({verdict:?})"
                ),
                xdp::DROP => ensure!(
                    !matches!(
                        verdict,
                        Reason::Forwarded | Reason::NonVipPass | Reason::LocalAccept
                    ),
                    "round {round}: drop counted as {verdict:?}"
                ),
                // Forwarding what the oracle rejects is allowed only for what the program
                // deliberately does not check (ICMP errors are steered by their quoted packet).
                xdp::TX => ensure!(
                    matches!(
                        verdict,
                        Reason::IcmpForwarded | Reason::PassedOn | Reason::SynRedirect
                    ),
                    "round {round}: forwarded a packet the oracle rejects ({verdict:?})\n{pkt:02x?}"
                ),
                other => anyhow::bail!("round {round}: unexpected action {other}"),
            },
        }
    }
    ensure!(
        forwarded > 1000,
        "too few mutants stayed forwardable: {forwarded}/{checked}"
    );
    Ok(())
}
