//! Crashes: a consumer process killed with SIGKILL in the middle of a backlog, or while it
//! writes a local snapshot, restarts from its durable cursor.
//!
//! Talks to nats-server through the test producer in `support`; runs the
//! `deltasync-consumer` binary as a child process and polls its HTTP status.

use crate::support::*;
use deltasync_consumer::{BatchKind, Reason};
use deltasync_core::names;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn spawn_consumer(p: &Pipeline, id: &str, dir: &std::path::Path, port: u16) -> Killed {
    spawn_consumer_with(p, id, dir, port, &[])
}

fn spawn_consumer_with(
    p: &Pipeline,
    id: &str,
    dir: &std::path::Path,
    port: u16,
    env: &[(&str, &str)],
) -> Killed {
    let child = consumer_process(p, id, dir, port, env)
        // Small, frequent commits: many commit points to be killed between.
        .env("DELTASYNC_CONSUMER__COMMIT_EVERY_ENVELOPES", "2")
        .env("DELTASYNC_CONSUMER__COMMIT_INTERVAL", "5ms")
        .envs(env.iter().copied())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the consumer binary starts");
    Killed(child)
}

#[tokio::test]
async fn a_consumer_killed_mid_apply_restarts_and_converges_with_no_change_applied_twice() {
    logs();
    let mut p = Pipeline::start("kill9", |_| {}).await;
    p.commit(puts(0, 5000, 1)).await;
    p.snapshot().await;
    p.churn(1500, 200, 20_000, 2).await;
    let last = p.state.seq();

    let dir = tempfile::tempdir().unwrap();
    let port = deltasync_testkit::free_port();
    let mut child = spawn_consumer(&p, "kill9-1", dir.path(), port);

    // Kill it once it has committed part of the backlog.
    let start = Instant::now();
    let seen = loop {
        assert!(start.elapsed() < DEADLINE, "the child never committed");
        if let Some(s) = status_of(port).await {
            let seq = s["seq"].as_u64().unwrap_or(0);
            if seq > 1 {
                break seq;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    child.0.kill().unwrap(); // SIGKILL
    child.0.wait().unwrap();
    assert!(
        seen < last,
        "killed mid-apply: status showed {seen} of {last}"
    );
    let committed = deltasync_consumer::local::read_cursor(dir.path())
        .unwrap()
        .expect("a committed cursor");
    assert!(
        committed.seq >= seen,
        "the status never shows a position that is not durable ({} < {seen})",
        committed.seq
    );
    assert!(committed.seq < last);

    // Restart (in-process, to watch every batch it applies).
    let consumer =
        deltasync_consumer::Consumer::new(p.consumer_settings(), durable("kill9-1", dir.path()))
            .unwrap();
    let replica = consumer.replica();
    let mut rx = replica.subscribe();
    let cancel = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(consumer.run(cancel.clone()));
    let mut applied = Vec::new();
    while applied.last() != Some(&last) {
        let b = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .expect("batches keep coming")
            .unwrap();
        assert_eq!(b.kind, BatchKind::Applied, "no re-snapshot after a crash");
        applied.push(b.seq);
    }
    let expected: Vec<u64> = (committed.seq + 1..=last).collect();
    assert_eq!(
        applied, expected,
        "every envelope after the durable cursor, each exactly once"
    );
    let s = replica
        .wait_until(DEADLINE, |s| s.seq == last)
        .await
        .unwrap();
    assert_eq!(s.decisions.get(Reason::Resume.as_str()), Some(&1));
    assert_eq!(s.snapshot_bytes_fetched, 0);
    assert_eq!(s.digest, p.state.digest().to_hex());
    assert_same_state(&replica, &p);
    cancel.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_consumer_killed_while_writing_a_local_snapshot_restarts_from_its_log() {
    logs();
    let mut p = Pipeline::start("kill9snap", |_| {}).await;
    p.commit(puts(0, 20_000, 1)).await;
    let base = p.snapshot().await;
    p.churn(1500, 200, 20_000, 2).await;
    let last = p.state.seq();

    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("replica.snap.tmp");
    // A local snapshot as soon as the log outgrows twice the last one: many to be killed in.
    let env = [("DELTASYNC_CONSUMER__LOCAL_SNAPSHOT_LOG_BYTES", "1")];
    let mut killed_in_snapshot = false;
    for attempt in 0..20 {
        let port = deltasync_testkit::free_port();
        let mut child = spawn_consumer_with(&p, "kill9snap-1", dir.path(), port, &env);
        // Past the bootstrap (whose snapshot is written in the foreground), a temporary
        // snapshot file is a background one.
        let start = Instant::now();
        loop {
            assert!(start.elapsed() < DEADLINE, "no background snapshot seen");
            let seq = status_of(port).await.and_then(|s| s["seq"].as_u64());
            if seq.is_some_and(|s| s >= last) {
                break; // caught up before a kill landed: run it again
            }
            if seq.is_some_and(|s| s > base.seq) && tmp.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        child.0.kill().unwrap(); // SIGKILL
        child.0.wait().unwrap();
        if tmp.exists() {
            eprintln!("killed while writing a local snapshot (attempt {attempt})");
            killed_in_snapshot = true;
            break;
        }
    }
    assert!(
        killed_in_snapshot,
        "no kill landed during a local snapshot in 20 runs"
    );
    let committed = deltasync_consumer::local::read_cursor(dir.path())
        .unwrap()
        .expect("a committed cursor");
    assert!(
        committed.seq > base.seq && committed.seq < last,
        "{committed:?}"
    );

    // Restart in-process: it resumes from the snapshot and log on disk, without a download,
    // applying every envelope after the durable cursor exactly once.
    let consumer = deltasync_consumer::Consumer::new(
        p.consumer_settings(),
        durable("kill9snap-1", dir.path()),
    )
    .unwrap();
    let replica = consumer.replica();
    let mut rx = replica.subscribe();
    let cancel = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(consumer.run(cancel.clone()));
    let mut applied = Vec::new();
    while applied.last() != Some(&last) {
        let b = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .expect("batches keep coming")
            .unwrap();
        assert_eq!(b.kind, BatchKind::Applied, "no re-snapshot after a crash");
        applied.push(b.seq);
    }
    let expected: Vec<u64> = (committed.seq + 1..=last).collect();
    assert_eq!(
        applied, expected,
        "each envelope after the cursor exactly once"
    );
    let s = replica
        .wait_until(DEADLINE, |s| s.seq == last)
        .await
        .unwrap();
    assert_eq!(s.decisions.get(Reason::Resume.as_str()), Some(&1));
    assert_eq!(s.snapshot_bytes_fetched, 0);
    assert_same_state(&replica, &p);
    assert!(!tmp.exists(), "the partial snapshot is removed at open");
    cancel.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test]
async fn sigterm_finishes_the_envelope_in_hand_commits_and_exits_zero() {
    logs();
    let mut p = Pipeline::start("sigterm", |_| {}).await;
    p.commit(puts(0, 2000, 1)).await;
    p.snapshot().await;
    p.churn(800, 200, 20_000, 2).await;
    let last = p.state.seq();

    let dir = tempfile::tempdir().unwrap();
    let port = deltasync_testkit::free_port();
    let mut child = spawn_consumer(&p, "sigterm-1", dir.path(), port);
    let start = Instant::now();
    let seen = loop {
        assert!(start.elapsed() < DEADLINE, "the child never committed");
        if let Some(s) = status_of(port).await {
            let seq = s["seq"].as_u64().unwrap_or(0);
            if seq > 1 {
                break seq;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child.0),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = child.0.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    let committed = deltasync_consumer::local::read_cursor(dir.path())
        .unwrap()
        .expect("a committed cursor");
    assert!(committed.seq >= seen && committed.seq <= last);
    eprintln!(
        "SIGTERM at committed {seen}; exit committed {} of {last}",
        committed.seq
    );

    // What it committed is whole: a restart resumes from it and converges.
    let c = Running::start(p.consumer_settings(), durable("sigterm-1", dir.path()));
    let s = c.wait_for(&p).await;
    assert_eq!(s.decisions.get(Reason::Resume.as_str()), Some(&1));
    assert_eq!(s.envelopes_applied, last - committed.seq);
    assert_same_state(&c.replica, &p);
    c.stop().await;
}

/// A disk that stops taking the log's writes (a per-file size limit here, set with `ulimit -f`
/// by the shell that starts the binary; a full disk fails the same writes): the consumer exits
/// with an error naming the log, claims nothing past its last whole commit — its marker on the
/// server included — and a restart resumes from that commit, without a download.
#[tokio::test]
async fn a_consumer_whose_log_cannot_be_written_exits_naming_it_and_resumes_from_its_last_whole_commit(
) {
    logs();
    let mut p = Pipeline::start("fsize", |_| {}).await;
    p.commit(puts(0, 50, 1)).await;
    p.snapshot().await;
    // About 1.4 MB of log against a limit of 128 KiB (dash counts 512-byte blocks; another
    // sh's 1 KiB blocks make it 256 KiB): the bootstrap's local snapshot of 50 keys fits.
    p.churn(300, 50, 2000, 2).await;
    let last = p.state.seq();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("sh")
        .args(["-c", r#"trap "" XFSZ; ulimit -f 256 && exec "$0" "$@""#])
        .arg(env!("CARGO_BIN_EXE_deltasync-consumer"))
        .args(["--nats-url", &p.settings.nats.url])
        .args(["--pipeline", &p.settings.pipeline])
        .args(["run", "--once", "--id", "fsize-1", "--data-dir"])
        .arg(dir.path())
        .env("DELTASYNC_CONSUMER__COMMIT_EVERY_ENVELOPES", "2")
        .env("DELTASYNC_CONSUMER__COMMIT_INTERVAL", "5ms")
        .env_remove("DELTASYNC_CONFIG")
        .env("RUST_LOG", "info")
        .output()
        .expect("sh starts the consumer binary");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let error = stderr
        .lines()
        .find(|l| l.starts_with("deltasync-consumer: error: "))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(
        error.contains(&dir.path().join("log.").display().to_string())
            && error.matches("File too large").count() == 1,
        "{error}"
    );
    assert!(
        !stderr.contains("Consumer stopped; replica committed"),
        "{stderr}"
    );
    let on_disk = deltasync_consumer::local::read_cursor(dir.path())
        .unwrap()
        .expect("the bootstrap's cursor at least");
    assert!(on_disk.seq < last, "the limit stopped nothing: {on_disk:?}");
    let stream =
        p.js.get_stream(names::stream_name(&p.settings.pipeline))
            .await
            .unwrap();
    let name = names::consumer_name(&p.settings.pipeline, "fsize-1");
    if let Ok(info) = stream.consumer_info(&name).await {
        assert!(
            info.ack_floor.stream_sequence <= on_disk.stream_seq,
            "the marker says {} is committed, the disk holds {}",
            info.ack_floor.stream_sequence,
            on_disk.stream_seq
        );
    }

    let c = Running::start(p.consumer_settings(), durable("fsize-1", dir.path()));
    let s = c.wait_for(&p).await;
    assert_eq!(s.seq, last);
    assert_eq!(s.decisions.get(Reason::Resume.as_str()), Some(&1));
    assert_eq!(s.snapshot_bytes_fetched, 0);
    assert_same_state(&c.replica, &p);
    c.stop().await;
}
