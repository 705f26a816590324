//! `deltasync-consumer` binary: parses flags, loads settings, sets up logging and a shutdown
//! token (Ctrl-C, SIGTERM), then calls the library's `run` — or `dump`, which needs no NATS.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use deltasync_consumer::{Options, Storage};
use deltasync_shared::settings::{Overrides, Settings, CONFIG_FILE_ENV};
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// Keeps an exact replica of a deltasync pipeline.
#[derive(Parser, Debug)]
#[command(name = "deltasync-consumer", version)]
struct Cli {
    /// Settings file (TOML); environment variables DELTASYNC_<SECTION>__<KEY> override it.
    #[arg(long, global = true, env = CONFIG_FILE_ENV)]
    config: Option<PathBuf>,
    /// NATS server URL(s), comma-separated (overrides nats.url).
    #[arg(long, global = true)]
    nats_url: Option<String>,
    /// Pipeline name (overrides pipeline).
    #[arg(long, global = true)]
    pipeline: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Follow the pipeline and keep the replica.
    Run(RunArgs),
    /// Print a replica as NDJSON sorted by key, from its data directory (no NATS needed).
    Dump {
        /// The replica's data directory.
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Replica id (names its durable consumer); default consumer.id, else the host name.
    #[arg(long)]
    id: Option<String>,
    /// Keep the replica and its cursor in this directory (restarts resume from it).
    #[arg(long, conflicts_with = "ephemeral")]
    data_dir: Option<PathBuf>,
    /// Keep the replica in memory only (bootstrap from the snapshot at every start).
    #[arg(long)]
    ephemeral: bool,
    /// HTTP address for health, readiness, metrics, status and reads.
    #[arg(long)]
    http: Option<SocketAddr>,
    /// Catch up to the stream's head as it was at start, commit, exit.
    #[arg(long)]
    once: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Dump { ref data_dir } => dump(data_dir),
        Command::Run(ref args) => run(&cli, args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("deltasync-consumer: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn dump(data_dir: &std::path::Path) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match deltasync_consumer::ndjson::dump(data_dir, &mut out) {
        Ok(_) => Ok(()),
        // A closed pipe (`| head`) is not an error.
        Err(deltasync_consumer::local::DumpError::Output(e))
            if e.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn run(cli: &Cli, args: &RunArgs) -> anyhow::Result<()> {
    let mut settings = Settings::load(
        cli.config.as_deref(),
        Overrides {
            nats_url: cli.nats_url.clone(),
            pipeline: cli.pipeline.clone(),
        },
    )
    .context("loading settings")?;
    if let Some(id) = &args.id {
        settings.consumer.id = Some(id.clone());
    }
    if let Some(dir) = &args.data_dir {
        settings.consumer.data_dir = Some(dir.clone());
    }
    if args.ephemeral {
        settings.consumer.data_dir = None;
    }
    if let Some(addr) = args.http {
        settings.consumer.http = Some(addr);
    }
    settings.validate().context("checking settings")?;
    deltasync_shared::telemetry::init(&settings.log).context("setting up logging")?;
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let cancel = CancellationToken::new();
        tokio::spawn(cancel_on_signals(cancel.clone()));
        let outcome = deltasync_consumer::run(settings, options, cancel).await?;
        tracing::info!(
            lineage = %outcome.cursor.lineage,
            seq = outcome.cursor.seq,
            stream_seq = outcome.cursor.stream_seq,
            "Consumer stopped; replica committed"
        );
        Ok(())
    })
}

/// Cancels `cancel` at the first Ctrl-C or SIGTERM.
async fn cancel_on_signals(cancel: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "Cannot listen for SIGTERM; only Ctrl-C stops cleanly");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("Shutdown requested");
    cancel.cancel();
}
