//! Recovery at the edges of the history, through the producer binary: a stream that aged out
//! while the producer was down (issue 11, repro 2) is refused or, by setting, continued in a
//! new lineage — never with a reused sequence number; and the `snapshot` command run while a
//! transaction is half-published cuts at the last complete transaction, never inside it.

use crate::support::{self, eventually, read_stream, replay};
use deltasync_config::settings::Settings;
use deltasync_core::envelope::split_transaction;
use deltasync_core::recovery::Classified;
use deltasync_core::{names, State};
use deltasync_nats::store::{self, StoreError};
use deltasync_producer::{Change, Producer};
use deltasync_testkit::NatsServer;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

/// The shortest retention the settings allow with time-based snapshots, and one within it.
const AGE_ENV: [(&str, &str); 3] = [
    ("DELTASYNC_STREAM__MAX_AGE", "4s"),
    ("DELTASYNC_STREAM__DUPLICATE_WINDOW", "1s"),
    ("DELTASYNC_SNAPSHOT__EVERY", "2s"),
];

fn run(url: &str, pipeline: &str, env: &[(&str, &str)], args: &[&Path]) -> Output {
    let mut cmd = support::producer_command(url, pipeline);
    for (k, v) in AGE_ENV.iter().chain(env) {
        cmd.env(k, v);
    }
    cmd.args(args).output().expect("run the producer binary")
}

fn ndjson(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write ndjson");
    path
}

/// The stream's (first, last, messages).
async fn extent(js: &async_nats::jetstream::Context, pipeline: &str) -> (u64, u64, u64) {
    let mut s = js
        .get_stream(names::stream_name(pipeline))
        .await
        .expect("stream");
    let i = s.info().await.expect("info");
    (
        i.state.first_sequence,
        i.state.last_sequence,
        i.state.messages,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_aged_out_past_the_snapshot_is_refused_or_by_setting_continued_in_a_new_lineage() {
    let server = NatsServer::start();
    let url = server.url();
    let pipeline = support::pipeline("aged-out");
    let dir = tempfile::tempdir().expect("tempdir");
    let js = support::js(&url).await;

    // Envelope 1, and a snapshot at it.
    let first = ndjson(
        dir.path(),
        "a.ndjson",
        "{\"op\":\"put\",\"key\":\"a\",\"value\":1}\n",
    );
    let out = run(&url, &pipeline, &[], &[Path::new("ingest"), &first]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&url, &pipeline, &[], &[Path::new("snapshot")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let settings: Settings = support::settings(&url, &pipeline);
    let kv = store::bucket(&js, &settings).await.expect("bucket");
    let snap = store::latest_manifest(&kv)
        .await
        .expect("read")
        .expect("a snapshot");
    assert_eq!((snap.seq, snap.stream_seq), (1, 1));
    let old = snap.lineage;

    // Envelope 2 (a replica may have applied it), from a producer that died before any
    // snapshot covered it.
    let items = read_stream(&js, &pipeline).await;
    let state = replay(&items).state;
    let mut after = state.clone();
    let changes = vec![Change::put("b", "2")];
    let digest = after.apply_changes(&changes);
    let envs = split_transaction(old, 2, digest, 0, changes, 1 << 20);
    assert_eq!(support::publish_raw(&js, &pipeline, &envs, 1).await, 2);

    // The stream ages out while no producer runs.
    eventually(
        "the stream to age out",
        Duration::from_secs(60),
        async || (extent(&js, &pipeline).await.2 == 0).then_some(()),
    )
    .await;

    // A restart with a new transaction refuses, naming what was lost, and publishes nothing.
    let next = ndjson(
        dir.path(),
        "d.ndjson",
        "{\"op\":\"put\",\"key\":\"d\",\"value\":4}\n",
    );
    let out = run(&url, &pipeline, &[], &[Path::new("ingest"), &next]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the producer must refuse: {stderr}");
    assert!(
        stderr.contains(&format!("lineage {old} after envelope 1 is lost"))
            && stderr.contains("stream sequence 2 is no longer retained"),
        "{stderr}"
    );
    assert_eq!(extent(&js, &pipeline).await.1, 2, "nothing published");
    assert_eq!(
        store::latest_manifest(&kv)
            .await
            .expect("read")
            .map(|m| (m.lineage, m.seq)),
        Some((old, 1))
    );

    // With producer.on_lost_history = "new_lineage": a new lineage from the snapshot's state.
    let out = run(
        &url,
        &pipeline,
        &[("DELTASYNC_PRODUCER__ON_LOST_HISTORY", "new_lineage")],
        &[Path::new("ingest"), &next],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("History LOST") && stderr.contains("ERROR"),
        "{stderr}"
    );
    let latest = store::latest_manifest(&kv)
        .await
        .expect("read")
        .expect("a snapshot");
    assert_ne!(latest.lineage, old, "a new lineage");
    let (_, last, _) = extent(&js, &pipeline).await;
    assert!(
        last >= 4,
        "a marker and envelope d after stream sequence 2 (last {last})"
    );
    // Whatever is still retained is of the new lineage: no other envelope 2 of the old one.
    for (stream_seq, item) in read_stream(&js, &pipeline).await {
        if let Classified::Envelope(e) = item {
            assert_ne!(
                e.lineage, old,
                "old lineage envelope {} at {stream_seq}",
                e.seq
            );
        }
    }
    // The new lineage starts from the snapshot's state: envelope 2's change is lost.
    let loaded = store::load_latest(&kv, &settings)
        .await
        .expect("load")
        .expect("a snapshot");
    assert_eq!(loaded.state.lineage(), latest.lineage);
    assert_eq!(loaded.state.get("a"), Some(&b"1"[..]));
    assert_eq!(loaded.state.get("b"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_command_during_a_half_published_transaction_cuts_before_it() {
    let server = NatsServer::start();
    let url = server.url();
    let pipeline = support::pipeline("mid-txn");
    let settings = support::settings(&url, &pipeline);
    let p = Producer::start(settings.clone()).await.expect("start");
    let r = p.commit(vec![Change::put("a", "1")]).await.expect("commit");
    let lineage = p.lineage();
    p.shutdown().await.expect("shutdown");
    let js = support::js(&url).await;

    // A transaction of two parts, of which only the first is in the stream yet.
    let mut before = State::new(lineage);
    before.apply_changes(&[Change::put("a", "1")]);
    let mut after = before.clone();
    let changes = vec![Change::put("t1", "x"), Change::put("t2", "y")];
    let digest = after.apply_changes(&changes);
    let parts = split_transaction(lineage, 2, digest, 0, changes, 1);
    assert_eq!(parts.len(), 2);
    let at = support::publish_raw(&js, &pipeline, &parts[..1], r.stream_seq).await;

    let out = support::producer_command(&url, &pipeline)
        .arg("snapshot")
        .output()
        .expect("run snapshot");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kv = store::bucket(&js, &settings).await.expect("bucket");
    let latest = store::latest_manifest(&kv)
        .await
        .expect("read")
        .expect("a snapshot");
    assert_eq!(
        (latest.seq, latest.stream_seq),
        (1, r.stream_seq),
        "cut at the last complete transaction"
    );

    // The store itself refuses a cut at the non-final part.
    let mut torn = before.clone();
    torn.set_position(lineage, 2);
    let err = store::write_snapshot(&js, &settings, &torn, at, None)
        .await
        .expect_err("a cut inside a transaction");
    assert!(
        matches!(err, StoreError::NotInHistory { .. }) && err.to_string().contains("part 1 of 2"),
        "{err}"
    );

    // The transaction completes; a restart recovers it whole.
    support::publish_raw(&js, &pipeline, &parts[1..], at).await;
    let p = Producer::start(settings).await.expect("restart");
    assert_eq!(p.status().seq, 3);
    assert_eq!(p.status().digest, digest.to_hex());
    p.shutdown().await.expect("shutdown");
}
