//! `deltasync-producer`: parses flags, loads settings, sets up logging and a shutdown token
//! (Ctrl-C, SIGTERM: `deltasync_config::shutdown`), then runs the library's command. Errors
//! print their cause chain and exit non-zero.

use clap::Parser;
use deltasync_config::shutdown;
use deltasync_producer::cli::{self, Cli};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Cli::parse();
    let settings = args.settings()?;
    deltasync_config::telemetry::init(&settings.log)?;
    let shutdown = shutdown::token("stopping input, awaiting acknowledgements");
    cli::run(args.command, settings, shutdown).await
}
