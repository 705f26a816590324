//! What the pipeline cannot carry is refused by name, never dropped: a transaction larger than
//! a replica buffers (issue 11, reproduction 3), a line longer than `ingest` reads, and
//! settings under which retention could prune envelopes no snapshot covers. While snapshots
//! fail, publishing stops before retention could prune what no snapshot covers.

use crate::support::{self, eventually, read_stream, replay};
use deltasync_core::names;
use deltasync_nats::store;
use deltasync_producer::{Change, Producer, ProducerError};
use deltasync_testkit::NatsServer;
use std::io::Write;
use std::process::Output;
use std::time::Duration;

fn run(cmd: &mut std::process::Command) -> (Output, String) {
    let out = cmd.output().expect("run the producer");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_larger_than_the_pipeline_allows_fails_ingest_naming_its_line() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("oversized");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("in.ndjson");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("create"));
    writeln!(f, r#"{{"op":"put","key":"before","value":1}}"#).expect("write");
    let value = "v".repeat(1024);
    let puts: Vec<String> = (0..1100)
        .map(|i| format!(r#"{{"op":"put","key":"big{i}","value":"{value}"}}"#))
        .collect();
    writeln!(f, r#"{{"txn":[{}]}}"#, puts.join(",")).expect("write");
    writeln!(f, r#"{{"op":"put","key":"after","value":1}}"#).expect("write");
    drop(f);
    let (out, stderr) = run(support::producer_command(&server.url(), &pipeline)
        .env("DELTASYNC_PRODUCER__BATCH_MAX_BYTES", "1024")
        .arg("ingest")
        .arg(&path));
    assert!(!out.status.success(), "ingest must fail: {stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");
    assert!(stderr.contains("a transaction of 1100 changes"), "{stderr}");
    let js = support::js(&server.url()).await;
    let state = replay(&read_stream(&js, &pipeline).await).state;
    assert!(
        state.get("before").is_some(),
        "the line before it is published"
    );
    assert_eq!(state.get("big0"), None, "nothing of the transaction");
    assert_eq!(state.get("after"), None, "nothing after it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_longer_than_ingest_reads_fails_naming_it() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("longline");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("in.ndjson");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("create"));
    writeln!(f, r#"{{"op":"put","key":"before","value":1}}"#).expect("write");
    // Valid JSON after 5 MiB of blanks: only its length is wrong (the cap is 4 MiB here).
    writeln!(
        f,
        "{}{{\"op\":\"put\",\"key\":\"long\",\"value\":1}}",
        " ".repeat(5 << 20)
    )
    .expect("write");
    writeln!(f, r#"{{"op":"put","key":"after","value":1}}"#).expect("write");
    drop(f);
    let (out, stderr) = run(support::producer_command(&server.url(), &pipeline)
        .env("DELTASYNC_PRODUCER__BATCH_MAX_BYTES", "1024")
        .env("DELTASYNC_STREAM__MAX_MESSAGES", "50")
        .env("DELTASYNC_SNAPSHOT__EVERY_ENVELOPES", "20")
        .arg("ingest")
        .arg(&path));
    assert!(!out.status.success(), "ingest must fail: {stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");
    assert!(stderr.contains("longer than 4194304 bytes"), "{stderr}");
    let js = support::js(&server.url()).await;
    let state = replay(&read_stream(&js, &pipeline).await).state;
    assert!(
        state.get("before").is_some(),
        "the line before it is published"
    );
    assert_eq!(state.get("long"), None);
    assert_eq!(state.get("after"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_under_which_retention_could_outrun_snapshots_are_refused_by_name() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("in.ndjson");
    std::fs::write(&path, "{\"op\":\"put\",\"key\":\"a\",\"value\":1}\n").expect("write");
    let cases: &[(&[(&str, &str)], &str)] = &[
        // Age cannot be held back: snapshots must be time-based.
        (
            &[
                ("DELTASYNC_STREAM__MAX_AGE", "1h"),
                ("DELTASYNC_SNAPSHOT__EVERY", "0s"),
            ],
            "snapshot.every",
        ),
        // A snapshot interval longer than half the age limit.
        (
            &[
                ("DELTASYNC_STREAM__MAX_AGE", "1h"),
                ("DELTASYNC_SNAPSHOT__EVERY", "31m"),
            ],
            "snapshot.every",
        ),
        // Bytes that cannot keep one change at its limits past a snapshot.
        (
            &[
                ("DELTASYNC_STREAM__MAX_BYTES", "300000"),
                ("DELTASYNC_PRODUCER__BATCH_MAX_BYTES", "1024"),
            ],
            "stream.max_bytes",
        ),
        // Messages that cannot keep two snapshot intervals.
        (
            &[
                ("DELTASYNC_STREAM__MAX_MESSAGES", "30"),
                ("DELTASYNC_SNAPSHOT__EVERY_ENVELOPES", "20"),
            ],
            "stream.max_messages",
        ),
    ];
    for (env, key) in cases {
        let pipeline = support::pipeline("refused");
        let mut cmd = support::producer_command(&server.url(), &pipeline);
        cmd.arg("ingest").arg(&path);
        for (k, v) in *env {
            cmd.env(k, v);
        }
        let (out, stderr) = run(&mut cmd);
        assert!(!out.status.success(), "{env:?} must be refused: {stderr}");
        assert!(
            stderr.contains(key),
            "{env:?}: the error names {key}: {stderr}"
        );
        assert_eq!(
            support::last_stream_seq(&support::js(&server.url()).await, &pipeline).await,
            0,
            "{env:?}: nothing published"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_snapshot_stops_publishing_before_retention_prunes_and_it_resumes_once_one_is_written(
) {
    let server = NatsServer::start();
    let pipeline = support::pipeline("snapfail");
    let mut settings = support::settings(&server.url(), &pipeline);
    settings.stream.max_messages = 50;
    settings.snapshot.every_envelopes = 20;
    let producer = std::sync::Arc::new(Producer::start(settings.clone()).await.expect("start"));
    for i in 0..5 {
        producer
            .commit(vec![Change::put(format!("k{i}"), "v")])
            .await
            .expect("commit");
    }
    let before = producer
        .snapshot()
        .await
        .expect("a snapshot while the bucket works");

    // The bucket now refuses every value: snapshots fail.
    let js = support::js(&server.url()).await;
    let (config, original) = support::break_bucket(&js, &pipeline).await;

    let writer = producer.clone();
    let load = tokio::spawn(async move {
        for i in 0..300u64 {
            writer
                .commit(vec![Change::put(format!("k{}", i % 40), i.to_string())])
                .await?;
        }
        Ok::<_, ProducerError>(())
    });
    let held = eventually(
        "publishing held back by the failed snapshot",
        Duration::from_secs(30),
        async || {
            producer
                .status()
                .held_back
                .filter(|r| r.contains("snapshot failed"))
        },
    )
    .await;
    assert!(held.contains("nothing more is published"), "{held}");
    let status = producer.status();
    assert!(!load.is_finished(), "the load waits");
    let stream = js
        .get_stream(names::stream_name(&pipeline))
        .await
        .expect("stream")
        .get_info()
        .await
        .expect("info")
        .state;
    assert!(
        stream.first_sequence <= before.stream_seq + 1,
        "retention pruned stream seq {} past the snapshot at {} (status {status:?})",
        stream.first_sequence - 1,
        before.stream_seq
    );

    // The bucket takes values again: the retried snapshot is written and publishing resumes.
    support::restore_bucket(&js, config, original).await;
    tokio::time::timeout(Duration::from_secs(60), load)
        .await
        .expect("publishing resumes")
        .expect("load task")
        .expect("every commit acknowledged");
    let producer = std::sync::Arc::into_inner(producer).expect("one owner");
    let status = producer.shutdown().await.expect("clean shutdown");
    assert_eq!(status.held_back, None);
    let kv = store::bucket(&js, &settings).await.expect("bucket");
    let latest = store::latest_manifest(&kv)
        .await
        .expect("read")
        .expect("a snapshot");
    assert_eq!(
        latest.seq, status.seq,
        "the final snapshot covers everything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_whose_final_snapshot_fails_is_an_error() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("finalfail");
    let mut settings = support::settings(&server.url(), &pipeline);
    settings.snapshot.every_envelopes = 10_000;
    let producer = Producer::start(settings.clone()).await.expect("start");
    for i in 0..3 {
        producer
            .commit(vec![Change::put(format!("k{i}"), "v")])
            .await
            .expect("commit");
    }
    let js = support::js(&server.url()).await;
    support::break_bucket(&js, &pipeline).await;
    let err = tokio::time::timeout(Duration::from_secs(60), producer.shutdown())
        .await
        .expect("shutdown ends")
        .expect_err("the final snapshot cannot be written");
    assert!(
        matches!(err, ProducerError::Snapshot { seq: 3, .. }),
        "{err}"
    );
}

/// A clean stop asked for while publishing is held back by failing snapshots ends, with an
/// error naming why, instead of waiting for a snapshot without end; nothing past retention is
/// published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_failing_snapshots_hold_publishing_back_ends_with_an_error() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("stopheld");
    let mut settings = support::settings(&server.url(), &pipeline);
    settings.stream.max_messages = 50;
    settings.snapshot.every_envelopes = 20;
    let producer = std::sync::Arc::new(Producer::start(settings.clone()).await.expect("start"));
    producer
        .commit(vec![Change::put("k", "v")])
        .await
        .expect("commit");
    let before = producer
        .snapshot()
        .await
        .expect("a snapshot while the bucket works");

    // The bucket now refuses every value: snapshots fail.
    let js = support::js(&server.url()).await;
    support::break_bucket(&js, &pipeline).await;

    let writer = producer.clone();
    let load = tokio::spawn(async move {
        for i in 0..300u64 {
            writer
                .commit(vec![Change::put(format!("k{}", i % 40), i.to_string())])
                .await?;
        }
        Ok::<_, ProducerError>(())
    });
    eventually(
        "publishing held back by the failed snapshot",
        Duration::from_secs(30),
        async || {
            producer
                .status()
                .held_back
                .filter(|r| r.contains("snapshot failed"))
        },
    )
    .await;
    // The caller waiting on a commit goes away; the stop must not wait for a snapshot.
    load.abort();
    let _ = load.await;
    let producer = std::sync::Arc::into_inner(producer).expect("one owner");
    let stopped = tokio::time::timeout(Duration::from_secs(60), producer.shutdown())
        .await
        .expect("the stop ends although snapshots still fail");
    let err = stopped.expect_err("a stop that left input unpublished is an error");
    assert!(
        matches!(&err, ProducerError::Stopped(cause)
            if matches!(**cause, ProducerError::StoppedWhileHeldBack { covered, .. } if covered == before.seq)),
        "{err}"
    );
    let stream = js
        .get_stream(names::stream_name(&pipeline))
        .await
        .expect("stream")
        .get_info()
        .await
        .expect("info")
        .state;
    assert!(
        stream.first_sequence <= before.stream_seq + 1,
        "retention pruned stream seq {} past the snapshot at {}",
        stream.first_sequence - 1,
        before.stream_seq
    );
}

/// A stream limit lowered by hand while the producer runs (`nats stream edit`): the producer
/// re-reads the stream's own limits and holds publishing back against the lowered one, so
/// retention never prunes an envelope no durable snapshot covers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_limit_lowered_by_hand_while_running_holds_publishing_back_against_it() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("lowered");
    let mut settings = support::settings(&server.url(), &pipeline);
    settings.stream.max_messages = 1000;
    settings.snapshot.every_envelopes = 0;
    settings.snapshot.every = Duration::from_secs(3600);
    let producer = Producer::start(settings.clone()).await.expect("start");
    for i in 0..40 {
        producer
            .commit(vec![Change::put(format!("k{i}"), "v")])
            .await
            .expect("commit");
    }

    // An operator lowers the stream's max_messages behind the producer's back.
    let js = support::js(&server.url()).await;
    let mut config = js
        .get_stream(names::stream_name(&pipeline))
        .await
        .expect("stream")
        .cached_info()
        .config
        .clone();
    config.max_messages = 50;
    js.update_stream(&config).await.expect("lower max_messages");
    eventually(
        "the producer to read the lowered limit",
        Duration::from_secs(30),
        async || (producer.status().retention_limits.max_messages == Some(50)).then_some(()),
    )
    .await;
    // Idle, 40 envelopes past its (empty) start, over half the lowered limit: it cuts a
    // snapshot now, not at its next envelope.
    let kv = store::bucket(&js, &settings).await.expect("bucket");
    eventually(
        "a snapshot of the idle producer's head",
        Duration::from_secs(30),
        async || {
            store::latest_manifest(&kv)
                .await
                .expect("read")
                .filter(|m| m.seq == 40)
        },
    )
    .await;

    for i in 0..300u64 {
        producer
            .commit(vec![Change::put(format!("k{}", i % 40), i.to_string())])
            .await
            .expect("commit");
    }
    let status = producer.status();
    let covered = store::latest_manifest(&kv)
        .await
        .expect("read")
        .map_or(0, |m| m.stream_seq);
    let stream = js
        .get_stream(names::stream_name(&pipeline))
        .await
        .expect("stream")
        .get_info()
        .await
        .expect("info")
        .state;
    assert!(
        stream.first_sequence <= covered + 1,
        "retention pruned stream seq {} past the newest snapshot at {covered} (status {status:?})",
        stream.first_sequence - 1,
    );
    assert!(stream.messages <= 50, "the stream keeps 50: {stream:?}");
    let status = producer.shutdown().await.expect("clean shutdown");
    assert_eq!(status.seq, 340, "every transaction published");
    assert_eq!(status.held_back, None);
}
