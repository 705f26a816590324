//! The `deltasync-producer` command line: flags, subcommands, and what each one runs. `main`
//! parses, loads settings, sets up logging and the shutdown token, then calls [`run`]; tests
//! call the same [`run`].
//!
//! Talks to the library only (producer, ingest, sources, ops, http) and prints results to
//! stdout (logs go to stderr).

use crate::api::{self, Api};
use crate::http;
use crate::ingest::{self, IngestReport, Input, LinesReceipt};
use crate::ops;
use crate::producer::{NewLineage, Producer};
use crate::sources::{self, SourceFlags};
use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use deltasync_config::settings::{Overrides, Settings, CONFIG_FILE_ENV};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// deltasync producer: publishes a keyed state's changes as gapless, digest-chained delta
/// envelopes to NATS JetStream and keeps snapshots in a KV bucket.
#[derive(Debug, Parser)]
#[command(name = "deltasync-producer", version)]
pub struct Cli {
    /// Settings file (TOML); environment variables `DELTASYNC_<SECTION>__<KEY>` override it.
    #[arg(long, global = true, env = CONFIG_FILE_ENV, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// NATS server URL(s), comma-separated (overrides nats.url, DELTASYNC_NATS__URL).
    #[arg(long, global = true, value_name = "URL")]
    pub nats_url: Option<String>,
    /// Pipeline name (overrides `pipeline`, DELTASYNC_PIPELINE).
    #[arg(long, global = true, value_name = "NAME")]
    pub pipeline: Option<String>,
    /// A `nats` CLI context (a name under ~/.config/nats/context, or a path; over
    /// NATS_CONTEXT): its URL, credentials, TLS and JetStream domain, under the settings
    /// file and DELTASYNC_* variables.
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a source: produce its states until interrupted (or until the source is done).
    Run {
        /// Which source.
        #[arg(long, value_parser = sources::names())]
        source: String,
        /// HTTP address for /healthz, /readyz, /metrics, /v1/status (overrides producer.http, DELTASYNC_PRODUCER__HTTP).
        #[arg(long, value_name = "ADDR")]
        http: Option<SocketAddr>,
        /// The sources' own flags (each source's under its heading).
        #[command(flatten)]
        flags: SourceFlags,
    },
    /// Publish NDJSON changes from PATH (or stdin): {"op":"put","key":K,"value":V},
    /// {"op":"del","key":K}, {"txn":[...]}. Stops at the first bad line with an error naming
    /// it; everything before it is published.
    Ingest {
        /// The file; stdin when absent or "-".
        path: Option<PathBuf>,
        /// HTTP address for /healthz, /readyz, /metrics, /v1/status (overrides producer.http, DELTASYNC_PRODUCER__HTTP).
        #[arg(long, value_name = "ADDR")]
        http: Option<SocketAddr>,
        /// Print one receipt JSON line per committed transaction on stdout, once it is
        /// durable: {"seq","first_seq","parts","lineage","digest","changes","stream_seq",
        /// "first_line","last_line"}. A txn line is one transaction; consecutive put/del
        /// lines read together (up to 4096, fewer when the input pauses) are committed as
        /// one transaction too.
        #[arg(long)]
        receipts: bool,
        /// Print the summary as JSON (the last stdout line, after any receipts):
        /// {"lines","changes","transactions","first_seq","seq","lineage","digest",
        /// "elapsed_secs","changes_per_sec"}.
        #[arg(long)]
        json: bool,
    },
    /// Serve the write API until interrupted: POST /v1/txn, POST /v1/changes, PUT /v1/state
    /// over HTTP (beside /healthz, /readyz, /metrics, /v1/status) and, unless
    /// producer.api_nats = false, the NATS service "deltasync" on
    /// `deltasync.<pipeline>.api.{txn,changes,state}`.
    Serve {
        /// HTTP address (overrides producer.http, DELTASYNC_PRODUCER__HTTP; one of them is
        /// required).
        #[arg(long, value_name = "ADDR")]
        http: Option<SocketAddr>,
        /// Do not offer the NATS service (sets producer.api_nats = false).
        #[arg(long)]
        no_nats: bool,
    },
    /// Take a snapshot now: recover the pipeline's state and write it to the bucket.
    Snapshot {
        /// Print JSON: {"written", "snapshot": {"lineage","seq","stream_seq","entries",...}}.
        #[arg(long)]
        json: bool,
    },
    /// Start a NEW lineage. This breaks continuity: every consumer re-snapshots (reason
    /// "lineage changed"). For a history that is lost or corrupt; stop the running producer
    /// first.
    NewLineage {
        /// Confirm that continuity is to be broken.
        #[arg(long)]
        yes: bool,
        /// Start the new lineage from the recovered state instead of an empty one.
        #[arg(long)]
        keep_state: bool,
        /// Print JSON: {"pipeline","lineage","seq","digest"}.
        #[arg(long)]
        json: bool,
    },
    /// Show the pipeline's status (stream extent, newest envelope, latest snapshot).
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

impl Cli {
    /// Loads the settings: defaults, `--config`, environment, then `--nats-url`/`--pipeline`.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        Ok(Settings::load(
            self.config.as_deref(),
            Overrides {
                nats_url: self.nats_url.clone(),
                pipeline: self.pipeline.clone(),
                context: self.context.clone(),
            },
        )?)
    }
}

/// Runs the command until it completes or `shutdown` fires (then: no more input, every
/// outstanding acknowledgement awaited, `Ok`).
pub async fn run(
    command: Command,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    match command {
        Command::Run {
            source,
            http,
            flags,
        } => with_producer(settings, http, shutdown, Work::Source(source, flags)).await,
        Command::Ingest {
            path,
            http,
            receipts,
            json,
        } => {
            let input = match path {
                Some(p) if p.as_os_str() != "-" => Input::File(p),
                _ => Input::Stdin,
            };
            let summary = if json {
                Summary::Json
            } else if receipts {
                // stdout carries the receipts' NDJSON: the text summary goes to stderr.
                Summary::TextOnStderr
            } else {
                Summary::Text
            };
            with_producer(
                settings,
                http,
                shutdown,
                Work::Ingest(input, receipts, summary),
            )
            .await
        }
        Command::Serve { http, no_nats } => {
            let mut settings = settings;
            if no_nats {
                settings.producer.api_nats = false;
            }
            serve(settings, http, shutdown).await
        }
        Command::Snapshot { json } => {
            // On a terminal, a spinner while it recovers the state and writes the snapshot.
            let spinner = deltasync_config::progress::working(
                "recovering the pipeline's state and writing a snapshot",
            );
            let out = ops::snapshot_now(&settings).await;
            spinner.finish_and_clear();
            let out = out?;
            let s = &out.snapshot;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "written": out.written, "snapshot": s })
                );
            } else if out.written {
                println!(
                    "snapshot written: lineage {} seq {} (stream seq {}), {} keys, {} bytes ({} new)",
                    s.lineage, s.seq, s.stream_seq, s.entries, s.total_bytes, s.bytes_written
                );
            } else {
                println!(
                    "the latest snapshot is already at the head: lineage {} seq {}",
                    s.lineage, s.seq
                );
            }
            Ok(())
        }
        Command::NewLineage {
            yes,
            keep_state,
            json,
        } => {
            if !yes {
                bail!(
                    "refusing to start a new lineage without --yes: it breaks continuity and every \
                     consumer of pipeline {} re-snapshots",
                    settings.pipeline
                );
            }
            let from = if keep_state {
                NewLineage::KeepState
            } else {
                NewLineage::Empty
            };
            let producer = Producer::start_new_lineage(settings, from).await?;
            let head = producer.flush().await?;
            let status = producer.shutdown().await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "pipeline": status.pipeline,
                        "lineage": status.lineage,
                        "seq": head.seq,
                        "digest": head.digest.to_hex(),
                    })
                );
            } else {
                println!(
                    "new lineage {} started on pipeline {} (consumers will re-snapshot)",
                    status.lineage, status.pipeline
                );
            }
            Ok(())
        }
        Command::Status { json } => {
            let s = ops::pipeline_status(&settings).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(());
            }
            println!("pipeline {}", s.pipeline);
            match &s.stream {
                Some(st) => {
                    println!(
                        "stream   {}: stream seq {}..={}, {} messages, {} bytes",
                        st.name, st.first_seq, st.last_seq, st.messages, st.bytes
                    );
                    let limit = |v: i64| {
                        if v < 0 {
                            "∞".to_owned()
                        } else {
                            v.to_string()
                        }
                    };
                    println!(
                        "limits   {} messages, {} bytes, age {} ({}; the stream's own)",
                        limit(st.max_messages),
                        limit(st.max_bytes),
                        if st.max_age_secs > 0.0 {
                            humantime::format_duration(std::time::Duration::from_secs(
                                st.max_age_secs as u64,
                            ))
                            .to_string()
                        } else {
                            "∞".to_owned()
                        },
                        if st.discard_old {
                            "discard old"
                        } else {
                            "discard new"
                        }
                    );
                }
                None => println!("stream   (none yet)"),
            }
            match &s.head {
                Some(h) => println!(
                    "head     lineage {} seq {} (part {}/{}) at stream seq {}, digest {}{}",
                    h.lineage,
                    h.seq,
                    h.part,
                    h.parts,
                    h.stream_seq,
                    h.digest,
                    if s.foreign_after_head > 0 {
                        format!(", {} foreign message(s) after it", s.foreign_after_head)
                    } else {
                        String::new()
                    }
                ),
                None => println!("head     (no envelope)"),
            }
            match &s.last_snapshot {
                Some(m) => println!(
                    "snapshot lineage {} seq {} (stream seq {}), {} keys, {} bytes, created at {} ms",
                    m.lineage, m.seq, m.stream_seq, m.entries, m.total_bytes, m.created_at_ms
                ),
                None => println!("snapshot (none)"),
            }
            if let Some(h) = &s.snapshot_headroom {
                if h.pruned {
                    println!(
                        "headroom NONE: envelopes after the latest snapshot (stream seq {}) are \
                         already pruned",
                        h.position
                    );
                } else {
                    println!(
                        "headroom {} envelope(s) after the latest snapshot; retention prunes the \
                         first of them after {} more message(s) / {}{}",
                        h.uncovered,
                        h.messages.map_or("∞".into(), |m| m.to_string()),
                        h.secs.map_or("-".into(), |s| humantime::format_duration(
                            std::time::Duration::from_secs(s as u64)
                        )
                        .to_string()),
                        h.limit
                            .map(|l| format!(" (bound by {l})"))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(())
        }
    }
}

/// What runs inside a producer's life.
enum Work {
    Source(String, SourceFlags),
    Ingest(Input, bool, Summary),
}

/// Where `ingest` says what it did.
#[derive(Debug, Clone, Copy)]
enum Summary {
    /// A line of text on stdout.
    Text,
    /// A line of text on stderr (stdout carries receipts).
    TextOnStderr,
    /// A JSON object, the last line on stdout.
    Json,
}

/// Prints `ingest`'s report as `how` says.
fn print_summary(how: Summary, r: &IngestReport) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match how {
        Summary::Json => {
            let json = serde_json::json!({
                "lines": r.lines,
                "changes": r.changes,
                "transactions": r.transactions,
                "first_seq": r.first_seq,
                "seq": r.position.seq,
                "lineage": r.position.lineage.to_hex(),
                "digest": r.position.digest.to_hex(),
                "elapsed_secs": r.elapsed.as_secs_f64(),
                "changes_per_sec": r.rate(),
                "cancelled": r.cancelled,
            });
            writeln!(out, "{json}")?;
        }
        Summary::Text | Summary::TextOnStderr => {
            let text = format!(
                "ingested {} lines: {} changes ({} txn lines) up to envelope {} in {:.2} s ({:.0} changes/s){}",
                r.lines,
                r.changes,
                r.transactions,
                r.position.seq,
                r.elapsed.as_secs_f64(),
                r.rate(),
                if r.cancelled { ", stopped early" } else { "" }
            );
            if matches!(how, Summary::Text) {
                writeln!(out, "{text}")?;
            } else {
                eprintln!("{text}");
            }
        }
    }
    out.flush()
}

/// Starts a producer (and its HTTP endpoint when configured), runs `work`, then shuts the
/// producer down awaiting every acknowledgement — also when `work` failed, so whatever it
/// handed over before failing is durable.
async fn with_producer(
    settings: Settings,
    http: Option<SocketAddr>,
    shutdown: CancellationToken,
    work: Work,
) -> anyhow::Result<()> {
    let http_addr = http.or(settings.producer.http);
    let pipeline = settings.pipeline.clone();
    let producer = Producer::start(settings)
        .await
        .with_context(|| format!("starting the producer of pipeline {pipeline}"))?;
    let http_stop = shutdown.child_token();
    let server = match http_addr {
        Some(addr) => Some(
            http::spawn(addr, producer.observer(), http_stop.clone())
                .await
                .with_context(|| format!("binding the HTTP endpoint to {addr}"))?,
        ),
        None => None,
    };
    let result: anyhow::Result<()> = match work {
        Work::Source(name, flags) => sources::run(&name, &flags, &producer, shutdown.clone()).await,
        Work::Ingest(input, false, summary) => {
            match ingest::ingest(&producer, input, shutdown.clone()).await {
                Ok(report) => print_summary(summary, &report).context("printing the summary"),
                Err(e) => Err(e.into()),
            }
        }
        Work::Ingest(input, true, summary) => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let printer = tokio::spawn(print_receipts(producer.lineage().to_hex(), rx));
            let ingested = ingest::ingest_with(&producer, input, shutdown.clone(), Some(tx)).await;
            let printed = printer.await;
            ingested.map_err(anyhow::Error::from).and_then(|report| {
                printed
                    .map_err(|e| anyhow::anyhow!("the receipt printer failed: {e}"))?
                    .context("printing receipts to stdout")?;
                print_summary(summary, &report).context("printing the summary")
            })
        }
    };
    let stopped = producer.shutdown().await;
    http_stop.cancel();
    if let Some((_, task)) = server {
        let _ = task.await;
    }
    result?;
    stopped?;
    Ok(())
}

/// Prints each receipt as a JSON line, flushed, as soon as it arrives.
async fn print_receipts(
    lineage: String,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<LinesReceipt>,
) -> std::io::Result<()> {
    while let Some(r) = rx.recv().await {
        let mut line = api::receipt_json(&lineage, &r.receipt);
        line["first_line"] = r.first_line.into();
        line["last_line"] = r.last_line.into();
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    Ok(())
}

/// `serve`: one long-lived producer whose input is the write API, until `shutdown`; then no
/// new request is taken, running ones are answered, and the producer stops as usual.
async fn serve(
    settings: Settings,
    http: Option<SocketAddr>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Some(addr) = http.or(settings.producer.http) else {
        bail!(
            "serve needs an HTTP address: pass --http ADDR (e.g. --http 0.0.0.0:8080) or set \
             producer.http (environment DELTASYNC_PRODUCER__HTTP)"
        );
    };
    let pipeline = settings.pipeline.clone();
    let api_nats = settings.producer.api_nats;
    let producer = Arc::new(
        Producer::start(settings)
            .await
            .with_context(|| format!("starting the producer of pipeline {pipeline}"))?,
    );
    let api = Api::new(producer.clone());
    let stop = CancellationToken::new();
    let router = http::router(producer.observer()).merge(api::http::router(api.clone()));
    // The NATS service first: once /readyz answers, both ways in take requests.
    let served = async {
        let service = if api_nats {
            let client = producer.client().clone();
            Some(
                api::nats::spawn(api.clone(), client, &pipeline, stop.clone())
                    .await
                    .map_err(|e| anyhow::anyhow!("starting the NATS write API: {e}"))?,
            )
        } else {
            None
        };
        let server = http::spawn_router(addr, router, stop.clone()).await;
        let (_, server) = match server {
            Ok(s) => s,
            Err(e) => {
                stop.cancel();
                if let Some(s) = service {
                    let _ = s.await;
                }
                return Err(e).with_context(|| format!("binding the HTTP endpoint to {addr}"));
            }
        };
        anyhow::Ok((server, service))
    }
    .await;
    if served.is_ok() {
        shutdown.cancelled().await;
        tracing::info!("Stopping: no new requests; answering the running ones");
    }
    let answered = tokio::time::timeout(api::CLOSE_GRACE, api.close()).await;
    stop.cancel();
    let result = match served {
        Ok((server, service)) => {
            let _ = server.await;
            if let Some(s) = service {
                let _ = s.await;
            }
            Ok(())
        }
        Err(e) => Err(e),
    };
    if answered.is_err() {
        tracing::warn!(grace = ?api::CLOSE_GRACE, "Requests still running at shutdown; stopping anyway");
    }
    drop(api);
    let stopped = match Arc::try_unwrap(producer) {
        Ok(p) => p.shutdown().await.map(drop).map_err(anyhow::Error::from),
        Err(p) => p
            .flush()
            .await
            .map(drop)
            .map_err(anyhow::Error::from)
            .context("a request still holds the producer; flushed instead of shutting down"),
    };
    result?;
    stopped
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::sources::{find, orderbook, SOURCES};
    use clap::CommandFactory;

    #[test]
    fn the_help_names_the_variable_of_every_flag_that_has_a_setting() {
        let mut cmd = Cli::command();
        let top = cmd.render_long_help().to_string();
        for var in [
            "DELTASYNC_NATS__URL",
            "DELTASYNC_PIPELINE",
            "DELTASYNC_CONFIG",
            "NATS_CONTEXT",
        ] {
            assert!(top.contains(var), "{var} missing from\n{top}");
        }
        for sub in ["run", "ingest", "serve"] {
            let help = cmd
                .find_subcommand_mut(sub)
                .map(|c| c.render_long_help().to_string())
                .unwrap_or_default();
            assert!(help.contains("DELTASYNC_PRODUCER__HTTP"), "{sub}:\n{help}");
        }
    }

    #[test]
    fn every_registered_source_is_a_run_flag_value_and_the_flags_do_not_clash() {
        // Panics when two sources declare a flag of the same name.
        Cli::command().debug_assert();
        for s in SOURCES {
            assert!(find(s.name).is_some());
            let cli = Cli::try_parse_from(["deltasync-producer", "run", "--source", s.name]);
            assert!(cli.is_ok(), "{}: {cli:?}", s.name);
        }
        assert!(Cli::try_parse_from(["deltasync-producer", "run", "--source", "nope"]).is_err());
    }

    #[test]
    fn a_sources_flags_reach_it_through_the_registry() {
        let cli = Cli::try_parse_from([
            "deltasync-producer",
            "run",
            "--source",
            "orderbook",
            "--orders",
            "500",
            "--cycle-interval",
            "10ms",
        ])
        .unwrap();
        let Command::Run { source, flags, .. } = cli.command else {
            panic!("not run");
        };
        assert_eq!(source, "orderbook");
        let o = flags.parse::<orderbook::OrderbookSource>().unwrap();
        assert_eq!((o.orders, o.churn, o.seed), (500, 1.0, 42));
        assert_eq!(o.cycle_interval, std::time::Duration::from_millis(10));
    }
}
