//! The consumer against the real producer (`deltasync-producer`): a fleet converging on its
//! digest while it publishes and snapshots, and an operator starting a new lineage.
//!
//! Talks to nats-server through the producer library and the consumer library.

use crate::support::*;
use deltasync_consumer::Reason;
use deltasync_producer::{Change, NewLineage, Producer};
use deltasync_shared::settings::Settings;
use deltasync_testkit::NatsServer;
use std::time::Duration;

fn producer_settings(url: &str, prefix: &str) -> Settings {
    settings(url, &unique_pipeline(prefix), |s| {
        s.producer.linger = Duration::from_millis(2);
        s.producer.batch_max_changes = 500;
    })
}

async fn wait_all(consumers: &[Running], lineage: String, seq: u64, digest: String) {
    for c in consumers {
        let s = c.wait_until(|s| s.lineage == lineage && s.seq == seq).await;
        assert_eq!(
            s.digest, digest,
            "replica {} has the producer's digest",
            s.id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_consumers_converge_to_the_real_producers_digest() {
    logs();
    let server = NatsServer::start();
    let settings = producer_settings(&server.url(), "fleet");
    let producer = Producer::start(settings.clone()).await.unwrap();
    for i in 0..5000u32 {
        producer
            .submit(Change::put(key(i as usize), value(1, i as usize)))
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();
    producer.snapshot().await.unwrap();

    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let consumers = vec![
        Running::start(settings.clone(), durable("fleet-a", dirs[0].path())),
        Running::start(settings.clone(), durable("fleet-b", dirs[1].path())),
        Running::start(settings.clone(), ephemeral("fleet-c")),
    ];
    // Keep publishing while they bootstrap and follow: batched changes, transactions, deletes,
    // and a snapshot in the middle.
    for round in 0..6u32 {
        for i in 0..2000u32 {
            let k = ((i * 7919 + round * 131) % 6000) as usize;
            producer
                .submit(Change::put(key(k), value(2 + round as u8, i as usize)))
                .await
                .unwrap();
        }
        producer
            .commit(vec![
                Change::delete(key(round as usize)),
                Change::put(format!("txn-{round}"), b"{\"ok\":true}".to_vec()),
            ])
            .await
            .unwrap();
        if round == 2 {
            producer.snapshot().await.unwrap();
        }
    }
    let position = producer.flush().await.unwrap();
    wait_all(
        &consumers,
        position.lineage.to_hex(),
        position.seq,
        position.digest.to_hex(),
    )
    .await;
    for c in consumers {
        c.stop().await;
    }
    producer.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_lineage_started_by_the_operator_is_resynced_downloading_only_what_differs() {
    logs();
    let server = NatsServer::start();
    let settings = producer_settings(&server.url(), "newlineage");
    let producer = Producer::start(settings.clone()).await.unwrap();
    producer
        .commit(
            (0..3000)
                .map(|i| Change::put(key(i), value(1, i)))
                .collect(),
        )
        .await
        .unwrap();
    producer.snapshot().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = Running::start(settings.clone(), durable("nl-1", dir.path()));
    let old = producer.flush().await.unwrap();
    c.wait_until(|s| s.seq == old.seq).await;
    producer.shutdown().await.unwrap();

    // The operator starts a new lineage keeping the state, then publishes on it.
    let producer = Producer::start_new_lineage(settings.clone(), NewLineage::KeepState)
        .await
        .unwrap();
    producer
        .commit(vec![Change::put(key(1), value(9, 1))])
        .await
        .unwrap();
    let position = producer.flush().await.unwrap();
    assert_ne!(position.lineage, old.lineage);
    let s = c
        .wait_until(|s| s.lineage == position.lineage.to_hex() && s.seq == position.seq)
        .await;
    assert_eq!(s.digest, position.digest.to_hex());
    assert_eq!(
        s.decisions.get(Reason::LineageChanged.as_str()),
        Some(&1),
        "{:?}",
        s.decisions
    );
    let last = s.last_resync.unwrap();
    assert_eq!(last.reason, Reason::LineageChanged);
    assert_eq!(
        last.bytes_fetched, 0,
        "the new lineage starts from the same state: nothing differs"
    );
    c.stop().await;
    producer.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_empty_lineage_started_by_the_operator_is_followed_from_the_empty_state() {
    logs();
    let server = NatsServer::start();
    let settings = producer_settings(&server.url(), "newempty");
    let producer = Producer::start(settings.clone()).await.unwrap();
    producer
        .commit(
            (0..3000)
                .map(|i| Change::put(key(i), value(1, i)))
                .collect(),
        )
        .await
        .unwrap();
    producer.snapshot().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = Running::start(settings.clone(), durable("ne-1", dir.path()));
    let old = producer.flush().await.unwrap();
    c.wait_until(|s| s.seq == old.seq).await;
    producer.shutdown().await.unwrap();

    // The operator starts a new lineage from the empty state, then publishes on it.
    let producer = Producer::start_new_lineage(settings.clone(), NewLineage::Empty)
        .await
        .unwrap();
    producer
        .commit(vec![Change::put(key(1), value(9, 1))])
        .await
        .unwrap();
    let position = producer.flush().await.unwrap();
    assert_ne!(position.lineage, old.lineage);
    let s = c
        .wait_until(|s| s.lineage == position.lineage.to_hex() && s.seq == position.seq)
        .await;
    assert_eq!(s.digest, position.digest.to_hex());
    assert_eq!(s.entries, 1, "only what the new lineage holds");
    assert_eq!(
        s.decisions.get(Reason::LineageChanged.as_str()),
        Some(&1),
        "{:?}",
        s.decisions
    );
    let last = s.last_resync.unwrap();
    assert_eq!(last.reason, Reason::LineageChanged);
    assert_eq!(last.bytes_fetched, 0, "the empty state needs no download");
    c.stop().await;
    producer.shutdown().await.unwrap();
}
