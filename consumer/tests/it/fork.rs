//! Forked histories and streams that lose their past, against a real nats-server: a
//! producer that reuses a sequence number (as one that recovered a shorter history would), a
//! stream purged entirely, a stream deleted and recreated behind a surviving bucket and a
//! surviving replica, and a stream whose last message was deleted.
//!
//! Talks to nats-server through the test producer in `support` (raw envelopes, purges, stream
//! deletion) and the consumer library. Reasons are asserted by their label (`fork`) through
//! the status, as an operator reads them.

use crate::support::*;
use deltasync_core::Change;

fn decided(s: &deltasync_consumer::Status, label: &str) -> u64 {
    s.decisions.get(label).copied().unwrap_or(0)
}

/// Issue 11, reproduction 2, consumer side: replica A holds {a, b} at sequence 2; the
/// producer then recovers at sequence 1 (what followed was lost) and publishes a different
/// sequence 2. A must not keep {a, b} as if it had that envelope already.
#[tokio::test]
async fn a_different_envelope_reusing_the_replicas_sequence_at_a_later_position_is_a_fork() {
    logs();
    let mut p = Pipeline::start("fork-reuse", |_| {}).await;
    p.commit(vec![Change::put("a", &b"1"[..])]).await;
    p.snapshot().await;
    let at_1 = p.state.clone();
    p.commit(vec![Change::put("b", &b"2"[..])]).await;

    let a = Running::start(p.consumer_settings(), ephemeral("fork-a"));
    a.wait_for(&p).await;
    let old_digest = p.state.digest();

    // The producer's history after its snapshot is gone (aged out), it recovers at 1 and
    // publishes another sequence 2 — then one more transaction.
    p.delete_message(1).await;
    p.delete_message(2).await;
    p.state = at_1;
    p.commit(vec![Change::put("d", &b"4"[..])]).await;
    assert_eq!(p.state.seq(), 2);
    assert_ne!(
        p.state.digest(),
        old_digest,
        "another history at sequence 2"
    );
    let s = a
        .wait_until(|s| decided(s, "fork") >= 1 && s.digest == p.state.digest().to_string())
        .await;
    assert_eq!(s.last_resync.as_ref().unwrap().reason.as_str(), "fork");
    assert_same_state(&a.replica, &p);
    assert!(
        a.replica.view().get("b").is_none(),
        "the forked-away key is gone"
    );

    p.commit(vec![Change::put("e", &b"5"[..])]).await;
    a.wait_for(&p).await;
    assert_same_state(&a.replica, &p);
    let metrics = a.replica.metrics_text();
    assert!(
        metrics.contains(r#"deltasync_consumer_resyncs_total{reason="fork"} 1"#),
        "{metrics}"
    );

    // A new replica gets the same history.
    let b = Running::start(p.consumer_settings(), ephemeral("fork-b"));
    b.wait_for(&p).await;
    assert_same_state(&b.replica, &p);
    a.stop().await;
    b.stop().await;
}

/// The whole stream purged under a running replica, then a producer that recovered from the
/// bucket's older snapshot publishes sequences the replica already has.
#[tokio::test]
async fn a_purged_stream_continued_from_an_older_snapshot_is_a_fork() {
    logs();
    let mut p = Pipeline::start("fork-purge", |_| {}).await;
    p.commit(puts(0, 50, 1)).await;
    p.snapshot().await;
    let at_1 = p.state.clone();
    p.commit(puts(50, 10, 2)).await;
    p.commit(puts(60, 10, 3)).await;
    let dir = tempfile::tempdir().unwrap();
    let a = Running::start(p.consumer_settings(), durable("purge-a", dir.path()));
    a.wait_for(&p).await;

    p.purge().await;
    p.state = at_1;
    p.commit(puts(0, 5, 7)).await; // sequence 2 again, another digest
    p.commit(puts(5, 5, 7)).await; // sequence 3 again
    let s = a
        .wait_until(|s| decided(s, "fork") >= 1 && s.digest == p.state.digest().to_string())
        .await;
    assert_eq!(s.seq, 3);
    assert_eq!(s.last_resync.as_ref().unwrap().reason.as_str(), "fork");
    assert_same_state(&a.replica, &p);
    a.stop().await;
}

/// The stream deleted and recreated while a durable replica is stopped; the bucket survives
/// and a producer continues the lineage from it, snapshotting in the new stream. At restart
/// the replica's cursor is past the new stream's end: a fork, never a resume.
#[tokio::test]
async fn a_stream_recreated_behind_a_stopped_replica_is_a_fork_at_restart() {
    logs();
    let mut p = Pipeline::start("fork-recreate", |_| {}).await;
    p.commit(puts(0, 50, 1)).await;
    p.snapshot().await;
    let at_1 = p.state.clone();
    p.churn(5, 5, 50, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let a = Running::start(p.consumer_settings(), durable("recreate-a", dir.path()));
    a.wait_for(&p).await;
    a.stop().await;

    p.recreate_stream().await;
    p.state = at_1;
    p.commit(puts(0, 3, 9)).await;
    p.commit(puts(3, 3, 9)).await;
    let m = p.snapshot().await;
    assert!(
        m.stream_seq < 6,
        "the new stream is shorter than the replica's position"
    );

    let a = Running::start(p.consumer_settings(), durable("recreate-a", dir.path()));
    let s = a
        .wait_until(|s| !s.decisions.is_empty() && s.digest == p.state.digest().to_string())
        .await;
    assert_eq!(decided(&s, "fork"), 1, "{:?}", s.decisions);
    assert_eq!(decided(&s, "resume"), 0, "{:?}", s.decisions);
    assert_same_state(&a.replica, &p);
    a.stop().await;
}

/// As above, but the recreated stream has grown past the replica's position by the time it
/// restarts: the message at the cursor's position is another one.
#[tokio::test]
async fn a_recreated_stream_grown_past_the_replicas_position_is_a_fork_at_restart() {
    logs();
    let mut p = Pipeline::start("fork-regrown", |_| {}).await;
    p.commit(puts(0, 50, 1)).await;
    p.snapshot().await;
    let at_1 = p.state.clone();
    p.churn(2, 5, 50, 2).await; // the replica's cursor: sequence 3 at stream position 3
    let dir = tempfile::tempdir().unwrap();
    let a = Running::start(p.consumer_settings(), durable("regrown-a", dir.path()));
    a.wait_for(&p).await;
    a.stop().await;

    p.recreate_stream().await;
    p.state = at_1;
    for i in 0..6 {
        p.commit(puts(i * 3, 3, 9)).await; // sequences 2..7 at stream positions 1..6
    }
    p.snapshot().await;

    let a = Running::start(p.consumer_settings(), durable("regrown-a", dir.path()));
    let s = a
        .wait_until(|s| !s.decisions.is_empty() && s.digest == p.state.digest().to_string())
        .await;
    assert_eq!(decided(&s, "fork"), 1, "{:?}", s.decisions);
    assert_eq!(decided(&s, "resume"), 0, "{:?}", s.decisions);
    assert_same_state(&a.replica, &p);
    a.stop().await;
}

/// Issue 11: a stream whose last message was deleted made a running replica reopen its
/// reader every 5 s forever (it waited for the deleted message). It is caught up.
#[tokio::test]
async fn a_deleted_last_message_leaves_the_replica_caught_up_without_reopening_its_reader() {
    logs();
    let mut p = Pipeline::start("stale-reader", |_| {}).await;
    p.commit(puts(0, 20, 1)).await;
    p.snapshot().await;
    p.commit(puts(20, 5, 2)).await;
    let garbage = p.publish_raw(b"not an envelope".to_vec()).await;
    p.delete_message(garbage).await;

    let a = Running::start(p.consumer_settings(), ephemeral("stale-a"));
    a.wait_for(&p).await;
    // Either the replica finds it is caught up (lag 0) or it reopens its reader (old code,
    // after 5 s of silence).
    let s = a.wait_until(|s| s.lag == 0 || s.reader_stalls > 0).await;
    assert_eq!(s.reader_stalls, 0, "the reader was reopened: {s:?}");
    assert_eq!(s.lag, 0);
    assert!(s.ready, "{s:?}");

    // A new envelope after the deleted tail is still delivered.
    p.commit(puts(30, 5, 3)).await;
    let s = a.wait_for(&p).await;
    assert_eq!(s.reader_stalls, 0, "{s:?}");
    assert_same_state(&a.replica, &p);
    a.stop().await;
}

/// Through the binary: `deltasync-consumer run --once` on a durable replica whose stream was
/// recreated behind it says `fork` (error level), exits 0 at the new history's head, and the
/// replica on disk is the new history.
#[tokio::test]
async fn the_consumer_binary_reports_a_recreated_stream_as_a_fork_and_converges() {
    logs();
    let mut p = Pipeline::start("fork-cli", |_| {}).await;
    p.commit(puts(0, 40, 1)).await;
    p.snapshot().await;
    let at_1 = p.state.clone();
    p.churn(6, 4, 40, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let a = Running::start(p.consumer_settings(), durable("cli-a", dir.path()));
    a.wait_for(&p).await;
    a.stop().await;

    p.recreate_stream().await;
    p.state = at_1;
    p.commit(puts(0, 3, 9)).await;
    p.snapshot().await;
    p.commit(puts(3, 3, 9)).await;

    let out = tokio::task::spawn_blocking({
        let url = p.settings.nats.url.clone();
        let pipeline = p.settings.pipeline.clone();
        let dir = dir.path().to_path_buf();
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_deltasync-consumer"))
                .args(["--nats-url", &url])
                .args(["--pipeline", &pipeline])
                .arg("run")
                .args(["--id", "cli-a"])
                .arg("--data-dir")
                .arg(&dir)
                .arg("--once")
                .env_remove("DELTASYNC_CONFIG")
                .env("RUST_LOG", "warn")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("ERROR") && stderr.contains("fork") && stderr.contains("Re-snapshot"),
        "the fork is logged at error level: {stderr}"
    );

    // The replica on disk is the new history: it resumes there without downloading.
    let a = Running::start(p.consumer_settings(), durable("cli-a", dir.path()));
    let s = a
        .wait_until(|s| !s.decisions.is_empty() && s.seq == p.state.seq())
        .await;
    assert_eq!(decided(&s, "resume"), 1, "{:?}", s.decisions);
    assert_same_state(&a.replica, &p);
    a.stop().await;
}
