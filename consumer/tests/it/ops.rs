//! Operator commands against a real nats-server: replay (and re-ingest into a second
//! pipeline), rebuild at a past sequence then follow, verify finding an injected divergence,
//! status headroom.
//!
//! Talks to nats-server through the test producer in `support`, the producer library (for
//! re-ingesting) and `deltasync_consumer::ops`.

use crate::support::*;
use deltasync_consumer::ops::{self, OpsError};
use deltasync_shared::codec::encode_envelope;
use deltasync_shared::envelope::{now_ms, Envelope};
use deltasync_shared::{Change, Digest};
use std::time::Duration;

/// A pipeline with JSON and binary values, deletes, a multi-part transaction and a snapshot
/// in the middle.
async fn varied_history(prefix: &str) -> Pipeline {
    let mut p = Pipeline::start(prefix, |_| {}).await;
    p.commit(vec![
        Change::put("a", &br#"{"px":1.5,"qty":[1,2]}"#[..]),
        Change::put("b", &b"\"text\""[..]),
        Change::put("bin", &[0u8, 159, 146, 150][..]),
    ])
    .await;
    p.commit(vec![Change::delete("b"), Change::put("c", &b"42"[..])])
        .await;
    p.snapshot().await;
    let big: Vec<Change> = (0..40)
        .map(|i| Change::put(key(i), format!("{i}").into_bytes()))
        .collect();
    p.commit_split(big, 200).await;
    p.commit(vec![Change::put("a", &b"null"[..])]).await;
    p
}

#[tokio::test]
async fn replay_prints_transactions_that_re_ingest_into_another_pipeline_with_the_same_digest() {
    let p = varied_history("replay").await;
    let mut out = Vec::new();
    let summary = ops::replay(&p.settings, 1, None, &mut out, false)
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "one line per transaction:\n{text}");
    assert_eq!(summary.transactions, 4);
    assert_eq!(lines[0]["seq"], 1);
    assert_eq!(lines[0]["lineage"], p.state.lineage().to_hex());
    assert_eq!(
        lines[0]["txn"][0],
        serde_json::json!({"op":"put","key":"a","value":{"px":1.5,"qty":[1,2]}})
    );
    assert_eq!(lines[0]["txn"][2]["value_b64"], "AJ+Slg==");
    assert_eq!(
        lines[1]["txn"][0],
        serde_json::json!({"op":"del","key":"b"})
    );
    assert_eq!(
        lines[2]["txn"].as_array().unwrap().len(),
        40,
        "the multi-part transaction is one line"
    );
    assert_eq!(lines[3]["seq"], p.state.seq());

    // --to-seq stops there.
    let mut out = Vec::new();
    let s = ops::replay(&p.settings, 2, Some(2), &mut out, false)
        .await
        .unwrap();
    assert_eq!((s.transactions, s.first_seq, s.last_seq), (1, 2, 2));

    // Re-ingest into a second pipeline on the same server.
    let mut target = p.settings.clone();
    target.pipeline = unique_pipeline("replay-copy");
    let producer = deltasync_producer::Producer::start(target.clone())
        .await
        .unwrap();
    let input = deltasync_producer::ingest::Input::Reader(Box::new(std::io::Cursor::new(
        text.into_bytes(),
    )));
    deltasync_producer::ingest::ingest(
        &producer,
        input,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    let status = producer.status();
    producer.shutdown().await.unwrap();
    assert_eq!(
        status.digest,
        p.state.digest().to_hex(),
        "the copy has the same state digest"
    );
}

#[tokio::test]
async fn replay_of_a_pruned_sequence_names_the_first_retained_and_the_latest_snapshot() {
    let mut p = Pipeline::start("replay-pruned", |_| {}).await;
    for i in 0..6 {
        p.commit(puts(i, 1, 1)).await;
    }
    let m = p.snapshot().await;
    let stream =
        p.js.get_stream(deltasync_shared::names::stream_name(&p.settings.pipeline))
            .await
            .unwrap();
    stream.purge().sequence(4).await.unwrap();
    let err = ops::replay(&p.settings, 2, None, &mut Vec::new(), false)
        .await
        .unwrap_err();
    match &err {
        OpsError::NotRetained {
            wanted,
            first_seq,
            snapshot,
            ..
        } => {
            assert_eq!((*wanted, *first_seq), (2, 4));
            assert_eq!(snapshot, &m.seq.to_string());
        }
        other => panic!("expected NotRetained, got {other}"),
    }
    assert!(
        err.to_string().contains("first retained envelope is 4"),
        "{err}"
    );
}

#[tokio::test]
async fn rebuild_makes_a_replica_at_a_past_sequence_that_run_then_follows() {
    let mut p = varied_history("rebuild").await;
    let at = p.state.seq();
    let expected = p.state.clone();
    p.commit(vec![Change::put("later", &b"1"[..])]).await;
    let dir = tempfile::tempdir().unwrap();
    let summary = ops::rebuild(&p.settings, at, dir.path()).await.unwrap();
    assert_eq!(
        (summary.seq, summary.digest.clone()),
        (at, expected.digest().to_hex())
    );
    assert!(
        summary.from_snapshot.is_some(),
        "started from the retained snapshot"
    );

    // A second rebuild into the same directory is refused.
    let err = ops::rebuild(&p.settings, at, dir.path()).await.unwrap_err();
    assert!(err.to_string().contains("already holds a replica"), "{err}");

    // Rebuilding inside a multi-part transaction is refused.
    let err = ops::rebuild(&p.settings, 4, tempfile::tempdir().unwrap().path())
        .await
        .unwrap_err();
    assert!(matches!(err, OpsError::MidTransaction(4)), "{err}");

    // `run` on that directory resumes from `at` (no snapshot download) and follows.
    let c = Running::start(p.consumer_settings(), durable("rebuilt", dir.path()));
    let s = c.wait_for(&p).await;
    assert_eq!(
        s.snapshot_bytes_fetched, 0,
        "resumed from the rebuilt cursor"
    );
    assert_same_state(&c.replica, &p);
    c.stop().await;
}

#[tokio::test]
async fn verify_reports_a_consistent_history_and_then_the_first_injected_divergence() {
    let mut p = varied_history("verify").await;
    let report = ops::verify(&p.settings, None).await.unwrap();
    assert_eq!(report.divergence, None);
    assert_eq!(report.last_seq, p.state.seq());
    assert!(report.envelopes_checked > 0);

    // An envelope whose recorded digest is wrong, at the next sequence.
    let bad = Envelope {
        lineage: p.state.lineage(),
        seq: p.state.seq() + 1,
        part: 1,
        parts: 1,
        digest: Digest([9; 32]),
        produced_at_ms: now_ms(),
        changes: vec![Change::put("x", &b"1"[..])],
    };
    let stream_seq = p.publish_raw(encode_envelope(&bad).unwrap()).await;
    let report = ops::verify(&p.settings, Some(1)).await.unwrap();
    let d = report.divergence.expect("the divergence is found");
    assert_eq!((d.seq, d.stream_seq), (bad.seq, stream_seq));
    assert!(d.reason.contains("digest mismatch"), "{}", d.reason);
}

#[tokio::test]
async fn status_shows_bounds_snapshots_and_each_consumers_lag_and_headroom() {
    let mut p = Pipeline::start("status", |s| {
        s.stream.max_messages = 100;
        s.snapshot.every_envelopes = 20;
    })
    .await;
    for i in 0..10 {
        p.commit(puts(i, 1, 1)).await;
    }
    p.snapshot().await;
    let c = Running::start(p.consumer_settings(), ephemeral("watcher"));
    c.wait_for(&p).await;
    for i in 10..30 {
        p.commit(puts(i, 1, 2)).await;
    }
    c.wait_for(&p).await;
    // The server-side position is acknowledged after the local commit: wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        let status = ops::status(&p.settings).await.unwrap();
        let caught_up = status
            .consumers
            .iter()
            .any(|c| c.name.contains("watcher") && c.position == 30);
        if caught_up || std::time::Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    c.stop().await;
    assert_eq!((status.stream.first_seq, status.stream.last_seq), (1, 30));
    assert_eq!(status.snapshots.len(), 1);
    assert!(status.snapshots[0].latest);
    let consumer = status
        .consumers
        .iter()
        .find(|c| c.name.contains("watcher"))
        .unwrap_or_else(|| panic!("the watcher's durable consumer is listed: {status:#?}"));
    assert_eq!(consumer.position, 30);
    assert_eq!(consumer.lag, 0);
    assert_eq!(consumer.headroom_messages, Some(100));
    assert!(!consumer.pruned);
    let text = ops::render_status(&status);
    assert!(text.contains("headroom 100 messages"), "{text}");
}
