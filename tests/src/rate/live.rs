//! The traffic generator: BPF_PROG_TEST_RUN in live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`,
//! Linux 5.18), one thread per generator CPU.
//!
//! In that mode the kernel runs the XDP program on a copy of the frame `repeat` times and
//! carries out what it returns: XDP_REDIRECT really sends the frame. The context's
//! `ingress_ifindex` makes the run look like a receive on that interface (it must be an
//! interface of the calling thread's network namespace). `data_out` and `ctx_out` must not be
//! given; failures to send are not reported back, which is why the benchmark counts where the
//! frames arrive instead of trusting the generator.

use std::{
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp};

use super::Budget;
use crate::netns::join;

/// Frames of a thread's first BPF_PROG_TEST_RUN call (a few tens of milliseconds at the rates
/// of this machine kind). Every call ends in an RCU grace period (the live-frames page pool is
/// torn down with `synchronize_rcu`), tens of milliseconds in which the thread sleeps and its
/// CPU idles. With calls of 2^16 frames each, as before, that was more than half of a run,
/// which cut the rates by two thirds and pulled every ratio towards 1. So the later calls are
/// sized from the rate seen so far to fill the time left, and the waits are a few percent.
const FIRST_CALL: u64 = 1 << 18;

/// A thread stops once less than this part of its time is left: another call would be mostly
/// its grace period.
const LAST_CALL_FRACTION: f64 = 0.05;

/// The longest a call is sized to take: the stop flag (Ctrl-C) is only read between calls.
const MAX_CALL_SECS: f64 = 2.0;

/// Frames the kernel handles per batch (the NAPI budget, also the kernel's default).
const BATCH: u32 = 64;

/// `struct xdp_md` as BPF_PROG_TEST_RUN takes it for XDP: `data` = 0 (no metadata),
/// `data_end` = the frame's length, the ingress interface, receive queue 0.
fn xdp_md(frame_len: usize, ingress_ifindex: u32) -> [u8; 24] {
    let fields = [0, frame_len as u32, 0, ingress_ifindex, 0, 0];
    let mut out = [0u8; 24];
    for (chunk, v) in out.chunks_exact_mut(4).zip(fields) {
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    out
}

/// Pins the calling thread to `cpu`, so the generator and the NAPI work it triggers (which
/// runs on the CPU that sent) stay there.
fn pin_to(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is a plain bit set for which all-zero is the empty set; CPU_SET
    // bounds-checks the index, and sched_setaffinity reads exactly size_of::<cpu_set_t>()
    // bytes of the set we own, for the calling thread (pid 0).
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        bail!(
            "pinning the generator to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// What a generator run took.
pub struct Sent {
    /// Frames the generator program ran on, over all threads (from the kernel's point of
    /// view; whether they were sent is counted at the receiver).
    pub frames: u64,
    /// Wall time from starting the first thread to the end of the last.
    pub elapsed: Duration,
}

/// Runs `generator` on `frame` from one thread per CPU in `cpus`, each in the namespace at
/// `netns` and pinned to its CPU, with `ingress_ifindex` as the receiving interface, until the
/// budget's frames per thread are done or its duration has passed. Fails soon after its
/// `stop` is set (by a signal handler), so that the caller cleans up.
pub fn generate(
    generator: &Xdp,
    netns: &str,
    ingress_ifindex: u32,
    frame: &[u8],
    cpus: &[usize],
    budget: &Budget,
) -> Result<Sent> {
    let (frames, stop) = (budget.frames, &*budget.stop);
    let ctx = xdp_md(frame.len(), ingress_ifindex);
    let started = Instant::now();
    let deadline = started + budget.duration;
    let per_thread = thread::scope(|scope| {
        let threads: Vec<_> = cpus
            .iter()
            .map(|&cpu| {
                let ctx = &ctx;
                scope.spawn(move || -> Result<u64> {
                    join(netns).with_context(|| format!("joining {netns}"))?;
                    pin_to(cpu)?;
                    let mut done = 0u64;
                    let mut next = FIRST_CALL;
                    let thread_start = Instant::now();
                    while done < frames && Instant::now() < deadline {
                        if stop.load(Ordering::Relaxed) {
                            bail!("interrupted");
                        }
                        let repeat = (frames - done).min(next).min(u64::from(u32::MAX)) as u32;
                        let opts = TestRunOptions {
                            data_in: Some(frame),
                            ctx_in: Some(ctx),
                            repeat,
                            attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                            ..TestRunOptions::default()
                        };
                        generator
                            .test_run(opts)
                            .context("BPF_PROG_TEST_RUN in live-frames mode (Linux 5.18+)")?;
                        done += u64::from(repeat);
                        // The rate so far includes the grace periods, so the next call is
                        // sized a little short of the time left rather than past it.
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.as_secs_f64() < budget.duration.as_secs_f64() * LAST_CALL_FRACTION {
                            break;
                        }
                        let rate = done as f64 / thread_start.elapsed().as_secs_f64();
                        let secs = left.as_secs_f64().min(MAX_CALL_SECS);
                        next = ((rate * secs) as u64).max(FIRST_CALL);
                    }
                    Ok(done)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect::<Result<Vec<u64>>>()
    })?;
    Ok(Sent {
        frames: per_thread.iter().sum(),
        elapsed: started.elapsed(),
    })
}
