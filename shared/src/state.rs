//! The keyed state with its digest and position: the replica's state machine, synchronous and
//! I/O-free, shared by the producer (which builds envelopes from it) and every consumer
//! (which applies them).
//!
//! ## Layout
//!
//! ```text
//! State
//!  ├─ lineage, seq            position: the last complete transaction applied
//!  ├─ buckets[0..4096]        Arc<HashMap<key, value>>, one per digest bucket
//!  ├─ digests                 per-bucket digests and their sum (see `digest`)
//!  └─ pending                 parts of a multi-part transaction not yet complete
//! ```
//!
//! Buckets are shared copy-on-write: cloning a `State` copies 4096 pointers, and a writer
//! copies a bucket only the first time it touches it after a clone. That is how a snapshot
//! takes a consistent cut without stopping writers, and why `diff` between a state and its
//! recent clone skips untouched buckets without looking inside them.
//!
//! ## Invariants
//!
//! - `digests` always equals the digest computed from scratch over the entries.
//! - `apply` is all-or-nothing: an error leaves entries, digest and position as they were.
//! - `seq` names the last part of a complete transaction; buffered parts never move it.
//! - A part 1 arriving right after incomplete parts abandons them: a producer that crashed
//!   mid-transaction recovers to the state before it and carries on with a new transaction.

use crate::change::{Change, Key};
use crate::digest::{bucket_of, entry_hashes, BucketDigests, Digest, BUCKETS};
use crate::envelope::{Envelope, Lineage};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;

/// One bucket's entries.
pub type Bucket = HashMap<Key, Entry, foldhash::fast::RandomState>;

/// A value with its entry hash, kept so that overwriting or deleting it costs no second
/// SHA-256 (hashing dominates apply: ~1 µs per entry on a CPU without SHA extensions).
#[derive(Clone, Debug)]
pub struct Entry {
    /// The value.
    pub value: Bytes,
    /// `entry_hash(key, value)`.
    hash: Digest,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Entry) -> bool {
        self.hash == other.hash && self.value == other.value
    }
}

impl Eq for Entry {}

/// Why an envelope was not applied. The state is unchanged in every case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("envelope {seq} belongs to lineage {got}, the replica follows lineage {expected}")]
    LineageMismatch {
        seq: u64,
        expected: Lineage,
        got: Lineage,
    },
    #[error("envelope {seq} was already applied")]
    Duplicate { seq: u64 },
    #[error("envelope {seq} is older than the replica's position {current}")]
    Stale { seq: u64, current: u64 },
    #[error("gap: expected envelope {expected}, got {got}")]
    Gap { expected: u64, got: u64 },
    #[error("envelope {seq} is part {part} of {parts}, expected part {expected_part}")]
    PartOutOfOrder {
        seq: u64,
        part: u32,
        parts: u32,
        expected_part: u32,
    },
    #[error("digest mismatch after envelope {seq}: the envelope records {expected}, the replica computed {actual}")]
    DigestMismatch {
        seq: u64,
        expected: Digest,
        actual: Digest,
    },
}

/// What `apply` did with an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// A transaction completed; the state is now at `seq` having applied `changes` changes.
    Committed { seq: u64, changes: usize },
    /// A non-final part was buffered; the state's entries and position did not move.
    Buffered { seq: u64, part: u32, parts: u32 },
}

/// The keyed map, its digest and its position in a lineage.
#[derive(Clone, Debug)]
pub struct State {
    lineage: Lineage,
    seq: u64,
    buckets: Vec<Arc<Bucket>>,
    digests: BucketDigests,
    len: usize,
    /// Parts of the transaction in progress (their sequences follow `seq` without a gap).
    pending: Vec<Envelope>,
    /// Undo log reused across transactions: (key, value before).
    undo: Vec<(Key, Option<Entry>)>,
    /// Entry hashes of the puts being applied, computed in one multi-buffer pass before the
    /// map is touched (reused across calls).
    hashes: Vec<Digest>,
}

impl State {
    /// An empty state at sequence 0 of `lineage` (the position before envelope 1).
    pub fn new(lineage: Lineage) -> State {
        State {
            lineage,
            seq: 0,
            buckets: (0..BUCKETS).map(|_| Arc::new(Bucket::default())).collect(),
            digests: BucketDigests::default(),
            len: 0,
            pending: Vec::new(),
            undo: Vec::new(),
            hashes: Vec::new(),
        }
    }

    /// The lineage followed.
    pub fn lineage(&self) -> Lineage {
        self.lineage
    }

    /// The last complete transaction applied (0 before any).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The state digest.
    pub fn digest(&self) -> Digest {
        self.digests.total()
    }

    /// Per-bucket digests.
    pub fn bucket_digests(&self) -> &BucketDigests {
        &self.digests
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether a multi-part transaction is partly received.
    pub fn has_pending_parts(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Bytes> {
        self.buckets[bucket_of(key)].get(key).map(|e| &e.value)
    }

    /// One bucket's entries (unordered).
    pub fn bucket(&self, bucket: usize) -> impl Iterator<Item = (&Key, &Bytes)> {
        self.buckets[bucket].iter().map(|(k, e)| (k, &e.value))
    }

    /// All entries, bucket by bucket, unordered within a bucket.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Bytes)> {
        self.buckets
            .iter()
            .flat_map(|b| b.iter().map(|(k, e)| (k, &e.value)))
    }

    /// All entries sorted by key (byte order).
    pub fn sorted_entries(&self) -> Vec<(&Key, &Bytes)> {
        let mut v: Vec<_> = self.iter().collect();
        v.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        v
    }

    /// Total bytes of keys and values (the raw payload a replica holds).
    pub fn payload_bytes(&self) -> usize {
        self.iter().map(|(k, v)| k.len() + v.len()).sum()
    }

    /// Moves the position to `seq` of `lineage` without changing entries: used after
    /// restoring a snapshot taken at that position, and by the producer after publishing.
    /// Drops any buffered parts.
    pub fn set_position(&mut self, lineage: Lineage, seq: u64) {
        self.lineage = lineage;
        self.seq = seq;
        self.pending.clear();
    }

    /// Applies changes with no position or digest check and returns the new digest: the
    /// producer's path (it is the source of truth) and snapshot restore's.
    pub fn apply_changes(&mut self, changes: &[Change]) -> Digest {
        self.apply_all(changes.iter(), false);
        self.digest()
    }

    /// Removes every entry of `buckets` (a snapshot range about to be rebuilt).
    pub fn clear_buckets(&mut self, buckets: std::ops::Range<usize>) {
        for b in buckets {
            self.len -= self.buckets[b].len();
            self.buckets[b] = Arc::new(Bucket::default());
            let d = self.digests.bucket(b);
            self.digests.sub(b, d);
        }
    }

    /// Puts one entry (the unchecked path, for restoring snapshots).
    pub fn insert(&mut self, key: Key, value: Bytes) {
        self.apply_changes(&[Change::Put { key, value }]);
    }

    /// Puts many entries (the unchecked path, for restoring snapshots): hashed in batches.
    pub fn insert_many(&mut self, entries: Vec<(Key, Bytes)>) {
        let changes: Vec<Change> = entries
            .into_iter()
            .map(|(key, value)| Change::Put { key, value })
            .collect();
        self.apply_changes(&changes);
    }

    /// Applies one envelope of this state's lineage after checking position and digest.
    ///
    /// Non-final parts of a transaction are buffered; the final part applies the whole
    /// transaction and checks the digest it records. On error nothing changes, including the
    /// buffered parts (a gap or mismatch inside a transaction is the caller's to resolve by
    /// re-reading or re-snapshotting).
    pub fn apply(&mut self, env: &Envelope) -> Result<Applied, ApplyError> {
        if env.lineage != self.lineage {
            return Err(ApplyError::LineageMismatch {
                seq: env.seq,
                expected: self.lineage,
                got: env.lineage,
            });
        }
        let last = self.pending.last().map_or(self.seq, |p| p.seq);
        let expected = last + 1;
        if env.seq > expected {
            return Err(ApplyError::Gap {
                expected,
                got: env.seq,
            });
        }
        if env.seq < expected {
            if env.seq >= self.seq {
                // The last committed envelope again, or a buffered part again.
                return Err(ApplyError::Duplicate { seq: env.seq });
            }
            return Err(ApplyError::Stale {
                seq: env.seq,
                current: self.seq,
            });
        }
        // A part 1 right after incomplete parts starts a new transaction: the producer stopped
        // mid-way (crash) and never completed the buffered one, so it never happened. The new
        // transaction is checked against the state without it; the buffered parts are only
        // dropped once the new transaction is accepted (an error changes nothing).
        let abandon = env.part == 1 && !self.pending.is_empty();
        let pending: &[Envelope] = if abandon { &[] } else { &self.pending };
        let expected_part = pending.last().map_or(1, |p| p.part + 1);
        let same_txn = pending
            .first()
            .is_none_or(|p| p.parts == env.parts && p.digest == env.digest);
        if env.part != expected_part || !same_txn {
            return Err(ApplyError::PartOutOfOrder {
                seq: env.seq,
                part: env.part,
                parts: env.parts,
                expected_part,
            });
        }
        if !env.is_last_part() {
            if abandon {
                self.pending.clear();
            }
            self.pending.push(env.clone());
            return Ok(Applied::Buffered {
                seq: env.seq,
                part: env.part,
                parts: env.parts,
            });
        }

        let buffered = if abandon {
            Vec::new()
        } else {
            std::mem::take(&mut self.pending)
        };
        self.undo.clear();
        let count = self.apply_all(
            buffered
                .iter()
                .flat_map(|p| p.changes.iter())
                .chain(env.changes.iter()),
            true,
        );
        let actual = self.digest();
        if actual != env.digest {
            self.rollback();
            if !abandon {
                self.pending = buffered;
            }
            return Err(ApplyError::DigestMismatch {
                seq: env.seq,
                expected: env.digest,
                actual,
            });
        }
        self.pending.clear();
        self.undo.clear();
        self.seq = env.seq;
        Ok(Applied::Committed {
            seq: env.seq,
            changes: count,
        })
    }

    /// Applies changes in order, maintaining the digest; records old entries when `log` is
    /// set. The puts' entry hashes are computed first, in one multi-buffer pass. Returns the
    /// number of changes.
    fn apply_all<'a>(
        &mut self,
        changes: impl Iterator<Item = &'a Change> + Clone,
        log: bool,
    ) -> usize {
        let mut hashes = std::mem::take(&mut self.hashes);
        hashes.clear();
        entry_hashes(
            changes.clone().filter_map(|c| match c {
                Change::Put { key, value } => Some((&**key, &value[..])),
                Change::Delete { .. } => None,
            }),
            &mut hashes,
        );
        let mut next = hashes.iter().copied();
        let mut count = 0;
        for c in changes {
            let hash = match c {
                Change::Put { .. } => next.next(),
                Change::Delete { .. } => None,
            };
            self.apply_one(c, hash, log);
            count += 1;
        }
        self.hashes = hashes;
        count
    }

    /// Applies one change, maintaining the digest; records the old entry when `log` is set.
    /// `hash` is the put's entry hash (from `apply_all`'s batch).
    fn apply_one(&mut self, change: &Change, hash: Option<Digest>, log: bool) {
        let b = bucket_of(change.key());
        let bucket = Arc::make_mut(&mut self.buckets[b]);
        let old = match change {
            Change::Put { key, value } => {
                let hash = hash.unwrap_or_else(|| crate::digest::entry_hash(key, value));
                self.digests.add(b, hash);
                let old = bucket.insert(
                    key.clone(),
                    Entry {
                        value: value.clone(),
                        hash,
                    },
                );
                if old.is_none() {
                    self.len += 1;
                }
                old
            }
            Change::Delete { key } => {
                let old = bucket.remove(&**key);
                if old.is_some() {
                    self.len -= 1;
                }
                old
            }
        };
        if let Some(e) = &old {
            self.digests.sub(b, e.hash);
        }
        if log {
            let key = match change {
                Change::Put { key, .. } | Change::Delete { key } => key.clone(),
            };
            self.undo.push((key, old));
        }
    }

    /// Undoes the logged changes in reverse order.
    fn rollback(&mut self) {
        let undo = std::mem::take(&mut self.undo);
        for (key, old) in undo.into_iter().rev() {
            let b = bucket_of(&key);
            let bucket = Arc::make_mut(&mut self.buckets[b]);
            let restoring = old.is_some();
            if let Some(e) = &old {
                self.digests.add(b, e.hash);
            }
            let current = match old {
                Some(e) => bucket.insert(key, e),
                None => bucket.remove(&*key),
            };
            if let Some(e) = &current {
                self.digests.sub(b, e.hash);
            }
            match (restoring, current.is_some()) {
                (true, false) => self.len += 1,
                (false, true) => self.len -= 1,
                _ => {}
            }
        }
    }
}

impl PartialEq for State {
    /// Two states are equal when their entries are; position and pending parts are not
    /// compared (use `seq`/`lineage` for those).
    fn eq(&self, other: &State) -> bool {
        self.len == other.len
            && self.digest() == other.digest()
            && self
                .buckets
                .iter()
                .zip(&other.buckets)
                .all(|(a, b)| Arc::ptr_eq(a, b) || a == b)
    }
}

/// The changes that turn `old`'s entries into `new`'s: puts for added and changed keys,
/// deletes for removed ones, bucket by bucket and sorted by key within a bucket. Buckets that
/// are shared or have equal digests are skipped without being read, so diffing a state
/// against a recent clone costs what changed, not what exists.
pub fn diff(old: &State, new: &State) -> Vec<Change> {
    let mut out = Vec::new();
    for b in 0..BUCKETS {
        let (ob, nb) = (&old.buckets[b], &new.buckets[b]);
        if Arc::ptr_eq(ob, nb) || old.digests.bucket(b) == new.digests.bucket(b) {
            continue;
        }
        let start = out.len();
        for (k, e) in nb.iter() {
            if ob.get(k) != Some(e) {
                out.push(Change::Put {
                    key: k.clone(),
                    value: e.value.clone(),
                });
            }
        }
        for k in ob.keys() {
            if !nb.contains_key(k) {
                out.push(Change::Delete { key: k.clone() });
            }
        }
        out[start..].sort_unstable_by(|a, b| a.key().as_bytes().cmp(b.key().as_bytes()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::split_transaction;

    const L: Lineage = Lineage([5; 16]);

    /// Builds the envelopes a producer would for `changes`, advancing `producer`.
    fn produce(producer: &mut State, changes: Vec<Change>, max_bytes: usize) -> Vec<Envelope> {
        let digest = producer.apply_changes(&changes);
        let envs = split_transaction(L, producer.seq() + 1, digest, 0, changes, max_bytes);
        let last = envs.last().map_or(producer.seq(), |e| e.seq);
        producer.set_position(L, last);
        envs
    }

    #[test]
    fn envelopes_apply_in_order_and_track_the_producer() {
        let mut p = State::new(L);
        let mut r = State::new(L);
        for i in 0..5 {
            for e in produce(
                &mut p,
                vec![Change::put(format!("k{i}"), vec![i as u8])],
                1 << 20,
            ) {
                assert_eq!(
                    r.apply(&e),
                    Ok(Applied::Committed {
                        seq: e.seq,
                        changes: 1
                    })
                );
            }
        }
        assert_eq!(r, p);
        assert_eq!((r.seq(), r.len()), (5, 5));
    }

    #[test]
    fn duplicate_stale_and_gap_are_distinct_errors_that_change_nothing() {
        let mut p = State::new(L);
        let envs: Vec<Envelope> = (0..4)
            .flat_map(|i| produce(&mut p, vec![Change::put("k", vec![i])], 1 << 20))
            .collect();
        let mut r = State::new(L);
        r.apply(&envs[0]).ok();
        r.apply(&envs[1]).ok();
        let before = r.clone();
        assert_eq!(r.apply(&envs[1]), Err(ApplyError::Duplicate { seq: 2 }));
        assert_eq!(
            r.apply(&envs[0]),
            Err(ApplyError::Stale { seq: 1, current: 2 })
        );
        assert_eq!(
            r.apply(&envs[3]),
            Err(ApplyError::Gap {
                expected: 3,
                got: 4
            })
        );
        let mut other = envs[2].clone();
        other.lineage = Lineage([6; 16]);
        assert!(matches!(
            r.apply(&other),
            Err(ApplyError::LineageMismatch { .. })
        ));
        assert_eq!(r, before);
        assert_eq!(r.seq(), 2);
    }

    #[test]
    fn a_digest_mismatch_rolls_the_whole_transaction_back() {
        let mut r = State::new(L);
        r.apply_changes(&[Change::put("a", &b"1"[..]), Change::put("b", &b"2"[..])]);
        let before = r.clone();
        let bad = Envelope {
            lineage: L,
            seq: 1,
            part: 1,
            parts: 1,
            digest: Digest([1; 32]),
            produced_at_ms: 0,
            changes: vec![
                Change::put("a", &b"x"[..]),
                Change::delete("b"),
                Change::put("c", &b"3"[..]),
            ],
        };
        assert!(matches!(
            r.apply(&bad),
            Err(ApplyError::DigestMismatch { seq: 1, .. })
        ));
        assert_eq!(r, before);
        assert_eq!(
            (r.seq(), r.len(), r.get("a").map(|v| v.to_vec())),
            (0, 2, Some(b"1".to_vec()))
        );
    }

    #[test]
    fn a_multi_part_transaction_applies_only_when_complete() {
        let mut p = State::new(L);
        let changes: Vec<Change> = (0..10)
            .map(|i| Change::put(format!("k{i}"), vec![0u8; 50]))
            .collect();
        let envs = produce(&mut p, changes, 150);
        assert!(envs.len() > 2);
        let mut r = State::new(L);
        for e in &envs[..envs.len() - 1] {
            assert!(matches!(r.apply(e), Ok(Applied::Buffered { .. })));
            assert!(r.is_empty() && r.seq() == 0);
        }
        assert_eq!(r.apply(&envs[1]), Err(ApplyError::Duplicate { seq: 2 }));
        let last = &envs[envs.len() - 1];
        assert_eq!(
            r.apply(last),
            Ok(Applied::Committed {
                seq: last.seq,
                changes: 10
            })
        );
        assert_eq!(r, p);
        assert!(!r.has_pending_parts());
    }

    #[test]
    fn a_new_transaction_after_incomplete_parts_abandons_them() {
        let mut p = State::new(L);
        let big: Vec<Change> = (0..4)
            .map(|i| Change::put(format!("k{i}"), vec![0u8; 50]))
            .collect();
        let mut scratch = p.clone();
        let abandoned = produce(&mut scratch, big, 60);
        let mut r = State::new(L);
        r.apply(&abandoned[0]).ok();
        r.apply(&abandoned[1]).ok();
        // The producer crashed after two parts; it restarts from `p` at sequence 2.
        p.set_position(L, 2);
        let next = produce(&mut p, vec![Change::put("x", &b"1"[..])], 1 << 20);
        assert_eq!(
            r.apply(&next[0]),
            Ok(Applied::Committed { seq: 3, changes: 1 })
        );
        assert_eq!(r, p);
        assert_eq!(r.get("k0"), None);
    }

    #[test]
    fn a_part_out_of_order_is_refused() {
        let mut p = State::new(L);
        let changes: Vec<Change> = (0..4)
            .map(|i| Change::put(format!("k{i}"), vec![0u8; 50]))
            .collect();
        let mut envs = produce(&mut p, changes, 60);
        envs[1].part = 3;
        let mut r = State::new(L);
        r.apply(&envs[0]).ok();
        assert!(matches!(
            r.apply(&envs[1]),
            Err(ApplyError::PartOutOfOrder {
                expected_part: 2,
                ..
            })
        ));
    }

    #[test]
    fn diff_skips_shared_buckets_and_turns_old_into_new() {
        let mut a = State::new(L);
        a.apply_changes(
            &(0..1000)
                .map(|i| Change::put(format!("k{i}"), vec![1]))
                .collect::<Vec<_>>(),
        );
        let mut b = a.clone();
        b.apply_changes(&[
            Change::put("k1", vec![2]),
            Change::delete("k2"),
            Change::put("new", vec![3]),
        ]);
        let d = diff(&a, &b);
        assert_eq!(d.len(), 3);
        a.apply_changes(&d);
        assert_eq!(a, b);
        assert!(diff(&a, &b).is_empty());
    }
}
