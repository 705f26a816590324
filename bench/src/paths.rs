//! The paths users run, timed as they run them: the released `deltasync-producer` and
//! `deltasync-consumer` binaries as child processes (wall clock from spawn to exit, peak RSS),
//! next to the library call a Rust program would make and the plain NATS baseline, in one run
//! on one server. Each result is checked against a model state the benchmark builds itself.
//!
//! Talks to the benchmark's nats-server through the binaries, `deltasync_producer::Producer`,
//! `deltasync_nats` and, for the KV baseline, async-nats directly.
//!
//! ```text
//!  ingest    bench-user-ingest-bin  ← deltasync-producer ingest FILE   (N puts as NDJSON)
//!            bench-user-ingest-lib  ← Producer::start, submit_many, flush, shutdown
//!            then 1,000 more lines into the N-key pipeline through the binary (recovery first)
//!            bench_kv_ingest        ← kv::Store::put of the same keys and values (baseline)
//!  restart   bench-user-ingest-bin  ← 1 line (newest snapshot at the head: baseline)
//!                                   ← 10,000 lines, producer SIGKILLed after their receipts
//!                                   ← 1 line: recovers the snapshot + that tail (timed)
//!  snapshot  bench-user-ingest-bin  ← 1,000 lines, producer SIGKILLed after their receipts
//!                                   ← deltasync-producer snapshot (recover, full snapshot)
//!            bench_kv_snapshot_raw  ← the raw keys and values in 512 KiB publishes (baseline)
//!  bootstrap bench-user-ingest-bin  → deltasync-consumer run --ephemeral --once
//!                                   → store::load_latest (the component)
//!            bench_kv_user          → KV watch_with_history of the same keys (baseline)
//! ```

use crate::report::{bytes, rate, secs, Row};
use crate::scenarios::{kv_bucket, kv_watch_baseline, Sizes};
use anyhow::{bail, ensure, Context as _, Result};
use async_nats::jetstream;
use bytes::Bytes;
use deltasync_config::settings::Settings;
use deltasync_core::{codec, names, Change, Lineage, State};
use deltasync_nats::store;
use deltasync_producer::Producer;
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::json;
use std::io::{BufRead as _, Write as _};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Lines of the second, small ingest into a pipeline that already holds the state.
const TAIL_LINES: usize = 1_000;

/// KV puts awaiting their acknowledgement in the ingest's KV baseline (as the raw publish
/// baseline's window).
const KV_PUT_WINDOW: usize = 256;

/// Changes a killed producer leaves after its newest snapshot, for the restart.
const RESTART_TAIL: usize = 10_000;

/// Chunk publishes awaiting their acknowledgement in the snapshot's raw baseline (the store
/// writes blobs 32 at a time).
const RAW_CHUNK_WINDOW: usize = 64;

/// What one child process did.
#[derive(Debug)]
struct Ran {
    /// From spawn to exit.
    wall: Duration,
    /// The highest VmHWM read from /proc while it ran (a lower bound of its peak, sampled
    /// every 5 ms).
    peak_rss: u64,
    stdout: String,
    stderr: String,
}

/// Rounds of each side of the bootstrap rows, each reported by its fastest (RSS by its
/// largest): one run of a 0.5 s bootstrap varies by ~1.5× on this 2-core VM.
const BOOT_ROUNDS: usize = 3;

/// The directory holding this benchmark's binary, where `make bench` builds the others.
fn bin(name: &str) -> Result<PathBuf> {
    let dir = std::env::current_exe()?
        .parent()
        .context("the benchmark binary has no directory")?
        .to_path_buf();
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found: build it first (`cargo build --release -p deltasync-producer -p \
             deltasync-consumer`; `make bench` does)",
            path.display()
        );
    }
    Ok(path)
}

/// Runs `cmd` to its end on a blocking thread, sampling its peak RSS; fails on a non-zero exit
/// with its stderr.
async fn run(mut cmd: Command) -> Result<Ran> {
    tokio::task::spawn_blocking(move || {
        let what = format!("{cmd:?}");
        let t = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let status_path = format!("/proc/{}/status", child.id());
        let mut out = child.stdout.take().context("stdout")?;
        let mut err = child.stderr.take().context("stderr")?;
        let out_t = std::thread::spawn(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut out, &mut s).map(|_| s)
        });
        let err_t = std::thread::spawn(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut err, &mut s).map(|_| s)
        });
        let mut peak = 0u64;
        let status = loop {
            if let Some(kb) = std::fs::read_to_string(&status_path)
                .ok()
                .and_then(|s| vm_hwm_kb(&s))
            {
                peak = peak.max(kb * 1024);
            }
            if let Some(status) = child.try_wait()? {
                break status;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let wall = t.elapsed();
        let stdout = out_t
            .join()
            .map_err(|_| anyhow::anyhow!("stdout reader"))??;
        let stderr = err_t
            .join()
            .map_err(|_| anyhow::anyhow!("stderr reader"))??;
        ensure!(status.success(), "{what} exited with {status}: {stderr}");
        Ok(Ran {
            wall,
            peak_rss: peak,
            stdout,
            stderr,
        })
    })
    .await?
}

fn vm_hwm_kb(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A binary's command line for pipeline `s`.
pub(crate) fn command(binary: &str, s: &Settings) -> Result<Command> {
    let mut cmd = Command::new(bin(binary)?);
    cmd.args(["--nats-url", &s.nats.url, "--pipeline", &s.pipeline])
        .env("DELTASYNC_STREAM__MAX_MESSAGES", "-1")
        .env("DELTASYNC_STREAM__MAX_BYTES", "-1")
        .env("DELTASYNC_STREAM__STORAGE", "file")
        .env("DELTASYNC_LOG__FORMAT", "json")
        .env_remove("RUST_LOG");
    Ok(cmd)
}

/// `keys` puts of distinct keys as ingest lines (values: JSON strings, stored as their compact
/// JSON bytes, quotes included) and the state they make.
pub(crate) fn put_lines(keys: usize, value_bytes: usize, from: usize) -> (Vec<u8>, Vec<Change>) {
    let mut text = Vec::with_capacity(keys * (value_bytes + 40));
    let mut changes = Vec::with_capacity(keys);
    let hex_len = value_bytes.saturating_sub(2).max(1);
    for i in from..from + keys {
        let mut v = format!("{:016x}", (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        while v.len() < hex_len {
            v.push_str(&v.clone());
        }
        v.truncate(hex_len);
        let key = crate::scenarios::key(i);
        let _ = writeln!(text, r#"{{"op":"put","key":"{key}","value":"{v}"}}"#);
        changes.push(Change::put(key, Bytes::from(format!("\"{v}\""))));
    }
    (text, changes)
}

/// The digest the stream's last envelope records.
pub(crate) async fn head_digest(s: &Settings) -> Result<(Lineage, u64, deltasync_core::Digest)> {
    let client = deltasync_nats::connect(&s.nats).await?;
    let js = deltasync_nats::jetstream(client, &s.nats);
    let stream = js.get_stream(names::stream_name(&s.pipeline)).await?;
    let last = stream.cached_info().state.last_sequence;
    let msg = stream.direct_get(last).await?;
    let e = codec::decode_envelope(&msg.payload)?;
    Ok((e.lineage, e.seq, e.digest))
}

/// Ingest through the binary (an NDJSON file) against `Producer::submit_many` of the same
/// changes, both from start to a clean exit; then a small ingest into the full pipeline through
/// the binary, which recovers the state first. Returns the binary's pipeline (its state is
/// `sizes.keys` keys with a snapshot at the head) and its model.
pub async fn ingest(url: &str, sizes: Sizes, rows: &mut Vec<Row>) -> Result<(Settings, State)> {
    let work = tempfile::tempdir()?;
    let (text, changes) = put_lines(sizes.keys, sizes.value_bytes, 0);
    let mut model = State::new(Lineage::default());
    model.apply_changes(&changes);
    let raw_bytes = model.payload_bytes() as f64;
    let file = work.path().join("puts.ndjson");
    std::fs::write(&file, &text)?;
    drop(text);

    // The binary.
    let bin_s = crate::scenarios::settings(url, "bench-user-ingest-bin")?;
    let mut cmd = command("deltasync-producer", &bin_s)?;
    cmd.arg("ingest").arg(&file);
    let ran = run(cmd).await?;
    let (_, seq, digest) = head_digest(&bin_s).await?;
    ensure!(
        digest == model.digest(),
        "the binary's head digest differs from the model's"
    );

    // The library, as a Rust service would call it.
    let lib_s = crate::scenarios::settings(url, "bench-user-ingest-lib")?;
    let t = Instant::now();
    let producer = Producer::start(lib_s.clone()).await?;
    for chunk in changes.chunks(crate::pipeline::INGEST_CHUNK) {
        producer.submit_many(chunk.to_vec()).await?;
    }
    let position = producer.flush().await?;
    producer.shutdown().await?;
    let lib = t.elapsed();
    ensure!(
        position.digest == model.digest(),
        "the library's digest differs from the model's"
    );
    drop(changes);

    let (bin_t, lib_t) = (ran.wall.as_secs_f64(), lib.as_secs_f64());
    let ratio = bin_t / lib_t;
    rows.push(Row {
        scenario: format!(
            "ingest of {} puts through `deltasync-producer ingest FILE` (spawn to exit)",
            sizes.keys
        ),
        ours: format!(
            "{} ({}), peak RSS {} ({:.2}× raw)",
            secs(bin_t),
            rate(sizes.keys as f64 / bin_t, "changes"),
            bytes(ran.peak_rss as f64),
            ran.peak_rss as f64 / raw_bytes
        ),
        baseline: format!(
            "{} ({}) library: Producer::start, submit_many, flush, shutdown",
            secs(lib_t),
            rate(sizes.keys as f64 / lib_t, "changes")
        ),
        ratio: format!("{ratio:.2}× the library's time"),
        target: "within 1.5× of the library; RSS ≤ 2× raw".into(),
        met: ratio <= 1.5 && ran.peak_rss as f64 <= 2.0 * raw_bytes,
        check: format!("both heads' digest = model's ({seq} envelopes)"),
        figures: json!({"binary_s": bin_t, "library_s": lib_t, "peak_rss": ran.peak_rss,
            "raw_bytes": raw_bytes, "envelopes": seq}),
    });

    // The plain-NATS baseline: the same keys and values put into a KV bucket, pipelined.
    let client = deltasync_nats::connect(&bin_s.nats).await?;
    let js = deltasync_nats::jetstream(client, &bin_s.nats);
    let kv_t = kv_puts_baseline(&js, "bench_kv_ingest", &model).await?;
    rows.push(Row {
        scenario: format!(
            "ingest of {} puts through `deltasync-producer ingest FILE` (spawn to exit, final \
             snapshot included) against NATS KV puts",
            sizes.keys
        ),
        ours: format!(
            "{} ({})",
            secs(bin_t),
            rate(sizes.keys as f64 / bin_t, "changes")
        ),
        baseline: format!(
            "{} ({}) `kv::Store::put` of the same keys and values, {KV_PUT_WINDOW} in flight",
            secs(kv_t),
            rate(sizes.keys as f64 / kv_t, "puts")
        ),
        ratio: format!("{:.2}× the KV puts' time", bin_t / kv_t),
        target: "—".into(),
        met: true,
        check: format!(
            "the bucket holds {} messages, revisions 1..={0}; a sample of values reads back equal",
            sizes.keys
        ),
        figures: json!({"binary_s": bin_t, "kv_put_s": kv_t, "window": KV_PUT_WINDOW}),
    });

    // A short-lived ingest into the full pipeline: what one CLI call per batch costs.
    let (tail_text, tail_changes) = put_lines(TAIL_LINES, sizes.value_bytes, sizes.keys);
    model.apply_changes(&tail_changes);
    let tail_file = work.path().join("tail.ndjson");
    std::fs::write(&tail_file, &tail_text)?;
    let mut cmd = command("deltasync-producer", &bin_s)?;
    cmd.arg("ingest").arg(&tail_file);
    let tail = run(cmd).await?;
    let (_, _, digest) = head_digest(&bin_s).await?;
    ensure!(
        digest == model.digest(),
        "after the second ingest the head digest differs from the model's"
    );
    // The same lines on a producer already running (the library's pipeline, reopened first:
    // only the submit is timed).
    let producer = Producer::start(lib_s.clone()).await?;
    let t = Instant::now();
    producer.submit_many(tail_changes).await?;
    let position = producer.flush().await?;
    let running = t.elapsed();
    producer.shutdown().await?;
    ensure!(
        position.digest == model.digest(),
        "the library's second digest differs"
    );
    let (tail_t, running_t) = (tail.wall.as_secs_f64(), running.as_secs_f64());
    rows.push(Row {
        scenario: format!(
            "ingest of {TAIL_LINES} puts into a pipeline of {} keys through the binary \
             (recovers the state first)",
            sizes.keys
        ),
        ours: format!("{}, peak RSS {}", secs(tail_t), bytes(tail.peak_rss as f64)),
        baseline: format!(
            "{} on a running producer (submit_many + flush)",
            secs(running_t)
        ),
        ratio: format!("{:.0}× a running producer", tail_t / running_t),
        target: "(measured: a long-running `serve` or pipe avoids it)".into(),
        met: true,
        check: "head digest = model's".into(),
        figures: json!({"binary_s": tail_t, "running_s": running_t, "peak_rss": tail.peak_rss}),
    });
    Ok((bin_s, model))
}

/// Puts `state`'s keys and values into a new KV bucket with `kv::Store::put`, at most
/// [`KV_PUT_WINDOW`] puts awaiting their acknowledgement; returns the time from the first put
/// to the last acknowledgement. Checked: every put acknowledged, the bucket's stream holds one
/// message per key with the last revision equal to their count (no put lost or doubled), and
/// every thousandth key or so reads back its value.
async fn kv_puts_baseline(js: &jetstream::Context, bucket: &str, state: &State) -> Result<f64> {
    let kvb = kv_bucket(js, bucket).await?;
    let t = Instant::now();
    let mut puts = FuturesUnordered::new();
    let (mut acked, mut last_revision) = (0usize, 0u64);
    for (k, v) in state.iter() {
        if puts.len() >= KV_PUT_WINDOW {
            if let Some(r) = puts.next().await {
                last_revision = last_revision.max(r?);
                acked += 1;
            }
        }
        puts.push(kvb.put(k.to_owned(), Bytes::copy_from_slice(v)));
    }
    while let Some(r) = puts.next().await {
        last_revision = last_revision.max(r?);
        acked += 1;
    }
    let elapsed = t.elapsed().as_secs_f64();
    drop(puts);
    let messages = js
        .get_stream(format!("KV_{bucket}"))
        .await?
        .cached_info()
        .state
        .messages;
    ensure!(
        acked == state.len() && messages == state.len() as u64 && last_revision == messages,
        "{} KV puts: {acked} acknowledged, the bucket holds {messages} messages, last revision \
         {last_revision}",
        state.len()
    );
    let step = (state.len() / 1000).max(1);
    for (k, v) in state.iter().step_by(step) {
        let got = kvb.get(k).await?;
        ensure!(
            got.as_deref() == Some(v),
            "KV key {k} reads back {got:?}, it was put as {v:?}"
        );
    }
    js.delete_key_value(bucket).await?;
    Ok(elapsed)
}

/// Bootstrap of the ingested pipeline's `keys` keys through `deltasync-consumer run
/// --ephemeral --once`, against the loader alone (`store::load_latest`) and a plain KV watcher
/// of the same keys.
pub async fn bootstrap(s: &Settings, model: &State, rows: &mut Vec<Row>) -> Result<()> {
    let raw_bytes = model.payload_bytes() as f64;
    let (lineage, seq, _) = head_digest(s).await?;

    // The component: the snapshot loader alone, in this process.
    let client = deltasync_nats::connect(&s.nats).await?;
    let js = deltasync_nats::jetstream(client, &s.nats);
    let kv = deltasync_nats::ensure_bucket(&js, s).await?;
    let mut loader_rounds = Vec::new();
    for _ in 0..BOOT_ROUNDS {
        let t = Instant::now();
        let loaded = store::load_latest(&kv, s)
            .await?
            .context("the ingested pipeline has no snapshot")?;
        loader_rounds.push(t.elapsed().as_secs_f64());
        ensure!(
            loaded.state.digest() == model.digest() && loaded.manifest.seq == seq,
            "the snapshot at the head is not the model's state at envelope {seq}"
        );
        drop(loaded);
        deltasync_core::state::wait_for_background_frees();
    }

    // The loader again, alone in a process of its own, timed from spawn to exit as the binary
    // is: its heap starts cold (every entry's page faulted in and zeroed) as the binary's does,
    // where the rounds above reuse the memory the previous round freed.
    let mut loader_spawned = Vec::new();
    for _ in 0..BOOT_ROUNDS {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("--loader-probe").args([&s.nats.url, &s.pipeline]);
        let ran = run(cmd).await?;
        ensure!(
            ran.stdout.trim() == format!("{} {seq}", model.digest()),
            "the loader probe printed {:?}, the head is {seq} of digest {}",
            ran.stdout.trim(),
            model.digest()
        );
        loader_spawned.push(ran);
    }

    // The library, as a Rust service runs it: a `Consumer` with `once`, in this process.
    let mut library_rounds = Vec::new();
    for round in 0..BOOT_ROUNDS {
        let consumer = deltasync_consumer::Consumer::new(
            s.clone(),
            deltasync_consumer::Options {
                id: format!("bench-bootstrap-library-{round}"),
                storage: deltasync_consumer::Storage::Memory,
                http: None,
                once: true,
            },
        )?;
        let replica = consumer.replica();
        let t = Instant::now();
        let outcome = consumer
            .run(tokio_util::sync::CancellationToken::new())
            .await?;
        library_rounds.push(t.elapsed().as_secs_f64());
        let view = replica.view();
        ensure!(
            outcome.cursor.seq == seq && view.seq() == seq && view.digest() == model.digest(),
            "the library consumer stopped at {:?} with a view at {} of digest {}, the head is \
             envelope {seq} of digest {}",
            outcome.cursor,
            view.seq(),
            view.digest(),
            model.digest()
        );
        drop((view, replica));
        // Its state is freed on a background thread: not while the next round is timed.
        deltasync_core::state::wait_for_background_frees();
    }

    // The binary, as a user runs it.
    let mut binary_rounds = Vec::new();
    for round in 0..BOOT_ROUNDS {
        let mut cmd = command("deltasync-consumer", s)?;
        let id = format!("bench-bootstrap-{round}");
        cmd.args(["run", "--ephemeral", "--once", "--id", &id]);
        let ran = run(cmd).await?;
        let logs = format!("{}{}", ran.stdout, ran.stderr);
        let stopped = logged(&logs, "Consumer stopped; replica committed")
            .context("the consumer did not log that it stopped with its replica committed")?;
        let field = |k: &str| stopped.pointer(&format!("/fields/{k}")).cloned();
        ensure!(
            field("seq") == Some(json!(seq))
                && field("lineage") == Some(json!(lineage.to_string())),
            "the consumer stopped at {stopped}, the head is {lineage}:{seq}"
        );
        binary_rounds.push(ran);
    }

    // A durable replica through the binary: its bootstrap (which writes the local snapshot),
    // then a restart from the data directory, each with `--once`.
    let data_dir = tempfile::tempdir()?;
    let durable_run = || -> Result<Command> {
        let mut cmd = command("deltasync-consumer", s)?;
        cmd.args(["run", "--once", "--id", "bench-restart", "--data-dir"])
            .arg(data_dir.path());
        Ok(cmd)
    };
    let durable_boot = run(durable_run()?).await?;
    let restart = run(durable_run()?).await?;
    let restart_logs = format!("{}{}", restart.stdout, restart.stderr);
    let loaded = logged(&restart_logs, "Local replica loaded")
        .context("the restarted consumer did not load its local replica")?;
    let stopped_again = logged(&restart_logs, "Consumer stopped; replica committed")
        .context("the restarted consumer did not stop with its replica committed")?;
    ensure!(
        loaded.pointer("/fields/entries") == Some(&json!(model.len()))
            && stopped_again.pointer("/fields/seq") == Some(&json!(seq))
            && logged(
                &restart_logs,
                "Replica restored from the snapshot and verified"
            )
            .is_none(),
        "the restart did not resume its {} local keys at {seq} without a snapshot download: \
         loaded {loaded}, stopped {stopped_again}",
        model.len()
    );
    drop(data_dir);

    // The baseline: the same keys in a plain KV bucket, read back with watch_with_history.
    let kv_rounds = kv_watch_baseline(&js, "bench_kv_user", model, BOOT_ROUNDS).await?;

    let fastest = |r: &[f64]| r.iter().copied().fold(f64::INFINITY, f64::min);
    let (loader, library, baseline) = (
        fastest(&loader_rounds),
        fastest(&library_rounds),
        fastest(&kv_rounds),
    );
    let binary_s: Vec<f64> = binary_rounds.iter().map(|r| r.wall.as_secs_f64()).collect();
    let ours = fastest(&binary_s);
    let spawned_s: Vec<f64> = loader_spawned
        .iter()
        .map(|r| r.wall.as_secs_f64())
        .collect();
    let loader_cold = fastest(&spawned_s);
    let loader_cold_rss = loader_spawned.iter().map(|r| r.peak_rss).max().unwrap_or(0);
    // The largest peak of the rounds: memory is judged by the worst, time by the best.
    let peak_rss = binary_rounds.iter().map(|r| r.peak_rss).max().unwrap_or(0);
    let speedup = baseline / ours;
    rows.push(Row {
        scenario: format!(
            "bootstrap of {} keys through `deltasync-consumer run --ephemeral --once` \
             (spawn to exit; each side fastest of {BOOT_ROUNDS} rounds, RSS the largest)",
            model.len()
        ),
        ours: format!(
            "{}, peak RSS {} ({:.2}× raw); the loader alone, spawned {} ({:.2}×, RSS {}), \
             in-process {} ({:.2}×)",
            secs(ours),
            bytes(peak_rss as f64),
            peak_rss as f64 / raw_bytes,
            secs(loader_cold),
            ours / loader_cold,
            bytes(loader_cold_rss as f64),
            secs(loader),
            ours / loader
        ),
        baseline: format!("{} (KV watch_with_history)", secs(baseline)),
        ratio: format!("{speedup:.1}× faster"),
        target: "≥ 5× the KV watcher; ≤ 1.3× the loader (spawned); RSS ≤ 2× raw".into(),
        met: speedup >= 5.0 && ours <= 1.3 * loader_cold && peak_rss as f64 <= 2.0 * raw_bytes,
        check: format!("snapshot digest = model's; the consumer stopped at {lineage}:{seq}"),
        figures: json!({"binary_s": ours, "loader_s": loader, "kv_watch_s": baseline,
            "peak_rss": peak_rss, "raw_bytes": raw_bytes, "binary_rounds_s": binary_s,
            "binary_rounds_peak_rss": binary_rounds.iter().map(|r| r.peak_rss).collect::<Vec<_>>(),
            "loader_rounds_s": loader_rounds, "kv_watch_rounds_s": kv_rounds,
            "loader_spawned_s": loader_cold, "loader_spawned_rounds_s": spawned_s,
            "loader_spawned_peak_rss": loader_cold_rss}),
    });
    rows.push(Row {
        scenario: format!(
            "bootstrap of {} keys through the library (`Consumer` with `once`, in-process, \
             memory; fastest of {BOOT_ROUNDS} rounds)",
            model.len()
        ),
        ours: format!(
            "{}; the loader alone {} ({:.2}×)",
            secs(library),
            secs(loader),
            library / loader
        ),
        baseline: format!("{} (KV watch_with_history)", secs(baseline)),
        ratio: format!("{:.1}× faster", baseline / library),
        target: "≥ 5× the KV watcher; ≤ 1.3× the loader".into(),
        met: baseline / library >= 5.0 && library <= 1.3 * loader,
        check: format!("the consumer stopped at {lineage}:{seq}, its view's digest = the model's"),
        figures: json!({"library_s": library, "loader_s": loader, "kv_watch_s": baseline,
            "library_rounds_s": library_rounds}),
    });
    let (boot_s, restart_s) = (durable_boot.wall.as_secs_f64(), restart.wall.as_secs_f64());
    rows.push(Row {
        scenario: format!(
            "restart of a durable {}-key replica through `deltasync-consumer run --data-dir D \
             --once` (local snapshot + log, spawn to exit)",
            model.len()
        ),
        ours: format!(
            "{}, peak RSS {} ({:.2}× raw)",
            secs(restart_s),
            bytes(restart.peak_rss as f64),
            restart.peak_rss as f64 / raw_bytes
        ),
        baseline: format!(
            "{} (its durable bootstrap from the bucket, local snapshot written)",
            secs(boot_s)
        ),
        ratio: format!("{:.2}×", restart_s / boot_s),
        target: "≤ its bootstrap time".into(),
        met: restart_s <= boot_s,
        check: format!(
            "the restart loaded {} keys from disk and stopped at {lineage}:{seq} with no \
             snapshot download",
            model.len()
        ),
        figures: json!({"restart_s": restart_s, "durable_bootstrap_s": boot_s,
            "restart_peak_rss": restart.peak_rss, "durable_bootstrap_peak_rss": durable_boot.peak_rss}),
    });
    Ok(())
}

/// `--loader-probe URL PIPELINE`: the snapshot loader alone (`store::load_latest`), in a
/// process of its own; prints the loaded state's digest and sequence.
pub fn loader_probe(url: &str, pipeline: &str) -> Result<()> {
    let s = crate::scenarios::settings(url, pipeline)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let loaded = rt.block_on(async {
        let client = deltasync_nats::connect(&s.nats).await?;
        let js = deltasync_nats::jetstream(client, &s.nats);
        let kv = deltasync_nats::ensure_bucket(&js, &s).await?;
        store::load_latest(&kv, &s)
            .await?
            .context("the pipeline has no snapshot")
    })?;
    println!("{} {}", loaded.state.digest(), loaded.manifest.seq);
    // Exit as the consumer does, without freeing the state entry by entry.
    std::process::exit(0)
}

/// Publishes `text` (`lines` NDJSON lines) through `deltasync-producer ingest - --receipts`
/// and kills the process (SIGKILL) as soon as the receipt of its last line is printed (it is
/// printed once durable), its stdin still open: the producer stops with those envelopes after
/// its newest snapshot, as a crash leaves them (a clean exit would write a final snapshot, and
/// no setting turns that off). Not timed.
async fn ingest_then_kill(s: &Settings, text: Vec<u8>, lines: u64) -> Result<()> {
    let mut cmd = command("deltasync-producer", s)?;
    cmd.args(["ingest", "-", "--receipts"]);
    tokio::task::spawn_blocking(move || {
        let what = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let mut stdin = child.stdin.take().context("stdin")?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut err = child.stderr.take().context("stderr")?;
        let err_t = std::thread::spawn(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut err, &mut s).map(|_| s)
        });
        // Written on its own thread (the pipe holds 64 KiB); returns stdin so that it stays
        // open until the kill.
        let writer = std::thread::spawn(move || {
            stdin.write_all(&text)?;
            stdin.flush()?;
            std::io::Result::Ok(stdin)
        });
        let mut done = false;
        for line in std::io::BufReader::new(stdout).lines() {
            let receipt: serde_json::Value = serde_json::from_str(&line?)?;
            if receipt["last_line"].as_u64() >= Some(lines) {
                done = true;
                break;
            }
        }
        child.kill()?;
        child.wait()?;
        let written = writer.join().map_err(|_| anyhow::anyhow!("stdin writer"))?;
        let stderr = err_t
            .join()
            .map_err(|_| anyhow::anyhow!("stderr reader"))??;
        ensure!(
            done,
            "{what} ended before the receipt of line {lines} (stdin: {:?}): {stderr}",
            written.err()
        );
        Ok(())
    })
    .await?
}

/// The latest snapshot's envelope sequence.
async fn latest_snapshot_seq(s: &Settings) -> Result<u64> {
    let client = deltasync_nats::connect(&s.nats).await?;
    let js = deltasync_nats::jetstream(client, &s.nats);
    let kv = deltasync_nats::ensure_bucket(&js, s).await?;
    Ok(store::latest_manifest(&kv)
        .await?
        .context("the pipeline has no snapshot")?
        .seq)
}

/// A one-line `deltasync-producer ingest FILE` of the next fresh key into pipeline `s`, run
/// to its exit; `model` gets the line. Its envelope's digest is computed on the state the
/// producer recovered, so the head digest equal to the model's checks the recovery.
async fn one_line_ingest(s: &Settings, model: &mut State, value_bytes: usize) -> Result<Ran> {
    let work = tempfile::tempdir()?;
    let (text, changes) = put_lines(1, value_bytes, model.len());
    let file = work.path().join("one.ndjson");
    std::fs::write(&file, &text)?;
    let mut cmd = command("deltasync-producer", s)?;
    cmd.arg("ingest").arg(&file);
    let ran = run(cmd).await?;
    model.apply_changes(&changes);
    let (_, _, digest) = head_digest(s).await?;
    ensure!(
        digest == model.digest(),
        "after a one-line ingest the head digest differs from the model's"
    );
    Ok(ran)
}

/// A producer restart over envelopes its newest snapshot does not cover: a producer killed
/// after publishing [`RESTART_TAIL`] changes into the ingested pipeline, then a one-line
/// `deltasync-producer ingest` that recovers the snapshot plus that tail and exits (spawn to
/// exit); against the same one-line ingest with no tail, run once before and once after it.
/// `model` is the
/// pipeline's state (the ingested keys are `0..model.len()`), and gets the new lines.
pub async fn restart(
    s: &Settings,
    model: &mut State,
    sizes: Sizes,
    rows: &mut Vec<Row>,
) -> Result<()> {
    // The baseline: a restart whose newest snapshot is at the head.
    ensure!(
        latest_snapshot_seq(s).await? == head_digest(s).await?.1,
        "the ingested pipeline's newest snapshot is not at its head"
    );
    let clean = one_line_ingest(s, model, sizes.value_bytes).await?;

    // The tail, left by a killed producer.
    let (text, changes) = put_lines(RESTART_TAIL, sizes.value_bytes, model.len());
    ingest_then_kill(s, text, RESTART_TAIL as u64).await?;
    model.apply_changes(&changes);
    drop(changes);
    let (_, head, digest) = head_digest(s).await?;
    let covered = latest_snapshot_seq(s).await?;
    ensure!(
        digest == model.digest() && covered < head,
        "the killed producer left head {head} (digest equal to the model's: {}) with the newest \
         snapshot at {covered}: no uncovered tail",
        digest == model.digest()
    );
    let (keys_before, digest_before) = (model.len(), model.digest());
    let raw_bytes = model.payload_bytes() as f64;

    // The restart: recover the snapshot, replay the tail, publish one line, final snapshot.
    let ran = one_line_ingest(s, model, sizes.value_bytes).await?;
    let logs = format!("{}{}", ran.stdout, ran.stderr);
    let recovered = logged(&logs, "Recovered the pipeline; continuing its lineage")
        .context("the restarted producer did not log its recovery")?;
    let field = |k: &str| recovered.pointer(&format!("/fields/{k}")).cloned();
    ensure!(
        field("seq") == Some(json!(head))
            && field("snapshot_seq") == Some(json!(covered))
            && field("envelopes_after_snapshot") == Some(json!(head - covered))
            && field("keys") == Some(json!(keys_before))
            && field("digest") == Some(json!(digest_before.to_string())),
        "the restart recovered {recovered}; expected {keys_before} keys at {head} from the \
         snapshot at {covered} plus {} envelopes, digest {digest_before}",
        head - covered
    );

    // The baseline again, now that the restart's final snapshot is at the head: the faster
    // of the two bracketing runs (the first one alone was slower than the restart in each of
    // 4 runs here; why is not pinned down).
    let clean_after = one_line_ingest(s, model, sizes.value_bytes).await?;
    let clean = if clean_after.wall < clean.wall {
        clean_after
    } else {
        clean
    };
    let (ours, base) = (ran.wall.as_secs_f64(), clean.wall.as_secs_f64());
    rows.push(Row {
        scenario: format!(
            "producer restart over {RESTART_TAIL} changes after its newest snapshot ({} keys): \
             one-line `deltasync-producer ingest` after a killed one (spawn to exit)",
            keys_before
        ),
        ours: format!(
            "{}, peak RSS {} ({:.2}× raw); {} envelopes replayed",
            secs(ours),
            bytes(ran.peak_rss as f64),
            ran.peak_rss as f64 / raw_bytes,
            head - covered
        ),
        baseline: format!(
            "{}, peak RSS {} (the same one-line ingest with the newest snapshot at the head; \
             the faster of one run before and one after)",
            secs(base),
            bytes(clean.peak_rss as f64)
        ),
        ratio: format!("{:.2}× with no tail", ours / base),
        target: "—".into(),
        met: true,
        check: format!(
            "recovery logged {keys_before} keys at {head} with the model's digest; head digest \
             after the line = model's"
        ),
        figures: json!({"binary_s": ours, "no_tail_s": base, "peak_rss": ran.peak_rss,
            "no_tail_peak_rss": clean.peak_rss, "raw_bytes": raw_bytes,
            "envelopes_replayed": head - covered, "tail_changes": RESTART_TAIL}),
    });
    Ok(())
}

/// `deltasync-producer snapshot` of the ingested pipeline (after a killed producer left
/// [`TAIL_LINES`] changes uncovered, so that it writes one): it recovers the state and writes a
/// full snapshot (spawn to exit); against the state's raw keys and values written in chunks of
/// the snapshot's chunk size as plain pipelined publishes into a KV bucket — what writing that
/// many bytes to NATS costs, with no recovery and no encoding.
pub async fn snapshot(
    s: &Settings,
    model: &mut State,
    sizes: Sizes,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let (text, changes) = put_lines(TAIL_LINES, sizes.value_bytes, model.len());
    ingest_then_kill(s, text, TAIL_LINES as u64).await?;
    model.apply_changes(&changes);
    drop(changes);
    let (_, head, digest) = head_digest(s).await?;
    ensure!(
        digest == model.digest() && latest_snapshot_seq(s).await? < head,
        "the killed producer did not leave an uncovered tail with the model's digest"
    );
    let raw_bytes = model.payload_bytes() as f64;

    let mut cmd = command("deltasync-producer", s)?;
    cmd.args(["snapshot", "--json"]);
    let ran = run(cmd).await?;
    let out: serde_json::Value = serde_json::from_str(
        ran.stdout
            .lines()
            .last()
            .context("`snapshot --json` printed nothing")?,
    )?;
    let snap = &out["snapshot"];
    ensure!(
        out["written"] == json!(true)
            && snap["seq"] == json!(head)
            && snap["entries"] == json!(model.len()),
        "`snapshot` printed {out}; expected a snapshot written at {head} of {} keys",
        model.len()
    );
    let total = snap["total_bytes"].as_u64().unwrap_or(0) as f64;
    let written = snap["bytes_written"].as_u64().unwrap_or(0) as f64;

    // Check: the bucket's latest snapshot loads back to the model's state.
    let client = deltasync_nats::connect(&s.nats).await?;
    let js = deltasync_nats::jetstream(client, &s.nats);
    let kv = deltasync_nats::ensure_bucket(&js, s).await?;
    let loaded = store::load_latest(&kv, s)
        .await?
        .context("no snapshot after `snapshot`")?;
    ensure!(
        loaded.manifest.seq == head && loaded.state.digest() == model.digest(),
        "the snapshot written by `snapshot` does not load back to the model's state at {head}"
    );
    drop(loaded);
    deltasync_core::state::wait_for_background_frees();

    // The baseline: the state's keys and values, concatenated into chunks of the snapshot's
    // chunk size, published to a KV bucket's subjects.
    let chunk = s.snapshot.chunk_target_bytes.max(1);
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut buf: Vec<u8> = Vec::with_capacity(chunk + 1024);
    for (k, v) in model.iter() {
        buf.extend_from_slice(k.as_bytes());
        buf.extend_from_slice(v);
        if buf.len() >= chunk {
            chunks.push(Bytes::from(std::mem::replace(
                &mut buf,
                Vec::with_capacity(chunk + 1024),
            )));
        }
    }
    if !buf.is_empty() {
        chunks.push(Bytes::from(buf));
    }
    let bucket = "bench_kv_snapshot_raw";
    kv_bucket(&js, bucket).await?;
    let t = Instant::now();
    let mut acks = FuturesUnordered::new();
    for (i, c) in chunks.iter().enumerate() {
        if acks.len() >= RAW_CHUNK_WINDOW {
            if let Some(r) = acks.next().await {
                let _: jetstream::publish::PublishAck = r?;
            }
        }
        acks.push(std::future::IntoFuture::into_future(
            js.publish(format!("$KV.{bucket}.c{i}"), c.clone()).await?,
        ));
    }
    while let Some(r) = acks.next().await {
        r?;
    }
    let raw_t = t.elapsed().as_secs_f64();
    let info = js.get_stream(format!("KV_{bucket}")).await?;
    let stored = &info.cached_info().state;
    let sent: usize = chunks.iter().map(Bytes::len).sum();
    ensure!(
        stored.messages == chunks.len() as u64 && sent as f64 >= raw_bytes,
        "the raw baseline's bucket holds {} messages, {} were published ({sent} bytes for \
         {raw_bytes} raw)",
        stored.messages,
        chunks.len()
    );
    js.delete_key_value(bucket).await?;
    let n_chunks = chunks.len();
    drop(chunks);

    let ours = ran.wall.as_secs_f64();
    rows.push(Row {
        scenario: format!(
            "snapshot of {} keys through `deltasync-producer snapshot` (recovers the state, \
             writes a full snapshot; spawn to exit)",
            model.len()
        ),
        ours: format!(
            "{}, {} written, peak RSS {} ({:.2}× raw)",
            secs(ours),
            bytes(written),
            bytes(ran.peak_rss as f64),
            ran.peak_rss as f64 / raw_bytes
        ),
        baseline: format!(
            "{} ({}/s): the raw keys and values, {} chunks of {}, plain publishes to a KV \
             bucket, window {RAW_CHUNK_WINDOW}",
            secs(raw_t),
            bytes(sent as f64 / raw_t),
            bytes(sent as f64),
            bytes(chunk as f64)
        ),
        ratio: format!("{:.1}× the raw write", ours / raw_t),
        target: "—".into(),
        met: true,
        check: format!(
            "snapshot at {head} of {} keys loads back to the model's digest",
            model.len()
        ),
        figures: json!({"binary_s": ours, "raw_write_s": raw_t, "peak_rss": ran.peak_rss,
            "raw_bytes": raw_bytes, "snapshot_total_bytes": total, "snapshot_bytes_written": written,
            "raw_chunks": n_chunks}),
    });
    Ok(())
}

/// The JSON log line whose message is `message`, if `logs` has one.
fn logged(logs: &str, message: &str) -> Option<serde_json::Value> {
    logs.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.pointer("/fields/message").and_then(|m| m.as_str()) == Some(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_hwm_is_read_in_kib() {
        let status = "Name:\tx\nVmPeak:\t  2048 kB\nVmHWM:\t    1234 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(vm_hwm_kb(status), Some(1234));
        assert_eq!(vm_hwm_kb("Name:\tx\n"), None);
    }

    #[test]
    fn put_lines_hold_the_values_the_model_stores() {
        let (text, changes) = put_lines(3, 10, 5);
        let lines: Vec<&str> = std::str::from_utf8(&text).unwrap_or("").lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(changes.len(), 3);
        for (line, c) in lines.iter().zip(&changes) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
            assert_eq!(v["op"], "put");
            let stored = serde_json::to_vec(&v["value"]).unwrap_or_default();
            assert_eq!(Change::put(v["key"].as_str().unwrap_or(""), stored), *c);
        }
    }
}
