//! The `deltasync-producer` command line: flags, subcommands, and what each one runs. `main`
//! parses, loads settings, sets up logging and the shutdown token, then calls [`run`]; tests
//! call the same [`run`].
//!
//! Talks to the library only (producer, ingest, sources, ops, http) and prints results to
//! stdout (logs go to stderr).

use crate::http;
use crate::ingest::{self, Input};
use crate::ops;
use crate::producer::{NewLineage, Producer};
use crate::sources::{self, SourceFlags};
use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use deltasync_config::settings::{Overrides, Settings, CONFIG_FILE_ENV};
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// deltasync producer: publishes a keyed state's changes as gapless, digest-chained delta
/// envelopes to NATS JetStream and keeps snapshots in a KV bucket.
#[derive(Debug, Parser)]
#[command(name = "deltasync-producer", version)]
pub struct Cli {
    /// Settings file (TOML); environment variables `DELTASYNC_<SECTION>__<KEY>` override it.
    #[arg(long, global = true, env = CONFIG_FILE_ENV, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// NATS server URL(s), comma-separated (overrides nats.url).
    #[arg(long, global = true, value_name = "URL")]
    pub nats_url: Option<String>,
    /// Pipeline name (overrides `pipeline`).
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
        /// HTTP address for /healthz, /readyz, /metrics, /v1/status (overrides producer.http).
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
        /// HTTP address for /healthz, /readyz, /metrics, /v1/status (overrides producer.http).
        #[arg(long, value_name = "ADDR")]
        http: Option<SocketAddr>,
    },
    /// Take a snapshot now: recover the pipeline's state and write it to the bucket.
    Snapshot,
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
        Command::Ingest { path, http } => {
            let input = match path {
                Some(p) if p.as_os_str() != "-" => Input::File(p),
                _ => Input::Stdin,
            };
            with_producer(settings, http, shutdown, Work::Ingest(input)).await
        }
        Command::Snapshot => {
            let out = ops::snapshot_now(&settings).await?;
            let s = &out.snapshot;
            if out.written {
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
        Command::NewLineage { yes, keep_state } => {
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
            let status = producer.shutdown().await?;
            println!(
                "new lineage {} started on pipeline {} (consumers will re-snapshot)",
                status.lineage, status.pipeline
            );
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
    Ingest(Input),
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
        Work::Ingest(input) => ingest::ingest(&producer, input, shutdown.clone())
            .await
            .map(drop)
            .map_err(Into::into),
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::sources::{find, orderbook, SOURCES};
    use clap::CommandFactory;

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
