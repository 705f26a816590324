//! The ingest command's contract: exit 0 when everything is acknowledged; at the first bad
//! line, everything before it published, nothing of it or after it, an error naming it.

use crate::support::{self, read_stream, replay};
use deltasync_testkit::NatsServer;
use std::io::Write;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_publishes_every_line_and_exits_zero_when_input_ends() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("ingest-ok");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("in.ndjson");
    let mut f = std::fs::File::create(&path).expect("create");
    writeln!(
        f,
        r#"{{"op":"put","key":"a","value":{{"x": 1, "y": [true, null]}}}}"#
    )
    .expect("write");
    writeln!(f).expect("write");
    writeln!(
        f,
        r#"{{"seq":7,"lineage":"00","op":"put","key":"b","value":"text"}}"#
    )
    .expect("write");
    writeln!(
        f,
        r#"{{"txn":[{{"op":"del","key":"a"}},{{"op":"put","key":"c","value":3}}]}}"#
    )
    .expect("write");
    drop(f);
    let out = support::producer_command(&server.url(), &pipeline)
        .arg("ingest")
        .arg(&path)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Logs to a pipe are plain text: no terminal colour codes (`docker compose logs`, files).
    assert!(stderr.contains("Connected to NATS"), "{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "escape codes in piped logs: {stderr:?}"
    );
    let js = support::js(&server.url()).await;
    let state = replay(&read_stream(&js, &pipeline).await).state;
    assert_eq!(state.get("a"), None);
    assert_eq!(
        state.get("b").map(|v| v.to_vec()),
        Some(br#""text""#.to_vec())
    );
    assert_eq!(state.get("c").map(|v| v.to_vec()), Some(b"3".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_stops_at_the_first_bad_line_having_published_every_line_before_it() {
    let server = NatsServer::start();
    let js = support::js(&server.url()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let long_key = "k".repeat(1025);
    let big_value = "v".repeat(600 * 1024);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "json",
            r#"{"op":"put","key":"bad","value":"#.to_owned(),
            "invalid JSON",
        ),
        (
            "op",
            r#"{"op":"upsert","key":"bad","value":1}"#.to_owned(),
            "unknown op \"upsert\"",
        ),
        (
            "key",
            r#"{"op":"put","value":1}"#.to_owned(),
            "missing `key`",
        ),
        (
            "type",
            r#"{"op":"put","key":7,"value":1}"#.to_owned(),
            "`key` must be a string",
        ),
        (
            "long",
            format!(r#"{{"op":"del","key":"{long_key}"}}"#),
            "key is 1025 bytes",
        ),
        (
            "large",
            format!(r#"{{"op":"put","key":"bad","value":"{big_value}"}}"#),
            "the limit is 524288",
        ),
        ("empty", r#"{"txn":[]}"#.to_owned(), "empty txn"),
        (
            "txn",
            r#"{"txn":[{"op":"put","key":"bad","value":1},{"op":"put","key":"bad2"}]}"#.to_owned(),
            "txn item 2: missing `value`",
        ),
    ];
    for (name, bad, reason) in cases {
        let pipeline = support::pipeline(&format!("bad-{name}"));
        let path = dir.path().join(format!("{name}.ndjson"));
        let mut f = std::fs::File::create(&path).expect("create");
        for i in 0..10 {
            if i == 5 {
                writeln!(f, r#"{{"txn":[{{"op":"put","key":"good{i}","value":{i}}},{{"op":"put","key":"good{i}b","value":0}}]}}"#)
            } else {
                writeln!(f, r#"{{"op":"put","key":"good{i}","value":{i}}}"#)
            }
            .expect("write");
        }
        writeln!(f, "{bad}").expect("write");
        for i in 0..10 {
            writeln!(f, r#"{{"op":"put","key":"later{i}","value":{i}}}"#).expect("write");
        }
        drop(f);
        let out = support::producer_command(&server.url(), &pipeline)
            .arg("ingest")
            .arg(&path)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: exit 0 on a bad line");
        assert!(
            stderr.contains("line 11:"),
            "{name}: the error names the line: {stderr}"
        );
        assert!(
            stderr.contains(reason),
            "{name}: the error says {reason:?}: {stderr}"
        );

        let state = replay(&read_stream(&js, &pipeline).await).state;
        assert_eq!(
            state.len(),
            11,
            "{name}: lines 1-10 (one a 2-change txn) and nothing else"
        );
        for i in 0..10 {
            assert!(
                state.get(&format!("good{i}")).is_some(),
                "{name}: good{i} missing"
            );
            assert!(
                state.get(&format!("later{i}")).is_none(),
                "{name}: later{i} published"
            );
        }
        assert!(
            state.get("bad").is_none(),
            "{name}: part of the bad line was published"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_ingest_through_the_binary_snapshots_incrementally_on_the_snapshot_it_recovered() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("ingest-incremental");
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, second) = (
        dir.path().join("first.ndjson"),
        dir.path().join("second.ndjson"),
    );
    support::write_ndjson(&first, "k", 0..20_000, 0);
    support::write_ndjson(&second, "later", 0..10, 0);
    for path in [&first, &second] {
        let out = support::producer_command(&server.url(), &pipeline)
            .arg("ingest")
            .arg(path)
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let s = support::settings(&server.url(), &pipeline);
    let js = support::js(&server.url()).await;
    let kv = deltasync_nats::store::bucket(&js, &s)
        .await
        .expect("bucket");
    let latest = deltasync_nats::store::latest_manifest(&kv)
        .await
        .expect("read latest")
        .expect("a snapshot");
    let replayed = replay(&read_stream(&js, &pipeline).await).state;
    assert_eq!(
        latest.seq,
        replayed.seq(),
        "the final snapshot is at the head"
    );
    assert_eq!(latest.entries, 20_010);
    // The second run's final snapshot stacks on the first run's (which it recovered from):
    // a segment of the 10 new keys, not every chunk written again.
    assert!(
        latest.base_seq < latest.seq && !latest.segments.is_empty(),
        "the second snapshot is a new base: base_seq {} seq {} segments {}",
        latest.base_seq,
        latest.seq,
        latest.segments.len()
    );
    assert!(
        latest.bytes_written * 20 < latest.total_bytes(),
        "the second snapshot wrote {} of {} bytes",
        latest.bytes_written,
        latest.total_bytes()
    );
    let loaded = deltasync_nats::store::load(&kv, latest)
        .await
        .expect("load");
    assert_eq!(loaded.state.digest(), replayed.digest());
}
