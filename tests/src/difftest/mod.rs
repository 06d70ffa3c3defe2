//! The differential test: random and mutated frames through the XDP program
//! (BPF_PROG_TEST_RUN, in a network namespace with live sockets), each checked against the
//! reference model in [`crate::model`].
//!
//! Per frame, the action and the output bytes are compared at once. Reasons come from the
//! per-CPU verdict counters, whose read costs more than a run: they are read once per batch
//! and compared with the model's histogram of the batch; a batch that differs is replayed
//! frame by frame (the program is deterministic for a fixed state) to name the frame.

pub mod frames;
pub mod world;

use std::{collections::BTreeMap, fmt::Write as _, time::Instant};

use anyhow::{Context as _, Result};
use aya::programs::{TestRun as _, TestRunOptions};
use cdn_common::counters::{Action, PacketCounts, Reason};
use cdn_user::dataplane::DataPlane;
use rand::{SeedableRng as _, rngs::StdRng};

use crate::model::{self, Env, Expect, Out, Rules, Why};
use frames::{Gen, Sample};

/// Seed of the CI run.
pub const FIXED_SEED: u64 = 0x00c0_ffee_d1ff_7e57;
/// Frames between two reads of the counters.
const BATCH: usize = 2048;

#[derive(Clone, Debug)]
pub struct Options {
    pub seed: u64,
    pub frames: u64,
    pub rules: Rules,
    /// Stop after this many disagreements.
    pub max_failures: usize,
}

/// One disagreement, with what it takes to replay it.
#[derive(Clone, Debug)]
pub struct Failure {
    pub index: u64,
    pub class: String,
    pub ifindex: u32,
    pub frame: Vec<u8>,
    pub expected: String,
    pub actual: String,
}

#[derive(Debug, Default)]
pub struct Report {
    pub seed: u64,
    /// Frames asked for (a replay needs the same number: it decides the phases).
    pub requested: u64,
    /// Frames run (fewer if the run stopped at `max_failures`).
    pub frames: u64,
    pub seconds: f64,
    /// Frames per template class, and per mutation.
    pub classes: BTreeMap<&'static str, u64>,
    pub mutations: BTreeMap<&'static str, u64>,
    /// Verdicts seen ("reason/action").
    pub verdicts: BTreeMap<String, u64>,
    /// Search pass-ons by the step of the walk they took (README "PoPs"): `redirect` (at the
    /// same index), `next_index`, `next_pop`; `after_redirect` counts pass-ons of a search
    /// that came redirected, `redirected_again` those of them the model redirected again
    /// (never, by the rules).
    pub search_steps: BTreeMap<&'static str, u64>,
    pub failures: Vec<Failure>,
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

impl Report {
    pub fn summary(&self) -> String {
        let mut s = format!(
            "differential test: seed {:#x}, {} frames in {:.1} s ({:.0} frames/s), {} disagreements\n",
            self.seed,
            self.frames,
            self.seconds,
            self.frames as f64 / self.seconds.max(1e-9),
            self.failures.len()
        );
        let line = |m: &BTreeMap<_, u64>| {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = writeln!(s, "classes: {}", line(&self.classes));
        let _ = writeln!(s, "mutations: {}", line(&self.mutations));
        let verdicts: BTreeMap<&str, u64> = self
            .verdicts
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        let _ = writeln!(s, "verdicts: {}", line(&verdicts));
        let _ = writeln!(s, "search steps: {}", line(&self.search_steps));
        s
    }

    /// Every disagreement, replayable: seed, frame index, frame bytes.
    pub fn failure_text(&self) -> String {
        let mut s = format!(
            "{} disagreements between the program and the model (replay: cdn-difftest --seed {} --frames {})\n",
            self.failures.len(),
            self.seed,
            self.requested
        );
        for f in &self.failures {
            let _ = writeln!(
                s,
                "frame #{} [{}] on ifindex {}: expected {}, got {}\n  frame: {}",
                f.index,
                f.class,
                f.ifindex,
                f.expected,
                f.actual,
                hex(&f.frame)
            );
        }
        s
    }
}

/// Runs the whole test in a namespace of its own.
pub fn run(opts: &Options) -> Result<Report> {
    let (ns, links) = world::namespace()?;
    ns.enter(|| run_inside(opts, &links))?
}

/// The kernel's `struct xdp_md` for BPF_PROG_TEST_RUN: data 0, data_end the frame's
/// length, no metadata, the ingress interface, queue 0, no egress interface.
fn xdp_md(len: usize, ifindex: u32) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(len as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// One run of the program: the action and the output length (in `out`).
pub fn run_frame(
    dp: &mut DataPlane,
    frame: &[u8],
    ifindex: u32,
    out: &mut [u8],
) -> Result<(u32, usize)> {
    let ctx = xdp_md(frame.len(), ifindex);
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(out),
        ctx_in: Some(&ctx),
        ..TestRunOptions::default()
    };
    let r = dp.program()?.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    Ok((r.return_value, r.data_size_out as usize))
}

type Histogram = BTreeMap<(&'static str, Action), u64>;

fn add_expected(h: &mut Histogram, e: &Expect) {
    *h.entry((e.reason.name(), e.action)).or_default() += 1;
    for info in &e.info {
        *h.entry((info.name(), e.action)).or_default() += 1;
    }
}

fn moved(before: &PacketCounts, after: &PacketCounts) -> Histogram {
    after
        .moved_since(before)
        .map(|(r, a, n)| ((r.name(), a), n))
        .collect()
}

/// The position field (`hops[1]`) of the search header an expected pass-on sends.
fn sent_search_position(e: &Expect) -> Option<u16> {
    let Out::Frame(f) = &e.out else {
        return None;
    };
    let ip_len = match f.get(12..14)? {
        [0x08, 0x00] => 20,
        [0x86, 0xdd] => 40,
        _ => return None,
    };
    let at = 14 + ip_len + 8 + 6;
    Some(u16::from_be_bytes(f.get(at..at + 2)?.try_into().ok()?))
}

fn count_search_step(steps: &mut BTreeMap<&'static str, u64>, s: &Sample, e: &Expect) {
    if e.reason != Why::Is(Reason::SearchPassOn) {
        return;
    }
    let Some(pos) = sent_search_position(e) else {
        return;
    };
    let step = match pos {
        0 => "next_pop",
        p if p & 0x8000 != 0 => "redirect",
        _ => "next_index",
    };
    *steps.entry(step).or_default() += 1;
    if s.mutations.contains(&"search_redirected") {
        *steps.entry("after_redirect").or_default() += 1;
        if pos & 0x8000 != 0 {
            *steps.entry("redirected_again").or_default() += 1;
        }
    }
}

fn describe(e: &Expect) -> String {
    let mut s = format!("{}/{}", e.action.name(), e.reason);
    for i in &e.info {
        s += &format!("+{}", i.name());
    }
    s
}

fn describe_actual(h: &Histogram) -> String {
    let mut verdict = String::new();
    let mut info = String::new();
    for ((name, action), n) in h {
        let is_info = Reason::ALL
            .iter()
            .any(|r| r.name() == *name && !r.is_verdict());
        let item = format!(
            "{}/{name}{}",
            action.name(),
            if *n > 1 {
                format!("x{n}")
            } else {
                String::new()
            }
        );
        if is_info {
            info += &format!("+{}", item.split('/').nth(1).unwrap_or_default());
        } else {
            verdict += &item;
        }
    }
    verdict + &info
}

/// The state the runner keeps between frames.
struct Runner<'a> {
    dp: DataPlane,
    env: Env,
    rules: Rules,
    opts: &'a Options,
    out: Vec<u8>,
    report: Report,
}

impl Runner<'_> {
    /// Runs one frame and compares action and bytes; `Some(failure)` if they differ.
    fn check_frame(&mut self, index: u64, s: &Sample, e: &Expect) -> Result<Option<Failure>> {
        let (code, len) = run_frame(&mut self.dp, &s.frame, s.ifindex, &mut self.out)?;
        let got = &self.out[..len];
        let problem = if Action::from_xdp(code) != e.action {
            Some(format!("action {}", Action::from_xdp(code).name()))
        } else {
            match &e.out {
                Out::Unchanged if got != s.frame.as_slice() => {
                    Some(format!("the frame modified: {}", hex(got)))
                }
                Out::Frame(want) if got != want.as_slice() => Some(format!(
                    "frame {}\n  expected frame: {}",
                    hex(got),
                    hex(want)
                )),
                _ => None,
            }
        };
        Ok(problem.map(|p| Failure {
            index,
            class: format!("{} {}", s.class, s.mutations.join(",")),
            ifindex: s.ifindex,
            frame: s.frame.clone(),
            expected: describe(e),
            actual: p,
        }))
    }

    /// The counters one frame moves (run again on its own).
    fn counted(&mut self, s: &Sample) -> Result<Histogram> {
        let before = self.dp.counters()?;
        run_frame(&mut self.dp, &s.frame, s.ifindex, &mut self.out)?;
        Ok(moved(&before, &self.dp.counters()?))
    }

    fn fail(&mut self, f: Failure) {
        eprintln!(
            "DISAGREEMENT seed={:#x} frame #{} [{}]: expected {}, got {}\n  frame: {}",
            self.opts.seed,
            f.index,
            f.class,
            f.expected,
            f.actual,
            hex(&f.frame)
        );
        self.report.failures.push(f);
    }

    /// A batch whose counters differ from the model's: find the frames.
    fn replay(&mut self, batch: &[(u64, Sample, Expect)]) -> Result<()> {
        for (index, s, e) in batch {
            let mut want = Histogram::new();
            add_expected(&mut want, e);
            let got = self.counted(s)?;
            if got != want {
                self.fail(Failure {
                    index: *index,
                    class: format!("{} {}", s.class, s.mutations.join(",")),
                    ifindex: s.ifindex,
                    frame: s.frame.clone(),
                    expected: describe(e),
                    actual: describe_actual(&got),
                });
            }
        }
        Ok(())
    }

    fn phase(&mut self, frames: &mut Gen, first: u64, count: u64) -> Result<()> {
        let mut batch: Vec<(u64, Sample, Expect)> = Vec::with_capacity(BATCH);
        let mut want = Histogram::new();
        let mut before = self.dp.counters()?;
        for index in first..first + count {
            let s = frames.sample();
            let e = model::expect(&self.env, &self.rules, &s.frame, s.ifindex);
            *self.report.classes.entry(s.class).or_default() += 1;
            for m in &s.mutations {
                *self.report.mutations.entry(m).or_default() += 1;
            }
            *self
                .report
                .verdicts
                .entry(format!("{}/{}", e.reason, e.action.name()))
                .or_default() += 1;
            count_search_step(&mut self.report.search_steps, &s, &e);
            if let Some(f) = self.check_frame(index, &s, &e)? {
                // Name the reason too (running it again), and count both runs as the
                // batch's counters will.
                let got = self.counted(&s)?;
                for (k, n) in &got {
                    *want.entry(*k).or_default() += 2 * n;
                }
                self.fail(Failure {
                    actual: format!("{} ({})", describe_actual(&got), f.actual),
                    ..f
                });
            } else {
                add_expected(&mut want, &e);
                batch.push((index, s, e));
            }
            if batch.len() >= BATCH || index + 1 == first + count {
                let after = self.dp.counters()?;
                if moved(&before, &after) != want {
                    self.replay(&batch)?;
                    before = self.dp.counters()?;
                } else {
                    before = after;
                }
                batch.clear();
                want.clear();
            }
            if self.report.failures.len() >= self.opts.max_failures {
                break;
            }
        }
        Ok(())
    }
}

/// Node configurations the frames are split over: (draining, max frame, hop budget,
/// steer_auth).
const PHASES: [(bool, u32, u8, bool); 4] = [
    (false, 0, 3, false),
    (true, 0, 3, false),
    (false, 160, 3, true),
    (true, 0, 0, false),
];

fn run_inside(opts: &Options, links: &world::Links) -> Result<Report> {
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let (dp, mut env) = world::load(&mut rng, links)?;
    let _sockets = world::sockets(&mut env)?;
    let mut runner = Runner {
        dp,
        env,
        rules: opts.rules,
        opts,
        out: vec![0u8; 8192],
        report: Report {
            seed: opts.seed,
            requested: opts.frames,
            ..Report::default()
        },
    };
    let mut frames = Gen::new(opts.seed, links);
    let start = Instant::now();
    let per_phase = opts.frames.div_ceil(PHASES.len() as u64);
    let mut done = 0;
    for (draining, max_frame, budget, steer_auth) in PHASES {
        let count = per_phase.min(opts.frames - done);
        runner.env.cfg = world::node_config(draining, max_frame, budget);
        runner.env.steer_auth = steer_auth;
        world::write_config(&mut runner.dp, &runner.env, &opts.rules)?;
        runner.phase(&mut frames, done, count)?;
        done += count;
        if runner.report.failures.len() >= opts.max_failures {
            break;
        }
    }
    runner.report.frames = done;
    runner.report.seconds = start.elapsed().as_secs_f64();
    Ok(runner.report)
}
