//! Property tests and test vectors for the pure protocol core (`change`, `envelope`, `codec`,
//! `digest`, `state`): no I/O, no NATS.
//!
//! States are checked against a `BTreeMap<String, Vec<u8>>` model. Keys come from a tiny
//! alphabet so that puts overwrite, deletes hit existing keys and deletes of absent keys all
//! happen often. Failing cases proptest finds are kept in `proptest-regressions/core.txt` and
//! replayed first on every run. The digest vectors in `tests/vectors/digest_v1.json` come from
//! an independent Python reference, `tests/vectors/gen_digest_v1.py`.

use bytes::Bytes;
use deltasync_core::change::{Change, MAX_KEY_BYTES, MAX_VALUE_BYTES};
use deltasync_core::codec::{decode_envelope, encode_envelope, HEADER_LEN};
use deltasync_core::digest::{bucket_of, entry_hash, BucketDigests, Digest, BUCKETS};
use deltasync_core::envelope::{split_transaction, Envelope, Lineage, MAX_TXN_PARTS};
use deltasync_core::state::{diff, Applied, ApplyError, HashedChanges, Prepared, State};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::FileFailurePersistence;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::LazyLock;

/// The lineage every test pipeline follows.
const L: Lineage = Lineage([7; 16]);

/// Where failing cases are kept (the default location does not work for `tests/*.rs`).
const REGRESSIONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/proptest-regressions/core.txt");

/// The reference the state is checked against.
type Model = BTreeMap<String, Vec<u8>>;

/// `cases` per test, unless `PROPTEST_CASES` asks for another number (for a longer run:
/// `PROPTEST_CASES=20000 cargo test --release -p deltasync-core --test core`). The defaults
/// keep this file near 10 s of CPU in a debug build.
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS))),
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies

/// The letters of small keys; `é` is two bytes of UTF-8.
const LETTERS: [&str; 4] = ["a", "b", "c", "é"];

/// Every small key: the empty key and all words of one or two letters (21 keys).
static SMALL_KEYS: LazyLock<Vec<String>> = LazyLock::new(|| {
    let mut keys = vec![String::new()];
    for a in LETTERS {
        keys.push(a.to_string());
        for b in LETTERS {
            keys.push(format!("{a}{b}"));
        }
    }
    keys
});

fn small_key() -> impl Strategy<Value = String> {
    "[abcé]{0,2}"
}

/// Values from a tiny alphabet, so a put often rewrites the value a key already has.
fn small_value() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(0u8..3, 0..3)
}

fn small_change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => (small_key(), small_value()).prop_map(|(k, v)| Change::put(k, v)),
        1 => small_key().prop_map(Change::delete),
    ]
}

fn small_changes(max: usize) -> impl Strategy<Value = Vec<Change>> {
    prop::collection::vec(small_change(), 0..max)
}

/// Any key within the limit, including keys of exactly the limit.
fn any_key() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => any::<String>(),
        1 => Just("k".repeat(MAX_KEY_BYTES)),
        1 => Just("é".repeat(MAX_KEY_BYTES / 2)),
        1 => "\\PC{200,400}".prop_filter("within the key limit", |k| k.len() <= MAX_KEY_BYTES),
    ]
}

/// Binary values whose lengths need each MessagePack bin header (8, 16 and 32-bit lengths).
fn any_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => prop::collection::vec(any::<u8>(), 0..64),
        1 => prop::collection::vec(any::<u8>(), 250..300),
        1 => Just((0..70_000u32).map(|i| i as u8).collect()),
    ]
}

fn any_change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => (any_key(), any_value()).prop_map(|(k, v)| Change::put(k, v)),
        1 => any_key().prop_map(Change::delete),
    ]
}

/// u64s with the edges well represented.
fn any_u64() -> impl Strategy<Value = u64> {
    prop_oneof![4 => any::<u64>(), 1 => Just(0), 1 => Just(u64::MAX), 1 => 0u64..300]
}

/// Any envelope the decoder must accept: sequence from 1, `1 <= part <= parts <= 1024`,
/// `part <= seq`, the transaction's last part at most at `u64::MAX`, changes within the
/// limits.
fn any_envelope(changes: impl Strategy<Value = Vec<Change>>) -> impl Strategy<Value = Envelope> {
    (
        any::<[u8; 16]>(),
        prop_oneof![Just(1u32), 1..=MAX_TXN_PARTS],
        any::<u32>(),
        any_u64(),
        any::<[u8; 32]>(),
        any_u64(),
        changes,
    )
        .prop_map(|(lineage, parts, pick, offset, digest, at, changes)| {
            let part = pick % parts + 1;
            let last_seq_room = u64::MAX - u64::from(parts - part);
            Envelope {
                lineage: Lineage(lineage),
                seq: u64::from(part).saturating_add(offset).min(last_seq_room),
                part,
                parts,
                digest: Digest(digest),
                produced_at_ms: at,
                changes,
            }
        })
}

/// One transaction of a producer: its changes, the byte budget that splits it into parts,
/// and whether the producer crashes part-way through publishing it.
#[derive(Debug, Clone)]
struct Txn {
    changes: Vec<Change>,
    max_bytes: usize,
    /// `Some(i)`: only the first `1 + i % (parts - 1)` parts are published before a crash
    /// (ignored for a one-part transaction).
    crash: Option<usize>,
}

fn txn(crash_weight: u32) -> impl Strategy<Value = Txn> {
    (
        small_changes(12),
        prop_oneof![3 => 1usize..60, 1 => Just(1usize << 20)],
        prop_oneof![8 => Just(None), crash_weight => any::<usize>().prop_map(Some)],
    )
        .prop_map(|(changes, max_bytes, crash)| Txn {
            changes,
            max_bytes,
            crash,
        })
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn apply_to_model(model: &mut Model, changes: &[Change]) {
    for c in changes {
        match c {
            Change::Put { key, value } => {
                model.insert(key.to_string(), value.to_vec());
            }
            Change::Delete { key } => {
                model.remove(&**key);
            }
        }
    }
}

fn model_of(state: &State) -> Model {
    state
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_vec()))
        .collect()
}

fn state_of(changes: &[Change]) -> State {
    let mut s = State::new(L);
    s.apply_changes(changes);
    s
}

/// `digests` equal `scratch`, the digests computed from scratch, bucket by bucket.
fn check_digests_equal(
    digests: &BucketDigests,
    scratch: &BucketDigests,
) -> Result<(), TestCaseError> {
    if digests != scratch {
        let wrong: Vec<usize> = (0..BUCKETS)
            .filter(|&b| digests.bucket(b) != scratch.bucket(b))
            .collect();
        prop_assert!(
            false,
            "buckets {:?} differ from scratch ({:?} vs {:?})",
            wrong,
            digests,
            scratch
        );
    }
    prop_assert_eq!(digests.total(), scratch.total());
    Ok(())
}

/// The state's digests equal the ones computed from scratch over its entries.
fn check_digest(state: &State) -> Result<(), TestCaseError> {
    let scratch = BucketDigests::from_entries(state.iter());
    check_digests_equal(state.bucket_digests(), &scratch)
}

/// Entry hashes already computed: unoptimised SHA-256 dominates these tests in debug builds,
/// and with small keys and values the same entries come back again and again.
#[derive(Default)]
struct Hashes(HashMap<(String, Vec<u8>), Digest>);

impl std::fmt::Debug for Hashes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hashes({})", self.0.len())
    }
}

impl Hashes {
    /// The digests computed from scratch over `model`, as `BucketDigests::from_entries` does.
    fn scratch(&mut self, model: &Model) -> BucketDigests {
        let mut d = BucketDigests::default();
        for (k, v) in model {
            let h = *self
                .0
                .entry((k.clone(), v.clone()))
                .or_insert_with(|| entry_hash(k, v));
            d.add(bucket_of(k), h);
        }
        d
    }
}

/// The state holds the model's entries and the digests computed from scratch over them: the
/// cheap check, complete when every key is a small key or in the model (walks over 4096
/// buckets and SHA-256 are what make these tests slow in debug builds).
fn check_small_model(
    state: &State,
    model: &Model,
    hashes: &mut Hashes,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(state.len(), model.len());
    prop_assert_eq!(state.is_empty(), model.is_empty());
    for k in SMALL_KEYS.iter().chain(model.keys()) {
        prop_assert_eq!(
            state.get(k).map(|v| v.to_vec()),
            model.get(k).cloned(),
            "get({:?})",
            k
        );
    }
    check_digests_equal(state.bucket_digests(), &hashes.scratch(model))
}

/// The state holds exactly the model's entries, and its digest is right: the thorough check,
/// which also walks the state's own iteration.
fn check_against_model(state: &State, model: &Model) -> Result<(), TestCaseError> {
    check_small_model(state, model, &mut Hashes::default())?;
    let entries: Vec<(String, Vec<u8>)> = state
        .sorted_entries()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_vec()))
        .collect();
    let expected: Vec<(String, Vec<u8>)> =
        model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    prop_assert_eq!(entries, expected);
    let payload: usize = model.iter().map(|(k, v)| k.len() + v.len()).sum();
    prop_assert_eq!(state.payload_bytes(), payload);
    check_digest(state)
}

/// Two states hold the same entries and digests (position aside).
fn check_same_entries(a: &State, b: &State) -> Result<(), TestCaseError> {
    prop_assert!(a == b, "entries differ");
    prop_assert_eq!(a.digest(), b.digest());
    prop_assert_eq!(a.bucket_digests(), b.bucket_digests());
    prop_assert_eq!(a.len(), b.len());
    Ok(())
}

/// Everything `apply` promises to leave alone on error.
fn check_unchanged(now: &State, before: &State) -> Result<(), TestCaseError> {
    check_same_entries(now, before)?;
    prop_assert_eq!(now.seq(), before.seq());
    prop_assert_eq!(now.lineage(), before.lineage());
    prop_assert_eq!(now.has_pending_parts(), before.has_pending_parts());
    Ok(())
}

fn encoded(env: &Envelope) -> Result<Vec<u8>, TestCaseError> {
    encode_envelope(env).map_err(|e| TestCaseError::fail(format!("encode: {e}")))
}

/// Encodes and decodes, as the wire does.
fn over_the_wire(env: &Envelope) -> Result<Envelope, TestCaseError> {
    let decoded =
        decode_envelope(&encoded(env)?).map_err(|e| TestCaseError::fail(format!("decode: {e}")))?;
    prop_assert_eq!(&decoded, env);
    Ok(decoded)
}

/// The producer side of a test pipeline: the source of truth and its model.
#[derive(Debug)]
struct Producer {
    state: State,
    model: Model,
    /// Entry hashes for checking replicas against `model`.
    hashes: Hashes,
}

impl Producer {
    fn new() -> Producer {
        Producer {
            state: State::new(L),
            model: Model::new(),
            hashes: Hashes::default(),
        }
    }

    /// Runs one transaction and returns the envelopes published and whether it completed. A
    /// crashed transaction never happened: the producer recovers to the state before it, at
    /// the sequence of the last part it published.
    fn run(&mut self, txn: &Txn) -> (Vec<Envelope>, bool) {
        let before = txn.crash.map(|_| self.state.clone());
        let digest = self.state.apply_changes(&txn.changes);
        let all = split_transaction(
            L,
            self.state.seq() + 1,
            digest,
            0,
            txn.changes.clone(),
            txn.max_bytes,
        );
        let published = match txn.crash {
            Some(i) if all.len() > 1 => 1 + i % (all.len() - 1),
            _ => all.len(),
        };
        let last_seq = all[published - 1].seq;
        let complete = published == all.len();
        match before {
            Some(before) if !complete => self.state = before,
            _ => apply_to_model(&mut self.model, &txn.changes),
        }
        self.state.set_position(L, last_seq);
        (all[..published].to_vec(), complete)
    }
}

/// What a replica of small keys shows: digest, length, position and every small key's value.
fn fingerprint(state: &State) -> (Digest, usize, u64, Vec<Option<Bytes>>) {
    let values = SMALL_KEYS
        .iter()
        .map(|k| state.get(k).map(Bytes::copy_from_slice))
        .collect();
    (state.digest(), state.len(), state.seq(), values)
}

/// Applies one transaction's published envelopes to `replica`, checking every step.
fn deliver(
    replica: &mut State,
    envs: &[Envelope],
    complete: bool,
    producer: &mut Producer,
) -> Result<(), TestCaseError> {
    for (i, env) in envs.iter().enumerate() {
        let env = over_the_wire(env)?;
        let before = fingerprint(replica);
        let result = replica.apply(&env);
        if complete && i == envs.len() - 1 {
            let changes = envs.iter().map(|e| e.changes.len()).sum();
            prop_assert_eq!(
                result,
                Ok(Applied::Committed {
                    seq: env.seq,
                    changes
                })
            );
            prop_assert!(!replica.has_pending_parts());
            check_same_entries(replica, &producer.state)?;
            prop_assert_eq!(replica.seq(), producer.state.seq());
            check_small_model(replica, &producer.model, &mut producer.hashes)?;
        } else {
            prop_assert_eq!(
                result,
                Ok(Applied::Buffered {
                    seq: env.seq,
                    part: env.part,
                    parts: env.parts
                })
            );
            // A buffered part never moves entries, digest or position.
            prop_assert_eq!(fingerprint(replica), before);
            prop_assert!(replica.has_pending_parts());
        }
    }
    Ok(())
}

/// The error `apply` must give for an envelope of this lineage at `seq` that is not the next
/// one: a replica at position `position`, with parts buffered up to `last` (`position` when
/// none), has seen everything up to `last`.
fn expected_sequence_error(seq: u64, position: u64, last: u64) -> Option<ApplyError> {
    let next = last + 1;
    if seq > next {
        Some(ApplyError::Gap {
            expected: next,
            got: seq,
        })
    } else if seq == next {
        None
    } else if seq >= position {
        Some(ApplyError::Duplicate { seq })
    } else {
        Some(ApplyError::Stale {
            seq,
            current: position,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Properties of State against the model

/// What a test does to a state, in `random_operations_keep_the_state_equal_to_the_model`.
#[derive(Debug, Clone)]
enum Op {
    /// `apply_changes` with a batch.
    Changes(Vec<Change>),
    /// `insert`, the snapshot-restore path.
    Insert(String, Vec<u8>),
    /// `clear_buckets` over the buckets around a key's.
    ClearAround(String, usize, usize),
    /// `Prepared::puts` then `put_prepared`, the snapshot-restore path.
    Prepared(Vec<(String, Vec<u8>)>),
    /// `HashedChanges::new` on another thread, then `apply_hashed`: a durable restart's path.
    Hashed(Vec<Change>),
    /// Keep a clone aside; later writes must not reach it.
    Fork,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => small_changes(8).prop_map(Op::Changes),
        1 => (small_key(), small_value()).prop_map(|(k, v)| Op::Insert(k, v)),
        1 => (small_key(), 0usize..3, 0usize..3).prop_map(|(k, l, r)| Op::ClearAround(k, l, r)),
        2 => prop::collection::vec((small_key(), small_value()), 0..8).prop_map(Op::Prepared),
        3 => small_changes(8).prop_map(Op::Hashed),
        1 => Just(Op::Fork),
    ]
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn random_operations_keep_the_state_equal_to_the_model(ops in prop::collection::vec(op(), 0..30)) {
        let mut state = State::new(L);
        let mut model = Model::new();
        let mut hashes = Hashes::default();
        let mut forks: Vec<(State, Model)> = Vec::new();
        for op in ops {
            match op {
                Op::Changes(changes) => {
                    let digest = state.apply_changes(&changes);
                    prop_assert_eq!(digest, state.digest());
                    apply_to_model(&mut model, &changes);
                }
                Op::Insert(k, v) => {
                    state.insert(k.as_str().into(), Bytes::from(v.clone()));
                    model.insert(k, v);
                }
                Op::ClearAround(k, left, right) => {
                    let b = bucket_of(&k);
                    let range = b.saturating_sub(left)..(b + right).min(BUCKETS);
                    state.clear_buckets(range.clone());
                    model.retain(|k, _| !range.contains(&bucket_of(k)));
                }
                Op::Prepared(puts) => {
                    let mut prepared = Prepared::puts(puts.iter().map(|(k, v)| (k.as_str(), &v[..])));
                    prop_assert_eq!(prepared.len(), puts.len());
                    state.put_prepared(&mut prepared);
                    prop_assert!(prepared.is_empty());
                    for (k, v) in puts {
                        model.insert(k, v);
                    }
                }
                Op::Hashed(changes) => {
                    let hashed = std::thread::spawn({
                        let changes = changes.clone();
                        move || HashedChanges::new(changes)
                    })
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                    prop_assert_eq!(hashed.changes(), &changes[..]);
                    let digest = state.apply_hashed(&hashed);
                    prop_assert_eq!(digest, state.digest());
                    apply_to_model(&mut model, &changes);
                }
                Op::Fork => forks.push((state.clone(), model.clone())),
            }
            check_small_model(&state, &model, &mut hashes)?;
            prop_assert_eq!(state.seq(), 0);
        }
        check_against_model(&state, &model)?;
        // Copy-on-write: writes after a clone never reach it.
        for (fork, fork_model) in &forks {
            check_against_model(fork, fork_model)?;
        }
    }

    #[test]
    fn the_incremental_digest_equals_the_digest_computed_from_scratch(
        changes in prop::collection::vec(
            prop_oneof![
                4 => small_change(),
                1 => ("\\PC{0,6}", small_value()).prop_map(|(k, v)| Change::put(k, v)),
                1 => "\\PC{0,6}".prop_map(Change::delete),
            ],
            0..40,
        ),
    ) {
        let mut state = State::new(L);
        let mut model = Model::new();
        let mut hashes = Hashes::default();
        for c in &changes {
            let (before, had) = (state.digest(), state.get(c.key()).map(Bytes::copy_from_slice));
            let after = state.apply_changes(std::slice::from_ref(c));
            prop_assert_eq!(after, state.digest());
            apply_to_model(&mut model, std::slice::from_ref(c));
            check_small_model(&state, &model, &mut hashes)?;
            // The digest moves by exactly the hashes of the entry removed and the one added,
            // and back when the change is undone.
            let mut expected = before;
            if let Some(v) = &had {
                expected = expected.wrapping_sub(entry_hash(c.key(), v));
            }
            if let Some(v) = c.value() {
                expected = expected.wrapping_add(entry_hash(c.key(), v));
            }
            prop_assert_eq!(after, expected);
            match had {
                Some(v) => state.insert(c.key().into(), v),
                None => {
                    state.apply_changes(&[Change::delete(c.key())]);
                }
            }
            prop_assert_eq!(state.digest(), before);
            prop_assert_eq!(state.apply_changes(std::slice::from_ref(c)), after);
        }
        check_against_model(&state, &model)?;
        // The digest is independent of the order the entries arrived in.
        let mut reversed = State::new(L);
        let mut entries: Vec<Change> = state
            .sorted_entries()
            .into_iter()
            .map(|(k, v)| Change::put(k, Bytes::copy_from_slice(v)))
            .collect();
        entries.reverse();
        reversed.apply_changes(&entries);
        check_same_entries(&reversed, &state)?;
    }

    #[test]
    fn applying_the_diff_of_two_states_to_the_first_gives_the_second(
        base in small_changes(40),
        edits in small_changes(20),
        other_edits in small_changes(20),
        relation in 0u8..3,
    ) {
        // 0: b is a clone of a with edits (shared buckets); 1: a and b are both clones of a
        // common ancestor, edited apart; 2: unrelated states.
        let ancestor = state_of(&base);
        let (a, b) = match relation {
            0 => {
                let mut b = ancestor.clone();
                b.apply_changes(&edits);
                (ancestor, b)
            }
            1 => {
                let (mut a, mut b) = (ancestor.clone(), ancestor.clone());
                a.apply_changes(&other_edits);
                b.apply_changes(&edits);
                (a, b)
            }
            _ => (ancestor, state_of(&edits)),
        };
        let (model_a, model_b) = (model_of(&a), model_of(&b));
        let d = diff(&a, &b);

        // One change per key that differs, and nothing else.
        let keys: Vec<String> = d.iter().map(|c| c.key().to_string()).collect();
        let distinct: BTreeSet<&String> = keys.iter().collect();
        prop_assert_eq!(distinct.len(), keys.len(), "a key appears twice in {:?}", d);
        let differing: BTreeSet<&String> = model_a
            .keys()
            .chain(model_b.keys())
            .filter(|k| model_a.get(*k) != model_b.get(*k))
            .collect();
        prop_assert_eq!(distinct, differing);
        for c in &d {
            prop_assert_eq!(c.value().map(|v| v.to_vec()), model_b.get(c.key()).cloned());
        }
        // Bucket by bucket, sorted by key within a bucket.
        for w in d.windows(2) {
            let (x, y) = (&w[0], &w[1]);
            prop_assert!(
                (bucket_of(x.key()), x.key().as_bytes()) < (bucket_of(y.key()), y.key().as_bytes()),
                "{:?} before {:?}", x, y
            );
        }

        let mut patched = a.clone();
        patched.apply_changes(&d);
        check_same_entries(&patched, &b)?;
        check_against_model(&patched, &model_b)?;
        let mut back = b.clone();
        back.apply_changes(&diff(&b, &a));
        check_same_entries(&back, &a)?;
        // Diffing reads, never writes.
        prop_assert_eq!(model_of(&a), model_a);
        prop_assert_eq!(model_of(&b), model_b);
        prop_assert!(diff(&patched, &b).is_empty());
        prop_assert!(diff(&a, &a.clone()).is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// Producer, wire and replica

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn a_replica_fed_encoded_envelopes_equals_the_producer_after_every_commit(
        txns in prop::collection::vec(txn(1), 1..12),
    ) {
        let mut producer = Producer::new();
        let mut replica = State::new(L);
        for t in &txns {
            let (envs, complete) = producer.run(t);
            deliver(&mut replica, &envs, complete, &mut producer)?;
            prop_assert_eq!(replica.has_pending_parts(), !complete);
            prop_assert_eq!(replica.seq() == producer.state.seq(), complete);
        }
    }

    #[test]
    fn split_transaction_keeps_the_changes_in_order_within_the_byte_budget(
        changes in prop::collection::vec(prop_oneof![3 => small_change(), 1 => any_change()], 0..20),
        max_bytes in prop_oneof![1usize..200, 200usize..100_000],
        first_seq in 1u64..1_000_000,
        digest in any::<[u8; 32]>(),
    ) {
        let digest = Digest(digest);
        let parts = split_transaction(L, first_seq, digest, 9, changes.clone(), max_bytes);
        prop_assert!(!parts.is_empty());
        let rejoined: Vec<Change> = parts.iter().flat_map(|p| p.changes.clone()).collect();
        prop_assert_eq!(&rejoined, &changes);
        let budget = |cs: &[Change]| cs.iter().map(Change::encoded_len_bound).sum::<usize>();
        for (i, p) in parts.iter().enumerate() {
            prop_assert_eq!(p.seq, first_seq + i as u64);
            prop_assert_eq!(p.part as usize, i + 1);
            prop_assert_eq!(p.parts as usize, parts.len());
            prop_assert_eq!(p.digest, digest);
            prop_assert_eq!(p.txn_last_seq(), first_seq + parts.len() as u64 - 1);
            prop_assert_eq!(p.is_last_part(), i + 1 == parts.len());
            prop_assert!(changes.is_empty() || !p.changes.is_empty(), "empty part {}", i + 1);
            prop_assert!(p.changes.len() == 1 || budget(&p.changes) <= max_bytes);
            // Greedy: the next part's first change did not fit in this one.
            if let Some(next) = parts.get(i + 1) {
                prop_assert!(budget(&p.changes) + next.changes[0].encoded_len_bound() > max_bytes);
            }
            // The bound holds on the wire: the envelope's own fields take at most 91 bytes.
            prop_assert!(encoded(p)?.len() <= HEADER_LEN + 86 + budget(&p.changes));
        }
        for c in &changes {
            let wire = rmp_serde::to_vec(c).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(wire.len() <= c.encoded_len_bound(), "{} > bound for {:?}", wire.len(), c);
        }
    }

    #[test]
    fn a_corrupted_digest_is_refused_all_or_nothing_and_the_correct_envelopes_then_apply(
        history in prop::collection::vec(txn(3), 0..6),
        bad in txn(1).prop_map(|t| Txn { crash: None, ..t }),
        bit in 0usize..256,
    ) {
        let mut producer = Producer::new();
        let mut replica = State::new(L);
        for t in &history {
            let (envs, complete) = producer.run(t);
            deliver(&mut replica, &envs, complete, &mut producer)?;
        }
        let (envs, _) = producer.run(&bad);
        let mut corrupted = envs.clone();
        for e in &mut corrupted {
            e.digest.0[bit / 8] ^= 1 << (bit % 8);
        }
        let (last, buffered) = corrupted.split_last().ok_or_else(|| TestCaseError::fail("no envelope"))?;
        for e in buffered {
            let applied = replica.apply(&over_the_wire(e)?);
            prop_assert!(matches!(applied, Ok(Applied::Buffered { .. })), "{:?}", applied);
        }
        let before = replica.clone();
        prop_assert_eq!(
            replica.apply(&over_the_wire(last)?),
            Err(ApplyError::DigestMismatch {
                seq: last.seq,
                expected: last.digest,
                actual: producer.state.digest(),
            })
        );
        check_unchanged(&replica, &before)?;
        check_digest(&replica)?;
        if !buffered.is_empty() {
            // The corrupted parts stay buffered (an error changes nothing); the caller drops
            // them by moving to the position before the transaction.
            replica.set_position(L, envs[0].seq - 1);
        }
        for (i, e) in envs.iter().enumerate() {
            let applied = replica.apply(&over_the_wire(e)?);
            if i + 1 == envs.len() {
                let changes = bad.changes.len();
                prop_assert_eq!(applied, Ok(Applied::Committed { seq: e.seq, changes }));
            } else {
                prop_assert!(matches!(applied, Ok(Applied::Buffered { .. })), "{:?}", applied);
            }
        }
        check_same_entries(&replica, &producer.state)?;
        check_against_model(&replica, &producer.model)?;
        prop_assert_eq!(replica.seq(), producer.state.seq());
    }

    #[test]
    fn duplicates_stale_envelopes_gaps_and_misfits_are_distinct_errors_that_change_nothing(
        txns in prop::collection::vec(txn(2), 1..8),
        cut in any::<Index>(),
        probes in prop::collection::vec(any::<Index>(), 1..12),
        wrong_part in any::<Index>(),
    ) {
        let mut producer = Producer::new();
        let mut stream: Vec<(Envelope, bool)> = Vec::new();
        for t in &txns {
            let (envs, complete) = producer.run(t);
            let n = envs.len();
            stream.extend(envs.into_iter().enumerate().map(|(i, e)| (e, complete && i + 1 == n)));
        }
        // Deliver a prefix; the replica may stop in the middle of a transaction.
        let cut = cut.index(stream.len() + 1);
        let mut replica = State::new(L);
        for (e, _) in &stream[..cut] {
            replica.apply(e).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        let position = replica.seq();
        let last = if cut == 0 { 0 } else { stream[cut - 1].0.seq };
        let before = replica.clone();

        for probe in probes {
            let e = &stream[probe.index(stream.len())].0;
            let Some(expected) = expected_sequence_error(e.seq, position, last) else {
                continue;
            };
            prop_assert_eq!(replica.apply(e), Err(expected));
            check_unchanged(&replica, &before)?;
        }
        if let Some((next, _)) = stream.get(cut) {
            let mut foreign = next.clone();
            foreign.lineage = Lineage([8; 16]);
            prop_assert_eq!(
                replica.apply(&foreign),
                Err(ApplyError::LineageMismatch { seq: next.seq, expected: L, got: foreign.lineage })
            );
            check_unchanged(&replica, &before)?;
            // The right sequence with the wrong part, or a part of another transaction.
            let expected_part = if replica.has_pending_parts() { stream[cut - 1].0.part + 1 } else { 1 };
            let mut misfit = next.clone();
            misfit.part = wrong_part.index(next.parts as usize) as u32 + 1;
            if misfit.part != 1 && misfit.part != expected_part {
                prop_assert_eq!(
                    replica.apply(&misfit),
                    Err(ApplyError::PartOutOfOrder {
                        seq: next.seq,
                        part: misfit.part,
                        parts: next.parts,
                        expected_part,
                    })
                );
                check_unchanged(&replica, &before)?;
            }
            if next.part > 1 {
                let mut other = next.clone();
                other.digest.0[0] ^= 1;
                let refused = replica.apply(&other);
                prop_assert!(
                    matches!(refused, Err(ApplyError::PartOutOfOrder { .. })),
                    "{:?}",
                    refused
                );
                check_unchanged(&replica, &before)?;
            }
        }
        // Nothing was lost: the rest of the stream still applies.
        for (e, commits) in &stream[cut..] {
            let applied = replica.apply(e).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(matches!(applied, Applied::Committed { .. }), *commits);
        }
        check_same_entries(&replica, &producer.state)?;
        check_against_model(&replica, &producer.model)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Codec

/// A change to a valid encoding.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(Index, u8),
    Truncate(Index),
    Insert(Index, u8),
    Remove(Index),
    Set(Index, u8),
}

/// Bytes that mean something to MessagePack: nil, bin/str/array/map headers of each width,
/// integers of each width.
static INTERESTING: [u8; 22] = [
    0x00, 0x01, 0x7f, 0x80, 0x90, 0x97, 0xa0, 0xc0, 0xc3, 0xc4, 0xc5, 0xc6, 0xcc, 0xce, 0xcf, 0xd9,
    0xda, 0xdb, 0xdc, 0xdd, 0xde, 0xff,
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        2 => (any::<Index>(), prop::sample::select(&INTERESTING[..])).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => any::<Index>().prop_map(Mutation::Remove),
        2 => (any::<Index>(), prop::sample::select(&INTERESTING[..])).prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        if let Mutation::Insert(_, b) = m {
            bytes.push(*b);
        }
        return;
    }
    match m {
        Mutation::FlipBit(i, bit) => {
            let i = i.index(bytes.len());
            bytes[i] ^= 1 << bit;
        }
        Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len())),
        Mutation::Insert(i, b) => bytes.insert(i.index(bytes.len() + 1), *b),
        Mutation::Remove(i) => {
            bytes.remove(i.index(bytes.len()));
        }
        Mutation::Set(i, b) => {
            let i = i.index(bytes.len());
            bytes[i] = *b;
        }
    }
}

/// Whatever the decoder returns for `input`, it must not panic; what it accepts satisfies the
/// envelope's limits and survives a re-encoding.
fn check_decoding(input: &[u8]) -> Result<(), TestCaseError> {
    let Ok(env) = decode_envelope(input) else {
        return Ok(());
    };
    prop_assert!(env.seq >= 1);
    prop_assert!(1 <= env.part && env.part <= env.parts && env.parts <= MAX_TXN_PARTS);
    prop_assert!(u64::from(env.part) <= env.seq);
    prop_assert!(env
        .seq
        .checked_add(u64::from(env.parts - env.part))
        .is_some());
    for c in &env.changes {
        prop_assert!(c.validate().is_ok(), "{:?}", c);
    }
    over_the_wire(&env)?;
    Ok(())
}

fn small_envelope() -> impl Strategy<Value = Envelope> {
    any_envelope(prop::collection::vec(
        prop_oneof![
            3 => small_change(),
            1 => ("\\PC{0,20}", prop::collection::vec(any::<u8>(), 0..40)).prop_map(|(k, v)| Change::put(k, v)),
        ],
        0..5,
    ))
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn the_codec_round_trips_arbitrary_envelopes(
        env in any_envelope(prop::collection::vec(any_change(), 0..6)),
    ) {
        let bytes = encoded(&env)?;
        prop_assert_eq!(&bytes[..HEADER_LEN], b"DSE\x00\x01");
        over_the_wire(&env)?;
        prop_assert_eq!(encoded(&env)?, bytes, "encoding is deterministic");
    }
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(input in prop::collection::vec(any::<u8>(), 0..200)) {
        check_decoding(&input)?;
    }

    #[test]
    fn arbitrary_bodies_after_a_valid_header_never_panic_the_decoder(
        body in prop::collection::vec(
            prop_oneof![3 => any::<u8>(), 1 => prop::sample::select(&INTERESTING[..])],
            0..200,
        ),
    ) {
        let mut input = b"DSE\x00\x01".to_vec();
        input.extend_from_slice(&body);
        check_decoding(&input)?;
    }

    #[test]
    fn mutated_encodings_never_panic_the_decoder_and_what_decodes_re_encodes_to_itself(
        env in small_envelope(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let mut bytes = encoded(&env)?;
        for m in &mutations {
            mutate(&mut bytes, m);
        }
        check_decoding(&bytes)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Examples

fn wire(env: &Envelope) -> Vec<u8> {
    encode_envelope(env).expect("a valid envelope encodes")
}

fn example_envelope(changes: Vec<Change>) -> Envelope {
    Envelope {
        lineage: L,
        seq: 1,
        part: 1,
        parts: 1,
        digest: Digest::ZERO,
        produced_at_ms: 0,
        changes,
    }
}

#[test]
fn a_key_and_a_value_of_exactly_the_limits_round_trip_and_one_byte_more_is_refused() {
    let at_limit = example_envelope(vec![Change::put(
        "k".repeat(MAX_KEY_BYTES),
        vec![0xa5u8; MAX_VALUE_BYTES],
    )]);
    assert_eq!(decode_envelope(&wire(&at_limit)).ok(), Some(at_limit));

    let long_key = example_envelope(vec![Change::delete("k".repeat(MAX_KEY_BYTES + 1))]);
    let err = decode_envelope(&wire(&long_key))
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("key is 1025 bytes")),
        "{err:?}"
    );

    let big = example_envelope(vec![Change::put("k", vec![0u8; MAX_VALUE_BYTES + 1])]);
    let err = decode_envelope(&wire(&big)).err().map(|e| e.to_string());
    assert!(
        err.as_deref().is_some_and(|e| e.contains("524289")),
        "{err:?}"
    );
}

#[test]
fn length_prefixes_claiming_more_than_the_input_are_refused() {
    // The start of a valid envelope up to its first change, then a change whose key (str32)
    // or value (bin32) claims 4 GiB.
    let mut prefix = b"DSE\x00\x01\x97\xc4\x10".to_vec();
    prefix.extend_from_slice(&[1; 16]);
    prefix.extend_from_slice(&[1, 1, 1, 0xc4, 0x20]);
    prefix.extend_from_slice(&[0; 32]);
    prefix.extend_from_slice(&[0, 0x91, 0x92]);
    let mut huge_key = prefix.clone();
    huge_key.extend_from_slice(&[0xdb, 0xff, 0xff, 0xff, 0xff, b'k']);
    let mut huge_value = prefix;
    huge_value.extend_from_slice(&[0xa1, b'k', 0xc6, 0xff, 0xff, 0xff, 0xff, 0]);
    for input in [huge_key, huge_value] {
        let err = decode_envelope(&input).err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("malformed")),
            "{err:?}"
        );
    }
}

#[test]
fn an_envelope_whose_transaction_would_end_past_u64_max_is_refused() {
    // Part 1 of 2 at the largest sequence: the transaction's last part would be at 2^64.
    let mut env = example_envelope(vec![]);
    (env.seq, env.part, env.parts) = (u64::MAX, 1, 2);
    let decoded = decode_envelope(&wire(&env));
    assert!(
        decoded.is_err(),
        "accepted, and then txn_last_seq() overflows: {decoded:?}"
    );
}

/// Publishes `changes` as one transaction of `producer` split by `max_bytes`.
fn produce(producer: &mut State, changes: Vec<Change>, max_bytes: usize) -> Vec<Envelope> {
    let digest = producer.apply_changes(&changes);
    let envs = split_transaction(L, producer.seq() + 1, digest, 0, changes, max_bytes);
    let last = envs.last().map_or(producer.seq(), |e| e.seq);
    producer.set_position(L, last);
    envs
}

#[test]
fn a_digest_mismatch_right_after_abandoned_parts_keeps_the_replica_able_to_apply_the_correct_envelope(
) {
    let mut producer = State::new(L);
    let mut replica = State::new(L);
    for e in produce(&mut producer, vec![Change::put("a", &b"1"[..])], 1 << 20) {
        replica.apply(&e).expect("the first transaction applies");
    }
    // A two-part transaction of which only part 1 (seq 2) is published: the producer crashes
    // and restarts at seq 2 from the state before it.
    let mut crashed = producer.clone();
    let parts = produce(
        &mut crashed,
        vec![Change::put("b", &b"2"[..]), Change::put("c", &b"3"[..])],
        12,
    );
    assert_eq!(parts.len(), 2);
    assert!(matches!(
        replica.apply(&parts[0]),
        Ok(Applied::Buffered { seq: 2, .. })
    ));
    producer.set_position(L, 2);
    let next = produce(&mut producer, vec![Change::put("d", &b"4"[..])], 1 << 20);
    assert_eq!(next[0].seq, 3);

    let mut corrupted = next[0].clone();
    corrupted.digest.0[0] ^= 1;
    assert!(matches!(
        replica.apply(&corrupted),
        Err(ApplyError::DigestMismatch { seq: 3, .. })
    ));
    // An error changes nothing, buffered parts included, so the correct envelope 3 is still
    // the next one.
    assert_eq!(
        replica.apply(&next[0]),
        Ok(Applied::Committed { seq: 3, changes: 1 })
    );
    assert_eq!(replica, producer);
}

#[test]
fn redelivering_the_last_committed_envelope_is_a_duplicate_also_while_parts_are_buffered() {
    let mut producer = State::new(L);
    let mut replica = State::new(L);
    let first = produce(&mut producer, vec![Change::put("a", &b"1"[..])], 1 << 20);
    replica.apply(&first[0]).expect("envelope 1 applies");
    assert_eq!(
        replica.apply(&first[0]),
        Err(ApplyError::Duplicate { seq: 1 })
    );
    let parts = produce(
        &mut producer,
        vec![Change::put("b", &b"2"[..]), Change::put("c", &b"3"[..])],
        12,
    );
    assert!(matches!(
        replica.apply(&parts[0]),
        Ok(Applied::Buffered { seq: 2, .. })
    ));
    // Envelope 1 is still the replica's position, not older than it.
    assert_eq!(
        replica.apply(&first[0]),
        Err(ApplyError::Duplicate { seq: 1 })
    );
}

// ---------------------------------------------------------------------------------------------
// Digest test vectors

/// One case of `tests/vectors/digest_v1.json`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Vector {
    name: String,
    /// `[key, value as hex]`.
    entries: Vec<(String, String)>,
    /// Hex, one per entry.
    entry_hashes: Vec<String>,
    /// One per entry.
    buckets: Vec<usize>,
    /// The non-zero buckets' digests, hex.
    bucket_digests: BTreeMap<usize, String>,
    state_digest: String,
}

/// A digest as the integer it stands for, most significant byte first (for comparisons).
fn big_endian(d: Digest) -> [u8; 32] {
    let mut b = d.0;
    b.reverse();
    b
}

#[test]
fn the_digest_matches_the_independent_v1_test_vectors() {
    let vectors: Vec<Vector> =
        serde_json::from_str(include_str!("vectors/digest_v1.json")).expect("valid vectors");
    assert!(vectors.len() >= 8);
    for v in &vectors {
        let name = &v.name;
        let entries: Vec<(String, Vec<u8>)> = v
            .entries
            .iter()
            .map(|(k, h)| (k.clone(), hex::decode(h).expect("hex value")))
            .collect();
        assert_eq!(v.entry_hashes.len(), entries.len(), "{name}");
        assert_eq!(v.buckets.len(), entries.len(), "{name}");
        for (i, (k, val)) in entries.iter().enumerate() {
            assert_eq!(
                entry_hash(k, val).to_hex(),
                v.entry_hashes[i],
                "{name}: entry {k:?}"
            );
            assert_eq!(bucket_of(k), v.buckets[i], "{name}: bucket of {k:?}");
        }

        let puts: Vec<Change> = entries
            .iter()
            .map(|(k, val)| Change::put(k.as_str(), val.clone()))
            .collect();
        let state = state_of(&puts);
        assert_eq!(
            state.digest().to_hex(),
            v.state_digest,
            "{name}: state digest"
        );
        for b in 0..BUCKETS {
            let expected = v.bucket_digests.get(&b).map_or(Digest::ZERO, |h| {
                Digest::from_hex(h).expect("hex bucket digest")
            });
            assert_eq!(
                state.bucket_digests().bucket(b),
                expected,
                "{name}: bucket {b}"
            );
        }
        let scratch = BucketDigests::from_entries(entries.iter().map(|(k, v)| (&**k, &v[..])));
        assert_eq!(&scratch, state.bucket_digests(), "{name}");
        let reversed: Vec<Change> = puts.iter().rev().cloned().collect();
        assert_eq!(state_of(&reversed).digest(), state.digest(), "{name}");

        // A replica accepts an envelope that records the vector's digest.
        let digest = Digest::from_hex(&v.state_digest).expect("hex state digest");
        let mut replica = State::new(L);
        let mut env = example_envelope(puts);
        env.digest = digest;
        assert!(replica.apply(&env).is_ok(), "{name}");
    }

    // The vectors show what their names claim.
    let named = |s: &str| {
        vectors
            .iter()
            .find(|v| v.name.contains(s))
            .unwrap_or_else(|| panic!("no vector named {s:?}"))
    };
    assert_eq!(named("empty state").state_digest, Digest::ZERO.to_hex());
    let same = named("same bucket");
    assert!(same.buckets.len() == 2 && same.buckets[0] == same.buckets[1]);
    let carry = named("carry");
    let total = Digest::from_hex(&carry.state_digest).expect("hex");
    for h in &carry.entry_hashes {
        let h = Digest::from_hex(h).expect("hex");
        assert!(big_endian(total) < big_endian(h), "the sum wraps mod 2^256");
    }
    assert!(named("utf-8").entries[0].0.len() > named("utf-8").entries[0].0.chars().count());
}
