//! The consumer against the real producer (`deltasync-producer`): a fleet converging on its
//! digest while it publishes and snapshots, and an operator starting a new lineage.
//!
//! Talks to nats-server through the producer library and the consumer library.

use crate::support::*;
use deltasync_config::settings::Settings;
use deltasync_consumer::Reason;
use deltasync_producer::{Change, NewLineage, Producer};
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

/// A durable replica follows 3000 keys, the producer stops, the operator starts a new lineage
/// `from` and commits one change on it. Returns the replica's status once it follows the new
/// lineage there (after checking the digest and that one lineage change was recorded), with
/// the replica and the producer still running.
async fn a_new_lineage_from(
    server: &NatsServer,
    name: &str,
    from: NewLineage,
) -> (deltasync_consumer::Status, Running, Producer) {
    let settings = producer_settings(&server.url(), name);
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
    let c = Running::start(settings.clone(), durable(&format!("{name}-1"), dir.path()));
    let old = producer.flush().await.unwrap();
    c.wait_until(|s| s.seq == old.seq).await;
    producer.shutdown().await.unwrap();

    // The operator starts a new lineage, then publishes on it.
    let producer = Producer::start_new_lineage(settings.clone(), from)
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
    assert_eq!(
        s.last_resync.as_ref().unwrap().reason,
        Reason::LineageChanged
    );
    (s, c, producer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_lineage_started_by_the_operator_is_resynced_downloading_only_what_differs() {
    logs();
    let server = NatsServer::start();
    let (s, c, producer) = a_new_lineage_from(&server, "newlineage", NewLineage::KeepState).await;
    assert_eq!(
        s.last_resync.unwrap().bytes_fetched,
        0,
        "the new lineage starts from the same state: nothing differs"
    );
    c.stop().await;
    producer.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_empty_lineage_started_by_the_operator_is_followed_from_the_empty_state() {
    logs();
    let server = NatsServer::start();
    let (s, c, producer) = a_new_lineage_from(&server, "newempty", NewLineage::Empty).await;
    assert_eq!(s.entries, 1, "only what the new lineage holds");
    assert_eq!(
        s.last_resync.unwrap().bytes_fetched,
        0,
        "the empty state needs no download"
    );
    c.stop().await;
    producer.shutdown().await.unwrap();
}
