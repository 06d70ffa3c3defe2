//! Hop history of the steering table.
//!
//! A bucket lists its current owner first and then up to [`MAX_HOPS`]` - 1` previous owners,
//! newest first. When a bucket changes owner, flows that began under an earlier owner are still
//! open there: the data plane passes a packet that the first hop has no socket for on to the
//! next hop, so keeping the previous owners lets those flows survive a table change.
//!
//! Each table rebuild turns the previous buckets and the new owners into the next buckets with
//! [`advance`]:
//!
//! - Ids that left the configuration are dropped first (their nodes are gone for good; an
//!   unhealthy member is still configured and stays, since its open flows may still live).
//! - An owner that did not change keeps its bucket as it is.
//! - A new owner goes in front; if it was already in the history it moves to the front rather
//!   than appearing twice, and the oldest hop falls off the end.
//! - A bucket with no new owner (an empty cluster) keeps its previous hops, so the data plane
//!   goes on delivering to the last known owners instead of dropping everything.
//!
//! Unused slots always hold [`NO_MEMBER`], after all used ones, and no id appears twice.

use std::collections::BTreeMap;

use cdn_common::maps::{Bucket, MAX_HOPS, NO_MEMBER};

/// What one [`advance`] did, for the caller to log and count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Buckets whose owner (`hops[0]`) differs from before.
    pub owner_changed: usize,
    /// Buckets that had no new owner and kept their previous hops.
    pub no_owner: usize,
    /// Buckets from which at least one id unknown to the configuration was dropped.
    pub purged: usize,
    /// The previous table had a different size, so its history could not be carried over: bucket
    /// `i` of a table of another size holds other flows. Every bucket started afresh.
    pub resized: bool,
}

/// Combines two histories of the same table, bucket by bucket: `primary`'s hops first, then
/// those of `secondary` it lacks, as many as a bucket holds. Used when a starting node takes
/// over a running member's history (`primary`) without forgetting its own (`secondary`).
/// Tables of different sizes do not describe the same buckets: `primary` is returned as is.
pub fn merge(primary: &[Bucket], secondary: &[Bucket]) -> Vec<Bucket> {
    if primary.len() != secondary.len() {
        return primary.to_vec();
    }
    primary
        .iter()
        .zip(secondary)
        .map(|(p, s)| {
            let mut out = Bucket::EMPTY;
            let mut n = 0;
            for hop in p.hops.iter().chain(&s.hops) {
                if *hop != NO_MEMBER && !out.hops[..n].contains(hop) && n < MAX_HOPS {
                    out.hops[n] = *hop;
                    n += 1;
                }
            }
            out
        })
        .collect()
}

/// Computes the buckets that follow `previous` when the table's owners become `new_owners`.
///
/// `known(id)` tells whether `id` is still a member in the configuration; ids for which it is
/// false are removed from every bucket. New owners are taken as given (the table is built from
/// the configuration, so they are members).
///
/// If `previous` does not have as many buckets as `new_owners` (the table size changed, or this
/// is the first table) the history starts empty and [`Summary::resized`] is set when
/// `previous` was not empty.
pub fn advance(
    previous: &[Bucket],
    new_owners: &[u16],
    known: impl Fn(u16) -> bool,
) -> (Vec<Bucket>, Summary) {
    let mut summary = Summary::default();
    let fresh;
    let previous = if previous.len() == new_owners.len() {
        previous
    } else {
        summary.resized = !previous.is_empty();
        fresh = vec![Bucket::EMPTY; new_owners.len()];
        &fresh
    };

    let next = previous
        .iter()
        .zip(new_owners)
        .map(|(old, &owner)| {
            let (kept, purged) = known_hops(old, &known);
            summary.purged += usize::from(purged);
            let hops = if owner == NO_MEMBER {
                summary.no_owner += 1;
                kept
            } else {
                promote(kept, owner)
            };
            if hops[0] != old.hops[0] {
                summary.owner_changed += 1;
            }
            Bucket { hops, _pad: 0 }
        })
        .collect();
    (next, summary)
}

/// The hops of `bucket` that are still configured, in order, without duplicates and with the
/// unused slots at the end, and whether an unknown id was dropped. (Buckets read back from a
/// pinned map may come from an older controller, so duplicates and holes are repaired rather
/// than assumed away.)
fn known_hops(bucket: &Bucket, known: &impl Fn(u16) -> bool) -> ([u16; MAX_HOPS], bool) {
    let mut hops = [NO_MEMBER; MAX_HOPS];
    let mut len = 0;
    let mut purged = false;
    for &id in &bucket.hops {
        if id == NO_MEMBER || hops[..len].contains(&id) {
            continue;
        }
        if known(id) {
            hops[len] = id;
            len += 1;
        } else {
            purged = true;
        }
    }
    (hops, purged)
}

/// `owner` followed by the other ids of `hops` in their order, cut to [`MAX_HOPS`].
/// `hops` must be compact and free of duplicates, as [`known_hops`] returns it.
fn promote(hops: [u16; MAX_HOPS], owner: u16) -> [u16; MAX_HOPS] {
    let mut out = [NO_MEMBER; MAX_HOPS];
    out[0] = owner;
    let rest = hops.iter().filter(|&&id| id != owner && id != NO_MEMBER);
    for (slot, &id) in out[1..].iter_mut().zip(rest) {
        *slot = id;
    }
    out
}

/// Number of buckets each member owns (`hops[0]`); buckets without an owner are not counted.
pub fn per_member_share(table: &[Bucket]) -> BTreeMap<u16, u32> {
    let mut shares = BTreeMap::new();
    for bucket in table {
        let owner = bucket.hops[0];
        if owner != NO_MEMBER {
            *shares.entry(owner).or_insert(0) += 1;
        }
    }
    shares
}

#[cfg(test)]
mod merge_tests {
    use super::*;

    fn b(hops: &[u16]) -> Bucket {
        let mut out = Bucket::EMPTY;
        out.hops[..hops.len()].copy_from_slice(hops);
        out
    }

    #[test]
    fn merge_keeps_primary_order_and_adds_what_it_lacks() {
        let primary = [b(&[1, 2]), b(&[3]), b(&[]), b(&[1, 2, 3])];
        let secondary = [b(&[2, 4]), b(&[3, 1]), b(&[5]), b(&[4])];
        assert_eq!(
            merge(&primary, &secondary),
            [b(&[1, 2, 4]), b(&[3, 1]), b(&[5]), b(&[1, 2, 3])]
        );
        // Different sizes: nothing to combine.
        assert_eq!(merge(&primary, &secondary[..2]), primary);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const A: u16 = 1;
    const B: u16 = 2;
    const C: u16 = 3;
    const D: u16 = 4;
    const N: u16 = NO_MEMBER;

    fn all_known(_: u16) -> bool {
        true
    }

    fn bucket(hops: [u16; MAX_HOPS]) -> Bucket {
        Bucket { hops, _pad: 0 }
    }

    /// Runs one bucket through a sequence of owners, starting from an empty table.
    fn chain(owners: &[u16]) -> [u16; MAX_HOPS] {
        let mut table = vec![Bucket::EMPTY];
        for &owner in owners {
            table = advance(&table, &[owner], all_known).0;
        }
        table[0].hops
    }

    #[test]
    fn chain_keeps_the_newest_three() {
        assert_eq!(chain(&[A]), [A, N, N]);
        assert_eq!(chain(&[A, B]), [B, A, N]);
        assert_eq!(chain(&[A, B, C]), [C, B, A]);
        assert_eq!(chain(&[A, B, C, D]), [D, C, B]);
    }

    #[test]
    fn returning_owner_moves_to_the_front_without_duplicates() {
        assert_eq!(chain(&[A, B, A]), [A, B, N]);
        assert_eq!(chain(&[A, B, C, A]), [A, C, B]);
        assert_eq!(chain(&[A, B, C, B]), [B, C, A]);
    }

    #[test]
    fn unchanged_owner_keeps_its_history() {
        let previous = [bucket([C, B, A]), bucket([A, N, N])];
        let (next, summary) = advance(&previous, &[C, A], all_known);
        assert_eq!(next, previous);
        assert_eq!(summary, Summary::default());
    }

    #[test]
    fn unknown_ids_are_purged_and_compacted() {
        let previous = [bucket([C, B, A]), bucket([B, A, N]), bucket([A, C, N])];
        let known = |id: u16| id != B;
        let (next, summary) = advance(&previous, &[C, A, A], known);
        // Same owner, removed member dropped from the middle.
        assert_eq!(next[0].hops, [C, A, N]);
        // Removed owner replaced: it is neither in front nor kept behind.
        assert_eq!(next[1].hops, [A, N, N]);
        assert_eq!(next[2].hops, [A, C, N]);
        assert_eq!(summary.purged, 2);
        assert_eq!(summary.owner_changed, 1);
    }

    #[test]
    fn unhealthy_but_configured_member_stays_in_history() {
        // B lost its buckets (unhealthy) but is still configured.
        let (next, _) = advance(&[bucket([B, A, N])], &[C], |id| id != D);
        assert_eq!(next[0].hops, [C, B, A]);
    }

    #[test]
    fn no_owner_keeps_previous_hops_but_still_purges() {
        let previous = [bucket([A, B, N]), bucket([B, C, N])];
        let (next, summary) = advance(&previous, &[N, N], |id| id != B);
        assert_eq!(next[0].hops, [A, N, N]);
        assert_eq!(next[1].hops, [C, N, N]);
        assert_eq!(summary.no_owner, 2);
        assert_eq!(summary.purged, 2);
        // Bucket 1 lost its owner B to the purge.
        assert_eq!(summary.owner_changed, 1);
    }

    #[test]
    fn counts_owner_changes() {
        let previous = [bucket([A, N, N]), bucket([A, N, N]), bucket([B, A, N])];
        let (_, summary) = advance(&previous, &[A, B, A], all_known);
        assert_eq!(summary.owner_changed, 2);
        assert!(!summary.resized);
    }

    #[test]
    fn resized_table_starts_afresh() {
        let previous = vec![bucket([B, A, N]); 5];
        let (next, summary) = advance(&previous, &[A, B, C], all_known);
        assert_eq!(
            next.iter().map(|b| b.hops).collect::<Vec<_>>(),
            [[A, N, N], [B, N, N], [C, N, N]]
        );
        assert!(summary.resized);
        assert_eq!(summary.owner_changed, 3);
        // The first table ever is not a resize.
        let (_, first) = advance(&[], &[A], all_known);
        assert!(!first.resized);
    }

    #[test]
    fn damaged_previous_buckets_are_repaired() {
        // Holes and duplicates, as a buggy or older writer might have left them.
        let (next, summary) = advance(&[bucket([N, A, A])], &[B], all_known);
        assert_eq!(next[0].hops, [B, A, N]);
        assert_eq!(summary.purged, 0);
        let (next, _) = advance(&[bucket([A, N, A])], &[A], all_known);
        assert_eq!(next[0].hops, [A, N, N]);
    }

    #[test]
    fn random_sequences_keep_the_invariants() {
        let mut rng = StdRng::seed_from_u64(0x5eed_cafe);
        let buckets = 64;
        let mut table = vec![Bucket::EMPTY; buckets];
        for _ in 0..2000 {
            // Small id space so owners repeat often; NO_MEMBER now and then; one id at a time
            // leaves the configuration.
            let owners: Vec<u16> = (0..buckets)
                .map(|_| {
                    if rng.random_ratio(1, 20) {
                        NO_MEMBER
                    } else {
                        rng.random_range(0..6)
                    }
                })
                .collect();
            let removed: u16 = rng.random_range(0..12);
            let known = |id: u16| id != removed;
            let (next, _) = advance(&table, &owners, known);
            for ((new, old), &owner) in next.iter().zip(&table).zip(&owners) {
                let used: Vec<u16> = new.hops.iter().copied().filter(|&h| h != N).collect();
                // Compact: every used slot comes before every unused one.
                assert_eq!(&new.hops[..used.len()], used.as_slice(), "{new:?}");
                let mut unique = used.clone();
                unique.sort_unstable();
                unique.dedup();
                assert_eq!(unique.len(), used.len(), "duplicate in {new:?}");
                if owner == NO_MEMBER {
                    // Nothing new: only the survivors of the old hops, in their order.
                    let survivors: Vec<u16> = old
                        .hops
                        .iter()
                        .copied()
                        .filter(|&h| h != N && h != removed)
                        .collect();
                    assert_eq!(used, survivors);
                } else {
                    assert_eq!(new.hops[0], owner);
                    assert!(
                        used[1..]
                            .iter()
                            .all(|&h| h != removed && old.hops.contains(&h))
                    );
                }
            }
            table = next;
        }
    }

    #[test]
    fn share_counts_current_owners_only() {
        let table = [
            bucket([A, B, N]),
            bucket([A, N, N]),
            bucket([B, A, C]),
            Bucket::EMPTY,
        ];
        let shares = per_member_share(&table);
        assert_eq!(shares, BTreeMap::from([(A, 2), (B, 1)]));
    }
}
