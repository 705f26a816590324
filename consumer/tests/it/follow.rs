//! Bootstrap, following, restart and `--once`, against a real nats-server.
//!
//! Talks to nats-server through the test producer in `support` and the consumer library.

use crate::support::*;
use deltasync_consumer::{BatchKind, Reason};
use deltasync_core::Change;
use std::collections::BTreeMap;

fn reasons(pairs: &[(Reason, u64)]) -> BTreeMap<String, u64> {
    pairs
        .iter()
        .map(|(r, n)| (r.as_str().to_owned(), *n))
        .collect()
}

#[tokio::test]
async fn a_new_replica_bootstraps_from_the_snapshot_then_follows_the_tail() {
    logs();
    let mut p = Pipeline::start("boot", |_| {}).await;
    p.commit(puts(0, 3000, 1)).await;
    p.churn(20, 50, 3000, 2).await;
    let m = p.snapshot().await;
    p.churn(30, 50, 3000, 3).await;
    p.commit(vec![Change::delete(key(5))]).await;

    let dir = tempfile::tempdir().unwrap();
    let c = Running::start(p.consumer_settings(), durable("boot-1", dir.path()));
    let s = c.wait_for(&p).await;
    assert_eq!(s.digest, p.state.digest().to_hex());
    assert_eq!(s.entries, p.state.len());
    assert_eq!(s.decisions, reasons(&[(Reason::Bootstrap, 1)]));
    assert_whole_snapshot(s.snapshot_bytes_fetched, &m);
    assert_eq!(
        s.envelopes_applied, 31,
        "only the envelopes after the snapshot"
    );
    assert!(s.bootstrapped && s.ready);
    let last = s.last_resync.unwrap();
    assert_eq!((last.reason, last.seq), (Reason::Bootstrap, m.seq));
    assert_same_state(&c.replica, &p);

    // And it keeps following.
    p.churn(10, 20, 3000, 4).await;
    c.wait_for(&p).await;
    assert_same_state(&c.replica, &p);
    c.stop().await;
}

#[tokio::test]
async fn a_restart_resumes_from_the_local_cursor_without_downloading_a_snapshot() {
    logs();
    let mut p = Pipeline::start("resume", |_| {}).await;
    p.commit(puts(0, 2000, 1)).await;
    p.snapshot().await;
    p.churn(10, 20, 2000, 2).await;

    let dir = tempfile::tempdir().unwrap();
    let c = Running::start(p.consumer_settings(), durable("resume-1", dir.path()));
    c.wait_for(&p).await;
    let outcome = c.stop().await;
    assert_eq!(outcome.cursor.seq, p.state.seq());

    // More history and a newer snapshot while it is down.
    p.churn(25, 20, 2000, 3).await;
    p.snapshot().await;
    p.churn(5, 20, 2000, 4).await;

    let c = Running::start(p.consumer_settings(), durable("resume-1", dir.path()));
    let s = c.wait_for(&p).await;
    assert_eq!(s.snapshot_bytes_fetched, 0, "no snapshot downloaded");
    assert_eq!(s.decisions, reasons(&[(Reason::Resume, 1)]));
    assert_eq!(
        s.envelopes_applied, 30,
        "exactly the envelopes after the cursor"
    );
    assert!(s.last_resync.is_none());
    assert_same_state(&c.replica, &p);
    c.stop().await;
}

#[tokio::test]
async fn an_ephemeral_replica_bootstraps_from_the_snapshot_at_every_start() {
    logs();
    let mut p = Pipeline::start("ephemeral", |_| {}).await;
    p.commit(puts(0, 1000, 1)).await;
    let m = p.snapshot().await;
    p.churn(5, 10, 1000, 2).await;
    for _ in 0..2 {
        let c = Running::start(p.consumer_settings(), ephemeral("eph-1"));
        let s = c.wait_for(&p).await;
        assert_eq!(s.decisions, reasons(&[(Reason::Bootstrap, 1)]));
        assert_whole_snapshot(s.snapshot_bytes_fetched, &m);
        assert!(!s.durable);
        assert_same_state(&c.replica, &p);
        c.stop().await;
    }
}

#[tokio::test]
async fn once_catches_up_to_the_head_at_start_commits_and_returns() {
    logs();
    let mut p = Pipeline::start("once", |_| {}).await;
    p.commit(puts(0, 500, 1)).await;
    p.snapshot().await;
    p.churn(40, 10, 500, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let mut options = durable("once-1", dir.path());
    options.once = true;
    let outcome = Running::start(p.consumer_settings(), options.clone())
        .join()
        .await
        .unwrap();
    assert_eq!(outcome.cursor.seq, p.state.seq());
    assert_eq!(outcome.cursor.digest, p.state.digest());
    let on_disk = deltasync_consumer::local::read_cursor(dir.path())
        .unwrap()
        .unwrap();
    assert_eq!(on_disk, outcome.cursor, "committed before returning");

    // A second run with nothing new returns at once, at the same place.
    let outcome = Running::start(p.consumer_settings(), options)
        .join()
        .await
        .unwrap();
    assert_eq!(outcome.cursor.seq, p.state.seq());
}

#[tokio::test]
async fn subscribers_see_every_committed_transaction_in_order_and_multi_part_ones_whole() {
    logs();
    let mut p = Pipeline::start("events", |_| {}).await;
    p.commit(puts(0, 100, 1)).await;
    p.snapshot().await;
    let c = Running::start(p.consumer_settings(), ephemeral("events-1"));
    let mut rx = c.replica.subscribe();
    c.wait_for(&p).await;
    let from = p.state.seq();
    p.churn(20, 5, 100, 2).await;
    // One transaction split into several parts: delivered as one batch.
    let parts = p.commit_split(puts(1000, 300, 3), 4 * 1024).await;
    assert!(parts.len() > 3);
    c.wait_for(&p).await;

    let mut seqs = Vec::new();
    let mut big = 0;
    while seqs.last() != Some(&p.state.seq()) {
        let b = rx.recv().await.unwrap();
        if b.kind == BatchKind::Applied {
            assert_eq!(
                b.prev_seq
                    + if b.changes.len() == 300 {
                        parts.len() as u64
                    } else {
                        1
                    },
                b.seq
            );
            if b.changes.len() == 300 {
                big += 1;
            }
            seqs.push(b.seq);
        }
    }
    let expected: Vec<u64> = (from + 1..=from + 20).chain([p.state.seq()]).collect();
    assert_eq!(seqs, expected);
    assert_eq!(big, 1);
    c.stop().await;
}

#[tokio::test]
async fn a_reader_that_goes_silent_while_the_stream_holds_more_is_reopened() {
    // An ordered consumer can stop delivering without an error (seen after an R3 stream
    // leader was killed: heartbeats, no messages). Pausing it on the server reproduces that
    // exactly: the engine must notice from the stream's bounds and read from a new one.
    logs();
    let mut p = Pipeline::start("stall", |_| {}).await;
    p.commit(puts(0, 100, 1)).await;
    let c = Running::start(p.consumer_settings(), ephemeral("stall-1"));
    c.wait_for(&p).await;

    let stream =
        p.js.get_stream(deltasync_core::names::stream_name(&p.settings.pipeline))
            .await
            .unwrap();
    let mut infos = stream.consumers();
    let mut paused = Vec::new();
    while let Some(info) = futures::StreamExt::next(&mut infos).await {
        let info = info.unwrap();
        if info.config.durable_name.is_none() {
            let until = async_nats::datetime::add_std_duration(
                async_nats::datetime::now(),
                std::time::Duration::from_secs(3600),
            )
            .unwrap();
            let r = stream.pause_consumer(&info.name, until).await.unwrap();
            assert!(r.paused, "{} paused", info.name);
            paused.push(info.name);
        }
    }
    assert!(
        !paused.is_empty(),
        "the ordered consumer reading the stream is found"
    );

    p.churn(5, 10, 100, 2).await;
    let s = c.wait_for(&p).await;
    assert!(
        s.reader_stalls >= 1,
        "caught up through a reopened reader: {s:#?}"
    );
    assert_same_state(&c.replica, &p);
    c.stop().await;
}

/// Every change of the status wakes `Replica::wait_until`, also one no applied envelope
/// follows. A replica of a pipeline without any history has decided to bootstrap and waits
/// for the first envelope: it is not bootstrapped, so nothing else (a commit, the headroom's
/// periodic judgement) would wake a waiter. The decision, then a foreign message counted, must
/// each wake it at once (well within the short deadline here).
#[tokio::test]
async fn status_waiters_wake_for_a_decision_and_a_foreign_message_that_no_envelope_follows() {
    logs();
    let mut p = Pipeline::start("wake", |_| {}).await;
    let c = Running::start(p.consumer_settings(), ephemeral("wake-1"));
    let short = std::time::Duration::from_secs(20);
    let bootstrap = Reason::Bootstrap.as_str();
    let s = c
        .replica
        .wait_until(short, |s| s.decisions.contains_key(bootstrap))
        .await
        .unwrap_or_else(|s| panic!("the bootstrap decision woke no waiter: {s:#?}"));
    assert!(!s.bootstrapped, "no history to load: {s:#?}");

    // Once its stream reader is open (an ordered consumer on the server), the replica reads
    // what is published next; before, its plan could already count the message as seen.
    let stream =
        p.js.get_stream(deltasync_core::names::stream_name(&p.settings.pipeline))
            .await
            .unwrap();
    let start = std::time::Instant::now();
    loop {
        let mut infos = stream.consumers();
        let mut reading = false;
        while let Some(info) = futures::StreamExt::next(&mut infos).await {
            reading |= info.unwrap().config.durable_name.is_none();
        }
        if reading {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "the replica opened no reader");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    p.publish_raw(b"definitely not an envelope".to_vec()).await;
    let s = c
        .replica
        .wait_until(short, |s| s.foreign_messages >= 1)
        .await
        .unwrap_or_else(|s| panic!("the foreign message woke no waiter: {s:#?}"));
    assert_eq!(s.decisions, reasons(&[(Reason::Bootstrap, 1)]));
    assert!(
        !s.bootstrapped,
        "still waiting for the first envelope: {s:#?}"
    );

    // The pipeline's first envelope is then followed.
    p.commit(vec![Change::put("a", &b"1"[..])]).await;
    c.wait_for(&p).await;
    assert_same_state(&c.replica, &p);
    c.stop().await;
}
