//! Measures the consumer's apply throughput (changes/s) in memory and durable, and its memory
//! use, against a private nats-server.
//!
//! Talks to a nats-server it starts itself (`deltasync-testkit`), publishes a backlog of
//! envelopes with the shared protocol pieces, then catches a consumer up on it with `once`:
//! in-process (the library, memory then the durable local log), and as child processes of the
//! `deltasync-consumer` binary (peak RSS from /proc).
//!
//! ```text
//! cargo build --release -p deltasync-consumer --bins --examples
//! target/release/examples/apply_throughput --changes 2000000 --per-envelope 4096 --keys 1000000
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use deltasync_config::settings::{Settings, StorageKind};
use deltasync_consumer::{Consumer, Options, Storage};
use deltasync_core::codec::{decode_envelope, encode_envelope};
use deltasync_core::envelope::split_transaction;
use deltasync_core::{names, Change, Lineage, State};
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Applies generated envelopes through the consumer's engine and reports changes/s.
#[derive(clap::Parser)]
struct Args {
    /// Changes to apply.
    #[arg(long, default_value_t = 2_000_000)]
    changes: usize,
    /// Changes per envelope.
    #[arg(long, default_value_t = 4096)]
    per_envelope: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 1_000_000)]
    keys: usize,
    /// Bytes per value.
    #[arg(long, default_value_t = 64)]
    value_bytes: usize,
}

fn args() -> Args {
    <Args as clap::Parser>::parse()
}

/// xorshift, for reproducible keys and values.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn rss_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

fn main() {
    let a = args();
    let server = deltasync_testkit::NatsServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut settings = Settings {
        pipeline: format!("throughput-{}", std::process::id()),
        ..Settings::default()
    };
    settings.nats.url = server.url();
    settings.stream.storage = StorageKind::File;
    settings.stream.max_messages = -1;
    settings.stream.max_bytes = -1;
    settings.stream.max_age = Duration::ZERO;
    settings.snapshot.every_envelopes = 0;
    settings.snapshot.every = Duration::ZERO;
    settings.validate().unwrap();

    println!(
        "backlog: {} changes in envelopes of {}, over {} keys, {}-byte values",
        a.changes, a.per_envelope, a.keys, a.value_bytes
    );
    let (payloads, expected) = rt.block_on(publish(&settings, &a));
    let wire: usize = payloads.iter().map(|p| p.len()).sum();
    println!(
        "published {} envelopes, {:.1} MB; final digest {}",
        payloads.len(),
        wire as f64 / 1e6,
        &expected.1.to_hex()[..16]
    );

    // The core alone, split: decode only, then State::apply only (pre-decoded), then both.
    let t = Instant::now();
    let decoded: Vec<_> = payloads
        .iter()
        .map(|p| decode_envelope(p).unwrap())
        .collect();
    let decode = t.elapsed();
    let mut state = State::new(expected.0);
    let t = Instant::now();
    for env in &decoded {
        state.apply(env).unwrap();
    }
    let apply = t.elapsed();
    drop(decoded);
    drop(state);
    let t = Instant::now();
    let n = a.changes.min(200_000);
    let mut sink = 0u8;
    for i in 0..n {
        let k = format!("instrument-{i:08}");
        sink ^= deltasync_core::digest::entry_hash(&k, &[b'v'; 64]).0[0];
    }
    let hash = t.elapsed();
    println!(
        "  decode only:                {:>6.2} s  {:>10.0} changes/s",
        decode.as_secs_f64(),
        a.changes as f64 / decode.as_secs_f64()
    );
    println!(
        "  State::apply only:          {:>6.2} s  {:>10.0} changes/s",
        apply.as_secs_f64(),
        a.changes as f64 / apply.as_secs_f64()
    );
    println!(
        "  entry_hash (SHA-256) only:  {:>6.2} µs per entry ({sink})",
        hash.as_secs_f64() * 1e6 / n as f64
    );
    let t = Instant::now();
    let mut state = State::new(expected.0);
    for p in &payloads {
        let env = decode_envelope(p).unwrap();
        state.apply(&env).unwrap();
    }
    let core = t.elapsed();
    assert_eq!(state.digest(), expected.1);
    println!(
        "core decode+apply:            {:>6.2} s  {:>10.0} changes/s  ({} keys)",
        core.as_secs_f64(),
        a.changes as f64 / core.as_secs_f64(),
        state.len()
    );
    drop(state);
    drop(payloads);

    for durable in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let storage = if durable {
            Storage::Durable(dir.path().to_path_buf())
        } else {
            Storage::Memory
        };
        let options = Options {
            id: format!("bench-{durable}"),
            storage,
            http: None,
            once: true,
        };
        let consumer = Consumer::new(settings.clone(), options).unwrap();
        let replica = consumer.replica();
        let t = Instant::now();
        let outcome = rt.block_on(consumer.run(CancellationToken::new())).unwrap();
        let took = t.elapsed();
        assert_eq!(outcome.cursor.seq, expected.2);
        assert_eq!(outcome.cursor.digest, expected.1);
        let s = replica.status();
        // What the data directory holds: the local snapshot and the logs.
        let file: u64 = std::fs::read_dir(dir.path())
            .map(|d| {
                d.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        println!(
            "consumer {:<8} (in-process): {:>6.2} s  {:>10.0} changes/s  ({} envelopes, {} keys{})",
            if durable { "durable" } else { "memory" },
            took.as_secs_f64(),
            s.changes_applied as f64 / took.as_secs_f64(),
            s.envelopes_applied,
            s.entries,
            if durable {
                format!(", data dir {:.1} MB", file as f64 / 1e6)
            } else {
                String::new()
            }
        );
    }

    // Peak memory of the binary catching up, as a separate process.
    let bin = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.join("deltasync-consumer")))
        .filter(|p| p.exists());
    let Some(bin) = bin else {
        println!("(build the binary too for the memory figures: cargo build --release -p deltasync-consumer --bins --examples)");
        return;
    };
    for durable in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(["--nats-url", &settings.nats.url])
            .args(["--pipeline", &settings.pipeline])
            .args(["run", "--once", "--id", "bench-child"])
            .env("RUST_LOG", "warn")
            .env_remove("DELTASYNC_CONFIG");
        if durable {
            cmd.arg("--data-dir").arg(dir.path());
        } else {
            cmd.arg("--ephemeral");
        }
        let t = Instant::now();
        let mut child = cmd.spawn().unwrap();
        let pid = child.id().to_string();
        let mut peak = 0;
        loop {
            peak = peak.max(rss_kib(&pid, "VmHWM:"));
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success());
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let took = t.elapsed();
        println!(
            "binary   {:<8} --once:       {:>6.2} s  {:>10.0} changes/s  peak RSS {:.0} MB",
            if durable { "durable" } else { "memory" },
            took.as_secs_f64(),
            a.changes as f64 / took.as_secs_f64(),
            peak as f64 / 1024.0
        );
    }
}

/// Publishes the backlog; returns the payloads and (lineage, final digest, final seq).
async fn publish(
    settings: &Settings,
    a: &Args,
) -> (Vec<Bytes>, (Lineage, deltasync_core::Digest, u64)) {
    let client = deltasync_nats::connect(&settings.nats).await.unwrap();
    let js = deltasync_nats::jetstream(client, &settings.nats);
    deltasync_nats::ensure_stream(&js, settings).await.unwrap();
    deltasync_nats::ensure_bucket(&js, settings).await.unwrap();
    let subject = names::subject(&settings.pipeline);
    let lineage = Lineage::random();
    let mut state = State::new(lineage);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut payloads = Vec::new();
    let mut acks = VecDeque::new();
    let mut left = a.changes;
    while left > 0 {
        let n = left.min(a.per_envelope);
        left -= n;
        let changes: Vec<Change> = (0..n)
            .map(|_| {
                let k = (rng.next() % a.keys as u64) as usize;
                let v: Vec<u8> = (0..a.value_bytes)
                    .map(|i| b'a' + ((rng.next() >> (i % 8)) % 26) as u8)
                    .collect();
                Change::put(format!("instrument-{k:08}"), v)
            })
            .collect();
        let digest = state.apply_changes(&changes);
        let envs = split_transaction(
            lineage,
            state.seq() + 1,
            digest,
            deltasync_core::envelope::now_ms(),
            changes,
            900 * 1024,
        );
        for e in &envs {
            let p = Bytes::from(encode_envelope(e).unwrap());
            payloads.push(p.clone());
            acks.push_back(js.publish(subject.clone(), p).await.unwrap());
            if acks.len() >= 256 {
                acks.pop_front().unwrap().await.unwrap();
            }
        }
        state.set_position(lineage, envs.last().unwrap().seq);
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let seq = state.seq();
    (payloads, (lineage, state.digest(), seq))
}
