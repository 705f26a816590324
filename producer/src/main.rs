//! `deltasync-producer`: parses flags, loads settings, sets up logging and a shutdown token
//! (Ctrl-C, SIGTERM), then runs the library's command. Errors print their cause chain and
//! exit non-zero.

use clap::Parser;
use deltasync_producer::cli::{self, Cli};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Cli::parse();
    let settings = args.settings()?;
    deltasync_config::telemetry::init(&settings.log)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    cli::run(args.command, settings, shutdown).await
}

/// Cancels `token` at the first Ctrl-C or SIGTERM (`docker compose stop`).
async fn cancel_on_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "Cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C: stopping input, awaiting acknowledgements"),
        () = term => tracing::info!("SIGTERM: stopping input, awaiting acknowledgements"),
    }
    token.cancel();
}
