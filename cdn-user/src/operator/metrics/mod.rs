//! Prometheus metrics of the controller: a [`Snapshot`] rendered as exposition text, which
//! `crate::operator::http` serves at `/metrics`.
//!
//! The daemon owns all the state (data-plane counters in BPF maps, health results, tables), so
//! instead of keeping live metric objects in sync with it, every scrape asks the daemon for a
//! [`Snapshot`] and renders that into a fresh `prometheus-client` registry through a
//! [`Collector`] with constant metrics. Nothing here holds state between scrapes.
//!
//! Two exposition formats are offered, chosen from the scraper's `Accept` header:
//! OpenMetrics 1.0 (what `prometheus-client` produces, and what Prometheus asks for first), and
//! the classic Prometheus text format 0.0.4 for everything else (curl, `promtool check metrics`,
//! older scrapers). See [`Format`].

use std::collections::HashMap;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

pub use super::report::{HealthChecksReport, LearnedReport, MemberReport, PopReport};

use crate::config::Digest;
use cdn_common::counters::PacketCounts;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

mod pops;

/// What the daemon knows at scrape time; everything the metrics show comes from here.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Data-plane counters summed over all CPUs, per (reason, action).
    pub counters: PacketCounts,
    /// Every configured member, this node included.
    pub members: Vec<MemberReport>,
    /// Every configured service.
    pub services: Vec<ServiceMetrics>,
    /// Whether this node is draining (passes new connections on instead of accepting them).
    pub draining: bool,
    /// How the XDP program is attached: `"native"`, `"generic"` or `"detached"`.
    pub attach_mode: String,
    /// Interfaces the XDP program is (or should be) attached to.
    pub interfaces: Vec<String>,
    /// State of the BGP announcement; `None` when BGP integration is off.
    pub bgp: Option<BgpMetrics>,
    /// Digest of the cluster-wide configuration in force (`[cluster]` and `[[services]]`).
    pub config_digest: Digest,
    /// Configuration reloads that were applied.
    pub config_reloads_ok: u64,
    /// Configuration reloads that were refused (the previous configuration stayed in force).
    pub config_reloads_failed: u64,
    /// When the controller started.
    pub start_time: SystemTime,
    /// Local probe failures and the mass-flap hold.
    pub health_checks: HealthChecksReport,
    /// Every PoP; empty without PoPs (no `cdn_steer_pop_*` series then).
    pub pops: Vec<PopReport>,
    /// Learned owners and claims; `None` without PoPs (no such series then).
    pub learned: Option<LearnedReport>,
}

/// Per-service state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceMetrics {
    /// Service name from the configuration; the `service` label.
    pub name: String,
    /// Generation of the steering table last written to the data plane; grows with every write.
    pub table_generation: u64,
    /// Buckets in the service's steering table.
    pub buckets: u32,
    /// Who accepts its UDP flows: `owner`, `local` or `connected`.
    pub udp_mode: String,
    /// Digest of the active table (`crate::cluster::sync::table_digest`).
    pub table_digest: Digest,
    /// Its QUIC settings: the `quic_*` labels of `cdn_steer_service_info`, only on services
    /// that have QUIC (the others keep the labels they had before QUIC routing existed).
    pub quic: Option<super::quic::QuicStatus>,
}

/// State of the BGP announcement through BIRD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BgpMetrics {
    /// Whether BIRD's control socket answered the last poll.
    pub bird_reachable: bool,
    /// Whether the anycast prefixes are announced, as BIRD reports it; `None` when unknown
    /// (BIRD unreachable).
    pub announced: Option<bool>,
    /// Whether the controller wants them announced (healthy and not draining).
    pub wanted: bool,
    /// Announce/withdraw changes the controller made.
    pub transitions: u64,
}

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot encode the metrics")]
    Encode(#[from] fmt::Error),
}

/// Exposition format of a scrape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text, as `prometheus-client` writes it.
    OpenMetrics,
    /// Prometheus text format 0.0.4.
    PrometheusText,
}

impl Format {
    /// The `Content-Type` of a response in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::PrometheusText => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// Picks the format for an `Accept` header. OpenMetrics only when the client asks for it
    /// explicitly and prefers it at least as much as plain text; otherwise (no header, `*/*`,
    /// `text/plain`, or nothing we have) the Prometheus text format, as the Go client does,
    /// because every scraper and every human understands that one.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let (mut openmetrics, mut text) = (0.0f32, 0.0f32);
        for range in accept.unwrap_or_default().split(',') {
            let mut params = range.split(';').map(str::trim);
            let media = params.next().unwrap_or_default().to_ascii_lowercase();
            let mut q = Some(1.0);
            for param in params {
                if let Some((name, value)) = param.split_once('=')
                    && name.trim().eq_ignore_ascii_case("q")
                {
                    q = value
                        .trim()
                        .parse::<f32>()
                        .ok()
                        .filter(|q| (0.0..=1.0).contains(q));
                }
            }
            // A range with an invalid weight is ignored rather than guessed at.
            let Some(q) = q else { continue };
            match media.as_str() {
                "application/openmetrics-text" | "application/*" => {
                    openmetrics = openmetrics.max(q);
                }
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Format::OpenMetrics
        } else {
            Format::PrometheusText
        }
    }
}

/// Renders `snapshot` as OpenMetrics text.
pub fn encode(snapshot: &Snapshot) -> Result<String, MetricsError> {
    encode_as(snapshot, Format::OpenMetrics)
}

/// Renders `snapshot` in `format`.
pub fn encode_as(snapshot: &Snapshot, format: Format) -> Result<String, MetricsError> {
    render(snapshot.clone(), format)
}

/// As [`encode_as`], taking the snapshot by value: a registered collector must own its data.
pub fn render(snapshot: Snapshot, format: Format) -> Result<String, MetricsError> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
    let mut openmetrics = String::with_capacity(8 * 1024);
    prometheus_client::encoding::text::encode(&mut openmetrics, &registry)?;
    Ok(match format {
        Format::OpenMetrics => openmetrics,
        Format::PrometheusText => openmetrics_to_prometheus(&openmetrics),
    })
}

/// Rewrites OpenMetrics text into Prometheus text format 0.0.4, which `prometheus-client` has no
/// encoder for. The two differ only in metadata lines: in OpenMetrics a counter family `x` has
/// samples `x_total` and an info family `x` samples `x_info`, while 0.0.4 names the family like
/// its samples (and has no info type, only gauges); 0.0.4 has no `# UNIT` and no `# EOF`. Sample
/// lines are the same in both (label escaping included), so they are copied as they are.
fn openmetrics_to_prometheus(openmetrics: &str) -> String {
    // Metadata lines always start with `# `; sample lines never do (a sample starts with its
    // name), and `prometheus-client` escapes newlines in label values, so going line by line
    // cannot mistake one for the other.
    let mut renamed: HashMap<&str, (&str, &str)> = HashMap::new();
    for line in openmetrics.lines() {
        if let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|t| t.split_once(' ')) {
            let mapping = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "unknown" => ("", "untyped"),
                other => ("", other),
            };
            renamed.insert(name, mapping);
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let help = line.strip_prefix("# HELP ").map(|rest| ("HELP", rest));
        let kind = line.strip_prefix("# TYPE ").map(|rest| ("TYPE", rest));
        let Some((keyword, rest)) = help.or(kind) else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
        let (suffix, new_kind) = renamed.get(name).copied().unwrap_or(("", text));
        let text = if keyword == "TYPE" { new_kind } else { text };
        for part in ["# ", keyword, " ", name, suffix, " ", text, "\n"] {
            out.push_str(part);
        }
    }
    out
}

/// The snapshot as a `prometheus-client` collector.
#[derive(Debug)]
struct SnapshotCollector(Snapshot);

/// Help of the per-reason packet counters.
const PACKETS_HELP: &str = "Packets handled by the XDP program, summed over CPUs, by reason (why) \
     and action (the XDP action returned: pass, drop, tx, redirect, aborted). Every packet is \
     counted in exactly one series of kind verdict, so those add up to the packets seen; series \
     of kind info count events that come on top of a packet's verdict, with its action.";

/// Help of the configuration digest.
const CONFIG_DIGEST_HELP: &str = "First 48 bits of the SHA-256 digest of the cluster-wide \
     configuration in force ([cluster] and [[services]], canonicalised): the same on every node \
     of a cluster. `cdn-steer status` shows it in hex (12 digits) and compares it with the peers'.";

/// Help of the table digests.
const TABLE_DIGEST_HELP: &str = "First 48 bits of the SHA-256 digest of the service's active \
     steering table (every bucket's owner and the set of its history hops): the same on every \
     node once their health views and histories agree.";

/// A digest as a gauge: its 48-bit prefix, an integer, which every Prometheus value (an f64)
/// holds exactly. The full digest as a label instead would make a new series at every table
/// change; this keeps one series and still compares across nodes with `count_values`.
fn digest_gauge(digest: &Digest) -> ConstGauge<i64> {
    // Below 2^48, so it fits.
    ConstGauge::new(i64::try_from(digest.prefix()).unwrap_or(i64::MAX))
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        let enc = &mut enc;

        family(
            enc,
            "cdn_steer_packets",
            PACKETS_HELP,
            None,
            s.counters.series().map(|(reason, action, n)| {
                (
                    [
                        ("reason", reason.name()),
                        ("action", action.name()),
                        ("kind", reason.kind().name()),
                    ],
                    ConstCounter::new(n),
                )
            }),
        )?;

        let member = |m: &MemberReport| [("member", m.name.clone())];
        family(
            enc,
            "cdn_steer_member",
            "Members of the cluster: id from the configuration, local true for this node.",
            None,
            s.members.iter().map(|m| {
                let labels = [
                    ("member", m.name.clone()),
                    ("id", m.id.to_string()),
                    ("local", m.is_self.to_string()),
                ];
                // `Info` carries its labels itself; the family labels stay empty.
                (NO_LABELS, Info::new(labels))
            }),
        )?;
        family(
            enc,
            "cdn_steer_member_forwarded_packets",
            "Client packets this node forwarded to the member.",
            None,
            s.members
                .iter()
                .map(|m| (member(m), ConstCounter::new(m.forwarded_packets))),
        )?;
        family(
            enc,
            "cdn_steer_member_forwarded",
            "Bytes of the client packets this node forwarded to the member.",
            Some(&Unit::Bytes),
            s.members
                .iter()
                .map(|m| (member(m), ConstCounter::new(m.forwarded_bytes))),
        )?;
        family(
            enc,
            "cdn_steer_member_health_checked",
            "1 once the member has been health-checked, 0 before (then member_up is absent).",
            None,
            s.members
                .iter()
                .map(|m| (member(m), ConstGauge::new(i64::from(m.healthy.is_some())))),
        )?;
        family(
            enc,
            "cdn_steer_member_up",
            "Result of the last health check of the member: 1 healthy, 0 not; absent while never \
             checked.",
            None,
            s.members.iter().filter_map(|m| {
                m.healthy
                    .map(|up| (member(m), ConstGauge::new(i64::from(up))))
            }),
        )?;
        family(
            enc,
            "cdn_steer_member_check_latency",
            "Duration of the last health check of the member.",
            Some(&Unit::Seconds),
            s.members.iter().filter_map(|m| {
                m.last_check_ms
                    .map(|ms| (member(m), ConstGauge::new(ms / 1000.0)))
            }),
        )?;
        family(
            enc,
            "cdn_steer_member_bucket_share",
            "Fraction (0 to 1) of the steering buckets of all services that the member owns; with \
             PoPs, of the tables of its PoP (label pop).",
            None,
            s.members.iter().map(|m| {
                let mut labels = vec![("member", m.name.clone())];
                if let Some(pop) = &m.pop {
                    labels.push(("pop", pop.clone()));
                }
                (labels, ConstGauge::new(m.share))
            }),
        )?;
        pops::pop_families(enc, s)?;
        family(
            enc,
            "cdn_steer_member_weight",
            "Configured weight of the member.",
            None,
            s.members
                .iter()
                .map(|m| (member(m), ConstGauge::new(i64::from(m.weight)))),
        )?;

        let service = |v: &ServiceMetrics| [("service", v.name.clone())];
        family(
            enc,
            "cdn_steer_service",
            "Services, with the placement of their UDP flows (owner, local or connected) and, \
             for a service with QUIC routing, its QUIC-LB settings.",
            None,
            s.services.iter().map(|v| {
                let mut labels = vec![
                    ("service", v.name.clone()),
                    ("udp_mode", v.udp_mode.clone()),
                ];
                if let Some(q) = &v.quic {
                    let ports: Vec<String> = q.ports.iter().map(u16::to_string).collect();
                    labels.extend([
                        ("quic_ports", ports.join(",")),
                        ("quic_config_id", q.config_id.to_string()),
                        ("quic_server_id_len", q.server_id_len.to_string()),
                        ("quic_cid_len", q.cid_len.to_string()),
                    ]);
                }
                (NO_LABELS, Info::new(labels))
            }),
        )?;
        family(
            enc,
            "cdn_steer_table_generation",
            "Generation of the steering table last written to the data plane.",
            None,
            s.services
                .iter()
                .map(|v| (service(v), ConstGauge::new(v.table_generation))),
        )?;
        family(
            enc,
            "cdn_steer_table_buckets",
            "Buckets in the steering table of the service.",
            None,
            s.services
                .iter()
                .map(|v| (service(v), ConstGauge::new(i64::from(v.buckets)))),
        )?;

        family(
            enc,
            "cdn_steer_table_digest",
            TABLE_DIGEST_HELP,
            None,
            s.services
                .iter()
                .map(|v| (service(v), digest_gauge(&v.table_digest))),
        )?;

        family(
            enc,
            "cdn_steer_health_local_errors",
            "Health probes that failed for a local reason (fd_limit: out of file descriptors, \
             no_buffers: out of socket memory, no_local_port, no_route: no route in this node's \
             table), by reason. Retried, never counted against the member.",
            None,
            s.health_checks
                .local_errors
                .iter()
                .map(|(reason, n)| ([("reason", reason.as_str())], ConstCounter::new(*n))),
        )?;
        single(
            enc,
            "cdn_steer_health_mass_flap",
            "1 while every member that was up went down within one check round and the table \
             keeps them (the cause is this node); 0 otherwise.",
            None,
            ConstGauge::new(i64::from(!s.health_checks.held_members.is_empty())),
        )?;
        single(
            enc,
            "cdn_steer_draining",
            "1 while this node is draining (new connections are passed on), else 0.",
            None,
            ConstGauge::new(i64::from(s.draining)),
        )?;
        let attached = i64::from(s.attach_mode != "detached");
        family(
            enc,
            "cdn_steer_xdp_attached",
            "1 if the XDP program is attached to the interface in the given mode, 0 if detached.",
            None,
            s.interfaces.iter().map(|interface| {
                (
                    [("interface", interface.as_str()), ("mode", &s.attach_mode)],
                    ConstGauge::new(attached),
                )
            }),
        )?;

        if let Some(bgp) = &s.bgp {
            single(
                enc,
                "cdn_steer_bgp_bird_reachable",
                "1 if the BIRD control socket answered the last poll, else 0.",
                None,
                ConstGauge::new(i64::from(bgp.bird_reachable)),
            )?;
            if let Some(announced) = bgp.announced {
                single(
                    enc,
                    "cdn_steer_bgp_announced",
                    "1 if BIRD reports the anycast prefixes announced, 0 if withdrawn; absent \
                     while unknown.",
                    None,
                    ConstGauge::new(i64::from(announced)),
                )?;
            }
            single(
                enc,
                "cdn_steer_bgp_announce_wanted",
                "1 if the controller wants the anycast prefixes announced, else 0.",
                None,
                ConstGauge::new(i64::from(bgp.wanted)),
            )?;
            single(
                enc,
                "cdn_steer_bgp_transitions",
                "Announce and withdraw changes the controller made.",
                None,
                ConstCounter::new(bgp.transitions),
            )?;
        }

        single(
            enc,
            "cdn_steer_config_digest",
            CONFIG_DIGEST_HELP,
            None,
            digest_gauge(&s.config_digest),
        )?;
        family(
            enc,
            "cdn_steer_config_reloads",
            "Configuration reloads, by result (a failed one leaves the previous configuration).",
            None,
            [
                ([("result", "ok")], ConstCounter::new(s.config_reloads_ok)),
                (
                    [("result", "failed")],
                    ConstCounter::new(s.config_reloads_failed),
                ),
            ],
        )?;
        single(
            enc,
            "cdn_steer_build",
            "Version of the running controller.",
            None,
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        )?;
        // A clock set before 1970 has no meaningful value to show; leave the series out.
        if let Ok(since_epoch) = s.start_time.duration_since(UNIX_EPOCH) {
            single(
                enc,
                "cdn_steer_start_time",
                "Start time of the controller, in seconds since the Unix epoch.",
                Some(&Unit::Seconds),
                ConstGauge::new(since_epoch.as_secs_f64()),
            )?;
        }
        Ok(())
    }
}

/// Empty family label set for metrics that carry their own labels ([`Info`]). Only for those:
/// a gauge or counter with an empty family label set would be written as `name{}`; unlabelled
/// ones go through [`single`].
const NO_LABELS: [(&str, &str); 0] = [];

/// Writes one metric family with one series per item; nothing at all when there are no items
/// (an empty family would only be metadata without data).
pub(super) fn family<L: EncodeLabelSet, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result {
    let mut series = series.into_iter().peekable();
    let Some((_, first)) = series.peek() else {
        return Ok(());
    };
    let mut family = enc.encode_descriptor(name, help, unit, first.metric_type())?;
    for (labels, metric) in series {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes one metric family with a single unlabelled series.
pub(super) fn single<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric: M,
) -> fmt::Result {
    metric.encode(enc.encode_descriptor(name, help, unit, metric.metric_type())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdn_common::counters::{Action, Reason, counter_slot};
    use std::io::Write;
    use std::process::{Command, Stdio};

    fn snapshot() -> Snapshot {
        let mut counters = PacketCounts::default();
        for (i, c) in counters.slots.iter_mut().enumerate() {
            *c = 100 + i as u64;
        }
        counters.set(Reason::Forwarded, Action::Tx, 7);
        Snapshot {
            counters,
            members: vec![
                MemberReport {
                    id: 1,
                    name: "node-a".into(),
                    healthy: None,
                    last_check_ms: None,
                    forwarded_packets: 0,
                    forwarded_bytes: 0,
                    share: 0.5,
                    weight: 100,
                    is_self: true,
                    ..MemberReport::default()
                },
                MemberReport {
                    id: 2,
                    name: "node-b".into(),
                    healthy: Some(true),
                    last_check_ms: Some(2.5),
                    forwarded_packets: 7,
                    forwarded_bytes: 7000,
                    share: 0.25,
                    weight: 50,
                    is_self: false,
                    ..MemberReport::default()
                },
                MemberReport {
                    id: 3,
                    // Label values come from the configuration: they must be escaped.
                    name: "node \"c\"\\".into(),
                    healthy: Some(false),
                    last_check_ms: Some(1000.0),
                    forwarded_packets: u64::MAX,
                    forwarded_bytes: 1,
                    share: 0.25,
                    weight: 50,
                    is_self: false,
                    ..MemberReport::default()
                },
            ],
            services: vec![
                ServiceMetrics {
                    name: "web".into(),
                    table_generation: 3,
                    buckets: 65537,
                    udp_mode: "owner".into(),
                    table_digest: Digest([1; 32]),
                    quic: Some(crate::operator::quic::QuicStatus {
                        ports: vec![443, 8443],
                        config_id: 1,
                        server_id_len: 2,
                        cid_len: 8,
                    }),
                },
                ServiceMetrics {
                    name: "dns".into(),
                    table_generation: 12,
                    buckets: 251,
                    udp_mode: "owner".into(),
                    table_digest: Digest([2; 32]),
                    quic: None,
                },
            ],
            draining: false,
            attach_mode: "native".into(),
            interfaces: vec!["eth0".into(), "eth1".into()],
            bgp: Some(BgpMetrics {
                bird_reachable: true,
                announced: Some(true),
                wanted: true,
                transitions: 4,
            }),
            config_digest: Digest([0xab; 32]),
            config_reloads_ok: 2,
            config_reloads_failed: 1,
            start_time: UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_500),
            health_checks: HealthChecksReport {
                local_errors: [("fd_limit".to_owned(), 3), ("no_route".to_owned(), 0)].into(),
                held_members: vec!["node-a".into()],
                held_since: Some(1_700_000_001.0),
            },
            pops: Vec::new(),
            learned: None,
        }
    }

    fn samples(exposition: &str) -> Vec<&str> {
        exposition.lines().filter(|l| !l.starts_with('#')).collect()
    }

    /// Every sample of the test snapshot, in order; the same in both formats.
    fn expected_samples() -> Vec<String> {
        // Every pair is non-zero in the test snapshot, so every pair shows, in slot order.
        let mut expected: Vec<String> = Reason::ALL
            .iter()
            .flat_map(|&r| Action::ALL.iter().map(move |&a| (r, a)))
            .map(|(r, a)| {
                let kind = if r.is_verdict() { "verdict" } else { "info" };
                let value = if (r, a) == (Reason::Forwarded, Action::Tx) {
                    7
                } else {
                    100 + u64::from(counter_slot(r, a))
                };
                format!(
                    "cdn_steer_packets_total{{reason=\"{}\",action=\"{}\",kind=\"{kind}\"}} {value}",
                    r.name(),
                    a.name()
                )
            })
            .collect();
        let version = env!("CARGO_PKG_VERSION");
        let c = r#"node \"c\"\\"#;
        expected.extend(
            [
                r#"cdn_steer_member_info{member="node-a",id="1",local="true"} 1"#,
                r#"cdn_steer_member_info{member="node-b",id="2",local="false"} 1"#,
                &format!(r#"cdn_steer_member_info{{member="{c}",id="3",local="false"}} 1"#),
                r#"cdn_steer_member_forwarded_packets_total{member="node-a"} 0"#,
                r#"cdn_steer_member_forwarded_packets_total{member="node-b"} 7"#,
                &format!(
                    r#"cdn_steer_member_forwarded_packets_total{{member="{c}"}} 18446744073709551615"#
                ),
                r#"cdn_steer_member_forwarded_bytes_total{member="node-a"} 0"#,
                r#"cdn_steer_member_forwarded_bytes_total{member="node-b"} 7000"#,
                &format!(r#"cdn_steer_member_forwarded_bytes_total{{member="{c}"}} 1"#),
                r#"cdn_steer_member_health_checked{member="node-a"} 0"#,
                r#"cdn_steer_member_health_checked{member="node-b"} 1"#,
                &format!(r#"cdn_steer_member_health_checked{{member="{c}"}} 1"#),
                r#"cdn_steer_member_up{member="node-b"} 1"#,
                &format!(r#"cdn_steer_member_up{{member="{c}"}} 0"#),
                r#"cdn_steer_member_check_latency_seconds{member="node-b"} 0.0025"#,
                &format!(r#"cdn_steer_member_check_latency_seconds{{member="{c}"}} 1.0"#),
                r#"cdn_steer_member_bucket_share{member="node-a"} 0.5"#,
                r#"cdn_steer_member_bucket_share{member="node-b"} 0.25"#,
                &format!(r#"cdn_steer_member_bucket_share{{member="{c}"}} 0.25"#),
                r#"cdn_steer_member_weight{member="node-a"} 100"#,
                r#"cdn_steer_member_weight{member="node-b"} 50"#,
                &format!(r#"cdn_steer_member_weight{{member="{c}"}} 50"#),
                r#"cdn_steer_service_info{service="web",udp_mode="owner",quic_ports="443,8443",quic_config_id="1",quic_server_id_len="2",quic_cid_len="8"} 1"#,
                r#"cdn_steer_service_info{service="dns",udp_mode="owner"} 1"#,
                r#"cdn_steer_table_generation{service="web"} 3"#,
                r#"cdn_steer_table_generation{service="dns"} 12"#,
                r#"cdn_steer_table_buckets{service="web"} 65537"#,
                r#"cdn_steer_table_buckets{service="dns"} 251"#,
                // 0x010101010101 and 0x020202020202: the digests' first 48 bits.
                r#"cdn_steer_table_digest{service="web"} 1103823438081"#,
                r#"cdn_steer_table_digest{service="dns"} 2207646876162"#,
                r#"cdn_steer_health_local_errors_total{reason="fd_limit"} 3"#,
                r#"cdn_steer_health_local_errors_total{reason="no_route"} 0"#,
                "cdn_steer_health_mass_flap 1",
                "cdn_steer_draining 0",
                r#"cdn_steer_xdp_attached{interface="eth0",mode="native"} 1"#,
                r#"cdn_steer_xdp_attached{interface="eth1",mode="native"} 1"#,
                "cdn_steer_bgp_bird_reachable 1",
                "cdn_steer_bgp_announced 1",
                "cdn_steer_bgp_announce_wanted 1",
                "cdn_steer_bgp_transitions_total 4",
                // 0xabababababab
                "cdn_steer_config_digest 188753807911851",
                r#"cdn_steer_config_reloads_total{result="ok"} 2"#,
                r#"cdn_steer_config_reloads_total{result="failed"} 1"#,
                &format!(r#"cdn_steer_build_info{{version="{version}"}} 1"#),
                "cdn_steer_start_time_seconds 1700000000.5",
            ]
            .map(str::to_owned),
        );
        expected
    }

    #[test]
    fn metrics_encode_every_series_with_its_value() {
        let text = encode(&snapshot()).unwrap();
        assert_eq!(samples(&text), expected_samples(), "\n{text}");
        assert!(text.ends_with("\n# EOF\n"), "{text}");
        for metadata in [
            "# TYPE cdn_steer_packets counter",
            "# TYPE cdn_steer_member info",
            "# TYPE cdn_steer_member_forwarded_bytes counter",
            "# UNIT cdn_steer_member_forwarded_bytes bytes",
            "# TYPE cdn_steer_member_up gauge",
            "# UNIT cdn_steer_member_check_latency_seconds seconds",
            "# TYPE cdn_steer_build info",
            &format!("# HELP cdn_steer_packets {PACKETS_HELP}"),
        ] {
            assert!(text.lines().any(|l| l == metadata), "{metadata}\n{text}");
        }
    }

    #[test]
    fn metrics_prometheus_text_renames_families_like_their_samples() {
        let text = encode_as(&snapshot(), Format::PrometheusText).unwrap();
        assert_eq!(samples(&text), expected_samples(), "\n{text}");
        for metadata in [
            "# TYPE cdn_steer_packets_total counter",
            &format!("# HELP cdn_steer_packets_total {PACKETS_HELP}"),
            "# TYPE cdn_steer_member_info gauge",
            "# TYPE cdn_steer_member_forwarded_bytes_total counter",
            "# TYPE cdn_steer_member_check_latency_seconds gauge",
            "# TYPE cdn_steer_build_info gauge",
            "# HELP cdn_steer_build_info Version of the running controller.",
            "# TYPE cdn_steer_start_time_seconds gauge",
        ] {
            assert!(text.lines().any(|l| l == metadata), "{metadata}\n{text}");
        }
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
    }

    #[test]
    fn metrics_show_pops_and_label_shares_with_them() {
        let mut s = snapshot();
        s.members[0].pop = Some("fra".into());
        s.members[1].pop = Some("ams".into());
        s.pops = vec![
            PopReport {
                name: "ams".into(),
                index: 0,
                members: 2,
                healthy: 1,
                eligible: 1,
                own: false,
                fallback: false,
                fallback_to: None,
            },
            PopReport {
                name: "fra".into(),
                index: 1,
                members: 1,
                healthy: 0,
                eligible: 2,
                own: true,
                fallback: true,
                fallback_to: Some("ams".to_owned()),
            },
        ];
        let text = encode(&s).unwrap();
        let samples = samples(&text);
        for line in [
            r#"cdn_steer_pop_members{pop="ams"} 2"#,
            r#"cdn_steer_pop_members{pop="fra"} 1"#,
            r#"cdn_steer_pop_healthy_members{pop="ams"} 1"#,
            r#"cdn_steer_pop_healthy_members{pop="fra"} 0"#,
            r#"cdn_steer_pop_fallback{pop="ams"} 0"#,
            r#"cdn_steer_pop_fallback{pop="fra"} 1"#,
            r#"cdn_steer_member_bucket_share{member="node-a",pop="fra"} 0.5"#,
            r#"cdn_steer_member_bucket_share{member="node-b",pop="ams"} 0.25"#,
        ] {
            assert!(samples.contains(&line), "no {line} in\n{text}");
        }
    }

    #[test]
    fn metrics_leave_out_what_is_unknown_or_absent() {
        let mut s = snapshot();
        s.members.clear();
        s.services.clear();
        s.interfaces = vec!["eth0".into()];
        s.attach_mode = "detached".into();
        s.draining = true;
        s.bgp.as_mut().unwrap().announced = None;
        let text = encode(&s).unwrap();
        assert!(!text.contains("cdn_steer_member"), "{text}");
        assert!(!text.contains("cdn_steer_pop"), "{text}");
        assert!(!text.contains("cdn_steer_table"), "{text}");
        assert!(!text.contains("cdn_steer_bgp_announced"), "{text}");
        let samples = samples(&text);
        assert!(samples.contains(&"cdn_steer_draining 1"), "{text}");
        assert!(
            samples.contains(&r#"cdn_steer_xdp_attached{interface="eth0",mode="detached"} 0"#),
            "{text}"
        );

        s.bgp = None;
        let text = encode(&s).unwrap();
        assert!(!text.contains("cdn_steer_bgp"), "{text}");
    }

    #[test]
    fn metrics_packets_show_every_possible_pair_even_at_zero_and_no_impossible_one() {
        let mut s = snapshot();
        s.counters = PacketCounts::default();
        let text = encode(&s).unwrap();
        let packets: Vec<&str> = samples(&text)
            .into_iter()
            .filter(|l| l.starts_with("cdn_steer_packets_total{"))
            .collect();
        for line in [
            r#"cdn_steer_packets_total{reason="forwarded",action="tx",kind="verdict"} 0"#,
            r#"cdn_steer_packets_total{reason="forwarded",action="redirect",kind="verdict"} 0"#,
            r#"cdn_steer_packets_total{reason="malformed",action="drop",kind="verdict"} 0"#,
            r#"cdn_steer_packets_total{reason="fib_miss",action="pass",kind="info"} 0"#,
        ] {
            assert!(packets.contains(&line), "{line}\n{text}");
        }
        // A reason that only ever drops has no series for the other actions.
        assert!(
            !packets
                .iter()
                .any(|l| l.contains(r#"reason="malformed",action="pass""#)),
            "{text}"
        );
        let declared: usize = Reason::ALL
            .iter()
            .map(|r| r.actions().count_ones() as usize)
            .sum();
        assert_eq!(packets.len(), declared, "{text}");

        // A pair outside the declaration still shows once it counts something.
        s.counters.set(Reason::Malformed, Action::Pass, 3);
        let text = encode(&s).unwrap();
        assert!(
            samples(&text).contains(
                &r#"cdn_steer_packets_total{reason="malformed",action="pass",kind="verdict"} 3"#
            ),
            "{text}"
        );
    }

    #[test]
    fn search_hops_are_a_histogram_with_every_count_of_three_pops() {
        let mut s = snapshot();
        s.learned = Some(LearnedReport {
            search_hops: vec![(1, 5), (2, 3), (9, 1), (50, 1)],
            search_hops_unknown: 2,
            ..LearnedReport::default()
        });
        let text = encode(&s).unwrap();
        let samples = samples(&text);
        for line in [
            r#"cdn_steer_search_hops_bucket{le="1.0"} 5"#,
            r#"cdn_steer_search_hops_bucket{le="2.0"} 8"#,
            r#"cdn_steer_search_hops_bucket{le="8.0"} 8"#,
            r#"cdn_steer_search_hops_bucket{le="10.0"} 9"#,
            r#"cdn_steer_search_hops_bucket{le="42.0"} 9"#,
            r#"cdn_steer_search_hops_bucket{le="+Inf"} 10"#,
            "cdn_steer_search_hops_count 10",
            "cdn_steer_search_hops_sum 70.0",
            "cdn_steer_search_hops_unknown_total 2",
        ] {
            assert!(samples.contains(&line), "no {line} in\n{text}");
        }
        assert!(
            text.lines()
                .any(|l| l == "# TYPE cdn_steer_search_hops histogram"),
            "{text}"
        );
    }

    #[test]
    fn metrics_format_follows_the_accept_header() {
        // What Prometheus 2.x sends.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                          version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        for (accept, format) in [
            (Some(prometheus), Format::OpenMetrics),
            (Some("application/openmetrics-text"), Format::OpenMetrics),
            (
                Some("Application/OpenMetrics-Text; q=0.5, text/plain; q=0.5"),
                Format::OpenMetrics,
            ),
            (None, Format::PrometheusText),
            (Some(""), Format::PrometheusText),
            (Some("*/*"), Format::PrometheusText),
            (Some("text/plain;version=0.0.4"), Format::PrometheusText),
            (
                Some("application/openmetrics-text;q=0"),
                Format::PrometheusText,
            ),
            (
                Some("application/openmetrics-text;q=nope"),
                Format::PrometheusText,
            ),
            (
                Some("application/openmetrics-text;q=0.4, text/*;q=0.5"),
                Format::PrometheusText,
            ),
            (Some("application/json"), Format::PrometheusText),
        ] {
            assert_eq!(Format::negotiate(accept), format, "{accept:?}");
        }
    }

    /// Runs `promtool check metrics` on `exposition`; returns whether it passed and what it said.
    fn promtool(exposition: &[u8]) -> (bool, String) {
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run promtool ({e}): install the Debian package `prometheus` \
                     (the project's setup does)"
                )
            });
        child.stdin.take().unwrap().write_all(exposition).unwrap();
        let output = child.wait_with_output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), said)
    }

    #[test]
    fn metrics_prometheus_text_passes_promtool() {
        // What a scrape without `Accept: application/openmetrics-text` gets (the HTTP tests in
        // `operator::http` check that it is this text).
        let text = encode_as(&snapshot(), Format::PrometheusText).unwrap();
        let (ok, said) = promtool(text.as_bytes());
        assert!(ok && said.trim().is_empty(), "promtool: {said}\n{text}");

        // The check can fail: promtool reads the Prometheus text format, so the OpenMetrics
        // rendering (info type, counters named without `_total`) does not pass it.
        let (ok, said) = promtool(encode(&snapshot()).unwrap().as_bytes());
        assert!(
            !ok || !said.trim().is_empty(),
            "promtool accepted OpenMetrics"
        );
    }
}
