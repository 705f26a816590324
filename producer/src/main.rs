//! `deltasync-producer`: parses flags, loads settings, sets up logging and a shutdown token
//! (Ctrl-C, SIGTERM: `deltasync_config::shutdown`), then runs the library's command. Errors
//! print as `deltasync-producer: error: …` with their cause chain; the exit codes are
//! `deltasync_config::exit`'s (1 could not run, 2 found a problem).

use anyhow::Context as _;
use deltasync_config::{exit, shutdown};
use deltasync_producer::cli::{self, Cli};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Cli = exit::parse_args();
    exit::exit("deltasync-producer", start(args))
}

#[tokio::main]
async fn start(args: Cli) -> anyhow::Result<()> {
    let settings = args.settings()?;
    deltasync_config::telemetry::init(&settings.log).context("setting up logging")?;
    let shutdown = shutdown::token("stopping input, awaiting acknowledgements");
    cli::run(args.command, settings, shutdown).await
}
