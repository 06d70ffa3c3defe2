//! End to end, in the lab: real BIRD (router with ECMP over eBGP, one speaker per node), real
//! `cdn-steer` on every node, real TCP downloads from a client, route changes made at the
//! router. Each test counts downloads that complete with the right SHA-256 and resets.
//!
//! The labs are heavy (processes, 50 concurrent downloads), so the tests of this file run one
//! at a time.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use cdn_tests::{
    download::{self, Live, Outcome, Spec, Tally},
    lab::{Lab, LabOptions, VIP_V4, VIP_V6, packets_counter},
};

static ONE_LAB_AT_A_TIME: Mutex<()> = Mutex::new(());

fn lab(tag: &str, steering: bool) -> Result<(std::sync::MutexGuard<'static, ()>, Lab)> {
    let guard = ONE_LAB_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let lab = Lab::start(LabOptions {
        steering,
        tag: tag.into(),
        file_size: 1_536 * 1024,
        ..LabOptions::default()
    })?;
    Ok((guard, lab))
}

fn spec(lab: &Lab, v6: bool) -> Spec {
    Spec {
        vip: lab.vip(v6),
        port: 80,
        size: lab.opts.file_size,
        seed: lab.opts.file_seed,
        // ~10 s per download: long enough to live through several route changes.
        rate: 150 * 1024,
        timeout: Duration::from_secs(60),
    }
}

/// Starts `count` downloads in the background.
fn start_downloads(
    lab: &Lab,
    count: usize,
    v6: bool,
) -> (Arc<Live>, std::thread::JoinHandle<Vec<Outcome>>) {
    let live = Arc::new(Live::default());
    let path = lab.client_netns_path();
    let spec = spec(lab, v6);
    let l = live.clone();
    let handle = std::thread::spawn(move || download::run_all(&path, count, &spec, l));
    (live, handle)
}

/// Waits until every download has connected or given up on connecting (failures are
/// reported with the downloads' outcomes).
fn wait_connected(lab: &Lab, live: &Live, count: usize) -> Result<()> {
    lab.wait_until(Duration::from_secs(20), "every download to connect", || {
        Ok(live.connected.load(Ordering::Relaxed) + live.failed.load(Ordering::Relaxed) >= count)
    })
}

/// Prints what the closing note needs: flows, resets, longest stall.
fn report(name: &str, outcomes: &[Outcome], shifts: usize, started: Instant) {
    let Tally {
        complete: ok,
        resets,
        longest_stall: stall,
    } = Tally::of(outcomes);
    println!(
        "{name}: {} flows, {shifts} shifts, {ok} complete with correct sha256, {resets} reset, \
         longest stall {:.2} s, {:.1} s",
        outcomes.len(),
        stall.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    for o in outcomes.iter().filter(|o| !o.ok).take(5) {
        println!(
            "  download {} (port {}): {:?}",
            o.id, o.client_port, o.error
        );
    }
}

/// `promtool check metrics` finds nothing to complain about in a scrape of a running node.
fn promtool_accepts(text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running promtool (Debian package prometheus)")?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );
    Ok(())
}

fn steered_shift_test(tag: &str, v6: bool, flows: usize, rounds: usize) -> Result<()> {
    let (_guard, lab) = lab(tag, true)?;
    let started = Instant::now();
    let (live, handle) = start_downloads(&lab, flows, v6);
    wait_connected(&lab, &live, flows)?;
    let shifts = lab.shift_routes(rounds)?;
    let outcomes = handle
        .join()
        .map_err(|_| anyhow::anyhow!("download thread panicked"))?;
    report(tag, &outcomes, shifts, started);

    let failed: Vec<_> = outcomes.iter().filter(|o| !o.ok).collect();
    for o in &failed {
        for i in 0..lab.nodes.len() {
            let client = if v6 {
                "[fd00:100::2]".to_string()
            } else {
                "10.100.0.2".to_string()
            };
            let vip = if v6 {
                format!("[{VIP_V6}]")
            } else {
                VIP_V4.to_string()
            };
            if let Ok(text) = lab.steer(
                i,
                &[
                    "lookup",
                    &format!("{client}:{}", o.client_port),
                    &format!("{vip}:80"),
                ],
            ) {
                println!(
                    "  port {} at node{}: {}",
                    o.client_port,
                    i + 1,
                    text.replace('\n', " | ")
                );
            }
        }
    }
    ensure!(
        failed.is_empty(),
        "{} of {} downloads failed: {:?}\n{}",
        failed.len(),
        outcomes.len(),
        failed.first(),
        lab.diagnostics()
    );

    // Metrics, scraped over HTTP from every node: steering really happened, and two
    // independent counts of what each node sent to other members agree.
    let mut sent = 0;
    let mut arrived = 0;
    let mut accepted_locally = 0;
    for i in 0..lab.nodes.len() {
        let text = lab.scrape(i)?;
        promtool_accepts(&text)?;
        let c = |reason: &str| packets_counter(&text, reason);
        let node_sent = c("forwarded") + c("passed_on") + c("drain_pass_on") + c("syn_redirect");
        let per_member: u64 = text
            .lines()
            .filter(|l| l.starts_with("cdn_steer_member_forwarded_packets_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum();
        ensure!(
            node_sent == per_member,
            "node {i}: verdict counters say {node_sent} packets sent to members, per-member counters {per_member}"
        );
        sent += node_sent;
        arrived += c("owner_accept");
        accepted_locally += c("local_accept");
        for bad in [
            "malformed",
            "spoofed",
            "loop_guard",
            "bad_encap",
            "no_route",
            "too_big",
        ] {
            ensure!(c(bad) == 0, "node {i}: {} packets dropped as {bad}", c(bad));
        }
    }
    println!(
        "{tag}: packets steered to other members {sent}, accepted by an owner {arrived}, accepted where they arrived {accepted_locally}"
    );
    ensure!(
        sent > 0 && arrived > 0,
        "no packet was steered: the route changes did not move any flow"
    );
    ensure!(
        accepted_locally > 0,
        "no packet was accepted where it arrived"
    );
    Ok(())
}

#[test]
fn route_shifts_reset_no_steered_download_ipv4() -> Result<()> {
    steered_shift_test("s4", false, 50, 6)
}

#[test]
fn route_shifts_reset_no_steered_download_ipv6() -> Result<()> {
    steered_shift_test("s6", true, 20, 3)
}

/// The negative control: the same shifts without steering reset downloads.
#[test]
fn without_steering_route_shifts_reset_downloads() -> Result<()> {
    let (_guard, lab) = lab("nc", false)?;
    let started = Instant::now();
    let (live, handle) = start_downloads(&lab, 50, false);
    wait_connected(&lab, &live, 50)?;
    let shifts = lab.shift_routes(3)?;
    let outcomes = handle
        .join()
        .map_err(|_| anyhow::anyhow!("download thread panicked"))?;
    report("no steering", &outcomes, shifts, started);
    let resets = outcomes.iter().filter(|o| o.reset).count();
    ensure!(
        resets > 0,
        "plain anycast reset no download: the test cannot tell steering works"
    );
    Ok(())
}

/// Owner of each download (by client port), asked from `node`'s live table.
fn owners(lab: &Lab, node: usize, live: &Live, v6: bool) -> Result<BTreeMap<usize, String>> {
    let client = if v6 { "[fd00:100::2]" } else { "10.100.0.2" };
    let vip = if v6 {
        format!("[{VIP_V6}]")
    } else {
        VIP_V4.to_string()
    };
    let ports = live.ports.lock().map(|p| p.clone()).unwrap_or_default();
    let mut out = BTreeMap::new();
    for (id, port) in ports {
        let text = lab.steer(
            node,
            &["lookup", &format!("{client}:{port}"), &format!("{vip}:80")],
        )?;
        let owner = text
            .lines()
            .find_map(|l| l.strip_prefix("owner: "))
            .and_then(|l| l.split_whitespace().next())
            .context("lookup printed no owner")?
            .to_string();
        out.insert(id, owner);
    }
    Ok(out)
}

#[test]
fn draining_keeps_flows_sends_no_new_ones_and_withdraws() -> Result<()> {
    let (_guard, lab) = lab("dr", true)?;
    let started = Instant::now();
    let (live, handle) = start_downloads(&lab, 30, false);
    wait_connected(&lab, &live, 30)?;
    let before = owners(&lab, 1, &live, false)?;
    ensure!(
        before.values().any(|o| o == "node1"),
        "no download owned by node1 to drain"
    );
    lab.steer(0, &["drain"])?;
    // Its routes go away at the router...
    lab.wait_until(Duration::from_secs(10), "node1's routes withdrawn", || {
        Ok(!lab.route_nodes(VIP_V4)?.contains(&0))
    })?;
    // ...and every node moves its buckets elsewhere (node1's /ready answers 503).
    for i in 0..lab.nodes.len() {
        lab.wait_until(Duration::from_secs(10), "node1 out of every table", || {
            let s = lab.status(i)?;
            Ok(s["members"]
                .as_array()
                .and_then(|m| m.iter().find(|m| m["name"] == "node1"))
                .is_some_and(|m| m["buckets"] == 0))
        })?;
    }
    // New connections during the drain land elsewhere.
    let (live2, handle2) = start_downloads(&lab, 10, false);
    wait_connected(&lab, &live2, 10)?;
    let new_owners = owners(&lab, 1, &live2, false)?;
    ensure!(
        new_owners.values().all(|o| o != "node1"),
        "a new connection went to the draining node: {new_owners:?}"
    );
    let outcomes = handle
        .join()
        .map_err(|_| anyhow::anyhow!("download thread panicked"))?;
    let outcomes2 = handle2
        .join()
        .map_err(|_| anyhow::anyhow!("download thread panicked"))?;
    report("drain (old flows)", &outcomes, 0, started);
    report("drain (new flows)", &outcomes2, 0, started);
    ensure!(
        outcomes.iter().chain(&outcomes2).all(|o| o.ok),
        "a download failed during the drain\n{}",
        lab.diagnostics()
    );
    lab.steer(0, &["undrain"])?;
    lab.wait_for_routes(3, Duration::from_secs(15))?;
    Ok(())
}

#[test]
fn a_failed_member_leaves_the_table_and_the_others_flows_survive() -> Result<()> {
    let (_guard, mut lab) = lab("mf", true)?;
    let started = Instant::now();
    let (live, handle) = start_downloads(&lab, 30, false);
    wait_connected(&lab, &live, 30)?;
    let before = owners(&lab, 0, &live, false)?;
    let stopped_at = Instant::now();
    lab.stop_node(2);
    lab.wait_until(
        Duration::from_secs(5),
        "node3 marked down and out of node1's table",
        || {
            let s = lab.status(0)?;
            Ok(s["members"]
                .as_array()
                .and_then(|m| m.iter().find(|m| m["name"] == "node3"))
                .is_some_and(|m| m["healthy"] == false && m["buckets"] == 0))
        },
    )?;
    let left_table = stopped_at.elapsed();
    lab.wait_until(Duration::from_secs(10), "node3's route withdrawn", || {
        Ok(lab.route_nodes(VIP_V4)? == vec![0, 1])
    })?;
    let outcomes = handle
        .join()
        .map_err(|_| anyhow::anyhow!("download thread panicked"))?;
    report("member failure", &outcomes, 0, started);
    println!(
        "member failure: node3 left the table {:.2} s after it stopped",
        left_table.as_secs_f64()
    );
    for o in &outcomes {
        let owner = before.get(&o.id).map(String::as_str).unwrap_or("?");
        ensure!(
            o.ok || owner == "node3",
            "download {} owned by {owner} failed: {:?}",
            o.id,
            o.error
        );
    }
    Ok(())
}

#[test]
fn route_changes_and_membership_changes_together() -> Result<()> {
    let (_guard, lab) = lab("rm", true)?;
    let started = Instant::now();
    let (live, handle) = start_downloads(&lab, 40, false);
    wait_connected(&lab, &live, 40)?;
    // node2 leaves by drain while node1's routes flap; then node2 rejoins while node3's do.
    let routes_are = |want: Vec<usize>, what: &str| {
        lab.wait_until(Duration::from_secs(15), what, || {
            Ok(lab.route_nodes(VIP_V4)? == want)
        })
    };
    lab.steer(1, &["drain"])?;
    routes_are(vec![0, 2], "node2's routes withdrawn by its drain")?;
    lab.withdraw_at_router(0)?;
    routes_are(vec![2], "node1's routes withdrawn at the router")?;
    std::thread::sleep(Duration::from_millis(700));
    lab.restore_at_router(0)?;
    routes_are(vec![0, 2], "node1's routes back")?;
    lab.steer(1, &["undrain"])?;
    lab.withdraw_at_router(2)?;
    routes_are(vec![0, 1], "node2 back after its undrain, node3 withdrawn")?;
    std::thread::sleep(Duration::from_millis(700));
    lab.restore_at_router(2)?;
    routes_are(vec![0, 1, 2], "every node's routes back")?;
    let outcomes = handle
        .join()
        .map_err(|_| anyhow::anyhow!("download thread panicked"))?;
    report("route + membership change", &outcomes, 2, started);
    ensure!(
        outcomes.iter().all(|o| o.ok),
        "a download failed\n{}",
        lab.diagnostics()
    );
    ensure!(live.resets.load(Ordering::Relaxed) == 0, "resets seen");
    Ok(())
}

/// A controller killed with SIGKILL and started again: the data plane keeps forwarding with the
/// pinned maps meanwhile, the new controller takes the program over in place and continues the
/// tables' generations and history, and downloads through route changes survive all of it.
/// Also: a bad configuration sent with SIGHUP is refused and the running table stays.
#[test]
fn controller_restart_and_reload_keep_traffic_flowing() -> Result<()> {
    let (_guard, mut lab) = lab("rs", true)?;
    let started = Instant::now();
    let generation = |lab: &Lab| -> Result<u64> {
        let s = lab.status(0)?;
        s["services"][0]["generation"]
            .as_u64()
            .context("no generation in status")
    };
    let before = generation(&lab)?;
    let (live, handle) = start_downloads(&lab, 30, false);
    wait_connected(&lab, &live, 30)?;

    // kill -9: the program stays attached and keeps steering.
    let controller = lab.nodes[0]
        .controller
        .as_mut()
        .context("node1 runs no controller")?;
    controller.signal(libc::SIGKILL, Duration::from_secs(5))?;
    let attached = lab.nodes[0].ns.ip(&["link", "show", "eth0"])?;
    ensure!(
        attached.contains("prog/xdp"),
        "program detached when the controller died:\n{attached}"
    );
    // Route changes while node1 has no controller: its data plane steers on its own.
    lab.withdraw_at_router(1)?;
    lab.wait_for_routes(2, Duration::from_secs(10))?;
    lab.restore_at_router(1)?;
    lab.wait_for_routes(3, Duration::from_secs(15))?;

    lab.start_controller(0)?;
    lab.wait_until(
        Duration::from_secs(15),
        "the restarted controller ready",
        || Ok(lab.status(0).is_ok_and(|s| s["ready"] == true)),
    )?;
    let s = lab.status(0)?;
    ensure!(
        s["attachments"][0]["replaced"] == true,
        "the program was not replaced in place: {s}"
    );
    let after = generation(&lab)?;
    ensure!(
        after >= before,
        "table generation went back from {before} to {after}: history lost"
    );

    // A bad configuration is refused; the table stays.
    let config = lab.nodes[0].config.clone();
    let good = std::fs::read_to_string(&config)?;
    std::fs::write(&config, good.replace("hash_key", "hash_kye"))?;
    let pid = lab.nodes[0]
        .controller
        .as_ref()
        .context("no controller")?
        .pid();
    // SAFETY: SIGHUP to the controller process this test started.
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    lab.wait_until(Duration::from_secs(5), "the bad reload refused", || {
        Ok(lab.status(0)?["reloads_failed"] == 1)
    })?;
    ensure!(
        generation(&lab)? == after,
        "a refused reload changed the table"
    );
    std::fs::write(&config, &good)?;

    lab.shift_routes(2)?;
    let outcomes = handle
        .join()
        .map_err(|_| anyhow::anyhow!("download thread panicked"))?;
    report("controller kill -9 and restart", &outcomes, 3, started);
    ensure!(
        outcomes.iter().all(|o| o.ok),
        "a download failed\n{}",
        lab.diagnostics()
    );
    Ok(())
}
