//! HTTP/3 in the lab, end to end: real quinn + h3 servers on every node issuing QUIC-LB
//! connection IDs, real `cdn-steer` routing QUIC by those IDs, real downloads from the client
//! namespace checked by SHA-256. Route shifts, a client migrating to a new port, a member
//! joining and another leaving must break nothing but the leaving member's own connections;
//! with CID routing off (no `quic` table: UDP 443 in `owner` mode), the migration breaks.
//!
//! The labs are heavy, so the tests of this file run one at a time.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use cdn_tests::{
    download::Live,
    h3::client::{self, Failure, Migration, Outcome, Spec},
    lab::{CLIENT_V4, H3_PORT, Lab, LabOptions, QuicRouting, VIP_V4, packets_counter},
};

static ONE_LAB_AT_A_TIME: Mutex<()> = Mutex::new(());

const FILE_SIZE: usize = 1 << 20;

fn lab(tag: &str, routing: QuicRouting) -> Result<(std::sync::MutexGuard<'static, ()>, Lab)> {
    let guard = ONE_LAB_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let lab = Lab::start(LabOptions {
        tag: tag.into(),
        file_size: FILE_SIZE,
        h3: Some(routing),
        ..LabOptions::default()
    })?;
    Ok((guard, lab))
}

/// Downloads of the lab's file over HTTP/3 from the IPv4 VIP, `rate` bytes/s each.
fn spec(lab: &Lab, rate: usize) -> Result<Spec> {
    spec_to(lab, false, rate)
}

/// Downloads from the IPv6 VIP (`v6`) or the IPv4 one.
fn spec_to(lab: &Lab, v6: bool, rate: usize) -> Result<Spec> {
    Ok(Spec {
        target: SocketAddr::new(lab.vip(v6), H3_PORT),
        size: lab.opts.file_size,
        seed: lab.opts.file_seed,
        rate,
        timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(4),
        cert: lab
            .h3_identity
            .as_ref()
            .context("the lab serves no HTTP/3")?
            .cert
            .clone(),
    })
}

type Downloads = std::thread::JoinHandle<Result<Vec<Outcome>>>;

fn start_downloads(
    lab: &Lab,
    count: usize,
    spec: Spec,
    migration: Option<Migration>,
) -> (Arc<Live>, Downloads) {
    let live = Arc::new(Live::default());
    let path = lab.client_netns_path();
    let l = live.clone();
    let handle =
        std::thread::spawn(move || client::run_all(Some(&path), count, &spec, migration, l));
    (live, handle)
}

fn finish(handle: Downloads) -> Result<Vec<Outcome>> {
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("download thread panicked"))?
}

fn wait_connected(lab: &Lab, live: &Live, count: usize) -> Result<()> {
    lab.wait_until(Duration::from_secs(20), "every download to connect", || {
        Ok(live.connected.load(Ordering::Relaxed) + live.failed.load(Ordering::Relaxed) >= count)
    })
}

/// Prints the closing note's numbers and returns (ok, broken, stateless resets).
fn report(name: &str, outcomes: &[Outcome], started: Instant) -> (usize, usize, usize) {
    let ok = outcomes.iter().filter(|o| o.ok).count();
    let resets = outcomes
        .iter()
        .filter(|o| o.failure == Some(Failure::StatelessReset))
        .count();
    println!(
        "{name}: {} HTTP/3 downloads, {ok} complete with correct sha256, {} broken, \
         {resets} stateless resets, {:.1} s",
        outcomes.len(),
        outcomes.len() - ok,
        started.elapsed().as_secs_f64()
    );
    for o in outcomes.iter().filter(|o| !o.ok) {
        println!(
            "  download {} (port {}, served by {:?}): {:?} {:?}",
            o.id, o.client_port, o.served_by, o.failure, o.error
        );
    }
    (ok, outcomes.len() - ok, resets)
}

/// QUIC packets every node steered by connection ID (forwarded to another member or accepted).
fn cid_routed(lab: &Lab) -> Result<u64> {
    let mut sum = 0;
    for i in 0..lab.nodes.len() {
        let m = lab.scrape(i)?;
        sum += packets_counter(&m, "quic_cid_forwarded") + packets_counter(&m, "quic_cid_accept");
    }
    Ok(sum)
}

/// HTTP/3 downloads over IPv6 beside the 50 over IPv4 in the route-shift test.
const V6_DOWNLOADS: usize = 20;

#[test]
fn h3_downloads_survive_five_route_shifts() -> Result<()> {
    let (_guard, lab) = lab("h3s", QuicRouting::Cid)?;
    let started = Instant::now();
    // ~25 s per download: in flight through all five shifts.
    let (live, handle) = start_downloads(&lab, 50, spec(&lab, 40 * 1024)?, None);
    // And over IPv6, through the same shifts.
    let (live6, handle6) =
        start_downloads(&lab, V6_DOWNLOADS, spec_to(&lab, true, 40 * 1024)?, None);
    wait_connected(&lab, &live, 50)?;
    wait_connected(&lab, &live6, V6_DOWNLOADS)?;
    lab.shift_routes(5)?;
    let in_flight = live.running.load(Ordering::Relaxed);
    let in_flight6 = live6.running.load(Ordering::Relaxed);
    let outcomes = finish(handle)?;
    let outcomes6 = finish(handle6)?;
    let (ok, broken, resets) = report("h3 route shifts (5)", &outcomes, started);
    println!("  {in_flight} downloads still in flight after the fifth shift");
    let (ok6, broken6, resets6) = report("h3 route shifts (5), IPv6", &outcomes6, started);
    println!("  {in_flight6} IPv6 downloads still in flight after the fifth shift");
    ensure!(
        ok == 50 && broken == 0 && resets == 0,
        "{broken} broken, {resets} resets"
    );
    ensure!(
        ok6 == V6_DOWNLOADS && broken6 == 0 && resets6 == 0,
        "IPv6: {broken6} broken, {resets6} resets"
    );
    ensure!(
        in_flight6 >= V6_DOWNLOADS - 2,
        "only {in_flight6} IPv6 downloads lived through all shifts"
    );
    ensure!(
        in_flight >= 45,
        "only {in_flight} downloads lived through all shifts: make them slower"
    );
    ensure!(cid_routed(&lab)? > 0, "no packet was routed by CID");
    Ok(())
}

/// Downloads that each move to a new local port a third of the way in, a port whose flow
/// hash names another member than the one serving them. Returns the outcomes.
fn migrating_downloads(lab: &Lab, count: usize) -> Result<Vec<Outcome>> {
    let config = Arc::new(cdn_user::config::load(&lab.nodes[0].config)?);
    let next_port = Arc::new(std::sync::atomic::AtomicU16::new(40_000));
    let misplaced = Arc::new(Mutex::new(Vec::<String>::new()));
    let choose = {
        let (config, misplaced) = (config.clone(), misplaced.clone());
        // The owner of CLIENT_V4:port -> VIP:443/udp in node1's configuration, every member
        // healthy (the lab's state while this test runs).
        let lab_owner = move |port| -> Result<String> {
            let src: SocketAddr = format!("{CLIENT_V4}:{port}").parse()?;
            let dst: SocketAddr = format!("{VIP_V4}:{H3_PORT}").parse()?;
            let doc = cdn_user::operator::lookup::offline(&config, src, dst, true)?;
            Ok(doc.owner.context("empty bucket")?.name)
        };
        move |served_by: &str, old: u16| -> Option<u16> {
            // The first flight was placed by hash: the old port's owner served it.
            if lab_owner(old).ok().as_deref() != Some(served_by)
                && let Ok(mut m) = misplaced.lock()
            {
                m.push(format!("port {old} served by {served_by}"));
            }
            loop {
                let port = next_port.fetch_add(1, Ordering::Relaxed);
                match lab_owner(port) {
                    Ok(o) if o != served_by => return Some(port),
                    Ok(_) => continue,
                    Err(_) => return None,
                }
            }
        }
    };
    let migration = Migration {
        after_bytes: FILE_SIZE / 3,
        choose: Arc::new(choose),
    };
    // ~6 s per download.
    let (_live, handle) = start_downloads(lab, count, spec(lab, 160 * 1024)?, Some(migration));
    let outcomes = finish(handle)?;
    let misplaced = misplaced.lock().map(|m| m.clone()).unwrap_or_default();
    ensure!(
        misplaced.is_empty(),
        "a first flight was not served by its hash owner: {misplaced:?}"
    );
    Ok(outcomes)
}

#[test]
fn a_migrating_client_keeps_its_server_only_with_cid_routing() -> Result<()> {
    const COUNT: usize = 6;
    {
        let (_guard, lab) = lab("h3m", QuicRouting::Cid)?;
        let started = Instant::now();
        let outcomes = migrating_downloads(&lab, COUNT)?;
        let (ok, _, resets) = report("h3 migration, CID routing", &outcomes, started);
        for o in &outcomes {
            ensure!(o.migrated_to.is_some(), "download {} did not migrate", o.id);
        }
        ensure!(
            ok == COUNT && resets == 0,
            "a migrated download broke under CID routing"
        );
    }
    let (_guard, lab) = lab("h3n", QuicRouting::Off)?;
    let started = Instant::now();
    let outcomes = migrating_downloads(&lab, COUNT)?;
    let (ok, broken, resets) = report("h3 migration, CID routing off", &outcomes, started);
    for o in &outcomes {
        ensure!(o.migrated_to.is_some(), "download {} did not migrate", o.id);
    }
    ensure!(
        ok == 0 && broken == COUNT,
        "without CID routing, {ok} migrated downloads still completed"
    );
    println!("  negative control: {resets} of {broken} ended by a stateless reset");
    Ok(())
}

/// Buckets `member` holds in node `i`'s table (`None`: not listed).
fn buckets(lab: &Lab, i: usize, member: &str) -> Result<Option<u64>> {
    let s = lab.status(i)?;
    Ok(s["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == member))
        .and_then(|m| m["buckets"].as_u64()))
}

#[test]
fn adding_and_removing_members_breaks_only_the_removed_members_h3_connections() -> Result<()> {
    let (_guard, mut lab) = lab("h3r", QuicRouting::Cid)?;
    // node3 is out when the downloads start; it joins during them, then node2 leaves.
    lab.stop_node(2);
    lab.wait_until(
        Duration::from_secs(10),
        "node3 out of node1's table",
        || Ok(buckets(&lab, 0, "node3")? == Some(0)),
    )?;
    lab.wait_for_routes(2, Duration::from_secs(10))?;
    let started = Instant::now();
    // ~20 s per download: in flight while node3 joins and node2 leaves.
    let (live, handle) = start_downloads(&lab, 50, spec(&lab, 50 * 1024)?, None);
    wait_connected(&lab, &live, 50)?;
    lab.start_node(2)?;
    for i in 0..2 {
        lab.wait_until(Duration::from_secs(20), "node3 in the tables", || {
            Ok(buckets(&lab, i, "node3")?.is_some_and(|b| b > 0))
        })?;
    }
    // Flows whose bucket node3 took over from the serving member: with plain UDP placement
    // these would now reach node3, which does not hold them.
    let config = cdn_user::config::load(&lab.nodes[0].config)?;
    let ports = live.ports.lock().map(|p| p.clone()).unwrap_or_default();
    let mut moved_to_node3 = Vec::new();
    for (id, port) in ports {
        let src: SocketAddr = format!("{CLIENT_V4}:{port}").parse()?;
        let dst: SocketAddr = format!("{VIP_V4}:{H3_PORT}").parse()?;
        let doc = cdn_user::operator::lookup::offline(&config, src, dst, true)?;
        if doc.owner.is_some_and(|o| o.name == "node3") {
            moved_to_node3.push(id);
        }
    }
    lab.stop_node(1);
    lab.wait_until(
        Duration::from_secs(10),
        "node2 out of node1's table",
        || Ok(buckets(&lab, 0, "node2")? == Some(0)),
    )?;
    let in_flight = live.running.load(Ordering::Relaxed);
    let outcomes = finish(handle)?;
    let (ok, broken, resets) = report("h3 member joins, another leaves", &outcomes, started);
    let served = |name: &str| {
        outcomes
            .iter()
            .filter(|o| o.served_by.as_deref() == Some(name))
            .count()
    };
    println!(
        "  {in_flight} downloads in flight when node2 had left; served by node1 {}, node2 {}, \
         node3 {}; {} moved to node3's buckets when it joined",
        served("node1"),
        served("node2"),
        served("node3"),
        moved_to_node3.len()
    );
    ensure!(served("node2") > 0, "no download was served by node2");
    ensure!(
        served("node3") == 0,
        "node3 served a download before it joined"
    );
    ensure!(
        !moved_to_node3.is_empty(),
        "no flow's bucket moved to node3: the join tested nothing"
    );
    ensure!(
        in_flight >= 40,
        "only {in_flight} downloads in flight at the end"
    );
    for o in &outcomes {
        ensure!(
            o.ok || o.served_by.as_deref() == Some("node2"),
            "download {} served by {:?} broke: {:?} {:?}",
            o.id,
            o.served_by,
            o.failure,
            o.error
        );
    }
    ensure!(
        broken == served("node2"),
        "{broken} broken, {} served by node2 ({ok} ok, {resets} resets)",
        served("node2")
    );
    Ok(())
}
