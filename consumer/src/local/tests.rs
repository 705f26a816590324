//! The local store against a model: commits, local snapshots, replaces, reopenings and logs
//! cut short at any byte, each load compared with the state the model says is durable.

#![allow(clippy::unwrap_used)]
use super::*;
use crate::follower::BatchKind;
use deltasync_core::{Change, Lineage};
use proptest::prelude::*;

const L: Lineage = Lineage([1; 16]);

fn batch(seq: u64, changes: Vec<Change>) -> Arc<ChangeBatch> {
    Arc::new(ChangeBatch {
        lineage: L,
        prev_seq: seq.saturating_sub(1),
        seq,
        kind: BatchKind::Applied,
        changes,
    })
}

/// Applies `changes` to `s` as transaction `seq` and returns its position.
fn apply(s: &mut State, seq: u64, changes: &[Change]) -> Position {
    s.apply_changes(changes);
    s.set_position(L, seq);
    Position::of(s, seq + 100)
}

#[test]
fn a_replica_built_from_its_log_is_not_snapshotted_before_the_log_is_twice_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open_durable_with(dir.path(), "p", 1).unwrap();
    let mut s = State::new(L);
    let mut seq = 0;
    // 2,000 new keys: the log holds the replica once, never twice.
    for round in 0..20 {
        seq += 1;
        let changes: Vec<Change> = (0..100)
            .map(|i| Change::put(format!("key-{round}-{i}"), vec![7u8; 50]))
            .collect();
        let cursor = apply(&mut s, seq, &changes);
        store.commit(&[batch(seq, changes)], &cursor, None).unwrap();
        assert!(
            !store.wants_snapshot(s.len()),
            "a snapshot after {seq} commits of new keys only"
        );
    }
    // Rewriting the same keys grows the log, not the replica: twice its size asks for one.
    let mut asked_at = None;
    for round in 0..40 {
        seq += 1;
        let changes: Vec<Change> = (0..100)
            .map(|i| Change::put(format!("key-{}-{i}", round % 20), vec![round as u8; 50]))
            .collect();
        let cursor = apply(&mut s, seq, &changes);
        store.commit(&[batch(seq, changes)], &cursor, None).unwrap();
        if store.wants_snapshot(s.len()) {
            asked_at = Some(round);
            break;
        }
    }
    assert_eq!(
        asked_at,
        Some(19),
        "asked once the log held 2,000 rewrites on top of the 2,000 inserts"
    );
}

fn snapshot_running(store: &LocalStore) -> bool {
    let LocalStore::Durable(j) = store else {
        return false;
    };
    j.lock()
        .snapshot
        .as_ref()
        .is_some_and(|(_, h)| !h.is_finished())
}

/// The replica of pipeline "p" in `dir`, opened again and loaded (it must hold one).
fn reopened(dir: &Path) -> LoadedReplica {
    LocalStore::open_durable(dir, "p")
        .unwrap()
        .load()
        .unwrap()
        .expect("a replica")
}

fn logs(dir: &Path) -> Vec<u64> {
    Files::scan(dir)
        .unwrap()
        .logs
        .iter()
        .map(|(g, _)| *g)
        .collect()
}

#[test]
fn commits_load_back_verified_with_their_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open_durable(dir.path(), "p").unwrap();
    assert!(store.load().unwrap().is_none());
    let mut s = State::new(L);
    let changes = vec![
        Change::put("a", &b"1"[..]),
        Change::put("b", &b"2"[..]),
        Change::put("a", &b"3"[..]),
        Change::delete("b"),
        Change::put("c", &b"4"[..]),
    ];
    let cursor = apply(&mut s, 1, &changes);
    store.commit(&[batch(1, changes)], &cursor, None).unwrap();
    let loaded = store.load().unwrap().unwrap();
    assert!(loaded.intact());
    assert_eq!(loaded.cursor, cursor);
    assert_eq!(loaded.state, s);
    assert_eq!(
        loaded.state.get("a").map(|v| v.to_vec()),
        Some(b"3".to_vec())
    );
    assert_eq!(loaded.state.get("b"), None);
    drop(store);
    assert_eq!(read_cursor(dir.path()).unwrap(), Some(cursor));
}

#[test]
fn after_a_failed_commit_write_nothing_more_is_committed_until_a_replace() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open_durable(dir.path(), "p").unwrap();
    let mut s = State::new(L);
    let first = vec![Change::put("a", &b"1"[..])];
    let c1 = apply(&mut s, 1, &first);
    store.commit(&[batch(1, first)], &c1, None).unwrap();
    let whole = s.clone();

    // The second commit's record is cut off after 20 bytes, as a full disk cuts it.
    let LocalStore::Durable(j) = &store else {
        unreachable!()
    };
    j.lock().fail_after = Some(20);
    let second = vec![Change::put("b", vec![2u8; 300])];
    let c2 = apply(&mut s, 2, &second);
    let err = store.commit(&[batch(2, second)], &c2, None).unwrap_err();
    assert!(
        matches!(&err, LocalError::Write { path, .. } if path.starts_with(dir.path())),
        "{err}"
    );
    // The disk takes writes again, yet a third commit would follow the partial record, where
    // no load reads it: refused, and said why.
    let third = vec![Change::put("c", &b"3"[..])];
    let c3 = apply(&mut s, 3, &third);
    let err = store.commit(&[batch(3, third)], &c3, None).unwrap_err();
    assert!(err.to_string().contains("an earlier commit"), "{err}");

    // What the store holds is the last whole commit.
    drop(store);
    assert_eq!(read_cursor(dir.path()).unwrap(), Some(c1));
    let store = LocalStore::open_durable(dir.path(), "p").unwrap();
    let loaded = store.load().unwrap().unwrap();
    assert!(loaded.intact());
    assert_eq!((loaded.cursor, &loaded.state), (c1, &whole));

    // In one process, a replace (a re-snapshot) starts a clean log: commits work again.
    let j = match &store {
        LocalStore::Durable(j) => j.clone(),
        LocalStore::Memory => unreachable!(),
    };
    j.lock().fail_after = Some(0);
    let fourth = vec![Change::put("d", &b"4"[..])];
    let mut t = whole.clone();
    let c4 = apply(&mut t, 2, &fourth);
    assert!(store
        .commit(&[batch(2, fourth.clone())], &c4, None)
        .is_err());
    store.replace(&whole, &c1).unwrap();
    store.commit(&[batch(2, fourth)], &c4, None).unwrap();
    drop((store, j));
    let loaded = reopened(dir.path());
    assert_eq!((loaded.cursor, &loaded.state), (c4, &t));
}

#[test]
fn a_second_open_of_the_same_directory_is_refused_while_the_first_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let first = LocalStore::open_durable(dir.path(), "p").unwrap();
    let err = LocalStore::open_durable(dir.path(), "p").unwrap_err();
    assert!(matches!(err, LocalError::Locked { .. }), "{err}");
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
    drop(first);
    LocalStore::open_durable(dir.path(), "p").unwrap();
}

#[test]
fn a_data_directory_of_another_pipeline_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(LocalStore::open_durable(dir.path(), "one").unwrap());
    let err = LocalStore::open_durable(dir.path(), "two").unwrap_err();
    assert!(matches!(err, LocalError::OtherPipeline { .. }), "{err}");
    assert!(err.to_string().contains("\"one\""), "{err}");
}

#[test]
fn a_record_that_does_not_match_its_digest_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open_durable(dir.path(), "p").unwrap();
    let mut s = State::new(L);
    let changes = vec![Change::put("a", &b"1"[..]), Change::put("b", &b"2"[..])];
    let cursor = apply(&mut s, 1, &changes);
    store.commit(&[batch(1, changes)], &cursor, None).unwrap();
    // A record claiming the same position over different entries: a tampered log.
    let tampered = vec![Change::put("a", &b"tampered"[..])];
    store.commit(&[batch(1, tampered)], &cursor, None).unwrap();
    drop(store);
    let store = LocalStore::open_durable(dir.path(), "p").unwrap();
    let loaded = store.load().unwrap().unwrap();
    assert!(!loaded.intact());
    assert_eq!(loaded.cursor, cursor);
    assert_ne!(loaded.computed, cursor.digest);
}

#[test]
fn records_larger_than_a_replay_piece_load_back_whole_and_a_bad_one_after_them_is_caught() {
    // Two records of 2.5 pieces each, the second overwriting and deleting keys of the first
    // on both sides of its piece boundaries; then a tampered record and a good one after it.
    let n = super::REPLAY_PIECE * 5 / 2;
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open_durable(dir.path(), "p").unwrap();
    let mut s = State::new(L);
    let first: Vec<Change> = (0..n)
        .map(|i| Change::put(format!("k{i}"), format!("a{i}").into_bytes()))
        .collect();
    let c1 = apply(&mut s, 1, &first);
    store.commit(&[batch(1, first)], &c1, None).unwrap();
    let second: Vec<Change> = (0..n)
        .map(|i| {
            let key = format!("k{}", (i * 7) % n);
            if i % 5 == 0 {
                Change::delete(key)
            } else {
                Change::put(key, format!("b{i}").into_bytes())
            }
        })
        .collect();
    let c2 = apply(&mut s, 2, &second);
    store.commit(&[batch(2, second)], &c2, None).unwrap();
    let loaded = store.load().unwrap().unwrap();
    assert!(loaded.intact());
    assert_eq!(loaded.cursor, c2);
    assert_eq!(loaded.state, s);

    // A record claiming position 3 with the digest of other entries, then a true record 4:
    // the load stops at the tampered one, whatever the reader has read past it.
    let whole = s.clone();
    let tampered = vec![Change::put("k1", &b"tampered"[..])];
    let mut other = s.clone();
    let c3 = apply(&mut other, 3, &[Change::put("k1", &b"true"[..])]);
    store.commit(&[batch(3, tampered)], &c3, None).unwrap();
    let fourth = vec![Change::put("k2", &b"after"[..])];
    let c4 = apply(&mut other, 4, &fourth);
    store.commit(&[batch(4, fourth)], &c4, None).unwrap();
    drop(store);
    let loaded = reopened(dir.path());
    assert!(!loaded.intact());
    assert_eq!(loaded.cursor, c3);
    assert_ne!(loaded.computed, c3.digest);
    assert_eq!(loaded.state.len(), whole.len());
    assert_eq!(
        loaded.state.get("k1").map(|v| v.to_vec()),
        Some(b"tampered".to_vec())
    );
    assert_eq!(
        loaded.state.get("k2").map(|v| v.to_vec()),
        whole.get("k2").map(|v| v.to_vec())
    );
}

#[test]
fn a_damaged_snapshot_marks_the_replica_for_repair_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open_durable(dir.path(), "p").unwrap();
    let mut s = State::new(L);
    let cursor = apply(&mut s, 1, &[Change::put("a", &b"1"[..])]);
    store.replace(&s, &cursor).unwrap();
    drop(store);
    let path = dir.path().join(SNAPSHOT_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 20;
    bytes[last] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let store = LocalStore::open_durable(dir.path(), "p").unwrap();
    let loaded = store.load().unwrap().unwrap();
    assert!(!loaded.intact());
    let why = loaded.cursor_error.unwrap();
    assert!(
        why.contains(SNAPSHOT_FILE) && why.contains("damaged"),
        "{why}"
    );
    assert!(loaded.state.is_empty());
}

#[test]
fn a_replace_writes_the_snapshot_and_drops_the_logs_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open_durable(dir.path(), "p").unwrap();
    let mut s = State::new(L);
    let c1 = apply(&mut s, 1, &[Change::put("a", &b"1"[..])]);
    store
        .commit(&[batch(1, vec![Change::put("a", &b"1"[..])])], &c1, None)
        .unwrap();
    let mut next = State::new(L);
    let entries: Vec<Change> = (0..5000)
        .map(|i| Change::put(format!("k{i}"), vec![i as u8; 40]))
        .collect();
    let c2 = apply(&mut next, 9, &entries);
    store.replace(&next, &c2).unwrap();
    assert_eq!(logs(dir.path()), vec![1], "only the log after the snapshot");
    let more = vec![Change::delete("k7")];
    let c3 = apply(&mut next, 10, &more);
    store.commit(&[batch(10, more)], &c3, None).unwrap();
    drop(store);
    let loaded = reopened(dir.path());
    assert!(loaded.intact());
    assert_eq!(loaded.cursor, c3);
    assert_eq!(loaded.state, next);
}

#[test]
fn a_background_snapshot_replaces_the_logs_and_a_crash_before_its_rename_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open_durable_with(dir.path(), "p", 1).unwrap();
    let mut s = State::new(L);
    let mut seq = 0;
    let mut last = None;
    for round in 0..3 {
        for _ in 0..4 {
            seq += 1;
            let changes: Vec<Change> = (0..50)
                .map(|i| Change::put(format!("k{}", (seq * 7 + i) % 300), vec![seq as u8; 30]))
                .collect();
            let cursor = apply(&mut s, seq, &changes);
            let snap = store.wants_snapshot(s.len()).then(|| s.clone());
            store.commit(&[batch(seq, changes)], &cursor, snap).unwrap();
            last = Some(cursor);
        }
        // Wait (bounded) for the snapshot thread.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while snapshot_running(&store) {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: no snapshot"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
    assert!(dir.path().join(SNAPSHOT_FILE).exists());
    drop(store);
    // What a crash mid-snapshot leaves: a partial temporary file.
    std::fs::write(dir.path().join(SNAPSHOT_TMP), b"partial").unwrap();
    let store = LocalStore::open_durable(dir.path(), "p").unwrap();
    assert!(!dir.path().join(SNAPSHOT_TMP).exists());
    let loaded = store.load().unwrap().unwrap();
    assert!(loaded.intact());
    assert_eq!(Some(loaded.cursor), last);
    assert_eq!(loaded.state, s);
    assert!(
        logs(dir.path()).len() <= 3,
        "covered logs are removed: {:?}",
        logs(dir.path())
    );
}

#[test]
fn dump_reads_entries_in_key_order_and_says_when_there_is_no_replica() {
    let dir = tempfile::tempdir().unwrap();
    let err = for_each_entry(&dir.path().join("none"), |_, _| Ok(())).unwrap_err();
    assert!(matches!(err, DumpError::NoReplica { .. }), "{err}");
    let store = LocalStore::open_durable(dir.path(), "p").unwrap();
    let mut s = State::new(L);
    let changes = vec![
        Change::put("b", &b"2"[..]),
        Change::put("a", &b"1"[..]),
        Change::put("c", &b"3"[..]),
    ];
    let cursor = apply(&mut s, 1, &changes);
    store.commit(&[batch(1, changes)], &cursor, None).unwrap();
    let mut seen = Vec::new();
    let at = for_each_entry(dir.path(), |k, v| {
        seen.push((k.to_owned(), v.to_vec()));
        Ok(())
    })
    .unwrap();
    assert_eq!(at, Some(cursor));
    let keys: Vec<&str> = seen.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["a", "b", "c"]);
}

/// One step of a hostile history.
#[derive(Debug, Clone)]
enum Op {
    /// Commit `n` changes over a small key space (puts and deletes).
    Commit { n: usize, salt: u8 },
    /// Commit and hand the store a clone for a local snapshot when it wants one.
    CommitWithSnapshot { n: usize, salt: u8 },
    /// Replace the replica with a fresh state (a re-snapshot).
    Replace { n: usize, salt: u8 },
    /// Close and reopen cleanly.
    Reopen,
    /// Close, cut the newest log at a fraction of its last record, reopen: a crash
    /// mid-append. The model forgets the last commit only if it was cut.
    Crash { cut: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..30, any::<u8>()).prop_map(|(n, salt)| Op::Commit { n, salt }),
        2 => (1usize..30, any::<u8>()).prop_map(|(n, salt)| Op::CommitWithSnapshot { n, salt }),
        1 => (0usize..40, any::<u8>()).prop_map(|(n, salt)| Op::Replace { n, salt }),
        1 => Just(Op::Reopen),
        2 => any::<u8>().prop_map(|cut| Op::Crash { cut }),
    ]
}

fn changes(n: usize, salt: u8, seq: u64) -> Vec<Change> {
    (0..n)
        .map(|i| {
            let key = format!("k{}", (i * 13 + salt as usize) % 40);
            if (i + salt as usize).is_multiple_of(5) {
                Change::delete(key)
            } else {
                Change::put(key, vec![salt ^ seq as u8; (i + salt as usize) % 9])
            }
        })
        .collect()
}

fn newest_log(dir: &Path) -> PathBuf {
    Files::scan(dir).unwrap().logs.last().unwrap().1.clone()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the history, a load gives the last state whose commit returned, unless a
    /// crash cut that commit's record, in which case it gives the state before it; never a
    /// state that was not committed, never a broken digest.
    #[test]
    fn a_load_always_returns_the_last_whole_commit(ops in proptest::collection::vec(op(), 1..25)) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Some(LocalStore::open_durable_with(dir.path(), "p", 256).unwrap());
        let mut model = State::new(L);
        let mut durable: Option<(State, Position)> = None;
        let mut previous: Option<(State, Position)> = None;
        let mut last_was_commit = false;
        let mut seq = 0;
        for op in ops {
            let st = store.as_ref().unwrap();
            match op {
                Op::Commit { n, salt } | Op::CommitWithSnapshot { n, salt } => {
                    seq += 1;
                    let cs = changes(n, salt, seq);
                    let cursor = apply(&mut model, seq, &cs);
                    let snap = matches!(op, Op::CommitWithSnapshot { .. })
                        .then(|| st.wants_snapshot(model.len()).then(|| model.clone()))
                        .flatten();
                    st.commit(&[batch(seq, cs)], &cursor, snap).unwrap();
                    previous = durable.replace((model.clone(), cursor));
                    last_was_commit = true;
                }
                Op::Replace { n, salt } => {
                    seq += 1;
                    let mut next = State::new(L);
                    let cursor = apply(&mut next, seq, &changes(n, salt, seq));
                    st.replace(&next, &cursor).unwrap();
                    model = next;
                    durable = Some((model.clone(), cursor));
                    previous = None;
                    last_was_commit = false;
                }
                Op::Reopen => {
                    drop(store.take());
                    store = Some(LocalStore::open_durable_with(dir.path(), "p", 256).unwrap());
                    last_was_commit = false;
                }
                Op::Crash { cut } => {
                    drop(store.take()); // joins a background snapshot: the files are as a crash left them
                    let path = newest_log(dir.path());
                    let len = std::fs::metadata(&path).unwrap().len();
                    // Cut inside the last record when the newest log holds the last commit.
                    let mut torn = false;
                    if last_was_commit {
                        let bytes = std::fs::read(&path).unwrap();
                        let mut r = Records::new(&bytes[..]);
                        let mut starts = Vec::new();
                        loop {
                            let at = r.offset;
                            match r.read().unwrap() {
                                Ok(Some(_)) => starts.push(at),
                                _ => break,
                            }
                        }
                        if starts.len() > 1 {
                            let start = *starts.last().unwrap();
                            let at = start + (len - start) * cut as u64 / 256;
                            std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(at).unwrap();
                            torn = at < len;
                        }
                    }
                    if torn {
                        durable = previous.take();
                        if let Some((s, _)) = &durable {
                            model = s.clone();
                        } else {
                            model = State::new(L);
                        }
                    }
                    store = Some(LocalStore::open_durable_with(dir.path(), "p", 256).unwrap());
                    last_was_commit = false;
                }
            }
            let loaded = store.as_ref().unwrap().load().unwrap();
            match (&durable, loaded) {
                (None, None) => {}
                (Some((s, c)), Some(l)) => {
                    prop_assert!(l.intact(), "a broken replica after {:?}", c);
                    prop_assert_eq!(&l.cursor, c);
                    prop_assert_eq!(&l.state, s);
                }
                (d, l) => prop_assert!(false, "model {:?}, loaded {:?}", d.as_ref().map(|x| x.1), l.map(|x| x.cursor)),
            }
        }
    }
}
