//! Following a replica over HTTP and in Rust: the long-poll `/v1/changes`, the SSE stream
//! `/v1/watch`, prefix listings, reads at `min_seq`, the checksum, raw values, and
//! `Replica::watch`, with the real producer committing.
//!
//! Talks to nats-server through the producer library; runs the `deltasync-consumer` binary
//! (`run --ephemeral --http`) as a child process and talks to it over HTTP; the thousand
//! watchers and the stalled watcher use an in-process consumer.

use crate::support::*;
use deltasync_config::settings::Settings;
use deltasync_consumer::WatchEvent;
use deltasync_producer::{Change, NewLineage, Producer};
use deltasync_testkit::NatsServer;
use futures::StreamExt;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn producer_settings(url: &str, prefix: &str) -> Settings {
    settings(url, &unique_pipeline(prefix), |s| {
        s.producer.linger = Duration::from_millis(2);
        s.producer.batch_max_changes = 500;
    })
}

/// The consumer binary, killed on Drop.
struct Binary(Child);

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `deltasync-consumer run --ephemeral` on `settings`' pipeline with its HTTP endpoint
/// on a free port; returns it and the address.
fn spawn_binary(settings: &Settings, id: &str, env: &[(&str, &str)]) -> (Binary, SocketAddr) {
    let port = deltasync_testkit::free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_deltasync-consumer"))
        .args(["--nats-url", &settings.nats.url])
        .args(["--pipeline", &settings.pipeline])
        .arg("run")
        .args(["--id", id, "--ephemeral"])
        .args(["--http", &format!("127.0.0.1:{port}")])
        .env_remove("DELTASYNC_CONFIG")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the consumer binary starts");
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    (Binary(child), addr)
}

/// Waits until the replica behind `addr` has committed `seq` of `lineage`.
async fn wait_http(addr: SocketAddr, lineage: &str, seq: u64) {
    let start = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            let (code, _, body) = http_get(addr, "/v1/status").await;
            if code == 200 {
                let s: serde_json::Value = serde_json::from_slice(&body).unwrap();
                if s["lineage"] == lineage && s["seq"] == seq {
                    return;
                }
            }
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the replica at {addr} never reached {lineage}:{seq}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `http_get` on a task of its own (a long-poll that answers later).
fn spawn_get(
    addr: SocketAddr,
    path: &str,
) -> tokio::task::JoinHandle<(u16, HashMap<String, String>, Vec<u8>)> {
    let path = path.to_owned();
    tokio::spawn(async move { http_get(addr, &path).await })
}

fn lines(body: &[u8]) -> Vec<serde_json::Value> {
    std::str::from_utf8(body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn seq_header(h: &HashMap<String, String>) -> u64 {
    h["deltasync-seq"].parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_binary_long_polls_watches_listings_and_min_seq_reads_see_each_commit_of_the_real_producer(
) {
    logs();
    let server = NatsServer::start();
    let settings = producer_settings(&server.url(), "feedbin");
    let producer = Producer::start(settings.clone()).await.unwrap();
    producer
        .commit((0..50).map(|i| Change::put(key(i), value(1, i))).collect())
        .await
        .unwrap();
    producer.snapshot().await.unwrap();
    let at = producer.flush().await.unwrap();
    let lineage = at.lineage.to_hex();
    let (_bin, addr) = spawn_binary(&settings, "feedbin-1", &[]);
    wait_http(addr, &lineage, at.seq).await;

    // The state names its position; a long-poll after it waits for the next commit.
    let (code, h, _) = http_get(addr, "/v1/state").await;
    assert_eq!(code, 200);
    let s0 = seq_header(&h);
    assert_eq!(s0, at.seq);
    let poll = spawn_get(
        addr,
        &format!("/v1/changes?after={s0}&lineage={lineage}&wait=60s"),
    );
    let r1 = producer
        .commit(vec![
            Change::put("p/a", &br#"{"n":1}"#[..]),
            Change::put("p/b", vec![0xff, 0x00]),
            Change::delete(key(0)),
        ])
        .await
        .unwrap();
    let (code, h, body) = poll.await.unwrap();
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(h["content-type"], "application/x-ndjson");
    let got = lines(&body);
    assert_eq!(got.len(), 1, "one batch: {got:?}");
    assert_eq!(got[0]["seq"], r1.last_seq);
    assert_eq!(got[0]["prev_seq"], s0);
    assert_eq!(got[0]["lineage"], lineage);
    assert_eq!(
        got[0]["changes"],
        serde_json::json!([
            {"op": "put", "key": "p/a", "value": {"n": 1}},
            {"op": "put", "key": "p/b", "value_b64": "/wA="},
            {"op": "del", "key": key(0)},
        ])
    );
    assert_eq!(seq_header(&h), r1.last_seq);
    assert_eq!(h["deltasync-lineage"], lineage);

    // A watch from the same position sees that batch and the next ones, in order.
    let mut watch = SseClient::connect(addr, &format!("/v1/watch?after={s0}"), &[]).await;
    assert_eq!(watch.status, 200);
    assert!(watch.headers["content-type"].starts_with("text/event-stream"));
    let mut receipts = vec![r1];
    for i in 0..5 {
        receipts.push(
            producer
                .commit(vec![Change::put(format!("p/c{i}"), value(2, i))])
                .await
                .unwrap(),
        );
    }
    let mut prev = s0;
    for r in &receipts {
        let e = watch.next().await.expect("a batch event");
        assert_eq!(e.event, "batch");
        assert_eq!(e.id, Some(r.last_seq.to_string()));
        let line: serde_json::Value = serde_json::from_str(&e.data).unwrap();
        assert_eq!(
            (line["prev_seq"].as_u64(), line["seq"].as_u64()),
            (Some(prev), Some(r.last_seq))
        );
        prev = r.last_seq;
    }
    // Resumed with Last-Event-ID, it continues after that event.
    let mid = receipts[2].last_seq;
    let mut resumed =
        SseClient::connect(addr, "/v1/watch", &[("Last-Event-ID", &mid.to_string())]).await;
    let e = resumed.next().await.unwrap();
    assert_eq!(e.id, Some(receipts[3].last_seq.to_string()));

    // Read-your-writes: a commit's receipt, then reads at its sequence.
    let r = producer
        .commit(vec![
            Change::put("p/d", &b"\"fresh\""[..]),
            Change::put("raw", &b"not json \x01"[..]),
        ])
        .await
        .unwrap();
    let (code, h, body) = http_get(
        addr,
        &format!("/v1/keys/p/d?min_seq={}&wait=30s", r.last_seq),
    )
    .await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert!(seq_header(&h) >= r.last_seq);
    assert_eq!(lines(&body)[0]["value"], "fresh");
    let (code, h, body) = http_get(
        addr,
        &format!(
            "/v1/keys?prefix=p/&limit=2&min_seq={}&lineage={lineage}",
            r.last_seq
        ),
    )
    .await;
    assert_eq!(code, 200);
    let page: Vec<String> = lines(&body)
        .iter()
        .map(|l| l["key"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(page, ["p/a", "p/b"]);
    assert_eq!(lines(&body)[1]["value_b64"], "/wA=");
    assert!(h.contains_key("deltasync-digest"));
    let next = h["deltasync-next-after"].clone();
    assert_eq!(next, "p%2Fb");
    let mut all = page;
    let mut after = next;
    loop {
        let (code, h, body) =
            http_get(addr, &format!("/v1/keys?prefix=p/&limit=2&after={after}")).await;
        assert_eq!(code, 200);
        all.extend(
            lines(&body)
                .iter()
                .map(|l| l["key"].as_str().unwrap().to_owned()),
        );
        match h.get("deltasync-next-after") {
            Some(n) => after = n.clone(),
            None => break,
        }
    }
    let mut want = vec!["p/a", "p/b", "p/d"];
    want.extend(["p/c0", "p/c1", "p/c2", "p/c3", "p/c4"]);
    want.sort();
    assert_eq!(all, want);

    let (code, h, body) = http_get(addr, &format!("/v1/state?min_seq={}", r.last_seq)).await;
    assert_eq!(code, 200);
    assert_eq!(seq_header(&h), r.last_seq);
    assert_eq!(lines(&body).len(), 50 - 1 + 2 + 5 + 2);
    let (code, _, body) = http_get(addr, &format!("/v1/checksum?min_seq={}", r.last_seq)).await;
    assert_eq!(code, 200);
    let sum: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(sum["seq"], r.last_seq);
    assert_eq!(sum["digest"], r.digest.to_hex());
    assert_eq!(sum["lineage"], lineage);
    assert_eq!(sum["entries"], 58);
    assert_eq!(sum["stream_seq"], r.stream_seq);

    // Raw bytes on request.
    let (status, h, body) = raw_get(addr, "/v1/keys/raw").await;
    assert_eq!(status, 200);
    assert_eq!(h["content-type"], "application/octet-stream");
    assert_eq!(body, b"not json \x01");
    assert!(h.contains_key("deltasync-seq"));

    // A sequence not reached in time: 504 naming where the replica is.
    let (code, _, body) = http_get(
        addr,
        &format!("/v1/keys/p/d?min_seq={}&wait=200ms", r.last_seq + 1000),
    )
    .await;
    assert_eq!(code, 504);
    let e: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(e["seq"], r.last_seq);
    assert!(e["error"]
        .as_str()
        .unwrap()
        .contains(&(r.last_seq + 1000).to_string()));

    // Nothing new within `wait`: an empty 200 naming the head.
    let (code, h, body) = http_get(
        addr,
        &format!("/v1/changes?after={}&wait=200ms", r.last_seq),
    )
    .await;
    assert_eq!((code, body.len()), (200, 0));
    assert_eq!(seq_header(&h), r.last_seq);

    // Bad input: 400 naming it.
    for (path, named) in [
        ("/v1/changes", "after"),
        ("/v1/changes?after=x", "after"),
        ("/v1/changes?after=1&wait=soon", "wait"),
        ("/v1/changes?after=1&limit=0", "limit"),
        ("/v1/changes?after=1&lineage=zz", "lineage"),
        ("/v1/changes?after=1&bogus=1", "bogus"),
        ("/v1/keys?limit=-3", "limit"),
        ("/v1/keys/p/d?min_seq=one", "min_seq"),
        ("/v1/watch?after=-1", "after"),
    ] {
        let (code, _, body) = http_get(addr, path).await;
        assert_eq!(code, 400, "{path}");
        let e: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(e["error"].as_str().unwrap().contains(named), "{path}: {e}");
    }
    producer.shutdown().await.unwrap();
}

/// A GET with `Accept: application/octet-stream`.
async fn raw_get(addr: SocketAddr, path: &str) -> (u16, HashMap<String, String>, Vec<u8>) {
    let mut c = SseClient::connect(addr, path, &[("Accept", "application/octet-stream")]).await;
    let status = c.status;
    let headers = c.headers.clone();
    let body = c.rest().await;
    (status, headers, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_binary_a_lineage_change_answers_waiting_long_polls_409_and_ends_watches_with_must_refetch(
) {
    logs();
    let server = NatsServer::start();
    let settings = producer_settings(&server.url(), "feedlineage");
    let producer = Producer::start(settings.clone()).await.unwrap();
    producer
        .commit((0..200).map(|i| Change::put(key(i), value(1, i))).collect())
        .await
        .unwrap();
    producer.snapshot().await.unwrap();
    let old = producer.flush().await.unwrap();
    let (_bin, addr) = spawn_binary(&settings, "feedlineage-1", &[]);
    wait_http(addr, &old.lineage.to_hex(), old.seq).await;

    let mut watch = SseClient::connect(addr, "/v1/watch", &[]).await;
    assert_eq!(watch.status, 200);
    let poll = spawn_get(
        addr,
        &format!(
            "/v1/changes?after={}&lineage={}&wait=120s",
            old.seq,
            old.lineage.to_hex()
        ),
    );
    producer.shutdown().await.unwrap();

    // The operator starts a new lineage from the same state and commits on it: the replica
    // re-snapshots (adopts it), which no change line can describe.
    let producer = Producer::start_new_lineage(settings.clone(), NewLineage::KeepState)
        .await
        .unwrap();
    producer
        .commit(vec![Change::put(key(1), value(9, 1))])
        .await
        .unwrap();
    let new = producer.flush().await.unwrap();
    assert_ne!(new.lineage, old.lineage);
    wait_http(addr, &new.lineage.to_hex(), new.seq).await;

    let (code, h, body) = poll.await.unwrap();
    assert_eq!(code, 409, "{}", String::from_utf8_lossy(&body));
    let e: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(e["must_refetch"], true);
    assert_eq!(h["deltasync-lineage"], e["lineage"].as_str().unwrap());
    let e = watch.next().await.expect("the must-refetch event");
    assert_eq!(e.event, "must-refetch", "{e:?}");
    let data: serde_json::Value = serde_json::from_str(&e.data).unwrap();
    assert_eq!(data["must_refetch"], true);
    assert!(watch.next().await.is_none(), "the stream ends");

    // The client re-reads the state and continues after it, in the new lineage.
    let (code, h, _) = http_get(addr, "/v1/state").await;
    assert_eq!(code, 200);
    assert_eq!(h["deltasync-lineage"], new.lineage.to_hex());
    let s = seq_header(&h);
    let poll = spawn_get(
        addr,
        &format!(
            "/v1/changes?after={s}&lineage={}&wait=60s",
            new.lineage.to_hex()
        ),
    );
    let r = producer
        .commit(vec![Change::put(key(2), value(9, 2))])
        .await
        .unwrap();
    let (code, _, body) = poll.await.unwrap();
    assert_eq!(code, 200);
    let got = lines(&body);
    assert_eq!(got[0]["prev_seq"], s);
    assert_eq!(got[0]["seq"], r.last_seq);
    // The old lineage is refused outright, by a watch from the head too.
    let mut stale = SseClient::connect(
        addr,
        &format!("/v1/watch?lineage={}", old.lineage.to_hex()),
        &[],
    )
    .await;
    assert_eq!(stale.next().await.unwrap().event, "must-refetch");
    let (code, _, _) = http_get(
        addr,
        &format!(
            "/v1/changes?after={s}&lineage={}&wait=1s",
            old.lineage.to_hex()
        ),
    )
    .await;
    assert_eq!(code, 409);
    producer.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_binary_a_client_behind_a_small_feeds_floor_must_refetch_and_continues_after_the_state(
) {
    logs();
    let server = NatsServer::start();
    let settings = producer_settings(&server.url(), "feedsmall");
    let producer = Producer::start(settings.clone()).await.unwrap();
    producer
        .commit((0..20).map(|i| Change::put(key(i), value(1, i))).collect())
        .await
        .unwrap();
    producer.snapshot().await.unwrap();
    let at = producer.flush().await.unwrap();
    let lineage = at.lineage.to_hex();
    let (_bin, addr) = spawn_binary(
        &settings,
        "feedsmall-1",
        &[("DELTASYNC_CONSUMER__FEED_MAX_BYTES", "2000")],
    );
    wait_http(addr, &lineage, at.seq).await;
    let (_, h, _) = http_get(addr, "/v1/state").await;
    let s0 = seq_header(&h);

    // 50 transactions of about 300 counted bytes each: the feed keeps only the last few.
    let mut last = None;
    for i in 0..50 {
        last = Some(
            producer
                .commit(vec![Change::put(key(i), value(2, i))])
                .await
                .unwrap(),
        );
    }
    let last = last.unwrap();
    wait_http(addr, &lineage, last.last_seq).await;
    let (code, h, body) =
        http_get(addr, &format!("/v1/changes?after={s0}&lineage={lineage}")).await;
    assert_eq!(code, 409, "{}", String::from_utf8_lossy(&body));
    let e: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (e["must_refetch"].as_bool(), e["seq"].as_u64()),
        (Some(true), Some(last.last_seq))
    );
    assert_eq!(e["lineage"], lineage);
    assert_eq!(seq_header(&h), last.last_seq);
    let mut watch = SseClient::connect(addr, &format!("/v1/watch?after={s0}"), &[]).await;
    let e = watch.next().await.unwrap();
    assert_eq!(e.event, "must-refetch");
    assert!(watch.next().await.is_none());
    let (_, _, body) = http_get(addr, "/v1/status").await;
    let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let feed = &status["feed"];
    assert_eq!(feed["max_bytes"], 2000);
    assert!(feed["floor"].as_u64().unwrap() > s0, "{feed}");
    assert!(feed["bytes"].as_u64().unwrap() <= 2000, "{feed}");
    let (_, _, body) = http_get(addr, "/metrics").await;
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.contains("deltasync_consumer_followers_lost_total 2"),
        "{text}"
    );

    // A recent position is still served from the feed.
    let recent = last.last_seq - 2;
    let (code, _, body) = http_get(addr, &format!("/v1/changes?after={recent}&wait=1s")).await;
    assert_eq!(code, 200);
    let got = lines(&body);
    assert_eq!(got.len(), 2);
    assert_eq!(got[1]["seq"], last.last_seq);
    assert_eq!(got[0]["prev_seq"], recent);

    // Re-read, then continue after the state's position.
    let (_, h, body) = http_get(addr, "/v1/state").await;
    let s1 = seq_header(&h);
    assert_eq!(s1, last.last_seq);
    assert_eq!(lines(&body).len(), 50);
    let r = producer.commit(vec![Change::delete(key(3))]).await.unwrap();
    let (code, _, body) = http_get(
        addr,
        &format!("/v1/changes?after={s1}&lineage={lineage}&wait=60s"),
    )
    .await;
    assert_eq!(code, 200);
    let got = lines(&body);
    assert_eq!(got[0]["seq"], r.last_seq);
    assert_eq!(got[0]["changes"][0]["op"], "del");
    producer.shutdown().await.unwrap();
}

/// One watcher's events checked: contiguous from `after`, exactly `want`'s sequences.
fn check_run(who: usize, after: u64, got: &[(u64, u64)], want: &[u64]) {
    let seqs: Vec<u64> = got.iter().map(|(_, s)| *s).collect();
    assert_eq!(seqs, want, "watcher {who} got every batch once, in order");
    let mut prev = after;
    for (p, s) in got {
        assert_eq!(*p, prev, "watcher {who}: no gap before {s}");
        prev = *s;
    }
}

/// CPU time of this process (user + system), in clock ticks (1/100 s).
fn cpu_ticks() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            // Fields 14 and 15 of stat; `after` starts at field 3.
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_watchers_each_receive_every_batch_once_in_order_while_commits_race_their_connects(
) {
    logs();
    const WATCHERS: usize = 1000;
    const TXNS: usize = 150;
    let server = NatsServer::start();
    let settings = producer_settings(&server.url(), "feedmany");
    let producer = Producer::start(settings.clone()).await.unwrap();
    producer
        .commit((0..100).map(|i| Change::put(key(i), value(1, i))).collect())
        .await
        .unwrap();
    producer.snapshot().await.unwrap();
    let at = producer.flush().await.unwrap();
    let mut options = ephemeral("feedmany-1");
    options.http = Some("127.0.0.1:0".parse().unwrap());
    let c = Running::start(settings.clone(), options);
    c.wait_until(|s| s.seq == at.seq && s.lineage == at.lineage.to_hex())
        .await;
    let addr = c.replica.http_addr().unwrap();
    let rss_before = rss_kib();
    let cpu_before = cpu_ticks();

    // Commits start while the watchers connect: each watcher starts from the same position,
    // whichever commits happened before its request arrived.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = done.clone();
    let committer = tokio::spawn(async move {
        let mut seqs = Vec::new();
        for i in 0..TXNS {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let r = producer
                .commit(vec![
                    Change::put(key(i % 100), value(3, i)),
                    Change::put(format!("extra-{i}"), vec![i as u8]),
                ])
                .await
                .unwrap();
            seqs.push(r.last_seq);
        }
        producer.shutdown().await.unwrap();
        seqs
    });
    let path = format!("/v1/watch?after={}&lineage={}", at.seq, at.lineage.to_hex());
    let mut watchers = Vec::new();
    let mut raced = (0, 0);
    for i in 0..WATCHERS {
        let client = SseClient::connect(addr, &path, &[]).await;
        assert_eq!(client.status, 200);
        watchers.push(client);
        let n = done.load(std::sync::atomic::Ordering::Relaxed);
        if i == 0 {
            raced.0 = n;
        }
        raced.1 = n;
    }
    let rss_connected = rss_kib();
    let text = c.replica.metrics_text();
    assert!(
        text.contains(&format!("deltasync_consumer_followers {WATCHERS}\n")),
        "every watcher counted: {}",
        text.lines()
            .filter(|l| l.contains("followers"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let want = committer.await.unwrap();
    let last = *want.last().unwrap();
    let started = Instant::now();
    let tasks: Vec<_> = watchers
        .into_iter()
        .map(|mut w| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                while got.last().map(|(_, s)| *s) != Some(last) {
                    let e = tokio::time::timeout(DEADLINE, w.next())
                        .await
                        .expect("an event within the deadline")
                        .expect("the stream stays open");
                    assert_eq!(e.event, "batch", "{e:?}");
                    let line: serde_json::Value = serde_json::from_str(&e.data).unwrap();
                    let seq = line["seq"].as_u64().unwrap();
                    assert_eq!(e.id, Some(seq.to_string()));
                    got.push((line["prev_seq"].as_u64().unwrap(), seq));
                }
                got
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t.await.unwrap();
        check_run(i, at.seq, &got, &want);
    }
    eprintln!(
        "{WATCHERS} watchers x {TXNS} batches: RSS {rss_before} KiB before, {rss_connected} KiB \
         connected, {} KiB after; drained in {:?}; CPU (test process: producer, consumer and \
         clients) {} ms; commits begun at the first connect {}, at the last {}",
        rss_kib(),
        started.elapsed(),
        (cpu_ticks() - cpu_before) * 10,
        raced.0,
        raced.1
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_watcher_is_reset_with_a_fresh_view_while_the_others_receive_every_batch() {
    logs();
    let server = NatsServer::start();
    let settings = settings(&server.url(), &unique_pipeline("feedstall"), |s| {
        s.producer.linger = Duration::from_millis(2);
        s.consumer.feed_max_bytes = 4096;
    });
    let producer = Producer::start(settings.clone()).await.unwrap();
    producer
        .commit((0..10).map(|i| Change::put(key(i), value(1, i))).collect())
        .await
        .unwrap();
    producer.snapshot().await.unwrap();
    let at = producer.flush().await.unwrap();
    let c = Running::start(settings.clone(), ephemeral("feedstall-1"));
    c.wait_until(|s| s.seq == at.seq).await;

    let mut stalled = Box::pin(c.replica.watch());
    let Some(WatchEvent::Init(view)) = stalled.next().await else {
        panic!("a watch starts with Init");
    };
    assert_eq!(view.seq(), at.seq);
    // A live watcher keeps up, in Rust and over HTTP.
    let mut live = Box::pin(c.replica.watch());
    let Some(WatchEvent::Init(live_view)) = live.next().await else {
        panic!("a watch starts with Init");
    };
    let mut receipts = Vec::new();
    let live_task = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut state = live_view.state().clone();
        while let Some(e) = live.next().await {
            match e {
                WatchEvent::Batch(b) => {
                    state.apply_changes(&b.changes);
                    state.set_position(b.lineage, b.seq);
                    got.push((b.prev_seq, b.seq));
                    if got.len() == 60 {
                        return (got, state);
                    }
                }
                other => panic!("the live watcher was reset: {other:?}"),
            }
        }
        panic!("the live watch ended");
    });
    for i in 0..60 {
        receipts.push(
            producer
                .commit(vec![Change::put(key(i % 10), value(4, i))])
                .await
                .unwrap(),
        );
    }
    let last = receipts.last().unwrap();
    let (got, state) = live_task.await.unwrap();
    let want: Vec<u64> = receipts.iter().map(|r| r.last_seq).collect();
    check_run(0, at.seq, &got, &want);
    assert_eq!(
        state.digest(),
        last.digest,
        "batches applied to Init give the producer's state"
    );

    // The stalled one has fallen off the ring: it gets a fresh view, then continues.
    c.wait_until(|s| s.seq == last.last_seq).await;
    match stalled.next().await {
        Some(WatchEvent::Reset(v)) => {
            assert_eq!(v.seq(), last.last_seq);
            assert_eq!(v.digest(), last.digest);
        }
        other => panic!("expected a Reset, got {other:?}"),
    }
    let r = producer.commit(vec![Change::delete(key(1))]).await.unwrap();
    match stalled.next().await {
        Some(WatchEvent::Batch(b)) => assert_eq!((b.prev_seq, b.seq), (last.last_seq, r.last_seq)),
        other => panic!("expected the next batch, got {other:?}"),
    }
    // wait_for: a view at a sequence reached, or an error naming where the replica is.
    let v = c
        .replica
        .wait_for(r.last_seq, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(v.seq() >= r.last_seq);
    let e = c
        .replica
        .wait_for(r.last_seq + 100, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert_eq!((e.wanted, e.seq), (r.last_seq + 100, r.last_seq));
    producer.shutdown().await.unwrap();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_http_watcher_gets_must_refetch_when_it_reads_again_while_a_live_one_gets_every_batch(
) {
    logs();
    // 150 batches of 256 KiB: far more than a client that does not read can have buffered
    // in its socket, against a feed of 16 MiB.
    const TXNS: usize = 150;
    let server = NatsServer::start();
    let settings = settings(&server.url(), &unique_pipeline("feedstallhttp"), |s| {
        s.producer.linger = Duration::from_millis(2);
        s.consumer.feed_max_bytes = 16 * 1024 * 1024;
    });
    let producer = Producer::start(settings.clone()).await.unwrap();
    producer
        .commit(vec![Change::put("seed", &b"1"[..])])
        .await
        .unwrap();
    producer.snapshot().await.unwrap();
    let at = producer.flush().await.unwrap();
    let mut options = ephemeral("feedstallhttp-1");
    options.http = Some("127.0.0.1:0".parse().unwrap());
    let c = Running::start(settings.clone(), options);
    c.wait_until(|s| s.seq == at.seq).await;
    let addr = c.replica.http_addr().unwrap();
    let path = format!("/v1/watch?after={}", at.seq);
    let mut stalled = SseClient::connect(addr, &path, &[]).await;
    // Never read: its response stays stuck in a full socket, and must not hold the stop open.
    let _stuck = SseClient::connect(addr, &path, &[]).await;
    let mut live = SseClient::connect(addr, &path, &[]).await;
    let (seen_tx, mut seen) = tokio::sync::watch::channel(0u64);
    let live_task = tokio::spawn(async move {
        let mut got: Vec<(u64, u64)> = Vec::new();
        while got.len() < TXNS {
            let e = tokio::time::timeout(DEADLINE, live.next())
                .await
                .expect("an event within the deadline")
                .expect("the live stream stays open");
            assert_eq!(e.event, "batch", "the live watcher is never dropped: {e:?}");
            got.push(seqs_of(&e.data));
            let _ = seen_tx.send(got.last().map_or(0, |(_, s)| *s));
        }
        got
    });
    let big = format!("\"{}\"", "x".repeat(256 * 1024 - 2)).into_bytes();
    let mut want = Vec::new();
    for i in 0..TXNS {
        let r = producer
            .commit(vec![Change::put(key(i % 10), big.clone())])
            .await
            .unwrap();
        want.push(r.last_seq);
        if i % 8 == 7 {
            // The live watcher keeps up (on a busy machine too): it stays within the feed.
            tokio::time::timeout(DEADLINE, seen.wait_for(|s| *s >= r.last_seq))
                .await
                .expect("the live watcher keeps up")
                .unwrap();
        }
    }
    check_run(0, at.seq, &live_task.await.unwrap(), &want);

    let mut prev = at.seq;
    let mut sent = 0;
    loop {
        let e = tokio::time::timeout(DEADLINE, stalled.next())
            .await
            .expect("an event within the deadline")
            .expect("events until must-refetch");
        if e.event == "must-refetch" {
            let data: serde_json::Value = serde_json::from_str(&e.data).unwrap();
            assert_eq!(data["seq"], *want.last().unwrap());
            break;
        }
        let (p, seq) = seqs_of(&e.data);
        assert_eq!(p, prev, "no gap before must-refetch");
        prev = seq;
        sent += 1;
    }
    assert!(
        sent < TXNS,
        "the stalled client was dropped, not served everything"
    );
    assert!(stalled.next().await.is_none(), "the stream ends");
    eprintln!("the stalled watcher had {sent} of {TXNS} batches buffered before must-refetch");
    producer.shutdown().await.unwrap();
    let stopping = Instant::now();
    c.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(30),
        "a client that never reads does not hold the stop open"
    );
}

/// `(prev_seq, seq)` of a batch line, read from its start (`{"seq":S,"prev_seq":P,...`)
/// without parsing a large line whole.
fn seqs_of(data: &str) -> (u64, u64) {
    let head: serde_json::Value = {
        let end = data.find(",\"lineage\"").expect("a batch line");
        serde_json::from_str(&format!("{}}}", &data[..end])).unwrap()
    };
    (
        head["prev_seq"].as_u64().unwrap(),
        head["seq"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_opened_before_the_bootstrap_start_at_the_first_commit_and_idle_ones_get_heartbeats(
) {
    logs();
    let server = NatsServer::start();
    let settings = settings(&server.url(), &unique_pipeline("feedearly"), |s| {
        s.producer.linger = Duration::from_millis(2);
        s.consumer.watch_keepalive = Duration::from_millis(100);
    });
    let producer = Producer::start(settings.clone()).await.unwrap();
    let mut options = ephemeral("feedearly-1");
    options.http = Some("127.0.0.1:0".parse().unwrap());
    let c = Running::start(settings.clone(), options);
    let start = Instant::now();
    let addr = loop {
        if let Some(a) = c.replica.http_addr() {
            break a;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the HTTP endpoint never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!c.replica.status().bootstrapped);
    let mut sse = SseClient::connect(addr, "/v1/watch", &[]).await;
    assert_eq!(sse.status, 200);
    let mut watch = Box::pin(c.replica.watch());

    let r1 = producer
        .commit(vec![Change::put("a", &b"1"[..])])
        .await
        .unwrap();
    let Some(WatchEvent::Init(view)) = watch.next().await else {
        panic!("a watch starts with Init");
    };
    assert!(view.seq() <= r1.last_seq);
    let r2 = producer
        .commit(vec![Change::put("b", &b"2"[..])])
        .await
        .unwrap();
    // Rust: Init, then batches that continue it up to the second commit.
    let mut state = view.state().clone();
    while state.seq() < r2.last_seq {
        match watch.next().await {
            Some(WatchEvent::Batch(b)) => {
                assert_eq!(b.prev_seq, state.seq(), "no gap");
                state.apply_changes(&b.changes);
                state.set_position(b.lineage, b.seq);
            }
            other => panic!("expected a batch, got {other:?}"),
        }
    }
    assert_eq!(state.digest(), r2.digest);
    // HTTP: from the head at the first commit, contiguous, ending with the second commit.
    let mut prev = None;
    loop {
        let e = tokio::time::timeout(DEADLINE, sse.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(e.event, "batch");
        let (p, seq) = seqs_of(&e.data);
        if let Some(prev) = prev {
            assert_eq!(p, prev, "no gap");
        }
        prev = Some(seq);
        if seq == r2.last_seq {
            break;
        }
    }
    // Idle, it gets heartbeat comments.
    let start = Instant::now();
    while sse.comments == 0 {
        assert!(start.elapsed() < DEADLINE, "no heartbeat");
        let waited = tokio::time::timeout(Duration::from_millis(200), sse.next()).await;
        assert!(waited.is_err(), "no event while idle: {waited:?}");
    }
    producer.shutdown().await.unwrap();
    c.stop().await;
}
