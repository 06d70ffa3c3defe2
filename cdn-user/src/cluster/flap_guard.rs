//! The mass-flap rule: when every member that was up goes down within one check round, the
//! cause is this node, not the members, so the table keeps the members it had.
//!
//! Members fail one by one: a crashed process, a dead machine, a pulled cable. For all of them
//! to fail within the same round of checks, something they share must have broken, and the one
//! thing every member shares is the node checking them: its descriptors, its memory, its
//! interface, its CPU. Rebuilding the table from such a view would move every bucket twice
//! (away, and back when the checks work again), so the guard holds the members that were up
//! and the table stays as it was.
//!
//! A genuine total outage (every member really died at once) looks the same from here, and is
//! held the same way. Nothing better exists then either: with no eligible member, a table
//! keeps its last owners anyway (new flows go where they went before), so holding changes
//! nothing for the packets; it only raises the flag. This node's own announcement is still
//! decided by its own member's health, not by the hold.
//!
//! Members sharing one cause do not all reach `fall` in the same instant, so the first to fall
//! would leave the table before the others follow. Hence a member that just fell while every
//! member still up is failing too stays in the table for up to one round ("deferred"): either
//! the others fall as well (a hold, and the table never moved), or one of them succeeds or the
//! round passes, and the member leaves the table then. A member falling while the others pass
//! their checks leaves at once, as before.
//!
//! The hold ends when checks work again: once every held member is up again, or one round after
//! the first of them came back (the others then are judged as they are).
//!
//! It takes at least two members going down together: a lone member going down is a member
//! going down, and a table without eligible members keeps its owners anyway.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use super::health::MemberHealth;

/// What is being held, while the rule applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    /// The members that went down together, kept in the table as if up.
    pub members: BTreeSet<u16>,
    /// When the hold began.
    pub since: SystemTime,
    /// When the first held member came back up, if one has.
    recovering_since: Option<SystemTime>,
}

/// A change of the hold, for the caller to log and to rebuild the table after.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The hold began, with these members.
    Held(BTreeSet<u16>),
    /// The hold ended; members are judged by their own health again.
    Released,
    /// Members whose fall was deferred (the others were failing too) now leave the table.
    Confirmed(BTreeSet<u16>),
}

/// The rule's memory between two health views.
#[derive(Clone, Debug, Default)]
pub struct FlapGuard {
    /// The previous raw view: member id → healthy.
    previous: BTreeMap<u16, Option<bool>>,
    /// Members that went from up to down within the last round, with when.
    recent_downs: BTreeMap<u16, SystemTime>,
    /// Members down but kept in the table for now, because every member up was failing too.
    deferred: BTreeSet<u16>,
    held: Option<Hold>,
}

impl FlapGuard {
    /// The hold in force, if any.
    pub fn hold(&self) -> Option<&Hold> {
        self.held.as_ref()
    }

    /// Whether member `id` takes part in the table: held members do, others by their health.
    pub fn is_up(&self, id: u16, health: &BTreeMap<u16, MemberHealth>) -> bool {
        match &self.held {
            Some(hold) => hold.members.contains(&id),
            None => {
                self.deferred.contains(&id) || health.get(&id).and_then(|h| h.healthy) == Some(true)
            }
        }
    }

    /// Takes in a new raw health view (every configured member) at `now`; `round` is one
    /// check round (the longest interval plus the longest timeout of the members).
    pub fn observe(
        &mut self,
        health: &BTreeMap<u16, MemberHealth>,
        round: Duration,
        now: SystemTime,
    ) -> Option<Change> {
        let up: BTreeSet<u16> = health
            .iter()
            .filter(|(_, h)| h.healthy == Some(true))
            .map(|(id, _)| *id)
            .collect();
        for (id, h) in health {
            let before = self.previous.get(id).copied().flatten();
            match (before, h.healthy) {
                (Some(true), Some(false)) => {
                    self.recent_downs.insert(*id, now);
                }
                (_, Some(true)) => {
                    self.recent_downs.remove(id);
                }
                _ => {}
            }
        }
        self.previous = health.iter().map(|(id, h)| (*id, h.healthy)).collect();
        self.recent_downs.retain(|id, at| {
            health.contains_key(id) && now.duration_since(*at).unwrap_or_default() <= round
        });

        // Every member still up is failing as well: the members that just fell may be the
        // first of a mass flap, so they stay in the table until it is clear.
        // (With none up there is nothing to defer for: a table without eligible members
        // keeps its owners anyway.)
        let all_failing = !up.is_empty()
            && up
                .iter()
                .all(|id| health.get(id).is_some_and(|h| h.consecutive_failed > 0));
        let deferred: BTreeSet<u16> = if self.held.is_none() && all_failing {
            self.recent_downs.keys().copied().collect()
        } else {
            BTreeSet::new()
        };
        let confirmed: BTreeSet<u16> = self.deferred.difference(&deferred).copied().collect();
        self.deferred = deferred;

        match &mut self.held {
            None if up.is_empty() && self.recent_downs.len() >= 2 => {
                self.deferred.clear();
                let members: BTreeSet<u16> = self.recent_downs.keys().copied().collect();
                self.held = Some(Hold {
                    members: members.clone(),
                    since: now,
                    recovering_since: None,
                });
                self.recent_downs.clear();
                Some(Change::Held(members))
            }
            None if !confirmed.is_empty() => Some(Change::Confirmed(confirmed)),
            None => None,
            Some(hold) => {
                hold.members.retain(|id| health.contains_key(id));
                let back = hold.members.iter().filter(|id| up.contains(id)).count();
                if back > 0 && hold.recovering_since.is_none() {
                    hold.recovering_since = Some(now);
                }
                let waited = hold
                    .recovering_since
                    .is_some_and(|t| now.duration_since(t).unwrap_or_default() >= round);
                // Members that are up but were not held also mean the checks work.
                let others_up = up.iter().any(|id| !hold.members.contains(id));
                if hold.members.is_empty() || back == hold.members.len() || waited || others_up {
                    self.held = None;
                    Some(Change::Released)
                } else {
                    None
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUND: Duration = Duration::from_secs(1);

    fn view(states: &[(u16, Option<bool>)]) -> BTreeMap<u16, MemberHealth> {
        states
            .iter()
            .map(|&(id, healthy)| {
                (
                    id,
                    MemberHealth {
                        healthy,
                        last_latency: None,
                        last_error: None,
                        consecutive_ok: 0,
                        consecutive_failed: 0,
                        checks_ok: 0,
                        checks_failed: 0,
                        changed_at: SystemTime::UNIX_EPOCH,
                    },
                )
            })
            .collect()
    }

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn all_down_within_a_round_holds_until_they_are_back() {
        let mut g = FlapGuard::default();
        let up = view(&[(1, Some(true)), (2, Some(true)), (3, Some(true))]);
        assert_eq!(g.observe(&up, ROUND, at(0)), None);
        let one = view(&[(1, Some(false)), (2, Some(true)), (3, Some(true))]);
        assert_eq!(g.observe(&one, ROUND, at(100)), None);
        assert!(!g.is_up(1, &one));
        let all = view(&[(1, Some(false)), (2, Some(false)), (3, Some(false))]);
        let held = g.observe(&all, ROUND, at(600));
        assert_eq!(held, Some(Change::Held([1, 2, 3].into())));
        // The member that fell first is back in the table too.
        assert!((1..=3).all(|id| g.is_up(id, &all)));
        // One back: still held, for one round at most.
        let first = view(&[(1, Some(true)), (2, Some(false)), (3, Some(false))]);
        assert_eq!(g.observe(&first, ROUND, at(5_000)), None);
        assert!(g.is_up(2, &first));
        assert_eq!(g.observe(&first, ROUND, at(6_000)), Some(Change::Released));
        assert!(!g.is_up(2, &first));
    }

    /// `view` with the members `ids` in a failure streak.
    fn failing(mut v: BTreeMap<u16, MemberHealth>, ids: &[u16]) -> BTreeMap<u16, MemberHealth> {
        for id in ids {
            if let Some(h) = v.get_mut(id) {
                h.consecutive_failed = 1;
            }
        }
        v
    }

    #[test]
    fn the_first_to_fall_stays_while_the_others_fail_too() {
        let mut g = FlapGuard::default();
        g.observe(&view(&[(1, Some(true)), (2, Some(true))]), ROUND, at(0));
        // 1 falls while 2 is failing too: 1 stays in the table, nothing to rebuild.
        let first = failing(view(&[(1, Some(false)), (2, Some(true))]), &[1, 2]);
        assert_eq!(g.observe(&first, ROUND, at(100)), None);
        assert!(g.is_up(1, &first));
        // 2 passes its next check: 1 leaves now.
        let passes = failing(view(&[(1, Some(false)), (2, Some(true))]), &[1]);
        assert_eq!(
            g.observe(&passes, ROUND, at(200)),
            Some(Change::Confirmed([1].into()))
        );
        assert!(!g.is_up(1, &passes));
        // Deferred at most one round.
        let mut g = FlapGuard::default();
        g.observe(&view(&[(1, Some(true)), (2, Some(true))]), ROUND, at(0));
        g.observe(&first, ROUND, at(100));
        assert_eq!(
            g.observe(&first, ROUND, at(1_200)),
            Some(Change::Confirmed([1].into()))
        );
        // Both fall: a hold, and 1 never left the table.
        let mut g = FlapGuard::default();
        g.observe(&view(&[(1, Some(true)), (2, Some(true))]), ROUND, at(0));
        g.observe(&first, ROUND, at(100));
        let both = failing(view(&[(1, Some(false)), (2, Some(false))]), &[1, 2]);
        assert_eq!(
            g.observe(&both, ROUND, at(150)),
            Some(Change::Held([1, 2].into()))
        );
    }

    #[test]
    fn all_back_releases_at_once() {
        let mut g = FlapGuard::default();
        g.observe(&view(&[(1, Some(true)), (2, Some(true))]), ROUND, at(0));
        let down = view(&[(1, Some(false)), (2, Some(false))]);
        assert!(g.observe(&down, ROUND, at(10)).is_some());
        let back = view(&[(1, Some(true)), (2, Some(true))]);
        assert_eq!(g.observe(&back, ROUND, at(20)), Some(Change::Released));
    }

    #[test]
    fn members_failing_one_by_one_are_not_held() {
        let mut g = FlapGuard::default();
        g.observe(&view(&[(1, Some(true)), (2, Some(true))]), ROUND, at(0));
        g.observe(&view(&[(1, Some(false)), (2, Some(true))]), ROUND, at(100));
        let all = view(&[(1, Some(false)), (2, Some(false))]);
        assert_eq!(g.observe(&all, ROUND, at(5_000)), None);
        assert!(g.hold().is_none());
        assert!(!g.is_up(2, &all));
    }

    #[test]
    fn a_lone_member_or_a_first_view_is_not_held() {
        let mut g = FlapGuard::default();
        // Down from the first result on: never up, nothing to hold.
        let first = view(&[(1, Some(false)), (2, Some(false))]);
        assert_eq!(g.observe(&first, ROUND, at(0)), None);
        // One of three up, and it goes down: a member going down.
        g.observe(
            &view(&[(1, Some(true)), (2, Some(false)), (3, Some(false))]),
            ROUND,
            at(10),
        );
        let all = view(&[(1, Some(false)), (2, Some(false)), (3, Some(false))]);
        assert_eq!(g.observe(&all, ROUND, at(20)), None);
    }
}
