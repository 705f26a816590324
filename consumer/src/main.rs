//! `deltasync-consumer` binary: parses flags, loads settings, sets up logging and a shutdown
//! token (Ctrl-C, SIGTERM: `deltasync_config::shutdown`), then calls the library's
//! [`cli::run`] — except `dump`, which reads a data directory only (no settings, logging or
//! NATS). Errors print their cause chain and exit non-zero.

use anyhow::Context as _;
use clap::Parser;
use deltasync_config::shutdown;
use deltasync_consumer::cli::{self, Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = Cli::parse();
    let result = match &args.command {
        Command::Dump { data_dir } => cli::dump(data_dir),
        _ => start(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("deltasync-consumer: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn start(args: Cli) -> anyhow::Result<()> {
    let settings = args.settings()?;
    deltasync_config::telemetry::init(&settings.log).context("setting up logging")?;
    let shutdown = shutdown::token("stopping");
    cli::run(args.command, settings, shutdown).await
}
