//! Keeps the VIP routes announced through BIRD exactly while the controller wants them.
//!
//! The controller decides *whether* this node should attract anycast traffic (data plane
//! loaded, node healthy, not draining) and publishes that as a `watch::Receiver<bool>`. The
//! [`Announcer`] turns it into BIRD state: it enables the BIRD static protocol holding the VIP
//! routes while the value is `true` and disables it while it is `false`.
//!
//! BIRD's state is not only changed by us: BIRD may restart, and every `birdc configure`
//! (reload) puts the protocol back into its configured state (`disabled` in the recommended
//! configuration) even when the file did not change; an operator may also run `birdc
//! enable`/`disable`. So the announcer does not just forward changes; on every change of the
//! wanted value *and* every poll interval it reads the protocol's state and corrects it when
//! it differs. A reload therefore withdraws the VIPs for up to one poll interval.
//!
//! Logging: every announce and withdraw is logged at info with why it happened (the wanted
//! value changed, or BIRD drifted). A problem (BIRD unreachable, protocol missing, ...) is
//! logged at warn when it starts or changes, not on every poll, and its end at info.

use std::mem::Discriminant;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use log::{debug, info, warn};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::bgp::bird::{BirdClient, BirdError, ProtocolState, Toggle};
use crate::config::BgpSettings;

/// Shortest poll interval accepted; shorter ones are raised to it so that a misconfiguration
/// cannot make the announcer hammer BIRD.
pub const MIN_POLL: Duration = Duration::from_millis(10);

/// How often [`Announcer::withdraw_now`] checks whether the protocol is down yet.
const WITHDRAW_CHECK: Duration = Duration::from_millis(10);

/// What the announcer knows, for status reports and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnounceStatus {
    /// Whether the last conversation with BIRD worked (false until the first one did).
    pub bird_reachable: bool,
    /// Whether the protocol was enabled (`Some(true)`: VIPs announced) as BIRD last reported
    /// it, including changes the announcer made since; `None` while unknown (BIRD unreachable,
    /// protocol missing).
    pub announced: Option<bool>,
    /// What the announcer enforces: the wanted value, or `false` for good after
    /// [`Announcer::withdraw_now`].
    pub wanted: bool,
    /// The last problem, while it lasts; `None` after a successful check.
    pub last_error: Option<String>,
    /// How many times the announcer enabled or disabled the protocol (changes BIRD confirmed
    /// as such; `already enabled` does not count).
    pub transitions: u64,
}

/// Drives one BIRD protocol from a wanted-state channel; see the module documentation.
///
/// Dropping it stops the background task without touching BIRD (the protocol stays as it was);
/// call [`Announcer::withdraw_now`] first to withdraw.
pub struct Announcer {
    shared: Arc<Shared>,
    status: watch::Receiver<AnnounceStatus>,
    task: JoinHandle<()>,
}

/// What the background task and [`Announcer::withdraw_now`] share.
struct Shared {
    client: BirdClient,
    protocol: String,
    status: watch::Sender<AnnounceStatus>,
    /// Set by `withdraw_now`: from then on the protocol is kept disabled.
    held_down: AtomicBool,
    /// Held for the whole of each check-and-correct round and by `withdraw_now`, so that a
    /// round already past its check cannot re-enable the protocol after `withdraw_now`
    /// disabled it.
    bird_lock: Mutex<()>,
}

impl Announcer {
    /// Starts the background task (on the current tokio runtime; panics outside one) that
    /// keeps BIRD protocol `protocol` enabled exactly while `wanted` holds `true`. It checks
    /// and corrects BIRD's state at once, on every change of `wanted`, and every `poll`
    /// (at least [`MIN_POLL`]). If the sender of `wanted` goes away, the last value stays in
    /// force.
    pub fn start(
        client: BirdClient,
        protocol: String,
        poll: Duration,
        wanted: watch::Receiver<bool>,
    ) -> Self {
        let (status_tx, status) = watch::channel(AnnounceStatus {
            bird_reachable: false,
            announced: None,
            wanted: *wanted.borrow(),
            last_error: None,
            transitions: 0,
        });
        let shared = Arc::new(Shared {
            client,
            protocol,
            status: status_tx,
            held_down: AtomicBool::new(false),
            bird_lock: Mutex::new(()),
        });
        let worker = Worker {
            shared: Arc::clone(&shared),
            poll: poll.max(MIN_POLL),
            problem: None,
            enforced: None,
        };
        let task = tokio::spawn(worker.run(wanted));
        Self {
            shared,
            status,
            task,
        }
    }

    /// One announcer per protocol of `[bgp]`, with its socket and poll interval; none when
    /// `settings.enabled` is false (the controller then leaves BIRD alone).
    pub fn from_settings(settings: &BgpSettings, wanted: &watch::Receiver<bool>) -> Vec<Self> {
        if !settings.enabled {
            return Vec::new();
        }
        settings
            .protocols
            .iter()
            .map(|protocol| {
                Self::start(
                    BirdClient::from_settings(settings),
                    protocol.clone(),
                    settings.poll_interval,
                    wanted.clone(),
                )
            })
            .collect()
    }

    /// The announcer's status, updated after every check.
    pub fn status(&self) -> watch::Receiver<AnnounceStatus> {
        self.status.clone()
    }

    /// Withdraws the VIPs for good, for shutdown: disables the protocol and waits until BIRD
    /// reports it `down` (its routes are out of BIRD's table and withdrawals queued to the
    /// peers), all within `deadline`. Use it before detaching the data plane, so that traffic
    /// stops arriving before it can no longer be handled.
    ///
    /// From then on the announcer keeps the protocol disabled whatever `wanted` says, also if
    /// this call fails (its background task keeps trying). On error the caller decides: a
    /// BIRD that is unreachable because it is not running announces nothing either.
    pub async fn withdraw_now(&self, deadline: Duration) -> Result<(), BirdError> {
        let shared = &self.shared;
        // Before waiting for the lock, so that it holds even if the deadline passes meanwhile.
        shared.held_down.store(true, Ordering::SeqCst);
        let result = tokio::time::timeout(deadline, async {
            let _lock = shared.bird_lock.lock().await;
            shared
                .status
                .send_if_modified(|s| std::mem::replace(&mut s.wanted, false));
            match shared.client.set_enabled(&shared.protocol, false).await? {
                Toggle::Changed => {
                    info!(
                        protocol = shared.protocol.as_str(),
                        reason = "controller shutting down";
                        "withdrawing VIPs: BIRD protocol disabled"
                    );
                    shared.status.send_modify(|s| s.transitions += 1);
                }
                Toggle::Unchanged => debug!(
                    "BIRD protocol {} already disabled at shutdown",
                    shared.protocol
                ),
            }
            loop {
                let status = shared.client.protocol(&shared.protocol).await?;
                if status.state == ProtocolState::Down {
                    break;
                }
                debug!(
                    "waiting for BIRD protocol {} to go down (now {})",
                    shared.protocol, status.state
                );
                tokio::time::sleep(WITHDRAW_CHECK).await;
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|_| {
            Err(BirdError::Timeout {
                socket: shared.client.socket().to_owned(),
                after: deadline,
            })
        });
        shared.status.send_modify(|s| match &result {
            Ok(()) => {
                s.bird_reachable = true;
                s.announced = Some(false);
                s.last_error = None;
            }
            Err(e) => {
                s.bird_reachable &= !e.is_unreachable();
                s.announced = None;
                s.last_error = Some(e.to_string());
            }
        });
        result
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A problem, remembered so that it is logged when it starts or changes, not on every poll.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Problem {
    /// No working BIRD on the socket.
    Unreachable,
    /// BIRD answered but the check or correction failed. Only the kind of error counts: the
    /// message of an unexpected reply may differ from poll to poll (it quotes timestamps).
    Failed(Discriminant<BirdError>),
}

/// The background task's state.
struct Worker {
    shared: Arc<Shared>,
    poll: Duration,
    problem: Option<Problem>,
    /// The wanted value of the last successful round, to tell a change of the wanted value
    /// from drift in the log.
    enforced: Option<bool>,
}

impl Worker {
    async fn run(mut self, mut wanted: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(self.poll);
        // After a slow round (BIRD timing out), wait a whole interval rather than firing the
        // missed ticks in a burst.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut wanted_open = true;
        loop {
            // The first tick completes at once: the first round runs right at start.
            tokio::select! {
                _ = ticker.tick() => {}
                changed = wanted.changed(), if wanted_open => {
                    if changed.is_err() {
                        debug!("wanted-state sender dropped; keeping the last value in force");
                        wanted_open = false;
                        continue;
                    }
                }
            }
            let want = *wanted.borrow_and_update();
            self.round(want).await;
        }
    }

    /// One check-and-correct round.
    async fn round(&mut self, wanted: bool) {
        let shared = Arc::clone(&self.shared);
        let lock = shared.bird_lock.lock().await;
        let held_down = shared.held_down.load(Ordering::SeqCst);
        let want = wanted && !held_down;
        shared
            .status
            .send_if_modified(|s| std::mem::replace(&mut s.wanted, want) != want);
        let result = self.check_and_correct(want, held_down).await;
        drop(lock);
        match result {
            Ok((announced, changed)) => {
                self.problem_solved();
                self.enforced = Some(want);
                shared.status.send_modify(|s| {
                    s.bird_reachable = true;
                    s.announced = Some(announced);
                    s.last_error = None;
                    s.transitions += u64::from(changed);
                });
            }
            Err(e) => {
                let unreachable = e.is_unreachable();
                self.problem(&e, want);
                shared.status.send_modify(|s| {
                    s.bird_reachable = !unreachable;
                    s.announced = None;
                    s.last_error = Some(e.to_string());
                });
            }
        }
    }

    /// Reads the protocol's state and enables or disables it if it differs from `want`
    /// (`held_down`: forced to false by `withdraw_now`). Returns whether it is enabled now and
    /// whether BIRD changed it.
    async fn check_and_correct(
        &mut self,
        want: bool,
        held_down: bool,
    ) -> Result<(bool, bool), BirdError> {
        let shared = Arc::clone(&self.shared);
        let client = &shared.client;
        let protocol = &shared.protocol;
        let status = client.protocol(protocol).await?;
        // BIRD answered: say so before logging what is done about its state.
        let back = self.problem == Some(Problem::Unreachable);
        if back {
            self.problem_solved();
        }
        if status.is_enabled() == want {
            return Ok((want, false));
        }
        let reason = match self.enforced {
            _ if held_down => format!(
                "withdrawn for shutdown, but BIRD reports the protocol {}",
                describe(&status.state, &status.info)
            ),
            Some(previous) if previous != want => {
                format!(
                    "wanted changed to {}",
                    if want { "announced" } else { "withdrawn" }
                )
            }
            None => format!(
                "at start, wanted {}",
                if want { "announced" } else { "withdrawn" }
            ),
            Some(_) if back => format!(
                "BIRD is back and reports the protocol {}",
                describe(&status.state, &status.info)
            ),
            Some(_) => format!(
                "drift: BIRD reports the protocol {}",
                describe(&status.state, &status.info)
            ),
        };
        let toggle = client.set_enabled(protocol, want).await?;
        match (toggle, want) {
            (Toggle::Changed, true) => {
                info!(protocol = protocol.as_str(), reason = reason.as_str(); "announcing VIPs: BIRD protocol enabled");
            }
            (Toggle::Changed, false) => {
                info!(protocol = protocol.as_str(), reason = reason.as_str(); "withdrawing VIPs: BIRD protocol disabled");
            }
            // A protocol in `stop`/`flush` that is restarting: it already is as wanted.
            (Toggle::Unchanged, _) => debug!(
                "BIRD protocol {protocol} in state {} is already {}",
                status.state,
                if want { "enabled" } else { "disabled" }
            ),
        }
        Ok((want, toggle == Toggle::Changed))
    }

    /// Logs `error` if it is a new problem; later rounds with the same problem log at debug.
    fn problem(&mut self, error: &BirdError, want: bool) {
        let problem = if error.is_unreachable() {
            Problem::Unreachable
        } else {
            Problem::Failed(std::mem::discriminant(error))
        };
        let action = if want { "announce" } else { "withdraw" };
        if self.problem.as_ref() == Some(&problem) {
            debug!("still cannot {action} VIPs through BIRD: {error}");
            return;
        }
        match problem {
            Problem::Unreachable => warn!(
                action, retry_every:? = self.poll, error:% = error;
                "BIRD unreachable: cannot {action} VIPs, announcement state unknown"
            ),
            Problem::Failed(_) => warn!(
                protocol = self.shared.protocol.as_str(), action, retry_every:? = self.poll,
                error:% = error;
                "cannot {action} VIPs through BIRD"
            ),
        }
        self.problem = Some(problem);
    }

    /// Logs the end of a problem, if there was one.
    fn problem_solved(&mut self) {
        match self.problem.take() {
            Some(Problem::Unreachable) => info!(
                socket:% = self.shared.client.socket().display();
                "BIRD is reachable again"
            ),
            Some(Problem::Failed(_)) => info!(
                protocol = self.shared.protocol.as_str();
                "BIRD protocol can be controlled again"
            ),
            None => {}
        }
    }
}

/// `down`, or `start (Active)` when BIRD gives extra information.
fn describe(state: &ProtocolState, info: &str) -> String {
    if info.is_empty() {
        state.to_string()
    } else {
        format!("{state} ({info})")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use anyhow::{Context as _, Result, bail};
    use log::Level;

    use cdn_test_support::logcap;

    use super::*;
    use crate::bgp::bird::testbird::{CONFIG, DEADLINE, TestBird, eventually, route_present};

    const POLL: Duration = Duration::from_millis(100);
    const PROTOCOL: &str = "anycast_vips";

    fn announcer(bird: &TestBird, wanted: watch::Receiver<bool>) -> Announcer {
        Announcer::start(bird.client(), PROTOCOL.to_owned(), POLL, wanted)
    }

    /// Waits until the status satisfies `check`, failing with the last status after a deadline.
    async fn status_until(
        status: &mut watch::Receiver<AnnounceStatus>,
        what: &str,
        check: impl FnMut(&AnnounceStatus) -> bool,
    ) -> Result<AnnounceStatus> {
        let result = tokio::time::timeout(DEADLINE, status.wait_for(check))
            .await
            .map(|r| r.map(|s| s.clone()));
        match result {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(_)) => bail!("{what}: announcer task ended"),
            Err(_) => bail!(
                "{what}: not within {DEADLINE:?}; status {:?}",
                *status.borrow()
            ),
        }
    }

    async fn enabled_in_bird(bird: &TestBird) -> Result<bool> {
        Ok(bird.client().protocol(PROTOCOL).await?.is_enabled())
    }

    /// BIRD shows the protocol up and its route in the table (or down and no route).
    async fn bird_announces(bird: &TestBird, announced: bool) -> Result<()> {
        let client = bird.client();
        eventually(
            &format!("BIRD announcing = {announced}"),
            DEADLINE,
            || async {
                let state = client.protocol(PROTOCOL).await?.state;
                let settled = if announced {
                    state == ProtocolState::Up
                } else {
                    state == ProtocolState::Down
                };
                Ok(settled && route_present(&client).await? == announced)
            },
        )
        .await
    }

    #[tokio::test]
    async fn follows_wanted() -> Result<()> {
        let logs = logcap::start();
        let bird = TestBird::start(CONFIG).await?;
        let (wanted_tx, wanted) = watch::channel(false);
        let announcer = announcer(&bird, wanted);
        let mut status = announcer.status();

        let s = status_until(&mut status, "first check", |s| s.bird_reachable).await?;
        assert_eq!(s.announced, Some(false));
        assert!(!s.wanted);
        assert_eq!(s.transitions, 0);
        bird_announces(&bird, false).await?;

        wanted_tx.send(true)?;
        let s = status_until(&mut status, "announced", |s| s.announced == Some(true)).await?;
        assert!(s.wanted && s.bird_reachable && s.last_error.is_none());
        assert_eq!(s.transitions, 1);
        bird_announces(&bird, true).await?;

        wanted_tx.send(false)?;
        let s = status_until(&mut status, "withdrawn", |s| s.announced == Some(false)).await?;
        assert!(!s.wanted);
        assert_eq!(s.transitions, 2);
        bird_announces(&bird, false).await?;

        // The sender going away leaves the last value in force, and polling goes on.
        drop(wanted_tx);
        bird.client().set_enabled(PROTOCOL, true).await?;
        let s = status_until(&mut status, "drift repaired", |s| s.transitions == 3).await?;
        assert_eq!(s.announced, Some(false));
        bird_announces(&bird, false).await?;

        if logs {
            assert_eq!(
                logcap::matching(Level::Info, "announcing VIPs: BIRD protocol enabled protocol=anycast_vips reason=wanted changed to announced").len(),
                1
            );
            assert_eq!(
                logcap::matching(Level::Info, "withdrawing VIPs: BIRD protocol disabled protocol=anycast_vips reason=wanted changed to withdrawn").len(),
                1
            );
            assert_eq!(
                logcap::matching(Level::Info, "withdrawing VIPs: BIRD protocol disabled protocol=anycast_vips reason=drift: BIRD reports the protocol up").len(),
                1
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn reasserts_after_bird_restart() -> Result<()> {
        let logs = logcap::start();
        let mut bird = TestBird::start(CONFIG).await?;
        let (_wanted_tx, wanted) = watch::channel(true);
        let announcer = announcer(&bird, wanted);
        let mut status = announcer.status();

        let s = status_until(&mut status, "announced", |s| s.announced == Some(true)).await?;
        assert_eq!(s.transitions, 1);
        bird_announces(&bird, true).await?;

        // An operator disabling the protocol behind the announcer's back is repaired.
        assert_eq!(
            bird.client().set_enabled(PROTOCOL, false).await?,
            Toggle::Changed
        );
        status_until(&mut status, "drift repaired", |s| s.transitions == 2).await?;
        bird_announces(&bird, true).await?;

        bird.kill();
        let s = status_until(&mut status, "BIRD gone", |s| !s.bird_reachable).await?;
        assert_eq!(s.announced, None);
        let error = s.last_error.context("no error while BIRD is gone")?;
        assert!(error.contains("cannot connect"), "{error}");

        if logs {
            // Several polls fail (each logs at debug), but the warning comes once.
            eventually("failed polls", DEADLINE, || async {
                Ok(logcap::matching(Level::Debug, "still cannot announce").len() >= 3)
            })
            .await?;
            let warnings = logcap::matching(Level::Warn, "BIRD unreachable");
            assert_eq!(warnings.len(), 1, "{warnings:?}");
            assert!(warnings[0].contains("Connection refused"), "{warnings:?}");
        }

        // BIRD comes back with the protocol in its configured state, disabled: the drift case.
        bird.restart().await?;
        let s = status_until(&mut status, "re-announced", |s| {
            s.bird_reachable && s.announced == Some(true)
        })
        .await?;
        assert_eq!(s.transitions, 3);
        assert!(s.last_error.is_none());
        bird_announces(&bird, true).await?;

        if logs {
            assert_eq!(logcap::matching(Level::Info, "is reachable again").len(), 1);
            assert_eq!(
                logcap::matching(
                    Level::Info,
                    "BIRD protocol enabled protocol=anycast_vips reason=BIRD is back and reports the protocol down"
                )
                .len(),
                1
            );
            assert_eq!(logcap::matching(Level::Warn, "").len(), 1);
        }
        Ok(())
    }

    #[tokio::test]
    async fn reasserts_after_bird_reconfigure() -> Result<()> {
        let bird = TestBird::start(CONFIG).await?;
        let (_wanted_tx, wanted) = watch::channel(true);
        let announcer = announcer(&bird, wanted);
        let mut status = announcer.status();
        status_until(&mut status, "announced", |s| s.transitions == 1).await?;

        // `birdc configure` puts every protocol back into its configured state, so with
        // `disabled` in the configuration a reload withdraws the VIPs until the next poll.
        let reply = bird.client().command("configure").await?;
        assert!(
            reply.lines().iter().any(|l| l.text.contains("Reconfigur")),
            "{reply}"
        );
        eventually("reload disabled the protocol", DEADLINE, || async {
            Ok(!enabled_in_bird(&bird).await? || announcer.status().borrow().transitions > 1)
        })
        .await?;
        let s = status_until(&mut status, "re-announced", |s| s.transitions == 2).await?;
        assert_eq!(s.announced, Some(true));
        bird_announces(&bird, true).await?;
        Ok(())
    }

    #[tokio::test]
    async fn withdraw_now_disables_and_holds() -> Result<()> {
        let bird = TestBird::start(CONFIG).await?;
        let (_wanted_tx, wanted) = watch::channel(true);
        let announcer = announcer(&bird, wanted);
        let mut status = announcer.status();
        status_until(&mut status, "announced", |s| s.announced == Some(true)).await?;

        announcer.withdraw_now(DEADLINE).await?;
        // No waiting: withdraw_now returns only once BIRD has the protocol down.
        let client = bird.client();
        assert_eq!(client.protocol(PROTOCOL).await?.state, ProtocolState::Down);
        assert!(!route_present(&client).await?);
        let s = announcer.status().borrow().clone();
        assert_eq!(
            (s.wanted, s.announced, s.transitions),
            (false, Some(false), 2)
        );

        // Although `wanted` is still true, the announcer now keeps the protocol disabled.
        client.set_enabled(PROTOCOL, true).await?;
        status_until(&mut status, "kept withdrawn", |s| s.transitions == 3).await?;
        bird_announces(&bird, false).await?;
        assert!(!enabled_in_bird(&bird).await?);

        // Once more: already disabled is fine.
        announcer.withdraw_now(DEADLINE).await?;
        Ok(())
    }

    #[tokio::test]
    async fn withdraw_now_without_bird_fails_in_time() -> Result<()> {
        let mut bird = TestBird::start(CONFIG).await?;
        let (_wanted_tx, wanted) = watch::channel(true);
        let announcer = announcer(&bird, wanted);
        let mut status = announcer.status();
        status_until(&mut status, "announced", |s| s.announced == Some(true)).await?;

        bird.kill();
        let e = announcer
            .withdraw_now(Duration::from_secs(1))
            .await
            .expect_err("withdrawn without BIRD");
        assert!(e.is_unreachable(), "{e}");

        // A stopped BIRD never answers: the deadline ends the wait.
        bird.restart().await?;
        bird.pause(true)?;
        let deadline = Duration::from_millis(300);
        let started = tokio::time::Instant::now();
        let result = announcer.withdraw_now(deadline).await;
        let took = started.elapsed();
        bird.pause(false)?;
        let e = result.expect_err("withdrawn from a stopped BIRD");
        assert!(matches!(e, BirdError::Timeout { .. }), "{e}");
        assert!(took < Duration::from_secs(5), "took {took:?}");

        // The task goes on holding the protocol down once BIRD answers again.
        bird_announces(&bird, false).await?;
        Ok(())
    }

    #[tokio::test]
    async fn missing_protocol_is_reported() -> Result<()> {
        let logs = logcap::start();
        let bird = TestBird::start(CONFIG).await?;
        let (_wanted_tx, wanted) = watch::channel(true);
        let announcer = Announcer::start(bird.client(), "nosuch".to_owned(), POLL, wanted);
        let mut status = announcer.status();
        let s = status_until(&mut status, "error", |s| s.last_error.is_some()).await?;
        assert!(s.bird_reachable);
        assert_eq!(s.announced, None);
        let error = s.last_error.unwrap_or_default();
        assert!(error.contains("no protocol named \"nosuch\""), "{error}");
        if logs {
            eventually("failed polls", DEADLINE, || async {
                Ok(logcap::matching(Level::Debug, "still cannot announce").len() >= 2)
            })
            .await?;
            assert_eq!(logcap::matching(Level::Warn, "nosuch").len(), 1);
        }
        Ok(())
    }
}
