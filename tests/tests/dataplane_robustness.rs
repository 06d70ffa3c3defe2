//! Hostile input: every truncation of valid packets, and a corpus of randomly mutated packets.
//! An independent parser (etherparse) is the oracle: whatever it parses as a well-formed packet
//! for a service must be forwarded, byte-exact; nothing else may ever be forwarded; and every
//! packet gets exactly one verdict.

use anyhow::{Result, ensure};
use cdn_common::maps::Bucket;
use cdn_common::quic_lb::QuicLbConfig;
use cdn_common::{counters::Reason, wire::entropy_port};
use cdn_tests::{
    packets::{
        ExpectedEncap, Flow, NODE_MAC, QUIC_V1, QUIC_V2, Tcp, Vlan, expected_encap, frame,
        icmp_too_big, ip_packet, quic_cid, quic_cid_entropy, quic_initial, quic_long,
        quic_long_first, quic_short, steering_frame,
    },
    scenario::{
        BUDGET, CLIENT_V4, CLIENT_V6, KEY, SELF_ID, STEER_PORT, Scenario, TABLE_SIZE, UNDERLAY_V4,
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
                                | Reason::SearchAccept
                                | Reason::SearchExhausted
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
                        Reason::IcmpForwarded
                            | Reason::PassedOn
                            | Reason::SynRedirect
                            | Reason::SearchStart
                            | Reason::SearchPassOn
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

/// The QUIC configuration of [`mutated_quic_packets_never_get_a_wrong_verdict`]: UDP 443 of
/// both services is QUIC; server ID [`QUIC_THERE`] is member 4's, [`QUIC_HERE`] this node's.
const QUIC: QuicLbConfig = QuicLbConfig {
    config_id: 1,
    server_id_len: 2,
    cid_len: 8,
};
const QUIC_HERE: u32 = 0x0101;
const QUIC_THERE: u32 = 0x0104;

/// What the QUIC oracle expects of a well-formed UDP packet to VIP:443.
#[derive(Debug, PartialEq)]
enum QuicWant {
    /// Encapsulated to `member` with no further hop; `cid`: with the CID path's entropy.
    Forward {
        member: u16,
        cid: Option<Vec<u8>>,
        reason: Reason,
    },
    /// Accepted here untouched.
    Accept(Reason),
    Drop(Reason),
}

/// An independent reading of the README's QUIC rules, from the UDP payload alone. Every
/// bucket names member 2 (see [`scenario`]).
fn quic_oracle(payload: &[u8]) -> QuicWant {
    let by_hash = QuicWant::Forward {
        member: 2,
        cid: None,
        reason: Reason::QuicHashForwarded,
    };
    let Some(&first) = payload.first() else {
        return QuicWant::Drop(Reason::QuicTruncated);
    };
    let cid_len = usize::from(QUIC.cid_len);
    let dcid = if first & 0x80 == 0 {
        match payload.get(1..1 + cid_len) {
            Some(d) => d,
            None => return QuicWant::Drop(Reason::QuicTruncated),
        }
    } else {
        if payload.len() < 6 {
            return QuicWant::Drop(Reason::QuicTruncated);
        }
        let version = u32::from_be_bytes([payload[1], payload[2], payload[3], payload[4]]);
        let dcid_len = usize::from(payload[5]);
        let kind = (first >> 4) & 3;
        let known = version == QUIC_V1 || version == QUIC_V2;
        if version == 0
            || (version == QUIC_V1 && kind == 3)
            || (version == QUIC_V2 && kind == 0)
            || (known && dcid_len > 20)
        {
            return QuicWant::Drop(Reason::QuicInvalid);
        }
        let Some(d) = payload.get(6..6 + dcid_len) else {
            return QuicWant::Drop(Reason::QuicTruncated);
        };
        if dcid_len != cid_len {
            return by_hash;
        }
        d
    };
    match QUIC.decode(dcid) {
        Some(QUIC_HERE) => QuicWant::Accept(Reason::QuicCidAccept),
        Some(QUIC_THERE) => QuicWant::Forward {
            member: 4,
            cid: Some(dcid.to_vec()),
            reason: Reason::QuicCidForwarded,
        },
        _ => by_hash,
    }
}

fn quic_corpus() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (src, dst) in [(CLIENT_V4, VIP_V4), (CLIENT_V6, VIP_V6)] {
        let f = Flow::udp(src, 40000, dst, 443);
        for vlan in [Vlan::None, Vlan::Single(7)] {
            for server in [QUIC_HERE, QUIC_THERE, 0x0999] {
                let cid = quic_cid(&QUIC, server, server as u8);
                out.push(frame(&f, Tcp::ACK, vlan, &quic_short(&cid, &[0x5a; 24])));
                for version in [QUIC_V1, QUIC_V2] {
                    let p = quic_long(
                        quic_long_first(version, 2),
                        version,
                        &cid,
                        &[3; 8],
                        &[9; 16],
                    );
                    out.push(frame(&f, Tcp::ACK, vlan, &p));
                }
            }
            out.push(frame(&f, Tcp::ACK, vlan, &quic_initial(&[0x77; 8], 64)));
        }
    }
    out
}

/// The mutation corpus with QUIC: mutants of short and long headers (ours, another member's,
/// unknown server IDs, client Initials) must get exactly the verdict the QUIC oracle gives
/// whenever etherparse still sees a well-formed UDP packet to VIP:443, byte-exact
/// encapsulations included; everything else must not be forwarded as QUIC.
#[test]
fn mutated_quic_packets_never_get_a_wrong_verdict() -> Result<()> {
    let mut s = scenario()?;
    s.set_quic(Some(&QUIC), 0)?;
    s.dp.set_quic_server(QUIC_HERE, Some(SELF_ID))?;
    s.dp.set_quic_server(QUIC_THERE, Some(4))?;
    let mut rng = StdRng::seed_from_u64(0x9_0000);
    let corpus = quic_corpus();
    let mut seen = std::collections::BTreeMap::<&str, usize>::new();
    for round in 0..12_000 {
        let mut pkt = corpus[round % corpus.len()].clone();
        // Mutate the QUIC header more often than the rest: that is what is under test.
        for _ in 0..rng.random_range(1..=3) {
            let len = pkt.len();
            let i = if rng.random_bool(0.7) {
                // Around the UDP payload's start (the headers before it are 42..70 octets).
                rng.random_range(len.saturating_sub(60).min(len - 1)..len)
            } else {
                rng.random_range(0..len)
            };
            pkt[i] = match rng.random_range(0..3) {
                0 => rng.random(),
                1 => pkt[i] ^ (1 << rng.random_range(0..8)),
                _ => [0, 0xff, 0x80, 0x40, 0x20, 8, 20, 21][rng.random_range(0..8)],
            };
        }
        let run = s.run(&pkt)?;
        let verdict = run.verdict();
        *seen.entry(verdict.name()).or_default() += 1;
        let payload = match (oracle(&pkt), SlicedPacket::from_ethernet(&pkt)) {
            (
                Oracle::Forward { flow, ip },
                Ok(SlicedPacket {
                    transport: Some(TransportSlice::Udp(u)),
                    ..
                }),
            ) if flow.udp => Some((flow, ip, u.payload().to_vec())),
            _ => None,
        };
        let Some((flow, ip, payload)) = payload else {
            ensure!(
                !matches!(
                    verdict,
                    Reason::QuicCidForwarded
                        | Reason::QuicHashForwarded
                        | Reason::QuicCidAccept
                        | Reason::QuicHashAccept
                ),
                "round {round}: QUIC verdict {verdict:?} for a packet etherparse rejects\n{pkt:02x?}"
            );
            continue;
        };
        let want = quic_oracle(&payload);
        let ctx = || format!("round {round}: {flow:?} payload {payload:02x?}");
        match want {
            QuicWant::Drop(reason) => ensure!(
                run.action == xdp::DROP && verdict == reason,
                "{}: want drop {reason:?}, got action {} {verdict:?}",
                ctx(),
                run.action
            ),
            QuicWant::Accept(reason) => ensure!(
                run.action == xdp::PASS && verdict == reason && run.out == pkt,
                "{}: want untouched {reason:?}, got action {} {verdict:?}",
                ctx(),
                run.action
            ),
            QuicWant::Forward {
                member,
                cid,
                reason,
            } => {
                ensure!(
                    run.action == xdp::TX && verdict == reason,
                    "{}: want {reason:?} to {member}, got action {} {verdict:?}",
                    ctx(),
                    run.action
                );
                let entropy = match &cid {
                    Some(cid) => quic_cid_entropy(&flow, cid),
                    None => entropy_port(flow.hash(&KEY)),
                };
                let expected = expected_encap(&ExpectedEncap {
                    dst_mac: member_mac(member),
                    src_mac: NODE_MAC,
                    outer_src: addr(UNDERLAY_V4),
                    outer_dst: member_addr(member),
                    entropy,
                    steer_port: STEER_PORT,
                    budget: BUDGET,
                    hops: &[],
                    inner: &ip,
                })?;
                ensure!(
                    run.out == expected,
                    "{}: wrong encapsulation\nout {:02x?}\nexp {expected:02x?}",
                    ctx(),
                    run.out
                );
            }
        }
    }
    // The mutants must have exercised every QUIC verdict, not just stayed one kind.
    for reason in [
        Reason::QuicCidForwarded,
        Reason::QuicCidAccept,
        Reason::QuicHashForwarded,
        Reason::QuicTruncated,
        Reason::QuicInvalid,
    ] {
        ensure!(
            seen.get(reason.name()).copied().unwrap_or(0) >= 50,
            "too few mutants got {}: {seen:?}",
            reason.name()
        );
    }
    Ok(())
}

/// Where the search header sits in an untagged steering frame with an outer header of `v6`.
fn steer_at(v6: bool) -> usize {
    14 + if v6 { 40 } else { 20 } + 8
}

/// What an independent reading of README "PoPs" makes of a search header (version 3 unless
/// `version` says otherwise) about a flow this node does not hold, whose bucket this node's
/// PoP (0) lists as `own`, PoP 1 as `[4]` and PoP 2 as `[2]` (PoPs 3 to 7 have no table):
/// `Ok((target, budget, pops, position))` for a pass-on, `Err(reason)` for any other verdict,
/// `None` when the header no longer says which family its inner packet is (any drop will do).
fn search_reading(
    h: &[u8],
    inner_v6: bool,
    own: &[u16],
) -> Option<Result<(u16, u8, u8, u16), Reason>> {
    let (version, flags, budget, pops) = (h[0], h[1], h[2], h[3]);
    if !(1..=4).contains(&version) {
        return Some(Err(Reason::BadEncap));
    }
    if version != 3 || (flags & 1 != 0) != inner_v6 {
        // Another version reads the hops (or a MAC) differently; the other family's parse fails.
        return None;
    }
    // The second hop slot is the walk's position: bits 0-1 the chain index (3 is not one),
    // bit 15 "redirected at this index"; any other bit is malformed.
    let position = u16::from_be_bytes([h[6], h[7]]);
    let index = usize::from(position & 3);
    let redirected = position >> 15 == 1;
    if position & 0x7ffc != 0 || index == 3 {
        return Some(Err(Reason::BadEncap));
    }
    // Whom this node's chain names at the index, if that is another member and nobody
    // redirected there yet; else the first other member after the index.
    let elsewhere = |m: &u16| *m != SELF_ID;
    let redirect = own
        .get(index)
        .filter(|m| elsewhere(m) && !redirected)
        .map(|m| (*m, position | 0x8000));
    let onwards = || {
        own.iter()
            .enumerate()
            .skip(index + 1)
            .find(|(_, m)| elsewhere(m))
            .map(|(j, m)| (*m, j as u16))
    };
    let next_local = redirect.or_else(onwards);
    let owner_of = |pop: u32| match pop {
        0 => own.first().copied(),
        1 => Some(4),
        2 => Some(2),
        _ => None,
    };
    let mut left = pops;
    let mut target = next_local;
    let mut tries = 0;
    while target.is_none() && left != 0 && tries < 2 {
        let pop = left.trailing_zeros();
        left &= !(1 << pop);
        tries += 1;
        // Another PoP is entered at index 0.
        target = owner_of(pop).filter(|m| *m != SELF_ID).map(|m| (m, 0));
    }
    let Some((target, position)) = target else {
        return Some(Err(Reason::SearchExhausted));
    };
    let budget = budget.min(cdn_tests::scenario::SEARCH_BUDGET);
    if budget == 0 {
        return Some(Err(Reason::LoopGuard));
    }
    Some(Ok((target, budget - 1, left, position)))
}

/// Search headers (version 3) with their fields mutated, and now and then their version:
/// every verdict, and every byte passed on, is what the independent reading above says.
#[test]
fn mutated_search_headers_match_an_independent_reading() -> Result<()> {
    let mut s = scenario()?;
    s.set_search_pops(0b110, cdn_tests::scenario::service(0).flags)?;
    let mut rng = StdRng::seed_from_u64(0x5ea_4c4);
    let owns: [&[u16]; 6] = [
        &[SELF_ID, 5],
        &[SELF_ID],
        &[2, SELF_ID],
        &[5, 2],
        &[2, SELF_ID, 5],
        &[5, 2, SELF_ID],
    ];
    let mut seen = std::collections::BTreeMap::<&str, usize>::new();
    for round in 0..6000 {
        let inner_v6 = rng.random_bool(0.5);
        let outer_v6 = rng.random_bool(0.5);
        let own = owns[rng.random_range(0..owns.len())];
        let flow = if inner_v6 {
            Flow::tcp(CLIENT_V6, 2000 + round as u16 % 7, VIP_V6, 443)
        } else {
            Flow::tcp(CLIENT_V4, 2000 + round as u16 % 7, VIP_V4, 443)
        };
        s.set_pop_hops(0, &flow, own)?;
        s.set_pop_hops(1, &flow, &[4])?;
        s.set_pop_hops(2, &flow, &[2])?;
        let inner = ip_packet(&frame(&flow, Tcp::ACK, Vlan::None, b"search"), Vlan::None).to_vec();
        let sender = if outer_v6 { 3 } else { 2 };
        let underlay = addr(if outer_v6 { UNDERLAY_V6 } else { UNDERLAY_V4 });
        let mut pkt = steering_frame(
            member_addr(sender),
            underlay,
            STEER_PORT,
            3,
            &[4, [0, 1, 2, 0x8000, 0x8001, 0x8002][rng.random_range(0..6)]],
            &inner,
        )?;
        let sh = steer_at(outer_v6);
        pkt[sh] = 3;
        pkt[sh + 3] = 0b100;
        for _ in 0..rng.random_range(1..=3) {
            // The version now and then, else the other fields.
            let i = sh
                + if rng.random_bool(0.1) {
                    0
                } else {
                    rng.random_range(1..8)
                };
            pkt[i] = match rng.random_range(0..3) {
                0 => rng.random(),
                1 => pkt[i] ^ (1 << rng.random_range(0..8)),
                _ => [0, 0xff, 1, 2, 3, 4, 0b110, 0b1000_0010][rng.random_range(0..8)],
            };
        }
        let run = s.run(&pkt)?;
        let verdict = run.verdict();
        *seen.entry(verdict.name()).or_default() += 1;
        let ctx = || {
            format!(
                "round {round}: header {:02x?} own {own:?}",
                &pkt[sh..sh + 8]
            )
        };
        match search_reading(&pkt[sh..sh + 8], inner_v6, own) {
            None => {}
            Some(Err(Reason::SearchExhausted)) => {
                let mut want = pkt[..12].to_vec();
                want.extend_from_slice(if inner_v6 {
                    &[0x86, 0xdd]
                } else {
                    &[0x08, 0x00]
                });
                want.extend_from_slice(&inner);
                ensure!(
                    run.action == xdp::PASS
                        && verdict == Reason::SearchExhausted
                        && run.out == want,
                    "{}: got {} {verdict:?}",
                    ctx(),
                    run.action
                );
            }
            Some(Err(reason)) => ensure!(
                run.action == xdp::DROP && verdict == reason,
                "{}: got {} {verdict:?}, want {reason:?}",
                ctx(),
                run.action
            ),
            Some(Ok((target, budget, pops, position))) => {
                let step = match position {
                    0 => "step: next PoP",
                    p if p >> 15 == 1 => "step: redirect",
                    _ => "step: next index",
                };
                *seen.entry(step).or_default() += 1;
                let target_v6 = member_addr(target).is_ipv6();
                let mut want = expected_encap(&ExpectedEncap {
                    dst_mac: member_mac(target),
                    src_mac: NODE_MAC,
                    outer_src: addr(if target_v6 { UNDERLAY_V6 } else { UNDERLAY_V4 }),
                    outer_dst: member_addr(target),
                    entropy: 0xc123,
                    steer_port: STEER_PORT,
                    budget,
                    hops: &[u16::from_be_bytes([pkt[sh + 4], pkt[sh + 5]]), position],
                    inner: &inner,
                })?;
                let at = steer_at(target_v6);
                want[at] = 3;
                want[at + 3] = pops;
                ensure!(
                    run.action == xdp::TX && verdict == Reason::SearchPassOn && run.out == want,
                    "{}: got {} {verdict:?}\nout  {:02x?}\nwant {want:02x?}",
                    ctx(),
                    run.action,
                    run.out
                );
            }
        }
    }
    for name in [
        Reason::SearchPassOn.name(),
        Reason::SearchExhausted.name(),
        Reason::LoopGuard.name(),
        Reason::BadEncap.name(),
        "step: redirect",
        "step: next index",
        "step: next PoP",
    ] {
        ensure!(
            seen.get(name).copied().unwrap_or(0) >= 20,
            "too few mutants got {name}: {seen:?}"
        );
    }
    Ok(())
}
