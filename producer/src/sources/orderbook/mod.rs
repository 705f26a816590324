//! The `orderbook` source: a synthetic order book ([`book`]), produced as full states and
//! published as diffs, one cycle at a time. This file is what `run --source orderbook` knows
//! of it: its flags and its [`Source`] implementation.
//!
//! Talks to a [`Producer`] only (through [`book::run`]).

pub mod book;

pub use book::{run, Cycle, Orderbook, OrderbookOptions};

use super::Source;
use crate::producer::Producer;
use anyhow::bail;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// `run --source orderbook`: the flags of the synthetic order book.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Source orderbook")]
pub struct OrderbookSource {
    /// Percentage of orders touched per cycle.
    #[arg(long, default_value_t = 1.0, value_name = "PCT")]
    pub churn: f64,
    /// Orders in the book.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    pub orders: usize,
    /// Tokens traded.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub tokens: usize,
    /// Time between cycles (e.g. 500ms, 2s).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, value_name = "DUR")]
    pub cycle_interval: Duration,
    /// Stop after this many cycles.
    #[arg(long, value_name = "N")]
    pub cycles: Option<u64>,
    /// Generator seed (the same seed gives the same book).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl Source for OrderbookSource {
    const NAME: &'static str = "orderbook";
    const ABOUT: &'static str = "A synthetic order book, produced as full states and published as diffs";

    async fn run(self, producer: &Producer, cancel: CancellationToken) -> anyhow::Result<()> {
        if !(0.0..=100.0).contains(&self.churn) {
            bail!("--churn {} is not a percentage (0 to 100)", self.churn);
        }
        let opts = OrderbookOptions {
            orders: self.orders,
            churn_pct: self.churn,
            tokens: self.tokens,
            cycle_interval: self.cycle_interval,
            cycles: self.cycles,
            seed: self.seed,
        };
        run(producer, opts, cancel).await?;
        Ok(())
    }
}
