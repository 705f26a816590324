//! Publishing: gapless pipelined sequences, multi-part transactions, deduplication, foreign
//! messages.

use crate::support::{self, read_stream, replay};
use async_nats::jetstream::context::PublishErrorKind;
use bytes::Bytes;
use deltasync_core::codec::encode_envelope;
use deltasync_core::envelope::{split_transaction, Lineage};
use deltasync_core::{names, State};
use deltasync_producer::publisher::envelope_message;
use deltasync_producer::{Change, Producer};
use deltasync_testkit::{NatsCluster, NatsServer};
use std::time::Duration;

/// Submits `n` changes through the batched path with a transaction every 1000, flushes, and
/// checks the stream replays to exactly the producer's state.
async fn pipelined_run(url: &str, replicas: usize) {
    let pipeline = support::pipeline("pipelined");
    let mut settings = support::settings(url, &pipeline);
    settings.stream.replicas = replicas;
    settings.snapshot.replicas = replicas;
    settings.producer.batch_max_changes = 50;
    settings.producer.ack_window = 64;
    let producer = Producer::start(settings).await.expect("start");
    let n = 20_000u64;
    let mut expected = State::new(Lineage::default());
    for i in 0..n {
        let c = Change::put(format!("k{}", i % 5_000), format!("v{i}"));
        expected.apply_changes(std::slice::from_ref(&c));
        if i % 1_000 == 999 {
            let d = Change::delete(format!("k{}", (i * 7) % 5_000));
            expected.apply_changes(std::slice::from_ref(&d));
            producer.submit(c).await.expect("submit");
            producer.commit(vec![d]).await.expect("commit");
        } else {
            producer.submit(c).await.expect("submit");
        }
    }
    let position = producer.flush().await.expect("flush");
    let status = producer.shutdown().await.expect("shutdown");
    assert_eq!(status.seq, position.seq);
    assert!(
        position.seq > 400,
        "batches of 50 make hundreds of envelopes: {}",
        position.seq
    );

    let js = support::js(url).await;
    let replayed = replay(&read_stream(&js, &pipeline).await);
    assert_eq!(replayed.envelopes.len() as u64, position.seq);
    assert_eq!(replayed.lineages.len(), 1);
    assert_eq!(replayed.state.digest(), expected.digest());
    assert_eq!(replayed.state.digest(), position.digest);
    assert_eq!(replayed.state, expected);
    let changes: usize = replayed.envelopes.iter().map(|e| e.changes.len()).sum();
    assert_eq!(changes as u64, n + n / 1_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_envelopes_are_gapless_and_their_digests_chain() {
    let server = NatsServer::start();
    pipelined_run(&server.url(), 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_envelopes_stay_gapless_on_a_three_node_cluster_with_three_replicas() {
    let cluster = NatsCluster::start(3);
    pipelined_run(&cluster.urls().join(","), 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_larger_than_one_message_is_split_into_parts_applied_atomically() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("multipart");
    let mut settings = support::settings(&server.url(), &pipeline);
    settings.producer.batch_max_bytes = 64 * 1024;
    let producer = Producer::start(settings).await.expect("start");
    producer
        .commit(vec![Change::put("before", "1")])
        .await
        .expect("commit");
    let big: Vec<Change> = (0..3_000)
        .map(|i| Change::put(format!("big/{i:05}"), vec![b'x'; 100]))
        .collect();
    let receipt = producer.commit(big).await.expect("big commit");
    assert!(receipt.parts >= 4, "{receipt:?}");
    assert_eq!(
        receipt.last_seq - receipt.first_seq + 1,
        u64::from(receipt.parts)
    );
    assert_eq!(receipt.changes, 3_000);
    let after = producer
        .commit(vec![Change::put("after", "2")])
        .await
        .expect("commit");
    assert_eq!(after.first_seq, receipt.last_seq + 1);
    producer.shutdown().await.expect("shutdown");

    let js = support::js(&server.url()).await;
    let items = read_stream(&js, &pipeline).await;
    let parts: Vec<_> = items
        .iter()
        .filter_map(|(_, i)| match i {
            deltasync_core::recovery::Classified::Envelope(e) if e.parts > 1 => Some(e.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(parts.len() as u32, receipt.parts);
    for e in &parts {
        assert_eq!(e.digest, receipt.digest);
        let len = encode_envelope(e).expect("encode").len();
        assert!(len < 64 * 1024 + 1024, "part {} is {len} bytes", e.part);
    }

    // A replica applies nothing of the transaction until its last part arrives.
    let mut replica = State::new(parts[0].lineage);
    for (_, item) in &items {
        let deltasync_core::recovery::Classified::Envelope(e) = item else {
            continue;
        };
        replica.apply(e).expect("apply");
        if e.parts > 1 && !e.is_last_part() {
            assert!(
                replica.get("big/00000").is_none(),
                "part {} applied early",
                e.part
            );
        }
    }
    assert_eq!(replica.len(), 3_002);
    assert_eq!(replica.seq(), after.last_seq);
}

#[tokio::test]
async fn a_retried_publish_is_deduplicated_to_the_same_stream_sequence() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("dedup");
    let settings = support::settings(&server.url(), &pipeline);
    // Let the producer create the stream and publish envelope 1, then retry envelope 2 by hand
    // exactly as the publisher sends it.
    let producer = Producer::start(settings).await.expect("start");
    let first = producer
        .commit(vec![Change::put("a", "1")])
        .await
        .expect("commit");
    let lineage = producer.lineage();
    producer.shutdown().await.expect("shutdown");

    let mut state = State::new(lineage);
    state.apply_changes(&[Change::put("a", "1")]);
    let digest = state.apply_changes(&[Change::put("b", "2")]);
    let env =
        split_transaction(lineage, 2, digest, 0, vec![Change::put("b", "2")], 1 << 20).remove(0);
    let payload = Bytes::from(encode_envelope(&env).expect("encode"));
    let js = support::js(&server.url()).await;
    let subject = names::subject(&pipeline);
    let send = |msg: async_nats::jetstream::message::PublishMessage| {
        let js = js.clone();
        let subject = subject.clone();
        async move { js.send_publish(subject, msg).await.expect("send").await }
    };
    let once = send(envelope_message(
        payload.clone(),
        lineage,
        2,
        first.stream_seq,
        false,
    ))
    .await
    .expect("stored");
    assert!(!once.duplicate);

    // The same message again (same id, same expected last sequence): nats-server 2.14 checks
    // the expected last sequence first, so a stale retry can never store a second copy.
    let stale = send(envelope_message(
        payload.clone(),
        lineage,
        2,
        first.stream_seq,
        false,
    ))
    .await
    .expect_err("a stale retry is refused");
    assert_eq!(stale.kind(), PublishErrorKind::WrongLastSequence);

    // A retry that expects the stream as it now is (what the publisher sends after reading
    // the stream back) is deduplicated by its message id: same stream sequence, duplicate.
    let again = send(envelope_message(
        payload.clone(),
        lineage,
        2,
        once.sequence,
        false,
    ))
    .await
    .expect("deduplicated");
    assert!(again.duplicate, "{again:?}");
    assert_eq!(again.sequence, once.sequence);
    // And so is a bare retry with only the message id.
    let bare = async_nats::jetstream::message::PublishMessage::build()
        .payload(payload)
        .message_id(names::msg_id(&lineage.to_hex(), 2));
    let bare = send(bare).await.expect("deduplicated");
    assert!(bare.duplicate && bare.sequence == once.sequence, "{bare:?}");
    let replayed = replay(&read_stream(&js, &pipeline).await);
    assert_eq!(replayed.envelopes.len(), 2, "one copy of envelope 2");

    // A producer restarted on the pipeline continues after the retried envelope.
    let producer = Producer::start(support::settings(&server.url(), &pipeline))
        .await
        .expect("restart");
    let next = producer
        .commit(vec![Change::put("c", "3")])
        .await
        .expect("commit");
    assert_eq!((next.first_seq, producer.lineage()), (3, lineage));
    producer.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_message_in_the_subject_is_counted_and_publishing_continues() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("foreign");
    let mut settings = support::settings(&server.url(), &pipeline);
    // Small envelopes keep the ack window full, so foreign messages land between pipelined
    // publishes.
    settings.producer.batch_max_changes = 10;
    settings.producer.ack_window = 256;
    let producer = Producer::start(settings).await.expect("start");
    producer
        .commit(vec![Change::put("a", "1")])
        .await
        .expect("commit");
    let js = support::js(&server.url()).await;
    let subject = names::subject(&pipeline);
    js.publish(
        subject.clone(),
        Bytes::from_static(b"hello, not an envelope"),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");
    let second = producer
        .commit(vec![Change::put("b", "2")])
        .await
        .expect("commit after a foreign message");
    assert_eq!(second.first_seq, 2);
    assert_eq!(producer.status().foreign_messages, 1);
    assert!(producer
        .observer()
        .metrics_text()
        .contains("deltasync_producer_foreign_messages_total 1"));

    // Foreign messages racing a pipelined stream of envelopes.
    let spam = {
        let js = js.clone();
        let subject = subject.clone();
        tokio::spawn(async move {
            for i in 0..50 {
                js.publish(subject.clone(), Bytes::from(format!("garbage {i}")))
                    .await
                    .expect("publish")
                    .await
                    .expect("ack");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    for i in 0..50_000 {
        producer
            .submit(Change::put(format!("k{}", i % 997), format!("{i}")))
            .await
            .expect("submit");
        if i % 2_000 == 0 {
            tokio::task::yield_now().await;
        }
    }
    spam.await.expect("spam task");
    let last = producer
        .commit(vec![Change::put("last", "x")])
        .await
        .expect("commit");
    assert_eq!(producer.status().foreign_messages, 51);
    let status = producer.shutdown().await.expect("shutdown");
    assert_eq!(status.seq, last.last_seq);

    let replayed = replay(&read_stream(&js, &pipeline).await);
    assert_eq!(replayed.foreign, 51);
    assert_eq!(replayed.envelopes.len() as u64, last.last_seq);
    assert_eq!(replayed.state.digest(), last.digest);
}
