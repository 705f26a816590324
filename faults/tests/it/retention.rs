//! Retention against consumers: a stopped durable consumer whose position was pruned
//! re-snapshots with reason "pruned"; with a snapshot's next envelope removed (purged by an
//! operator, which no producer can hold back) while a replica bootstraps from it, the replica retries with a newer snapshot and
//! converges once it can, or, with too few attempts allowed, stops with an error saying it
//! cannot keep up.
//!
//! Talks to one nats-server through the producer and consumer libraries.

use crate::support::*;
use deltasync_consumer::Reason;
use deltasync_core::names;
use deltasync_producer::{Change, Producer};
use deltasync_testkit::NatsServer;
use std::sync::{Arc, Mutex};
use std::time::Instant;

fn decided(s: &deltasync_consumer::Status, r: Reason) -> u64 {
    s.decisions.get(r.as_str()).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replica_whose_position_was_pruned_resnapshots_with_reason_pruned() {
    logs();
    let started = Instant::now();
    let server = NatsServer::start();
    let s = settings(&server.url(), &unique("pruned"), |s| {
        s.stream.max_messages = 200;
        s.snapshot.every_envelopes = 50;
    });
    let producer = Producer::start(s.clone()).await.unwrap();
    let model = Arc::new(Mutex::new(Model::default()));
    let load = Load::start(producer, model.clone(), 33, 3000);
    let dir = tempfile::tempdir().unwrap();
    let c = InProcess::durable(s.clone(), "pruned-1", dir.path());
    wait_for_commits(&model, &load, 100, "commits while the replica follows").await;
    // One envelope per transaction here.
    let committed = model.lock().unwrap().txns;
    c.wait_following(committed, "before the stop").await;
    let stopped_at = c.stop().await.cursor;
    assert!(stopped_at.seq >= committed);

    // Far more than the stream retains while the replica is down.
    wait_for_commits(&model, &load, 400, "commits while the replica is down").await;
    let report = load.finish().await;
    assert!(report.error.is_none(), "{:?}", report.error);
    let p = report.producer.flush().await.unwrap();
    let js = js(&server.url()).await;
    let (first, _) = bounds(&js, &s.pipeline).await;
    assert!(
        first > stopped_at.stream_seq + 1,
        "the replica's next envelope (stream seq {}) was pruned (first retained {first})",
        stopped_at.stream_seq + 1
    );

    let c = InProcess::durable(s.clone(), "pruned-1", dir.path());
    let model = model.lock().unwrap().clone();
    let checked = c.check(&p, &model, "after a pruned position").await;
    let st = c.replica.status();
    // More than one when the latest snapshot was itself already behind retention (the
    // producer can only warn while a snapshot is being written on a busy machine).
    assert!(decided(&st, Reason::Pruned) >= 1, "{:?}", st.decisions);
    assert_eq!(decided(&st, Reason::Resume), 0, "{:?}", st.decisions);
    assert_eq!(
        st.last_resync.as_ref().map(|r| r.reason),
        Some(Reason::Pruned)
    );
    let metric = format!(
        r#"deltasync_consumer_resyncs_total{{reason="pruned"}} {}"#,
        decided(&st, Reason::Pruned)
    );
    assert!(c.replica.metrics_text().contains(&metric), "{metric}");
    c.stop().await;
    report.producer.shutdown().await.unwrap();
    eprintln!(
        "pruned: {} transactions, {checked} entries checked, 0 lost, {:.1?}",
        model.txns,
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_whose_next_envelope_is_pruned_during_bootstrap_is_retried_or_reported() {
    logs();
    let started = Instant::now();
    let server = NatsServer::start();
    // The stream keeps 20 envelopes; the producer snapshots every 10 and commits as fast as it
    // can.
    let s = settings(&server.url(), &unique("tight"), |s| {
        s.stream.max_messages = 20;
        s.snapshot.every_envelopes = 10;
    });
    // The producer holds publishing back to what retention keeps past its newest durable
    // snapshot (the tighter of its settings and the stream's own limits, which it re-reads
    // while running), so on its own it rarely outruns a bootstrapping replica. An operator's
    // purges, which no producer can hold back, do: while the replicas bootstrap, the stream is
    // purged down to its last few messages over and over.
    let producer = Producer::start(s.clone()).await.unwrap();
    let js = js(&server.url()).await;
    let stream = js
        .get_stream(names::stream_name(&s.pipeline))
        .await
        .unwrap();
    let mut model = Model::default();
    // A state big enough that downloading it takes a while.
    let base: Vec<Change> = (0..30_000u64)
        .map(|i| {
            Change::put(
                key(i),
                format!("\"{}\"", "v".repeat(150 + (i % 50) as usize)),
            )
        })
        .collect();
    producer.commit(base.clone()).await.unwrap();
    model.apply(&base);
    // The first snapshot is a full base: written before the load starts, or retention prunes
    // envelope 1 before any snapshot exists and nobody can start at all.
    producer.snapshot().await.unwrap();
    let model = Arc::new(Mutex::new(model));
    let load = Load::start(producer, model.clone(), 44, 30_000);
    wait_for_commits(&model, &load, 50, "the load to run").await;
    let purging = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let purger = {
        let purging = purging.clone();
        tokio::spawn(async move {
            while purging.load(std::sync::atomic::Ordering::Relaxed) {
                stream.purge().keep(3).await.expect("purge the stream");
                // Pacing only: the purges go on until the test stops them.
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
    };

    // Too few attempts allowed: it says it cannot keep up.
    let mut few = s.clone();
    few.consumer.resync_max_attempts = 2;
    let quitter = InProcess::memory(few, "tight-quitter");
    let quitter_replica = quitter.replica.clone();
    let err = quitter.join().await.expect_err("it cannot keep up");
    let text = err.to_string();
    assert!(text.contains("cannot keep up"), "{text}");
    assert!(text.contains("reason pruned"), "{text}");
    let qs = quitter_replica.status();
    assert!(decided(&qs, Reason::Pruned) >= 1, "{:?}", qs.decisions);
    eprintln!("with 2 attempts: {text}");

    // Enough attempts: once the purges stop, a newer snapshot is followed.
    let mut enough = s.clone();
    enough.consumer.resync_max_attempts = 100;
    let patient = InProcess::memory(enough, "tight-patient");
    patient
        .replica
        .wait_until(DEADLINE, |st| decided(st, Reason::Pruned) >= 1)
        .await
        .unwrap_or_else(|st| panic!("the snapshot's next envelope was never pruned: {st:#?}"));
    purging.store(false, std::sync::atomic::Ordering::Relaxed);
    purger.await.unwrap();
    let report = load.finish().await;
    assert!(report.error.is_none(), "{:?}", report.error);
    let p = report.producer.flush().await.unwrap();
    // The last purge may have removed envelopes after the newest snapshot: a snapshot of the
    // head lets every replica start again.
    report.producer.snapshot().await.unwrap();
    let model = model.lock().unwrap().clone();
    let mut checked = patient.check(&p, &model, "after pruned bootstraps").await;
    let ps = patient.replica.status();
    assert_eq!(decided(&ps, Reason::Bootstrap), 1, "{:?}", ps.decisions);
    assert!(ps.last_resync.is_some());

    // And the replica that gave up converges when started again.
    let again = InProcess::memory(s.clone(), "tight-quitter");
    checked += again.check(&p, &model, "the quitter started again").await;
    patient.stop().await;
    again.stop().await;
    report.producer.shutdown().await.unwrap();
    eprintln!(
        "tight retention: {} transactions, {checked} entries checked, 0 lost, decisions {:?}, \
         {:.1?}",
        model.txns,
        ps.decisions,
        started.elapsed()
    );
}
