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
//!  bootstrap bench-user-ingest-bin  → deltasync-consumer run --ephemeral --once
//!                                   → store::load_latest (the component)
//!            bench_kv_user          → KV watch_with_history of the same keys (baseline)
//! ```

use crate::report::{bytes, rate, secs, Row};
use crate::scenarios::{kv_watch_baseline, Sizes};
use anyhow::{bail, ensure, Context as _, Result};
use bytes::Bytes;
use deltasync_config::settings::Settings;
use deltasync_core::{codec, names, Change, Lineage, State};
use deltasync_nats::store;
use deltasync_producer::Producer;
use serde_json::json;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Lines of the second, small ingest into a pipeline that already holds the state.
const TAIL_LINES: usize = 1_000;

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
    let t = Instant::now();
    let loaded = store::load_latest(&kv, s)
        .await?
        .context("the ingested pipeline has no snapshot")?;
    let loader = t.elapsed().as_secs_f64();
    ensure!(
        loaded.state.digest() == model.digest() && loaded.manifest.seq == seq,
        "the snapshot at the head is not the model's state at envelope {seq}"
    );
    drop(loaded);

    // The library, as a Rust service runs it: a `Consumer` with `once`, in this process.
    let consumer = deltasync_consumer::Consumer::new(
        s.clone(),
        deltasync_consumer::Options {
            id: "bench-bootstrap-library".into(),
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
    let library = t.elapsed().as_secs_f64();
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
    // Its state is freed on a background thread: not while the binary is timed.
    deltasync_core::state::wait_for_background_frees();

    // The binary, as a user runs it.
    let mut cmd = command("deltasync-consumer", s)?;
    cmd.args(["run", "--ephemeral", "--once", "--id", "bench-bootstrap"]);
    let ran = run(cmd).await?;
    let logs = format!("{}{}", ran.stdout, ran.stderr);
    let stopped = logged(&logs, "Consumer stopped; replica committed")
        .context("the consumer did not log that it stopped with its replica committed")?;
    let field = |k: &str| stopped.pointer(&format!("/fields/{k}")).cloned();
    ensure!(
        field("seq") == Some(json!(seq)) && field("lineage") == Some(json!(lineage.to_string())),
        "the consumer stopped at {stopped}, the head is {lineage}:{seq}"
    );

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
    let baseline = kv_watch_baseline(&js, "bench_kv_user", model).await?;

    let ours = ran.wall.as_secs_f64();
    let speedup = baseline / ours;
    rows.push(Row {
        scenario: format!(
            "bootstrap of {} keys through `deltasync-consumer run --ephemeral --once` \
             (spawn to exit)",
            model.len()
        ),
        ours: format!(
            "{}, peak RSS {} ({:.2}× raw); the loader alone {} ({:.2}×)",
            secs(ours),
            bytes(ran.peak_rss as f64),
            ran.peak_rss as f64 / raw_bytes,
            secs(loader),
            ours / loader
        ),
        baseline: format!("{} (KV watch_with_history)", secs(baseline)),
        ratio: format!("{speedup:.1}× faster"),
        target: "≥ 5× the KV watcher; ≤ 1.3× the loader; RSS ≤ 2× raw".into(),
        met: speedup >= 5.0 && ours <= 1.3 * loader && ran.peak_rss as f64 <= 2.0 * raw_bytes,
        check: format!("snapshot digest = model's; the consumer stopped at {lineage}:{seq}"),
        figures: json!({"binary_s": ours, "loader_s": loader, "kv_watch_s": baseline,
            "peak_rss": ran.peak_rss, "raw_bytes": raw_bytes}),
    });
    rows.push(Row {
        scenario: format!(
            "bootstrap of {} keys through the library (`Consumer` with `once`, in-process, \
             memory)",
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
        figures: json!({"library_s": library, "loader_s": loader, "kv_watch_s": baseline}),
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
