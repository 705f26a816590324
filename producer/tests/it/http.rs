//! The HTTP endpoint and the order book source.

use crate::support::{self, read_stream, replay};
use deltasync_producer::sources::orderbook::{self, Orderbook, OrderbookOptions};
use deltasync_producer::{http, Change, Producer};
use deltasync_testkit::NatsServer;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_serves_health_readiness_metrics_and_status() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("http");
    let settings = support::settings(&server.url(), &pipeline);
    let p = Producer::start(settings.clone()).await.expect("start");
    let r = p.commit(vec![Change::put("a", "1")]).await.expect("commit");
    let stop = CancellationToken::new();
    let (addr, task) = http::spawn(
        "127.0.0.1:0".parse().expect("addr"),
        p.observer(),
        stop.clone(),
    )
    .await
    .expect("bind");
    assert_eq!(get(addr, "/healthz").await.0, 200);
    assert_eq!(get(addr, "/readyz").await.0, 200);
    let (code, metrics) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    for name in [
        "deltasync_producer_envelopes_total 1",
        "deltasync_producer_changes_total 1",
        "deltasync_producer_published_bytes_total",
        "deltasync_producer_publish_latency_seconds_bucket",
        "deltasync_producer_ack_window_in_use",
        "deltasync_producer_foreign_messages_total",
        "deltasync_producer_snapshots_total",
        "deltasync_producer_snapshot_written_bytes_total",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        concat!(
            "deltasync_build_info{version=\"",
            env!("CARGO_PKG_VERSION"),
            "\",role=\"producer\"} 1"
        ),
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    let (code, body) = get(addr, "/v1/status").await;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(status["lineage"], p.lineage().to_hex());
    assert_eq!(status["seq"], r.last_seq);
    assert_eq!(status["digest"], r.digest.to_hex());
    assert_eq!(status["phase"], "running");
    assert!(status.get("last_snapshot").is_some());
    // Publishing flows, held back against the limits the stream was created with.
    assert!(status["held_back"].is_null(), "{status}");
    assert_eq!(
        status["retention_limits"]["max_messages"], settings.stream.max_messages,
        "{status}"
    );
    let observer = p.observer();
    p.shutdown().await.expect("shutdown");
    assert!(!observer.ready());
    assert_eq!(get(addr, "/readyz").await.0, 503);
    stop.cancel();
    task.await.expect("join").expect("serve");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orderbook_source_publishes_full_states_as_small_diffs() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("orderbook");
    let p = Producer::start(support::settings(&server.url(), &pipeline))
        .await
        .expect("start");
    let opts = OrderbookOptions {
        orders: 2_000,
        churn_pct: 1.0,
        cycle_interval: Duration::from_millis(10),
        cycles: Some(4),
        ..OrderbookOptions::default()
    };
    let cycles = orderbook::run(&p, opts.clone(), CancellationToken::new())
        .await
        .expect("run");
    assert_eq!(cycles.len(), 4);
    assert!(
        cycles[0].receipt.bytes as f64 > 0.9 * cycles[0].full_bytes as f64,
        "the first cycle is everything"
    );
    for c in &cycles[1..] {
        assert!(
            c.receipt.bytes * 10 < c.full_bytes,
            "cycle {}: {} delta bytes of {}",
            c.cycle,
            c.receipt.bytes,
            c.full_bytes
        );
        assert_eq!(c.receipt.parts, 1);
    }
    p.shutdown().await.expect("shutdown");

    let mut book = Orderbook::new(opts);
    for _ in 1..4 {
        book.step();
    }
    let js = support::js(&server.url()).await;
    let replica = replay(&read_stream(&js, &pipeline).await).state;
    assert_eq!(replica.digest(), book.to_state().digest());
    assert_eq!(replica.digest(), cycles[3].receipt.digest);
}
