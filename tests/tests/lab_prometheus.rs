//! The shipped dashboard and alert rules against a real Prometheus (`/usr/bin/prometheus`, the
//! Debian package) scraping every node of the lab: after some downloads, every query of every
//! panel of `packaging/grafana/cdn-steer.json` returns data, every metric the alert rules use
//! exists, the rules load, and none of them is pending or firing in a healthy cluster.
//!
//! Prometheus runs in the lab's router namespace, the one place that reaches every node's
//! metrics endpoint (on its underlay address), and listens on the router's loopback; the test
//! asks it from a thread that joins that namespace. Everything it starts is stopped by pid and
//! its files removed on every exit path (the values' `Drop`: Prometheus before the lab).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use cdn_test_support::{
    process::{Group, Process},
    scratch::ScratchDir,
    wait,
};
use cdn_tests::{
    download::{self, Live, Spec},
    lab::{Lab, LabOptions, METRICS_PORT},
    netns::Netns,
};
use serde_json::Value;

/// Where Prometheus listens, in the router's namespace.
const PROMETHEUS: &str = "127.0.0.1:9090";
/// What the dashboard's variables stand for when every cluster and node is selected, and the
/// rate window Grafana would pick for a 1 s scrape interval (four scrapes and more).
const VARIABLES: [(&str, &str); 3] = [
    ("$__rate_interval", "15s"),
    ("$job", ".*"),
    ("$instance", ".*"),
];

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Percent-encodes a query parameter (everything but RFC 3986's unreserved characters).
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `GET path` from Prometheus: one HTTP/1.0 request, so the answer is neither chunked nor kept
/// alive. Returns the status and the body.
fn get(router: &Netns, path: &str) -> Result<(u16, String)> {
    let addr: SocketAddr = PROMETHEUS.parse()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {PROMETHEUS}\r\n\r\n");
    let answer = router.enter(|| -> Result<Vec<u8>> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(request.as_bytes())?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        Ok(answer)
    })??;
    let answer = String::from_utf8(answer).context("answer is not UTF-8")?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP head in {answer:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// The result of the instant query `expr`, which must succeed.
fn query(router: &Netns, expr: &str) -> Result<Vec<Value>> {
    let (status, body) = get(router, &format!("/api/v1/query?query={}", encode(expr)))?;
    let answer: Value =
        serde_json::from_str(&body).with_context(|| format!("query {expr}: {body}"))?;
    ensure!(
        status == 200 && answer["status"] == "success",
        "query {expr}: HTTP {status}: {body}"
    );
    Ok(answer["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// Every query of every panel of the dashboard, with its panel's title.
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or_default();
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((title.to_owned(), expr.to_owned()));
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// Every `cdn_steer_…` metric name an alert expression uses.
fn alert_metrics(rules: &str) -> Vec<String> {
    let mut names: Vec<String> = rules
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
        .filter(|w| w.starts_with("cdn_steer_"))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Starts Prometheus in the router's namespace, scraping every node each second and
/// evaluating the shipped alert rules.
fn start_prometheus(lab: &Lab, dir: &Path) -> Result<Process> {
    let targets: Vec<String> = lab
        .nodes
        .iter()
        .map(|n| format!("'{}:{METRICS_PORT}'", n.underlay))
        .collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
         rule_files:\n  - '{rules}'\n\
         scrape_configs:\n  - job_name: cdn-steer\n    static_configs:\n      - targets: [{targets}]\n",
        rules = repo_file("packaging/prometheus/cdn-steer-alerts.yml").display(),
        targets = targets.join(", "),
    );
    let config_path = dir.join("prometheus.yml");
    std::fs::write(&config_path, config)?;
    let mut command = lab.router.command("/usr/bin/prometheus");
    command.args([
        &format!("--config.file={}", config_path.display()),
        &format!("--storage.tsdb.path={}", dir.join("data").display()),
        &format!("--web.listen-address={PROMETHEUS}"),
        "--log.level=warn",
    ]);
    Process::spawn(
        "prometheus",
        command,
        Group::Own,
        &dir.join("prometheus.log"),
    )
}

#[test]
fn every_dashboard_query_returns_data_from_a_real_prometheus() -> Result<()> {
    let started = Instant::now();
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(repo_file(
        "packaging/grafana/cdn-steer.json",
    ))?)?;
    let rules = std::fs::read_to_string(repo_file("packaging/prometheus/cdn-steer-alerts.yml"))?;
    let queries = panel_queries(&dashboard);
    ensure!(queries.len() >= 20, "dashboard queries: {queries:?}");

    let lab = Lab::start(LabOptions {
        tag: "pm".into(),
        file_size: 256 * 1024,
        ..LabOptions::default()
    })?;
    let dir = ScratchDir::new("prometheus")?;
    // Declared after the lab, so dropped (killed) before it.
    let mut prometheus = start_prometheus(&lab, dir.path())?;
    let router = &lab.router;
    let nodes = lab.nodes.len();

    let mut ready = || -> Result<bool> {
        if !prometheus.is_running() {
            bail!("prometheus exited:\n{}", prometheus.log_text());
        }
        Ok(
            get(router, "/-/ready").is_ok_and(|(status, _)| status == 200)
                && query(router, "up == 1")?.len() == nodes,
        )
    };
    wait::until(
        Duration::from_secs(20),
        "Prometheus scraping every node",
        &mut ready,
    )?;

    // Traffic: downloads through every node, so the traffic panels have something to show.
    let spec = Spec {
        vip: lab.vip(false),
        port: 80,
        size: lab.opts.file_size,
        seed: lab.opts.file_seed,
        rate: usize::MAX,
        timeout: Duration::from_secs(20),
    };
    let outcomes = download::run_all(
        &lab.client_netns_path(),
        12,
        &spec,
        Arc::new(Live::default()),
    );
    let ok = outcomes.iter().filter(|o| o.ok).count();
    ensure!(
        ok == outcomes.len(),
        "{ok} of {} downloads complete: {:?}",
        outcomes.len(),
        outcomes.iter().find(|o| !o.ok)
    );

    // Rates need two scrapes inside their window after the downloads.
    let forwarded = "sum(increase(cdn_steer_member_forwarded_packets_total[15s])) > 0";
    wait::until(
        Duration::from_secs(15),
        "the forwarded packets in Prometheus",
        || Ok(!query(router, forwarded)?.is_empty()),
    )?;

    let mut empty = Vec::new();
    for (panel, expr) in &queries {
        let mut expr = expr.clone();
        for (variable, value) in VARIABLES {
            expr = expr.replace(variable, value);
        }
        ensure!(!expr.contains('$'), "{panel}: unknown variable in {expr}");
        let result = query(router, &expr)?;
        println!("{panel:<42} {:>3} series  {expr}", result.len());
        if result.is_empty() {
            empty.push(format!("{panel}: {expr}"));
        }
    }
    ensure!(
        empty.is_empty(),
        "queries without data:\n{}",
        empty.join("\n")
    );

    // The alert rules: loaded by Prometheus, every metric they use exists, none pending or
    // firing while the cluster is healthy and its nodes agree.
    for metric in alert_metrics(&rules) {
        ensure!(
            !query(router, &metric)?.is_empty(),
            "the alert rules use {metric}, which no node exports"
        );
    }
    let (_, body) = get(router, "/api/v1/rules")?;
    let answer: Value = serde_json::from_str(&body)?;
    let loaded: Vec<&Value> = answer["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    ensure!(loaded.len() >= 9, "rules loaded: {body}");
    for rule in &loaded {
        ensure!(rule["health"] != "err", "rule failed to evaluate: {rule:#}");
    }
    let (_, body) = get(router, "/api/v1/alerts")?;
    let alerts: Value = serde_json::from_str(&body)?;
    ensure!(
        alerts["data"]["alerts"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "alerts in a healthy cluster: {alerts:#}"
    );
    // The drift panels agree: one configuration, one table per service.
    ensure!(
        query(
            router,
            "count(count_values(\"d\", cdn_steer_config_digest)) == 1"
        )?
        .len()
            == 1,
        "the nodes' configuration digests differ"
    );
    ensure!(
        query(
            router,
            "count by (service) (count_values by (service) (\"d\", cdn_steer_table_digest)) == 1"
        )?
        .len()
            == 1,
        "the nodes' table digests differ: {:?}",
        query(router, "cdn_steer_table_digest")?
    );
    println!(
        "{} panel queries checked against Prometheus in {:.1} s",
        queries.len(),
        started.elapsed().as_secs_f64()
    );
    drop(prometheus);
    Ok(())
}
