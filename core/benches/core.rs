//! Micro-benchmarks of the pure protocol core: the envelope codec, the entry hash, verified
//! and unchecked apply on small and large states, and diff. No I/O.
//!
//! Run with `cargo bench -p deltasync-core --bench core` (one to two minutes: ten samples
//! per benchmark, short measurement times). Every throughput is in changes per second.
//!
//! Envelopes for the apply benchmarks are built by a producer `State` before timing starts.
//! They form a cycle that overwrites existing keys and returns the state to where it started,
//! so the state keeps its size however many iterations criterion asks for; each timed apply
//! first rewinds the replica's position with `set_position` so that every envelope can carry
//! sequence 1.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use deltasync_core::change::Change;
use deltasync_core::codec::{decode_envelope, encode_envelope};
use deltasync_core::digest::{entry_hash, Digest};
use deltasync_core::envelope::{split_transaction, Envelope, Lineage};
use deltasync_core::state::{diff, Applied, State};
use std::hint::black_box;
use std::time::Duration;

const L: Lineage = Lineage([3; 16]);

/// Changes per envelope.
const BATCH: usize = 1000;

/// Bytes per value.
const VALUE_BYTES: usize = 100;

/// The `i`th key: 16 bytes.
fn key(i: usize) -> String {
    format!("key-{i:012}")
}

/// A pseudo-random 100-byte value, different for every key and version.
fn value(i: usize, version: u64) -> Bytes {
    let mut x = (i as u64) ^ version.rotate_left(40) ^ 0x9e37_79b9_7f4a_7c15;
    let mut v = Vec::with_capacity(VALUE_BYTES);
    while v.len() < VALUE_BYTES {
        // splitmix64
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        v.extend_from_slice(&z.to_le_bytes());
    }
    v.truncate(VALUE_BYTES);
    Bytes::from(v)
}

/// A state holding keys `0..n` at version 0.
fn state_of(n: usize) -> State {
    let mut s = State::new(L);
    let puts: Vec<Change> = (0..n).map(|i| Change::put(key(i), value(i, 0))).collect();
    for chunk in puts.chunks(64 * 1024) {
        s.apply_changes(chunk);
    }
    s
}

fn codec(c: &mut Criterion) {
    let env = Envelope {
        lineage: L,
        seq: 1,
        part: 1,
        parts: 1,
        digest: Digest([7; 32]),
        produced_at_ms: 1_700_000_000_000,
        changes: (0..BATCH)
            .map(|i| Change::put(key(i), value(i, 0)))
            .collect(),
    };
    let wire = encode_envelope(&env).expect("the envelope encodes");
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("encode 1000 puts", |b| {
        b.iter(|| encode_envelope(black_box(&env)))
    });
    g.bench_function("decode 1000 puts", |b| {
        b.iter(|| decode_envelope(black_box(&wire)))
    });
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let (k, v) = (key(1), value(1, 0));
    assert_eq!(k.len() + v.len(), 116);
    let mut g = c.benchmark_group("digest");
    g.throughput(Throughput::Elements(1));
    g.bench_function("entry_hash of a 116-byte entry", |b| {
        b.iter(|| entry_hash(black_box(&k), black_box(&v)))
    });
    g.finish();
}

/// A replica of `n` keys and a cycle of single-part envelopes of [`BATCH`] puts, each at
/// sequence 1, that overwrite `blocks` spread-out blocks of keys with version 1 and then back
/// with version 0.
struct ApplyCycle {
    replica: State,
    envs: Vec<Envelope>,
    next: usize,
}

impl ApplyCycle {
    fn new(n: usize, blocks: usize) -> ApplyCycle {
        assert!(blocks * BATCH <= n);
        let replica = state_of(n);
        let mut producer = replica.clone();
        let stride = n / BATCH;
        let mut envs = Vec::with_capacity(2 * blocks);
        for version in [1, 0] {
            for block in 0..blocks {
                let changes: Vec<Change> = (0..BATCH)
                    .map(|t| {
                        let i = t * stride + block;
                        Change::put(key(i), value(i, version))
                    })
                    .collect();
                let digest = producer.apply_changes(&changes);
                envs.extend(split_transaction(L, 1, digest, 0, changes, usize::MAX));
            }
        }
        assert_eq!(producer.digest(), replica.digest(), "the cycle is closed");
        assert_eq!(envs.len(), 2 * blocks);
        drop(producer);
        let mut cycle = ApplyCycle {
            replica,
            envs,
            next: 0,
        };
        // Touch every bucket once so no copy-on-write copy happens while timing.
        for _ in 0..cycle.envs.len() {
            cycle.apply();
        }
        cycle
    }

    /// Applies the next envelope of the cycle with position and digest checks.
    fn apply(&mut self) -> Applied {
        let env = &self.envs[self.next];
        self.next = (self.next + 1) % self.envs.len();
        self.replica.set_position(L, 0);
        match self.replica.apply(env) {
            Ok(applied) => applied,
            Err(e) => panic!("the cycle's envelopes apply: {e}"),
        }
    }

    /// Applies the next envelope's changes without checks.
    fn apply_changes(&mut self) -> Digest {
        let env = &self.envs[self.next];
        self.next = (self.next + 1) % self.envs.len();
        self.replica.apply_changes(&env.changes)
    }
}

fn apply(c: &mut Criterion) {
    for (label, n, blocks) in [("1k", 1_000, 1), ("1M", 1_000_000, 50)] {
        let mut cycle = ApplyCycle::new(n, blocks);
        let mut g = c.benchmark_group(format!("apply on {label} keys"));
        g.throughput(Throughput::Elements(BATCH as u64));
        g.bench_function("apply 1000 puts (digest verified)", |b| {
            b.iter(|| black_box(cycle.apply()))
        });
        g.bench_function("apply_changes 1000 puts (unchecked)", |b| {
            b.iter(|| black_box(cycle.apply_changes()))
        });
        g.finish();
    }
}

fn diffing(c: &mut Criterion) {
    const N: usize = 1_000_000;
    const CHANGED: usize = N / 100;
    let old = state_of(N);
    let mut new = old.clone();
    let edits: Vec<Change> = (0..CHANGED)
        .map(|j| {
            let i = j * (N / CHANGED);
            Change::put(key(i), value(i, 1))
        })
        .collect();
    new.apply_changes(&edits);
    assert_eq!(diff(&old, &new).len(), CHANGED);
    let mut g = c.benchmark_group("diff");
    g.throughput(Throughput::Elements(CHANGED as u64));
    g.bench_function("1M keys against a clone with 1% changed", |b| {
        b.iter(|| diff(black_box(&old), black_box(&new)))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = codec, hashing, apply, diffing
}
criterion_main!(benches);
