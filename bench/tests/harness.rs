//! The demo and the benchmark harness run to completion at tiny sizes, so neither can rot.
//! Both start their own nats-server (through the testkit: a missing binary fails the test with
//! the install command) and check their own results: the demo exits non-zero unless every
//! consumer converged to the producer's digest, the benchmark unless every scenario's
//! digest check passed.

use std::path::Path;
use std::process::Command;

fn run(exe: &str, args: &[&str]) -> String {
    // Resolving the server here makes a missing nats-server fail with the install command.
    let server = deltasync_testkit::nats_server_bin();
    let out = Command::new(exe)
        .args(args)
        .env("NATS_SERVER_BIN", &server)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {exe}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{exe} {args:?} failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout.into_owned()
}

#[test]
fn the_demo_runs_a_short_pipeline_to_convergence() {
    let demo = env!("CARGO_BIN_EXE_deltasync-demo");
    let dir = Path::new(demo)
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    for bin in ["deltasync-producer", "deltasync-consumer"] {
        assert!(
            Path::new(&dir).join(bin).exists(),
            "{bin} is not built next to {demo}: run the workspace tests (cargo test --workspace)"
        );
    }
    run(
        demo,
        &["--duration", "3s", "--orders", "2000", "--bin-dir", &dir],
    );
}

#[test]
fn the_benchmark_harness_runs_at_tiny_sizes() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let json = dir.path().join("bench.json");
    let json_arg = json.display().to_string();
    run(
        env!("CARGO_BIN_EXE_deltasync-bench"),
        &[
            "--quick",
            "--keys",
            "5000",
            "--changes",
            "5000",
            "--json",
            &json_arg,
        ],
    );
    let text = std::fs::read_to_string(&json).expect("the benchmark writes its JSON");
    let v: serde_json::Value = serde_json::from_str(&text).expect("the JSON parses");
    let scenarios: Vec<&str> = v["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|r| r["scenario"].as_str())
        .collect();
    // The scenarios that go through the producer and consumer libraries ran (each exits the
    // benchmark with an error when its check fails).
    for wanted in [
        "producer ingest of 5000 changes",
        "consumer apply, memory, digest verified (consumer library",
        "consumer apply, durable (local log + snapshot)",
        "end-to-end latency, commit → applied",
        "publish rate during a full snapshot of 5000 keys",
        "ingest of 5000 puts through `deltasync-producer ingest FILE`",
        "ingest of 5000 puts through `deltasync-producer ingest FILE` (spawn to exit, final \
         snapshot included) against NATS KV puts",
        "ingest of 1000 puts into a pipeline of 5000 keys through the binary",
        "producer restart over 10000 changes after its newest snapshot (16001 keys)",
        "snapshot of 17003 keys through `deltasync-producer snapshot`",
        "bootstrap of 6000 keys through `deltasync-consumer run --ephemeral --once`",
        "bootstrap of 6000 keys through the library (`Consumer` with `once`",
        "restart of a durable 6000-key replica through `deltasync-consumer run --data-dir D",
        "user path: 500 transactions of 1–4 puts through `POST /v1/txn`",
        "user path: 5000 puts through `POST /v1/changes`",
        "user path: the feed of `deltasync-consumer run --ephemeral --http`, 100 SSE watchers",
    ] {
        assert!(
            scenarios.iter().any(|s| s.starts_with(wanted)),
            "no row {wanted:?} in {scenarios:?}"
        );
    }
}

#[test]
fn the_http_write_and_feed_scenarios_run_at_tiny_sizes() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let json = dir.path().join("api.json");
    let json_arg = json.display().to_string();
    run(
        env!("CARGO_BIN_EXE_deltasync-bench"),
        &[
            "--quick",
            "--changes",
            "3000",
            "--api-txns",
            "200",
            "--api-connections",
            "4",
            "--api-body-lines",
            "1000",
            "--feed-watchers",
            "50",
            "--feed-secs",
            "0.3",
            "--only",
            "api-txn,api-changes,feed-watchers",
            "--json",
            &json_arg,
        ],
    );
    let text = std::fs::read_to_string(&json).expect("the benchmark writes its JSON");
    let v: serde_json::Value = serde_json::from_str(&text).expect("the JSON parses");
    let rows = v["rows"].as_array().expect("rows");
    // Each scenario exits the benchmark with an error when its check fails; here, each ran
    // at the sizes asked for.
    let figures = |prefix: &str| {
        rows.iter()
            .find(|r| {
                r["scenario"]
                    .as_str()
                    .is_some_and(|s| s.starts_with(prefix))
            })
            .map(|r| r["figures"].clone())
            .unwrap_or_else(|| panic!("no row {prefix:?} in {rows:?}"))
    };
    let txn = figures("user path: 200 transactions of 1–4 puts through `POST /v1/txn`");
    assert_eq!(
        (txn["txns"].as_u64(), txn["connections"].as_u64()),
        (Some(200), Some(4))
    );
    let changes = figures("user path: 3000 puts through `POST /v1/changes`");
    assert_eq!(changes["bodies"].as_u64(), Some(3));
    let feed = figures("user path: the feed of `deltasync-consumer run --ephemeral --http`");
    assert_eq!(feed["watchers"].as_u64(), Some(50));
    assert!(feed["p99_s"]
        .as_f64()
        .is_some_and(|p| (0.0..30.0).contains(&p)));
}
