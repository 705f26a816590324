//! `deltasync-consumer` binary: parses flags, loads settings, sets up logging and a shutdown
//! token (Ctrl-C, SIGTERM: `deltasync_config::shutdown`), then calls the library's
//! [`cli::run`] — except `dump`, which reads a data directory only (no settings, logging or
//! NATS). Errors print as `deltasync-consumer: error: …` with their cause chain; the exit
//! codes are `deltasync_config::exit`'s (1 could not run, 2 found a problem, e.g. `verify`
//! found a divergence).

use anyhow::Context as _;
use deltasync_config::{exit, shutdown};
use deltasync_consumer::cli::{self, Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Cli = exit::parse_args();
    let result = match &args.command {
        Command::Dump { data_dir } => cli::dump(data_dir),
        _ => start(args),
    };
    exit::exit("deltasync-consumer", result)
}

#[tokio::main]
async fn start(args: Cli) -> anyhow::Result<()> {
    let settings = args.settings()?;
    deltasync_config::telemetry::init(&settings.log).context("setting up logging")?;
    let shutdown = shutdown::token("stopping");
    cli::run(args.command, settings, shutdown).await
}
