//! Damage to what consumers read: a snapshot chunk overwritten with garbage, a manifest
//! pointing at a chunk that was purged, garbage / truncated / wrong-version messages published
//! onto the pipeline's subject while everything runs, and a message removed from the middle of
//! the stream. The replica is never corrupted, each case is logged with its reason and counted,
//! and the consumer recovers.
//!
//! Talks to one nats-server through the producer and consumer libraries, and damages the
//! bucket and the stream with plain async-nats calls. Runs on a current-thread runtime, so the
//! consumers' engines log on the test's thread, where `CapturedLogs` reads them.

use crate::support::*;
use async_nats::jetstream::kv;
use deltasync_consumer::{BatchKind, Reason};
use deltasync_core::codec::encode_envelope;
use deltasync_core::snapshot::{chunk_key, content_hash, Manifest};
use deltasync_core::{names, Digest, Envelope, Lineage};
use deltasync_nats::store;
use deltasync_producer::{Change, Producer};
use deltasync_testkit::NatsServer;
use std::sync::{Arc, Mutex};
use std::time::Instant;

fn decided(s: &deltasync_consumer::Status, r: Reason) -> u64 {
    s.decisions.get(r.as_str()).copied().unwrap_or(0)
}

/// The key of a chunk of a non-empty range of `m` (the one replicas fetch first).
fn a_chunk_of(m: &Manifest) -> String {
    let range = m
        .ranges
        .iter()
        .find(|r| r.digest != Digest::ZERO && !r.chunks.is_empty())
        .expect("a non-empty range");
    chunk_key(&range.chunks[0].hash)
}

/// Commits puts of keys 0..3000 (value: the key's number) as one transaction.
async fn commit_base_keys(producer: &Producer, model: &mut Model) {
    let base: Vec<Change> = (0..3000)
        .map(|i| Change::put(key(i), format!("{i}")))
        .collect();
    producer.commit(base.clone()).await.unwrap();
    model.apply(&base);
}

/// Commits `n` random transactions over those keys.
async fn commit_random_txns(producer: &Producer, model: &mut Model, rng: &mut Rng, n: usize) {
    for _ in 0..n {
        let txn = random_txn(rng, 3000, 0);
        producer.commit(txn.clone()).await.unwrap();
        model.apply(&txn);
    }
}

#[derive(Clone, Copy, Debug)]
enum ChunkDamage {
    /// The value replaced by other bytes (as a bad disk or a stray writer would).
    Overwritten,
    /// The key purged: the manifest points at nothing.
    Purged,
}

/// A chunk of the latest snapshot is damaged. A replica following the stream does not need
/// it; a new replica cannot bootstrap from that snapshot, says why, and must not hold a
/// half-loaded or unverified state; once the producer has written the next snapshot it
/// bootstraps and converges.
async fn a_damaged_chunk(damage: ChunkDamage) {
    let started = Instant::now();
    let (logs, _guard) = CapturedLogs::start();
    let server = NatsServer::start();
    let s = settings(&server.url(), &unique("chunk"), |s| {
        s.snapshot.every_envelopes = 0; // snapshots only when the test asks
        s.consumer.resync_max_attempts = 6;
    });
    let producer = Producer::start(s.clone()).await.unwrap();
    let mut model = Model::default();
    let mut rng = Rng::new(55);
    commit_base_keys(&producer, &mut model).await;
    let m = {
        producer.snapshot().await.unwrap();
        let js = js(&server.url()).await;
        let kv = store::bucket(&js, &s).await.unwrap();
        store::latest_manifest(&kv).await.unwrap().unwrap()
    };
    let follower = InProcess::memory(s.clone(), "chunk-follower");
    let p = producer.flush().await.unwrap();
    follower.wait_for(&p, DEADLINE, "before the damage").await;

    let js = js(&server.url()).await;
    let kv: kv::Store = store::bucket(&js, &s).await.unwrap();
    let damaged = a_chunk_of(&m);
    match damage {
        ChunkDamage::Overwritten => {
            kv.put(
                &damaged,
                b"not the chunk you are looking for".to_vec().into(),
            )
            .await
            .unwrap();
        }
        ChunkDamage::Purged => kv.purge(&damaged).await.unwrap(),
    }
    eprintln!("{damage:?}: {damaged}");

    // A new replica: every bootstrap attempt fails on the damaged chunk, with the reason.
    let newcomer = InProcess::memory(s.clone(), "chunk-newcomer");
    let mut batches = newcomer.replica.subscribe();
    let needle = match damage {
        ChunkDamage::Overwritten => "is corrupt",
        ChunkDamage::Purged => "has no chunk.",
    };
    eventually("a failed bootstrap attempt logged", DEADLINE, async || {
        (!logs
            .lines_with(&["Re-snapshot attempt failed", needle, &damaged[..20]])
            .is_empty())
        .then_some(())
    })
    .await;
    let st = newcomer.replica.status();
    assert!(!st.bootstrapped, "nothing unverified is published: {st:#?}");
    assert_eq!(st.seq, 0);
    assert!(newcomer.replica.view().is_empty());

    // The pipeline goes on; the producer writes its next snapshot.
    commit_random_txns(&producer, &mut model, &mut rng, 20).await;
    let next = producer.snapshot().await.unwrap();
    let p = producer.flush().await.unwrap();
    assert_eq!(next.seq, p.seq);
    let context = format!("{damage:?} chunk {damaged}");
    let mut checked = follower.check(&p, &model, &context).await;
    let latest = store::latest_manifest(&kv).await.unwrap().unwrap();
    let still_referenced = latest.blob_keys().any(|k| k == damaged);
    let still_damaged = match kv.get(&damaged).await.unwrap() {
        None => true,
        Some(v) => chunk_key(&content_hash(&v)) != damaged,
    };
    if newcomer.is_finished() || (still_referenced && still_damaged) {
        let outcome = if newcomer.is_finished() {
            format!("{:?}", newcomer.join().await.err())
        } else {
            "still retrying".to_owned()
        };
        panic!(
            "DEFECT ({context}): the producer's next snapshot (seq {}) still references the \
             damaged chunk (referenced: {still_referenced}, damaged: {still_damaged}), so a new \
             replica can never bootstrap; newcomer: {outcome}",
            next.seq
        );
    }
    checked += newcomer.check(&p, &model, &context).await;
    // Every batch it published is the verified bootstrap.
    while let Ok(b) = batches.try_recv() {
        assert_eq!(
            b.kind,
            BatchKind::Resync {
                reason: Reason::Bootstrap
            }
        );
    }
    follower.stop().await;
    newcomer.stop().await;
    producer.shutdown().await.unwrap();
    eprintln!(
        "{damage:?} chunk: {checked} entries checked, 0 lost, {:.1?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_overwritten_snapshot_chunk_never_reaches_a_replica_and_the_next_snapshot_heals() {
    logs();
    a_damaged_chunk(ChunkDamage::Overwritten).await;
}

#[tokio::test]
async fn a_manifest_pointing_at_a_purged_chunk_never_reaches_a_replica_and_the_next_snapshot_heals()
{
    logs();
    a_damaged_chunk(ChunkDamage::Purged).await;
}

#[tokio::test]
async fn garbage_truncated_and_wrong_version_messages_are_counted_logged_and_skipped() {
    let started = Instant::now();
    let (logs, _guard) = CapturedLogs::start();
    let server = NatsServer::start();
    let s = settings(&server.url(), &unique("foreign"), |s| {
        s.snapshot.every_envelopes = 100;
    });
    let producer = Producer::start(s.clone()).await.unwrap();
    let model = Arc::new(Mutex::new(Model::default()));
    let load = Load::start(producer, model.clone(), 66, 500);
    let dir = tempfile::tempdir().unwrap();
    let durable = InProcess::durable(s.clone(), "foreign-durable", dir.path());
    let memory = InProcess::memory(s.clone(), "foreign-memory");
    wait_for_commits(&model, &load, 50, "commits before the garbage").await;
    // Both replicas follow the stream before anything is injected (one envelope per txn).
    let now = model.lock().unwrap().txns;
    for c in [&durable, &memory] {
        c.wait_following(now, "before the garbage").await;
    }

    let js = js(&server.url()).await;
    let subject = names::subject(&s.pipeline);
    let valid = encode_envelope(&Envelope {
        lineage: Lineage::random(),
        seq: 1,
        part: 1,
        parts: 1,
        digest: Digest::ZERO,
        produced_at_ms: 0,
        changes: vec![Change::put("k", "v")],
    })
    .unwrap();
    let truncated = valid[..valid.len() / 2].to_vec();
    let mut wrong_version = valid.clone();
    wrong_version[4] = 99;
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"definitely not an envelope".to_vec()),
        ("truncated", truncated),
        ("wrong version", wrong_version),
        ("empty", Vec::new()),
    ];
    for (what, payload) in &bad {
        js.publish(subject.clone(), payload.clone().into())
            .await
            .unwrap()
            .await
            .unwrap_or_else(|e| panic!("publishing the {what} message: {e}"));
        wait_for_commits(
            &model,
            &load,
            20,
            &format!("commits after the {what} message"),
        )
        .await;
    }

    let report = load.finish().await;
    assert!(report.error.is_none(), "{:?}", report.error);
    let p = report.producer.flush().await.unwrap();
    let model = model.lock().unwrap().clone();
    let n = bad.len() as u64;
    let mut checked = 0;
    for c in [&durable, &memory] {
        checked += c.check(&p, &model, "after foreign messages").await;
        let st = c.replica.status();
        assert_eq!(
            st.foreign_messages, n,
            "replica {}: every one counted: {st:#?}",
            st.id
        );
        assert_eq!(
            st.decisions.keys().collect::<Vec<_>>(),
            vec!["bootstrap"],
            "replica {}: skipped, no re-snapshot",
            st.id
        );
        assert!(c
            .replica
            .metrics_text()
            .contains(&format!("deltasync_consumer_foreign_messages_total {n}")));
    }
    assert_eq!(
        report.producer.status().foreign_messages,
        n,
        "the producer reconciled past each of them"
    );
    // Each logged with why: 2 replicas, plus the producer's publisher (on this thread too).
    let logged = logs.lines_with(&["not an envelope"]);
    assert!(
        logged.len() as u64 >= 2 * n,
        "every foreign message logged by both replicas: {logged:#?}"
    );
    for needle in ["magic", "version 99"] {
        assert!(
            logged.iter().any(|l| l.contains(needle)),
            "a log line says {needle:?}: {logged:#?}"
        );
    }
    durable.stop().await;
    memory.stop().await;
    report.producer.shutdown().await.unwrap();
    eprintln!(
        "foreign messages: {n} injected, {} transactions, {checked} entries checked, 0 lost, \
         {:.1?}",
        model.txns,
        started.elapsed()
    );
}

#[tokio::test]
async fn a_message_removed_from_the_middle_of_the_stream_is_resnapshotted_past() {
    let started = Instant::now();
    let (logs, _guard) = CapturedLogs::start();
    let server = NatsServer::start();
    let s = settings(&server.url(), &unique("deleted"), |s| {
        s.snapshot.every_envelopes = 0; // snapshots only when the test asks
        s.consumer.resync_max_attempts = 8;
    });
    let producer = Producer::start(s.clone()).await.unwrap();
    let mut model = Model::default();
    let mut rng = Rng::new(77);
    let mut commit = async |model: &mut Model, n: usize| {
        for _ in 0..n {
            let txn = random_txn(&mut rng, 1000, 0);
            producer.commit(txn.clone()).await.unwrap();
            model.apply(&txn);
        }
    };
    commit(&mut model, 100).await;
    producer.snapshot().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lagging = InProcess::durable(s.clone(), "deleted-durable", dir.path());
    let p = producer.flush().await.unwrap();
    lagging.wait_for(&p, DEADLINE, "before the deletion").await;
    let stopped = lagging.stop().await.cursor;

    // 60 envelopes while it is down; one in the middle is removed.
    commit(&mut model, 60).await;
    let js = js(&server.url()).await;
    let removed = stopped.stream_seq + 30;
    let stream = js
        .get_stream(names::stream_name(&s.pipeline))
        .await
        .unwrap();
    assert!(stream.delete_message(removed).await.unwrap());

    let lagging = InProcess::durable(s.clone(), "deleted-durable", dir.path());
    let mut batches = lagging.replica.subscribe();
    lagging
        .replica
        .wait_until(DEADLINE, |st| decided(st, Reason::Gap) >= 1)
        .await
        .unwrap_or_else(|st| panic!("the gap was never noticed: {st:#?}"));
    // The only snapshot is older than the hole: the producer writes a newer one.
    commit(&mut model, 5).await;
    producer.snapshot().await.unwrap();
    let p = producer.flush().await.unwrap();
    let checked = lagging.check(&p, &model, "after a deleted message").await;
    let st = lagging.replica.status();
    assert_eq!(decided(&st, Reason::Resume), 1, "{:?}", st.decisions);
    assert_eq!(st.last_resync.as_ref().map(|r| r.reason), Some(Reason::Gap));
    assert!(
        !logs
            .lines_with(&["reason=\"gap\"", "Re-snapshot"])
            .is_empty()
            || !logs.lines_with(&["reason=gap", "Re-snapshot"]).is_empty(),
        "the re-snapshot is logged with its reason:\n{}",
        logs.text()
    );
    // Positions only move forward: the replica never went back to the older snapshot.
    let mut last = stopped.seq;
    let mut went_back = Vec::new();
    while let Ok(b) = batches.try_recv() {
        if b.seq < last {
            went_back.push((b.prev_seq, b.seq, b.kind));
        }
        last = b.seq;
    }
    assert!(
        went_back.is_empty(),
        "the replica moved back to an older snapshot (prev_seq, seq, kind): {went_back:?}"
    );
    lagging.stop().await;
    producer.shutdown().await.unwrap();
    eprintln!(
        "deleted message at stream seq {removed}: decisions {:?}, {checked} entries checked, 0 \
         lost, {:.1?}",
        st.decisions,
        started.elapsed()
    );
}

#[tokio::test]
async fn a_producer_restarted_over_a_damaged_latest_snapshot_recovers_from_the_stream() {
    logs();
    let server = NatsServer::start();
    let s = settings(&server.url(), &unique("recover"), |s| {
        s.snapshot.every_envelopes = 0;
        s.stream.max_messages = -1;
    });
    let producer = Producer::start(s.clone()).await.unwrap();
    let lineage = producer.lineage();
    let mut model = Model::default();
    commit_base_keys(&producer, &mut model).await;
    producer.snapshot().await.unwrap();
    let js = js(&server.url()).await;
    let kv = store::bucket(&js, &s).await.unwrap();
    let m = store::latest_manifest(&kv).await.unwrap().unwrap();
    kv.purge(a_chunk_of(&m)).await.unwrap();
    let last = vec![Change::put("after", "1")];
    producer.commit(last.clone()).await.unwrap();
    model.apply(&last);
    producer.shutdown().await.unwrap();

    // The stream holds every envelope from 1: the state is recoverable without the snapshot.
    let replayed = replay(&read_stream(&js, &s.pipeline).await, "the stream");
    assert_matches_model("the stream's replay", &replayed.state, &model, "recover");
    let again = Producer::start(s.clone())
        .await
        .unwrap_or_else(|e| panic!("the producer cannot restart over a damaged snapshot: {e}"));
    assert_eq!(again.lineage(), lineage, "the lineage continues");
    assert_eq!(again.status().digest, model.digest().to_hex());
    again.shutdown().await.unwrap();
}

/// The restart half of the defect above: a producer restarted over a snapshot with an
/// overwritten chunk refuses that snapshot in recovery, and its first snapshot (incremental on
/// whatever verified base it recovered from, or full) leaves the bucket loadable again.
#[tokio::test]
async fn a_producer_restarted_over_an_overwritten_chunk_writes_a_snapshot_a_newcomer_loads() {
    logs();
    let server = NatsServer::start();
    let s = settings(&server.url(), &unique("chunk-restart"), |s| {
        s.snapshot.every_envelopes = 0; // snapshots only when the test asks
    });
    let producer = Producer::start(s.clone()).await.unwrap();
    let mut model = Model::default();
    let mut rng = Rng::new(56);
    commit_base_keys(&producer, &mut model).await;
    producer.snapshot().await.unwrap();
    let js = js(&server.url()).await;
    let kv: kv::Store = store::bucket(&js, &s).await.unwrap();
    let damaged = a_chunk_of(&store::latest_manifest(&kv).await.unwrap().unwrap());
    kv.put(&damaged, b"not the chunk".to_vec().into())
        .await
        .unwrap();
    producer.shutdown().await.unwrap();

    let producer = Producer::start(s.clone()).await.unwrap();
    commit_random_txns(&producer, &mut model, &mut rng, 5).await;
    producer.snapshot().await.unwrap();
    let p = producer.flush().await.unwrap();
    let latest = store::latest_manifest(&kv).await.unwrap().unwrap();
    let loaded = store::load(&kv, latest)
        .await
        .expect("the snapshot written after the restart loads and verifies");
    assert_eq!(loaded.manifest.seq, p.seq);
    let newcomer = InProcess::memory(s.clone(), "chunk-restart-newcomer");
    let checked = newcomer
        .check(&p, &model, "after a restart over an overwritten chunk")
        .await;
    assert_eq!(
        checked,
        model.entries.len(),
        "the newcomer holds every key of the model"
    );
    newcomer.stop().await;
    producer.shutdown().await.unwrap();
}
