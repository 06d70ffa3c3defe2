//! What happens when: episodes (a fault and, after a hold, its repair) drawn from a seeded
//! RNG, so that a run is replayed by giving its seed again.

use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng};

/// The kinds of fault a chaos run injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// `kill -9` of a node's controller, started again after the hold.
    ControllerKill,
    /// A node's BIRD killed and started again.
    BirdKill,
    /// A node's web server killed and started again: the member's own flows die.
    HttpdKill,
    /// Every process of a node killed at once, then all started again.
    NodeKill,
    /// A broken configuration file, reloaded: must be refused and change nothing.
    BadReload,
    /// A bounded flood of random-source SYNs at a VIP.
    SynFlood,
    /// A bounded flood of random-source ACKs (for no connection) at a VIP.
    AckFlood,
    /// The router withdraws a node's routes, then restores them.
    RouteFlip,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::ControllerKill,
        Kind::BirdKill,
        Kind::HttpdKill,
        Kind::NodeKill,
        Kind::BadReload,
        Kind::SynFlood,
        Kind::AckFlood,
        Kind::RouteFlip,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::ControllerKill => "controller_kill",
            Kind::BirdKill => "bird_kill",
            Kind::HttpdKill => "web_server_kill",
            Kind::NodeKill => "node_kill",
            Kind::BadReload => "bad_reload",
            Kind::SynFlood => "syn_flood",
            Kind::AckFlood => "ack_flood",
            Kind::RouteFlip => "route_flip",
        }
    }

    /// Whether the episode kills what serves a member's connections: its downloads may die.
    pub fn is_death(self) -> bool {
        matches!(self, Kind::HttpdKill | Kind::NodeKill)
    }

    /// How often it is drawn, relative to the others.
    fn weight(self) -> u32 {
        match self {
            Kind::SynFlood | Kind::AckFlood | Kind::BirdKill => 1,
            _ => 2,
        }
    }
}

/// One fault: `kind` on node `node` (an index into the lab's nodes), repaired after `hold`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Episode {
    pub kind: Kind,
    pub node: usize,
    pub hold: Duration,
    /// Which broken configuration a [`Kind::BadReload`] writes, or the flood's RNG seed.
    pub variant: u64,
}

/// The seeded source of episodes and of the quiet gaps between them.
pub struct Schedule {
    rng: StdRng,
    nodes: usize,
}

impl Schedule {
    pub fn new(seed: u64, nodes: usize) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            nodes,
        }
    }

    /// The quiet time before the next episode, then the episode.
    pub fn next_episode(&mut self) -> (Duration, Episode) {
        let gap = Duration::from_millis(self.rng.random_range(1000..4000));
        let total: u32 = Kind::ALL.iter().map(|k| k.weight()).sum();
        let mut pick = self.rng.random_range(0..total);
        let mut kind = Kind::ALL[0];
        for k in Kind::ALL {
            if pick < k.weight() {
                kind = k;
                break;
            }
            pick -= k.weight();
        }
        let episode = Episode {
            kind,
            node: self.rng.random_range(0..self.nodes),
            hold: Duration::from_millis(self.rng.random_range(2000..6000)),
            variant: self.rng.random(),
        };
        (gap, episode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_the_same_schedule_and_every_kind_comes_up() {
        let draw = |seed| {
            let mut s = Schedule::new(seed, 3);
            (0..200).map(|_| s.next_episode()).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
        let episodes = draw(42);
        for kind in Kind::ALL {
            assert!(
                episodes.iter().any(|(_, e)| e.kind == kind),
                "{kind:?} never drawn"
            );
        }
        assert!(episodes.iter().all(|(_, e)| e.node < 3));
    }
}
