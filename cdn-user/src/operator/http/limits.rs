//! The limits of each listener, and which endpoints it serves.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use tokio::sync::watch;

use super::gate::Slots;

/// Time a client gets to send its complete request head; slower ones get `408`.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client gets to take the response off our hands.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a peer gets to send its complete request head on the peer plane. Peers' requests are
/// a few hundred bytes sent at once; health probes give up well before this.
pub const PEER_HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request body read on the peer plane: a claim message of the most entries.
pub const MAX_BODY: usize = crate::cluster::claims::MAX_BODY;
/// Connections served at once from non-member addresses, per listener. A Prometheus server or
/// two, an operator's `curl`, steering-only nodes syncing: a few at a time.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections served at once from member addresses on the peer plane (reserved for them).
/// Each member has about three at once (health probe, history sync, drift digests), so this
/// is room for a cluster of twenty busy members, far more with probes spread over time.
pub const MEMBER_CONNECTIONS: usize = 64;
/// Connections one source address may hold at once in a pool. A member or a scraper needs
/// one to three.
pub const PER_SOURCE: usize = 8;

/// The server's protections; [`Limits::DEFAULT`] in the daemon, shorter ones in tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Who is served at once (see [`gate`]).
    pub slots: Slots,
    pub head_timeout: Duration,
    pub write_timeout: Duration,
    /// Largest request body read (claims, on the peer plane; within `head_timeout` of the
    /// head's arrival). 0: bodies are never read.
    pub max_body: usize,
}

impl Limits {
    /// The peer plane: places reserved for members, a short head timeout.
    pub const PEER: Limits = Limits {
        slots: Slots {
            members: MEMBER_CONNECTIONS,
            others: MAX_CONNECTIONS,
            per_source: PER_SOURCE,
        },
        head_timeout: PEER_HEAD_TIMEOUT,
        write_timeout: WRITE_TIMEOUT,
        max_body: MAX_BODY,
    };
    /// The metrics listener: no member places (members do not scrape).
    pub const METRICS: Limits = Limits {
        slots: Slots {
            members: 0,
            others: MAX_CONNECTIONS,
            per_source: PER_SOURCE,
        },
        head_timeout: HEAD_TIMEOUT,
        write_timeout: WRITE_TIMEOUT,
        max_body: 0,
    };
    /// One listener for both: the members' places, and the metrics' head timeout (scrapers may
    /// be far away).
    pub const SHARED: Limits = Limits {
        head_timeout: HEAD_TIMEOUT,
        ..Limits::PEER
    };
    pub const DEFAULT: Limits = Limits::SHARED;
}

/// Which endpoints a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plane {
    /// `/ready`, `/table/<service>`, `/digests`.
    Peer,
    /// `/metrics` and the index page.
    Metrics,
    /// All of them, on one listener.
    Shared,
}

impl Plane {
    /// The name in logs.
    pub const fn name(self) -> &'static str {
        match self {
            Plane::Peer => "peer",
            Plane::Metrics => "metrics",
            Plane::Shared => "peer+metrics",
        }
    }

    pub const fn limits(self) -> Limits {
        match self {
            Plane::Peer => Limits::PEER,
            Plane::Metrics => Limits::METRICS,
            Plane::Shared => Limits::SHARED,
        }
    }

    pub(super) fn serves_peers(self) -> bool {
        self != Plane::Metrics
    }

    pub(super) fn serves_metrics(self) -> bool {
        self != Plane::Peer
    }
}

/// The member addresses: connections from them get the members' places. A watch, so that a
/// reload's new member list applies to the next connection.
pub type Members = watch::Receiver<BTreeSet<IpAddr>>;
