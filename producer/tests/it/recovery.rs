//! Recovery: restarts continue the lineage; kill -9 with publishes in flight leaves no gap.

use crate::support::{self, eventually, last_stream_seq, read_stream, replay};
use deltasync_producer::{Change, Producer};
use deltasync_testkit::NatsServer;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_producer_continues_the_same_lineage_and_sequence() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("restart");
    let p = Producer::start(support::settings(&server.url(), &pipeline))
        .await
        .expect("start");
    let lineage = p.lineage();
    let r = p
        .commit(vec![Change::put("a", "1"), Change::put("b", "2")])
        .await
        .expect("commit");
    p.shutdown().await.expect("shutdown");

    let p = Producer::start(support::settings(&server.url(), &pipeline))
        .await
        .expect("restart");
    assert_eq!(p.lineage(), lineage);
    let status = p.status();
    assert_eq!(
        (status.seq, status.digest.clone()),
        (r.last_seq, r.digest.to_hex())
    );
    let next = p.commit(vec![Change::delete("a")]).await.expect("commit");
    assert_eq!(next.first_seq, r.last_seq + 1);
    p.shutdown().await.expect("shutdown");
    let js = support::js(&server.url()).await;
    let replayed = replay(&read_stream(&js, &pipeline).await);
    assert_eq!(replayed.lineages, vec![lineage]);
    assert_eq!(replayed.state.digest(), next.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_an_ingesting_producer_leaves_no_gap_and_a_restart_continues_the_lineage() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("kill9");
    let dir = tempfile::tempdir().expect("tempdir");
    let big = dir.path().join("big.ndjson");
    support::write_ndjson(&big, "big", 0..1_000_000, 997);
    let js = support::js(&server.url()).await;

    // Small envelopes and a wide window: many publishes are in flight when the kill lands.
    let mut child = support::producer_command(&server.url(), &pipeline)
        .env("DELTASYNC_PRODUCER__BATCH_MAX_CHANGES", "200")
        .env("DELTASYNC_PRODUCER__ACK_WINDOW", "512")
        .arg("ingest")
        .arg(&big)
        .spawn()
        .expect("spawn the producer");
    eventually(
        "the child to publish 300 envelopes",
        Duration::from_secs(60),
        async || (last_stream_seq(&js, &pipeline).await >= 300).then_some(()),
    )
    .await;
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("reap");
    assert!(!status.success());
    let before = replay(&read_stream(&js, &pipeline).await);
    assert!(before.envelopes.len() >= 300);
    assert!(
        before.state.len() < 1_000_000,
        "the kill landed before the end ({} keys)",
        before.state.len()
    );

    let small = dir.path().join("small.ndjson");
    support::write_ndjson(&small, "after", 0..1_000, 0);
    let out = support::producer_command(&server.url(), &pipeline)
        .arg("ingest")
        .arg(&small)
        .output()
        .expect("run the producer again");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "second run failed: {stderr}");
    assert!(stderr.contains("continuing its lineage"), "{stderr}");

    let after = replay(&read_stream(&js, &pipeline).await);
    assert_eq!(
        after.lineages, before.lineages,
        "same lineage after the restart"
    );
    assert!(after.envelopes.len() > before.envelopes.len());
    for i in 0..1_000 {
        assert!(
            after.state.get(&format!("after{i}")).is_some(),
            "after{i} missing"
        );
    }
    // Everything the killed run got into the stream is still there, and nothing twice.
    assert_eq!(after.state.len(), before.state.len() + 1_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_restart_mid_stream_loses_and_duplicates_nothing() {
    let mut server = NatsServer::start();
    let pipeline = support::pipeline("server-restart");
    let mut settings = support::settings(&server.url(), &pipeline);
    settings.producer.batch_max_changes = 50;
    settings.nats.request_timeout = Duration::from_secs(2);
    let producer = std::sync::Arc::new(Producer::start(settings).await.expect("start"));
    let n = 30_000u64;
    let feeder = {
        let producer = producer.clone();
        tokio::spawn(async move {
            for i in 0..n {
                producer
                    .submit(Change::put(format!("k{i}"), format!("{i}")))
                    .await
                    .expect("submit");
                if i % 500 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            producer.flush().await.expect("flush after the restart")
        })
    };
    let js = support::js(&server.url()).await;
    eventually(
        "100 envelopes before the restart",
        Duration::from_secs(30),
        async || (last_stream_seq(&js, &pipeline).await >= 100).then_some(()),
    )
    .await;
    server.kill9();
    server.start_again();
    let position = feeder.await.expect("feeder");
    let producer = std::sync::Arc::into_inner(producer).expect("the only handle");
    producer.shutdown().await.expect("shutdown");

    let js = support::js(&server.url()).await;
    let replayed = replay(&read_stream(&js, &pipeline).await);
    assert_eq!(replayed.envelopes.len() as u64, position.seq);
    assert_eq!(replayed.state.len() as u64, n);
    assert_eq!(replayed.state.digest(), position.digest);
}
