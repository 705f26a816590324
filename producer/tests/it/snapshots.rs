//! Snapshot scheduling: cuts every N envelopes, readable and verified, on demand, and the
//! retention check at start-up.

use crate::support::{self, eventually};
use deltasync_nats::store;
use deltasync_producer::{Change, Producer, ProducerError};
use deltasync_testkit::NatsServer;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_written_every_n_envelopes_readable_and_verified() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("snap");
    let mut settings = support::settings(&server.url(), &pipeline);
    settings.snapshot.every_envelopes = 10;
    let p = Producer::start(settings.clone()).await.expect("start");
    let mut last = None;
    let mut round = async |from: u64, to: u64| {
        for i in from..to {
            let changes = (0..20)
                .map(|j| Change::put(format!("k{}", (i * 20 + j) % 300), format!("{i}")))
                .collect();
            last = Some(p.commit(changes).await.expect("commit"));
        }
        // Every 10 envelopes a snapshot (one at a time: a trigger while one is being written
        // waits for it).
        eventually(
            "a snapshot of the round",
            Duration::from_secs(30),
            async || p.status().last_snapshot.filter(|s| s.seq >= to),
        )
        .await
    };
    round(0, 10).await;
    let snap = round(10, 20).await;
    let observer = p.observer();
    let text = observer.metrics_text();
    assert!(
        text.contains("deltasync_producer_snapshots_total 2"),
        "{text}"
    );
    assert!(
        !text.contains("deltasync_producer_snapshot_written_bytes_total 0\n"),
        "{text}"
    );
    for i in 20..25 {
        last = Some(
            p.commit(vec![Change::put(format!("x{i}"), "1")])
                .await
                .expect("commit"),
        );
    }

    // The latest snapshot loads, verifies, and is at the cut it names.
    let js = support::js(&server.url()).await;
    let kv = store::bucket(&js, &settings).await.expect("bucket");
    let loaded = store::load_latest(&kv, &settings)
        .await
        .expect("load")
        .expect("a snapshot");
    assert_eq!(loaded.manifest.seq, snap.seq);
    assert_eq!(loaded.state.digest().to_hex(), snap.digest);

    // On demand, at the head.
    let now = p.snapshot().await.expect("snapshot now");
    let last = last.expect("commits");
    assert_eq!(
        (now.seq, now.digest.clone()),
        (last.last_seq, last.digest.to_hex())
    );
    assert_eq!(now.stream_seq, last.stream_seq);
    p.shutdown().await.expect("shutdown");

    // A restart recovers from it.
    let p = Producer::start(settings).await.expect("restart");
    assert_eq!(p.status().last_snapshot.map(|s| s.seq), Some(last.last_seq));
    assert_eq!(p.status().digest, last.digest.to_hex());
    p.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn the_producer_refuses_retention_that_cannot_cover_two_snapshots() {
    let server = NatsServer::start();
    let mut settings = support::settings(&server.url(), &support::pipeline("retention"));
    settings.snapshot.every = Duration::ZERO;
    let err = Producer::start(settings)
        .await
        .expect_err("age-limited stream without time-based snapshots");
    assert!(matches!(err, ProducerError::Settings(_)), "{err}");
    assert!(err.to_string().contains("snapshot.every"), "{err}");

    let mut settings = support::settings(&server.url(), &support::pipeline("retention"));
    settings.stream.max_bytes = 1024 * 1024;
    let err = Producer::start(settings)
        .await
        .expect_err("stream too small for two envelopes");
    assert!(err.to_string().contains("stream.max_bytes"), "{err}");
}
