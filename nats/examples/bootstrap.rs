//! Times a snapshot bootstrap (`store::load`) of a state written by `store::write_snapshot` on
//! a private nats-server: the benchmark's bootstrap row without the rest of the suite.
//!
//! ```text
//! cargo run --release -p deltasync-nats --example bootstrap -- [keys] [value bytes] [runs]
//! ```
//!
//! Needs the pinned nats-server (`NATS_SERVER_BIN` or `tools/nats-server`). Set
//! `RUST_LOG=deltasync_nats=debug` to see the load's phases.

use deltasync_config::settings::Settings;
use deltasync_core::change::Change;
use deltasync_core::envelope::Lineage;
use deltasync_core::state::State;
use deltasync_nats::store;
use deltasync_testkit::NatsServer;
use std::time::{Duration, Instant};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Times `store::load` of a snapshot written on a private nats-server.
#[derive(clap::Parser)]
struct Args {
    /// Keys in the snapshot.
    #[arg(default_value_t = 1_000_000)]
    keys: usize,
    /// Bytes per value.
    #[arg(default_value_t = 100)]
    value_bytes: usize,
    /// Loads timed.
    #[arg(default_value_t = 3)]
    runs: usize,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let Args {
        keys,
        value_bytes,
        runs,
    } = <Args as clap::Parser>::parse();
    let server = NatsServer::start();
    let mut s = Settings {
        pipeline: "bootstrap".into(),
        ..Settings::default()
    };
    s.nats.url = server.url();
    s.nats.request_timeout = Duration::from_secs(30);
    s.validate()?;
    let client = deltasync_nats::connect(&s.nats).await?;
    let js = deltasync_nats::jetstream(client, &s.nats);
    deltasync_nats::ensure_stream(&js, &s).await?;
    let kv = deltasync_nats::ensure_bucket(&js, &s).await?;

    let mut state = State::new(Lineage::random());
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..keys {
        let value: Vec<u8> = (0..value_bytes)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        batch.push(Change::put(format!("key-{i:08}"), value));
        if batch.len() == 10_000 {
            state.apply_changes(&batch);
            batch.clear();
        }
    }
    state.apply_changes(&batch);
    let manifest = store::write_snapshot(&js, &s, &state, 0, None).await?;
    println!(
        "snapshot: {keys} keys, {} chunks in {} ranges, {} bytes",
        manifest
            .ranges
            .iter()
            .map(|r| r.chunks.len())
            .sum::<usize>(),
        manifest.ranges.len(),
        manifest.total_bytes()
    );
    let server_pid = server.pid().unwrap_or(0);
    let mut walls = Vec::new();
    for run in 1..=runs {
        let (cpu0, server0) = (cpu_secs("self")?, cpu_secs(&server_pid.to_string())?);
        let t = Instant::now();
        let loaded = store::load(&kv, manifest.clone()).await?;
        let took = t.elapsed().as_secs_f64();
        let (cpu, server_cpu) = (
            cpu_secs("self")? - cpu0,
            cpu_secs(&server_pid.to_string())? - server0,
        );
        if loaded.state.digest() != state.digest() || loaded.state.len() != keys {
            return Err("the loaded state differs from the written one".into());
        }
        println!(
            "run {run}: load {took:.3} s, cpu {cpu:.2} s here + {server_cpu:.2} s nats-server"
        );
        walls.push(took);
        drop(loaded);
    }
    walls.sort_by(f64::total_cmp);
    println!(
        "load: min {:.3} s, median {:.3} s over {runs} runs",
        walls.first().copied().unwrap_or_default(),
        walls.get(walls.len() / 2).copied().unwrap_or_default()
    );
    Ok(())
}

/// User plus system CPU seconds of process `pid` ("self" for this one), from /proc.
fn cpu_secs(pid: &str) -> Result<f64, Error> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted after the ")" that ends field 2.
    let ticks: f64 = fields
        .get(11..13)
        .unwrap_or_default()
        .iter()
        .map(|f| f.parse::<f64>().unwrap_or(0.0))
        .sum();
    Ok(ticks / 100.0)
}
