//! The keyed state with its digest and position: the replica's state machine, synchronous and
//! I/O-free, shared by the producer (which builds envelopes from it) and every consumer
//! (which applies them).
//!
//! ## Layout
//!
//! ```text
//! State
//!  ├─ lineage, seq            position: the last complete transaction applied
//!  ├─ buckets[0..4096]        Arc<HashTable<Entry>>, one per digest bucket
//!  ├─ digests                 per-bucket digests and their sum (see `digest`)
//!  └─ pending                 parts of a multi-part transaction not yet complete
//!
//! HashTable slot (8 B)        Entry = triomphe::ThinArc<(), u8>, found by foldhash(key bytes)
//! Entry allocation            [count: 8][length: 8][key len: u32 le][key][value]
//! ```
//!
//! Each entry is one allocation holding its key and value, so an update reads one
//! allocation, writes one and frees one (or, for a value of the same length in an entry no
//! clone shares, rewrites it in place); the table itself holds only 8-byte thin pointers.
//! With 12-byte keys and 100-byte values an entry costs a 144-byte heap chunk plus 10–21
//! bytes of table (hashbrown's load between its doublings), ~1.4× its raw bytes (a
//! `HashMap<Arc<str>, (Bytes, Digest)>` took 2.9×: an 80-byte slot, a key allocation and a
//! value allocation).
//!
//! Entries do not keep their entry hash. The digest needs the old entry's hash when a key is
//! overwritten or deleted; a batch computes those in the same multi-buffer SHA-256 pass as
//! the new ones, from the old entries its look-up pass finds anyway (the entry is read for
//! the key comparison, and its value sits in the same allocation). Caching the hash cost 32
//! bytes an entry, which at these sizes moved every entry into the next 32-byte-larger heap
//! chunk (176 against 144 bytes): 22% of a replica's memory, to save a hash per overwrite.
//!
//! Buckets are shared copy-on-write: cloning a `State` copies 4096 pointers, and a writer
//! copies a bucket only the first time it touches it after a clone. Entries are reference
//! counted rather than boxed so that this copy costs a pointer and a count per entry, not a
//! copy of the values. That is how a snapshot takes a consistent cut without stopping
//! writers, and why `diff` between a state and its recent clone skips untouched buckets
//! without looking inside them (and, in touched buckets, entries still shared by pointer).
//!
//! ## Invariants
//!
//! - `digests` always equals the digest computed from scratch over the entries.
//! - `apply` is all-or-nothing: an error leaves entries, digest and position as they were.
//!   It predicts the digest after a transaction from the old entries' hashes before
//!   writing anything, so a mismatch is refused without touching the tables and a match is
//!   written without an undo log.
//! - `seq` names the last part of a complete transaction; buffered parts never move it.
//! - A part 1 arriving right after incomplete parts abandons them: a producer that crashed
//!   mid-transaction recovers to the state before it and carries on with a new transaction.
//! - An entry's key never changes and its key bytes are the UTF-8 of a `str`. Its value is
//!   rewritten in place only while no clone of the state holds the entry (a put of a value
//!   of the same length); a shared entry is replaced, never changed.

use crate::change::{Change, Key};
use crate::digest::{bucket_of, entry_hashes, BucketDigests, Digest, BUCKETS};
use crate::envelope::{Envelope, Lineage};
use bytes::Bytes;
use hashbrown::hash_table::{Entry as Slot, HashTable};
use std::fmt;
use std::hash::BuildHasher;
use std::sync::{Arc, LazyLock};
use triomphe::ThinArc;

/// One bucket's entries.
type Bucket = HashTable<Entry>;

/// The key hasher of every bucket: seeded at random once per process, so that a clone's
/// tables and the original's agree and `diff` hashes a key once for both.
static KEY_HASHER: LazyLock<foldhash::fast::RandomState> = LazyLock::new(Default::default);

/// The table hash of a key.
fn key_hash(key: &[u8]) -> u64 {
    KEY_HASHER.hash_one(key)
}

/// Where the key starts in an entry: after its 4-byte length.
const KEY_AT: usize = 4;

/// One entry in one allocation: `[key len: u32 le][key][value]`, behind a thin pointer (the
/// slice's length is in the allocation, where `Arc<[u8]>` kept its weak count): 8 bytes a
/// table slot instead of 16.
#[derive(Clone)]
struct Entry(ThinArc<(), u8>);

// The table slot the layout above counts on.
const _: () = assert!(std::mem::size_of::<Entry>() == 8);

impl Entry {
    /// Builds an entry, staging its bytes in `scratch` so that it is allocated once.
    fn new(scratch: &mut Vec<u8>, key: &str, value: &[u8]) -> Entry {
        scratch.clear();
        scratch.extend_from_slice(&(key.len() as u32).to_le_bytes());
        scratch.extend_from_slice(key.as_bytes());
        scratch.extend_from_slice(value);
        Entry(ThinArc::from_header_and_slice((), &scratch[..]))
    }

    /// The entry's bytes: key length, key, value.
    fn bytes(&self) -> &[u8] {
        &self.0.slice
    }

    /// Rewrites the value in place when `value` has the old one's length and no clone of the
    /// state shares this entry: no allocation, no free. Returns whether it did (otherwise
    /// nothing changed).
    fn overwrite(&mut self, value: &[u8]) -> bool {
        let at = self.value_at();
        if self.bytes().len() - at != value.len() {
            return false;
        }
        self.0
            .with_arc_mut(|arc| match triomphe::Arc::get_mut(arc) {
                Some(inner) => {
                    inner.slice_mut()[at..].copy_from_slice(value);
                    true
                }
                None => false,
            })
    }

    /// `entry_hash(key, value)`, computed (one SHA-256); batches hash old entries together
    /// with [`entry_hashes`] instead.
    fn hash(&self) -> Digest {
        crate::digest::entry_hash(self.key(), self.value())
    }

    /// Where the value starts.
    fn value_at(&self) -> usize {
        let mut len = [0; 4];
        len.copy_from_slice(&self.bytes()[..KEY_AT]);
        KEY_AT + u32::from_le_bytes(len) as usize
    }

    fn key_bytes(&self) -> &[u8] {
        &self.bytes()[KEY_AT..self.value_at()]
    }

    fn key(&self) -> &str {
        std::str::from_utf8(self.key_bytes()).expect("an entry's key is built from a str")
    }

    fn value(&self) -> &[u8] {
        &self.bytes()[self.value_at()..]
    }

    /// Whether both hold the same key and value: by pointer when shared, else by bytes.
    fn same(&self, other: &Entry) -> bool {
        self.0.ptr() == other.0.ptr() || self.bytes() == other.bytes()
    }
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("key", &self.key())
            .field("value_len", &self.value().len())
            .field("hash", &self.hash())
            .finish()
    }
}

/// Puts prepared away from the thread that applies them, for [`State::put_prepared`]: each
/// entry built whole — its entry hash (one multi-buffer SHA-256 pass over the batch), key and
/// value in its one allocation — with its digest bucket and table hash. Snapshot restore
/// prepares each chunk on a decoding thread, so the thread that owns the state only links
/// entries into its tables (it hashed, allocated and copied every entry before: half the
/// CPU time of a 1M-key bootstrap, on one thread).
///
/// Only for states of this process: the table hash is seeded per process.
pub struct Prepared {
    entries: Vec<(u16, u64, Digest, Entry)>,
}

impl Prepared {
    /// `puts`, in order, as prepared entries.
    pub fn puts<'a>(puts: impl Iterator<Item = (&'a str, &'a [u8])>) -> Prepared {
        let mut b = PreparedBuilder::with_capacity(puts.size_hint().0);
        for (key, value) in puts {
            b.push(key, value);
        }
        b.finish()
    }

    /// Puts not yet applied.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether every put was applied (or there were none).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Builds a [`Prepared`] one put at a time — each entry allocated straight from the bytes
/// given, with no copy of its own in between (a snapshot chunk's decoder pushes the key and
/// value it is reading) — then hashes them all in one multi-buffer pass.
pub struct PreparedBuilder {
    /// As in [`Prepared`], the entry hashes left zero until [`PreparedBuilder::finish`].
    entries: Vec<(u16, u64, Digest, Entry)>,
    scratch: Vec<u8>,
}

impl PreparedBuilder {
    /// Room for `n` puts.
    pub fn with_capacity(n: usize) -> PreparedBuilder {
        PreparedBuilder {
            entries: Vec::with_capacity(n),
            scratch: Vec::new(),
        }
    }

    /// Adds a put after those before it.
    pub fn push(&mut self, key: &str, value: &[u8]) {
        self.entries.push((
            bucket_of(key) as u16,
            key_hash(key.as_bytes()),
            Digest::ZERO,
            Entry::new(&mut self.scratch, key, value),
        ));
    }

    /// The puts, hashed.
    pub fn finish(mut self) -> Prepared {
        let mut hashes = Vec::with_capacity(self.entries.len());
        entry_hashes(
            self.entries
                .iter()
                .map(|(_, _, _, e)| (e.key_bytes(), e.value())),
            &mut hashes,
        );
        for (slot, hash) in self.entries.iter_mut().zip(hashes) {
            slot.2 = hash;
        }
        Prepared {
            entries: self.entries,
        }
    }
}

impl fmt::Debug for PreparedBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreparedBuilder")
            .field("puts", &self.entries.len())
            .finish()
    }
}

impl fmt::Debug for Prepared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prepared")
            .field("puts", &self.entries.len())
            .finish()
    }
}

/// Changes hashed away from the thread that applies them, for [`State::apply_hashed`]: each
/// put's entry hash (one multi-buffer SHA-256 pass) and each change's digest bucket and table
/// hash, kept with the changes they were computed from. A durable replica's restart hashes
/// its log's changes on the thread that reads them.
///
/// Only for states of this process: the table hash is seeded per process.
#[derive(Debug, Clone)]
pub struct HashedChanges {
    changes: Vec<Change>,
    hashes: Vec<Digest>,
    slots: Vec<(u16, u64)>,
}

impl HashedChanges {
    /// Hashes `changes`.
    pub fn new(changes: Vec<Change>) -> HashedChanges {
        let (mut hashes, mut slots) = (Vec::new(), Vec::new());
        hash_changes(changes.iter(), &mut hashes, &mut slots);
        HashedChanges {
            changes,
            hashes,
            slots,
        }
    }

    /// The changes, in order.
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }
}

/// The puts' entry hashes into `hashes`, every change's digest bucket and table hash into
/// `slots` (both cleared first).
fn hash_changes<'a>(
    changes: impl Iterator<Item = &'a Change> + Clone,
    hashes: &mut Vec<Digest>,
    slots: &mut Vec<(u16, u64)>,
) {
    hashes.clear();
    entry_hashes(
        changes.clone().filter_map(|c| match c {
            Change::Put { key, value } => Some((key.as_bytes(), &value[..])),
            Change::Delete { .. } => None,
        }),
        hashes,
    );
    slots.clear();
    slots.extend(changes.map(|c| {
        let key = c.key();
        (bucket_of(key) as u16, key_hash(key.as_bytes()))
    }));
}

/// The entry of `key` in `bucket`.
fn find<'a>(bucket: &'a Bucket, key: &[u8]) -> Option<&'a Entry> {
    bucket.find(key_hash(key), |e| e.key_bytes() == key)
}

/// Removes the entry of `key` from `bucket`. `hash` is `key_hash(key)`.
fn remove(bucket: &mut Bucket, hash: u64, key: &[u8]) -> Option<Entry> {
    bucket
        .find_entry(hash, |e| e.key_bytes() == key)
        .ok()
        .map(|o| o.remove().0)
}

/// The latest change of each key in a batch: open addressing over a power-of-two table at
/// most half full, of (table hash, 1 + index of the change); 0 marks a free slot. Keys are
/// compared through the caller's closure, so two keys with the same hash stay apart.
struct Latest {
    table: Vec<(u64, usize)>,
    mask: usize,
}

impl Latest {
    /// An empty map for up to `n` changes, in `table`'s allocation.
    fn new(mut table: Vec<(u64, usize)>, n: usize) -> Latest {
        let size = (2 * n).next_power_of_two().max(16);
        table.clear();
        table.resize(size, (0, 0));
        Latest {
            table,
            mask: size - 1,
        }
    }

    /// Records change `i` as the latest of its key (hash `h`; `same_key(j)` tells whether
    /// change `j` has the same key); returns the key's previous latest change.
    fn replace(&mut self, h: u64, i: usize, same_key: impl Fn(usize) -> bool) -> Option<usize> {
        let mut at = (h as usize) & self.mask;
        loop {
            match self.table[at] {
                (_, 0) => {
                    self.table[at] = (h, i + 1);
                    return None;
                }
                (x, j) if x == h && same_key(j - 1) => {
                    self.table[at].1 = i + 1;
                    return Some(j - 1);
                }
                _ => at = (at + 1) & self.mask,
            }
        }
    }

    fn into_inner(self) -> Vec<(u64, usize)> {
        self.table
    }
}

/// Whether two buckets hold the same entries.
fn buckets_equal(a: &Bucket, b: &Bucket) -> bool {
    a.len() == b.len()
        && a.iter()
            .all(|e| find(b, e.key_bytes()).is_some_and(|o| o.same(e)))
}

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

/// Drops `state` on one long-lived background thread (started on first use; if it cannot be
/// started, `state` is dropped here). A million entries are a million frees, ~0.1 s: a
/// thread that must not stall that long (an async runtime's, one a shutdown waits for, a
/// command about to exit) hands a large state over instead. Only memory is involved: no I/O.
pub fn free_in_background(state: State) {
    if let Some(tx) = freer() {
        // A send fails only when the thread is gone; the state is then dropped here.
        let _ = tx.send(Freed::State(Box::new(state)));
    }
}

/// Returns once every state handed to [`free_in_background`] before the call is freed: for a
/// benchmark, so that the next measurement does not share the CPU with those frees.
pub fn wait_for_background_frees() {
    if let Some(tx) = freer() {
        let (done, wait) = std::sync::mpsc::channel();
        if tx.send(Freed::Sync(done)).is_ok() {
            let _ = wait.recv();
        }
    }
}

enum Freed {
    State(Box<State>),
    Sync(std::sync::mpsc::Sender<()>),
}

fn freer() -> Option<&'static std::sync::mpsc::Sender<Freed>> {
    static FREER: LazyLock<Option<std::sync::mpsc::Sender<Freed>>> = LazyLock::new(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Freed>();
        std::thread::Builder::new()
            .name("deltasync-free".into())
            .spawn(move || {
                for item in rx {
                    match item {
                        Freed::State(state) => drop(state),
                        Freed::Sync(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })
            .ok()?;
        Some(tx)
    });
    FREER.as_ref()
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
    /// Entry hashes of the puts being applied, computed in one multi-buffer pass before the
    /// map is touched (reused across calls).
    hashes: Vec<Digest>,
    /// Where a new entry's bytes are staged before its one allocation (reused across calls).
    scratch: Vec<u8>,
    /// Digest bucket and table hash of each change being applied, from the look-up pass
    /// (reused across calls).
    slots: Vec<(u16, u64)>,
    /// The table of `Latest`, and each change's index in `hashes` (reused across calls).
    seen: Vec<(u64, usize)>,
    rank: Vec<usize>,
    /// What each change of the batch replaces, and the hashes of the old entries found in
    /// the tables (reused across calls).
    olds: Vec<Old>,
    found_hashes: Vec<Digest>,
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
            hashes: Vec::new(),
            scratch: Vec::new(),
            slots: Vec::new(),
            seen: Vec::new(),
            rank: Vec::new(),
            olds: Vec::new(),
            found_hashes: Vec::new(),
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
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        find(&self.buckets[bucket_of(key)], key.as_bytes()).map(Entry::value)
    }

    /// One bucket's entries (unordered).
    pub fn bucket(&self, bucket: usize) -> impl Iterator<Item = (&str, &[u8])> {
        self.buckets[bucket].iter().map(|e| (e.key(), e.value()))
    }

    /// All entries, bucket by bucket, unordered within a bucket.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.buckets
            .iter()
            .flat_map(|b| b.iter().map(|e| (e.key(), e.value())))
    }

    /// All entries sorted by key (byte order).
    pub fn sorted_entries(&self) -> Vec<(&str, &[u8])> {
        let mut v: Vec<_> = self.iter().collect();
        v.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        v
    }

    /// Total bytes of keys and values (the raw payload a replica holds).
    pub fn payload_bytes(&self) -> usize {
        self.buckets
            .iter()
            .flat_map(|b| b.iter())
            .map(|e| e.bytes().len() - KEY_AT)
            .sum()
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
        // The unchecked path writes what it is given: the prediction is only its look-ups.
        self.predict(changes.iter());
        self.write(changes.iter());
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

    /// Makes room for `entries` more entries spread over `buckets` (a snapshot range about to
    /// be loaded), so its tables are sized once instead of growing step by step; each step
    /// reads every entry again to rehash its key.
    pub fn reserve_buckets(&mut self, buckets: std::ops::Range<usize>, entries: usize) {
        let n = buckets.len().max(1);
        // The mean, plus an eighth for buckets fuller than the mean.
        let per_bucket = entries.div_ceil(n);
        let per_bucket = per_bucket + per_bucket / 8;
        for b in buckets {
            Arc::make_mut(&mut self.buckets[b]).reserve(per_bucket, |e| key_hash(e.key_bytes()));
        }
    }

    /// Applies prepared puts in order (a later put of a key replaces an earlier one and any
    /// entry already there), maintaining the digest, with no position or digest check: the
    /// same entries and digest as `apply_changes` of the same puts, minus the hashing,
    /// allocating and copying, which [`Prepared::puts`] did. Leaves `prepared` empty (its
    /// allocation can be freed elsewhere).
    pub fn put_prepared(&mut self, prepared: &mut Prepared) {
        for (b, h, hash, entry) in prepared.entries.drain(..) {
            let b = usize::from(b);
            let bucket = Arc::make_mut(&mut self.buckets[b]);
            self.digests.add(b, hash);
            let slot = bucket.entry(
                h,
                |e| e.key_bytes() == entry.key_bytes(),
                |e| key_hash(e.key_bytes()),
            );
            match slot {
                Slot::Occupied(mut o) => {
                    // A key put twice: rare in a restore (a repair's range, or a chunk that
                    // repeats a key), so its old entry is hashed on its own.
                    let old = std::mem::replace(o.get_mut(), entry);
                    self.digests.sub(b, old.hash());
                }
                Slot::Vacant(v) => {
                    v.insert(entry);
                    self.len += 1;
                }
            }
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
        let changes = buffered
            .iter()
            .flat_map(|p| p.changes.iter())
            .chain(env.changes.iter());
        // The digest after the transaction is known before anything is written, so a
        // mismatch changes nothing and a match needs no undo log.
        let after = self.predict(changes.clone());
        if after != env.digest {
            if !abandon {
                self.pending = buffered;
            }
            return Err(ApplyError::DigestMismatch {
                seq: env.seq,
                expected: env.digest,
                actual: after,
            });
        }
        let count = self.write(changes);
        debug_assert_eq!(
            self.digest(),
            after,
            "the predicted digest is the written one"
        );
        self.pending.clear();
        self.seq = env.seq;
        Ok(Applied::Committed {
            seq: env.seq,
            changes: count,
        })
    }

    /// Looks at a batch of changes before any is written and returns the digest the state
    /// will have after it: the current digest, minus each change's old entry hash (the
    /// table's entry for a key's first change in the batch, the previous change's new one
    /// for a key that repeats), plus each put's new one. Leaves in `hashes` the puts' entry
    /// hashes, in `slots` every change's digest bucket and table hash and in `olds` the hash
    /// of the entry each change replaces or deletes, for [`State::write`].
    ///
    /// A separate look-up pass first (on the 2-core Xeon here it took a batch of 1000 random
    /// puts into 1M keys of 100 B from 870–945 to 573–587 ns a change; at 1k and 10k keys it
    /// costs nothing measurable: `cargo run --release -p deltasync-core --example apply`).
    /// The old entries found are hashed together in one multi-buffer pass, like the new ones.
    fn predict<'a>(&mut self, changes: impl Iterator<Item = &'a Change> + Clone) -> Digest {
        hash_changes(changes.clone(), &mut self.hashes, &mut self.slots);
        self.predict_hashed(changes)
    }

    /// [`State::predict`] after `hashes` and `slots` were filled for these changes.
    fn predict_hashed<'a>(&mut self, changes: impl Iterator<Item = &'a Change>) -> Digest {
        let changes: Vec<&Change> = changes.collect();
        // The look-ups alone first: each depends on nothing but its key, so the CPU overlaps
        // their cache misses (table control bytes, slot, the old entry: three or four misses
        // a change once the state outgrows the cache); a loop doing more per change waits for
        // them one change after the other. The last lines of each old entry are touched too,
        // for hashing its value below.
        let in_table: Vec<Option<&Entry>> = changes
            .iter()
            .zip(&self.slots)
            .map(|(c, &(b, h))| {
                let key = c.key().as_bytes();
                let found = self.buckets[usize::from(b)].find(h, |e| e.key_bytes() == key);
                if let Some(e) = found {
                    let bytes = e.bytes();
                    std::hint::black_box((bytes[bytes.len() / 2], bytes[bytes.len() - 1]));
                }
                found
            })
            .collect();
        let mut latest = Latest::new(std::mem::take(&mut self.seen), changes.len());
        let mut rank = std::mem::take(&mut self.rank);
        rank.clear();
        let mut olds = std::mem::take(&mut self.olds);
        olds.clear();
        // The entries in the table that the batch replaces or deletes, in the order of the
        // changes that first touch them.
        let mut found: Vec<(&[u8], &[u8])> = Vec::new();
        let mut puts = 0;
        for (i, ((c, &(_, h)), old)) in changes.iter().zip(&self.slots).zip(&in_table).enumerate() {
            let key = c.key().as_bytes();
            let previous = latest.replace(h, i, |j| changes[j].key().as_bytes() == key);
            olds.push(match (previous, old) {
                (Some(j), _) => match changes[j] {
                    Change::Put { .. } => Old::Batch(rank[j]),
                    Change::Delete { .. } => Old::Absent,
                },
                (None, Some(e)) => {
                    found.push((e.key_bytes(), e.value()));
                    Old::Table(found.len() - 1)
                }
                (None, None) => Old::Absent,
            });
            rank.push(puts);
            if let Change::Put { .. } = c {
                puts += 1;
            }
        }
        let mut found_hashes = std::mem::take(&mut self.found_hashes);
        found_hashes.clear();
        entry_hashes(found, &mut found_hashes);
        let mut after = self.digest();
        let mut puts = 0;
        for (c, old) in changes.iter().zip(olds.iter_mut()) {
            let hash = match *old {
                Old::Batch(put) => self.hashes.get(put).copied(),
                Old::Table(at) => found_hashes.get(at).copied(),
                Old::Absent | Old::Hash(_) => None,
            };
            *old = match hash {
                Some(h) => {
                    after = after.wrapping_sub(h);
                    Old::Hash(h)
                }
                None => Old::Absent,
            };
            if let Change::Put { .. } = c {
                if let Some(new) = self.hashes.get(puts) {
                    after = after.wrapping_add(*new);
                }
                puts += 1;
            }
        }
        self.seen = latest.into_inner();
        self.rank = rank;
        self.olds = olds;
        self.found_hashes = found_hashes;
        after
    }

    /// [`State::apply_changes`] of changes hashed beforehand, on any thread of this process:
    /// the same entries and digest, without the hashing.
    pub fn apply_hashed(&mut self, hashed: &HashedChanges) -> Digest {
        self.hashes.clear();
        self.hashes.extend_from_slice(&hashed.hashes);
        self.slots.clear();
        self.slots.extend_from_slice(&hashed.slots);
        self.predict_hashed(hashed.changes.iter());
        self.write(hashed.changes.iter());
        self.digest()
    }

    /// Applies the batch [`State::predict`] just looked at, in order,
    /// maintaining the digest. Returns the number of changes.
    fn write<'a>(&mut self, changes: impl Iterator<Item = &'a Change>) -> usize {
        let hashes = std::mem::take(&mut self.hashes);
        let slots = std::mem::take(&mut self.slots);
        let olds = std::mem::take(&mut self.olds);
        let mut next = hashes.iter().copied();
        let mut count = 0;
        for ((c, &(b, h)), old) in changes.zip(&slots).zip(&olds) {
            let new = match c {
                Change::Put { .. } => next.next(),
                Change::Delete { .. } => None,
            };
            let old = match *old {
                Old::Hash(hash) => Some(hash),
                _ => None,
            };
            self.apply_one(c, usize::from(b), h, new, old);
            count += 1;
        }
        self.hashes = hashes;
        self.slots = slots;
        self.olds = olds;
        count
    }

    /// Applies one change, maintaining the digest. `b` is the key's digest bucket, `h` its
    /// table hash, `new` the put's entry hash and `old` that of the entry it replaces or
    /// deletes (both from the batch's `predict`).
    fn apply_one(
        &mut self,
        change: &Change,
        b: usize,
        h: u64,
        new: Option<Digest>,
        old: Option<Digest>,
    ) {
        let bucket = Arc::make_mut(&mut self.buckets[b]);
        let existed = match change {
            Change::Put { key, value } => {
                let new = new.unwrap_or_else(|| crate::digest::entry_hash(key, value));
                self.digests.add(b, new);
                let k = key.as_bytes();
                match bucket.entry(h, |e| e.key_bytes() == k, |e| key_hash(e.key_bytes())) {
                    Slot::Occupied(mut o) => {
                        let e = o.get_mut();
                        if !e.overwrite(value) {
                            *e = Entry::new(&mut self.scratch, key, value);
                        }
                        true
                    }
                    Slot::Vacant(v) => {
                        v.insert(Entry::new(&mut self.scratch, key, value));
                        self.len += 1;
                        false
                    }
                }
            }
            Change::Delete { key } => {
                let removed = remove(bucket, h, key.as_bytes()).is_some();
                if removed {
                    self.len -= 1;
                }
                removed
            }
        };
        debug_assert_eq!(
            existed,
            old.is_some(),
            "the look-up pass saw the entry the write found"
        );
        if let Some(old) = old {
            self.digests.sub(b, old);
        }
    }
}

/// What a change of a batch replaces, as [`State::predict`] works it out.
#[derive(Debug, Clone, Copy)]
enum Old {
    /// No entry: the key is new, or deleted earlier in the batch.
    Absent,
    /// The entry an earlier put of the batch wrote: that put's index among the puts.
    Batch(usize),
    /// The entry in the table: its index among the old entries hashed together.
    Table(usize),
    /// Resolved: the replaced entry's hash.
    Hash(Digest),
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
                .all(|(a, b)| Arc::ptr_eq(a, b) || buckets_equal(a, b))
    }
}

/// The changes that turn `old`'s entries into `new`'s: puts for added and changed keys,
/// deletes for removed ones, bucket by bucket and sorted by key within a bucket. Buckets that
/// are shared or have equal digests are skipped without being read, so diffing a state
/// against a recent clone costs what changed, not what exists. Keys and values are copied
/// out of the entries.
pub fn diff(old: &State, new: &State) -> Vec<Change> {
    let mut out = Vec::new();
    for b in 0..BUCKETS {
        let (ob, nb) = (&old.buckets[b], &new.buckets[b]);
        if Arc::ptr_eq(ob, nb) || old.digests.bucket(b) == new.digests.bucket(b) {
            continue;
        }
        let start = out.len();
        for e in nb.iter() {
            if !find(ob, e.key_bytes()).is_some_and(|o| o.same(e)) {
                out.push(Change::Put {
                    key: Key::from(e.key()),
                    value: Bytes::copy_from_slice(e.value()),
                });
            }
        }
        for o in ob.iter() {
            if find(nb, o.key_bytes()).is_none() {
                out.push(Change::Delete {
                    key: Key::from(o.key()),
                });
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

    #[test]
    fn a_state_freed_in_the_background_is_gone_once_the_frees_are_waited_for() {
        let mut s = State::new(L);
        s.apply_changes(&[Change::put("k", &b"v"[..])]);
        let b = bucket_of("k");
        let bucket = Arc::clone(&s.buckets[b]);
        assert_eq!(Arc::strong_count(&bucket), 2);
        free_in_background(s);
        wait_for_background_frees();
        assert_eq!(
            Arc::strong_count(&bucket),
            1,
            "the state's reference was dropped"
        );
    }

    #[test]
    fn a_same_length_put_never_changes_what_a_clone_sees() {
        let mut s = State::new(L);
        s.apply_changes(&[Change::put("k", vec![1; 8]), Change::put("j", vec![2; 8])]);
        let cut = s.clone();
        // Shared with `cut`: replaced, not rewritten.
        s.apply_changes(&[Change::put("k", vec![3; 8])]);
        assert_eq!(cut.get("k"), Some(&[1u8; 8][..]));
        assert_eq!(s.get("k"), Some(&[3u8; 8][..]));
        drop(cut);
        // Its own now: rewritten in place, digest maintained.
        let before = s.get("k").map(<[u8]>::as_ptr);
        s.apply_changes(&[Change::put("k", vec![4; 8])]);
        assert_eq!(s.get("k").map(<[u8]>::as_ptr), before);
        assert_eq!(s.get("k"), Some(&[4u8; 8][..]));
        let scratch = BucketDigests::from_entries(s.iter()).total();
        assert_eq!(s.digest(), scratch);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn the_latest_change_of_a_key_is_found_even_when_keys_share_a_hash() {
        let keys = ["a", "b", "a", "c", "b", "a"];
        let mut latest = Latest::new(Vec::new(), keys.len());
        let mut got = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            // Every key gets the same hash.
            got.push(latest.replace(7, i, |j| keys[j] == *k));
        }
        assert_eq!(got, [None, None, Some(0), None, Some(1), Some(2)]);
        // A hash of 0 is a hash like any other (the free-slot mark is the index).
        let mut zero = Latest::new(latest.into_inner(), 2);
        assert_eq!(zero.replace(0, 0, |_| true), None);
        assert_eq!(zero.replace(0, 1, |j| j == 0), Some(0));
    }

    #[test]
    fn a_transaction_rewriting_its_own_keys_is_predicted_exactly() {
        let mut producer = State::new(L);
        let mut replica = State::new(L);
        let first = vec![Change::put("k", vec![1]), Change::put("gone", vec![2])];
        for e in produce(&mut producer, first, 1 << 20) {
            replica.apply(&e).unwrap_or_else(|e| panic!("{e}"));
        }
        let churn = vec![
            Change::put("k", vec![3]),
            Change::delete("k"),
            Change::put("k", vec![4]),
            Change::delete("gone"),
            Change::put("gone", vec![2]),
            Change::delete("never"),
            Change::put("new", vec![5]),
            Change::put("new", vec![5]),
        ];
        let mut envs = produce(&mut producer, churn, 1 << 20);
        let good = envs.remove(0);
        let mut bad = good.clone();
        bad.digest.0[0] ^= 1;
        let before = replica.clone();
        assert_eq!(
            replica.apply(&bad),
            Err(ApplyError::DigestMismatch {
                seq: bad.seq,
                expected: bad.digest,
                actual: producer.digest(),
            })
        );
        assert!(replica == before && replica.seq() == before.seq());
        assert!(replica.apply(&good).is_ok());
        assert!(replica == producer);
        assert_eq!(replica.get("k"), Some(&[4u8][..]));
        assert_eq!(replica.len(), 3);
    }

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
    fn a_digest_mismatch_leaves_the_whole_transaction_unapplied() {
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
