//! The `deltasync-consumer` command line: flags, subcommands, and what each one runs. `main`
//! parses, loads settings ([`Cli::settings`]), sets up logging and the shutdown token, then
//! calls [`run`]; tests (and the compose validation) parse and run exactly what the binary
//! does.
//!
//! Talks to the library only (the consumer, `ops`, `ndjson`) and prints results to stdout
//! (logs go to stderr).

use crate::{ops, Options, Storage};
use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use deltasync_config::settings::{Overrides, Settings, CONFIG_FILE_ENV};
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// Keeps an exact replica of a deltasync pipeline, and operates the pipeline.
#[derive(Parser, Debug)]
#[command(name = "deltasync-consumer", version)]
pub struct Cli {
    /// Settings file (TOML); environment variables DELTASYNC_<SECTION>__<KEY> override it.
    #[arg(long, global = true, env = CONFIG_FILE_ENV)]
    pub config: Option<PathBuf>,
    /// NATS server URL(s), comma-separated (overrides nats.url, DELTASYNC_NATS__URL).
    #[arg(long, global = true)]
    pub nats_url: Option<String>,
    /// Pipeline name (overrides pipeline, DELTASYNC_PIPELINE).
    #[arg(long, global = true)]
    pub pipeline: Option<String>,
    /// A `nats` CLI context (a name under ~/.config/nats/context, or a path; over
    /// NATS_CONTEXT): its URL, credentials, TLS and JetStream domain, under the settings
    /// file and DELTASYNC_* variables.
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Follow the pipeline and keep the replica.
    Run(RunArgs),
    /// Print a replica as NDJSON sorted by key, from its data directory (no NATS needed).
    Dump {
        /// The replica's data directory.
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Print the history as NDJSON, one line per transaction, in the format
    /// `deltasync-producer ingest` reads.
    Replay {
        /// First envelope sequence.
        #[arg(long, default_value_t = 1)]
        from_seq: u64,
        /// Start from the first envelope stored within this long (e.g. 15m, 1h, 2d; the
        /// server's clock) instead of --from-seq.
        #[arg(long, conflicts_with = "from_seq", value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// Last envelope sequence (default: the stream's head at start).
        #[arg(long)]
        to_seq: Option<u64>,
        /// Print the summary as JSON on stderr at the end (stdout carries the history).
        #[arg(long)]
        json: bool,
    },
    /// Write a replica at envelope sequence M into an empty data directory; `run` then
    /// follows from M.
    Rebuild {
        /// The envelope sequence (the last part of a transaction).
        #[arg(long)]
        at_seq: u64,
        /// The data directory to create.
        #[arg(long)]
        data_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replay the retained history from a snapshot, checking every recorded digest.
    Verify {
        /// Start from the newest snapshot at or before this sequence (default: the oldest
        /// retained snapshot).
        #[arg(long)]
        from_seq: Option<u64>,
        /// Print JSON (the report is printed before a divergence's exit status 2).
        #[arg(long)]
        json: bool,
    },
    /// Remove a retired replica's position marker (its durable consumer) from the server,
    /// which otherwise keeps it until consumer.inactive_threshold passes.
    Forget {
        /// The replica's id (or the marker's name as `status` lists it).
        #[arg(long)]
        id: String,
        /// Say what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stream bounds, snapshots, and every consumer's position, lag and headroom.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Options of `run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Replica id (names its durable consumer); default consumer.id (DELTASYNC_CONSUMER__ID),
    /// else the host name.
    #[arg(long)]
    pub id: Option<String>,
    /// Keep the replica and its cursor in this directory (restarts resume from it); overrides
    /// consumer.data_dir (DELTASYNC_CONSUMER__DATA_DIR).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Keep the replica in memory only (bootstrap from the snapshot at every start); wins
    /// over --data-dir and consumer.data_dir, wherever they come from.
    #[arg(long)]
    pub ephemeral: bool,
    /// HTTP address for health, readiness, metrics, status and reads; overrides
    /// consumer.http (DELTASYNC_CONSUMER__HTTP).
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// Catch up to the stream's head as it was at start, commit, exit.
    #[arg(long)]
    pub once: bool,
}

impl Cli {
    /// Loads the settings: defaults, `--config`, environment, then `--nats-url`/`--pipeline`,
    /// and for `run` its flags over them ([`RunArgs::apply`]), validated again.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let mut settings = Settings::load(
            self.config.as_deref(),
            Overrides {
                nats_url: self.nats_url.clone(),
                pipeline: self.pipeline.clone(),
                context: self.context.clone(),
            },
        )
        .context("loading settings")?;
        if let Command::Run(args) = &self.command {
            args.apply(&mut settings);
            settings.validate().context("checking settings")?;
        }
        Ok(settings)
    }
}

impl RunArgs {
    /// Writes the flags over the `consumer` settings they override.
    pub fn apply(&self, settings: &mut Settings) {
        let c = &mut settings.consumer;
        if let Some(id) = &self.id {
            c.id = Some(id.clone());
        }
        if let Some(dir) = &self.data_dir {
            c.data_dir = Some(dir.clone());
        }
        if self.ephemeral {
            c.data_dir = None;
        }
        if let Some(addr) = self.http {
            c.http = Some(addr);
        }
    }
}

/// Draws the snapshot download of `replica`'s bootstrap as a progress bar (bytes fetched of
/// those planned), until the replica is bootstrapped.
async fn bootstrap_bar(replica: crate::Replica) {
    let mut bar = None;
    loop {
        let status = replica.status();
        match &status.sync {
            Some(sync) => {
                let total = sync.fetched_bytes + sync.remaining_bytes;
                let b = bar.get_or_insert_with(|| {
                    deltasync_config::progress::bytes_bar("loading the snapshot", Some(total))
                });
                b.set_length(total);
                b.set_position(sync.fetched_bytes);
            }
            None if status.bootstrapped => break,
            None => {}
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}

/// Runs the command: `run` until `shutdown` fires (or, with `--once`, until caught up), then
/// commits the replica; an operator command until it completes (`shutdown` interrupts it
/// with an error). Results go to stdout, logs to stderr.
pub async fn run(
    command: Command,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => {
            let mut options = Options::from_settings(&settings);
            options.once = args.once;
            tracing::info!(
                id = %options.id,
                pipeline = %settings.pipeline,
                storage = match &options.storage {
                    Storage::Memory => "memory".to_owned(),
                    Storage::Durable(d) => d.display().to_string(),
                },
                once = options.once,
                "Starting the consumer"
            );
            let once = options.once;
            let consumer = crate::Consumer::new(settings, options)?;
            // `--once` on a terminal: a bar over the snapshot download while it runs.
            let bar = (once && std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .then(|| tokio::spawn(bootstrap_bar(consumer.replica())));
            let outcome = consumer.run(shutdown).await;
            if let Some(task) = bar {
                task.abort();
            }
            let outcome = outcome?;
            tracing::info!(
                lineage = %outcome.cursor.lineage,
                seq = outcome.cursor.seq,
                stream_seq = outcome.cursor.stream_seq,
                "Consumer stopped; replica committed"
            );
            Ok(())
        }
        Command::Dump { data_dir } => tokio::task::spawn_blocking(move || dump(&data_dir))
            .await
            .context("dumping the replica")?,
        Command::Replay {
            from_seq,
            since,
            to_seq,
            json,
        } => {
            interruptible(&shutdown, async {
                let from_seq = match since {
                    Some(since) => ops::envelope_seq_since(&settings, since).await?,
                    None => from_seq,
                };
                let stdout = std::io::stdout();
                let mut out = std::io::BufWriter::new(stdout.lock());
                let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
                let s = ops::replay(&settings, from_seq, to_seq, &mut out).await?;
                if json {
                    eprintln!("{}", serde_json::to_string(&s)?);
                } else if progress {
                    eprintln!(
                        "replayed {} transactions ({}..{})",
                        s.transactions, s.first_seq, s.last_seq
                    );
                }
                Ok(())
            })
            .await
        }
        Command::Rebuild {
            at_seq,
            data_dir,
            json,
        } => {
            interruptible(&shutdown, async {
                let s = ops::rebuild(&settings, at_seq, &data_dir).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&s)?);
                } else {
                    println!(
                        "rebuilt {} at envelope {} ({} keys, digest {}, lineage {}) from {}",
                        data_dir.display(),
                        s.seq,
                        s.entries,
                        s.digest,
                        s.lineage,
                        match s.from_snapshot {
                            Some(seq) => format!("the snapshot at {seq}"),
                            None => "the first envelope".to_owned(),
                        }
                    );
                }
                Ok(())
            })
            .await
        }
        Command::Verify { from_seq, json } => {
            interruptible(&shutdown, async {
                let r = ops::verify(&settings, from_seq).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                } else {
                    print!("{}", ops::render_verify(&r));
                }
                match r.divergence {
                    None => Ok(()),
                    Some(d) => Err(deltasync_config::exit::Finding(format!(
                        "the history diverges at envelope {}: {}",
                        d.seq, d.reason
                    ))
                    .into()),
                }
            })
            .await
        }
        Command::Forget { id, dry_run, json } => {
            interruptible(&shutdown, async {
                let r = ops::forget(&settings, &id, dry_run).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                } else {
                    let idle = r
                        .marker
                        .idle_secs
                        .map_or("unknown".to_owned(), |s| format!("{s:.0} s"));
                    println!(
                        "{} the marker {} (position {}, idle {idle})",
                        if r.deleted { "removed" } else { "would remove" },
                        r.marker.name,
                        r.marker.position
                    );
                }
                Ok(())
            })
            .await
        }
        Command::Status { json } => {
            interruptible(&shutdown, async {
                let s = ops::status(&settings).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&s)?);
                } else {
                    print!("{}", ops::render_status(&s));
                }
                Ok(())
            })
            .await
        }
    }
}

/// Runs an operator command until it completes or `shutdown` fires (then an error: the
/// command stopped where it was, and nothing after that point was written).
async fn interruptible(
    shutdown: &CancellationToken,
    command: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    tokio::select! {
        biased;
        () = shutdown.cancelled() => bail!("interrupted"),
        result = command => result,
    }
}

/// `dump`: prints the replica in `data_dir` as NDJSON sorted by key. Reads the data directory
/// only (no settings, logging or NATS); a closed pipe (`| head`) is not an error.
pub fn dump(data_dir: &std::path::Path) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match crate::ndjson::dump(data_dir, &mut out) {
        Ok(_) => Ok(()),
        Err(crate::local::DumpError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("deltasync-consumer").chain(args.iter().copied()))
    }

    #[test]
    fn the_ops_commands_parse_with_their_flags() {
        let cli = parse(&[
            "--pipeline",
            "p",
            "replay",
            "--from-seq",
            "5",
            "--to-seq",
            "9",
        ]);
        assert!(matches!(
            cli.map(|c| c.command),
            Ok(Command::Replay {
                from_seq: 5,
                since: None,
                to_seq: Some(9),
                json: false
            })
        ));
        assert!(matches!(
            parse(&["rebuild", "--at-seq", "3", "--data-dir", "d", "--json"]).map(|c| c.command),
            Ok(Command::Rebuild {
                at_seq: 3,
                json: true,
                ..
            })
        ));
        assert!(matches!(
            parse(&["verify"]).map(|c| c.command),
            Ok(Command::Verify {
                from_seq: None,
                json: false
            })
        ));
        assert!(matches!(
            parse(&["status", "--json"]).map(|c| c.command),
            Ok(Command::Status { json: true })
        ));
    }

    #[test]
    fn run_flags_override_the_consumer_settings() {
        let mut settings = Settings::default();
        settings.consumer.data_dir = Some("from-file".into());
        let Ok(Cli {
            command: Command::Run(args),
            ..
        }) = parse(&["run", "--id", "r1", "--ephemeral", "--http", "127.0.0.1:0"])
        else {
            panic!("run parses");
        };
        args.apply(&mut settings);
        assert_eq!(settings.consumer.id.as_deref(), Some("r1"));
        assert_eq!(
            settings.consumer.data_dir, None,
            "--ephemeral drops the file's data_dir"
        );
        assert_eq!(settings.consumer.http, "127.0.0.1:0".parse().ok());

        let Ok(Cli {
            command: Command::Run(args),
            ..
        }) = parse(&["run", "--data-dir", "d"])
        else {
            panic!("run parses");
        };
        args.apply(&mut settings);
        assert_eq!(settings.consumer.data_dir, Some(PathBuf::from("d")));
        assert_eq!(
            settings.consumer.id.as_deref(),
            Some("r1"),
            "absent flags change nothing"
        );
    }

    #[test]
    fn the_help_names_the_variable_of_every_flag_that_has_a_setting() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        let top = cmd.render_long_help().to_string();
        let run = cmd
            .find_subcommand_mut("run")
            .map(|c| c.render_long_help().to_string())
            .unwrap_or_default();
        for (help, var) in [
            (&top, "DELTASYNC_NATS__URL"),
            (&top, "DELTASYNC_PIPELINE"),
            (&top, "DELTASYNC_CONFIG"),
            (&top, "NATS_CONTEXT"),
            (&run, "DELTASYNC_CONSUMER__ID"),
            (&run, "DELTASYNC_CONSUMER__DATA_DIR"),
            (&run, "DELTASYNC_CONSUMER__HTTP"),
        ] {
            assert!(help.contains(var), "{var} missing from\n{help}");
        }
    }

    #[test]
    fn ephemeral_wins_over_a_data_dir_and_missing_flags_are_refused() {
        // A data directory may come from DELTASYNC_CONSUMER__DATA_DIR (clap `env`): an
        // explicit --ephemeral must still give a memory replica, not an error.
        let Ok(Cli {
            command: Command::Run(args),
            ..
        }) = parse(&["run", "--data-dir", "d", "--ephemeral"])
        else {
            panic!("run parses");
        };
        let mut settings = Settings::default();
        args.apply(&mut settings);
        assert_eq!(settings.consumer.data_dir, None);
        assert!(parse(&["rebuild", "--at-seq", "3"]).is_err());
        assert!(parse(&["replay", "--from-seq", "x"]).is_err());
    }
}
