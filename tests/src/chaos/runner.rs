//! The chaos run: downloads kept in flight from the client namespace while episodes from the
//! schedule break and repair the lab, one at a time, each followed by a wait for the cluster
//! to settle. Every failed download is recorded with what is needed to blame it: who served
//! it, or (without an answer) its flow's hops in a live table, looked up right away.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Result;

use super::{
    accounting::{self, DownloadRecord, Event, Phase, Report},
    faults,
    flood::{self, FloodSpec, Segment},
    schedule::{Episode, Kind, Schedule},
};
use crate::{
    content,
    download::{self, Live, Spec},
    lab::{CLIENT_V4, CLIENT_V6, Lab, VIP_V4, VIP_V6},
};

#[derive(Clone, Debug)]
pub struct Options {
    pub duration: Duration,
    pub seed: u64,
    /// Downloads kept in flight.
    pub flows: usize,
    /// Bytes per second each download reads.
    pub rate: usize,
    /// Packets per flood, and their rate.
    pub flood_count: u64,
    pub flood_rate: u64,
}

/// How long the cluster gets to settle after an episode before the run says it did not.
const SETTLE_LIMIT: Duration = Duration::from_secs(30);
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

pub struct Runner<'a> {
    lab: Lab,
    opts: Options,
    stop: &'a AtomicBool,
    epoch: Instant,
    events: Vec<Event>,
    downloads: Vec<DownloadRecord>,
    records: mpsc::Receiver<DownloadRecord>,
    sender: Option<mpsc::Sender<DownloadRecord>>,
    running: Arc<AtomicUsize>,
    /// Tells the download workers to start no new download.
    no_more: Arc<AtomicBool>,
    last_progress: Instant,
    flood_packets: u64,
}

impl<'a> Runner<'a> {
    /// `stop` is set (by a signal handler) to end the run early.
    pub fn new(lab: Lab, opts: Options, stop: &'a AtomicBool) -> Self {
        let (sender, records) = mpsc::channel();
        Self {
            lab,
            opts,
            stop,
            epoch: Instant::now(),
            events: Vec::new(),
            downloads: Vec::new(),
            records,
            sender: Some(sender),
            running: Arc::new(AtomicUsize::new(0)),
            no_more: Arc::new(AtomicBool::new(false)),
            last_progress: Instant::now(),
            flood_packets: 0,
        }
    }

    /// Runs the downloads and the episodes, then accounts for every download.
    pub fn run(mut self) -> Result<(Report, Lab)> {
        self.epoch = Instant::now();
        let workers = self.start_downloads();
        let mut schedule = Schedule::new(self.opts.seed, self.lab.nodes.len());
        while !self.over() {
            let (gap, episode) = schedule.next_episode();
            self.pause(gap);
            if self.over() {
                break;
            }
            self.episode(&episode);
        }
        println!(
            "[{:>5.0}s] events over: letting the downloads in flight finish",
            self.now().as_secs_f64()
        );
        self.no_more.store(true, Ordering::SeqCst);
        self.sender = None;
        for w in workers {
            let _ = w.join();
        }
        while let Ok(record) = self.records.try_recv() {
            self.record(record);
        }
        let mut report = accounting::account(
            self.opts.seed,
            self.opts.duration,
            &self.events,
            &self.downloads,
        );
        report.flood_packets = self.flood_packets;
        Ok((report, self.lab))
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn over(&self) -> bool {
        self.now() >= self.opts.duration || self.stop.load(Ordering::SeqCst)
    }

    fn start_downloads(&mut self) -> Vec<JoinHandle<()>> {
        let spec = Spec {
            vip: self.lab.vip(false),
            port: 80,
            size: self.lab.opts.file_size,
            seed: self.lab.opts.file_seed,
            rate: self.opts.rate,
            timeout: Duration::from_secs(60),
        };
        let expected = content::sha256_hex(&content::generate(spec.size, spec.seed));
        let live = Arc::new(Live::default());
        let next_id = Arc::new(AtomicUsize::new(0));
        let sender = self.sender.clone().expect("the sender lives until the end");
        (0..self.opts.flows)
            .map(|worker| {
                // Every other worker downloads over IPv6.
                let spec = Spec {
                    vip: self.lab.vip(worker % 2 == 1),
                    ..spec.clone()
                };
                let (expected, live, next_id, sender) = (
                    expected.clone(),
                    live.clone(),
                    next_id.clone(),
                    sender.clone(),
                );
                let (path, epoch, running, no_more) = (
                    self.lab.client_netns_path(),
                    self.epoch,
                    self.running.clone(),
                    self.no_more.clone(),
                );
                std::thread::spawn(move || {
                    if let Err(e) = crate::netns::join(&path) {
                        println!("download worker cannot join the client namespace: {e}");
                        return;
                    }
                    while !no_more.load(Ordering::SeqCst) {
                        let id = next_id.fetch_add(1, Ordering::Relaxed);
                        running.fetch_add(1, Ordering::Relaxed);
                        let started = epoch.elapsed();
                        let o = download::download(id, &spec, &expected, &live);
                        running.fetch_sub(1, Ordering::Relaxed);
                        let record = DownloadRecord {
                            id,
                            vip: spec.vip,
                            client_port: o.client_port,
                            started,
                            ended: epoch.elapsed(),
                            ok: o.ok,
                            reset: o.reset,
                            error: o.error,
                            served_by: o.served_by,
                            owners: Vec::new(),
                        };
                        if sender.send(record).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect()
    }

    /// Waits `d` (cut short by a stop), taking in finished downloads and printing progress.
    fn pause(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until && !self.stop.load(Ordering::SeqCst) {
            self.tick();
            std::thread::sleep(Duration::from_millis(50));
        }
        self.tick();
    }

    fn tick(&mut self) {
        while let Ok(record) = self.records.try_recv() {
            self.record(record);
        }
        if self.last_progress.elapsed() >= PROGRESS_EVERY {
            self.last_progress = Instant::now();
            let ok = self.downloads.iter().filter(|d| d.ok).count();
            println!(
                "[{:>5.0}s] downloads: {} in flight, {} done, {} complete, {} failed | {} events",
                self.now().as_secs_f64(),
                self.running.load(Ordering::Relaxed),
                self.downloads.len(),
                ok,
                self.downloads.len() - ok,
                self.events
                    .iter()
                    .filter(|e| e.phase == Phase::Begin)
                    .count()
            );
        }
    }

    /// Takes in a finished download. A failed one without an answer gets its flow's hops
    /// from a live table now, while the table still says who owned it.
    fn record(&mut self, mut record: DownloadRecord) {
        if !record.ok {
            if record.served_by.is_none() {
                record.owners = self.owners(record.vip, record.client_port);
            }
            let deaths = accounting::deaths(&self.events);
            let blame = accounting::blame(&record, &deaths);
            println!(
                "[{:>5.0}s]   download {} ([{}]:{}, served by {}, hops {:?}) failed after {:.1} s: {} -> {:?}",
                self.now().as_secs_f64(),
                record.id,
                record.vip,
                record.client_port,
                record.served_by.as_deref().unwrap_or("?"),
                record.owners,
                (record.ended - record.started).as_secs_f64(),
                record.error.as_deref().unwrap_or("incomplete"),
                blame
            );
        }
        self.downloads.push(record);
    }

    /// The hops (owner first) of the client's flow from port `port` to `vip`, as the first
    /// live controller's table has them.
    fn owners(&mut self, vip: IpAddr, port: u16) -> Vec<String> {
        let client = if vip.is_ipv6() { CLIENT_V6 } else { CLIENT_V4 };
        let src = SocketAddr::new(client.parse().expect("lab address"), port).to_string();
        let dst = SocketAddr::new(vip, 80).to_string();
        for i in 0..self.lab.nodes.len() {
            if !self.lab.controller_running(i) {
                continue;
            }
            let Ok(text) = self.lab.steer(i, &["lookup", &src, &dst, "--json"]) else {
                continue;
            };
            let Ok(doc) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            return doc["hops"]
                .as_array()
                .map(|hops| {
                    hops.iter()
                        .filter_map(|h| h["name"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
        }
        Vec::new()
    }

    fn log(&mut self, episode: &Episode, phase: Phase, result: Result<String>) {
        let at = self.now();
        self.log_at(at, episode, phase, result);
    }

    /// As [`Self::log`], for an event that began at `at`: a fault is recorded from the moment
    /// it was set off, not from when setting it off returned (killing a whole node takes a
    /// while, and downloads fail meanwhile).
    fn log_at(&mut self, at: Duration, episode: &Episode, phase: Phase, result: Result<String>) {
        let (note, failed) = match result {
            Ok(note) => (note, false),
            Err(e) => (format!("{e:#}"), true),
        };
        // Floods aim at the VIP, whichever node takes each packet.
        let node = match episode.kind {
            Kind::SynFlood | Kind::AckFlood => None,
            _ => Some(self.lab.nodes[episode.node].name.clone()),
        };
        println!(
            "[{:>5.0}s] {} {} {}: {}{}",
            self.now().as_secs_f64(),
            if phase == Phase::Begin { ">>" } else { "<<" },
            episode.kind.name(),
            node.as_deref().unwrap_or(VIP_V4),
            if failed { "FAILED: " } else { "" },
            note
        );
        self.events.push(Event {
            at,
            kind: episode.kind,
            phase,
            node,
            note,
            failed,
        });
    }

    /// One episode: the fault, the hold, the repair, then a wait for the cluster to settle.
    fn episode(&mut self, episode: &Episode) {
        match episode.kind {
            Kind::SynFlood | Kind::AckFlood => self.flood(episode),
            Kind::BadReload => {
                let started = self.now();
                let result = faults::begin(&mut self.lab, episode);
                self.log_at(started, episode, Phase::Begin, result);
            }
            _ => {
                let started = self.now();
                let result = faults::begin(&mut self.lab, episode);
                self.log_at(started, episode, Phase::Begin, result);
                self.pause(episode.hold);
                let result = faults::end(&mut self.lab, episode);
                self.log(episode, Phase::End, result);
            }
        }
        self.settle(episode);
    }

    fn flood(&mut self, episode: &Episode) {
        let spec = FloodSpec {
            segment: if episode.kind == Kind::SynFlood {
                Segment::Syn
            } else {
                Segment::Ack
            },
            target: format!("{VIP_V4}:80").parse().expect("lab VIP"),
            count: self.opts.flood_count,
            rate: self.opts.flood_rate,
            seed: episode.variant,
        };
        let note = format!("{} packets at {} pps", spec.count, spec.rate);
        let handle = flood::spawn(self.lab.client_netns_path(), spec);
        self.log(episode, Phase::Begin, Ok(note));
        while !handle.is_finished() {
            self.pause(Duration::from_millis(200));
        }
        let result = match handle.join() {
            Ok(Ok(sent)) => {
                self.flood_packets += sent;
                Ok(format!("{sent} sent"))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(anyhow::anyhow!("the flood thread panicked")),
        };
        self.log(episode, Phase::End, result);
    }

    /// Waits until every controller sees every member healthy and the router routes the VIP
    /// over every node; records a failed step if that does not happen in time.
    fn settle(&mut self, episode: &Episode) {
        let started = Instant::now();
        let count = self.lab.nodes.len();
        loop {
            let healthy = (0..count).all(|i| {
                self.lab.status(i).is_ok_and(|s| {
                    s["members"]
                        .as_array()
                        .is_some_and(|m| m.iter().all(|m| m["healthy"] == true))
                })
            });
            let routed = [VIP_V4, VIP_V6]
                .iter()
                .all(|vip| self.lab.route_nodes(vip).is_ok_and(|r| r.len() == count));
            if healthy && routed {
                return;
            }
            if started.elapsed() > SETTLE_LIMIT || self.stop.load(Ordering::SeqCst) {
                let note = format!(
                    "not settled {SETTLE_LIMIT:?} after the episode (members healthy everywhere: {healthy}, routed over every node: {routed})"
                );
                self.log(episode, Phase::End, Err(anyhow::anyhow!(note)));
                return;
            }
            self.pause(Duration::from_millis(250));
        }
    }
}
