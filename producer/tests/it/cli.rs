//! The binary's other commands: `run --source orderbook`, `status`, `snapshot`,
//! `new-lineage`.

use crate::support;
use deltasync_testkit::NatsServer;

fn run(server: &NatsServer, pipeline: &str, args: &[&str]) -> (bool, String, String) {
    let out = support::producer_command(&server.url(), pipeline)
        .args(args)
        .output()
        .expect("run the producer binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_operator_commands_report_and_act_on_the_pipeline() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("cli");

    let (ok, _, err) = run(
        &server,
        &pipeline,
        &[
            "run",
            "--source",
            "orderbook",
            "--orders",
            "500",
            "--cycles",
            "3",
            "--cycle-interval",
            "10ms",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(
        err.matches("Order book cycle published").count(),
        3,
        "{err}"
    );
    assert!(
        err.contains("delta_bytes") && err.contains("full_snapshot_bytes"),
        "{err}"
    );

    let (ok, out, err) = run(&server, &pipeline, &["status", "--json"]);
    assert!(ok, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    assert_eq!(status["head"]["seq"], 3, "{out}");
    let lineage = status["head"]["lineage"]
        .as_str()
        .expect("lineage")
        .to_owned();

    // `run` wrote a final snapshot at its clean shutdown: the head is covered already.
    assert_eq!(status["last_snapshot"]["seq"], 3, "{out}");
    let (ok, out, err) = run(&server, &pipeline, &["snapshot"]);
    assert!(ok, "{err}");
    assert!(out.contains("already at the head"), "{out}");

    let (ok, out, err) = run(&server, &pipeline, &["status"]);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("lineage {lineage} seq 3")), "{out}");

    let (ok, _, err) = run(&server, &pipeline, &["new-lineage"]);
    assert!(!ok);
    assert!(
        err.contains("--yes") && err.contains("breaks continuity"),
        "{err}"
    );
    let (ok, out, err) = run(&server, &pipeline, &["new-lineage", "--yes"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("new lineage") && !out.contains(&lineage),
        "{out}"
    );
    let (ok, out, _) = run(&server, &pipeline, &["status", "--json"]);
    assert!(ok);
    let status: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    assert_ne!(status["last_snapshot"]["lineage"], lineage.as_str());
    // At the new lineage's first envelope, a marker.
    assert_eq!(status["last_snapshot"]["seq"], 1);
    assert_eq!(status["head"]["seq"], 1);
    assert_eq!(
        status["head"]["lineage"],
        status["last_snapshot"]["lineage"]
    );
}

/// The producer binary with the stream limits of `limits` (environment settings).
fn run_with(
    server: &NatsServer,
    pipeline: &str,
    limits: &[(&str, &str)],
    args: &[&str],
) -> (bool, String, String) {
    let out = support::producer_command(&server.url(), pipeline)
        .envs(limits.iter().copied())
        .args(args)
        .output()
        .expect("run the producer binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes `n` puts `{prefix}{i}` of about 10 KiB each.
fn write_large_puts(path: &std::path::Path, prefix: &str, n: usize) {
    use std::io::Write;
    let pad = "x".repeat(10 * 1024);
    let mut f = std::fs::File::create(path).expect("create the NDJSON file");
    for i in 0..n {
        writeln!(f, r#"{{"op":"put","key":"{prefix}{i}","value":"{pad}"}}"#).expect("write a line");
    }
}

#[test]
fn status_reads_the_streams_own_limits_and_judges_the_snapshots_headroom_by_them() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("status-limits");
    let dir = tempfile::tempdir().expect("a temporary directory");
    // The pipeline runs with a 4 MiB stream, one ~10 KiB change per envelope.
    let limits = [
        ("DELTASYNC_STREAM__MAX_BYTES", "4194304"),
        ("DELTASYNC_STREAM__MAX_MESSAGES", "100000"),
        ("DELTASYNC_PRODUCER__BATCH_MAX_CHANGES", "1"),
    ];
    let first = dir.path().join("first.ndjson");
    write_large_puts(&first, "a", 100);
    let (ok, _, err) = run_with(
        &server,
        &pipeline,
        &limits,
        &["ingest", first.to_str().expect("a UTF-8 path")],
    );
    assert!(ok, "{err}");
    let (ok, _, err) = run_with(&server, &pipeline, &limits, &["snapshot"]);
    assert!(ok, "{err}");
    let second = dir.path().join("second.ndjson");
    write_large_puts(&second, "b", 50);
    let (ok, _, err) = run_with(
        &server,
        &pipeline,
        &limits,
        &["ingest", second.to_str().expect("a UTF-8 path")],
    );
    assert!(ok, "{err}");

    // `status` runs with the default settings (1,000,000 messages, 1 GiB): they must not count.
    let (ok, out, err) = run(&server, &pipeline, &["status", "--json"]);
    assert!(ok, "{err}");
    let s: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    let st = &s["stream"];
    assert_eq!(st["max_bytes"], 4 << 20, "{out}");
    assert_eq!(st["max_messages"], 100_000, "{out}");
    let h = &s["snapshot_headroom"];
    let position = h["position"].as_u64().unwrap_or_else(|| panic!("{out}"));
    assert_eq!(position, s["last_snapshot"]["stream_seq"], "{out}");
    let uncovered = st["last_seq"].as_u64().expect("last_seq") - position;
    assert_eq!(h["uncovered"], uncovered, "{out}");
    assert_eq!(h["pruned"], false, "{out}");
    // Messages of the stream's mean size that fit in 4 MiB, minus those after the snapshot:
    // about 400 - uncovered, where the caller's settings would say about 100,000.
    let messages = st["messages"].as_u64().expect("messages");
    let bytes = st["bytes"].as_u64().expect("bytes");
    let fit = ((4u128 << 20) * u128::from(messages) / u128::from(bytes)) as u64;
    assert!((350..=450).contains(&fit), "{out}");
    assert_eq!(h["messages"], fit - uncovered, "{out}");
    assert_eq!(h["limit"], "bytes", "{out}");

    let (ok, text, err) = run(&server, &pipeline, &["status"]);
    assert!(ok, "{err}");
    assert!(
        text.contains("limits   100000 messages, 4194304 bytes"),
        "{text}"
    );
    assert!(
        text.contains(&format!("after {} more message(s)", fit - uncovered))
            && text.contains("(bound by bytes)"),
        "{text}"
    );
}

#[test]
fn errors_are_one_line_and_exit_codes_say_could_not_run() {
    // Unreachable NATS: 1, one line `deltasync-producer: error: …` with the cause chain, no
    // backtrace.
    let port = deltasync_testkit::free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let out = support::producer_command(&url, "exit-codes")
        .arg("status")
        .env("DELTASYNC_NATS__CONNECT_TIMEOUT", "1s")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run the producer");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].starts_with("deltasync-producer: error: ")
            && errors[0].contains(&format!("127.0.0.1:{port}")),
        "{stderr}"
    );
    assert!(
        !stderr.contains("Caused by") && !stderr.contains("stack backtrace"),
        "{stderr}"
    );

    // A usage error: 1 as well (2 means "found a problem").
    let out = support::producer_command(&url, "exit-codes")
        .args(["ingest", "--no-such-flag"])
        .output()
        .expect("run the producer");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));
}

/// Every command speaks text by default and JSON with `--json`, parsed here.
#[test]
fn every_command_prints_json_with_json_and_text_without() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("json");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let input = dir.path().join("in.ndjson");
    support::write_ndjson(&input, "j", 0..20, 5);
    let path = input.to_str().expect("UTF-8");

    // ingest: text on stdout; with --json the summary object; with --receipts --json the
    // receipts then the summary, all JSON lines.
    let (ok, out, err) = run(&server, &pipeline, &["ingest", path]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with("ingested 20 lines: 24 changes (4 txn lines)"),
        "{out}"
    );
    let (ok, out, err) = run(&server, &pipeline, &["ingest", path, "--json"]);
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(
        (summary["lines"].as_u64(), summary["changes"].as_u64()),
        (Some(20), Some(24))
    );
    let (ok, out, err) = run(
        &server,
        &pipeline,
        &["ingest", path, "--receipts", "--json"],
    );
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("every stdout line is JSON"))
        .collect();
    let last = lines.last().expect("a summary");
    assert_eq!(last["changes"], 24, "{out}");
    let receipted: u64 = lines[..lines.len() - 1]
        .iter()
        .map(|r| r["changes"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(receipted, 24, "the receipts cover every change: {out}");
    // --receipts without --json: the text summary moves to stderr, stdout stays NDJSON.
    let (ok, out, err) = run(&server, &pipeline, &["ingest", path, "--receipts"]);
    assert!(ok, "{err}");
    assert!(
        out.lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "{out}"
    );
    assert!(err.contains("ingested 20 lines"), "{err}");

    // snapshot
    let (ok, out, err) = run(&server, &pipeline, &["snapshot", "--json"]);
    assert!(ok, "{err}");
    let snap: serde_json::Value = serde_json::from_str(out.trim()).expect("snapshot JSON");
    assert_eq!(
        snap["written"], false,
        "ingest's clean stop wrote it: {out}"
    );
    assert!(snap["snapshot"]["seq"].as_u64().unwrap_or(0) > 0, "{out}");

    // status
    let (ok, out, err) = run(&server, &pipeline, &["status", "--json"]);
    assert!(ok, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    assert_eq!(status["head"]["seq"], snap["snapshot"]["seq"], "{out}");

    // new-lineage
    let (ok, out, err) = run(
        &server,
        &pipeline,
        &["new-lineage", "--yes", "--keep-state", "--json"],
    );
    assert!(ok, "{err}");
    let nl: serde_json::Value = serde_json::from_str(out.trim()).expect("new-lineage JSON");
    assert_eq!(nl["seq"], 1, "{out}");
    assert_ne!(nl["lineage"], status["head"]["lineage"], "{out}");
}
