//! Every path that breaks continuity, against a real nats-server: pruned positions, lineage
//! changes, gaps, foreign messages, a replica changed on disk, and the bytes an incremental
//! re-snapshot downloads.
//!
//! Talks to nats-server through the test producer in `support` (which deletes messages and
//! publishes garbage where a test needs it), the consumer library and, for a gap, the
//! `deltasync-consumer` binary; edits the replica's log file directly.

use crate::support::*;
use deltasync_consumer::local::{format, read_cursor};
use deltasync_consumer::Reason;
use deltasync_core::Change;
use std::io::Write as _;

fn decided(s: &deltasync_consumer::Status, r: Reason) -> u64 {
    s.decisions.get(r.as_str()).copied().unwrap_or(0)
}

/// One lineage change was recorded, it restored `m`, and it kept the replica's state for the
/// re-snapshot: only the differing ranges were fetched (less than half of the snapshot).
fn assert_one_lineage_change_fetching_only_what_differs(
    s: &deltasync_consumer::Status,
    m: &deltasync_core::snapshot::Manifest,
) {
    assert_eq!(decided(s, Reason::LineageChanged), 1, "{:?}", s.decisions);
    let last = s.last_resync.clone().unwrap();
    assert_eq!((last.reason, last.seq), (Reason::LineageChanged, m.seq));
    assert!(
        last.bytes_fetched * 2 < m.total_bytes(),
        "only the differing ranges: {} of {} bytes",
        last.bytes_fetched,
        m.total_bytes()
    );
}

#[tokio::test]
async fn a_pruned_position_leads_to_a_resnapshot_with_reason_pruned_and_the_exact_state() {
    logs();
    let mut p = Pipeline::start("pruned", |s| {
        s.stream.max_messages = 50;
        s.snapshot.every_envelopes = 25;
    })
    .await;
    p.commit(puts(0, 2000, 1)).await;
    p.snapshot().await;
    p.churn(10, 20, 2000, 2).await;

    let dir = tempfile::tempdir().unwrap();
    let c = Running::start(p.consumer_settings(), durable("pruned-1", dir.path()));
    c.wait_for(&p).await;
    c.stop().await;

    // 200 envelopes while the replica is down: the stream keeps only the last 50.
    p.churn(120, 10, 2000, 3).await;
    let m = p.snapshot().await;
    p.churn(10, 10, 2000, 4).await;
    let (first, _) = p.bounds().await;
    assert!(
        first > 20,
        "the replica's position was pruned (first retained {first})"
    );

    let c = Running::start(p.consumer_settings(), durable("pruned-1", dir.path()));
    let s = c.wait_for(&p).await;
    assert_eq!(decided(&s, Reason::Pruned), 1, "{:?}", s.decisions);
    assert_eq!(decided(&s, Reason::Resume), 0);
    let last = s.last_resync.clone().unwrap();
    assert_eq!((last.reason, last.seq), (Reason::Pruned, m.seq));
    assert!(last.bytes_fetched > 0);
    assert_same_state(&c.replica, &p);
    c.stop().await;

    // What is on disk is that exact state too.
    let again = Running::start(p.consumer_settings(), durable("pruned-1", dir.path()));
    let s = again
        .wait_until(|s| s.seq == p.state.seq() && !s.decisions.is_empty())
        .await;
    assert_eq!(s.decisions.get("resume"), Some(&1), "{:?}", s.decisions);
    assert_same_state(&again.replica, &p);
    again.stop().await;
}

#[tokio::test]
async fn a_lineage_change_in_the_stream_is_followed_from_its_first_envelope() {
    logs();
    let mut p = Pipeline::start("lineage-live", |_| {}).await;
    p.commit(puts(0, 300, 1)).await;
    p.snapshot().await;
    let c = Running::start(p.consumer_settings(), ephemeral("ll-1"));
    c.wait_for(&p).await;
    let old = p.state.lineage();

    p.new_lineage();
    p.commit(puts(100, 300, 2)).await;
    p.churn(5, 10, 400, 3).await;
    let s = c.wait_for(&p).await;
    assert_ne!(p.state.lineage(), old);
    assert_eq!(decided(&s, Reason::LineageChanged), 1, "{:?}", s.decisions);
    assert_eq!(s.last_resync.unwrap().reason, Reason::LineageChanged);
    assert_same_state(&c.replica, &p);
    c.stop().await;
}

#[tokio::test]
async fn a_lineage_start_marker_of_a_state_the_replica_lacks_waits_for_its_snapshot_and_fetches_only_what_differs(
) {
    logs();
    let mut p = Pipeline::start("marker-lacks", |_| {}).await;
    p.commit(puts(0, 3000, 1)).await;
    p.snapshot().await;
    let c = Running::start(p.consumer_settings(), ephemeral("ml-1"));
    c.wait_for(&p).await;

    // A new lineage starts from a state holding changes never published in the stream (the
    // replica cannot have them): its marker first, its snapshot only a moment later.
    p.new_lineage_keeping_state();
    let _ = p.state.apply_changes(&puts(0, 3, 9));
    p.commit(vec![]).await;
    assert_eq!(
        p.state.seq(),
        1,
        "the marker is envelope 1 of the new lineage"
    );
    // The replica met the marker and waits for the new lineage's snapshot.
    c.wait_until(|s| decided(s, Reason::LineageChanged) >= 1)
        .await;
    let m = p.snapshot().await;
    p.churn(3, 5, 3000, 5).await;

    let s = c.wait_for(&p).await;
    assert_one_lineage_change_fetching_only_what_differs(&s, &m);
    assert_same_state(&c.replica, &p);
    c.stop().await;
}

#[tokio::test]
async fn a_lineage_change_while_stopped_resyncs_to_the_new_lineages_snapshot() {
    logs();
    let mut p = Pipeline::start("lineage", |_| {}).await;
    p.commit(puts(0, 3000, 1)).await;
    p.snapshot().await;
    let dir = tempfile::tempdir().unwrap();
    let c = Running::start(p.consumer_settings(), durable("lin-1", dir.path()));
    c.wait_for(&p).await;
    c.stop().await;

    // The new lineage starts from a state that shares most entries with the old one.
    p.new_lineage();
    let mut changes = puts(0, 3000, 1);
    changes.extend(puts(0, 3, 9));
    p.commit(changes).await;
    let m = p.snapshot().await;
    p.churn(3, 5, 3000, 5).await;

    let c = Running::start(p.consumer_settings(), durable("lin-1", dir.path()));
    let s = c.wait_for(&p).await;
    assert_one_lineage_change_fetching_only_what_differs(&s, &m);
    assert_same_state(&c.replica, &p);
    c.stop().await;
}

#[tokio::test]
async fn a_message_deleted_from_the_middle_of_the_stream_is_a_gap_that_is_resnapshotted() {
    logs();
    let mut p = Pipeline::start("gap", |_| {}).await;
    p.commit(puts(0, 500, 1)).await;
    p.snapshot().await;
    let dir = tempfile::tempdir().unwrap();
    let c = Running::start(p.consumer_settings(), durable("gap-1", dir.path()));
    c.wait_for(&p).await;
    c.stop().await;

    let mut seqs = Vec::new();
    for i in 0..10 {
        seqs.push(p.commit(vec![Change::put(key(i), value(7, i))]).await);
    }
    p.delete_message(seqs[4]).await;
    let m = p.snapshot().await;
    p.commit(vec![Change::put("after", &b"1"[..])]).await;

    let c = Running::start(p.consumer_settings(), durable("gap-1", dir.path()));
    let s = c.wait_for(&p).await;
    assert_eq!(decided(&s, Reason::Resume), 1, "{:?}", s.decisions);
    assert_eq!(decided(&s, Reason::Gap), 1, "{:?}", s.decisions);
    let last = s.last_resync.clone().unwrap();
    assert_eq!((last.reason, last.seq), (Reason::Gap, m.seq));
    assert_eq!(
        s.envelopes_applied, 5,
        "4 envelopes before the gap, then 1 after the snapshot"
    );
    assert_same_state(&c.replica, &p);
    c.stop().await;
}

/// Polls the status of the consumer process on `port` until `done` holds.
async fn poll_status(port: u16, what: &str, mut done: impl FnMut(&serde_json::Value) -> bool) {
    let start = std::time::Instant::now();
    loop {
        let s = status_of(port).await;
        if s.as_ref().is_some_and(&mut done) {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "{what}; last status: {s:#?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn through_the_binary_a_gap_waits_for_a_snapshot_past_it_instead_of_going_back() {
    logs();
    let mut p = Pipeline::start("gapwait", |_| {}).await;
    p.commit(puts(0, 500, 1)).await;
    let old = p.snapshot().await;
    for i in 0..5 {
        p.commit(vec![Change::put(key(i), value(3, i))]).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = deltasync_testkit::free_port();
    let env = [("DELTASYNC_CONSUMER__RESYNC_MAX_ATTEMPTS", "8")];
    let head = p.state.seq();
    {
        let _first = Killed(
            consumer_process(&p, "gapwait-1", dir.path(), port, &env)
                .stderr(std::process::Stdio::inherit())
                .spawn()
                .expect("the consumer binary starts"),
        );
        poll_status(port, "the first run reaches the head", |s| {
            s["seq"].as_u64() == Some(head)
        })
        .await;
    } // killed: the status shows only durable positions

    // While it is down: 10 envelopes, the 5th deleted. The only snapshot is older than all.
    let mut seqs = Vec::new();
    for i in 0..10 {
        seqs.push(p.commit(vec![Change::put(key(i), value(4, i))]).await);
    }
    p.delete_message(seqs[4]).await;
    let at_hole = head + 4;

    let logs_dir = tempfile::tempdir().unwrap();
    let log_path = logs_dir.path().join("consumer.stderr");
    let _second = Killed(
        consumer_process(&p, "gapwait-1", dir.path(), port, &env)
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .expect("the consumer binary starts"),
    );
    // It resumes, meets the hole and refuses the older snapshot, saying why.
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .contains("not past the replica's verified")
    {
        assert!(
            start.elapsed() < DEADLINE,
            "the older snapshot (envelope {}) is refused with a warning; log:\n{}",
            old.seq,
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let s = status_of(port).await.expect("it serves its status");
    assert_eq!(
        s["seq"].as_u64(),
        Some(at_hole),
        "it stays where it was: {s:#}"
    );

    // A snapshot past the hole lands: it takes that one.
    let m = p.snapshot().await;
    let last = p.state.seq();
    poll_status(
        port,
        "it resyncs to the new snapshot and reaches the head",
        |s| s["seq"].as_u64() == Some(last) && s["last_resync"]["reason"] == "gap",
    )
    .await;
    let s = status_of(port).await.unwrap();
    assert_eq!(
        s["last_resync"]["from_seq"].as_u64(),
        Some(at_hole),
        "{s:#}"
    );
    assert_eq!(s["last_resync"]["seq"].as_u64(), Some(m.seq), "{s:#}");
    assert_eq!(s["decisions"]["gap"].as_u64(), Some(1), "{s:#}");
    assert_eq!(s["digest"], p.state.digest().to_hex(), "{s:#}");
}

#[tokio::test]
async fn a_foreign_message_is_counted_and_skipped_without_a_resync() {
    logs();
    let mut p = Pipeline::start("foreign", |_| {}).await;
    p.commit(puts(0, 100, 1)).await;
    p.snapshot().await;
    let c = Running::start(p.consumer_settings(), ephemeral("foreign-1"));
    c.wait_for(&p).await;
    p.commit(vec![Change::put("a", &b"1"[..])]).await;
    p.publish_raw(b"definitely not an envelope".to_vec()).await;
    let mut bad_version = deltasync_core::codec::encode_envelope(&deltasync_core::Envelope {
        lineage: p.state.lineage(),
        seq: p.state.seq() + 1,
        part: 1,
        parts: 1,
        digest: p.state.digest(),
        produced_at_ms: 0,
        changes: vec![],
    })
    .unwrap();
    bad_version[4] = 99;
    p.publish_raw(bad_version).await;
    p.commit(vec![Change::put("b", &b"2"[..])]).await;
    let s = c.wait_for(&p).await;
    assert_eq!(s.foreign_messages, 2);
    assert_eq!(s.decisions.len(), 1, "no resync: {:?}", s.decisions);
    assert_same_state(&c.replica, &p);
    assert!(c
        .replica
        .metrics_text()
        .contains("deltasync_consumer_foreign_messages_total 2"));
    c.stop().await;
}

#[tokio::test]
async fn a_replica_changed_on_disk_is_caught_by_its_digest_and_repaired_incrementally() {
    logs();
    let mut p = Pipeline::start("tamper", |_| {}).await;
    p.commit(puts(0, 4000, 1)).await;
    let m = p.snapshot().await;
    let dir = tempfile::tempdir().unwrap();
    let c = Running::start(p.consumer_settings(), durable("tamper-1", dir.path()));
    c.wait_for(&p).await;
    c.stop().await;

    // Change one value and add one key while the consumer is stopped: a well-formed record
    // appended to the newest log that claims the replica's position is unchanged.
    {
        let cursor = read_cursor(dir.path()).unwrap().expect("a cursor on disk");
        let newest = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("log."))
            .max()
            .expect("a log");
        let tampered = [
            Change::put(key(17), &b"tampered"[..]),
            Change::put("intruder", &b"x"[..]),
        ];
        let mut record = Vec::new();
        format::commit(&mut record, &cursor, tampered.len(), tampered.iter());
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(newest)
            .unwrap();
        f.write_all(&record).unwrap();
        f.sync_all().unwrap();
    }

    let c = Running::start(p.consumer_settings(), durable("tamper-1", dir.path()));
    let s = c.wait_for(&p).await;
    assert_eq!(decided(&s, Reason::CorruptLocal), 1, "{:?}", s.decisions);
    let last = s.last_resync.clone().unwrap();
    assert_eq!(last.reason, Reason::CorruptLocal);
    assert!(last.ranges_rebuilt <= 2, "{last:?}");
    assert!(
        last.bytes_fetched * 5 < m.total_bytes(),
        "fetched {} of {} bytes",
        last.bytes_fetched,
        m.total_bytes()
    );
    assert_same_state(&c.replica, &p);
    c.stop().await;

    // The repair is on disk: the next start resumes.
    let c = Running::start(p.consumer_settings(), durable("tamper-1", dir.path()));
    let s = c.wait_for(&p).await;
    assert_eq!(decided(&s, Reason::Resume), 1, "{:?}", s.decisions);
    assert_eq!(
        c.replica.get(&key(17)),
        p.state.get(&key(17)).map(bytes::Bytes::copy_from_slice)
    );
    assert_eq!(c.replica.get("intruder"), None);
    c.stop().await;
}

#[tokio::test]
async fn an_incremental_resnapshot_downloads_only_what_differs() {
    logs();
    let mut p = Pipeline::start("incremental", |s| {
        s.stream.max_messages = 60;
        s.snapshot.every_envelopes = 30;
    })
    .await;
    p.commit(puts(0, 20_000, 1)).await;
    let full = p.snapshot().await;
    let dir = tempfile::tempdir().unwrap();
    let c = Running::start(p.consumer_settings(), durable("incr-1", dir.path()));
    let s = c.wait_for(&p).await;
    assert_whole_snapshot(s.snapshot_bytes_fetched, &full);
    c.stop().await;

    // A little churn, long enough to prune the replica's position, then a new snapshot.
    p.churn(100, 2, 20_000, 2).await;
    let m = p.snapshot().await;
    assert!(full.total_bytes() > 1_000_000);

    let c = Running::start(p.consumer_settings(), durable("incr-1", dir.path()));
    let s = c.wait_for(&p).await;
    assert_eq!(decided(&s, Reason::Pruned), 1, "{:?}", s.decisions);
    let last = s.last_resync.clone().unwrap();
    assert!(
        last.bytes_fetched * 20 < m.total_bytes(),
        "fetched {} bytes of a {}-byte snapshot ({last:?})",
        last.bytes_fetched,
        m.total_bytes()
    );
    eprintln!(
        "incremental re-snapshot fetched {} of {} bytes ({} ranges, {} segments)",
        last.bytes_fetched,
        m.total_bytes(),
        last.ranges_rebuilt,
        last.segments_applied
    );
    assert_same_state(&c.replica, &p);
    c.stop().await;
}

#[tokio::test]
async fn a_replica_that_cannot_keep_up_says_so_after_bounded_attempts() {
    logs();
    let mut p = Pipeline::start("behind", |s| {
        s.stream.max_messages = 20;
        s.snapshot.every_envelopes = 10;
    })
    .await;
    p.commit(puts(0, 100, 1)).await;
    p.snapshot().await;
    // The snapshot's next envelope is pruned and no newer snapshot is written.
    p.churn(40, 1, 100, 2).await;
    let mut s = p.consumer_settings();
    s.consumer.resync_max_attempts = 2;
    let err = Running::start(s, ephemeral("behind-1"))
        .join()
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("cannot keep up"), "{text}");
    assert!(text.contains("pruned"), "{text}");
}
