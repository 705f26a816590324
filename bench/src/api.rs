//! The HTTP paths of issue 14, timed as a program in any language uses them: writes through
//! `deltasync-producer serve` (`POST /v1/txn` from concurrent keep-alive connections, `POST
//! /v1/changes` with large NDJSON bodies) against the library calls a Rust program would make,
//! and the feed of `deltasync-consumer run --ephemeral --http` followed by a thousand SSE
//! watchers on `/v1/watch` against a single watcher, in one run on one server. Each result is
//! checked (digests against a model, receipts, every batch to every watcher once and in order).
//!
//! Talks to the benchmark's nats-server through the binaries (child processes, over loopback
//! HTTP with [`crate::http`]) and `deltasync_producer::Producer`.
//!
//! ```text
//!  api-txn        bench-api-txn-http  ← serve; C connections × POST /v1/txn {"txn":[1..=K puts]}
//!                 bench-api-txn-lib   ← Producer::commit, C tasks, the same transactions
//!                 bench-api-txn-bulk  ← Producer::submit_many of the same changes + flush
//!  api-changes    bench-api-chg-http  ← serve; POST /v1/changes, bodies of L put lines, in turn
//!                 bench-api-chg-lib   ← Producer::submit_many of the same changes + flush
//!  feed-watchers  bench-feed          ← Producer::submit_transaction at R txn/s
//!                                     → deltasync-consumer run --ephemeral --http
//!                                     → 1 watcher (baseline), then W watchers on /v1/watch
//! ```

use crate::http::{wait_for, Conn, SseClient};
use crate::paths::{command, put_lines};
use crate::report::{rate, Row};
use crate::scenarios::{settings, Rng};
use anyhow::{anyhow, bail, ensure, Context as _, Result};
use bytes::Bytes;
use deltasync_config::settings::Settings;
use deltasync_core::{Change, Lineage, State};
use deltasync_producer::Producer;
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a server may take to become ready, or a reader may stay silent, before the
/// scenario fails instead of hanging the run.
const DEADLINE: Duration = Duration::from_secs(30);

/// Sizes of the API scenarios (flags of the benchmark).
#[derive(Debug, Clone, Copy)]
pub struct ApiSizes {
    /// Transactions sent to `POST /v1/txn`, over all connections.
    pub txns: usize,
    /// Concurrent keep-alive connections sending them (one request in flight each).
    pub connections: usize,
    /// Puts per transaction: 1..=this, drawn per transaction.
    pub max_ops: usize,
    /// Put lines per `POST /v1/changes` body (the changes, `--changes`, are cut into bodies
    /// of this many lines, sent one after another).
    pub body_lines: usize,
    /// SSE watchers on `/v1/watch`.
    pub watchers: usize,
    /// Transactions per second committed while they watch.
    pub feed_rate: f64,
    /// Seconds of commits while the watchers watch (the single-watcher baseline gets at most
    /// 2 s).
    pub feed_secs: f64,
    /// Value size in bytes.
    pub value_bytes: usize,
}

/// A running child process (`serve`, the consumer), its log in a file (a pipe could fill
/// up); SIGTERM and wait on drop.
struct Server {
    child: Option<Child>,
    addr: SocketAddr,
    log: tempfile::NamedTempFile,
}

impl Server {
    fn start(mut cmd: std::process::Command, addr: SocketAddr) -> Result<Server> {
        let log = tempfile::NamedTempFile::new()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.reopen()?)
            .stderr(log.reopen()?)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        Ok(Server {
            child: Some(child),
            addr,
            log,
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Fails if the process has exited.
    fn alive(&mut self) -> Result<()> {
        if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
            bail!("exited with {status}: {}", self.log());
        }
        Ok(())
    }

    /// SIGTERM; fails unless it exits cleanly within the deadline.
    async fn stop(mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let log = self.log();
        tokio::task::spawn_blocking(move || -> Result<()> {
            rustix::process::kill_process(
                rustix::process::Pid::from_child(&child),
                rustix::process::Signal::TERM,
            )?;
            let start = Instant::now();
            loop {
                if let Some(status) = child.try_wait()? {
                    ensure!(status.success(), "exited with {status} on SIGTERM: {log}");
                    return Ok(());
                }
                if start.elapsed() > DEADLINE {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("did not exit within {DEADLINE:?} of SIGTERM: {log}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .await?
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// CPU time (user + system) process `pid` has used, in seconds (0 when unreadable).
fn cpu_secs(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            // Fields 14 and 15 of stat (utime, stime, in clock ticks); `after` starts at 3.
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .map_or(0.0, |ticks| ticks as f64 / 100.0)
}

/// CPU seconds of several processes, read together.
fn cpu_of(pids: &[u32]) -> Vec<f64> {
    pids.iter().map(|&p| cpu_secs(p)).collect()
}

/// The `p` quantile of sorted `v` (0 when empty).
fn quantile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn loopback() -> Result<SocketAddr> {
    Ok(format!("127.0.0.1:{}", deltasync_testkit::free_port()).parse()?)
}

/// `deltasync-producer serve` on `s`'s pipeline, ready.
async fn serve(s: &Settings) -> Result<Server> {
    let addr = loopback()?;
    let mut cmd = command("deltasync-producer", s)?;
    cmd.args(["serve", "--http", &addr.to_string()]);
    let mut server = Server::start(cmd, addr)?;
    wait_for(addr, "/readyz", DEADLINE, || server.alive(), |_| true)
        .await
        .context("deltasync-producer serve")?;
    Ok(server)
}

/// The fields of a receipt the scenarios check.
#[derive(Debug, Deserialize)]
struct Receipt {
    seq: u64,
    first_seq: u64,
    digest: String,
    changes: u64,
    #[serde(default)]
    parts: Option<u32>,
    #[serde(default)]
    lines: Option<u64>,
}

fn receipt(r: &crate::http::Resp, what: &str) -> Result<Receipt> {
    ensure!(
        r.status == 200,
        "{what} answered {}: {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    serde_json::from_slice(&r.body).with_context(|| {
        format!(
            "{what}: the receipt does not parse: {}",
            String::from_utf8_lossy(&r.body)
        )
    })
}

/// A value of `len` bytes as the API stores it: a JSON string (quotes included) of hex.
fn json_value(rng: &mut Rng, len: usize) -> String {
    let hex_len = len.saturating_sub(2).max(1);
    let mut v = String::with_capacity(hex_len + 16);
    while v.len() < hex_len {
        v.push_str(&format!("{:016x}", rng.next()));
    }
    v.truncate(hex_len);
    format!("\"{v}\"")
}

/// One transaction: its `POST /v1/txn` body and its changes.
struct Txn {
    body: Vec<u8>,
    changes: Vec<Change>,
}

/// Each connection's transactions, in its order. Connection `c` writes keys of its own
/// (`api-cCC-NNNNN`, 10,000 per connection, updated again and again), so the final state is
/// the same whatever the interleaving: the model applies them connection after connection.
fn transactions(a: ApiSizes) -> (Vec<Vec<Txn>>, State) {
    let mut model = State::new(Lineage::default());
    let conns = a.connections.max(1);
    let per = a.txns.div_ceil(conns);
    let mut out = Vec::with_capacity(conns);
    for c in 0..conns {
        let mut rng = Rng::new(1000 + c as u64);
        let n = per.min(a.txns.saturating_sub(c * per));
        let mut txns = Vec::with_capacity(n);
        for _ in 0..n {
            let ops = 1 + rng.below(a.max_ops.max(1));
            let mut changes = Vec::with_capacity(ops);
            let mut body = String::from("{\"txn\":[");
            for i in 0..ops {
                let key = format!("api-c{c:02}-{:05}", rng.below(10_000));
                let value = json_value(&mut rng, a.value_bytes);
                if i > 0 {
                    body.push(',');
                }
                body.push_str(&format!(
                    "{{\"op\":\"put\",\"key\":\"{key}\",\"value\":{value}}}"
                ));
                changes.push(Change::put(key, Bytes::from(value)));
            }
            body.push_str("]}");
            model.apply_changes(&changes);
            txns.push(Txn {
                body: body.into_bytes(),
                changes,
            });
        }
        out.push(txns);
    }
    (out, model)
}

/// Checks that `seqs` (one per single-envelope transaction) are the gapless run after the
/// pipeline's start: every transaction its own envelope, none lost or doubled.
fn check_gapless(mut seqs: Vec<u64>, what: &str) -> Result<()> {
    seqs.sort_unstable();
    let n = seqs.len() as u64;
    ensure!(
        seqs.first() == Some(&1)
            && seqs.last() == Some(&n)
            && seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "{what}: the {n} receipts' sequences are not 1..={n}"
    );
    Ok(())
}

/// `POST /v1/txn` from `connections` keep-alive connections against `Producer::commit` from
/// as many tasks, and `submit_many` of the same changes.
/// `nats_pid` is the server's process, whose CPU time is counted per transaction.
pub async fn txn(url: &str, nats_pid: u32, a: ApiSizes, rows: &mut Vec<Row>) -> Result<()> {
    let (per_conn, model) = transactions(a);
    let per_conn = Arc::new(per_conn);
    let txns: usize = per_conn.iter().map(Vec::len).sum();
    let changes: usize = per_conn.iter().flatten().map(|t| t.changes.len()).sum();

    // Over HTTP.
    let http_s = settings(url, "bench-api-txn-http")?;
    let server = serve(&http_s).await?;
    let mut conns = Vec::with_capacity(per_conn.len());
    for _ in 0..per_conn.len() {
        conns.push(Conn::connect(server.addr).await?);
    }
    let serve_pid = server.child.as_ref().map_or(0, Child::id);
    let pids = [serve_pid, std::process::id(), nats_pid];
    let cpu0 = cpu_of(&pids);
    let t = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(c, mut conn)| {
            let per_conn = per_conn.clone();
            tokio::spawn(async move {
                let mut seqs = Vec::with_capacity(per_conn[c].len());
                for (i, txn) in per_conn[c].iter().enumerate() {
                    let what = format!("POST /v1/txn (connection {c}, transaction {i})");
                    let t0 = Instant::now();
                    let r = conn
                        .request("POST", "/v1/txn", "application/json", &txn.body)
                        .await
                        .with_context(|| what.clone())?;
                    let r = receipt(&r, &what)?;
                    ensure!(
                        r.changes == txn.changes.len() as u64
                            && r.parts == Some(1)
                            && r.first_seq == r.seq,
                        "{what}: receipt {r:?} for {} changes",
                        txn.changes.len()
                    );
                    seqs.push((r.seq, r.digest, t0.elapsed().as_secs_f64()));
                }
                anyhow::Ok(seqs)
            })
        })
        .collect();
    let mut receipts = Vec::with_capacity(txns);
    for task in tasks {
        receipts.extend(task.await??);
    }
    let http_t = t.elapsed().as_secs_f64();
    let http_cpu: Vec<f64> = cpu_of(&pids)
        .iter()
        .zip(&cpu0)
        .map(|(b, a)| b - a)
        .collect();
    let mut http_lat: Vec<f64> = receipts.iter().map(|r| r.2).collect();
    http_lat.sort_by(f64::total_cmp);
    let last = receipts.iter().max_by_key(|r| r.0).map(|r| r.1.clone());
    ensure!(
        last.as_deref() == Some(model.digest().to_hex().as_str()),
        "over HTTP: the last receipt's digest {last:?} differs from the model's"
    );
    check_gapless(receipts.iter().map(|r| r.0).collect(), "over HTTP")?;
    let (_, head, digest) = crate::paths::head_digest(&http_s).await?;
    ensure!(
        head == txns as u64 && digest == model.digest(),
        "over HTTP: the stream's head ({head}, {digest}) is not the model's"
    );
    server.stop().await.context("deltasync-producer serve")?;

    // The library, as a Rust service calls it: `commit` per transaction from as many tasks.
    let lib_s = settings(url, "bench-api-txn-lib")?;
    let producer = Arc::new(Producer::start(lib_s).await?);
    let pids = [std::process::id(), nats_pid];
    let cpu0 = cpu_of(&pids);
    let t = Instant::now();
    let tasks: Vec<_> = (0..per_conn.len())
        .map(|c| {
            let (per_conn, producer) = (per_conn.clone(), producer.clone());
            tokio::spawn(async move {
                let mut seqs = Vec::with_capacity(per_conn[c].len());
                for txn in &per_conn[c] {
                    let t0 = Instant::now();
                    let r = producer.commit(txn.changes.clone()).await?;
                    ensure!(r.parts == 1, "a transaction took {} envelopes", r.parts);
                    seqs.push((r.last_seq, t0.elapsed().as_secs_f64()));
                }
                anyhow::Ok(seqs)
            })
        })
        .collect();
    let mut seqs = Vec::with_capacity(txns);
    for task in tasks {
        seqs.extend(task.await??);
    }
    let lib_t = t.elapsed().as_secs_f64();
    let lib_cpu: Vec<f64> = cpu_of(&pids)
        .iter()
        .zip(&cpu0)
        .map(|(b, a)| b - a)
        .collect();
    let mut lib_lat: Vec<f64> = seqs.iter().map(|s| s.1).collect();
    lib_lat.sort_by(f64::total_cmp);
    check_gapless(seqs.iter().map(|s| s.0).collect(), "Producer::commit")?;
    let producer =
        Arc::try_unwrap(producer).map_err(|_| anyhow!("the producer is still shared"))?;
    let position = producer.flush().await?;
    producer.shutdown().await?;
    ensure!(
        position.digest == model.digest(),
        "Producer::commit: the digest differs from the model's"
    );

    // The library's bulk path: the same changes with submit_many.
    let bulk_s = settings(url, "bench-api-txn-bulk")?;
    let all: Vec<Change> = per_conn
        .iter()
        .flatten()
        .flat_map(|t| t.changes.iter().cloned())
        .collect();
    let producer = Producer::start(bulk_s).await?;
    let t = Instant::now();
    for chunk in all.chunks(crate::pipeline::INGEST_CHUNK) {
        producer.submit_many(chunk.to_vec()).await?;
    }
    let position = producer.flush().await?;
    let bulk_t = t.elapsed().as_secs_f64();
    producer.shutdown().await?;
    ensure!(
        position.digest == model.digest(),
        "submit_many: the digest differs from the model's"
    );

    let (n, m) = (txns as f64, changes as f64);
    let conns = per_conn.len();
    let us = |s: f64| format!("{:.0} µs", s * 1e6);
    let ms = |s: f64| format!("{:.2} ms", s * 1e3);
    rows.push(Row {
        scenario: format!(
            "user path: {txns} transactions of 1–{} puts through `POST /v1/txn` of \
             `deltasync-producer serve`, {conns} keep-alive HTTP/1.1 connections on loopback",
            a.max_ops
        ),
        ours: format!(
            "{}, {}; request p50 {}, p99 {}; CPU per txn: serve {}, client {}, nats-server {}",
            rate(n / http_t, "txn"),
            rate(m / http_t, "changes"),
            ms(quantile(&http_lat, 0.5)),
            ms(quantile(&http_lat, 0.99)),
            us(http_cpu[0] / n),
            us(http_cpu[1] / n),
            us(http_cpu[2] / n)
        ),
        baseline: format!(
            "{}, {} (Producer::commit, {conns} tasks; p50 {}, p99 {}; CPU per txn: process {}, \
             nats-server {}); submit_many of the same changes: {}",
            rate(n / lib_t, "txn"),
            rate(m / lib_t, "changes"),
            ms(quantile(&lib_lat, 0.5)),
            ms(quantile(&lib_lat, 0.99)),
            us(lib_cpu[0] / n),
            us(lib_cpu[1] / n),
            rate(m / bulk_t, "changes")
        ),
        ratio: format!("{:.2}× commit's txn/s", lib_t / http_t),
        target: "(measured)".into(),
        met: true,
        check: format!(
            "every request a 200 receipt; receipts' seqs 1..={txns}; head digest = model's (both)"
        ),
        figures: json!({"txns": txns, "changes": changes, "connections": conns,
            "http_s": http_t, "commit_s": lib_t, "submit_many_s": bulk_t,
            "http_txn_per_s": n / http_t, "commit_txn_per_s": n / lib_t,
            "submit_many_changes_per_s": m / bulk_t,
            "http_p50_s": quantile(&http_lat, 0.5), "http_p99_s": quantile(&http_lat, 0.99),
            "commit_p50_s": quantile(&lib_lat, 0.5), "commit_p99_s": quantile(&lib_lat, 0.99),
            "http_cpu_s": {"serve": http_cpu[0], "client": http_cpu[1], "nats_server": http_cpu[2]},
            "commit_cpu_s": {"process": lib_cpu[0], "nats_server": lib_cpu[1]}}),
    });
    Ok(())
}

/// `POST /v1/changes` of `changes` put lines in bodies of `body_lines` lines, sent one after
/// another on one connection, against `submit_many` of the same changes on a running producer.
pub async fn changes(url: &str, changes: usize, a: ApiSizes, rows: &mut Vec<Row>) -> Result<()> {
    let per_body = a.body_lines.max(1);
    let mut bodies = Vec::new();
    let mut all = Vec::with_capacity(changes);
    let mut from = 0;
    while from < changes {
        let n = per_body.min(changes - from);
        let (text, cs) = put_lines(n, a.value_bytes, from);
        bodies.push((text, n));
        all.extend(cs);
        from += n;
    }
    let mut model = State::new(Lineage::default());
    model.apply_changes(&all);
    let body_bytes: usize = bodies.iter().map(|(b, _)| b.len()).sum();

    let http_s = settings(url, "bench-api-chg-http")?;
    let server = serve(&http_s).await?;
    let mut conn = Conn::connect(server.addr).await?;
    let t = Instant::now();
    let mut next_seq = 1;
    let mut last = None;
    for (i, (text, n)) in bodies.iter().enumerate() {
        let what = format!("POST /v1/changes (body {i}, {n} lines)");
        let r = conn
            .request("POST", "/v1/changes", "application/x-ndjson", text)
            .await
            .with_context(|| what.clone())?;
        let r = receipt(&r, &what)?;
        ensure!(
            r.changes == *n as u64 && r.lines == Some(*n as u64) && r.first_seq == next_seq,
            "{what}: receipt {r:?}, expected {n} changes from envelope {next_seq}"
        );
        next_seq = r.seq + 1;
        last = Some(r);
    }
    let http_t = t.elapsed().as_secs_f64();
    let last = last.context("no body sent")?;
    ensure!(
        last.digest == model.digest().to_hex(),
        "over HTTP: the last receipt's digest differs from the model's"
    );
    let (_, head, digest) = crate::paths::head_digest(&http_s).await?;
    ensure!(
        head == last.seq && digest == model.digest(),
        "over HTTP: the stream's head ({head}) is not the last receipt's ({})",
        last.seq
    );
    server.stop().await.context("deltasync-producer serve")?;

    let lib_s = settings(url, "bench-api-chg-lib")?;
    let producer = Producer::start(lib_s).await?;
    let t = Instant::now();
    for chunk in all.chunks(crate::pipeline::INGEST_CHUNK) {
        producer.submit_many(chunk.to_vec()).await?;
    }
    let position = producer.flush().await?;
    let lib_t = t.elapsed().as_secs_f64();
    producer.shutdown().await?;
    ensure!(
        position.digest == model.digest(),
        "submit_many: the digest differs from the model's"
    );

    let m = changes as f64;
    rows.push(Row {
        scenario: format!(
            "user path: {changes} puts through `POST /v1/changes` of `deltasync-producer \
             serve`, {} NDJSON bodies of ≤ {per_body} lines ({}) in turn on one connection",
            bodies.len(),
            crate::report::bytes(body_bytes as f64 / bodies.len().max(1) as f64)
        ),
        ours: rate(m / http_t, "changes"),
        baseline: format!(
            "{} (Producer::submit_many + flush, running producer)",
            rate(m / lib_t, "changes")
        ),
        ratio: format!("{:.2}× submit_many", lib_t / http_t),
        target: "(measured)".into(),
        met: true,
        check: format!(
            "every body a 200 receipt of its {per_body} lines, envelopes contiguous; head \
             digest = model's (both)"
        ),
        figures: json!({"changes": changes, "bodies": bodies.len(), "body_bytes": body_bytes,
            "http_s": http_t, "submit_many_s": lib_t,
            "http_changes_per_s": m / http_t, "submit_many_changes_per_s": m / lib_t}),
    });
    Ok(())
}

/// The start of a batch line, what a watcher checks and counts.
#[derive(Deserialize)]
struct BatchLine<'a> {
    seq: u64,
    prev_seq: u64,
    #[serde(borrow)]
    lineage: &'a str,
    changes: Vec<serde::de::IgnoredAny>,
}

/// What one phase of the feed scenario measured.
struct Followed {
    watchers: usize,
    txns: usize,
    /// Transactions per second actually committed.
    committed_rate: f64,
    /// Changes delivered, summed over watchers, per second from the first commit to the
    /// last delivery.
    delivered_rate: f64,
    p50: f64,
    p99: f64,
    max: f64,
    /// Deliveries later than 20 ms after their commit.
    over_20ms: usize,
}

/// `watchers` SSE watchers on `consumer`'s `/v1/watch` after `at`, then transactions of 1..=K
/// puts at `feed_rate` for `secs`; every watcher must receive every batch once, in order.
#[allow(clippy::too_many_arguments)]
async fn follow(
    consumer: &mut Server,
    producer: &Producer,
    at: (u64, Lineage),
    model: &mut State,
    rng: &mut Rng,
    a: ApiSizes,
    watchers: usize,
    secs: f64,
) -> Result<Followed> {
    let (after, lineage) = at;
    let hex = lineage.to_hex();
    let path = format!("/v1/watch?after={after}&lineage={hex}");
    let mut clients = Vec::with_capacity(watchers);
    for i in 0..watchers {
        consumer.alive()?;
        clients.push(
            SseClient::connect(consumer.addr, &path)
                .await
                .with_context(|| format!("watcher {i}"))?,
        );
    }
    let (last_tx, last_rx) = tokio::sync::watch::channel(None::<u64>);
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut w)| {
            let mut last_rx = last_rx.clone();
            let hex = hex.clone();
            tokio::spawn(async move {
                // (prev_seq, seq, changes, parsed at)
                let mut got: Vec<(u64, u64, usize, Instant)> = Vec::new();
                loop {
                    let end = *last_rx.borrow_and_update();
                    if end.is_some() && got.last().map(|g| g.1) == end {
                        return anyhow::Ok(got);
                    }
                    let e = tokio::select! {
                        e = tokio::time::timeout(DEADLINE, w.next()) => e,
                        _ = last_rx.changed() => continue,
                    };
                    let e = e
                        .with_context(|| format!("watcher {i}: no event within {DEADLINE:?}"))??
                        .with_context(|| format!("watcher {i}: the stream ended"))?;
                    let line: BatchLine = serde_json::from_str(&e.data)
                        .with_context(|| format!("watcher {i}: {} {:.200}", e.event, e.data))?;
                    let now = Instant::now();
                    ensure!(
                        e.event == "batch"
                            && e.id == Some(line.seq.to_string())
                            && line.lineage == hex,
                        "watcher {i}: event {:?} id {:?} lineage {}",
                        e.event,
                        e.id,
                        line.lineage
                    );
                    got.push((line.prev_seq, line.seq, line.changes.len(), now));
                }
            })
        })
        .collect();

    // Commits at a steady rate; each one's `commit` returns when its waiter does.
    let n = ((secs * a.feed_rate) as usize).max(1);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / a.feed_rate.max(0.1)));
    // On schedule (transaction i at i / rate): a late tick is caught up, as a producer with a
    // backlog would, so the offered rate holds on average when the machine can keep up.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let ops = 1 + rng.below(a.max_ops.max(1));
        let changes: Vec<Change> = (0..ops)
            .map(|_| {
                Change::put(
                    format!("feed-{:05}", rng.below(10_000)),
                    Bytes::from(json_value(rng, a.value_bytes)),
                )
            })
            .collect();
        model.apply_changes(&changes);
        tick.tick().await;
        let pending = producer.submit_transaction(changes).await?;
        sent.push((
            ops,
            tokio::spawn(async move {
                let r = pending.wait().await;
                (r, Instant::now())
            }),
        ));
    }
    let mut committed: HashMap<u64, (Instant, usize)> = HashMap::with_capacity(n);
    let mut want = Vec::with_capacity(n);
    let mut last_commit = start;
    for (ops, waiter) in sent {
        let (r, at) = waiter.await?;
        let r = r?;
        ensure!(
            r.parts == 1,
            "a feed transaction took {} envelopes",
            r.parts
        );
        committed.insert(r.last_seq, (at, ops));
        want.push(r.last_seq);
        last_commit = last_commit.max(at);
    }
    let committed_rate = n as f64 / last_commit.duration_since(start).as_secs_f64();
    let _ = last_tx.send(want.last().copied());

    let mut lat = Vec::with_capacity(n * watchers);
    let mut delivered = 0usize;
    let mut last_delivery = start;
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t.await??;
        let seqs: Vec<u64> = got.iter().map(|g| g.1).collect();
        ensure!(
            seqs == want,
            "watcher {i} did not receive every batch once in order: {} batches, expected {}",
            seqs.len(),
            want.len()
        );
        let mut prev = after;
        for (p, s, count, when) in got {
            let (at, ops) = committed[&s];
            ensure!(
                p == prev && count == ops,
                "watcher {i}: batch {s} after {p} with {count} changes (expected after {prev}, \
                 {ops} changes)"
            );
            prev = s;
            delivered += count;
            last_delivery = last_delivery.max(when);
            // Signed: a watcher may parse a batch before the producer's commit returns.
            lat.push(if when >= at {
                when.duration_since(at).as_secs_f64()
            } else {
                -at.duration_since(when).as_secs_f64()
            });
        }
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| quantile(&lat, p);
    Ok(Followed {
        watchers,
        txns: n,
        committed_rate,
        delivered_rate: delivered as f64 / last_delivery.duration_since(start).as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
        max: pct(1.0),
        over_20ms: lat.iter().filter(|&&l| l > 0.020).count(),
    })
}

/// The feed of `deltasync-consumer run --ephemeral --http` while a producer commits at a
/// steady rate: `watchers` SSE watchers against a single one.
pub async fn feed(url: &str, a: ApiSizes, rows: &mut Vec<Row>) -> Result<()> {
    let s = settings(url, "bench-feed")?;
    let mut rng = Rng::new(23);
    let mut model = State::new(Lineage::default());
    let producer = Producer::start(s.clone()).await?;
    // A first transaction gives the consumer a history to start from.
    let first = vec![Change::put("feed-start", Bytes::from_static(b"1"))];
    model.apply_changes(&first);
    producer.commit(first).await?;
    let at = producer.flush().await?;

    let addr = loopback()?;
    let mut cmd = command("deltasync-consumer", &s)?;
    cmd.args([
        "run",
        "--ephemeral",
        "--id",
        "bench-feed",
        "--http",
        &addr.to_string(),
    ]);
    let mut consumer = Server::start(cmd, addr)?;
    let (seq, hex) = (at.seq, at.lineage.to_hex());
    let reached = |b: &[u8]| {
        serde_json::from_slice::<serde_json::Value>(b)
            .is_ok_and(|v| v["seq"] == json!(seq) && v["lineage"] == json!(hex))
    };
    wait_for(addr, "/v1/status", DEADLINE, || consumer.alive(), reached)
        .await
        .context("deltasync-consumer did not reach the producer's head")?;

    let base_secs = a.feed_secs.min(2.0);
    let one = follow(
        &mut consumer,
        &producer,
        (at.seq, at.lineage),
        &mut model,
        &mut rng,
        a,
        1,
        base_secs,
    )
    .await
    .context("the single watcher")?;
    let at = producer.flush().await?;
    let many = follow(
        &mut consumer,
        &producer,
        (at.seq, at.lineage),
        &mut model,
        &mut rng,
        a,
        a.watchers,
        a.feed_secs,
    )
    .await
    .with_context(|| format!("{} watchers", a.watchers))?;
    let end = producer.flush().await?;
    producer.shutdown().await?;
    ensure!(
        end.digest == model.digest(),
        "the feed's producer digest differs from the model's"
    );
    let (seq, hex) = (end.seq, end.lineage.to_hex());
    let digest = model.digest().to_hex();
    let reached = |b: &[u8]| {
        serde_json::from_slice::<serde_json::Value>(b).is_ok_and(|v| {
            v["seq"] == json!(seq) && v["lineage"] == json!(hex) && v["digest"] == json!(digest)
        })
    };
    wait_for(addr, "/v1/checksum", DEADLINE, || consumer.alive(), reached)
        .await
        .context("the consumer's replica did not reach the producer's head and digest")?;
    consumer.stop().await.context("deltasync-consumer")?;

    let ms = |s: f64| format!("{:.1} ms", s * 1e3);
    rows.push(Row {
        scenario: format!(
            "user path: the feed of `deltasync-consumer run --ephemeral --http`, {} SSE \
             watchers on /v1/watch, {} transactions of 1–{} puts at {:.0} txn/s",
            many.watchers, many.txns, a.max_ops, a.feed_rate
        ),
        ours: format!(
            "{} delivered (all watchers; {:.0} txn/s committed); commit → delivered p50 {}, \
             p99 {}, max {}",
            rate(many.delivered_rate, "changes"),
            many.committed_rate,
            ms(many.p50),
            ms(many.p99),
            ms(many.max)
        ),
        baseline: format!(
            "1 watcher, {} transactions: p50 {}, p99 {}",
            one.txns,
            ms(one.p50),
            ms(one.p99)
        ),
        ratio: format!("p99 {:.1}× one watcher's", many.p99 / one.p99.max(1e-6)),
        target: "(measured)".into(),
        met: true,
        check: "every watcher got every batch once, in order (seq, prev_seq, change count); \
                replica digest = model's"
            .into(),
        figures: json!({"watchers": many.watchers, "txns": many.txns,
            "committed_txn_per_s": many.committed_rate,
            "delivered_changes_per_s": many.delivered_rate,
            "p50_s": many.p50, "p99_s": many.p99, "max_s": many.max, "over_20ms": many.over_20ms,
            "one_watcher": {"txns": one.txns, "over_20ms": one.over_20ms, "committed_txn_per_s": one.committed_rate, "p50_s": one.p50, "p99_s": one.p99, "max_s": one.max,
                "delivered_changes_per_s": one.delivered_rate}}),
    });
    Ok(())
}
