//! The learned owners' maps (README "PoPs: learned owners"): `LEARNED` (flow -> member),
//! `LEARNED_BUCKETS` (one bit per bucket index that some learned flow has) and the
//! `CLAIM_EVENTS` ring of searches this node accepted.
//!
//! The three maps are optional in the object: a program without them still loads, and only a
//! cluster with PoPs, which needs them, turns their absence into an error ([`Learning::get`]).

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData, MapError, RingBuf};
use cdn_common::maps::{self as m, ClaimEvent, FlowKey, LEARNED_BUCKET_WORDS, Learned};

use super::DataPlaneError;

type Result<T> = std::result::Result<T, DataPlaneError>;

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataPlaneError {
    move |source| DataPlaneError::Map { map, source }
}

/// The maps of learned owners, and the claim events, if the program has them.
pub struct Learning {
    maps: Option<LearnedMaps>,
    events: Option<ClaimReader>,
}

impl Learning {
    /// Takes the maps out of a loaded object; missing ones are remembered as missing.
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let maps = match (
            ebpf.take_map(m::MAP_LEARNED),
            ebpf.take_map(m::MAP_LEARNED_BUCKETS),
        ) {
            (Some(learned), Some(buckets)) => Some(LearnedMaps {
                learned: HashMap::try_from(learned).map_err(map_err(m::MAP_LEARNED))?,
                buckets: Array::try_from(buckets).map_err(map_err(m::MAP_LEARNED_BUCKETS))?,
            }),
            _ => None,
        };
        let events = match ebpf.take_map(m::MAP_CLAIM_EVENTS) {
            Some(ring) => Some(ClaimReader {
                ring: RingBuf::try_from(ring).map_err(map_err(m::MAP_CLAIM_EVENTS))?,
            }),
            None => None,
        };
        Ok(Self { maps, events })
    }

    /// The learned maps, or which one the program lacks.
    pub fn get(&mut self) -> Result<&mut LearnedMaps> {
        self.maps
            .as_mut()
            .ok_or(DataPlaneError::MissingMap(m::MAP_LEARNED))
    }

    /// Whether the program has the learned maps and the claim events.
    pub fn present(&self) -> bool {
        self.maps.is_some() && self.events.is_some()
    }

    /// The claim events' reader (there is one: the kernel keeps one consumer position).
    pub fn take_events(&mut self) -> Result<ClaimReader> {
        self.events
            .take()
            .ok_or(DataPlaneError::MissingMap(m::MAP_CLAIM_EVENTS))
    }
}

/// `LEARNED` and `LEARNED_BUCKETS`.
pub struct LearnedMaps {
    learned: HashMap<MapData, FlowKey, Learned>,
    buckets: Array<MapData, u32>,
}

/// Word and bit of bucket index `bucket` in `LEARNED_BUCKETS`.
pub const fn bucket_bit(bucket: u32) -> (u32, u32) {
    (bucket / 32, 1 << (bucket % 32))
}

impl LearnedMaps {
    /// Learns that `member` holds `key` (the caller sets the bucket's bit, see
    /// [`Self::set_word`]).
    pub fn learn(&mut self, key: &FlowKey, member: u16) -> Result<()> {
        let value = Learned {
            member,
            _pad: [0; 6],
            packets: 0,
        };
        self.learned
            .insert(key, value, 0)
            .map_err(map_err(m::MAP_LEARNED))
    }

    /// The entry of `key`, if any.
    pub fn get(&self, key: &FlowKey) -> Result<Option<Learned>> {
        match self.learned.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(m::MAP_LEARNED)(e)),
        }
    }

    /// Every entry. Entries the program's LRU evicts meanwhile are skipped.
    pub fn entries(&self) -> Result<Vec<(FlowKey, Learned)>> {
        let mut out = Vec::new();
        for item in self.learned.iter() {
            match item {
                Ok(kv) => out.push(kv),
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(map_err(m::MAP_LEARNED)(e)),
            }
        }
        Ok(out)
    }

    pub fn remove(&mut self, key: &FlowKey) -> Result<()> {
        match self.learned.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(m::MAP_LEARNED)(e)),
        }
    }

    pub fn word(&self, word: u32) -> Result<u32> {
        self.buckets
            .get(&word, 0)
            .map_err(map_err(m::MAP_LEARNED_BUCKETS))
    }

    pub fn set_word(&mut self, word: u32, value: u32) -> Result<()> {
        self.buckets
            .set(word, value, 0)
            .map_err(map_err(m::MAP_LEARNED_BUCKETS))
    }

    /// The nonzero words (index -> bits): a full scan, for start-up.
    pub fn nonzero_words(&self) -> Result<BTreeMap<u32, u32>> {
        let mut out = BTreeMap::new();
        for word in 0..LEARNED_BUCKET_WORDS {
            let bits = self.word(word)?;
            if bits != 0 {
                out.insert(word, bits);
            }
        }
        Ok(out)
    }

    /// Makes the bucket words `want` (index -> bits, the rest zero), given that `have` are
    /// the nonzero words now; writes only the words that change. Returns the words written.
    pub fn sync_words(
        &mut self,
        have: &BTreeMap<u32, u32>,
        want: &BTreeMap<u32, u32>,
    ) -> Result<usize> {
        let mut written = 0;
        for (&word, &bits) in want {
            if have.get(&word) != Some(&bits) {
                self.set_word(word, bits)?;
                written += 1;
            }
        }
        for &word in have.keys() {
            if !want.contains_key(&word) {
                self.set_word(word, 0)?;
                written += 1;
            }
        }
        Ok(written)
    }
}

/// The consumer side of `CLAIM_EVENTS`.
pub struct ClaimReader {
    ring: RingBuf<MapData>,
}

impl ClaimReader {
    /// The next event, `None` once the ring is empty. Records of another size are skipped.
    pub fn next_event(&mut self) -> Option<ClaimEvent> {
        loop {
            let item = self.ring.next()?;
            if item.len() >= size_of::<ClaimEvent>() {
                // SAFETY: the record holds at least a ClaimEvent's bytes; ClaimEvent is plain
                // integers, valid for every bit pattern; read_unaligned needs no alignment.
                return Some(unsafe { item.as_ptr().cast::<ClaimEvent>().read_unaligned() });
            }
        }
    }
}

/// Readable when events are waiting: for `tokio::io::unix::AsyncFd`.
impl AsFd for ClaimReader {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl AsRawFd for ClaimReader {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}
