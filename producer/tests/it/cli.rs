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

    let (ok, out, err) = run(&server, &pipeline, &["snapshot"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("snapshot written") && out.contains("seq 3"),
        "{out}"
    );
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
