//! `deltasync-consumer` binary: parses flags, loads settings, sets up logging and a shutdown
//! token (Ctrl-C, SIGTERM), then calls the library's `run` — or `dump`, which needs no NATS.

use anyhow::Context;
use deltasync_config::settings::{Overrides, Settings};
use deltasync_config::shutdown;
use deltasync_consumer::cli::{Cli, Command, RunArgs};
use deltasync_consumer::{ops, Options, Storage};

fn main() -> std::process::ExitCode {
    let cli = <Cli as clap::Parser>::parse();
    let result = match cli.command {
        Command::Dump { ref data_dir } => dump(data_dir),
        Command::Run(ref args) => run(&cli, args),
        Command::Replay { from_seq, to_seq } => with_settings(&cli, |settings| async move {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let s = ops::replay(&settings, from_seq, to_seq, &mut out, progress).await?;
            if progress {
                eprintln!(
                    "replayed {} transactions ({}..{})",
                    s.transactions, s.first_seq, s.last_seq
                );
            }
            Ok(())
        }),
        Command::Rebuild {
            at_seq,
            ref data_dir,
        } => with_settings(&cli, |settings| async move {
            let s = ops::rebuild(&settings, at_seq, data_dir).await?;
            println!("{}", serde_json::to_string_pretty(&s)?);
            Ok(())
        }),
        Command::Verify { from_seq } => with_settings(&cli, |settings| async move {
            let r = ops::verify(&settings, from_seq).await?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            match r.divergence {
                None => Ok(()),
                Some(d) => {
                    anyhow::bail!("the history diverges at envelope {}: {}", d.seq, d.reason)
                }
            }
        }),
        Command::Status { json } => with_settings(&cli, |settings| async move {
            let s = ops::status(&settings).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", ops::render_status(&s));
            }
            Ok(())
        }),
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

/// Loads the settings, sets up logging and runs an operator command on a runtime.
fn with_settings<F, Fut>(cli: &Cli, f: F) -> anyhow::Result<()>
where
    F: FnOnce(Settings) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let settings = Settings::load(
        cli.config.as_deref(),
        Overrides {
            nats_url: cli.nats_url.clone(),
            pipeline: cli.pipeline.clone(),
        },
    )
    .context("loading settings")?;
    deltasync_config::telemetry::init(&settings.log).context("setting up logging")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(f(settings))
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
    deltasync_config::telemetry::init(&settings.log).context("setting up logging")?;
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
        let cancel = shutdown::token("stopping, committing the replica");
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
