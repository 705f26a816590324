//! Fencing: a second writer on the pipeline stops the first, and the history stays clean.

use crate::support::{self, read_stream, replay};
use deltasync_core::State;
use deltasync_nats::store::{self, StoreError};
use deltasync_producer::{Change, NewLineage, Producer, ProducerError};
use deltasync_testkit::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_producer_on_the_same_pipeline_fences_the_first() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("fence");
    let first = Producer::start(support::settings(&server.url(), &pipeline))
        .await
        .expect("start first");
    for i in 0..3 {
        first
            .commit(vec![Change::put(format!("a{i}"), "1")])
            .await
            .expect("commit");
    }
    let second = Producer::start(support::settings(&server.url(), &pipeline))
        .await
        .expect("start second");
    assert_eq!(
        second.lineage(),
        first.lineage(),
        "a restart continues the lineage"
    );
    assert_eq!(second.status().seq, 3);
    let taken = second
        .commit(vec![Change::put("b", "2")])
        .await
        .expect("second commits");
    assert_eq!(taken.first_seq, 4);

    let err = first
        .commit(vec![Change::put("zombie", "x")])
        .await
        .expect_err("the first is fenced");
    assert!(err.is_fenced(), "{err}");
    let ProducerError::Fenced {
        expected_seq,
        found,
        stream_seq,
        last_acknowledged_seq,
        ..
    } = &err
    else {
        panic!("not a Fenced error: {err}");
    };
    assert_eq!(
        (*expected_seq, *last_acknowledged_seq, *stream_seq),
        (4, 3, taken.stream_seq)
    );
    assert!(
        found.contains(&format!("envelope {}:4", first.lineage())),
        "{found}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("fenced") && msg.contains("another producer"),
        "{msg}"
    );
    // Every later call reports the same fence, and health says so.
    let again = first
        .commit(vec![Change::put("zombie2", "x")])
        .await
        .expect_err("still fenced");
    assert!(again.is_fenced(), "{again}");
    assert!(!first.observer().healthy());
    assert!(first
        .shutdown()
        .await
        .expect_err("shutdown reports the fence")
        .is_fenced());

    let next = second
        .commit(vec![Change::put("c", "3")])
        .await
        .expect("the second carries on");
    assert_eq!(next.first_seq, 5);
    second.shutdown().await.expect("shutdown");

    let js = support::js(&server.url()).await;
    let replayed = replay(&read_stream(&js, &pipeline).await);
    assert_eq!(replayed.envelopes.len(), 5);
    assert!(replayed.state.get("zombie").is_none() && replayed.state.get("zombie2").is_none());
    assert_eq!(replayed.state.digest(), next.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_is_fenced_when_an_operator_starts_a_new_lineage() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("fence-lineage");
    let old = Producer::start(support::settings(&server.url(), &pipeline))
        .await
        .expect("start");
    old.commit(vec![Change::put("a", "1")])
        .await
        .expect("commit");
    old.commit(vec![Change::put("b", "1")])
        .await
        .expect("commit");

    let new = Producer::start_new_lineage(
        support::settings(&server.url(), &pipeline),
        NewLineage::Empty,
    )
    .await
    .expect("new lineage");
    assert_ne!(new.lineage(), old.lineage());
    let r = new
        .commit(vec![Change::put("x", "1")])
        .await
        .expect("commit on the new lineage");
    assert_eq!(r.first_seq, 2, "after the new lineage's marker, envelope 1");

    let err = old
        .commit(vec![Change::put("c", "1")])
        .await
        .expect_err("the old producer is fenced");
    let ProducerError::Fenced { found, .. } = &err else {
        panic!("{err}")
    };
    assert!(
        found.contains(&format!("envelope {}:1", new.lineage()))
            && found.contains("another lineage"),
        "{found}"
    );
    new.shutdown().await.expect("shutdown");
    let _ = old.shutdown().await;

    let js = support::js(&server.url()).await;
    let replayed = replay(&read_stream(&js, &pipeline).await);
    assert_eq!(replayed.lineages.len(), 2);
    assert_eq!(replayed.envelopes.len(), 4);

    // A restart now continues the NEW lineage from its snapshot at the marker.
    let again = Producer::start(support::settings(&server.url(), &pipeline))
        .await
        .expect("restart");
    assert_eq!(again.lineage(), replayed.lineages[1]);
    assert_eq!(again.status().seq, 2);
    assert_eq!(
        again
            .commit(vec![Change::put("y", "2")])
            .await
            .expect("commit")
            .first_seq,
        3
    );
    again.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_lineage_fences_the_old_producer_at_once_and_its_snapshot_cannot_move_latest_back() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("new-lineage-fence");
    let settings = support::settings(&server.url(), &pipeline);
    let old = Producer::start(settings.clone()).await.expect("start");
    old.commit(vec![Change::put("a", "1")])
        .await
        .expect("commit");
    let b = old
        .commit(vec![Change::put("b", "2")])
        .await
        .expect("commit");

    // The new lineage publishes nothing of its own yet.
    let new = Producer::start_new_lineage(settings.clone(), NewLineage::Empty)
        .await
        .expect("new lineage");

    // The old producer's next commit is fenced, clearly.
    let err = old
        .commit(vec![Change::put("c", "3")])
        .await
        .expect_err("the old producer is fenced by the marker");
    assert!(err.is_fenced(), "{err}");
    assert!(err.to_string().contains("fenced"), "{err}");
    assert_eq!(new.status().seq, 1, "the marker");
    assert!(new.status().stream_seq > b.stream_seq);

    // Its cut (what its snapshot task would write) cannot move latest back to the old lineage.
    let mut cut = State::new(old.lineage());
    cut.apply_changes(&[Change::put("a", "1"), Change::put("b", "2")]);
    cut.set_position(old.lineage(), b.last_seq);
    assert_eq!(cut.digest(), b.digest);
    let js = support::js(&server.url()).await;
    let err = store::write_snapshot(&js, &settings, &cut, b.stream_seq, None)
        .await
        .expect_err("a zombie's cut behind the new lineage");
    assert!(matches!(err, StoreError::Stale { .. }), "{err}");
    let kv = store::bucket(&js, &settings).await.expect("bucket");
    let latest = store::latest_manifest(&kv)
        .await
        .expect("read")
        .expect("latest");
    assert_eq!((latest.lineage, latest.seq), (new.lineage(), 1));

    // The new lineage carries on.
    let r = new
        .commit(vec![Change::put("d", "4")])
        .await
        .expect("commit on the new lineage");
    assert_eq!(r.first_seq, 2);
    let lineages = vec![old.lineage(), new.lineage()];
    new.shutdown().await.expect("shutdown");
    let _ = old.shutdown().await;
    let replayed = replay(&read_stream(&js, &pipeline).await);
    assert_eq!(replayed.lineages, lineages);
    assert_eq!(replayed.envelopes.len(), 4, "a, b, the marker, d");
    assert_eq!(replayed.state.get("c"), None);
    assert_eq!(replayed.state.digest(), r.digest);
}
