//! Snapshots in the bucket and recovery from the stream, against a real nats-server: write,
//! verified load, incremental writes and re-snapshots, fencing of writers, corruption, gc.
//!
//! Talks to nats-server through `deltasync_nats`; publishes
//! envelopes and tampers with the bucket through plain async-nats calls.

use crate::support::{puts, Pipeline};
use deltasync_core::codec::encode_envelope;
use deltasync_core::envelope::split_transaction;
use deltasync_core::recovery::Classified;
use deltasync_core::snapshot::{chunk_key, LATEST_KEY};
use deltasync_core::{names, Change, Lineage, State};
use deltasync_nats::history;
use deltasync_nats::store::{self, StoreError};
use std::time::Duration;

#[tokio::test]
async fn a_snapshot_written_to_the_bucket_loads_back_verified() {
    let mut p = Pipeline::start("snap-load").await;
    p.commit(puts(0..5000, 1), 256 * 1024).await;
    p.commit(vec![Change::delete("key-0000007")], 1 << 20).await;
    let m = p.snapshot(None).await;
    assert_eq!((m.seq, m.stream_seq), (p.state.seq(), p.stream_seq));
    assert!(m.ranges.iter().map(|r| r.chunks.len()).sum::<usize>() > 1);

    let loaded = store::load_latest(&p.kv, &p.settings)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(loaded.state, p.state);
    assert_eq!(loaded.state.digest(), p.state.digest());
    assert_eq!(
        (loaded.state.lineage(), loaded.state.seq()),
        (p.state.lineage(), p.state.seq())
    );
    assert_eq!(loaded.bytes_fetched, m.total_bytes());

    // Its progress counts every byte and entry it planned, and fetched them all.
    let progress = store::SyncProgress::default();
    store::load_with_progress(&p.kv, m.clone(), &progress)
        .await
        .unwrap();
    assert_eq!(progress.planned_bytes(), m.total_bytes());
    assert_eq!(progress.fetched_bytes(), m.total_bytes());
    assert_eq!(progress.planned_entries(), m.entries);
    assert_eq!(progress.fetched_entries(), m.entries);
}

#[tokio::test]
async fn an_incremental_snapshot_writes_a_small_fraction_and_a_replica_behind_fetches_only_it() {
    let mut p = Pipeline::start("snap-incr").await;
    p.commit(puts(0..20_000, 1), 512 * 1024).await;
    let m1 = p.snapshot(None).await;
    let s1 = p.state.clone();
    let l1 = store::load(&p.kv, m1.clone()).await.unwrap();

    // 1% churn, spread over the whole key space.
    let churn: Vec<Change> = (0..200)
        .map(|i| Change::put(format!("key-{:07}", i * 97), vec![2; 100]))
        .collect();
    p.commit(churn, 1 << 20).await;
    let m2 = p.snapshot(Some((&l1.manifest, &s1))).await;
    assert_eq!(m2.base_seq, m1.seq, "stacked on the same base");
    assert!(
        m2.bytes_written * 20 < m1.bytes_written,
        "incremental wrote {} bytes, the full snapshot {}",
        m2.bytes_written,
        m1.bytes_written
    );

    // A replica at the first snapshot catches up by fetching the segment alone.
    let mut replica = s1.clone();
    let report = store::resync(&p.kv, &mut replica, &m2).await.unwrap();
    assert_eq!(replica, p.state);
    assert_eq!(report.ranges_rebuilt, 0);
    assert_eq!(report.bytes_fetched, m2.segment_bytes());
    assert!(report.bytes_fetched * 20 < m2.total_bytes());
}

#[tokio::test]
async fn a_diverged_replica_rebuilds_only_the_ranges_that_differ() {
    let mut p = Pipeline::start("snap-repair").await;
    p.commit(puts(0..20_000, 1), 512 * 1024).await;
    let m = p.snapshot(None).await;

    let mut replica = p.state.clone();
    replica.apply_changes(&[
        Change::put("key-0000042", &b"tampered"[..]),
        Change::delete("key-0001000"),
    ]);
    let progress = store::SyncProgress::default();
    let report = store::resync_with_progress(&p.kv, &mut replica, &m, &progress)
        .await
        .unwrap();
    assert_eq!(replica, p.state);
    assert!(report.ranges_rebuilt <= 2, "{report:?}");
    // The plan is what differs, not the whole snapshot, and it is all fetched.
    assert_eq!(progress.planned_bytes(), report.bytes_fetched);
    assert_eq!(progress.fetched_bytes(), report.bytes_fetched);
    assert!(
        progress.planned_entries() < m.entries / 10,
        "{}",
        progress.planned_entries()
    );
    assert!(
        report.bytes_fetched * 10 < m.total_bytes(),
        "fetched {} of {}",
        report.bytes_fetched,
        m.total_bytes()
    );
}

#[tokio::test]
async fn a_writer_whose_state_is_not_in_the_stream_cannot_move_latest() {
    let mut p = Pipeline::start("snap-fence").await;
    p.commit(puts(0..10, 1), 1 << 20).await;
    p.snapshot(None).await;

    // A zombie with another lineage claiming the same position.
    let mut zombie = State::new(Lineage::random());
    zombie.apply_changes(&puts(0..10, 9));
    zombie.set_position(zombie.lineage(), p.state.seq());
    let err = store::write_snapshot(&p.js, &p.settings, &zombie, p.stream_seq, None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotInHistory { .. }), "{err}");

    // The real writer cannot move latest backwards either.
    let old = p.state.clone();
    let old_stream_seq = p.stream_seq;
    p.commit(puts(10..20, 1), 1 << 20).await;
    p.snapshot(None).await;
    let err = store::write_snapshot(&p.js, &p.settings, &old, old_stream_seq, None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Stale { .. }), "{err}");
    let latest = store::latest_manifest(&p.kv).await.unwrap().unwrap();
    assert_eq!(latest.seq, p.state.seq());

    // An operator starts a new lineage at the stream's head; the old lineage's writer (a
    // zombie that has not published since) cannot move latest back to the old lineage.
    let zombie = p.state.clone();
    let zombie_stream_seq = p.stream_seq;
    p.state = State::new(Lineage::random());
    p.commit(puts(0..5, 7), 1 << 20).await;
    p.snapshot(None).await;
    let err = store::write_snapshot(&p.js, &p.settings, &zombie, zombie_stream_seq, None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Stale { .. }), "{err}");
    let latest = store::latest_manifest(&p.kv).await.unwrap().unwrap();
    assert_eq!(latest.lineage, p.state.lineage());
}

#[tokio::test]
async fn a_corrupted_or_missing_chunk_fails_the_load_naming_the_key() {
    let mut p = Pipeline::start("snap-corrupt").await;
    p.commit(puts(0..2000, 1), 512 * 1024).await;
    let m = p.snapshot(None).await;
    let key = chunk_key(&m.ranges[3].chunks[0].hash);

    p.kv.put(&key, bytes::Bytes::from_static(b"garbage"))
        .await
        .unwrap();
    let err = store::load_latest(&p.kv, &p.settings).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(&key), "{err}");

    p.kv.purge(&key).await.unwrap();
    let err = store::load_latest(&p.kv, &p.settings).await.unwrap_err();
    assert!(matches!(err, StoreError::Missing { .. }), "{err}");
    assert!(err.to_string().contains(&key), "{err}");
}

#[tokio::test]
async fn recovery_is_the_snapshot_plus_the_tail_skipping_foreign_messages() {
    let mut p = Pipeline::start("recover").await;
    p.commit(puts(0..100, 1), 1 << 20).await;
    p.snapshot(None).await;
    p.commit(puts(50..150, 2), 1 << 20).await;
    p.publish_raw(b"not an envelope".to_vec()).await;
    p.commit(vec![Change::delete("key-0000001")], 1 << 20).await;

    let rec = history::recover(&p.js, &p.settings).await.unwrap().unwrap();
    assert_eq!(rec.state, p.state);
    assert_eq!(
        (rec.state.lineage(), rec.state.seq()),
        (p.state.lineage(), p.state.seq())
    );
    assert_eq!(rec.foreign_messages, 1);
    assert_eq!(rec.envelopes_applied, 2);
    assert_eq!(rec.last_stream_seq, p.stream_seq);
    assert_eq!(rec.abandoned_parts, 0);
}

#[tokio::test]
async fn recovery_without_a_snapshot_replays_from_the_first_envelope_and_abandons_a_torn_transaction(
) {
    let mut p = Pipeline::start("recover-torn").await;
    p.commit(puts(0..10, 1), 1 << 20).await;
    let before = p.state.clone();
    // A transaction of several parts of which only the first two reached the stream.
    let mut scratch = p.state.clone();
    let changes = puts(10..40, 3);
    let digest = scratch.apply_changes(&changes);
    let parts = split_transaction(
        p.state.lineage(),
        p.state.seq() + 1,
        digest,
        0,
        changes,
        500,
    );
    assert!(parts.len() > 2);
    for e in &parts[..2] {
        p.publish_raw(encode_envelope(e).unwrap()).await;
    }

    let rec = history::recover(&p.js, &p.settings).await.unwrap().unwrap();
    assert!(rec.manifest.is_none());
    assert_eq!(rec.state, before);
    assert_eq!(rec.abandoned_parts, 2);
    assert_eq!(
        rec.state.seq(),
        before.seq() + 2,
        "the next envelope follows the abandoned parts"
    );
}

#[tokio::test]
async fn an_empty_pipeline_has_nothing_to_recover() {
    let p = Pipeline::start("recover-empty").await;
    assert!(history::recover(&p.js, &p.settings)
        .await
        .unwrap()
        .is_none());
    assert!(store::read_pointer(&p.kv).await.unwrap().is_none());
}

#[tokio::test]
async fn a_tail_opened_below_the_first_retained_message_reports_pruned() {
    let mut p = Pipeline::start("tail-pruned").await;
    for i in 0..5 {
        p.commit(puts(i..i + 1, 1), 1 << 20).await;
    }
    let stream =
        p.js.get_stream(names::stream_name(&p.settings.pipeline))
            .await
            .unwrap();
    stream.purge().sequence(4).await.unwrap();
    let err = history::Tail::open(&p.js, &p.settings, 2)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            history::HistoryError::Pruned {
                wanted: 2,
                first: 4,
                ..
            }
        ),
        "{err}"
    );
    let mut tail = history::Tail::open(&p.js, &p.settings, 4).await.unwrap();
    let item = tail
        .next_within(Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(item.stream_seq, 4);
    assert!(matches!(item.item, Classified::Envelope(ref e) if e.seq == 4));
}

#[tokio::test]
async fn gc_removes_superseded_manifests_and_unreferenced_blobs_after_the_grace_period() {
    let mut p = Pipeline::start("snap-gc").await;
    p.settings.snapshot.keep = 1;
    p.settings.snapshot.gc_grace = Duration::ZERO;
    p.commit(puts(0..3000, 1), 512 * 1024).await;
    let m1 = p.snapshot(None).await;
    p.commit(puts(0..3000, 2), 512 * 1024).await; // every chunk changes
    let m2 = p.snapshot(None).await;
    // Garbage collection runs after every snapshot write; running it again finds nothing.
    assert_eq!(
        store::gc(&p.kv, &p.settings).await.unwrap(),
        store::GcReport::default()
    );
    let keys: Vec<String> = store::list_manifests(&p.kv)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys.len(), 1);
    assert!(p
        .kv
        .get(chunk_key(&m1.ranges[0].chunks[0].hash))
        .await
        .unwrap()
        .is_none());
    assert!(p
        .kv
        .get(chunk_key(&m2.ranges[0].chunks[0].hash))
        .await
        .unwrap()
        .is_some());
    assert!(p.kv.get(LATEST_KEY).await.unwrap().is_some());
    let loaded = store::load_latest(&p.kv, &p.settings)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(loaded.state, p.state);
}

#[tokio::test]
async fn a_cut_of_another_lineage_at_the_same_stream_position_cannot_replace_latest() {
    let mut p = Pipeline::start("snap-tie").await;
    p.commit(puts(0..10, 1), 1 << 20).await;
    // What `new-lineage` used to write: an empty start of another lineage at the stream's head.
    let other = State::new(Lineage::random());
    store::write_snapshot(&p.js, &p.settings, &other, p.stream_seq, None)
        .await
        .unwrap();
    // The old lineage's writer, at the same stream position, cannot move latest back.
    let err = store::write_snapshot(&p.js, &p.settings, &p.state, p.stream_seq, None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Stale { .. }), "{err}");
    let latest = store::latest_manifest(&p.kv).await.unwrap().unwrap();
    assert_eq!(latest.lineage, other.lineage());
}

#[tokio::test]
async fn recovery_refuses_when_the_message_after_the_snapshot_was_deleted_at_the_end() {
    let mut p = Pipeline::start("recover-deleted-tail").await;
    p.settings.nats.request_timeout = Duration::from_secs(1);
    p.commit(puts(0..10, 1), 1 << 20).await;
    p.snapshot(None).await;
    p.commit(puts(10..20, 2), 1 << 20).await;
    let stream =
        p.js.get_stream(names::stream_name(&p.settings.pipeline))
            .await
            .unwrap();
    assert!(stream.delete_message(p.stream_seq).await.unwrap());

    let err = history::recover(&p.js, &p.settings).await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, history::HistoryError::Refused { .. })
            && text.contains("after envelope 1 is lost")
            && text.contains("stream sequence 2 is deleted"),
        "{text}"
    );
}

#[tokio::test]
async fn recovery_refuses_a_stream_recreated_behind_the_bucket() {
    let mut p = Pipeline::start("recover-recreated").await;
    p.commit(puts(0..10, 1), 1 << 20).await;
    p.commit(puts(10..20, 1), 1 << 20).await;
    p.snapshot(None).await;
    p.js.delete_stream(names::stream_name(&p.settings.pipeline))
        .await
        .unwrap();
    deltasync_nats::ensure_stream(&p.js, &p.settings)
        .await
        .unwrap();

    let err = history::recover(&p.js, &p.settings).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("past the stream's last sequence 0") && text.contains("recreated"),
        "{text}"
    );
}

#[tokio::test]
async fn a_damaged_latest_falls_back_only_to_snapshots_of_its_lineage_or_else_to_the_stream() {
    let mut p = Pipeline::start("recover-fallback-lineage").await;
    p.commit(puts(0..10, 1), 1 << 20).await;
    let old = p.snapshot(None).await;
    p.commit(puts(10..20, 1), 1 << 20).await;
    // A new lineage (from the empty state) with two snapshots of its own.
    p.state = State::new(Lineage::random());
    p.commit(puts(100..110, 2), 1 << 20).await;
    let first = p.snapshot(None).await;
    p.commit(puts(110..120, 2), 1 << 20).await;
    let second = p.snapshot(None).await;
    // Both of the new lineage's snapshots lose a chunk; the old lineage's still loads.
    let old_keys: Vec<String> = old.blob_keys().collect();
    for m in [&first, &second] {
        for r in &m.ranges {
            for c in r.chunks.iter().filter(|c| c.entries > 0) {
                let key = chunk_key(&c.hash);
                assert!(!old_keys.contains(&key));
                p.kv.purge(&key).await.unwrap();
            }
        }
    }
    store::load(&p.kv, old.clone()).await.unwrap();

    // Not the old lineage's snapshot: the stream from its start, into the new lineage.
    let rec = history::recover(&p.js, &p.settings).await.unwrap().unwrap();
    assert!(
        rec.manifest.is_none(),
        "{:?}",
        rec.manifest.map(|m| m.lineage)
    );
    assert_eq!(
        (rec.state.lineage(), rec.state.seq()),
        (p.state.lineage(), 2)
    );
    assert_eq!(rec.state, p.state);
}

#[tokio::test]
async fn a_read_that_stalls_before_the_end_fails_naming_the_position_after_re_reading() {
    let mut p = Pipeline::start("read-stall").await;
    p.settings.nats.request_timeout = Duration::from_millis(300);
    for i in 0..3 {
        p.commit(puts(i..i + 1, 1), 1 << 20).await;
    }
    // Asked to read past what the stream holds: nothing more ever arrives.
    let mut read = Vec::new();
    let err = history::read_range(&p.js, &p.settings, 1, p.stream_seq + 2, |seq, _| {
        read.push(seq);
        true
    })
    .await
    .unwrap_err();
    assert_eq!(read, vec![1, 2, 3]);
    assert!(
        matches!(
            err,
            history::HistoryError::Stalled {
                at: 4,
                last: 5,
                attempts: 3,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("stream sequence 4"), "{err}");
}
