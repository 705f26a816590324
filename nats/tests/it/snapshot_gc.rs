//! Snapshot garbage collection with two writers against a real nats-server: a collection
//! that runs between a writer's reuse decision and its move of `latest`, and manifests whose
//! writer's clock is off.
//!
//! Talks to nats-server through `deltasync_nats`; interleaves the other
//! writer's collection with `store::write_snapshot_with_hook` (there is no other way to run
//! it at that exact point), and writes a skewed manifest through plain KV calls. Listing and
//! recovery's fallback order manifests by their place in the history, whatever their
//! writer's clock said.

use crate::support::{eventually, puts, Pipeline};
use deltasync_core::snapshot::{decode_manifest, encode_manifest, Manifest};
use deltasync_nats::store;
use std::time::Duration;

async fn start(prefix: &str) -> Pipeline {
    Pipeline::start_with(prefix, |s| {
        s.snapshot.chunk_target_bytes = 16 * 1024;
        s.snapshot.keep = 1;
        // The collections that run inside writes keep everything: the tests run their own.
        s.snapshot.gc_grace = Duration::from_secs(3600);
    })
    .await
}

/// The server's time now, in milliseconds: when it stores a probe key.
async fn server_now_ms(p: &Pipeline) -> u64 {
    p.kv.put("probe", "".into()).await.unwrap();
    let entry = p.kv.entry("probe").await.unwrap().unwrap();
    (entry.created.unix_timestamp_nanos() / 1_000_000) as u64
}

/// When the server stored `key`, in milliseconds.
async fn stored_ms(p: &Pipeline, key: &str) -> u64 {
    let entry = p.kv.entry(key).await.unwrap().unwrap();
    (entry.created.unix_timestamp_nanos() / 1_000_000) as u64
}

#[tokio::test]
async fn a_collection_between_the_reuse_decision_and_the_move_of_latest_never_leaves_latest_naming_a_removed_blob(
) {
    let mut p = start("gc-race").await;
    // Writer A: a base snapshot M1 it will build on.
    p.commit(puts(0..2000, 1), 512 * 1024).await;
    let m1 = p.snapshot(None).await;
    let s1 = p.state.clone();
    assert!(m1.ranges.len() >= 16);
    // A few keys change; writer B (a cron'd `snapshot`) writes a new base M2, which shares
    // M1's chunks except those of the changed ranges.
    p.commit(puts(0..3, 2), 512 * 1024).await;
    p.snapshot(None).await;
    p.commit(puts(10..11, 3), 512 * 1024).await;

    // Collection with a one second grace: M1's blobs must be older than that on the
    // server's clock, while the blobs writer A is about to write are not.
    let grace = Duration::from_secs(1);
    let m1_stored = stored_ms(&p, &store::list_manifests(&p.kv).await.unwrap()[0].0).await;
    eventually(
        "the server clock passes M1 + grace",
        Duration::from_secs(30),
        || async {
            let now = server_now_ms(&p).await;
            if now >= m1_stored + grace.as_millis() as u64 + 100 {
                Ok(())
            } else {
                Err(format!("{} ms to go", m1_stored + 1100 - now))
            }
        },
    )
    .await;

    // Writer A snapshots incrementally on M1 (reusing its chunks); B's collection runs after
    // A decided what to reuse and before A's manifest is stored.
    let mut gc_settings = p.settings.clone();
    gc_settings.snapshot.gc_grace = grace;
    let (kv, report) = (
        p.kv.clone(),
        std::sync::Arc::new(std::sync::Mutex::new(None)),
    );
    let seen = report.clone();
    let m3 = store::write_snapshot_with_hook(
        &p.js,
        &p.settings,
        &p.state,
        p.stream_seq,
        Some((&m1, &s1)),
        move || {
            Box::pin(async move {
                let r = store::gc(&kv, &gc_settings).await.unwrap();
                *seen.lock().unwrap() = Some(r);
            })
        },
    )
    .await
    .unwrap();
    let report = report.lock().unwrap().clone().unwrap();
    assert_eq!(report.manifests_removed, 1, "M1 was collected: {report:?}");
    assert!(report.blobs_removed > 0, "M1's own chunks were: {report:?}");

    // `latest` names M3, and every blob it references is there: it loads and verifies.
    let latest = store::latest_manifest(&p.kv).await.unwrap().unwrap();
    assert_eq!(latest, m3);
    let loaded = store::load_latest(&p.kv, &p.settings)
        .await
        .unwrap_or_else(|e| panic!("the latest snapshot loads: {e}"))
        .unwrap();
    assert_eq!(loaded.state.digest(), p.state.digest());
}

#[tokio::test]
async fn manifest_ages_are_judged_on_the_servers_clock_not_their_writers() {
    let mut p = start("gc-clock").await;
    p.commit(puts(0..500, 1), 512 * 1024).await;
    p.snapshot(None).await;
    p.commit(puts(0..500, 2), 512 * 1024).await;
    let m2 = p.snapshot(None).await;
    // M2's writer's clock is two hours behind: its manifest says it is two hours old.
    let mut skewed = m2.clone();
    skewed.created_at_ms -= 2 * 3600 * 1000;
    let key = deltasync_core::snapshot::manifest_key(m2.lineage, m2.seq);
    p.kv.put(&key, encode_manifest(&skewed).unwrap().into())
        .await
        .unwrap();
    assert_eq!(
        decode_manifest(&p.kv.get(&key).await.unwrap().unwrap()).unwrap(),
        skewed
    );
    // M2 was stored a moment ago: with a ten minute grace, M1 (which a reader may be
    // downloading) stays.
    let mut s = p.settings.clone();
    s.snapshot.gc_grace = Duration::from_secs(600);
    let report = store::gc(&p.kv, &s).await.unwrap();
    assert_eq!(report, store::GcReport::default());
    assert_eq!(store::list_manifests(&p.kv).await.unwrap().len(), 2);
}

/// Stores `m` again with its writer's clock `shift_ms` off (negative: behind).
async fn rewrite_with_clock_off(p: &Pipeline, m: &Manifest, shift_ms: i64) -> String {
    let mut skewed = m.clone();
    skewed.created_at_ms = skewed.created_at_ms.saturating_add_signed(shift_ms);
    let key = deltasync_core::snapshot::manifest_key(m.lineage, m.seq);
    p.kv.put(&key, encode_manifest(&skewed).unwrap().into())
        .await
        .unwrap();
    key
}

#[tokio::test]
async fn manifests_are_listed_by_their_place_in_the_history_not_by_their_writers_clock() {
    let mut p = start("list-clock").await;
    p.commit(puts(0..100, 1), 512 * 1024).await;
    let m1 = p.snapshot(None).await;
    p.commit(puts(0..100, 2), 512 * 1024).await;
    let m2 = p.snapshot(None).await;
    p.commit(puts(0..100, 3), 512 * 1024).await;
    let m3 = p.snapshot(None).await;
    // M1's writer's clock is an hour ahead, M2's two hours behind.
    let k1 = rewrite_with_clock_off(&p, &m1, 3600 * 1000).await;
    let k2 = rewrite_with_clock_off(&p, &m2, -2 * 3600 * 1000).await;
    let k3 = deltasync_core::snapshot::manifest_key(m3.lineage, m3.seq);
    let listed: Vec<(String, u64)> = store::list_manifests(&p.kv)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, m)| (k, m.stream_seq))
        .collect();
    assert_eq!(
        listed,
        vec![
            (k1, m1.stream_seq),
            (k2, m2.stream_seq),
            (k3, m3.stream_seq)
        ],
        "oldest first in the stream's history"
    );
}

#[tokio::test]
async fn recovery_past_a_damaged_latest_takes_the_newest_older_snapshot_whatever_its_writers_clock()
{
    let mut p = start("fallback-clock").await;
    p.commit(puts(0..100, 1), 512 * 1024).await;
    let m1 = p.snapshot(None).await;
    p.commit(puts(0..100, 2), 512 * 1024).await;
    let m2 = p.snapshot(None).await;
    p.commit(puts(0..100, 3), 512 * 1024).await;
    let m3 = p.snapshot(None).await;
    p.commit(puts(0..10, 4), 512 * 1024).await;
    // M2's writer's clock was two hours behind; the latest manifest (M3) is damaged.
    rewrite_with_clock_off(&p, &m2, -2 * 3600 * 1000).await;
    let k3 = deltasync_core::snapshot::manifest_key(m3.lineage, m3.seq);
    p.kv.put(&k3, "not a manifest".into()).await.unwrap();

    let rec = deltasync_nats::history::recover(&p.js, &p.settings)
        .await
        .unwrap()
        .expect("a history");
    let from = rec.manifest.expect("recovered from a snapshot");
    assert_eq!(
        (from.seq, from.stream_seq),
        (m2.seq, m2.stream_seq),
        "the newest intact snapshot (M1 is at {})",
        m1.seq
    );
    assert_eq!(rec.state.digest(), p.state.digest());
    assert_eq!(rec.state.seq(), p.state.seq());
}
