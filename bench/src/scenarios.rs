//! The scenarios: each measures deltasync and its baseline in the same run on the same server,
//! checks the result, and returns a report row.
//!
//! Talks to the benchmark's private nats-server through async-nats and deltasync's shared
//! crate (`nats`, `store`, `history`).

use crate::report::{bytes, rate, secs, Row};
use anyhow::{bail, ensure, Context as _, Result};
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use deltasync_config::settings::{Settings, StorageKind};
use deltasync_core::codec::encode_envelope;
use deltasync_core::digest::BucketDigests;
use deltasync_core::envelope::{now_ms, split_transaction};
use deltasync_core::recovery::Classified;
use deltasync_core::{names, Change, Lineage, State};
use deltasync_nats::history::Tail;
use deltasync_nats::store;
use futures::StreamExt;
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Sizes of one run.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Keys in the bootstrap, snapshot and memory scenarios.
    pub keys: usize,
    /// Changes in the throughput scenarios.
    pub changes: usize,
    /// Value size in bytes.
    pub value_bytes: usize,
}

/// A deterministic pseudo-random generator (xorshift), so runs are comparable.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn bytes(&mut self, len: usize) -> Bytes {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        Bytes::from(v)
    }
}

pub fn key(i: usize) -> String {
    format!("key-{i:08}")
}

/// Settings for a benchmark pipeline on `url`.
pub fn settings(url: &str, pipeline: &str) -> Result<Settings> {
    let mut s = Settings {
        pipeline: pipeline.to_string(),
        ..Settings::default()
    };
    s.nats.url = url.to_string();
    s.nats.request_timeout = Duration::from_secs(30);
    s.stream.max_messages = -1;
    s.stream.max_bytes = -1;
    s.stream.storage = StorageKind::File;
    s.validate()?;
    Ok(s)
}

/// Connects and creates the pipeline's stream and bucket.
pub async fn open(s: &Settings) -> Result<(jetstream::Context, kv::Store)> {
    let client = deltasync_nats::connect(&s.nats).await?;
    let js = deltasync_nats::jetstream(client, &s.nats);
    deltasync_nats::ensure_stream(&js, s).await?;
    let kv = deltasync_nats::ensure_bucket(&js, s).await?;
    Ok((js, kv))
}

/// A state of `n` keys with random values, at position 0 of a fresh lineage.
pub fn build_state(n: usize, value_bytes: usize, rng: &mut Rng) -> State {
    let mut s = State::new(Lineage::random());
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..n {
        batch.push(Change::put(key(i), rng.bytes(value_bytes)));
        if batch.len() == 10_000 {
            s.apply_changes(&batch);
            batch.clear();
        }
    }
    s.apply_changes(&batch);
    s
}

/// Publishes the envelopes of one transaction and returns the stream sequence of the last.
pub async fn publish_txn(
    js: &jetstream::Context,
    s: &Settings,
    state: &mut State,
    changes: Vec<Change>,
) -> Result<u64> {
    let digest = state.apply_changes(&changes);
    let envs = split_transaction(
        state.lineage(),
        state.seq() + 1,
        digest,
        now_ms(),
        changes,
        s.producer.batch_max_bytes,
    );
    let mut last = 0;
    for e in &envs {
        let ack = js
            .publish(names::subject(&s.pipeline), encode_envelope(e)?.into())
            .await?;
        last = ack.await?.sequence;
    }
    let lineage = state.lineage();
    state.set_position(lineage, envs.last().map_or(0, |e| e.seq));
    Ok(last)
}

/// Publishes payloads with a bounded window of outstanding acks; returns the elapsed time.
pub async fn publish_windowed(
    js: &jetstream::Context,
    subject: &str,
    payloads: &[Bytes],
    window: usize,
) -> Result<Duration> {
    let start = Instant::now();
    let mut acks = futures::stream::FuturesOrdered::new();
    for p in payloads {
        if acks.len() >= window {
            if let Some(r) = acks.next().await {
                let _: jetstream::publish::PublishAck = r?;
            }
        }
        acks.push_back(std::future::IntoFuture::into_future(
            js.publish(subject.to_string(), p.clone()).await?,
        ));
    }
    while let Some(r) = acks.next().await {
        r?;
    }
    Ok(start.elapsed())
}

/// Bootstrap of `keys` keys to a verified replica vs a plain KV watcher over the same keys;
/// then the full and incremental snapshot, and re-snapshots, on the same data.
// `as_ref` spells entries for both forms a `State` has had (`(&Key, &Bytes)`, `(&str, &[u8])`)
// while that change is under way.
#[allow(clippy::useless_asref)]
pub async fn snapshots(url: &str, sizes: Sizes, rows: &mut Vec<Row>) -> Result<()> {
    let s = settings(url, "bench-snap")?;
    let (js, kv) = open(&s).await?;
    let mut rng = Rng::new(7);
    let mut state = build_state(sizes.keys, sizes.value_bytes, &mut rng);
    let raw_bytes = state.payload_bytes() as f64;

    // Full snapshot.
    let t = Instant::now();
    let full = store::write_snapshot(&js, &s, &state, 0, None).await?;
    let full_time = t.elapsed().as_secs_f64();
    let full_state = state.clone();

    // Bootstrap: ours.
    let t = Instant::now();
    let loaded = store::load_latest(&kv, &s).await?.context("no snapshot")?;
    let ours = t.elapsed().as_secs_f64();
    ensure!(
        loaded.state.digest() == state.digest(),
        "bootstrapped digest differs"
    );
    ensure!(
        loaded.state.len() == sizes.keys,
        "bootstrapped key count differs"
    );
    drop(loaded);

    // Bootstrap: a plain KV bucket with the same keys, read with watch_with_history.
    let baseline = kv_watch_baseline(&js, "bench_kv_baseline", &state, 1).await?[0];
    let speedup = baseline / ours;
    rows.push(Row {
        scenario: format!("bootstrap of {} keys to a verified replica", sizes.keys),
        ours: secs(ours),
        baseline: format!("{} (KV watch_with_history)", secs(baseline)),
        ratio: format!("{speedup:.1}× faster"),
        target: "≤ 1 s and ≥ 5× faster".into(),
        met: ours <= 1.0 && speedup >= 5.0,
        check: "digest and key count equal".into(),
        figures: json!({"ours_s": ours, "baseline_s": baseline, "snapshot_bytes": full.total_bytes()}),
    });

    // Incremental snapshot after 1% churn, published as real envelopes first.
    let churn: Vec<Change> = (0..sizes.keys / 100)
        .map(|_| Change::put(key(rng.below(sizes.keys)), rng.bytes(sizes.value_bytes)))
        .collect();
    let stream_seq = publish_txn(&js, &s, &mut state, churn).await?;
    let t = Instant::now();
    let incr =
        store::write_snapshot(&js, &s, &state, stream_seq, Some((&full, &full_state))).await?;
    let incr_time = t.elapsed().as_secs_f64();
    let frac = incr.bytes_written as f64 / full.bytes_written as f64;
    rows.push(Row {
        scenario: format!(
            "snapshot of {} keys: incremental after 1% churn",
            sizes.keys
        ),
        ours: format!(
            "{} in {}",
            bytes(incr.bytes_written as f64),
            secs(incr_time)
        ),
        baseline: format!(
            "full: {} in {}",
            bytes(full.bytes_written as f64),
            secs(full_time)
        ),
        ratio: format!("{:.2}% of full bytes", frac * 100.0),
        target: "incremental writes ≤ 5% of full".into(),
        met: frac <= 0.05,
        check: "loads back to the producer's digest".into(),
        figures: json!({"incremental_bytes": incr.bytes_written, "full_bytes": full.bytes_written,
                        "incremental_s": incr_time, "full_s": full_time}),
    });
    let check = store::load(&kv, incr.clone()).await?;
    ensure!(
        check.state.digest() == state.digest(),
        "incremental snapshot loads to another digest"
    );
    drop(check);

    // Re-snapshot of a replica that fell behind by 1% (it holds the full snapshot's state).
    let mut behind = full_state.clone();
    let rep = store::resync(&kv, &mut behind, &incr).await?;
    ensure!(
        behind.digest() == state.digest(),
        "resynced replica differs"
    );
    let frac = rep.bytes_fetched as f64 / incr.total_bytes() as f64;
    rows.push(Row {
        scenario: "re-snapshot of a replica 1% behind".into(),
        ours: bytes(rep.bytes_fetched as f64),
        baseline: format!("full download: {}", bytes(incr.total_bytes() as f64)),
        ratio: format!("{:.2}% of full", frac * 100.0),
        target: "fetches ≤ 10% of the bytes".into(),
        met: frac <= 0.10,
        check: "digest equal after resync".into(),
        figures: json!({"fetched": rep.bytes_fetched, "full": incr.total_bytes(), "ranges_rebuilt": rep.ranges_rebuilt}),
    });

    // Re-snapshot of a replica whose entries diverged at 1% of keys spread uniformly.
    let mut diverged = state.clone();
    let tamper: Vec<Change> = (0..sizes.keys / 100)
        .map(|_| Change::put(key(rng.below(sizes.keys)), rng.bytes(sizes.value_bytes)))
        .collect();
    diverged.apply_changes(&tamper);
    let rep = store::resync(&kv, &mut diverged, &incr).await?;
    ensure!(
        diverged.digest() == state.digest(),
        "repaired replica differs"
    );
    let frac = rep.bytes_fetched as f64 / incr.total_bytes() as f64;
    rows.push(Row {
        scenario: "re-snapshot of a replica diverged at 1% of keys (uniform)".into(),
        ours: bytes(rep.bytes_fetched as f64),
        baseline: format!("full download: {}", bytes(incr.total_bytes() as f64)),
        ratio: format!("{:.1}% of full", frac * 100.0),
        target: "fetches ≤ 10% of the bytes".into(),
        met: frac <= 0.10,
        check: format!("digest equal after repair; {} of {} ranges rebuilt", rep.ranges_rebuilt, incr.ranges.len()),
        figures: json!({"fetched": rep.bytes_fetched, "full": incr.total_bytes(), "ranges_rebuilt": rep.ranges_rebuilt}),
    });
    let _ = raw_bytes;
    Ok(())
}

/// A new KV bucket keeping one revision per key: what the KV baselines write into.
pub async fn kv_bucket(js: &jetstream::Context, bucket: &str) -> Result<kv::Store> {
    Ok(js
        .create_key_value(kv::Config {
            bucket: bucket.into(),
            history: 1,
            ..Default::default()
        })
        .await?)
}

/// The plain NATS baseline of a bootstrap: `state`'s keys put into KV bucket `bucket`
/// (pipelined), then the seconds a `watch_with_history` takes to deliver them all, for each of
/// `rounds` watchers one after another (at least one). What a plain
/// KV watcher's user keeps is a map with nothing to verify it against; the check (a state built
/// from the map, its digest) runs after the clock stops.
pub async fn kv_watch_baseline(
    js: &jetstream::Context,
    bucket: &str,
    state: &State,
    rounds: usize,
) -> Result<Vec<f64>> {
    let kvb = kv_bucket(js, bucket).await?;
    let mut acks = futures::stream::FuturesUnordered::new();
    for (k, v) in state.iter() {
        if acks.len() >= 256 {
            if let Some(r) = acks.next().await {
                let _: jetstream::publish::PublishAck = r?;
            }
        }
        acks.push(std::future::IntoFuture::into_future(
            js.publish(format!("$KV.{bucket}.{k}"), Bytes::copy_from_slice(v))
                .await?,
        ));
    }
    while let Some(r) = acks.next().await {
        r?;
    }
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds.max(1) {
        let t = Instant::now();
        let mut watch = kvb.watch_with_history(">").await?;
        let mut seen: HashMap<String, Bytes> = HashMap::with_capacity(state.len());
        while seen.len() < state.len() {
            let entry = tokio::time::timeout(Duration::from_secs(30), watch.next())
                .await
                .context("KV watcher stalled")?
                .context("KV watcher ended")??;
            seen.insert(entry.key, entry.value);
        }
        times.push(t.elapsed().as_secs_f64());
        drop(watch);
        let mut baseline_state = State::new(state.lineage());
        baseline_state.insert_many(
            seen.into_iter()
                .map(|(k, v)| (k.as_str().into(), v))
                .collect(),
        );
        ensure!(
            baseline_state.digest() == state.digest(),
            "KV watcher state differs"
        );
    }
    js.delete_key_value(bucket).await?;
    Ok(times)
}

/// Digest cost per change on a state of 1k keys vs one of `keys` keys.
// `as_ref` spells entries for both forms a `State` has had (`(&Key, &Bytes)`, `(&str, &[u8])`)
// while that change is under way.
#[allow(clippy::useless_asref)]
pub fn digest_cost(sizes: Sizes, rows: &mut Vec<Row>) -> Result<()> {
    let mut rng = Rng::new(11);
    let n = sizes.changes.clamp(10_000, 500_000);
    let mut per_change = Vec::new();
    for size in [1_000usize, sizes.keys] {
        let mut state = build_state(size, sizes.value_bytes, &mut rng);
        let batches: Vec<Vec<Change>> = (0..n / 1000)
            .map(|_| {
                (0..1000)
                    .map(|_| Change::put(key(rng.below(size)), rng.bytes(sizes.value_bytes)))
                    .collect()
            })
            .collect();
        let t = Instant::now();
        for b in &batches {
            state.apply_changes(b);
        }
        per_change.push(t.elapsed().as_secs_f64() / n as f64);
        let scratch = BucketDigests::from_entries(state.iter());
        ensure!(
            scratch.total() == state.digest(),
            "incremental digest differs from scratch"
        );
    }
    let ratio = per_change[1] / per_change[0];
    rows.push(Row {
        scenario: format!("digest cost per change, 1k vs {} keys", sizes.keys),
        ours: format!(
            "{:.0} ns/change at {} keys",
            per_change[1] * 1e9,
            sizes.keys
        ),
        baseline: format!("{:.0} ns/change at 1k keys", per_change[0] * 1e9),
        ratio: format!("{ratio:.2}"),
        target: "ratio ≤ 1.3".into(),
        met: ratio <= 1.3,
        check: "incremental digest equals digest from scratch".into(),
        figures: json!({"ns_small": per_change[0] * 1e9, "ns_large": per_change[1] * 1e9}),
    });
    Ok(())
}

/// Envelopes of `changes` puts over `keys` keys, 1000 changes each, from a producer state.
pub fn envelopes(sizes: Sizes, rng: &mut Rng) -> (State, Vec<Bytes>) {
    let mut p = State::new(Lineage::random());
    let mut out = Vec::new();
    let mut left = sizes.changes;
    while left > 0 {
        let n = left.min(1000);
        left -= n;
        let changes: Vec<Change> = (0..n)
            .map(|_| {
                Change::put(
                    key(rng.below(sizes.keys.max(1))),
                    rng.bytes(sizes.value_bytes),
                )
            })
            .collect();
        let digest = p.apply_changes(&changes);
        for e in split_transaction(p.lineage(), p.seq() + 1, digest, now_ms(), changes, 1 << 20) {
            let seq = e.seq;
            out.push(Bytes::from(encode_envelope(&e).unwrap_or_default()));
            let l = p.lineage();
            p.set_position(l, seq);
        }
    }
    (p, out)
}

/// How long a reader may stay silent before the scenario fails (instead of hanging the run).
const STALL: Duration = Duration::from_secs(30);

/// In-memory apply without the consumer engine: the shared `Tail` (ordered consumer and
/// decoding) feeding `State::apply` with every digest verified, against a raw ordered read of
/// the same messages.
pub async fn apply_memory(url: &str, sizes: Sizes, rows: &mut Vec<Row>) -> Result<()> {
    let s = settings(url, "bench-apply")?;
    let (js, _kv) = open(&s).await?;
    let mut rng = Rng::new(3);
    let (producer, payloads) = envelopes(sizes, &mut rng);
    let total_bytes: usize = payloads.iter().map(Bytes::len).sum();
    publish_windowed(
        &js,
        &names::subject(&s.pipeline),
        &payloads,
        s.producer.ack_window,
    )
    .await?;
    let last = payloads.len() as u64;

    // Raw: an ordered consumer reading every message.
    let stream = js.get_stream(names::stream_name(&s.pipeline)).await?;
    let t = Instant::now();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await?;
    let mut msgs = consumer.messages().await?;
    let mut n = 0u64;
    let mut raw_bytes = 0usize;
    while n < last {
        let m = tokio::time::timeout(STALL, msgs.next())
            .await
            .with_context(|| format!("raw reader stalled after {n} of {last} messages"))?
            .context("raw reader ended")??;
        raw_bytes += m.payload.len();
        n += 1;
    }
    let raw = t.elapsed().as_secs_f64();
    ensure!(
        raw_bytes == total_bytes,
        "raw reader saw {raw_bytes} of {total_bytes} bytes"
    );

    // Ours: the shared tail (ordered consumer + decode) and State::apply with the digest verified.
    let t = Instant::now();
    let mut tail = Tail::open(&js, &s, 1).await?;
    let mut replica = State::new(producer.lineage());
    let mut applied = 0u64;
    while applied < last {
        let item = tokio::time::timeout(STALL, tail.next())
            .await
            .with_context(|| format!("the tail stalled after {applied} of {last} envelopes"))?
            .context("tail ended")??;
        match item.item {
            Classified::Envelope(e) => {
                replica
                    .apply(&e)
                    .map_err(|e| anyhow::anyhow!("apply: {e}"))?;
            }
            Classified::Foreign { reason } => bail!("foreign message: {reason}"),
        }
        applied += 1;
    }
    let ours = t.elapsed().as_secs_f64();
    ensure!(
        replica.digest() == producer.digest(),
        "replica digest differs from the producer's"
    );
    let ours_rate = sizes.changes as f64 / ours;
    let raw_rate = sizes.changes as f64 / raw;
    let rel = ours_rate / raw_rate;
    rows.push(Row {
        scenario: "apply, memory, digest verified: shared Tail + State::apply, no consumer engine"
            .into(),
        ours: rate(ours_rate, "changes"),
        baseline: format!("{} (raw ordered read)", rate(raw_rate, "changes")),
        ratio: format!("{rel:.2}× raw"),
        target: "≥ 2M changes/s and ≥ 0.8× raw".into(),
        met: ours_rate >= 2e6 && rel >= 0.8,
        check: "replica digest equals the producer's".into(),
        figures: json!({"ours_changes_per_s": ours_rate, "raw_changes_per_s": raw_rate, "bytes": total_bytes}),
    });
    Ok(())
}

/// Resident set size of this process, in bytes.
pub fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

/// Builds a replica of `keys` keys the way a consumer does (decoding envelopes, applying
/// them) and prints {"rss": bytes over the start, "raw": key+value bytes} as JSON. Run in a
/// child process so nothing else pollutes the figure.
pub fn memory_probe(keys: usize, value_bytes: usize) -> Result<()> {
    let before = rss();
    let mut rng = Rng::new(5);
    let lineage = Lineage::random();
    // Every key is new, so the producer's digest is the running sum of entry hashes: no
    // second state to pollute the figure.
    let mut digests = BucketDigests::default();
    let mut replica = State::new(lineage);
    let mut i = 0;
    let mut seq = 0;
    while i < keys {
        let n = (keys - i).min(1000);
        let changes: Vec<Change> = (i..i + n)
            .map(|k| Change::put(key(k), rng.bytes(value_bytes)))
            .collect();
        i += n;
        for c in &changes {
            if let Some(v) = c.value() {
                digests.add(
                    deltasync_core::digest::bucket_of(c.key()),
                    deltasync_core::digest::entry_hash(c.key(), v),
                );
            }
        }
        for e in split_transaction(lineage, seq + 1, digests.total(), 0, changes, 1 << 20) {
            seq = e.seq;
            let bytes = encode_envelope(&e)?;
            drop(e);
            let decoded = deltasync_core::codec::decode_envelope(&bytes)?;
            replica
                .apply(&decoded)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    let raw = replica.payload_bytes();
    let after = rss();
    println!(
        "{}",
        json!({"rss": after.saturating_sub(before), "raw": raw, "digest": replica.digest().to_hex()})
    );
    Ok(())
}

/// Runs the memory probe in a child process and reports RSS against raw bytes.
pub fn memory(sizes: Sizes, rows: &mut Vec<Row>) -> Result<()> {
    let exe = std::env::current_exe()?;
    let out = std::process::Command::new(exe)
        .args([
            "--memory-probe",
            &sizes.keys.to_string(),
            "--value-bytes",
            &sizes.value_bytes.to_string(),
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "memory probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let rss = v["rss"].as_f64().unwrap_or(0.0);
    let raw = v["raw"].as_f64().unwrap_or(1.0);
    let ratio = rss / raw;
    rows.push(Row {
        scenario: format!("consumer memory with {} keys", sizes.keys),
        ours: format!("{} RSS", bytes(rss)),
        baseline: format!("{} raw keys + values", bytes(raw)),
        ratio: format!("{ratio:.2}×"),
        target: "RSS ≤ 2×".into(),
        met: ratio <= 2.0,
        check: "replica built by decode + verified apply".into(),
        figures: v,
    });
    Ok(())
}

/// Wire bytes per cycle of the order-book source at 1%, 5% and 20% churn: the envelopes a
/// commit of each cycle's diff encodes, against a full snapshot of the same state every cycle.
/// Checks that the state rebuilt from the diffs has the book's digest after every cycle.
pub fn wire_bytes(quick: bool, rows: &mut Vec<Row>) -> Result<()> {
    use deltasync_producer::sources::orderbook::{Orderbook, OrderbookOptions};
    let (orders, cycles) = if quick { (2_000, 3) } else { (10_000, 20) };
    let max_bytes = Settings::default().producer.batch_max_bytes;
    for (churn, target) in [(1.0, Some(0.015)), (5.0, Some(0.07)), (20.0, None)] {
        let mut book = Orderbook::new(OrderbookOptions {
            orders,
            churn_pct: churn,
            seed: 42,
            ..OrderbookOptions::default()
        });
        let mut prev = book.to_state();
        let mut replica = prev.clone();
        let (mut delta, mut full) = (0u64, 0u64);
        for _ in 0..cycles {
            book.step();
            let next = book.to_state();
            let changes = deltasync_core::diff(&prev, &next);
            let digest = replica.apply_changes(&changes);
            let envs = split_transaction(
                replica.lineage(),
                replica.seq() + 1,
                digest,
                now_ms(),
                changes,
                max_bytes,
            );
            for e in &envs {
                delta += encode_envelope(e)?.len() as u64;
            }
            let lineage = replica.lineage();
            replica.set_position(lineage, envs.last().map_or(replica.seq(), |e| e.seq));
            ensure!(
                replica.digest() == next.digest(),
                "order book at {churn}% churn: the replica's digest differs from the book's"
            );
            full += book.full_bytes();
            prev = next;
        }
        let ratio = delta as f64 / full.max(1) as f64;
        rows.push(Row {
            scenario: format!("wire bytes per cycle, order book {orders} orders, {churn}% churn"),
            ours: bytes(delta as f64 / cycles as f64),
            baseline: format!("{} (full snapshot)", bytes(full as f64 / cycles as f64)),
            ratio: format!("{:.2}% of full", ratio * 100.0),
            target: target.map_or("—".into(), |t| format!("≤ {:.1}% of full", t * 100.0)),
            met: target.is_none_or(|t| ratio <= t),
            check: format!("replica digest equals the book's after each of {cycles} cycles"),
            figures: json!({"churn_pct": churn, "orders": orders, "cycles": cycles,
                "delta_bytes": delta, "full_bytes": full, "ratio": ratio}),
        });
    }
    Ok(())
}
