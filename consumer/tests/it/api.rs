//! What operators and services read: the HTTP endpoint, `dump`, and the position shown on the
//! server.
//!
//! Talks to nats-server through the test producer in `support`, to the consumer's HTTP
//! endpoint over TCP, and runs the `deltasync-consumer` binary for `dump`.

use crate::support::*;
use deltasync_core::{names, Change};
use std::time::Duration;

#[tokio::test]
async fn the_http_endpoint_serves_health_readiness_metrics_status_keys_and_state() {
    logs();
    let mut p = Pipeline::start("http", |_| {}).await;
    p.commit(puts(0, 300, 1)).await;
    p.snapshot().await;
    p.commit(vec![
        Change::put("bin", vec![0u8, 159, 146, 150]),
        Change::put("a/b c", &b"\"slash and space\""[..]),
    ])
    .await;
    let mut options = ephemeral("http-1");
    options.http = Some("127.0.0.1:0".parse().unwrap());
    let c = Running::start(p.consumer_settings(), options);
    let s = c.wait_for(&p).await;
    let addr = c.replica.http_addr().unwrap();

    let (code, _, body) = http_get(addr, "/healthz").await;
    assert_eq!((code, body), (200, b"ok\n".to_vec()));
    let (code, _, _) = http_get(addr, "/readyz").await;
    assert_eq!(code, 200);

    let (code, _, body) = http_get(addr, "/v1/status").await;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status["id"], "http-1");
    assert_eq!(status["seq"], p.state.seq());
    assert_eq!(status["digest"], p.state.digest().to_hex());
    assert_eq!(status["lineage"], p.state.lineage().to_hex());
    assert_eq!(status["entries"], p.state.len());
    assert_eq!(status["lag"], 0);
    assert_eq!(status["last_resync"]["reason"], "bootstrap");
    // Caught up: no lag in time either; the last applied envelope's production time is now-ish
    // (the producer's clock is this host's here).
    assert_eq!(status["lag_seconds"], 0.0);
    let at = status["last_applied_at_ms"]
        .as_u64()
        .expect("last_applied_at_ms");
    let now = deltasync_core::envelope::now_ms();
    assert!(at <= now && now - at < 600_000, "{at} vs now {now}");

    let (code, _, body) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200);
    let text = String::from_utf8(body).unwrap();
    for name in [
        "deltasync_consumer_envelopes_applied_total 1",
        "deltasync_consumer_changes_applied_total 2",
        "deltasync_consumer_lag_messages 0",
        "deltasync_consumer_lag_seconds 0.0",
        "process_resident_memory_bytes ",
        "process_cpu_seconds_total ",
        "deltasync_consumer_last_applied_timestamp_seconds ",
        "deltasync_consumer_resyncs_total{reason=\"bootstrap\"} 1",
        "deltasync_consumer_sync_decisions_total{reason=\"bootstrap\"} 1",
        "deltasync_consumer_apply_seconds_bucket",
        "deltasync_consumer_snapshot_fetched_bytes_total",
        "deltasync_consumer_snapshot_seconds_count 1",
        "deltasync_consumer_foreign_messages_total 0",
        concat!(
            "deltasync_build_info{version=\"",
            env!("CARGO_PKG_VERSION"),
            "\",role=\"consumer\"} 1"
        ),
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }

    let (code, _, body) = http_get(addr, &format!("/v1/keys/{}", key(7))).await;
    assert_eq!(code, 200);
    let line: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(line["key"], key(7));
    assert_eq!(line["value"]["n"], 7);
    let (code, _, body) = http_get(addr, "/v1/keys/bin").await;
    assert_eq!(code, 200);
    let line: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(line["value_b64"], "AJ+Slg==");
    let (code, _, body) = http_get(addr, "/v1/keys/a%2Fb%20c").await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let (code, _, _) = http_get(addr, "/v1/keys/absent").await;
    assert_eq!(code, 404);

    let (code, headers, body) = http_get(addr, "/v1/state").await;
    assert_eq!(code, 200);
    assert_eq!(headers["deltasync-seq"], s.seq.to_string());
    assert_eq!(headers["deltasync-digest"], s.digest);
    let text = String::from_utf8(body).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), p.state.len());
    let keys: Vec<&str> = lines.iter().map(|l| l["key"].as_str().unwrap()).collect();
    let mut sorted = keys.clone();
    sorted.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    assert_eq!(keys, sorted);
    c.stop().await;
}

#[tokio::test]
async fn readiness_waits_for_the_bootstrap() {
    logs();
    let p = Pipeline::start("ready", |_| {}).await;
    // No history at all yet: the consumer waits for the first envelope and is not ready.
    let mut options = ephemeral("ready-1");
    options.http = Some("127.0.0.1:0".parse().unwrap());
    let c = Running::start(p.consumer_settings(), options);
    let start = std::time::Instant::now();
    let addr = loop {
        if let Some(a) = c.replica.http_addr() {
            break a;
        }
        assert!(start.elapsed() < DEADLINE);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (code, _, body) = http_get(addr, "/readyz").await;
    assert_eq!(code, 503, "{}", String::from_utf8_lossy(&body));
    let (code, _, _) = http_get(addr, "/healthz").await;
    assert_eq!(code, 200);

    // The producer's first envelope (lineage seq 1, no snapshot yet) bootstraps it.
    let mut p = p;
    p.commit(puts(0, 10, 1)).await;
    let s = c.wait_for(&p).await;
    assert!(s.ready);
    let (code, _, _) = http_get(addr, "/readyz").await;
    assert_eq!(code, 200);
    assert_same_state(&c.replica, &p);
    c.stop().await;
}

#[tokio::test]
async fn dump_prints_the_replica_as_ndjson_sorted_by_key_bytes() {
    logs();
    let mut p = Pipeline::start("dump", |_| {}).await;
    p.commit(vec![
        Change::put("b", &br#"{"x": [1, 2]}"#[..]),
        Change::put("a", &b"12"[..]),
        Change::put("B", &b"not json"[..]),
        Change::put("\u{e9}t\u{e9}", vec![0xff, 0x00]),
        Change::put("multi", &b"{\n  \"y\": true\n}"[..]),
        Change::put("gone", &b"1"[..]),
    ])
    .await;
    p.commit(vec![Change::delete("gone")]).await;
    p.snapshot().await;
    let dir = tempfile::tempdir().unwrap();
    let mut options = durable("dump-1", dir.path());
    options.once = true;
    Running::start(p.consumer_settings(), options)
        .join()
        .await
        .unwrap();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_deltasync-consumer"))
        .arg("dump")
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("DELTASYNC_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let expected = [
        r#"{"key":"B","value_b64":"bm90IGpzb24="}"#,
        r#"{"key":"a","value":12}"#,
        r#"{"key":"b","value":{"x": [1, 2]}}"#,
        // Several lines: base64, so that a reader gets the stored bytes back.
        r#"{"key":"multi","value_b64":"ewogICJ5IjogdHJ1ZQp9"}"#,
        "{\"key\":\"\u{e9}t\u{e9}\",\"value_b64\":\"/wA=\"}",
    ];
    assert_eq!(text.lines().collect::<Vec<_>>(), expected);

    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_deltasync-consumer"))
        .arg("dump")
        .arg("--data-dir")
        .arg(dir.path().join("nope"))
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no replica at"));
}

#[tokio::test]
async fn each_replicas_committed_position_is_visible_on_the_server() {
    logs();
    let mut p = Pipeline::start("marker", |_| {}).await;
    p.commit(puts(0, 100, 1)).await;
    p.snapshot().await;
    p.churn(10, 5, 100, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let c = Running::start(p.consumer_settings(), durable("marker-1", dir.path()));
    let s = c.wait_for(&p).await;
    let stream =
        p.js.get_stream(names::stream_name(&p.settings.pipeline))
            .await
            .unwrap();
    let name = names::consumer_name(&p.settings.pipeline, "marker-1");
    let start = std::time::Instant::now();
    loop {
        let floor = match stream.consumer_info(&name).await {
            Ok(info) => {
                assert_eq!(
                    info.config.inactive_threshold,
                    p.settings.consumer.inactive_threshold
                );
                info.ack_floor.stream_sequence
            }
            Err(_) => 0,
        };
        if floor == s.stream_seq {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "ack floor {floor}, committed {}",
            s.stream_seq
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.stop().await;
}

#[tokio::test]
async fn the_server_keeps_a_running_replicas_marker_and_removes_it_after_the_replica_is_gone() {
    logs();
    let mut p = Pipeline::start("inactive", |s| {
        s.consumer.inactive_threshold = Duration::from_secs(2);
    })
    .await;
    p.commit(puts(0, 10, 1)).await;
    p.snapshot().await;
    let c = Running::start(p.consumer_settings(), ephemeral("inactive-1"));
    c.wait_for(&p).await;
    let stream =
        p.js.get_stream(names::stream_name(&p.settings.pipeline))
            .await
            .unwrap();
    let name = names::consumer_name(&p.settings.pipeline, "inactive-1");
    let start = std::time::Instant::now();
    while stream.consumer_info(&name).await.is_err() {
        assert!(start.elapsed() < DEADLINE, "the marker is created");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Idle for three thresholds: still there.
    let idle_until = std::time::Instant::now() + Duration::from_secs(6);
    while std::time::Instant::now() < idle_until {
        assert!(
            stream.consumer_info(&name).await.is_ok(),
            "a live replica's marker is kept"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    c.stop().await;
    let start = std::time::Instant::now();
    while stream.consumer_info(&name).await.is_ok() {
        assert!(start.elapsed() < DEADLINE, "the marker is removed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls the consumer's `/v1/status` until `done` holds for it (within the deadline).
async fn http_status_until(
    addr: std::net::SocketAddr,
    what: &str,
    mut done: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (code, _, body) = http_get(addr, "/v1/status").await;
        assert_eq!(code, 200);
        let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
        if done(&status) {
            return status;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("/v1/status never showed {what} within {DEADLINE:?}: {status:#}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_http_status_shows_the_replicas_own_headroom_by_the_streams_own_limits() {
    logs();
    // The stream holds 4 MiB; the consumer runs with the default settings (1,000,000
    // messages, 1 GiB), which must not count.
    let mut p = Pipeline::start("http-headroom", |s| {
        s.stream.max_bytes = 4 << 20;
        s.stream.max_messages = 100_000;
    })
    .await;
    let pad = format!("\"{}\"", "x".repeat(10 * 1024));
    for i in 0..50 {
        p.commit(vec![Change::put(key(i), pad.clone().into_bytes())])
            .await;
    }
    p.snapshot().await;
    for i in 50..100 {
        p.commit(vec![Change::put(key(i), pad.clone().into_bytes())])
            .await;
    }
    let mut settings = p.consumer_settings();
    let defaults = deltasync_config::settings::Settings::default();
    settings.stream.max_bytes = defaults.stream.max_bytes;
    settings.stream.max_messages = defaults.stream.max_messages;
    let mut options = ephemeral("http-headroom-1");
    options.http = Some("127.0.0.1:0".parse().unwrap());
    let c = Running::start(settings, options);
    c.wait_for(&p).await;
    let addr = c.replica.http_addr().unwrap();

    let at = p.stream_seq;
    let s = http_status_until(addr, "the headroom at the head", |s| {
        s["headroom"]["position"] == at
    })
    .await;
    let h = &s["headroom"];
    assert_eq!(h["lag"], 0, "{s:#}");
    assert_eq!(h["pruned"], false, "{s:#}");
    // ~10.1 KiB per envelope: about 405 fit in 4 MiB, and the replica is at the head.
    let messages = h["messages"].as_u64().unwrap_or_else(|| panic!("{s:#}"));
    assert!(
        (370..=440).contains(&messages),
        "headroom {messages}: {s:#}"
    );
    assert_eq!(h["limit"], "bytes", "{s:#}");

    // It follows the replica: after 100 more envelopes it is judged at the new head, with
    // less room.
    for i in 100..200 {
        p.commit(vec![Change::put(key(i), pad.clone().into_bytes())])
            .await;
    }
    c.wait_for(&p).await;
    let at = p.stream_seq;
    let s = http_status_until(addr, "the headroom at the new head", |s| {
        s["headroom"]["position"] == at
    })
    .await;
    let later = s["headroom"]["messages"].as_u64().unwrap();
    assert!(later <= messages, "{later} > {messages}: {s:#}");
    c.stop().await;
}

#[tokio::test]
async fn with_the_feed_off_the_feed_routes_answer_404_and_reads_still_work() {
    let mut p = Pipeline::start("feedoff", |_| {}).await;
    p.commit(puts(0, 3, 1)).await;
    let mut settings = p.consumer_settings();
    settings.consumer.feed_max_bytes = 0;
    let mut options = ephemeral("feedoff-1");
    options.http = Some("127.0.0.1:0".parse().unwrap());
    let c = Running::start(settings, options);
    c.wait_for(&p).await;
    let addr = c.replica.http_addr().unwrap();
    for path in ["/v1/changes?after=0", "/v1/watch"] {
        let (code, _, body) = http_get(addr, path).await;
        let text = String::from_utf8_lossy(&body);
        assert_eq!(code, 404, "{path}: {text}");
        assert!(text.contains("feed_max_bytes = 0"), "{path}: {text}");
    }
    let (code, _, _) = http_get(addr, "/v1/state").await;
    assert_eq!(code, 200);
    c.stop().await;
}
