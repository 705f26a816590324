//! `deltasync-bench`: starts its own pinned nats-server on a free loopback port, runs every
//! scenario against its baseline in the same run on the same server, checks each result,
//! prints a table and writes BENCHMARKS.md and a JSON file.

mod api;
mod http;
mod paths;
mod pipeline;
mod report;
mod scenarios;

use anyhow::Result;
use clap::Parser;
use report::{Context, Row};
use scenarios::Sizes;

#[derive(Debug, Parser)]
#[command(
    name = "deltasync-bench",
    about = "deltasync against raw JetStream and a plain KV watcher"
)]
struct Args {
    /// Keys in the bootstrap, snapshot, digest and memory scenarios.
    #[arg(long, default_value_t = 1_000_000)]
    keys: usize,
    /// Changes in the throughput scenarios.
    #[arg(long, default_value_t = 1_000_000)]
    changes: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Seconds each side of the latency scenario offers 10k changes/s.
    #[arg(long, default_value_t = 10.0)]
    latency_secs: f64,
    /// Seconds the producer publishes without a snapshot, for the rate it is compared with
    /// while one is written.
    #[arg(long, default_value_t = 2.0)]
    window_secs: f64,
    /// Transactions sent to `POST /v1/txn` (api-txn), over all connections.
    #[arg(long, default_value_t = 50_000)]
    api_txns: usize,
    /// Concurrent keep-alive HTTP/1.1 connections of api-txn (and library tasks of its
    /// baseline).
    #[arg(long, default_value_t = 16)]
    api_connections: usize,
    /// Puts per transaction in api-txn and feed-watchers: 1 to this many.
    #[arg(long, default_value_t = 4)]
    api_max_ops: usize,
    /// Put lines per `POST /v1/changes` body (api-changes sends --changes puts in bodies of
    /// this many lines; the default keeps a body under the 64 MiB `api_max_body_bytes`).
    #[arg(long, default_value_t = 250_000)]
    api_body_lines: usize,
    /// SSE watchers on the consumer's /v1/watch (feed-watchers).
    #[arg(long, default_value_t = 1_000)]
    feed_watchers: usize,
    /// Transactions per second the producer commits while they watch.
    #[arg(long, default_value_t = 200.0)]
    feed_rate: f64,
    /// Seconds of commits while they watch (the single-watcher baseline: at most 2 s).
    #[arg(long, default_value_t = 5.0)]
    feed_secs: f64,
    /// Tiny sizes that check correctness quickly (CI); figures are meaningless.
    #[arg(long)]
    quick: bool,
    /// Where to write the Markdown table (not written with --quick unless given).
    #[arg(long)]
    markdown: Option<std::path::PathBuf>,
    /// Where to write the figures as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Runs only these scenarios (comma-separated), for profiling one of them; the consumer
    /// apply rows read what the ingest scenario wrote, so it runs with them. Not with
    /// --markdown: BENCHMARKS.md holds the whole table of one run.
    #[arg(long, value_delimiter = ',', conflicts_with = "markdown")]
    only: Vec<Scenario>,
    /// Internal: build a replica of N keys and print its memory use (run as a child process).
    #[arg(long, hide = true)]
    memory_probe: Option<usize>,
    /// Internal: load the latest snapshot of pipeline PIPELINE on the nats-server at URL with
    /// the snapshot loader alone, print its digest and exit (run as a child process, timed
    /// spawn to exit beside `deltasync-consumer run --once`).
    #[arg(long, hide = true, num_args = 2, value_names = ["URL", "PIPELINE"])]
    loader_probe: Option<Vec<String>>,
}

/// The scenarios, as `--only` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// `deltasync-producer ingest FILE` against the library (and a second, small ingest).
    UserIngest,
    /// `deltasync-consumer run --ephemeral --once` against the loader and a KV watcher (runs
    /// user-ingest first: it bootstraps that pipeline).
    UserBootstrap,
    /// A one-line `deltasync-producer ingest` after a killed producer left 10,000 changes
    /// after its newest snapshot (recovery: snapshot + tail), against the same with no tail
    /// (runs user-ingest first: it restarts that pipeline's producer).
    UserRestart,
    /// `deltasync-producer snapshot` of the user-ingest pipeline (recover + full snapshot),
    /// against the state's raw bytes published to a KV bucket (runs user-ingest first).
    UserSnapshot,
    Ingest,
    ApplyMemory,
    ApplyDurable,
    Latency,
    SnapshotDuring,
    TailApply,
    Snapshots,
    WireBytes,
    DigestCost,
    Memory,
    /// `POST /v1/txn` of `deltasync-producer serve` from concurrent keep-alive connections,
    /// against `Producer::commit` and `submit_many`.
    ApiTxn,
    /// `POST /v1/changes` of `deltasync-producer serve` with large NDJSON bodies, against
    /// `submit_many`.
    ApiChanges,
    /// SSE watchers on `deltasync-consumer run --ephemeral --http` while a producer commits,
    /// against a single watcher.
    FeedWatchers,
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if let Some(keys) = args.memory_probe {
        return scenarios::memory_probe(keys, args.value_bytes);
    }
    if let Some([url, pipeline]) = args.loader_probe.as_deref() {
        return paths::loader_probe(url, pipeline);
    }
    if args.quick {
        args.keys = args.keys.min(20_000);
        args.changes = args.changes.min(20_000);
        args.latency_secs = args.latency_secs.min(1.0);
        args.window_secs = args.window_secs.min(0.3);
        args.api_txns = args.api_txns.min(500);
        args.api_body_lines = args.api_body_lines.min(args.changes.div_ceil(2).max(1));
        args.feed_watchers = args.feed_watchers.min(100);
        args.feed_secs = args.feed_secs.min(0.5);
    }
    let timing = pipeline::Timing {
        latency: std::time::Duration::from_secs_f64(args.latency_secs.max(0.0)),
        window: std::time::Duration::from_secs_f64(args.window_secs.max(0.0)),
    };
    let sizes = Sizes {
        keys: args.keys,
        changes: args.changes,
        value_bytes: args.value_bytes,
    };
    let api_sizes = api::ApiSizes {
        txns: args.api_txns,
        connections: args.api_connections,
        max_ops: args.api_max_ops,
        body_lines: args.api_body_lines,
        watchers: args.feed_watchers,
        feed_rate: args.feed_rate,
        feed_secs: args.feed_secs,
        value_bytes: args.value_bytes,
    };
    let server = deltasync_testkit::NatsServer::start();
    let url = server.url();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut rows: Vec<Row> = Vec::new();
    eprintln!("nats-server at {url}; sizes {sizes:?}");
    let started = std::time::Instant::now();
    let done = |rows: &[Row]| {
        if let Some(r) = rows.last() {
            eprintln!("[{:6.1} s] {}", started.elapsed().as_secs_f64(), r.scenario);
        }
        // The next scenario starts on a quiet disk: the durable scenario leaves hundreds of
        // MB of dirty pages whose writeback otherwise stalls the server's writes in the
        // latency scenario after it (seen: p99 132 ms there, 2 ms when run alone).
        rustix::fs::sync();
        // Nor on busy cores: a replica a scenario dropped is freed on a thread of its own
        // (1M entries take ~0.3 s), which would otherwise run during the next measurement.
        deltasync_core::state::wait_for_background_frees();
    };
    let runs = |s: Scenario| args.only.is_empty() || args.only.contains(&s);
    rt.block_on(async {
        use Scenario::*;
        if runs(UserIngest) || runs(UserBootstrap) || runs(UserRestart) || runs(UserSnapshot) {
            let (s, mut model) = paths::ingest(&url, sizes, &mut rows).await?;
            done(&rows);
            if runs(UserBootstrap) {
                paths::bootstrap(&s, &model, &mut rows).await?;
                done(&rows);
            }
            // These two publish into the pipeline: after the bootstrap, which reads it as
            // user-ingest left it.
            if runs(UserRestart) {
                paths::restart(&s, &mut model, sizes, &mut rows).await?;
                done(&rows);
            }
            if runs(UserSnapshot) {
                paths::snapshot(&s, &mut model, sizes, &mut rows).await?;
                done(&rows);
            }
        }
        if runs(Ingest) || runs(ApplyMemory) || runs(ApplyDurable) {
            let mut ingested = pipeline::producer_ingest(&url, sizes, &mut rows).await?;
            done(&rows);
            // Memory and durable alternate, each row reporting its fastest round.
            let (mut memory, mut durable) = (Vec::new(), Vec::new());
            for round in 0..pipeline::APPLY_ROUNDS {
                if runs(ApplyMemory) {
                    memory.push(pipeline::apply_memory_round(&ingested, round).await?);
                    done(&[]);
                }
                if runs(ApplyDurable) {
                    durable.push(pipeline::apply_durable_round(&ingested, round).await?);
                    done(&[]);
                }
            }
            if runs(ApplyMemory) {
                pipeline::consumer_memory(&mut ingested, &memory, &mut rows);
                done(&rows);
            }
            if runs(ApplyDurable) {
                pipeline::consumer_durable(&ingested, &durable, &mut rows);
                done(&rows);
            }
        }
        if runs(Latency) {
            pipeline::latency(&url, sizes, timing, &mut rows).await?;
            done(&rows);
        }
        if runs(SnapshotDuring) {
            pipeline::snapshot_during(&url, sizes, timing, &mut rows).await?;
            done(&rows);
        }
        if runs(TailApply) {
            scenarios::apply_memory(&url, sizes, &mut rows).await?;
            done(&rows);
        }
        if runs(Snapshots) {
            scenarios::snapshots(&url, sizes, &mut rows).await?;
            done(&rows);
        }
        if runs(ApiTxn) {
            api::txn(&url, server.pid().unwrap_or(0), api_sizes, &mut rows).await?;
            done(&rows);
        }
        if runs(ApiChanges) {
            api::changes(&url, sizes.changes, api_sizes, &mut rows).await?;
            done(&rows);
        }
        if runs(FeedWatchers) {
            api::feed(&url, api_sizes, &mut rows).await?;
            done(&rows);
        }
        anyhow::Ok(())
    })?;
    if runs(Scenario::WireBytes) {
        scenarios::wire_bytes(args.quick, &mut rows)?;
        done(&rows);
    }
    if runs(Scenario::DigestCost) {
        scenarios::digest_cost(sizes, &mut rows)?;
        done(&rows);
    }
    if runs(Scenario::Memory) {
        scenarios::memory(sizes, &mut rows)?;
        done(&rows);
    }
    drop(server);

    report::print(&rows);
    let ctx = Context {
        command: std::env::args().collect::<Vec<_>>().join(" ").replace(
            &std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            "deltasync-bench",
        ),
        date: date(),
        machine: machine(),
        server: server_version(),
        sizes: format!(
            "{} keys, {} changes, {} B values",
            sizes.keys, sizes.changes, sizes.value_bytes
        ),
    };
    if let Some(path) = &args.markdown {
        let existing = std::fs::read_to_string(path).ok();
        let text = report::with_notes(&report::markdown(&ctx, &rows), existing.as_deref());
        std::fs::write(path, text)?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &args.json {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(
            path,
            serde_json::to_string_pretty(&serde_json::json!({"context": ctx, "rows": rows}))?,
        )?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn date() -> String {
    std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().next().and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<u64>().ok())
            })
        })
        .map_or(0, |kb| kb / 1024 / 1024);
    format!("{cores} cores, {mem} GiB, {cpu}")
}

fn server_version() -> String {
    std::process::Command::new(deltasync_testkit::nats_server_bin())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
