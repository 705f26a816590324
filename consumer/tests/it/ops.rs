//! Operator commands against a real nats-server: replay (and re-ingest into a second
//! pipeline), rebuild at a past sequence then follow, verify finding an injected divergence,
//! status headroom.
//!
//! Talks to nats-server through the test producer in `support`, the producer library (for
//! re-ingesting) and `deltasync_consumer::ops`.

use crate::support::*;
use deltasync_consumer::ops::{self, OpsError};
use deltasync_core::codec::encode_envelope;
use deltasync_core::envelope::{now_ms, Envelope};
use deltasync_core::{Change, Digest};
use std::time::Duration;

/// A pipeline with JSON and binary values, deletes, a multi-part transaction and a snapshot
/// in the middle.
async fn varied_history(prefix: &str) -> Pipeline {
    let mut p = Pipeline::start(prefix, |_| {}).await;
    p.commit(vec![
        Change::put("a", &br#"{"px":1.5,"qty":[1,2]}"#[..]),
        Change::put("b", &b"\"text\""[..]),
        Change::put("bin", &[0u8, 159, 146, 150][..]),
    ])
    .await;
    p.commit(vec![Change::delete("b"), Change::put("c", &b"42"[..])])
        .await;
    p.snapshot().await;
    let big: Vec<Change> = (0..40)
        .map(|i| Change::put(key(i), format!("{i}").into_bytes()))
        .collect();
    p.commit_split(big, 200).await;
    p.commit(vec![Change::put("a", &b"null"[..])]).await;
    p
}

#[tokio::test]
async fn replay_prints_transactions_that_re_ingest_into_another_pipeline_with_the_same_digest() {
    let p = varied_history("replay").await;
    let mut out = Vec::new();
    let summary = ops::replay(&p.settings, 1, None, &mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "one line per transaction:\n{text}");
    assert_eq!(summary.transactions, 4);
    assert_eq!(lines[0]["seq"], 1);
    assert_eq!(lines[0]["lineage"], p.state.lineage().to_hex());
    assert_eq!(
        lines[0]["txn"][0],
        serde_json::json!({"op":"put","key":"a","value":{"px":1.5,"qty":[1,2]}})
    );
    assert_eq!(lines[0]["txn"][2]["value_b64"], "AJ+Slg==");
    assert_eq!(
        lines[1]["txn"][0],
        serde_json::json!({"op":"del","key":"b"})
    );
    assert_eq!(
        lines[2]["txn"].as_array().unwrap().len(),
        40,
        "the multi-part transaction is one line"
    );
    assert_eq!(lines[3]["seq"], p.state.seq());

    // --to-seq stops there.
    let mut out = Vec::new();
    let s = ops::replay(&p.settings, 2, Some(2), &mut out)
        .await
        .unwrap();
    assert_eq!((s.transactions, s.first_seq, s.last_seq), (1, 2, 2));

    // Re-ingest into a second pipeline on the same server.
    let mut target = p.settings.clone();
    target.pipeline = unique_pipeline("replay-copy");
    let producer = deltasync_producer::Producer::start(target.clone())
        .await
        .unwrap();
    let input = deltasync_producer::ingest::Input::Reader(Box::new(std::io::Cursor::new(
        text.into_bytes(),
    )));
    deltasync_producer::ingest::ingest(
        &producer,
        input,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    let status = producer.status();
    producer.shutdown().await.unwrap();
    assert_eq!(
        status.digest,
        p.state.digest().to_hex(),
        "the copy has the same state digest"
    );
}

#[tokio::test]
async fn replay_of_a_pruned_sequence_names_the_first_retained_and_the_latest_snapshot() {
    let mut p = Pipeline::start("replay-pruned", |_| {}).await;
    for i in 0..6 {
        p.commit(puts(i, 1, 1)).await;
    }
    let m = p.snapshot().await;
    let stream =
        p.js.get_stream(deltasync_core::names::stream_name(&p.settings.pipeline))
            .await
            .unwrap();
    stream.purge().sequence(4).await.unwrap();
    let err = ops::replay(&p.settings, 2, None, &mut Vec::new())
        .await
        .unwrap_err();
    match &err {
        OpsError::NotRetained {
            wanted,
            first_seq,
            snapshot,
            ..
        } => {
            assert_eq!((*wanted, *first_seq), (2, 4));
            assert_eq!(snapshot, &m.seq.to_string());
        }
        other => panic!("expected NotRetained, got {other}"),
    }
    assert!(
        err.to_string().contains("first retained envelope is 4"),
        "{err}"
    );
}

#[tokio::test]
async fn rebuild_makes_a_replica_at_a_past_sequence_that_run_then_follows() {
    let mut p = varied_history("rebuild").await;
    let at = p.state.seq();
    let expected = p.state.clone();
    p.commit(vec![Change::put("later", &b"1"[..])]).await;
    let dir = tempfile::tempdir().unwrap();
    let summary = ops::rebuild(&p.settings, at, dir.path()).await.unwrap();
    assert_eq!(
        (summary.seq, summary.digest.clone()),
        (at, expected.digest().to_hex())
    );
    assert!(
        summary.from_snapshot.is_some(),
        "started from the retained snapshot"
    );

    // Through the binary: text by default, the same summary with --json.
    let other = tempfile::tempdir().unwrap();
    let (at_text, text_dir, json_dir) = (
        at.to_string(),
        other.path().join("text"),
        other.path().join("json"),
    );
    let (ok, out, err) = run_consumer(
        &p,
        &[
            "rebuild",
            "--at-seq",
            &at_text,
            "--data-dir",
            text_dir.to_str().unwrap(),
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(
        out.starts_with("rebuilt ") && out.contains(&format!("at envelope {at} ")),
        "{out}"
    );
    let (ok, out, err) = run_consumer(
        &p,
        &[
            "rebuild",
            "--at-seq",
            &at_text,
            "--data-dir",
            json_dir.to_str().unwrap(),
            "--json",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["digest"], expected.digest().to_hex());

    // A second rebuild into the same directory is refused.
    let err = ops::rebuild(&p.settings, at, dir.path()).await.unwrap_err();
    assert!(err.to_string().contains("already holds a replica"), "{err}");

    // Rebuilding inside a multi-part transaction is refused.
    let err = ops::rebuild(&p.settings, 4, tempfile::tempdir().unwrap().path())
        .await
        .unwrap_err();
    assert!(matches!(err, OpsError::MidTransaction(4)), "{err}");

    // `run` on that directory resumes from `at` (no snapshot download) and follows.
    let c = Running::start(p.consumer_settings(), durable("rebuilt", dir.path()));
    let s = c.wait_for(&p).await;
    assert_eq!(
        s.snapshot_bytes_fetched, 0,
        "resumed from the rebuilt cursor"
    );
    assert_same_state(&c.replica, &p);
    c.stop().await;
}

#[tokio::test]
async fn verify_reports_a_consistent_history_and_then_the_first_injected_divergence() {
    let mut p = varied_history("verify").await;
    let report = ops::verify(&p.settings, None).await.unwrap();
    assert_eq!(report.divergence, None);
    assert_eq!(report.last_seq, p.state.seq());
    assert!(report.envelopes_checked > 0);

    // An envelope whose recorded digest is wrong, at the next sequence.
    let bad = Envelope {
        lineage: p.state.lineage(),
        seq: p.state.seq() + 1,
        part: 1,
        parts: 1,
        digest: Digest([9; 32]),
        produced_at_ms: now_ms(),
        changes: vec![Change::put("x", &b"1"[..])],
    };
    let stream_seq = p.publish_raw(encode_envelope(&bad).unwrap()).await;
    let report = ops::verify(&p.settings, Some(1)).await.unwrap();
    let d = report.divergence.expect("the divergence is found");
    assert_eq!((d.seq, d.stream_seq), (bad.seq, stream_seq));
    assert!(d.reason.contains("digest mismatch"), "{}", d.reason);

    // Through the binary: "found a problem" exits 2, with one error line naming it.
    let (code, stdout, stderr) =
        run_consumer_code(&p, &["verify", "--from-seq", "1", "--json"], &[]).await;
    assert_eq!(code, Some(2), "stdout: {stdout}\nstderr: {stderr}");
    let line = format!(
        "deltasync-consumer: error: the history diverges at envelope {}",
        bad.seq
    );
    assert!(stderr.contains(&line), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["divergence"]["seq"], bad.seq);
    let (code, stdout, _) = run_consumer_code(&p, &["verify", "--from-seq", "1"], &[]).await;
    assert_eq!(code, Some(2));
    assert!(
        stdout.starts_with(&format!("DIVERGES at envelope {} ", bad.seq)),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_command_that_cannot_run_exits_1_with_one_error_line() {
    let p = Pipeline::start("cannot-run", |_| {}).await;
    // Unreachable NATS.
    let port = deltasync_testkit::free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_deltasync-consumer"))
        .args(["--nats-url", &url, "--pipeline", &p.settings.pipeline])
        .args(["replay", "--from-seq", "1"])
        .env("DELTASYNC_NATS__CONNECT_TIMEOUT", "1s")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].starts_with("deltasync-consumer: error: ") && errors[0].contains(&url[7..]),
        "{stderr}"
    );
    // A usage error is "could not run" too (clap's own code, 2, would mean "found a problem").
    let (code, _, stderr) = run_consumer_code(&p, &["verify", "--from-seq", "x"], &[]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("--from-seq"), "{stderr}");
    let (code, stdout, _) = run_consumer_code(&p, &["--help"], &[]).await;
    assert_eq!(code, Some(0));
    assert!(stdout.contains("Usage"), "{stdout}");
}

#[tokio::test]
async fn status_shows_bounds_snapshots_and_each_consumers_lag_and_headroom() {
    let mut p = Pipeline::start("status", |s| {
        s.stream.max_messages = 100;
        s.snapshot.every_envelopes = 20;
    })
    .await;
    for i in 0..10 {
        p.commit(puts(i, 1, 1)).await;
    }
    p.snapshot().await;
    let c = Running::start(p.consumer_settings(), ephemeral("watcher"));
    c.wait_for(&p).await;
    for i in 10..30 {
        p.commit(puts(i, 1, 2)).await;
    }
    c.wait_for(&p).await;
    // The server-side position is acknowledged after the local commit: wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        let status = ops::status(&p.settings).await.unwrap();
        let caught_up = status
            .consumers
            .iter()
            .any(|c| c.name.contains("watcher") && c.position == 30);
        if caught_up || std::time::Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    c.stop().await;
    assert_eq!((status.stream.first_seq, status.stream.last_seq), (1, 30));
    assert_eq!(status.snapshots.len(), 1);
    assert!(status.snapshots[0].latest);
    let consumer = status
        .consumers
        .iter()
        .find(|c| c.name.contains("watcher"))
        .unwrap_or_else(|| panic!("the watcher's durable consumer is listed: {status:#?}"));
    assert_eq!(consumer.position, 30);
    assert_eq!(consumer.lag, 0);
    assert_eq!(consumer.lag_secs, Some(0.0));
    assert_eq!(consumer.headroom_messages, Some(100));
    assert!(!consumer.pruned);
    let text = ops::render_status(&status);
    assert!(text.contains("headroom 100 messages"), "{text}");

    // Behind: the lag in time is the age of the oldest message it has not applied.
    for i in 30..35 {
        p.commit(puts(i, 1, 3)).await;
    }
    let status = ops::status(&p.settings).await.unwrap();
    let consumer = status
        .consumers
        .iter()
        .find(|c| c.name.contains("watcher"))
        .unwrap();
    assert_eq!(consumer.lag, 5);
    let secs = consumer
        .lag_secs
        .expect("the first unapplied message's age");
    assert!((0.0..600.0).contains(&secs), "{secs}");
}

/// Runs the `deltasync-consumer` binary on the pipeline with `args`, the caller's settings
/// being the defaults plus `env`.
fn consumer_cmd(p: &Pipeline, args: &[&str], env: &[(&str, &str)]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_deltasync-consumer"));
    cmd.arg("--nats-url")
        .arg(&p.settings.nats.url)
        .arg("--pipeline")
        .arg(&p.settings.pipeline)
        .args(args)
        .env_remove("DELTASYNC_CONFIG")
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs the binary to completion (bounded by DEADLINE): exit success, stdout, stderr.
async fn run_consumer(p: &Pipeline, args: &[&str]) -> (bool, String, String) {
    run_consumer_with(p, args, &[]).await
}

/// The binary's exit code, stdout and stderr.
async fn run_consumer_code(
    p: &Pipeline,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Option<i32>, String, String) {
    let mut cmd = consumer_cmd(p, args, env);
    let out = tokio::time::timeout(
        DEADLINE,
        tokio::task::spawn_blocking(move || cmd.output().unwrap()),
    )
    .await
    .expect("the command ends")
    .unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`run_consumer`] with `env` added to its environment.
async fn run_consumer_with(
    p: &Pipeline,
    args: &[&str],
    env: &[(&str, &str)],
) -> (bool, String, String) {
    let (code, out, err) = run_consumer_code(p, args, env).await;
    (code == Some(0), out, err)
}

#[tokio::test]
async fn logs_written_to_a_pipe_carry_no_terminal_colour_codes() {
    let mut p = Pipeline::start("plain-logs", |_| {}).await;
    p.commit(puts(0, 3, 1)).await;
    let (ok, _, err) = run_consumer_with(
        &p,
        &["run", "--ephemeral", "--once", "--id", "plain-logs"],
        &[("RUST_LOG", "info")],
    )
    .await;
    assert!(ok, "{err}");
    assert!(err.contains("Starting the consumer"), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "escape codes in piped logs: {err:?}"
    );
}

#[tokio::test]
async fn replay_from_inside_a_multi_part_transaction_starts_at_the_next_whole_one() {
    let mut p = Pipeline::start("replay-mid", |_| {}).await;
    // Ten puts, one per envelope: envelopes 1..=10 are one transaction.
    let seqs = p.commit_split(puts(0, 10, 1), 1).await;
    assert_eq!(seqs.len(), 10);
    p.commit(puts(100, 1, 1)).await; // envelope 11

    let (ok, out, err) = run_consumer(&p, &["replay", "--from-seq", "3"]).await;
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "no part of the transaction 1..=10 is printed:\n{out}"
    );
    assert_eq!(lines[0]["seq"], 11);
    assert!(
        err.contains("inside the multi-part transaction of envelopes 1..=10")
            && err.contains("envelope 11"),
        "{err}"
    );

    // From its first part, the transaction is one line of ten puts.
    let (ok, out, err) = run_consumer(&p, &["replay", "--from-seq", "1", "--to-seq", "10"]).await;
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert_eq!(lines[0]["txn"].as_array().unwrap().len(), 10);

    // Ending inside it prints nothing of it, and says so.
    let (ok, out, err) = run_consumer(&p, &["replay", "--from-seq", "1", "--to-seq", "5"]).await;
    assert!(ok, "{err}");
    assert_eq!(out, "", "{out}");
    assert!(err.contains("does not end by envelope 5"), "{err}");

    // An end beyond the history fails.
    let (ok, _, err) = run_consumer(&p, &["replay", "--from-seq", "1", "--to-seq", "20"]).await;
    assert!(!ok);
    assert!(err.contains("envelope 20 is not in the history"), "{err}");
}

#[tokio::test]
async fn replay_verify_and_rebuild_fail_naming_a_missing_envelope() {
    let mut p = Pipeline::start("replay-missing", |_| {}).await;
    let mut at = Vec::new();
    for i in 0..5 {
        at.push(p.commit(puts(i, 1, 1)).await);
    }
    p.delete_message(at[2]).await; // envelope 3

    let (ok, out, err) = run_consumer(&p, &["replay"]).await;
    assert!(!ok, "replay must fail; printed:\n{out}");
    assert!(
        err.contains("envelope 3 is missing from the stream"),
        "{err}"
    );
    let (ok, _, err) = run_consumer(&p, &["verify"]).await;
    assert!(!ok);
    assert!(err.contains("expected envelope 3"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("r");
    let (ok, _, err) = run_consumer(
        &p,
        &[
            "rebuild",
            "--at-seq",
            "5",
            "--data-dir",
            data_dir.to_str().unwrap(),
        ],
    )
    .await;
    assert!(!ok);
    assert!(err.contains("expected envelope 3"), "{err}");
    // Before the missing envelope, the history is whole.
    let (ok, out, err) = run_consumer(&p, &["replay", "--from-seq", "1", "--to-seq", "2"]).await;
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    // --json: the summary as JSON on stderr, the history alone on stdout.
    let (ok, out, err) = run_consumer(
        &p,
        &["replay", "--from-seq", "1", "--to-seq", "2", "--json"],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    // Not a terminal: no progress bar, no control codes.
    assert!(!err.contains('\r') && !err.contains('\u{1b}'), "{err:?}");
    let summary: serde_json::Value =
        serde_json::from_str(err.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(
        (
            summary["transactions"].as_u64(),
            summary["last_seq"].as_u64()
        ),
        (Some(2), Some(2)),
        "{summary}"
    );
}

/// Sends `signal` (STOP, CONT) to a process.
fn signal(pid: u32, signal: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{signal} {pid}");
}

#[tokio::test]
async fn replay_fails_naming_the_sequence_when_the_read_stalls_before_the_end() {
    use std::io::BufRead;
    let mut p = Pipeline::start("replay-stall", |_| {}).await;
    let total = 1500;
    for i in 0..total {
        p.commit(puts(i * 10, 10, 1)).await;
    }
    let pid = p._server.pid().unwrap();
    let mut child = consumer_cmd(
        &p,
        &["replay"],
        &[("DELTASYNC_NATS__REQUEST_TIMEOUT", "1s")],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    // The replay is under way once its first line arrives; as this test does not read
    // further, the pipe fills and the replay cannot get far ahead. Then the server stops
    // answering.
    let (first, rest) = tokio::task::spawn_blocking(move || {
        let mut lines = std::io::BufReader::new(stdout);
        let mut first = String::new();
        lines.read_line(&mut first).unwrap();
        signal(pid, "STOP");
        let rest = lines.lines().count();
        (first, rest)
    })
    .await
    .unwrap();
    let status = tokio::time::timeout(
        DEADLINE,
        tokio::task::spawn_blocking(move || child.wait().unwrap()),
    )
    .await
    .expect("the replay ends on its own while the server is stopped")
    .unwrap();
    signal(pid, "CONT");
    let err = std::io::read_to_string(stderr).unwrap();
    assert!(first.starts_with("{\"seq\":1,"), "{first}");
    assert!(rest + 1 < total, "the server stopped before the end");
    assert!(
        !status.success(),
        "a replay that printed {} of {total} lines must not exit 0; stderr:\n{err}",
        rest + 1
    );
    assert!(
        err.contains("reading the stream stalled at stream sequence"),
        "{err}"
    );
}

#[tokio::test]
async fn status_headroom_follows_the_streams_own_byte_limit_not_the_callers_settings() {
    // The stream is created with 4 MiB of retention; the status command runs with the
    // default settings (1,000,000 messages, 1 GiB).
    let mut p = Pipeline::start("status-bytes", |s| {
        s.stream.max_bytes = 4 << 20;
        s.stream.max_messages = 100_000;
    })
    .await;
    let pad = "x".repeat(10 * 1024);
    for i in 0..100 {
        p.commit(vec![Change::put(key(i), format!("\"{pad}\"").into_bytes())])
            .await;
    }
    let stream =
        p.js.get_stream(deltasync_core::names::stream_name(&p.settings.pipeline))
            .await
            .unwrap();
    stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("status-watch".into()),
            ..Default::default()
        })
        .await
        .unwrap();

    let (ok, out, err) = run_consumer(&p, &["status", "--json"]).await;
    assert!(ok, "{err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["stream"]["max_bytes"], 4 << 20, "{out}");
    assert_eq!(s["stream"]["max_messages"], 100_000, "{out}");
    let c = s["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "status-watch")
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(c["lag"], 100);
    // ~10.1 KiB per envelope: about 405 fit in 4 MiB, 100 are behind the position.
    let headroom = c["headroom_messages"].as_u64().unwrap();
    assert!(
        (280..=320).contains(&headroom),
        "headroom {headroom}: {out}"
    );
    assert_eq!(c["headroom_limit"], "bytes", "{out}");
    let (ok, text, err) = run_consumer(&p, &["status"]).await;
    assert!(ok, "{err}");
    assert!(text.contains("(bound by bytes)"), "{text}");
}

#[tokio::test]
async fn status_shows_a_snapshots_age_by_the_servers_clock_not_its_writers() {
    let mut p = Pipeline::start("status-age", |_| {}).await;
    for i in 0..10 {
        p.commit(puts(i, 1, 1)).await;
    }
    let m = p.snapshot().await;
    // The snapshot's writer's clock was two hours behind.
    let mut skewed = m.clone();
    skewed.created_at_ms -= 2 * 3600 * 1000;
    let key = deltasync_core::snapshot::manifest_key(m.lineage, m.seq);
    p._kv
        .put(
            &key,
            deltasync_core::snapshot::encode_manifest(&skewed)
                .unwrap()
                .into(),
        )
        .await
        .unwrap();

    let (ok, out, err) = run_consumer(&p, &["status", "--json"]).await;
    assert!(ok, "{err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    let age = s["snapshots"][0]["age_secs"].as_f64().unwrap();
    // Stored on the server a moment ago (well under ten minutes even on a busy machine).
    assert!(age < 600.0, "age {age}: {out}");
}

#[tokio::test]
async fn forget_removes_a_retired_replicas_marker_and_dry_run_only_says_so() {
    let mut p = Pipeline::start("forget", |_| {}).await;
    for i in 0..5 {
        p.commit(puts(i, 1, 1)).await;
    }
    let c = Running::start(p.consumer_settings(), ephemeral("retired"));
    c.wait_for(&p).await;
    c.stop().await;
    let listed = |s: &ops::Status| s.consumers.iter().any(|c| c.name.contains("retired"));
    assert!(listed(&ops::status(&p.settings).await.unwrap()));

    let (code, out, err) = run_consumer_code(
        &p,
        &["forget", "--id", "retired", "--dry-run", "--json"],
        &[],
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["deleted"], false, "{report}");
    assert!(
        report["name"].as_str().unwrap_or("").contains("retired"),
        "{report}"
    );
    assert!(
        listed(&ops::status(&p.settings).await.unwrap()),
        "a dry run removes nothing"
    );

    let (code, out, err) = run_consumer_code(&p, &["forget", "--id", "retired"], &[]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("removed the marker "), "{out}");
    assert!(!listed(&ops::status(&p.settings).await.unwrap()));

    // Forgetting it again: could not run, naming what is there instead.
    let (code, _, err) = run_consumer_code(&p, &["forget", "--id", "retired"], &[]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("no replica position marker") && err.contains("\"retired\""),
        "{err}"
    );
}

#[tokio::test]
async fn replay_since_starts_at_the_first_envelope_stored_within_that_time() {
    let mut p = Pipeline::start("since", |_| {}).await;
    for i in 0..4 {
        p.commit(puts(i, 1, 1)).await;
    }
    let before_b = p.state.seq();
    let mid = deltasync_core::envelope::now_ms();
    // Three seconds between the two groups of transactions, so that the cut-off below (a
    // second after `mid`) falls between them even if the command takes two seconds to start.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while deltasync_core::envelope::now_ms() < mid + 3000 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 4..7 {
        p.commit(puts(i, 1, 1)).await;
    }
    let ago = deltasync_core::envelope::now_ms() - (mid + 1000);
    let (ok, out, err) = run_consumer(&p, &["replay", "--since", &format!("{ago}ms")]).await;
    assert!(ok, "{err}");
    let seqs: Vec<u64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        seqs,
        vec![before_b + 1, before_b + 2, before_b + 3],
        "{out}"
    );

    // --since and --from-seq exclude each other; nothing that recent is an error.
    let (ok, _, err) = run_consumer(&p, &["replay", "--since", "1h", "--from-seq", "2"]).await;
    assert!(!ok && err.contains("--since"), "{err}");
    let (ok, _, err) = run_consumer(&p, &["replay", "--since", "1ms"]).await;
    assert!(
        !ok && err.contains("nothing was stored in the last"),
        "{err}"
    );
}
