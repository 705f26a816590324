//! A synthetic order book in the spirit of an exchange or batch-auction feed: orders added,
//! removed and partially filled, token prices moving, and a block number advancing every
//! cycle. Each cycle is produced as a FULL state and committed through the producer's
//! full-state path, which publishes only the difference; the cycle log compares the delta's
//! bytes with what a full snapshot of the same state would have cost.
//!
//! Talks to a [`Producer`]; deterministic for a given seed (SplitMix64, no OS randomness).
//!
//! ```text
//! block            -> {"number":N,"timestamp_ms":T}
//! price/<TOKEN>    -> {"token":"TKN07","usd":"1234.5678"}
//! order/<uid>      -> {"uid":"0x…","owner":"0x…","sell":"TKN03","buy":"TKN11",
//!                      "sell_amount":"…","buy_amount":"…","executed":"…",
//!                      "kind":"sell","partially_fillable":true,"valid_to":…,"created_block":…}
//! ```

use crate::error::ProducerError;
use crate::handoff::CommitReceipt;
use crate::producer::Producer;
use bytes::Bytes;
use deltasync_core::{Key, State};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Bytes a full snapshot spends per entry beyond key and value (framing, lengths).
const SNAPSHOT_ENTRY_OVERHEAD: u64 = 11;

/// Shape and pace of the synthetic book.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderbookOptions {
    /// Orders in the book (kept about constant: as many added as removed).
    pub orders: usize,
    /// Percentage of orders touched per cycle: half of it removed (and as many added), half
    /// partially filled.
    pub churn_pct: f64,
    /// Tokens traded.
    pub tokens: usize,
    /// Time between cycles.
    pub cycle_interval: Duration,
    /// Cycles to produce; `None` runs until cancelled.
    pub cycles: Option<u64>,
    /// Seed of the generator: the same seed gives the same book, cycle after cycle.
    pub seed: u64,
}

impl Default for OrderbookOptions {
    fn default() -> Self {
        OrderbookOptions {
            orders: 10_000,
            churn_pct: 1.0,
            tokens: 64,
            cycle_interval: Duration::from_secs(1),
            cycles: None,
            seed: 42,
        }
    }
}

/// SplitMix64: tiny, fast, deterministic.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug, Clone)]
struct Order {
    owner: u64,
    sell: usize,
    buy: usize,
    sell_amount: u128,
    buy_amount: u128,
    executed: u128,
    partially_fillable: bool,
    valid_to: u64,
    created_block: u64,
    /// Key and encoded value, rebuilt only when the order changes.
    key: Key,
    value: Bytes,
}

/// The book: every order, every token price, the block.
#[derive(Debug, Clone)]
pub struct Orderbook {
    rng: Rng,
    opts: OrderbookOptions,
    orders: BTreeMap<u64, Order>,
    prices: Vec<(Key, f64, Bytes)>,
    block: u64,
    next_uid: u64,
}

impl Orderbook {
    /// A book of `opts.orders` orders at block 1.
    pub fn new(opts: OrderbookOptions) -> Orderbook {
        let mut rng = Rng(opts.seed);
        let tokens = opts.tokens.max(2);
        let prices = (0..tokens)
            .map(|t| {
                let usd = 0.01 + rng.unit() * 5000.0;
                let key: Key = format!("price/TKN{t:02}").into();
                (key, usd, price_value(t, usd))
            })
            .collect();
        let mut book = Orderbook {
            rng,
            opts,
            orders: BTreeMap::new(),
            prices,
            block: 1,
            next_uid: 1,
        };
        for _ in 0..book.opts.orders {
            book.add_order();
        }
        book
    }

    /// The current block number.
    pub fn block(&self) -> u64 {
        self.block
    }

    /// Orders in the book.
    pub fn len(&self) -> usize {
        self.orders.len()
    }

    /// Whether the book has no order.
    pub fn is_empty(&self) -> bool {
        self.orders.is_empty()
    }

    fn add_order(&mut self) {
        let uid = self.next_uid;
        self.next_uid += 1;
        let tokens = self.prices.len() as u64;
        let sell = self.rng.below(tokens) as usize;
        let mut buy = self.rng.below(tokens - 1) as usize;
        if buy >= sell {
            buy += 1;
        }
        let sell_amount = u128::from(self.rng.below(1_000_000) + 1) * 1_000_000_000_000;
        let limit = self.prices[sell].1 / self.prices[buy].1 * (0.97 + self.rng.unit() * 0.06);
        let buy_amount = (sell_amount as f64 * limit) as u128;
        let mut order = Order {
            owner: self.rng.below(5_000),
            sell,
            buy,
            sell_amount,
            buy_amount,
            executed: 0,
            partially_fillable: self.rng.below(3) == 0,
            valid_to: 1_700_000_000 + self.block * 12 + 3_600 + self.rng.below(86_400),
            created_block: self.block,
            key: format!("order/0x{uid:016x}").into(),
            value: Bytes::new(),
        };
        order.value = order_value(uid, &order);
        self.orders.insert(uid, order);
    }

    /// Advances one cycle: a new block, churn (removals replaced by new orders, partial
    /// fills) and price moves.
    pub fn step(&mut self) {
        self.block += 1;
        let n = self.orders.len() as u64;
        let touched = ((n as f64) * self.opts.churn_pct / 100.0).round() as u64;
        let removals = touched.div_ceil(2);
        let fills = touched - removals;
        for _ in 0..removals {
            if self.orders.is_empty() {
                break;
            }
            let nth = self.rng.below(self.orders.len() as u64) as usize;
            if let Some(&uid) = self.orders.keys().nth(nth) {
                self.orders.remove(&uid);
            }
        }
        while self.orders.len() < self.opts.orders {
            self.add_order();
        }
        for _ in 0..fills {
            let nth = self.rng.below(self.orders.len() as u64) as usize;
            let Some((&uid, order)) = self.orders.iter_mut().nth(nth) else {
                continue;
            };
            let left = order.sell_amount - order.executed;
            order.executed += left / (2 + u128::from(self.rng.below(8)));
            order.value = order_value(uid, order);
        }
        let moves = (self.prices.len() / 5).max(1);
        for _ in 0..moves {
            let t = self.rng.below(self.prices.len() as u64) as usize;
            let factor = 1.0 + (self.rng.unit() - 0.5) * 0.02;
            let p = &mut self.prices[t];
            p.1 *= factor;
            p.2 = price_value(t, p.1);
        }
    }

    /// The full state: every entry of the book.
    pub fn entries(&self) -> impl Iterator<Item = (Key, Bytes)> + '_ {
        let block = (
            Key::from("block"),
            Bytes::from(format!(
                "{{\"number\":{},\"timestamp_ms\":{}}}",
                self.block,
                1_700_000_000_000u64 + self.block * 12_000
            )),
        );
        std::iter::once(block)
            .chain(self.prices.iter().map(|(k, _, v)| (k.clone(), v.clone())))
            .chain(
                self.orders
                    .values()
                    .map(|o| (o.key.clone(), o.value.clone())),
            )
    }

    /// The full state as a `State` (hashing every entry: about a microsecond each).
    pub fn to_state(&self) -> State {
        let mut s = State::new(Default::default());
        for (k, v) in self.entries() {
            s.insert(k, v);
        }
        s
    }

    /// What a full snapshot of this state would cost, in bytes.
    pub fn full_bytes(&self) -> u64 {
        self.entries()
            .map(|(k, v)| (k.len() + v.len()) as u64 + SNAPSHOT_ENTRY_OVERHEAD)
            .sum()
    }
}

fn price_value(token: usize, usd: f64) -> Bytes {
    Bytes::from(format!(
        "{{\"token\":\"TKN{token:02}\",\"usd\":\"{usd:.4}\"}}"
    ))
}

fn order_value(uid: u64, o: &Order) -> Bytes {
    Bytes::from(format!(
        "{{\"uid\":\"0x{uid:016x}\",\"owner\":\"0x{:040x}\",\"sell\":\"TKN{:02}\",\"buy\":\"TKN{:02}\",\
         \"sell_amount\":\"{}\",\"buy_amount\":\"{}\",\"executed\":\"{}\",\"kind\":\"sell\",\
         \"partially_fillable\":{},\"valid_to\":{},\"created_block\":{}}}",
        o.owner, o.sell, o.buy, o.sell_amount, o.buy_amount, o.executed, o.partially_fillable,
        o.valid_to, o.created_block
    ))
}

/// One cycle's outcome.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cycle {
    /// Cycle number from 1.
    pub cycle: u64,
    /// Block number.
    pub block: u64,
    /// What the commit published.
    pub receipt: CommitReceipt,
    /// Bytes a full snapshot of the same state would have cost.
    pub full_bytes: u64,
}

/// Runs the order book through `producer` until `opts.cycles` cycles are done or `cancel`
/// fires; returns the cycles produced.
pub async fn run(
    producer: &Producer,
    opts: OrderbookOptions,
    cancel: CancellationToken,
) -> Result<Vec<Cycle>, ProducerError> {
    let mut book = Orderbook::new(opts.clone());
    let mut done = Vec::new();
    tracing::info!(orders = opts.orders, churn_pct = opts.churn_pct, seed = opts.seed, interval = ?opts.cycle_interval, "Order book source started");
    let mut next = tokio::time::Instant::now();
    for cycle in 1.. {
        if opts.cycles.is_some_and(|n| cycle > n) || cancel.is_cancelled() {
            break;
        }
        let snapshot = book.clone();
        let (state, full_bytes) =
            tokio::task::spawn_blocking(move || (snapshot.to_state(), snapshot.full_bytes()))
                .await
                .map_err(|e| {
                    ProducerError::Internal(format!("building the order book state: {e}"))
                })?;
        let receipt = producer.commit_state(state).await?;
        let ratio = if full_bytes > 0 {
            receipt.bytes as f64 / full_bytes as f64
        } else {
            0.0
        };
        tracing::info!(
            cycle,
            block = book.block(),
            orders = book.len(),
            changes = receipt.changes,
            delta_bytes = receipt.bytes,
            full_snapshot_bytes = full_bytes,
            delta_pct = format!("{:.2}", ratio * 100.0),
            seq = receipt.last_seq,
            "Order book cycle published"
        );
        done.push(Cycle {
            cycle,
            block: book.block(),
            receipt,
            full_bytes,
        });
        if opts.cycles.is_some_and(|n| cycle >= n) {
            break;
        }
        next += opts.cycle_interval;
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            () = tokio::time::sleep_until(next) => {}
        }
        book.step();
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltasync_core::diff;

    fn opts() -> OrderbookOptions {
        OrderbookOptions {
            orders: 2_000,
            churn_pct: 2.0,
            ..OrderbookOptions::default()
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_book() {
        let (mut a, mut b) = (Orderbook::new(opts()), Orderbook::new(opts()));
        for _ in 0..5 {
            a.step();
            b.step();
        }
        assert_eq!(a.to_state().digest(), b.to_state().digest());
        let mut c = Orderbook::new(OrderbookOptions { seed: 7, ..opts() });
        c.step();
        assert_ne!(a.to_state().digest(), c.to_state().digest());
    }

    #[test]
    fn a_cycle_changes_about_the_churn_plus_prices_and_block() {
        let mut book = Orderbook::new(opts());
        let before = book.to_state();
        book.step();
        let after = book.to_state();
        let changes = diff(&before, &after);
        // 2% of 2000 = 40 touched: 20 removed + 20 added + 20 filled = 60, plus ≤ 12 prices
        // and the block.
        assert!((55..=75).contains(&changes.len()), "{}", changes.len());
        assert_eq!(book.len(), 2_000);
    }
}
