//! Accounting: which downloads completed, which broke, and whether each broken one is explained
//! by the death of its owner (the member that served it was killed, or its web server was) at
//! a time the download was running. Pure logic over the event log and the download records,
//! so that it can be checked on a synthetic log.

use std::{collections::BTreeMap, fmt, net::IpAddr, time::Duration};

use super::schedule::Kind;

/// After a dead member is back, its peers need a moment to see it healthy again and tables to
/// agree; a download that breaks in that window is still blamed on the death.
pub const REVIVAL_GRACE: Duration = Duration::from_secs(2);

/// Whether an event starts or ends an episode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Begin,
    End,
}

/// One entry of the event log. Times are offsets from the start of the run.
#[derive(Clone, Debug)]
pub struct Event {
    pub at: Duration,
    pub kind: Kind,
    pub phase: Phase,
    /// The node it concerns (`node2`), if any.
    pub node: Option<String>,
    /// What happened, for the report (e.g. "refused: ..."), or an error.
    pub note: String,
    /// The step failed (a process did not restart, a bad config was taken, ...).
    pub failed: bool,
}

/// One download, as a worker saw it.
#[derive(Clone, Debug)]
pub struct DownloadRecord {
    pub id: usize,
    /// The VIP it downloaded from.
    pub vip: IpAddr,
    pub client_port: u16,
    pub started: Duration,
    pub ended: Duration,
    /// All bytes arrived and their SHA-256 matched.
    pub ok: bool,
    /// The connection was reset (ECONNRESET, EPIPE, ECONNABORTED).
    pub reset: bool,
    pub error: Option<String>,
    /// The member whose web server answered (`X-Served-By`), if the headers arrived.
    pub served_by: Option<String>,
    /// When the headers never arrived: the flow's hops (owner first, then previous owners) as
    /// a live controller's table gave them right after the failure.
    pub owners: Vec<String>,
}

/// When a member was dead (killed whole, or its web server was): `until` is when it was
/// started again, `None` if it still was at the end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Death {
    pub member: String,
    pub kind: Kind,
    pub from: Duration,
    pub until: Option<Duration>,
}

impl Death {
    /// Whether a download running from `started` to `ended` may have been broken by it.
    fn overlaps(&self, started: Duration, ended: Duration) -> bool {
        self.from <= ended && self.until.is_none_or(|u| u + REVIVAL_GRACE >= started)
    }
}

/// The owner deaths in an event log: each [`Kind::is_death`] episode's begin, matched with
/// the next end of the same kind on the same node.
pub fn deaths(events: &[Event]) -> Vec<Death> {
    let mut out: Vec<Death> = Vec::new();
    for e in events.iter().filter(|e| e.kind.is_death()) {
        let Some(node) = &e.node else { continue };
        match e.phase {
            Phase::Begin => out.push(Death {
                member: node.clone(),
                kind: e.kind,
                from: e.at,
                until: None,
            }),
            Phase::End => {
                if let Some(d) = out
                    .iter_mut()
                    .find(|d| d.member == *node && d.kind == e.kind && d.until.is_none())
                {
                    d.until = Some(e.at);
                }
            }
        }
    }
    out
}

/// Why a download did not complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blame {
    /// Its owner died while it ran.
    Explained { member: String, cause: Kind },
    /// No owner death accounts for it: the failure steering exists to prevent.
    Unexplained { suspects: Vec<String> },
}

/// Blames a failed download on its owner's death, if there is one: the member that served it,
/// or (when no header arrived) any hop its flow had in the table.
pub fn blame(download: &DownloadRecord, deaths: &[Death]) -> Blame {
    let suspects: Vec<String> = match &download.served_by {
        Some(member) => vec![member.clone()],
        None => download.owners.clone(),
    };
    for member in &suspects {
        if let Some(d) = deaths
            .iter()
            .find(|d| d.member == *member && d.overlaps(download.started, download.ended))
        {
            return Blame::Explained {
                member: member.clone(),
                cause: d.kind,
            };
        }
    }
    Blame::Unexplained { suspects }
}

/// The run's numbers.
#[derive(Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub duration: Duration,
    pub started: usize,
    pub completed: usize,
    pub resets: usize,
    pub other_failures: usize,
    /// Explained failures by the kind of death that explains them.
    pub explained: BTreeMap<&'static str, usize>,
    /// Completed downloads by the member that served them.
    pub served: BTreeMap<String, usize>,
    pub unexplained: Vec<(DownloadRecord, Vec<String>)>,
    /// Episodes by kind (counted at their begin).
    pub events: BTreeMap<&'static str, usize>,
    pub failed_steps: Vec<Event>,
    /// Bad reloads refused with nothing changed.
    pub reloads_refused: usize,
    /// Forged packets the floods sent.
    pub flood_packets: u64,
}

impl Report {
    /// Downloads that broke although no owner death explains them.
    pub fn unexplained_count(&self) -> usize {
        self.unexplained.len()
    }

    /// Whether the run passes: every lost download explained, every step as expected.
    pub fn passed(&self) -> bool {
        self.unexplained.is_empty() && self.failed_steps.is_empty()
    }
}

/// Accounts for every download against the event log.
pub fn account(
    seed: u64,
    duration: Duration,
    events: &[Event],
    downloads: &[DownloadRecord],
) -> Report {
    let deaths = deaths(events);
    let mut r = Report {
        seed,
        duration,
        started: downloads.len(),
        ..Report::default()
    };
    for d in downloads {
        if d.ok {
            r.completed += 1;
            let by = d.served_by.clone().unwrap_or_else(|| "?".into());
            *r.served.entry(by).or_default() += 1;
            continue;
        }
        if d.reset {
            r.resets += 1;
        } else {
            r.other_failures += 1;
        }
        match blame(d, &deaths) {
            Blame::Explained { cause, .. } => *r.explained.entry(cause.name()).or_default() += 1,
            Blame::Unexplained { suspects } => r.unexplained.push((d.clone(), suspects)),
        }
    }
    for e in events {
        if e.phase == Phase::Begin {
            *r.events.entry(e.kind.name()).or_default() += 1;
        }
        if e.failed {
            r.failed_steps.push(e.clone());
        } else if e.kind == Kind::BadReload && e.phase == Phase::Begin {
            r.reloads_refused += 1;
        }
    }
    r
}

fn secs(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64())
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let failed = self.resets + self.other_failures;
        writeln!(
            f,
            "chaos report: seed {}, {} s of events",
            self.seed,
            self.duration.as_secs()
        )?;
        writeln!(
            f,
            "  downloads: {} started, {} completed (sha256 intact), {} failed ({} reset, {} other)",
            self.started, self.completed, failed, self.resets, self.other_failures
        )?;
        let served: Vec<String> = self
            .served
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        writeln!(f, "  completed, by serving member: {}", served.join(", "))?;
        let explained: usize = self.explained.values().sum();
        let by: Vec<String> = self
            .explained
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        writeln!(
            f,
            "  explained by the owner's death: {explained} ({})",
            if by.is_empty() {
                "none".into()
            } else {
                by.join(", ")
            }
        )?;
        writeln!(f, "  UNEXPLAINED (owner alive): {}", self.unexplained.len())?;
        for (d, suspects) in &self.unexplained {
            writeln!(
                f,
                "    download {} ([{}]:{}, {}-{} s, served by {}, owners {:?}): {}",
                d.id,
                d.vip,
                d.client_port,
                secs(d.started),
                secs(d.ended),
                d.served_by.as_deref().unwrap_or("?"),
                suspects,
                d.error.as_deref().unwrap_or("incomplete")
            )?;
        }
        let events: Vec<String> = self
            .events
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        writeln!(
            f,
            "  events: {} ({}); floods sent {} forged packets",
            self.events.values().sum::<usize>(),
            events.join(", "),
            self.flood_packets
        )?;
        writeln!(
            f,
            "  bad reloads refused with nothing changed: {} of {}",
            self.reloads_refused,
            self.events.get(Kind::BadReload.name()).unwrap_or(&0)
        )?;
        writeln!(f, "  failed steps: {}", self.failed_steps.len())?;
        for e in &self.failed_steps {
            writeln!(
                f,
                "    {} s {} {}: {}",
                secs(e.at),
                e.kind.name(),
                e.node.as_deref().unwrap_or("-"),
                e.note
            )?;
        }
        write!(
            f,
            "  verdict: {}",
            if self.passed() { "PASS" } else { "FAIL" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn event(at: u64, kind: Kind, phase: Phase, node: &str) -> Event {
        Event {
            at: s(at),
            kind,
            phase,
            node: Some(node.into()),
            note: String::new(),
            failed: false,
        }
    }

    fn download(id: usize, from: u64, to: u64, served_by: Option<&str>) -> DownloadRecord {
        DownloadRecord {
            id,
            vip: "192.0.2.1".parse().expect("address"),
            client_port: 40000 + id as u16,
            started: s(from),
            ended: s(to),
            ok: false,
            reset: true,
            error: Some("Connection reset by peer".into()),
            served_by: served_by.map(str::to_string),
            owners: Vec::new(),
        }
    }

    /// node2's web server dies from 10 s to 15 s, node3 dies whole from 30 s to 36 s,
    /// node1's controller is killed from 50 s to 53 s (not a death: its XDP keeps serving).
    fn log() -> Vec<Event> {
        vec![
            event(10, Kind::HttpdKill, Phase::Begin, "node2"),
            event(15, Kind::HttpdKill, Phase::End, "node2"),
            event(30, Kind::NodeKill, Phase::Begin, "node3"),
            event(36, Kind::NodeKill, Phase::End, "node3"),
            event(50, Kind::ControllerKill, Phase::Begin, "node1"),
            event(53, Kind::ControllerKill, Phase::End, "node1"),
        ]
    }

    #[test]
    fn deaths_pair_begin_and_end_of_kills_only() {
        let d = deaths(&log());
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!(d[0].member, "node2");
        assert_eq!((d[0].from, d[0].until), (s(10), Some(s(15))));
        assert_eq!(d[1].kind, Kind::NodeKill);
        assert_eq!((d[1].from, d[1].until), (s(30), Some(s(36))));
        // A death without an end lasts to the end of the run.
        let open = deaths(&log()[..3]);
        assert_eq!(open[1].until, None);
    }

    #[test]
    fn a_download_broken_by_its_owners_death_is_explained() {
        let d = deaths(&log());
        assert_eq!(
            blame(&download(1, 8, 12, Some("node2")), &d),
            Blame::Explained {
                member: "node2".into(),
                cause: Kind::HttpdKill
            }
        );
        // No header: the flow's hops from the table name the owner.
        let mut refused = download(2, 31, 31, None);
        refused.owners = vec!["node1".into(), "node3".into()];
        assert_eq!(
            blame(&refused, &d),
            Blame::Explained {
                member: "node3".into(),
                cause: Kind::NodeKill
            }
        );
        // Shortly after the revival, still blamed on it.
        assert!(matches!(
            blame(&download(3, 37, 37, Some("node3")), &d),
            Blame::Explained { .. }
        ));
    }

    #[test]
    fn a_download_broken_while_its_owner_lived_is_flagged() {
        let d = deaths(&log());
        // node2 served it, but node3 died: not node2's death.
        assert_eq!(
            blame(&download(4, 29, 33, Some("node2")), &d),
            Blame::Unexplained {
                suspects: vec!["node2".into()]
            }
        );
        // node2 died, but before this download started (and beyond the grace).
        assert!(matches!(
            blame(&download(5, 20, 25, Some("node2")), &d),
            Blame::Unexplained { .. }
        ));
        // A controller kill is not an owner death.
        assert!(matches!(
            blame(&download(6, 49, 52, Some("node1")), &d),
            Blame::Unexplained { .. }
        ));
        // Nothing known about the owner: unexplained.
        assert!(matches!(
            blame(&download(7, 31, 32, None), &d),
            Blame::Unexplained { .. }
        ));
    }

    #[test]
    fn the_report_counts_and_fails_on_unexplained_losses() {
        let mut ok = download(10, 0, 8, Some("node1"));
        ok.ok = true;
        ok.reset = false;
        ok.error = None;
        let explained = download(11, 9, 11, Some("node2"));
        let mut lost = download(12, 40, 44, Some("node1"));
        lost.reset = false;
        lost.error = Some("download timed out".into());
        let r = account(7, s(60), &log(), &[ok.clone(), explained.clone()]);
        assert_eq!((r.started, r.completed, r.resets), (2, 1, 1));
        assert_eq!(r.explained.get("web_server_kill"), Some(&1));
        assert_eq!(r.events.get("node_kill"), Some(&1));
        assert!(r.passed(), "{r}");
        let r = account(7, s(60), &log(), &[ok, explained, lost]);
        assert_eq!(r.unexplained_count(), 1);
        assert_eq!(r.other_failures, 1);
        assert!(!r.passed());
        let text = r.to_string();
        assert!(text.contains("UNEXPLAINED (owner alive): 1"), "{text}");
        assert!(text.contains("download 12"), "{text}");
        assert!(text.ends_with("verdict: FAIL"), "{text}");
    }

    #[test]
    fn a_failed_step_fails_the_run() {
        let mut events = log();
        events.push(Event {
            note: "bad config taken".into(),
            failed: true,
            ..event(60, Kind::BadReload, Phase::Begin, "node1")
        });
        let r = account(1, s(60), &events, &[]);
        assert!(!r.passed());
        assert_eq!(r.reloads_refused, 0);
        assert!(
            r.to_string()
                .contains("refused with nothing changed: 0 of 1")
        );
        assert!(r.to_string().contains("bad config taken"));
    }
}
