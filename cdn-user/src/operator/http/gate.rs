//! Admission of connections to a listener: how many are served at once, from whom, and who
//! makes room when the listener is full. The HTTP listeners and the control socket use it.
//!
//! Why not just a semaphore in front of `accept`: then a full listener leaves newcomers in the
//! kernel's listen backlog behind every idle connection of a flood, and a peer's health probe
//! (which gives up after its timeout) is not served before it has failed. Here every
//! connection is accepted at once and admitted or closed on the spot:
//!
//! - Connections are counted in pools. A listener with members (the peer plane) keeps a pool
//!   reserved for connections whose source is a member address, so outsiders can never take
//!   the places the members' health probes and history syncs need; everyone else shares the
//!   other pool. Outsiders are still served (a steering-only node syncs from members, an
//!   operator may `curl /ready`), only never at the members' expense.
//! - One source address holds at most `per_source` places of a pool, so a flood from one host
//!   cannot fill it.
//! - A full pool (or a source at its share) makes room by closing its *oldest idle*
//!   connection: one that has not sent a complete request yet, or has had its answer. A real
//!   client sends its request as soon as it is connected and is busy within milliseconds; a
//!   slow or silent one is idle for as long as it is open. So a flood of slow connections only
//!   ever displaces itself, and a legitimate client gets in however many there are. When
//!   every place is busy serving requests, the newcomer is closed instead.
//!
//! The memory a listener can use is thereby bounded by its pool sizes times what one
//! connection may buffer, whatever the number of connection attempts.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How many connections a listener admits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slots {
    /// Places reserved for connections from member addresses; 0: members count as everyone
    /// else.
    pub members: usize,
    /// Places for every other connection. At least 1.
    pub others: usize,
    /// Places one source address may hold in a pool at once; 0: no per-source limit (the
    /// control socket, whose clients have no address).
    pub per_source: usize,
}

/// The state of one admitted connection.
const IDLE: u8 = 0;
const BUSY: u8 = 1;
const EVICTED: u8 = 2;

/// One admitted connection, as the gate sees it.
#[derive(Debug)]
struct Conn {
    source: Option<IpAddr>,
    state: AtomicU8,
    evict: Notify,
}

#[derive(Debug, Default)]
struct Pool {
    capacity: usize,
    /// In order of admission, so the first idle one is the one idle longest.
    conns: VecDeque<Arc<Conn>>,
}

impl Pool {
    /// Closes the oldest idle connection for which `matches` holds; false when there is none.
    fn evict_oldest_idle(&mut self, matches: impl Fn(&Conn) -> bool) -> bool {
        let found = self.conns.iter().position(|c| {
            matches(c)
                && c.state
                    .compare_exchange(IDLE, EVICTED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
        });
        match found.and_then(|i| self.conns.remove(i)) {
            Some(conn) => {
                // A stored permit: the connection sees it even if it is not waiting yet.
                conn.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// What happened to the connections offered to a gate, since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GateCounts {
    pub admitted: u64,
    /// Idle connections closed to make room for a newer one.
    pub evicted: u64,
    /// Newcomers closed because every place was busy.
    pub refused: u64,
}

/// The admission state of one listener; see the module documentation.
#[derive(Debug)]
pub struct Gate {
    slots: Slots,
    /// `[members, others]`.
    pools: Mutex<[Pool; 2]>,
    admitted: AtomicU64,
    evicted: AtomicU64,
    refused: AtomicU64,
}

impl Gate {
    pub fn new(slots: Slots) -> Arc<Gate> {
        Arc::new(Gate {
            slots,
            pools: Mutex::new([
                Pool {
                    capacity: slots.members,
                    ..Pool::default()
                },
                Pool {
                    capacity: slots.others.max(1),
                    ..Pool::default()
                },
            ]),
            admitted: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    pub fn slots(&self) -> Slots {
        self.slots
    }

    pub fn counts(&self) -> GateCounts {
        GateCounts {
            admitted: self.admitted.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    /// Connections admitted and not yet gone (or evicted).
    pub fn open(&self) -> usize {
        self.lock().iter().map(|p| p.conns.len()).sum()
    }

    fn lock(&self) -> MutexGuard<'_, [Pool; 2]> {
        // Nothing panics while holding the lock; if something did, the pools are still
        // consistent (every change is a single push or remove).
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a new connection from `source` (`None` for a unix socket), in the members' pool
    /// if `member` and the gate has one. `None`: refused, close it.
    pub fn admit(self: &Arc<Self>, source: Option<IpAddr>, member: bool) -> Option<Ticket> {
        let mut pools = self.lock();
        let pool = &mut pools[usize::from(!(member && self.slots.members > 0))];
        let mut evicted = 0;
        if let (Some(source), 1..) = (source, self.slots.per_source) {
            let held = pool
                .conns
                .iter()
                .filter(|c| c.source == Some(source))
                .count();
            if held >= self.slots.per_source {
                if !pool.evict_oldest_idle(|c| c.source == Some(source)) {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                evicted += 1;
            }
        }
        if pool.conns.len() >= pool.capacity {
            if !pool.evict_oldest_idle(|_| true) {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            evicted += 1;
        }
        let conn = Arc::new(Conn {
            source,
            state: AtomicU8::new(IDLE),
            evict: Notify::new(),
        });
        pool.conns.push_back(Arc::clone(&conn));
        drop(pools);
        self.evicted.fetch_add(evicted, Ordering::Relaxed);
        self.admitted.fetch_add(1, Ordering::Relaxed);
        Some(Ticket {
            gate: Arc::clone(self),
            conn,
        })
    }
}

/// An admitted connection's place; dropping it frees the place.
#[derive(Debug)]
pub struct Ticket {
    gate: Arc<Gate>,
    conn: Arc<Conn>,
}

impl Ticket {
    /// The connection has sent its request: it may not be evicted until [`Ticket::idle`].
    /// False if it was evicted before.
    pub fn busy(&self) -> bool {
        self.conn
            .state
            .compare_exchange(IDLE, BUSY, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The connection has had its answer; it may be evicted again.
    pub fn idle(&self) {
        let _ = self
            .conn
            .state
            .compare_exchange(BUSY, IDLE, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Resolves when the gate closed this connection to make room for a newer one.
    pub async fn evicted(&self) {
        self.conn.evict.notified().await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut pools = self.gate.lock();
        for pool in pools.iter_mut() {
            if let Some(i) = pool.conns.iter().position(|c| Arc::ptr_eq(c, &self.conn)) {
                pool.conns.remove(i);
                return;
            }
        }
    }
}

/// Says, at most once per [`Reporter::EVERY`], how many connections a gate evicted or refused:
/// an operator learns of a flood from the log without one line per connection.
#[derive(Debug)]
pub struct Reporter {
    name: &'static str,
    last: Instant,
    reported: GateCounts,
}

impl Reporter {
    pub const EVERY: Duration = Duration::from_secs(10);

    pub fn new(name: &'static str) -> Reporter {
        let now = Instant::now();
        Reporter {
            name,
            // The first flood is reported at once.
            last: now.checked_sub(Self::EVERY).unwrap_or(now),
            reported: GateCounts::default(),
        }
    }

    /// Logs a warning if `gate` evicted or refused connections since the last report, and the
    /// last one is [`Reporter::EVERY`] old. Called on every accept and every
    /// [`Reporter::EVERY`], so the end of a flood is reported too.
    pub fn tick(&mut self, gate: &Gate) {
        if self.last.elapsed() < Self::EVERY {
            return;
        }
        let now = gate.counts();
        let evicted = now.evicted - self.reported.evicted;
        let refused = now.refused - self.reported.refused;
        if evicted + refused == 0 {
            // Nothing to say: the next event is reported at once.
            return;
        }
        let slots = gate.slots();
        log::warn!(
            listener = self.name,
            evicted,
            refused,
            member_slots = slots.members,
            other_slots = slots.others,
            per_source = slots.per_source;
            "listener full: idle connections closed to make room, or newcomers refused"
        );
        self.reported = now;
        self.last = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn members_have_places_outsiders_cannot_take() {
        let gate = Gate::new(Slots {
            members: 2,
            others: 2,
            per_source: 0,
        });
        let outsiders: Vec<_> = (1..=10).filter_map(|i| gate.admit(ip(i), false)).collect();
        // Every newcomer evicted an idle outsider: two places, the last two admitted.
        assert_eq!(outsiders.len(), 10);
        assert_eq!(gate.open(), 2);
        assert_eq!(gate.counts().evicted, 8);
        let a = gate.admit(ip(100), true).unwrap();
        let b = gate.admit(ip(101), true).unwrap();
        assert!(a.busy() && b.busy());
        // Both member places busy: the next member is refused, not put among the others.
        assert!(gate.admit(ip(102), true).is_none());
        assert_eq!(gate.open(), 4);
        drop(a);
        assert!(gate.admit(ip(102), true).is_some());
    }

    #[test]
    fn a_full_pool_evicts_the_oldest_idle_and_never_a_busy_one() {
        let gate = Gate::new(Slots {
            members: 0,
            others: 3,
            per_source: 0,
        });
        let first = gate.admit(ip(1), false).unwrap();
        let second = gate.admit(ip(2), false).unwrap();
        let third = gate.admit(ip(3), false).unwrap();
        assert!(first.busy());
        // The oldest idle is `second`; `first` is busy.
        let fourth = gate.admit(ip(4), false).unwrap();
        assert!(!second.busy(), "second was evicted");
        assert!(third.busy() && fourth.busy());
        // All busy: refused.
        assert!(gate.admit(ip(5), false).is_none());
        assert_eq!(gate.counts().refused, 1);
        // Answered and idle again: evictable.
        first.idle();
        assert!(gate.admit(ip(5), false).is_some());
        assert!(!first.busy());
    }

    #[test]
    fn one_source_holds_at_most_its_share() {
        let gate = Gate::new(Slots {
            members: 0,
            others: 8,
            per_source: 2,
        });
        let flood: Vec<_> = (0..5).filter_map(|_| gate.admit(ip(1), false)).collect();
        assert_eq!(flood.len(), 5);
        // Only two of the flood's connections are still open; everyone else has room.
        assert_eq!(gate.open(), 2);
        let others: Vec<_> = (2..8).filter_map(|i| gate.admit(ip(i), false)).collect();
        assert_eq!(others.len(), 6);
        assert_eq!(gate.open(), 8);
        for c in &flood[3..] {
            assert!(c.busy());
        }
        // The source's two places are busy: its next connection is refused.
        assert!(gate.admit(ip(1), false).is_none());
    }

    #[tokio::test]
    async fn an_evicted_connection_is_told() {
        let gate = Gate::new(Slots {
            members: 0,
            others: 1,
            per_source: 0,
        });
        let old = gate.admit(None, false).unwrap();
        let _new = gate.admit(None, false).unwrap();
        tokio::time::timeout(Duration::from_secs(1), old.evicted())
            .await
            .expect("eviction signalled");
    }
}
