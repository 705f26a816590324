//! Times `State::apply_changes` of random puts in batches of 1000 on states of several sizes:
//! the core of the benchmark's digest-cost row, alone, for profiling (`perf record`). With
//! `--verified`, a replica applies the same batches as envelopes (`State::apply`: position
//! and digest checked, all or nothing), as the consumer does.
//!
//! ```text
//! cargo run --release -p deltasync-core --example apply -- [keys ...] [--changes N] [--value-bytes B] [--verified]
//! ```

use deltasync_core::change::Change;
use deltasync_core::digest::BucketDigests;
use deltasync_core::envelope::{Envelope, Lineage};
use deltasync_core::state::State;
use std::time::Instant;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// xorshift, for reproducible keys and values.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn key(i: usize) -> String {
    format!("key-{i:08}")
}

/// Applies generated puts to a `State` and reports time and memory per size.
#[derive(clap::Parser)]
struct Args {
    /// Changes per size.
    #[arg(long, default_value_t = 500_000)]
    changes: usize,
    /// Bytes per value.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Build the producer's state too and compare digests.
    #[arg(long)]
    verified: bool,
    /// State sizes (keys); default 1000 and 1000000.
    sizes: Vec<usize>,
}

fn main() -> Result<(), Error> {
    let Args {
        changes,
        value_bytes,
        verified,
        mut sizes,
    } = <Args as clap::Parser>::parse();
    if sizes.is_empty() {
        sizes = vec![1_000, 1_000_000];
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for size in sizes {
        let t = Instant::now();
        let lineage = Lineage::random();
        let mut state = State::new(lineage);
        // With --verified, the producer's state: built alike, separately, so that the
        // replica's allocations are its own.
        let mut producer = verified.then(|| State::new(lineage));
        let mut batch = Vec::with_capacity(10_000);
        for i in 0..=size {
            if i < size {
                batch.push(Change::put(key(i), rng.bytes(value_bytes)));
            }
            if batch.len() == 10_000 || i == size {
                state.apply_changes(&batch);
                if let Some(p) = producer.as_mut() {
                    p.apply_changes(&batch);
                }
                batch.clear();
            }
        }
        let built = t.elapsed();
        let batches: Vec<Vec<Change>> = (0..changes.div_ceil(1000))
            .map(|_| {
                (0..1000)
                    .map(|_| Change::put(key(rng.below(size)), rng.bytes(value_bytes)))
                    .collect()
            })
            .collect();
        let took = if let Some(mut producer) = producer {
            let envelopes: Vec<Envelope> = batches
                .iter()
                .enumerate()
                .map(|(i, b)| Envelope {
                    lineage,
                    seq: i as u64 + 1,
                    part: 1,
                    parts: 1,
                    digest: producer.apply_changes(b),
                    produced_at_ms: 0,
                    changes: b.clone(),
                })
                .collect();
            drop(producer);
            let t = Instant::now();
            for e in &envelopes {
                state.apply(e).map_err(|e| format!("apply: {e}"))?;
            }
            t.elapsed()
        } else {
            let t = Instant::now();
            for b in &batches {
                state.apply_changes(b);
            }
            t.elapsed()
        };
        let n = batches.len() * 1000;
        let scratch = BucketDigests::from_entries(state.iter()).total();
        if scratch != state.digest() {
            return Err("the incremental digest differs from the digest from scratch".into());
        }
        println!(
            "{size} keys: built in {:.2} s; {n} puts in {:.3} s = {:.0} ns/change ({:.2}M changes/s)",
            built.as_secs_f64(),
            took.as_secs_f64(),
            took.as_secs_f64() * 1e9 / n as f64,
            n as f64 / took.as_secs_f64() / 1e6
        );
    }
    Ok(())
}
