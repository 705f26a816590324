//! The `deltasync-consumer` command line (clap). In the library so that tests (and the
//! compose validation) parse exactly what the binary parses.

use clap::{Args, Parser, Subcommand};
use deltasync_config::settings::CONFIG_FILE_ENV;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Keeps an exact replica of a deltasync pipeline, and operates the pipeline.
#[derive(Parser, Debug)]
#[command(name = "deltasync-consumer", version)]
pub struct Cli {
    /// Settings file (TOML); environment variables DELTASYNC_<SECTION>__<KEY> override it.
    #[arg(long, global = true, env = CONFIG_FILE_ENV)]
    pub config: Option<PathBuf>,
    /// NATS server URL(s), comma-separated (overrides nats.url).
    #[arg(long, global = true)]
    pub nats_url: Option<String>,
    /// Pipeline name (overrides pipeline).
    #[arg(long, global = true)]
    pub pipeline: Option<String>,
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
        /// Last envelope sequence (default: the stream's head at start).
        #[arg(long)]
        to_seq: Option<u64>,
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
    },
    /// Replay the retained history from a snapshot, checking every recorded digest.
    Verify {
        /// Start from the newest snapshot at or before this sequence (default: the oldest
        /// retained snapshot).
        #[arg(long)]
        from_seq: Option<u64>,
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
    /// Replica id (names its durable consumer); default consumer.id, else the host name.
    #[arg(long)]
    pub id: Option<String>,
    /// Keep the replica and its cursor in this directory (restarts resume from it).
    #[arg(long, conflicts_with = "ephemeral")]
    pub data_dir: Option<PathBuf>,
    /// Keep the replica in memory only (bootstrap from the snapshot at every start).
    #[arg(long)]
    pub ephemeral: bool,
    /// HTTP address for health, readiness, metrics, status and reads.
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// Catch up to the stream's head as it was at start, commit, exit.
    #[arg(long)]
    pub once: bool,
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
                to_seq: Some(9)
            })
        ));
        assert!(matches!(
            parse(&["rebuild", "--at-seq", "3", "--data-dir", "d"]).map(|c| c.command),
            Ok(Command::Rebuild { at_seq: 3, .. })
        ));
        assert!(matches!(
            parse(&["verify"]).map(|c| c.command),
            Ok(Command::Verify { from_seq: None })
        ));
        assert!(matches!(
            parse(&["status", "--json"]).map(|c| c.command),
            Ok(Command::Status { json: true })
        ));
    }

    #[test]
    fn contradictory_or_missing_flags_are_refused() {
        assert!(parse(&["run", "--data-dir", "d", "--ephemeral"]).is_err());
        assert!(parse(&["rebuild", "--at-seq", "3"]).is_err());
        assert!(parse(&["replay", "--from-seq", "x"]).is_err());
    }
}
