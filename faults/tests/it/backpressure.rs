//! Retention never prunes an envelope that no durable snapshot covers: a burst through a tight
//! `stream.max_messages` is held back until snapshots catch up (issue 11, reproduction 1), and
//! a clean shutdown leaves a snapshot of every envelope it published.
//!
//! Talks to one nats-server through the real producer binary (`ingest`), the consumer library
//! and, for watching retention and snapshots, JetStream directly.

use crate::support::*;
use deltasync_core::names;
use deltasync_core::recovery::Classified;
use deltasync_nats::store;
use deltasync_producer::{Change, Position};
use deltasync_testkit::NatsServer;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `n` one-put transactions `key(i)` = `{"i":i}` for `i` in `from..from + n`, as NDJSON.
fn write_txns(path: &Path, from: u64, n: u64, model: &mut Model) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in from..from + n {
        writeln!(
            f,
            r#"{{"txn":[{{"op":"put","key":"{}","value":{{"i":{i}}}}}]}}"#,
            key(i)
        )
        .unwrap();
        model.apply(&[Change::put(key(i), format!(r#"{{"i":{i}}}"#))]);
        model.txns += 1;
    }
    f.flush().unwrap();
}

/// Runs `producer ingest <path>` to its end; panics with its log unless it exits 0.
fn ingest(s: &deltasync_config::settings::Settings, path: &Path, log: &Path) {
    let status = producer_command(s, log)
        .arg("ingest")
        .arg(path)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "ingest exited {status}; log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// The position after the last envelope in the stream.
async fn last_position(js: &async_nats::jetstream::Context, pipeline: &str) -> Position {
    let items = read_stream(js, pipeline).await;
    let (stream_seq, env) = items
        .iter()
        .rev()
        .find_map(|(s, c)| match c {
            Classified::Envelope(e) => Some((*s, e.clone())),
            Classified::Foreign { .. } => None,
        })
        .expect("an envelope in the stream");
    Position {
        lineage: env.lineage,
        seq: env.seq,
        stream_seq,
        digest: env.digest,
    }
}

/// Watches the stream and the snapshot bucket until stopped; returns (observations,
/// violations). A violation is a moment when the stream's first retained message was past the
/// envelope after the newest snapshot (with no snapshot: past the stream's start).
fn watch_retention(
    url: String,
    s: deltasync_config::settings::Settings,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, Vec<String>)> {
    tokio::spawn(async move {
        let js = js(&url).await;
        let (mut seen, mut bad) = (0u64, Vec::new());
        while !stop.load(Ordering::Acquire) {
            // Stream first, then snapshot: a snapshot written in between only makes the check
            // more lenient, never a false alarm.
            let info = match js.get_stream(names::stream_name(&s.pipeline)).await {
                Ok(mut stream) => stream.info().await.ok().map(|i| i.state.clone()),
                Err(_) => None,
            };
            let kv = store::bucket(&js, &s).await.ok();
            let latest = match &kv {
                Some(kv) => store::latest_manifest(kv).await.ok(),
                None => None,
            };
            if let (Some(state), Some(latest)) = (info, latest) {
                if state.messages > 0 {
                    seen += 1;
                    let next = latest.as_ref().map_or(1, |m| m.stream_seq + 1);
                    if state.first_sequence > next {
                        bad.push(format!(
                            "first retained {} > {next}, the envelope after the newest snapshot \
                             ({:?})",
                            state.first_sequence,
                            latest.as_ref().map(|m| (m.seq, m.stream_seq))
                        ));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (seen, bad)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_through_a_tight_retention_is_held_back_until_a_snapshot_covers_it() {
    logs();
    binaries(); // may build them: before anything timed starts
    let started = Instant::now();
    let server = NatsServer::start();
    let s = settings(&server.url(), &unique("burst"), |s| {
        s.stream.max_messages = 50;
        s.snapshot.every_envelopes = 20;
    });
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("producer.log");
    let mut model = Model::default();
    let path = dir.path().join("burst.ndjson");
    write_txns(&path, 0, 3000, &mut model);

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_retention(server.url(), s.clone(), stop.clone());
    ingest(&s, &path, &log);
    let held = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .matches("Publishing held back")
        .count();
    eprintln!("burst: publishing was held back {held} times");
    let js = js(&server.url()).await;
    let kv = store::bucket(&js, &s).await.unwrap();
    let latest = store::latest_manifest(&kv)
        .await
        .unwrap()
        .expect("a snapshot exists after the burst");
    let p = last_position(&js, &s.pipeline).await;
    assert_eq!(p.seq, 3000, "one envelope per transaction");

    // A new replica bootstraps and equals all 3000 transactions.
    let c = InProcess::memory(s.clone(), "burst-1");
    let checked = c.check(&p, &model, "after the burst").await;
    assert_eq!(checked, 3000);
    c.stop().await;

    // The producer restarts cleanly and publishes more.
    let more = dir.path().join("more.ndjson");
    write_txns(&more, 3000, 10, &mut model);
    ingest(&s, &more, &log);
    stop.store(true, Ordering::Release);
    let (seen, violations) = watcher.await.unwrap();
    assert!(seen > 10, "the watcher looked {seen} times");
    assert!(
        violations.is_empty(),
        "retention pruned envelopes no snapshot covered: {violations:#?}"
    );
    let latest_after = store::latest_manifest(&kv).await.unwrap().unwrap();
    assert!(latest_after.seq >= latest.seq);
    let (first, _) = bounds(&js, &s.pipeline).await;
    assert!(
        latest_after.stream_seq + 1 >= first,
        "the newest snapshot (stream seq {}) is followed by the stream (first {first})",
        latest_after.stream_seq
    );
    let p = last_position(&js, &s.pipeline).await;
    let c = InProcess::memory(s.clone(), "burst-2");
    assert_eq!(c.check(&p, &model, "after the restart").await, 3010);
    c.stop().await;
    eprintln!("burst through max_messages=50: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_writes_a_final_snapshot_of_uncovered_envelopes() {
    logs();
    binaries(); // may build them: before anything timed starts
    let server = NatsServer::start();
    let s = settings(&server.url(), &unique("final"), |s| {
        s.snapshot.every_envelopes = 10_000;
    });
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("producer.log");
    let mut model = Model::default();
    let path = dir.path().join("few.ndjson");
    write_txns(&path, 0, 7, &mut model);
    ingest(&s, &path, &log);
    let js = js(&server.url()).await;
    let p = last_position(&js, &s.pipeline).await;
    let kv = store::bucket(&js, &s).await.unwrap();
    let latest = store::latest_manifest(&kv)
        .await
        .unwrap()
        .expect("a final snapshot was written at shutdown");
    assert_eq!(
        (latest.lineage, latest.seq, latest.stream_seq, latest.digest),
        (p.lineage, p.seq, p.stream_seq, p.digest),
        "the final snapshot is at the last envelope"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("final snapshot"), "{text}");
    // Nothing left to cover: a second clean run with no input writes no new snapshot.
    let empty = dir.path().join("empty.ndjson");
    std::fs::write(&empty, "").unwrap();
    ingest(&s, &empty, &log);
    let again = store::latest_manifest(&kv).await.unwrap().unwrap();
    assert_eq!(again.created_at_ms, latest.created_at_ms);
}
