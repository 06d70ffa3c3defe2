//! QUIC routing by QUIC-LB connection ID through the real program (BPF_PROG_TEST_RUN): every
//! boundary of the QUIC-LB fields and of the DCID length, truncation at every length, and the
//! kernel's CID decoding against `QuicLbConfig::encode` (the servers' generator) on 10,000
//! random connection IDs. Verdict cases per family are in `dataplane_verdicts.rs`.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, ensure};
use cdn_common::{
    counters::Reason,
    maps::Bucket,
    quic_lb::{MAX_CID_LEN, QuicLbConfig},
    wire::entropy_port,
};
use cdn_tests::{
    packets::{
        Flow, QUIC_V1, QUIC_V2, Tcp, Vlan, frame, quic_cid_entropy, quic_long, quic_long_first,
        quic_short,
    },
    scenario::{
        CLIENT_V4, CLIENT_V6, KEY, SELF_ID, Scenario, TABLE_SIZE, VIP_V4, VIP_V6, encap_frame,
        member_mac,
    },
    xdp,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// Member every bucket names as owner: where packets without a routable CID go.
const HASH_OWNER: u16 = 4;

/// A scenario whose buckets all name [`HASH_OWNER`], QUIC on UDP 443 under `cfg`.
fn scenario(cfg: &QuicLbConfig) -> Result<Scenario> {
    let mut s = Scenario::new()?;
    let all = vec![
        Bucket {
            hops: [HASH_OWNER, 2, cdn_common::maps::NO_MEMBER],
            _pad: 0,
        };
        (2 * TABLE_SIZE) as usize
    ];
    s.dp.write_buckets(0, &all)?;
    s.set_quic(Some(cfg), 0)?;
    Ok(s)
}

fn flow(v6: bool, sport: u16) -> Flow {
    if v6 {
        Flow::udp(CLIENT_V6, sport, VIP_V6, 443)
    } else {
        Flow::udp(CLIENT_V4, sport, VIP_V4, 443)
    }
}

/// Where a packet went.
#[derive(Debug, PartialEq, Eq)]
enum Went {
    /// Accepted here by CID.
    CidAccept,
    /// Encapsulated by CID to this member (frame checked byte by byte).
    Cid(u16),
    /// Encapsulated by flow hash to this member (frame checked), with `quic_unknown_server`.
    Hash(u16, bool),
    Dropped(Reason),
}

/// Runs a QUIC `payload` of `f` through the program and says where it went, after checking
/// the encapsulation byte by byte (entropy of the CID path when `dcid` is given).
fn send(s: &mut Scenario, f: &Flow, payload: &[u8]) -> Result<Went> {
    let input = frame(f, Tcp::ACK, Vlan::None, payload);
    let run = s.run(&input)?;
    let reason = run.try_verdict()?;
    let unknown = run.counted(Reason::QuicUnknownServer) == 1;
    let target = |out: &[u8]| {
        (0..1024u16)
            .find(|m| out.len() > 6 && out[..6] == member_mac(*m))
            .context("encapsulation to no known member")
    };
    let expect_encap = |target: u16, entropy: u16| encap_frame(target, entropy, &input, &[]);
    Ok(match reason {
        Reason::QuicCidAccept => {
            ensure!(
                run.action == xdp::PASS && run.out == input,
                "accepted untouched"
            );
            Went::CidAccept
        }
        Reason::QuicCidForwarded => {
            let m = target(&run.out)?;
            let dcid_off = if payload[0] & 0x80 == 0 { 1 } else { 6 };
            let entropy = quic_cid_entropy(f, &payload[dcid_off..dcid_off + 4]);
            ensure!(
                run.out == expect_encap(m, entropy)?,
                "CID encapsulation bytes"
            );
            Went::Cid(m)
        }
        Reason::QuicHashForwarded => {
            let m = target(&run.out)?;
            let want = expect_encap(m, entropy_port(f.hash(&KEY)))?;
            ensure!(run.out == want, "hash encapsulation bytes");
            Went::Hash(m, unknown)
        }
        r if run.action == xdp::DROP => Went::Dropped(r),
        r => anyhow::bail!("unexpected verdict {}", r.name()),
    })
}

fn cid(cfg: &QuicLbConfig, server: u32, nonce: &[u8; MAX_CID_LEN]) -> Vec<u8> {
    let mut out = [0; MAX_CID_LEN];
    let len = cfg.encode(server, nonce, &mut out).expect("valid config");
    out[..len].to_vec()
}

/// Short and long (Handshake v1, 0-RTT v2) packets carrying `dcid`.
fn carriers(dcid: &[u8]) -> [Vec<u8>; 3] {
    [
        quic_short(dcid, &[0x33; 24]),
        quic_long(
            quic_long_first(QUIC_V1, 2),
            QUIC_V1,
            dcid,
            &[9; 8],
            &[0x44; 24],
        ),
        quic_long(quic_long_first(QUIC_V2, 1), QUIC_V2, dcid, &[], &[0x44; 24]),
    ]
}

/// Every QUIC-LB field at its bounds: server ID length 1 and 2, CID length at its minimum
/// and 20, config ids 0 and 6, server IDs 0 and the largest.
#[test]
fn quic_lb_field_boundaries() -> Result<()> {
    for (config_id, server_id_len) in [(0u8, 1u8), (6, 1), (0, 2), (6, 2)] {
        let min_len = 1 + server_id_len + 4;
        for cid_len in [min_len, MAX_CID_LEN as u8] {
            let cfg = QuicLbConfig {
                config_id,
                server_id_len,
                cid_len,
            };
            cfg.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
            let max = cfg.max_server_id();
            let mut s = scenario(&cfg)?;
            s.dp.set_quic_server(0, Some(2))?;
            s.dp.set_quic_server(max, Some(3))?;
            s.dp.set_quic_server(1, Some(SELF_ID))?;
            let name = format!("{cfg:?}");
            for v6 in [false, true] {
                let f = flow(v6, 40000);
                for (server, want) in [
                    (0, Went::Cid(2)),
                    (max, Went::Cid(3)),
                    (1, Went::CidAccept),
                    (max - 1, Went::Hash(HASH_OWNER, true)),
                ] {
                    for nonce in [[0u8; MAX_CID_LEN], [0xff; MAX_CID_LEN]] {
                        for p in carriers(&cid(&cfg, server, &nonce)) {
                            let got = send(&mut s, &f, &p).with_context(|| name.clone())?;
                            ensure!(
                                got == want,
                                "{name} server {server}: {got:?}, want {want:?}"
                            );
                        }
                    }
                }
                // The other config ids, 7 included, never route.
                for other in (0..8).filter(|c| *c != config_id) {
                    let mut c = cid(&cfg, 0, &[0x5a; MAX_CID_LEN]);
                    c[0] = other << 5 | (c[0] & 0x1f);
                    for p in carriers(&c) {
                        let got = send(&mut s, &f, &p)?;
                        ensure!(
                            got == Went::Hash(HASH_OWNER, false),
                            "{name} config {other}: {got:?}"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// DCID lengths: 20 is the most version 1 and 2 allow (21 is invalid); other versions may
/// carry up to 255 octets, which never route.
#[test]
fn dcid_length_boundaries() -> Result<()> {
    let cfg = QuicLbConfig {
        config_id: 3,
        server_id_len: 2,
        cid_len: 20,
    };
    let mut s = scenario(&cfg)?;
    s.dp.set_quic_server(0x0203, Some(3))?;
    let c = cid(&cfg, 0x0203, &[7; MAX_CID_LEN]);
    let mut c21 = c.clone();
    c21.push(7);
    let unknown_version = 0x1a2a_3a4a;
    for v6 in [false, true] {
        let f = flow(v6, 40001);
        for version in [QUIC_V1, QUIC_V2] {
            let first = quic_long_first(version, 2);
            let p = quic_long(first, version, &c, &[], &[1; 10]);
            ensure!(
                send(&mut s, &f, &p)? == Went::Cid(3),
                "v{version:#x} DCID 20"
            );
            let p = quic_long(first, version, &c21, &[], &[1; 10]);
            ensure!(
                send(&mut s, &f, &p)? == Went::Dropped(Reason::QuicInvalid),
                "v{version:#x} DCID 21"
            );
        }
        // Unknown version: its own DCID rules; the configured length still routes.
        let p = quic_long(0xc0, unknown_version, &c, &[], &[1; 10]);
        ensure!(
            send(&mut s, &f, &p)? == Went::Cid(3),
            "unknown version, CID length"
        );
        for len in [0usize, 21, 200, 255] {
            let dcid: Vec<u8> = c.iter().copied().cycle().take(len).collect();
            let p = quic_long(0xc0, unknown_version, &dcid, &[], &[1; 4]);
            let got = send(&mut s, &f, &p)?;
            ensure!(
                got == Went::Hash(HASH_OWNER, false),
                "unknown version DCID {len}: {got:?}"
            );
            // One octet short of its DCID.
            let cut = &p[..6 + len - 1.min(len)];
            if len > 0 {
                let got = send(&mut s, &f, cut)?;
                ensure!(
                    got == Went::Dropped(Reason::QuicTruncated),
                    "cut DCID {len}: {got:?}"
                );
            }
        }
    }
    Ok(())
}

/// Every length from 0 to the whole header: truncated until the DCID is complete, routed
/// from there on.
#[test]
fn truncation_at_every_length() -> Result<()> {
    let cfg = QuicLbConfig {
        config_id: 2,
        server_id_len: 2,
        cid_len: 9,
    };
    let mut s = scenario(&cfg)?;
    s.dp.set_quic_server(0x4242, Some(2))?;
    let c = cid(&cfg, 0x4242, &[0x11; MAX_CID_LEN]);
    for v6 in [false, true] {
        let f = flow(v6, 40002);
        let [short, long, _] = carriers(&c);
        for (p, header) in [(short, 1 + c.len()), (long, 6 + c.len())] {
            for len in 0..=header + 1 {
                let got = send(&mut s, &f, &p[..len])?;
                let want = if len < header {
                    Went::Dropped(Reason::QuicTruncated)
                } else {
                    Went::Cid(2)
                };
                ensure!(
                    got == want,
                    "first octet {:#x}, {len} octets: {got:?}",
                    p[0]
                );
            }
        }
    }
    Ok(())
}

/// The check: the kernel's decoding and the servers' generator
/// (`QuicLbConfig::encode`) against each other on 10,000 random connection IDs, short and
/// long header. Several random server IDs name members; every other one is placed by hash.
#[test]
fn kernel_decodes_what_servers_encode() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(0x9_c1d);
    let members = [0u16, SELF_ID, 2, 3, 5];
    let mut checked = 0;
    let mut kinds = BTreeMap::new();
    while checked < 10_000 {
        let server_id_len = rng.random_range(1..=2u8);
        let cfg = QuicLbConfig {
            config_id: rng.random_range(0..=6),
            server_id_len,
            cid_len: rng.random_range(1 + server_id_len + 4..=MAX_CID_LEN as u8),
        };
        let mut s = scenario(&cfg)?;
        let mut known = BTreeMap::new();
        for _ in 0..8 {
            let id = rng.random_range(0..=cfg.max_server_id());
            let m = members[rng.random_range(0..members.len())];
            s.dp.set_quic_server(id, Some(m))?;
            known.insert(id, m);
        }
        for _ in 0..500 {
            // Half of the IDs known, half anything.
            let server = if rng.random_bool(0.5) {
                *known
                    .keys()
                    .nth(rng.random_range(0..known.len()))
                    .expect("known")
            } else {
                rng.random_range(0..=cfg.max_server_id())
            };
            let nonce: [u8; MAX_CID_LEN] = rng.random();
            let c = cid(&cfg, server, &nonce);
            let f = flow(rng.random_bool(0.5), rng.random_range(1024..=u16::MAX));
            let p = if rng.random_bool(0.5) {
                quic_short(&c, &[0x21; 20])
            } else {
                let version = if rng.random_bool(0.5) {
                    QUIC_V1
                } else {
                    QUIC_V2
                };
                quic_long(
                    quic_long_first(version, 2),
                    version,
                    &c,
                    &[3; 8],
                    &[0x21; 20],
                )
            };
            let want = match known.get(&server) {
                Some(&m) if m == SELF_ID => Went::CidAccept,
                Some(&m) => Went::Cid(m),
                None => Went::Hash(HASH_OWNER, true),
            };
            let got = send(&mut s, &f, &p).with_context(|| format!("{cfg:?} server {server}"))?;
            ensure!(
                got == want,
                "{cfg:?} server {server}: {got:?}, want {want:?}"
            );
            *kinds
                .entry(format!("{want:?}").chars().take(4).collect::<String>())
                .or_insert(0) += 1;
            checked += 1;
        }
        for id in known.keys() {
            s.dp.set_quic_server(*id, None)?;
        }
    }
    // Every outcome was exercised many times.
    ensure!(
        kinds.len() == 3 && kinds.values().all(|n| *n > 500),
        "{kinds:?}"
    );
    Ok(())
}
