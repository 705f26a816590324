//! A producer started over an abandoned multi-part transaction (a crash left parts 1..k of n
//! in the stream) under tight retention: its snapshots are cut at the last complete
//! transaction, so they are written (no failing retries), publishing is never held back for a
//! snapshot that cannot be written, a reader bootstrapping from the snapshot reaches the
//! model, and a restart recovers.

use crate::support::{self, eventually};
use deltasync_config::settings::Settings;
use deltasync_core::envelope::split_transaction;
use deltasync_core::recovery::Classified;
use deltasync_core::State;
use deltasync_nats::store;
use deltasync_producer::{Change, Producer};
use deltasync_testkit::NatsServer;
use std::time::Duration;

fn tight(url: &str, pipeline: &str) -> Settings {
    let mut s = support::settings(url, pipeline);
    // Room for 9 envelopes after the newest durable snapshot.
    s.stream.max_messages = 10;
    s.snapshot.every_envelopes = 2;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_over_an_abandoned_transaction_with_tight_retention_snapshots_and_publishes() {
    let server = NatsServer::start();
    let url = server.url();
    let pipeline = support::pipeline("abandoned");
    let settings = tight(&url, &pipeline);
    let js = support::js(&url).await;

    // Envelope 1, covered by the final snapshot at shutdown.
    let p = Producer::start(settings.clone()).await.expect("start");
    let lineage = p.lineage();
    let r = p.commit(vec![Change::put("a", "0")]).await.expect("commit");
    p.shutdown().await.expect("shutdown");
    assert_eq!((r.last_seq, r.stream_seq), (1, 1));

    // A producer that crashed before any further snapshot: five complete transactions
    // (envelopes 2..=6), then parts 1..=4 of a five-part transaction (envelopes 7..=10). The
    // stream holds 10 messages, its limit; the next envelope is 10 past the snapshot, beyond
    // the room of 9.
    let mut model = State::new(lineage);
    model.apply_changes(&[Change::put("a", "0")]);
    let mut envs = Vec::new();
    for i in 2..=6u64 {
        let changes = vec![Change::put(format!("k{i}"), format!("{i}"))];
        let digest = model.apply_changes(&changes);
        envs.extend(split_transaction(lineage, i, digest, 0, changes, 1 << 20));
    }
    let mut torn = model.clone();
    let changes: Vec<Change> = (0..5).map(|j| Change::put(format!("t{j}"), "x")).collect();
    let digest = torn.apply_changes(&changes);
    let parts = split_transaction(lineage, 7, digest, 0, changes, 1);
    assert_eq!(parts.len(), 5);
    envs.extend(parts.into_iter().take(4));
    assert_eq!(
        support::publish_raw(&js, &pipeline, &envs, r.stream_seq).await,
        10
    );

    // Restart over the abandoned parts.
    let p = Producer::start(settings.clone()).await.expect("restart");
    assert_eq!(p.status().seq, 10);
    let observer = p.observer();

    // A snapshot at the last complete transaction (envelope 6, stream sequence 6) is written
    // before anything is published.
    let snap = eventually(
        "a snapshot at the last complete transaction",
        Duration::from_secs(20),
        async || {
            observer
                .status()
                .last_snapshot
                .filter(|s| s.seq >= 6)
                .map(|s| (s.seq, s.stream_seq))
        },
    )
    .await;
    assert_eq!(snap, (6, 6));

    // Publishing is not stuck: commits go through one after the other, each within a
    // deadline, while retention prunes (including the abandoned parts).
    let mut last = None;
    for i in 0..30u64 {
        let changes = vec![Change::put(format!("n{i}"), format!("{i}"))];
        model.apply_changes(&changes);
        let receipt = tokio::time::timeout(Duration::from_secs(20), p.commit(changes))
            .await
            .unwrap_or_else(|_| panic!("commit {i} held back without end: {:?}", p.status()))
            .expect("commit");
        assert_eq!(receipt.digest, model.digest(), "commit {i}");
        last = Some(receipt);
    }
    let last = last.expect("commits");
    assert_eq!(last.last_seq, 10 + 30);
    assert_eq!(
        observer.metrics().snapshot_failures.get(),
        0,
        "no snapshot failed (a cut inside the abandoned transaction would be refused)"
    );
    assert!(p.status().held_back.is_none());

    // A reader bootstrapping from the latest snapshot and following the stream reaches the
    // model.
    let kv = store::bucket(&js, &settings).await.expect("bucket");
    let loaded = store::load_latest(&kv, &settings)
        .await
        .expect("load")
        .expect("a snapshot");
    let mut replica = loaded.state;
    assert!(loaded.manifest.seq > 6, "snapshots moved past the recovery");
    for (stream_seq, item) in support::read_stream(&js, &pipeline).await {
        if stream_seq <= loaded.manifest.stream_seq {
            continue;
        }
        if let Classified::Envelope(env) = item {
            replica.apply(&env).expect("applies after the snapshot");
        }
    }
    assert_eq!(replica.digest(), model.digest());
    assert_eq!(replica.seq(), last.last_seq);

    let status = p.shutdown().await.expect("shutdown");
    assert_eq!(status.seq, last.last_seq);
    assert_eq!(
        observer.metrics().snapshot_failures.get(),
        0,
        "the final snapshot did not fail"
    );

    // A restart recovers the same position and state.
    let p = Producer::start(settings.clone())
        .await
        .expect("second restart");
    assert_eq!(p.lineage(), lineage);
    assert_eq!(
        (p.status().seq, p.status().digest.clone()),
        (last.last_seq, model.digest().to_hex())
    );
    p.shutdown().await.expect("shutdown");
}

/// The snapshot right after a restart over an abandoned transaction: `Producer::snapshot()`
/// and the final snapshot at shutdown cut at the last complete transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_shutdown_over_an_abandoned_transaction_cut_at_the_last_complete_one() {
    let server = NatsServer::start();
    let url = server.url();
    let pipeline = support::pipeline("abandoned-snap");
    let mut settings = support::settings(&url, &pipeline);
    settings.snapshot.every_envelopes = 0;
    let js = support::js(&url).await;

    let p = Producer::start(settings.clone()).await.expect("start");
    let lineage = p.lineage();
    let r = p.commit(vec![Change::put("a", "0")]).await.expect("commit");
    p.shutdown().await.expect("shutdown");

    // Envelope 2 complete, then part 1 of 2 of envelope 3's transaction.
    let mut model = State::new(lineage);
    model.apply_changes(&[Change::put("a", "0")]);
    let changes = vec![Change::put("b", "1")];
    let digest = model.apply_changes(&changes);
    let mut envs = split_transaction(lineage, 2, digest, 0, changes, 1 << 20);
    let mut torn = model.clone();
    let changes = vec![Change::put("t1", "x"), Change::put("t2", "y")];
    let digest = torn.apply_changes(&changes);
    envs.extend(
        split_transaction(lineage, 3, digest, 0, changes, 1)
            .into_iter()
            .take(1),
    );
    let at = support::publish_raw(&js, &pipeline, &envs, r.stream_seq).await;
    assert_eq!(at, 3);

    let p = Producer::start(settings.clone()).await.expect("restart");
    let info = tokio::time::timeout(Duration::from_secs(20), p.snapshot())
        .await
        .expect("the snapshot answers")
        .expect("a snapshot at the last complete transaction");
    assert_eq!((info.seq, info.stream_seq), (2, 2));
    assert_eq!(info.digest, model.digest().to_hex());
    p.shutdown()
        .await
        .expect("shutdown writes nothing more, and does not fail");

    // Shutdown without a snapshot first: the final one is cut at envelope 2 too.
    let kv = store::bucket(&js, &settings).await.expect("bucket");
    let p = Producer::start(settings.clone()).await.expect("restart");
    p.shutdown().await.expect("shutdown");
    let m = store::latest_manifest(&kv)
        .await
        .expect("read")
        .expect("a snapshot");
    assert_eq!((m.seq, m.stream_seq), (2, 2));
}

/// Abandoned parts that, with the next transaction, exceed the retention even counted from a
/// durable snapshot at the last complete transaction: an empty envelope ends them, a snapshot
/// is cut there, and the transaction goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_parts_leaving_no_room_for_the_next_transaction_are_ended_by_an_empty_envelope() {
    let server = NatsServer::start();
    let url = server.url();
    let pipeline = support::pipeline("abandoned-full");
    let mut settings = tight(&url, &pipeline);
    settings.producer.batch_max_bytes = 1024;
    let js = support::js(&url).await;

    // Envelope 1, covered by the final snapshot at shutdown.
    let p = Producer::start(settings.clone()).await.expect("start");
    let lineage = p.lineage();
    let r = p.commit(vec![Change::put("a", "0")]).await.expect("commit");
    p.shutdown().await.expect("shutdown");
    let mut model = State::new(lineage);
    model.apply_changes(&[Change::put("a", "0")]);

    // Parts 1..=7 of an eight-part transaction (envelopes 2..=8): 7 of the room of 9.
    let mut torn = model.clone();
    let changes: Vec<Change> = (0..8).map(|j| Change::put(format!("t{j}"), "x")).collect();
    let digest = torn.apply_changes(&changes);
    let parts = split_transaction(lineage, 2, digest, 0, changes, 1);
    assert_eq!(parts.len(), 8);
    assert_eq!(
        support::publish_raw(&js, &pipeline, &parts[..7], r.stream_seq).await,
        8
    );

    // A transaction of three parts: 7 + 3 past the snapshot at envelope 1 exceed the room.
    let p = Producer::start(settings.clone()).await.expect("restart");
    let observer = p.observer();
    let big = "v".repeat(700);
    let changes: Vec<Change> = (0..3)
        .map(|j| Change::put(format!("n{j}"), big.clone()))
        .collect();
    let digest = model.apply_changes(&changes);
    let receipt = tokio::time::timeout(Duration::from_secs(20), p.commit(changes))
        .await
        .unwrap_or_else(|_| panic!("transaction held back without end: {:?}", p.status()))
        .expect("commit");
    assert_eq!(receipt.parts, 3);
    assert_eq!(receipt.digest, digest);
    assert_eq!(
        receipt.first_seq, 10,
        "one empty envelope (9) after the abandoned parts"
    );
    assert_eq!(observer.metrics().snapshot_failures.get(), 0);
    let items = support::read_stream(&js, &pipeline).await;
    let empty = items.iter().find_map(|(stream_seq, item)| match item {
        Classified::Envelope(e) if e.seq == 9 => Some((*stream_seq, e.parts, e.changes.len())),
        _ => None,
    });
    assert_eq!(empty, Some((9, 1, 0)));

    // A reader from the latest snapshot reaches the model; a restart recovers.
    let status = p.shutdown().await.expect("shutdown");
    assert_eq!(status.seq, 12);
    let kv = store::bucket(&js, &settings).await.expect("bucket");
    let loaded = store::load_latest(&kv, &settings)
        .await
        .expect("load")
        .expect("a snapshot");
    let mut replica = loaded.state;
    for (stream_seq, item) in support::read_stream(&js, &pipeline).await {
        if let Classified::Envelope(env) = item {
            if stream_seq > loaded.manifest.stream_seq {
                replica.apply(&env).expect("applies after the snapshot");
            }
        }
    }
    assert_eq!(replica.digest(), model.digest());
    let p = Producer::start(settings).await.expect("second restart");
    assert_eq!(
        (p.status().seq, p.status().digest.clone()),
        (12, model.digest().to_hex())
    );
    p.shutdown().await.expect("shutdown");
}

/// Through the binary: `ingest` restarted over an abandoned transaction under tight retention
/// publishes everything and exits 0, with no failed snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_over_an_abandoned_transaction_with_tight_retention_exits_zero() {
    let server = NatsServer::start();
    let url = server.url();
    let pipeline = support::pipeline("abandoned-cli");
    let settings = tight(&url, &pipeline);
    let js = support::js(&url).await;

    let p = Producer::start(settings.clone()).await.expect("start");
    let lineage = p.lineage();
    let r = p.commit(vec![Change::put("a", "0")]).await.expect("commit");
    p.shutdown().await.expect("shutdown");
    // Five complete envelopes (2..=6) and four parts of a five-part transaction (7..=10):
    // the next envelope is past the room counted from the snapshot at envelope 1.
    let mut model = State::new(lineage);
    model.apply_changes(&[Change::put("a", "0")]);
    let mut envs = Vec::new();
    for i in 2..=6u64 {
        let changes = vec![Change::put(format!("k{i}"), format!("{i}"))];
        let digest = model.apply_changes(&changes);
        envs.extend(split_transaction(lineage, i, digest, 0, changes, 1 << 20));
    }
    let mut torn = model.clone();
    let changes: Vec<Change> = (0..5).map(|j| Change::put(format!("t{j}"), "x")).collect();
    let digest = torn.apply_changes(&changes);
    envs.extend(
        split_transaction(lineage, 7, digest, 0, changes, 1)
            .into_iter()
            .take(4),
    );
    assert_eq!(
        support::publish_raw(&js, &pipeline, &envs, r.stream_seq).await,
        10
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.ndjson");
    support::write_ndjson(&input, "n", 0..200, 0);
    let child = support::producer_command(&url, &pipeline)
        .env("DELTASYNC_STREAM__MAX_MESSAGES", "10")
        .env("DELTASYNC_SNAPSHOT__EVERY_ENVELOPES", "2")
        .env("DELTASYNC_PRODUCER__BATCH_MAX_CHANGES", "10")
        .arg("ingest")
        .arg(&input)
        .spawn()
        .expect("spawn the producer");
    let mut child = KillOnDrop(child);
    let mut stderr = child.0.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).expect("read stderr");
        s
    });
    // On the old code the first envelope waits for a snapshot that is never written.
    let status = eventually("ingest to exit", Duration::from_secs(60), async || {
        child.0.try_wait().expect("wait")
    })
    .await;
    let stderr = reader.join().expect("stderr reader");
    assert!(status.success(), "{stderr}");
    assert!(!stderr.contains("Snapshot failed"), "{stderr}");

    // The final snapshot covers everything; a restart recovers it.
    let p = Producer::start(settings.clone()).await.expect("restart");
    let seq = p.status().seq;
    p.shutdown().await.expect("shutdown");
    let kv = store::bucket(&js, &settings).await.expect("bucket");
    let loaded = store::load_latest(&kv, &settings)
        .await
        .expect("load")
        .expect("a snapshot");
    assert_eq!(loaded.manifest.seq, seq);
    assert_eq!(loaded.state.len(), model.len() + 200);
    for i in 0..200 {
        assert!(loaded.state.get(&format!("n{i}")).is_some(), "n{i}");
    }
}

/// Kills and reaps the child when a test fails before it exits.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
