//! The scenarios that go through deltasync's own libraries, as a user's program would: the
//! producer's ingest path, the consumer engine in memory and on disk, commit-to-applied
//! latency, and the publish rate while a snapshot is written. Each runs against its raw
//! JetStream baseline in the same run on the same server, and checks its result against a model
//! state the benchmark builds itself, never only against what a library says of itself.
//!
//! Talks to the benchmark's nats-server through `deltasync_producer::Producer`,
//! `deltasync_consumer::Consumer`, `deltasync_nats` and, for the
//! baselines, async-nats directly.
//!
//! ```text
//!  producer_ingest ── stream bench-ingest ──┬─ apply_memory_round (memory)     ┐ alternating,
//!   (raw: same bytes → bench-ingest-raw)    └─ apply_durable_round (temp dir) ┘ APPLY_ROUNDS
//!  latency          bench-latency / bench-latency-raw   (own pipelines)
//!  snapshot_during  bench-snapduring                    (own pipeline)
//! ```

use crate::report::{bytes, rate, secs, Row};
use crate::scenarios::{key, publish_windowed, Rng, Sizes};
use anyhow::{anyhow, bail, ensure, Context as _, Result};
use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use deltasync_config::settings::Settings;
use deltasync_consumer::{BatchKind, Consumer, Options, Storage};
use deltasync_core::digest::BucketDigests;
use deltasync_core::envelope::{now_ms, split_transaction};
use deltasync_core::{codec, names, Change, Digest, Lineage, State};
use deltasync_nats::{history, store};
use deltasync_producer::Producer;
use futures::StreamExt;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Changes per `submit_many` call: the chunk the NDJSON ingest path hands the producer.
pub const INGEST_CHUNK: usize = 4096;

/// The latency scenario offers 10k changes/s: a transaction of this many changes ...
const LATENCY_TXN_CHANGES: usize = 100;

/// ... every this long.
const LATENCY_PERIOD: Duration = Duration::from_millis(10);

/// Durations of the time-boxed scenarios.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long each side of the latency scenario offers its load.
    pub latency: Duration,
    /// How long the producer publishes without a snapshot, for the rate it is compared with.
    pub window: Duration,
}

/// Settings of a benchmark pipeline: unlimited retention and no scheduled snapshot, so the
/// consumer scenarios follow the whole stream from envelope 1 and only the snapshot the
/// benchmark asks for is written.
pub fn settings(url: &str, pipeline: &str) -> Result<Settings> {
    let mut s = crate::scenarios::settings(url, pipeline)?;
    s.stream.max_age = Duration::ZERO;
    s.snapshot.every_envelopes = 0;
    s.snapshot.every = Duration::ZERO;
    s.validate()?;
    Ok(s)
}

/// What the ingest scenario left in its stream, for the consumer scenarios.
#[derive(Debug)]
pub struct Ingested {
    /// The pipeline's settings.
    pub settings: Settings,
    /// The state the benchmark computed from the changes it handed over.
    pub model: State,
    /// The last envelope (the stream held nothing else, so also its stream sequence).
    pub last_seq: u64,
    /// Changes in the stream.
    pub changes: usize,
    /// Key and value bytes of those changes: what a replica applies.
    pub applied_bytes: usize,
    /// Envelope bytes in the stream.
    pub bytes: usize,
    /// The memory apply's rate in this run (changes/s), for the durable row's ratio.
    pub memory_rate: Option<f64>,
    /// A raw ordered consumer's time to read every message (the consumer rows' baseline).
    pub raw_read: Duration,
}

/// Reads stream messages 1..=`last` with an ordered consumer pulling as the consumer's tail
/// does (16 MiB per pull); returns the payloads and the time it took.
async fn read_all(
    js: &jetstream::Context,
    s: &Settings,
    last: u64,
) -> Result<(Vec<Bytes>, Duration)> {
    let stream = js.get_stream(names::stream_name(&s.pipeline)).await?;
    let max_batch =
        (16 * 1024 * 1024 / i64::from(s.stream.max_message_bytes).max(64 * 1024)).clamp(8, 200);
    let t = Instant::now();
    let reader = stream
        .create_consumer(consumer::pull::OrderedConfig {
            max_batch,
            ..Default::default()
        })
        .await?;
    let mut msgs = reader.messages().await?;
    let mut out = Vec::with_capacity(usize::try_from(last).unwrap_or(0));
    while (out.len() as u64) < last {
        let m = tokio::time::timeout(Duration::from_secs(30), msgs.next())
            .await
            .context("raw reader stalled")?
            .context("raw reader ended")??;
        out.push(m.payload.clone());
    }
    Ok((out, t.elapsed()))
}

/// `changes` puts over `keys` keys, in chunks of `chunk`, applied to `model` as well.
fn put_chunks(
    rng: &mut Rng,
    changes: usize,
    chunk: usize,
    sizes: Sizes,
    model: &mut State,
) -> Vec<Vec<Change>> {
    let mut out = Vec::new();
    let mut left = changes;
    while left > 0 {
        let n = left.min(chunk);
        left -= n;
        let c: Vec<Change> = (0..n)
            .map(|_| {
                Change::put(
                    key(rng.below(sizes.keys.max(1))),
                    rng.bytes(sizes.value_bytes),
                )
            })
            .collect();
        model.apply_changes(&c);
        out.push(c);
    }
    out
}

/// The digest of `state` computed again from its entries alone.
fn scratch_digest(state: &State) -> Digest {
    BucketDigests::from_entries(state.iter()).total()
}

/// Producer ingest: `changes` puts handed to the producer library in chunks of 4096 with
/// `submit_many` (what `deltasync-producer ingest` does with NDJSON) and flushed, i.e. every
/// envelope acknowledged; against a raw windowed publish of the very envelope bytes it
/// produced to a second stream, with the same ack window.
pub async fn producer_ingest(url: &str, sizes: Sizes, rows: &mut Vec<Row>) -> Result<Ingested> {
    let s = settings(url, "bench-ingest")?;
    let mut rng = Rng::new(13);
    let mut model = State::new(Lineage::default());
    let chunks = put_chunks(&mut rng, sizes.changes, INGEST_CHUNK, sizes, &mut model);

    let producer = Producer::start(s.clone()).await?;
    let lineage = producer.lineage();
    let t = Instant::now();
    for chunk in chunks {
        producer.submit_many(chunk).await?;
    }
    let position = producer.flush().await?;
    let ours = t.elapsed();
    producer.shutdown().await?;
    ensure!(
        position.digest == model.digest(),
        "the producer's digest differs from the model's"
    );

    // What the stream holds: every envelope, in order, with every change.
    let client = deltasync_nats::connect(&s.nats).await?;
    let js = deltasync_nats::jetstream(client, &s.nats);
    let b = history::bounds(&js, &s).await?;
    ensure!(
        b.messages == position.seq && b.last_seq == position.stream_seq,
        "the stream holds {} messages up to {}, the producer says {} envelopes up to {}",
        b.messages,
        b.last_seq,
        position.seq,
        position.stream_seq
    );
    // A clean shutdown leaves a snapshot at the head; the consumer scenarios time following
    // the whole stream from envelope 1, so the bucket is emptied (deleted and created again):
    // a replica with no snapshot and the stream from envelope 1 follows it all.
    js.delete_key_value(names::bucket_name(&s.pipeline))
        .await
        .context("deleting the ingest pipeline's snapshot bucket")?;
    deltasync_nats::ensure_bucket(&js, &s)
        .await
        .context("creating the ingest pipeline's snapshot bucket again, empty")?;
    let (payloads, raw_read) = read_all(&js, &s, b.last_seq).await?;
    let mut changes = 0usize;
    let mut applied_bytes = 0usize;
    let mut last_digest = Digest::default();
    for (i, p) in payloads.iter().enumerate() {
        let e = codec::decode_envelope(p).with_context(|| format!("stream message {}", i + 1))?;
        ensure!(
            e.lineage == lineage && e.seq == i as u64 + 1,
            "stream message {} is envelope {}:{}",
            i + 1,
            e.lineage,
            e.seq
        );
        changes += e.changes.len();
        applied_bytes += e
            .changes
            .iter()
            .map(|c| c.key().len() + c.value().map_or(0, |v| v.len()))
            .sum::<usize>();
        last_digest = e.digest;
    }
    ensure!(
        changes == sizes.changes,
        "the stream holds {changes} changes, {} were ingested",
        sizes.changes
    );
    ensure!(
        last_digest == model.digest(),
        "the last envelope records another digest than the model's"
    );
    let total_bytes: usize = payloads.iter().map(Bytes::len).sum();

    // Raw: the same bytes, published with the same window, to a stream of their own.
    let raw_s = settings(url, "bench-ingest-raw")?;
    deltasync_nats::ensure_stream(&js, &raw_s).await?;
    let raw = publish_windowed(
        &js,
        &names::subject(&raw_s.pipeline),
        &payloads,
        s.producer.ack_window,
    )
    .await?;
    let rb = history::bounds(&js, &raw_s).await?;
    ensure!(
        rb.messages == payloads.len() as u64,
        "raw stream holds {} of {} messages",
        rb.messages,
        payloads.len()
    );
    drop(payloads);

    let ours_s = ours.as_secs_f64();
    let raw_s_ = raw.as_secs_f64();
    let ours_rate = sizes.changes as f64 / ours_s;
    let raw_rate = sizes.changes as f64 / raw_s_;
    let (ours_bps, raw_bps) = (total_bytes as f64 / ours_s, total_bytes as f64 / raw_s_);
    let rel = ours_bps / raw_bps;
    rows.push(Row {
        scenario: format!(
            "producer ingest of {} changes ({} B values), submit_many + flush",
            sizes.changes, sizes.value_bytes
        ),
        ours: format!("{} ({}/s)", rate(ours_rate, "changes"), bytes(ours_bps)),
        baseline: format!(
            "{}/s raw publish, same bytes, window {}",
            bytes(raw_bps),
            s.producer.ack_window
        ),
        ratio: format!("{rel:.2}× raw bytes/s"),
        target: "≥ 1.5M changes/s and ≥ 0.8× the raw byte rate".into(),
        met: ours_rate >= 1.5e6 && rel >= 0.8,
        check: format!(
            "{} envelopes 1..={} in the stream, {} changes, last digest = model's",
            position.seq, position.seq, changes
        ),
        figures: json!({"ours_changes_per_s": ours_rate, "raw_changes_per_s": raw_rate,
            "ours_bytes_per_s": ours_bps, "raw_bytes_per_s": raw_bps, "bytes": total_bytes,
            "envelopes": position.seq, "ours_s": ours_s, "raw_s": raw_s_}),
    });
    Ok(Ingested {
        settings: s,
        model,
        last_seq: position.seq,
        changes,
        applied_bytes,
        bytes: total_bytes,
        raw_read,
        memory_rate: None,
    })
}

/// A consumer run until it committed `last_seq`.
struct Followed {
    /// From `run` to the status showing `last_seq` committed.
    elapsed: Duration,
    status: deltasync_consumer::Status,
    /// The replica's view at the end, for the model comparison.
    view: Arc<deltasync_consumer::View>,
    outcome: deltasync_consumer::Outcome,
}

/// Runs a consumer (the library, as a service embeds it) until its status shows `last_seq`
/// committed, then stops it.
async fn follow_to(
    s: &Settings,
    id: &str,
    storage: Storage,
    last_seq: u64,
    timeout: Duration,
) -> Result<Followed> {
    let consumer = Consumer::new(
        s.clone(),
        Options {
            id: id.into(),
            storage,
            http: None,
            once: false,
        },
    )?;
    let replica = consumer.replica();
    let cancel = CancellationToken::new();
    let t = Instant::now();
    let mut running = tokio::spawn(consumer.run(cancel.clone()));
    let reached = tokio::select! {
        r = replica.wait_until(timeout, |st| st.seq >= last_seq) => r,
        r = &mut running => bail!("consumer {id} stopped before envelope {last_seq}: {r:?}"),
    };
    let elapsed = t.elapsed();
    let status = reached.map_err(|st| {
        anyhow!("consumer {id} did not commit envelope {last_seq} within {timeout:?}: {st:?}")
    })?;
    let view = replica.fresh_view(Duration::from_secs(30)).await;
    cancel.cancel();
    let outcome = running.await.context("consumer task")??;
    Ok(Followed {
        elapsed,
        status,
        view,
        outcome,
    })
}

/// Checks a followed replica against the model: status digest, view digest and the digest
/// recomputed from the view's entries.
fn check_replica(f: &Followed, ing: &Ingested) -> Result<()> {
    let want = ing.model.digest();
    ensure!(
        f.status.digest == want.to_hex(),
        "consumer status digest differs from the model's"
    );
    ensure!(
        f.view.seq() == ing.last_seq && f.view.len() == ing.model.len(),
        "the replica's view is at {} with {} keys, the model at {} with {}",
        f.view.seq(),
        f.view.len(),
        ing.last_seq,
        ing.model.len()
    );
    ensure!(
        scratch_digest(f.view.state()) == want,
        "the replica's entries hash to another digest than the model's"
    );
    ensure!(
        f.outcome.cursor.seq == ing.last_seq && f.outcome.cursor.digest == want,
        "the consumer stopped at {} (digest {}), not at {} with the model's digest",
        f.outcome.cursor.seq,
        f.outcome.cursor.digest,
        ing.last_seq
    );
    Ok(())
}

fn follow_timeout(ing: &Ingested) -> Duration {
    Duration::from_secs(60) + Duration::from_secs((ing.changes / 20_000) as u64)
}

/// Rounds of the two apply scenarios. They alternate (memory, durable, memory, durable) and
/// each row reports its fastest round: on this 2-core VM one round of either varies by ~1.5×
/// with what else the machine does, and the first round after the ingest also pays for
/// growing the heap, which the rounds after it reuse.
pub const APPLY_ROUNDS: usize = 2;

/// One round of consumer apply in memory: the consumer library follows the ingest
/// scenario's stream from envelope 1 and verifies every digest; checked against the model.
/// Returns its time.
pub async fn apply_memory_round(ing: &Ingested, round: usize) -> Result<Duration> {
    let f = follow_to(
        &ing.settings,
        &format!("bench-memory-{round}"),
        Storage::Memory,
        ing.last_seq,
        follow_timeout(ing),
    )
    .await?;
    check_replica(&f, ing)?;
    ensure!(
        f.status.changes_applied == ing.changes as u64,
        "the consumer applied {} changes, the stream holds {}",
        f.status.changes_applied,
        ing.changes
    );
    Ok(f.elapsed)
}

/// The memory apply's row from its rounds' times, against a raw ordered read of the same
/// messages.
pub fn consumer_memory(ing: &mut Ingested, rounds: &[Duration], rows: &mut Vec<Row>) {
    let best = fastest(rounds);
    let ours = ing.changes as f64 / best.as_secs_f64();
    ing.memory_rate = Some(ours);
    let raw = ing.changes as f64 / ing.raw_read.as_secs_f64();
    let rel = ours / raw;
    rows.push(Row {
        scenario: format!(
            "consumer apply, memory, digest verified (consumer library, {} envelopes, \
             fastest of {} rounds)",
            ing.last_seq,
            rounds.len()
        ),
        ours: rate(ours, "changes"),
        baseline: format!("{} (raw ordered read)", rate(raw, "changes")),
        ratio: format!("{rel:.2}× raw"),
        target: "≥ 2M changes/s and ≥ 0.8× raw".into(),
        met: ours >= 2e6 && rel >= 0.8,
        check: "replica digest, and its entries hashed again, equal the model's".into(),
        figures: json!({"ours_changes_per_s": ours, "raw_changes_per_s": raw,
            "ours_s": best.as_secs_f64(), "rounds_s": seconds(rounds),
            "raw_s": ing.raw_read.as_secs_f64(), "bytes": ing.bytes}),
    });
}

/// One round of consumer apply into the durable store: the consumer library with its local
/// log and snapshot in a temporary data directory; the replica is read back from disk
/// afterwards and checked against the model. Returns its time and the bytes it wrote.
pub async fn apply_durable_round(ing: &Ingested, round: usize) -> Result<(Duration, Option<u64>)> {
    let dir = tempfile::tempdir()?;
    let written_before = written_bytes();
    let f = follow_to(
        &ing.settings,
        &format!("bench-durable-{round}"),
        Storage::Durable(dir.path().to_path_buf()),
        ing.last_seq,
        follow_timeout(ing),
    )
    .await?;
    let written = written_bytes()
        .zip(written_before)
        .map(|(after, before)| after.saturating_sub(before));
    check_replica(&f, ing)?;
    // The replica on disk, read back the way a restart reads it.
    let path = dir.path().to_path_buf();
    let pipeline = ing.settings.pipeline.clone();
    let (cursor, loaded) = tokio::task::spawn_blocking(move || {
        let cursor = deltasync_consumer::local::read_cursor(&path)?;
        let loaded =
            deltasync_consumer::local::LocalStore::open_durable(&path, &pipeline)?.load()?;
        anyhow::Ok((cursor, loaded))
    })
    .await??;
    let cursor = cursor.context("no cursor on disk")?;
    let loaded = loaded.context("no replica on disk")?;
    let want = ing.model.digest();
    ensure!(
        cursor.seq == ing.last_seq && cursor.stream_seq == ing.last_seq && cursor.digest == want,
        "the cursor on disk is {cursor:?}, not envelope {} with the model's digest",
        ing.last_seq
    );
    ensure!(
        loaded.intact() && loaded.computed == want && loaded.state.len() == ing.model.len(),
        "the replica on disk does not hold the model's entries ({} keys)",
        loaded.state.len()
    );
    Ok((f.elapsed, written))
}

/// The durable apply's row from its rounds (time, bytes written), compared with the memory
/// apply of the same run when it ran (`--only apply-memory,...`).
pub fn consumer_durable(ing: &Ingested, rounds: &[(Duration, Option<u64>)], rows: &mut Vec<Row>) {
    let times: Vec<Duration> = rounds.iter().map(|r| r.0).collect();
    let best = fastest(&times);
    // Every round writes the same records; the largest count is reported.
    let written = rounds.iter().filter_map(|r| r.1).max();
    let ours = ing.changes as f64 / best.as_secs_f64();
    let raw = ing.changes as f64 / ing.raw_read.as_secs_f64();
    let amplification = written.map(|w| w as f64 / ing.applied_bytes as f64);
    let vs_memory = ing.memory_rate.map(|m| ours / m);
    rows.push(Row {
        scenario: format!(
            "consumer apply, durable (local log + snapshot), digest verified ({} envelopes, \
             fastest of {} rounds)",
            ing.last_seq,
            rounds.len()
        ),
        ours: format!(
            "{}; {} written for {} applied ({})",
            rate(ours, "changes"),
            written.map_or("(unknown)".into(), |w| bytes(w as f64)),
            bytes(ing.applied_bytes as f64),
            amplification.map_or("—".into(), |a| format!("{a:.2}×"))
        ),
        baseline: match ing.memory_rate {
            Some(m) => format!("{} (memory apply, this run)", rate(m, "changes")),
            None => format!("{} (raw ordered read)", rate(raw, "changes")),
        },
        ratio: match vs_memory {
            Some(r) => format!("{r:.2}× memory"),
            None => format!("{:.2}× raw", ours / raw),
        },
        target: "≥ 0.8× the memory apply; bytes written ≤ 2× bytes applied".into(),
        met: vs_memory.is_some_and(|r| r >= 0.8) && amplification.is_some_and(|a| a <= 2.0),
        check: format!(
            "digest equal; reopened replica's entries hash to it, cursor at the last envelope \
             ({} of keys and values held)",
            bytes(ing.model.payload_bytes() as f64)
        ),
        figures: json!({"ours_changes_per_s": ours, "raw_changes_per_s": raw,
            "memory_changes_per_s": ing.memory_rate,
            "ours_s": best.as_secs_f64(), "rounds_s": seconds(&times),
            "raw_s": ing.raw_read.as_secs_f64(),
            "disk_write_bytes": written, "applied_bytes": ing.applied_bytes,
            "payload_bytes": ing.model.payload_bytes()}),
    });
}

fn fastest(rounds: &[Duration]) -> Duration {
    rounds.iter().copied().min().unwrap_or(Duration::MAX)
}

fn seconds(rounds: &[Duration]) -> Vec<f64> {
    rounds.iter().map(Duration::as_secs_f64).collect()
}

/// Bytes this process has caused to be written to storage so far (`write_bytes` of
/// /proc/self/io), where the kernel tells.
fn written_bytes() -> Option<u64> {
    std::fs::read_to_string("/proc/self/io")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The value at quantile `q` of sorted `v`.
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Receives items from `rx` until `n` arrived or `deadline` passed.
async fn collect<T>(
    rx: &mut mpsc::UnboundedReceiver<Result<T>>,
    n: usize,
    deadline: tokio::time::Instant,
    what: &str,
) -> Result<Vec<T>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(item)) => out.push(item?),
            Ok(None) => bail!("{what}: the receiver ended after {} of {n}", out.len()),
            Err(_) => bail!("{what}: only {} of {n} arrived in time", out.len()),
        }
    }
    Ok(out)
}

/// End-to-end latency at 10k changes/s offered: a transaction of 100 changes every 10 ms
/// handed to the producer library, timed from the call to the consumer library's change
/// batch of it; against a raw publish of same-size messages at the same pace, timed from the
/// publish call to an ordered consumer receiving it.
pub async fn latency(url: &str, sizes: Sizes, timing: Timing, rows: &mut Vec<Row>) -> Result<()> {
    let n = ((timing.latency.as_secs_f64() / LATENCY_PERIOD.as_secs_f64()) as usize).max(20);
    let s = settings(url, "bench-latency")?;
    let mut rng = Rng::new(17);
    let mut model = State::new(Lineage::default());
    let txn = |rng: &mut Rng| -> Vec<Change> {
        (0..LATENCY_TXN_CHANGES)
            .map(|_| {
                Change::put(
                    key(rng.below(sizes.keys.max(1))),
                    rng.bytes(sizes.value_bytes),
                )
            })
            .collect()
    };

    // Ours. A first transaction gives the consumer a history to start from.
    let producer = Producer::start(s.clone()).await?;
    let first = txn(&mut rng);
    model.apply_changes(&first);
    let warm = producer.commit(first).await?;
    let consumer = Consumer::new(
        s.clone(),
        Options {
            id: "bench-latency".into(),
            storage: Storage::Memory,
            http: None,
            once: false,
        },
    )?;
    let replica = consumer.replica();
    let mut batches = replica.subscribe();
    let cancel = CancellationToken::new();
    let running = tokio::spawn(consumer.run(cancel.clone()));
    replica
        .wait_until(Duration::from_secs(30), |st| st.seq >= warm.last_seq)
        .await
        .map_err(|st| anyhow!("latency consumer did not start: {st:?}"))?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<(u64, Instant, usize)>>();
    let listener = tokio::spawn(async move {
        loop {
            let item = match batches.recv().await {
                Ok(b) if b.seq <= warm.last_seq => continue,
                Ok(b) if b.kind == BatchKind::Applied => {
                    Ok((b.seq, Instant::now(), b.changes.len()))
                }
                Ok(b) => Err(anyhow!(
                    "the consumer re-snapshotted ({:?}) at {}",
                    b.kind,
                    b.seq
                )),
                Err(e) => Err(anyhow!("change batches: {e}")),
            };
            let failed = item.is_err();
            if tx.send(item).is_err() || failed {
                return;
            }
        }
    });
    let mut sent = Vec::with_capacity(n);
    let mut tick = tokio::time::interval(LATENCY_PERIOD);
    let mut applied_later = Vec::with_capacity(n);
    for _ in 0..n {
        let changes = txn(&mut rng);
        applied_later.push(changes.clone());
        tick.tick().await;
        let t0 = Instant::now();
        let pending = producer.submit_transaction(changes).await?;
        // Waited for beside the loop, to time the acknowledgement too.
        sent.push((
            t0,
            tokio::spawn(async move {
                let r = pending.wait().await;
                (r, Instant::now())
            }),
        ));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let seen = collect(&mut rx, n, deadline, "applied transactions").await?;
    listener.abort();
    let mut at: HashMap<u64, (Instant, usize)> = HashMap::with_capacity(n);
    for (seq, when, len) in seen {
        at.insert(seq, (when, len));
    }
    let mut ours = Vec::with_capacity(n);
    let mut acked = Vec::with_capacity(n);
    for (t0, pending) in sent {
        let (r, acked_at) = pending.await.context("commit waiter")?;
        let r = r?;
        acked.push(acked_at.duration_since(t0).as_secs_f64());
        let (when, len) = at
            .get(&r.last_seq)
            .with_context(|| format!("transaction {} never applied", r.last_seq))?;
        ensure!(
            *len == LATENCY_TXN_CHANGES,
            "transaction {} applied with {len} changes",
            r.last_seq
        );
        ours.push(when.duration_since(t0).as_secs_f64());
    }
    for c in &applied_later {
        model.apply_changes(c);
    }
    let position = producer.flush().await?;
    let st = replica
        .wait_until(Duration::from_secs(30), |st| st.seq >= position.seq)
        .await
        .map_err(|st| anyhow!("latency consumer did not reach the end: {st:?}"))?;
    let view = replica.fresh_view(Duration::from_secs(30)).await;
    cancel.cancel();
    running.await.context("consumer task")??;
    producer.shutdown().await?;
    ensure!(
        position.digest == model.digest()
            && st.digest == model.digest().to_hex()
            && scratch_digest(view.state()) == model.digest(),
        "latency run: producer, consumer and model digests differ"
    );

    // Raw: messages as large as one of our envelopes, published at the same pace on a stream
    // of their own, received by an ordered consumer.
    let size = {
        let e = split_transaction(
            Lineage::default(),
            1,
            Digest::default(),
            now_ms(),
            txn(&mut rng),
            1 << 20,
        );
        e.iter()
            .map(|e| codec::encode_envelope(e).map(|b| b.len()))
            .sum::<Result<usize, _>>()?
            .max(16)
    };
    let raw_s = settings(url, "bench-latency-raw")?;
    let client = deltasync_nats::connect(&raw_s.nats).await?;
    let js = deltasync_nats::jetstream(client, &raw_s.nats);
    deltasync_nats::ensure_stream(&js, &raw_s).await?;
    let subject = names::subject(&raw_s.pipeline);
    let stream = js.get_stream(names::stream_name(&raw_s.pipeline)).await?;
    let reader = stream
        .create_consumer(consumer::pull::OrderedConfig::default())
        .await?;
    let mut msgs = reader.messages().await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<(u64, Instant)>>();
    let listener = tokio::spawn(async move {
        while let Some(m) = msgs.next().await {
            let item = m.map_err(|e| anyhow!("raw receive: {e}")).and_then(|m| {
                let idx = m
                    .payload
                    .get(..8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_le_bytes)
                    .context("raw message shorter than 8 bytes")?;
                Ok((idx, Instant::now()))
            });
            let failed = item.is_err();
            if tx.send(item).is_err() || failed {
                return;
            }
        }
    });
    let payload = |rng: &mut Rng, idx: u64| -> Bytes {
        let mut v = rng.bytes(size).to_vec();
        v[..8].copy_from_slice(&idx.to_le_bytes());
        Bytes::from(v)
    };
    // Warm-up: one message through before timing.
    js.publish(subject.clone(), payload(&mut rng, 0))
        .await?
        .await?;
    let warm = collect(
        &mut rx,
        1,
        tokio::time::Instant::now() + Duration::from_secs(30),
        "raw warm-up",
    )
    .await?;
    ensure!(
        warm.first().map(|w| w.0) == Some(0),
        "raw warm-up out of order"
    );
    let mut sent = Vec::with_capacity(n);
    let mut acks = Vec::with_capacity(n);
    let mut tick = tokio::time::interval(LATENCY_PERIOD);
    for idx in 1..=n as u64 {
        let p = payload(&mut rng, idx);
        tick.tick().await;
        let t0 = Instant::now();
        let ack = js.publish(subject.clone(), p).await?;
        acks.push(tokio::spawn(async move {
            let r = ack.await;
            (r, Instant::now())
        }));
        sent.push(t0);
    }
    let mut raw_acked = Vec::with_capacity(n);
    for (a, t0) in acks.into_iter().zip(&sent) {
        let (r, at) = a.await.context("raw ack waiter")?;
        r?;
        raw_acked.push(at.duration_since(*t0).as_secs_f64());
    }
    raw_acked.sort_by(f64::total_cmp);
    let (ra50, ra99) = (quantile(&raw_acked, 0.5), quantile(&raw_acked, 0.99));
    let got = collect(
        &mut rx,
        n,
        tokio::time::Instant::now() + Duration::from_secs(30),
        "raw messages",
    )
    .await?;
    listener.abort();
    let mut raw = Vec::with_capacity(n);
    for (i, (idx, when)) in got.into_iter().enumerate() {
        ensure!(
            idx == i as u64 + 1,
            "raw message {idx} arrived in place {}",
            i + 1
        );
        raw.push(when.duration_since(sent[i]).as_secs_f64());
    }

    ours.sort_by(f64::total_cmp);
    raw.sort_by(f64::total_cmp);
    acked.sort_by(f64::total_cmp);
    let (p50, p99) = (quantile(&ours, 0.5), quantile(&ours, 0.99));
    let (a50, a99) = (quantile(&acked, 0.5), quantile(&acked, 0.99));
    let (r50, r99) = (quantile(&raw, 0.5), quantile(&raw, 0.99));
    rows.push(Row {
        scenario: format!(
            "end-to-end latency, commit → applied, 10k changes/s ({n} txns of {LATENCY_TXN_CHANGES})"
        ),
        ours: format!(
            "p50 {}, p99 {} (commit → acked: p50 {}, p99 {})",
            secs(p50),
            secs(p99),
            secs(a50),
            secs(a99)
        ),
        baseline: format!(
            "p50 {}, p99 {} raw publish → receive of {} (publish → acked: p50 {}, p99 {})",
            secs(r50),
            secs(r99),
            bytes(size as f64),
            secs(ra50),
            secs(ra99)
        ),
        ratio: format!("p50 {:.1}×, p99 {:.1}× raw", p50 / r50, p99 / r99),
        target: "p50 ≤ 1.5 ms, p99 ≤ 5 ms".into(),
        met: p50 <= 0.0015 && p99 <= 0.005,
        check: format!("all {n} transactions applied with their changes; producer, consumer and model digests equal"),
        figures: json!({"p50_s": p50, "p99_s": p99, "max_s": ours.last(), "raw_p50_s": r50,
            "raw_p99_s": r99, "raw_max_s": raw.last(), "transactions": n, "message_bytes": size,
            "acked_p50_s": a50, "acked_p99_s": a99, "raw_acked_p50_s": ra50,
            "raw_acked_p99_s": ra99}),
    });
    Ok(())
}

/// Publishes chunks of `pool` (in turn) through `submit_many` until `done` (or `cap` changes,
/// which bounds what queues ahead of a slow engine), then flushes; returns the changes
/// published and the time until the flush returned. Records the chunks' order in `order` for
/// the model.
async fn pump(
    producer: &Producer,
    pool: &[Vec<Change>],
    order: &mut Vec<usize>,
    cap: usize,
    mut done: impl FnMut() -> bool,
) -> Result<(usize, Duration)> {
    let t = Instant::now();
    let mut n = 0;
    loop {
        let i = order.len() % pool.len();
        producer.submit_many(pool[i].clone()).await?;
        order.push(i);
        n += pool[i].len();
        if done() || n >= cap {
            break;
        }
    }
    producer.flush().await?;
    Ok((n, t.elapsed()))
}

/// Publish rate while a full snapshot of `keys` keys is written (through the producer's own
/// `snapshot` call) against the rate over a fixed window without one.
pub async fn snapshot_during(
    url: &str,
    sizes: Sizes,
    timing: Timing,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let s = settings(url, "bench-snapduring")?;
    let mut rng = Rng::new(19);
    let mut model = State::new(Lineage::default());
    let producer = Arc::new(Producer::start(s.clone()).await?);

    // The state: every key once.
    let mut i = 0;
    while i < sizes.keys {
        let n = (sizes.keys - i).min(INGEST_CHUNK);
        let chunk: Vec<Change> = (i..i + n)
            .map(|k| Change::put(key(k), rng.bytes(sizes.value_bytes)))
            .collect();
        i += n;
        model.apply_changes(&chunk);
        producer.submit_many(chunk).await?;
    }
    producer.flush().await?;
    let mut scratch = State::new(Lineage::default());
    let pool = put_chunks(
        &mut rng,
        32 * INGEST_CHUNK,
        INGEST_CHUNK,
        sizes,
        &mut scratch,
    );
    drop(scratch);
    let mut order = Vec::new();

    // Without a snapshot, for a fixed window.
    let cap = sizes.changes.max(INGEST_CHUNK).saturating_mul(4);
    let t = Instant::now();
    let (n_without, without) = pump(&producer, &pool, &mut order, cap, || {
        t.elapsed() >= timing.window
    })
    .await?;

    // During a full snapshot, for as long as it takes.
    let p = producer.clone();
    let snap = tokio::spawn(async move { p.snapshot().await });
    let (n_during, during) = pump(&producer, &pool, &mut order, cap, || snap.is_finished()).await?;
    // Bounded, so a snapshot that never completes fails the run instead of hanging it.
    let snapshot_wait =
        Duration::from_secs(120) + Duration::from_secs((sizes.keys / 10_000) as u64);
    let info = tokio::time::timeout(snapshot_wait, snap)
        .await
        .with_context(|| format!("the snapshot did not complete within {snapshot_wait:?}"))?
        .context("snapshot task")??;
    for &i in &order {
        model.apply_changes(&pool[i]);
    }
    let position = producer.flush().await?;
    let producer = Arc::into_inner(producer).context("producer still shared")?;
    producer.shutdown().await?;
    ensure!(
        position.digest == model.digest(),
        "the producer's digest differs from the model's"
    );

    // The snapshot loads back to the digest it records, which is the one the stream's
    // envelope at its position records. (Not `latest`: the clean shutdown wrote a final
    // snapshot of the envelopes published after it.)
    let client = deltasync_nats::connect(&s.nats).await?;
    let js = deltasync_nats::jetstream(client, &s.nats);
    let kv = store::bucket(&js, &s).await?;
    let lineage = Lineage::from_hex(&info.lineage)?;
    let manifest = store::read_manifest(
        &kv,
        &deltasync_core::snapshot::manifest_key(lineage, info.seq),
    )
    .await?;
    let loaded = store::load(&kv, manifest).await?;
    let recorded = Digest::from_hex(&info.digest)?;
    ensure!(
        loaded.manifest.seq == info.seq
            && loaded.state.digest() == recorded
            && scratch_digest(&loaded.state) == recorded
            && loaded.state.len() == sizes.keys,
        "the snapshot does not load back to the digest it records"
    );
    drop(loaded);
    let stream = js.get_stream(names::stream_name(&s.pipeline)).await?;
    let msg = stream.get_raw_message(info.stream_seq).await?;
    let env = codec::decode_envelope(&msg.payload)?;
    ensure!(
        env.seq == info.seq && env.is_last_part() && env.digest == recorded,
        "the envelope at the snapshot's position records another digest"
    );

    let r_without = n_without as f64 / without.as_secs_f64();
    let r_during = n_during as f64 / during.as_secs_f64();
    let rel = r_during / r_without;
    rows.push(Row {
        scenario: format!("publish rate during a full snapshot of {} keys", sizes.keys),
        ours: format!(
            "{} for {}",
            rate(r_during, "changes"),
            secs(during.as_secs_f64())
        ),
        baseline: format!(
            "{} without, for {}",
            rate(r_without, "changes"),
            secs(without.as_secs_f64())
        ),
        ratio: format!("{rel:.2}× without"),
        target: "publish rate during a snapshot ≥ 0.8× without".into(),
        met: rel >= 0.8,
        check: format!(
            "snapshot at {} ({}) loads back to its digest = the envelope's; final digest = model's",
            info.seq,
            bytes(info.total_bytes as f64)
        ),
        figures: json!({"during_changes_per_s": r_during, "without_changes_per_s": r_without,
            "during_s": during.as_secs_f64(), "without_s": without.as_secs_f64(),
            "snapshot_seq": info.seq, "snapshot_bytes": info.total_bytes}),
    });
    Ok(())
}
