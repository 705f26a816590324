//! `deltasync-demo` (`make demo`): a local pipeline on the real binaries. Starts the pinned
//! nats-server on a free loopback port with a temporary store, runs
//! `deltasync-producer run --source orderbook` and three `deltasync-consumer run`, shows a
//! live line, and after `--duration` (or Ctrl-C) stops everything, removes what it started
//! and prints a summary. Exits non-zero when a consumer did not converge to the producer.
//!
//! Talks to the processes it starts over their HTTP endpoints (`/v1/status`, `/metrics`).

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Parser)]
#[command(
    name = "deltasync-demo",
    about = "Run a local deltasync pipeline and show it converge"
)]
struct Args {
    /// How long the producer runs (Ctrl-C ends it early).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Consumers to run.
    #[arg(long, default_value_t = 3)]
    consumers: usize,
    /// Orders in the synthetic order book.
    #[arg(long, default_value_t = 20_000)]
    orders: usize,
    /// Percentage of orders touched per cycle.
    #[arg(long, default_value_t = 1.0)]
    churn: f64,
    /// Time between order-book cycles.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    cycle_interval: Duration,
    /// Where the producer and consumer binaries are (default: next to this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

/// A child process killed (SIGKILL) on drop if it is still running.
struct Proc {
    name: String,
    child: Child,
    http: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(name: &str, bin: &Path, args: &[String], http: String, log: &Path) -> Result<Proc> {
        let out = std::fs::File::create(log)?;
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .env("DELTASYNC_LOG__FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            http,
        })
    }

    /// Sends SIGTERM and waits for a clean exit.
    fn terminate(&mut self, wait: Duration) -> Result<bool> {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).context("pid")?;
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.success());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(false)
    }
}

/// A minimal HTTP/1.1 GET (the endpoints are ours, on loopback).
async fn get(addr: &str, path: &str) -> Result<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await??;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP body")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

async fn status(addr: &str) -> Option<Value> {
    get(addr, "/v1/status")
        .await
        .ok()
        .and_then(|b| serde_json::from_str(&b).ok())
}

/// Sums a Prometheus counter or gauge family by name from `/metrics`.
async fn metric(addr: &str, name: &str) -> Option<f64> {
    let body = get(addr, "/metrics").await.ok()?;
    let mut found = None;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let (key, value) = line.rsplit_once(' ')?;
        let family = key.split('{').next().unwrap_or(key);
        if family == name {
            *found.get_or_insert(0.0) += value.parse::<f64>().ok()?;
        }
    }
    found
}

fn free_addr() -> String {
    format!("127.0.0.1:{}", deltasync_testkit::free_port())
}

fn human(b: f64) -> String {
    if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / 1024.0 / 1024.0)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no exe dir")?
            .to_path_buf(),
    };
    let producer_bin = bin_dir.join("deltasync-producer");
    let consumer_bin = bin_dir.join("deltasync-consumer");
    for b in [&producer_bin, &consumer_bin] {
        if !b.exists() {
            bail!(
                "{} not found: build it first (`make demo` does)",
                b.display()
            );
        }
    }
    let work = tempfile::tempdir()?;
    let server = deltasync_testkit::NatsServer::start();
    let url = server.url();
    println!("nats-server {url} (store {})", server.store_dir().display());
    let common = |sub: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["--nats-url", &url, "--pipeline", "demo"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(sub.iter().map(|s| s.to_string()));
        v
    };

    let p_http = free_addr();
    let orders = args.orders.to_string();
    let churn = args.churn.to_string();
    let interval = humantime::format_duration(args.cycle_interval).to_string();
    let mut producer = Proc::spawn(
        "producer",
        &producer_bin,
        &common(&[
            "run",
            "--source",
            "orderbook",
            "--http",
            &p_http,
            "--orders",
            &orders,
            "--churn",
            &churn,
            "--cycle-interval",
            &interval,
        ]),
        p_http.clone(),
        &work.path().join("producer.log"),
    )?;
    let mut consumers = Vec::new();
    for i in 1..=args.consumers {
        let http = free_addr();
        let id = format!("demo-{i}");
        let dir = work.path().join(&id);
        let dir_s = dir.display().to_string();
        consumers.push(Proc::spawn(
            &id,
            &consumer_bin,
            &common(&["run", "--id", &id, "--data-dir", &dir_s, "--http", &http]),
            http,
            &work.path().join(format!("{id}.log")),
        )?);
    }

    let start = Instant::now();
    let mut last: Option<(Instant, f64)> = None;
    let mut interrupted = false;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { interrupted = true; break; }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if let Some(status) = producer.child.try_wait()? {
            bail!(
                "the producer exited early ({status}); see {}",
                work.path().join("producer.log").display()
            );
        }
        let p = status(&producer.http).await;
        let changes = metric(&producer.http, "deltasync_producer_changes_total")
            .await
            .unwrap_or(0.0);
        let now = Instant::now();
        let rate = last.map_or(0.0, |(t, c)| {
            (changes - c) / now.duration_since(t).as_secs_f64()
        });
        last = Some((now, changes));
        let pseq = p.as_ref().and_then(|p| p["seq"].as_u64()).unwrap_or(0);
        let pdig = p
            .as_ref()
            .and_then(|p| p["digest"].as_str().map(str::to_string))
            .unwrap_or_default();
        let mut line = format!(
            "[{:>3}s] seq {pseq:>6}  {:>8.0} changes/s ",
            start.elapsed().as_secs(),
            rate
        );
        for c in &consumers {
            match status(&c.http).await {
                Some(s) => {
                    let seq = s["seq"].as_u64().unwrap_or(0);
                    let agree = if seq == pseq && s["digest"].as_str() == Some(pdig.as_str()) {
                        "="
                    } else {
                        "~"
                    };
                    line += &format!(" | {} lag {:>3} {agree}", c.name, pseq.saturating_sub(seq));
                }
                None => line += &format!(" | {} starting", c.name),
            }
        }
        println!("{line}");
        if start.elapsed() >= args.duration {
            break;
        }
    }
    if interrupted {
        println!("interrupted: stopping");
    }

    // Stop the producer (it awaits its acknowledgements), then let the consumers catch up.
    let producer_clean = producer.terminate(Duration::from_secs(30))?;
    let final_status = {
        // The producer has exited; its last status is what the stream holds: read it back
        // from the consumers' view of the stream head.
        let s = deltasync_config::settings::Settings {
            pipeline: "demo".into(),
            ..Default::default()
        };
        let mut settings = s;
        settings.nats.url = url.clone();
        let client = deltasync_nats::connect(&settings.nats).await?;
        let js = deltasync_nats::jetstream(client, &settings.nats);
        deltasync_nats::history::recover(&js, &settings)
            .await?
            .context("the pipeline has no history")?
    };
    let target_seq = final_status.state.seq();
    let target_digest = final_status.state.digest().to_hex();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut converged = vec![false; consumers.len()];
    while Instant::now() < deadline && converged.iter().any(|c| !c) {
        for (i, c) in consumers.iter().enumerate() {
            if let Some(s) = status(&c.http).await {
                converged[i] = s["seq"].as_u64() == Some(target_seq)
                    && s["digest"].as_str() == Some(target_digest.as_str());
            }
        }
        if converged.iter().any(|c| !c) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let mut consumers_clean = true;
    for c in &mut consumers {
        consumers_clean &= c.terminate(Duration::from_secs(30))?;
    }

    let changes = last.map_or(0.0, |(_, c)| c);
    println!();
    println!("summary");
    println!("  envelopes published      {target_seq}");
    println!("  changes published        {changes:.0}");
    let deltas = field_from_log(&work.path().join("producer.log"), "delta_bytes");
    let fulls = field_from_log(&work.path().join("producer.log"), "full_snapshot_bytes");
    if deltas.len() > 1 && deltas.len() == fulls.len() {
        // The first cycle publishes the whole book; the steady state is what follows.
        let (d, f): (f64, f64) = (deltas[1..].iter().sum(), fulls[1..].iter().sum());
        println!(
            "  delta bytes              {} vs {} for a full snapshot every cycle ({:.2}%, {} cycles after the first)",
            human(d),
            human(f),
            d / f * 100.0,
            deltas.len() - 1
        );
    }
    println!("  producer digest          {target_digest}");
    for (c, ok) in consumers.iter().zip(&converged) {
        println!(
            "  {:<24} {}",
            c.name,
            if *ok {
                "converged (same sequence and digest)"
            } else {
                "DID NOT CONVERGE"
            }
        );
    }
    println!("  clean shutdown           producer {producer_clean}, consumers {consumers_clean}");
    drop(consumers);
    drop(server);
    if converged.iter().all(|c| *c) && producer_clean && consumers_clean {
        Ok(())
    } else {
        bail!("logs were in {} (removed)", work.path().display())
    }
}

/// A numeric field of the producer's per-cycle JSON log lines, in order.
fn field_from_log(path: &Path, field: &str) -> Vec<f64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|v| v["fields"][field].as_f64())
        .collect()
}
