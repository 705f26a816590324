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
        "ingest of 1000 puts into a pipeline of 5000 keys through the binary",
        "bootstrap of 6000 keys through `deltasync-consumer run --ephemeral --once`",
        "bootstrap of 6000 keys through the library (`Consumer` with `once`",
        "restart of a durable 6000-key replica through `deltasync-consumer run --data-dir D",
    ] {
        assert!(
            scenarios.iter().any(|s| s.starts_with(wanted)),
            "no row {wanted:?} in {scenarios:?}"
        );
    }
}
