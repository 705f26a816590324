//! The durable replica's store against well-kept embedded stores, on the same commit groups:
//! the comparison issue 13 asks for before keeping a hand-made store.
//!
//! A component benchmark, not a path users run: no NATS. Every variant applies the same
//! envelopes to an in-memory `State` (the replica every design keeps, for its digest) on
//! one thread and hands each commit group to a writer thread, one group in flight, as the
//! consumer engine does: the time is until the last group is durable. Variants:
//!
//! - `memory`: no writer (the reference).
//! - `local log`: the consumer's `LocalStore` — one log record per group (changes and
//!   cursor), `fdatasync`, a local snapshot written from a clone of the state in the
//!   background when the log has grown to twice the replica.
//! - `redb`: one write transaction per group (every put and delete, and the cursor), committed
//!   with redb's default durability (`Immediate`): "redb with larger transactions".
//! - `fjall`: one write batch per group into an LSM keyspace, the cursor in the same batch,
//!   then `persist(SyncData)`; flushes and compactions run in fjall's own threads.
//!
//! Bytes written are the process's `write_bytes` (`/proc/self/io`) from open to close,
//! background work included; the restart reads the store back into a `State` as a restarted
//! consumer must, and checks its digest against the memory variant's.
//!
//! `make bench-stores` runs it (it builds with `--features store-compare`, which nothing
//! else needs).

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use clap::Parser;
use deltasync_consumer::local::LocalStore;
use deltasync_consumer::{BatchKind, ChangeBatch, Position};
use deltasync_core::state::Prepared;
use deltasync_core::{Change, Digest, Lineage, State};
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "The durable replica's local log store against redb and fjall")]
struct Args {
    /// Changes applied (puts over `--keys` keys, drawn at random).
    #[arg(long, default_value_t = 1_000_000)]
    changes: usize,
    /// Distinct keys the puts are drawn from.
    #[arg(long, default_value_t = 1_000_000)]
    keys: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// One delete every this many changes (0: none).
    #[arg(long, default_value_t = 10)]
    delete_every: usize,
    /// Changes per envelope.
    #[arg(long, default_value_t = 4096)]
    envelope: usize,
    /// Envelopes per commit group, one run per value: 64 is `consumer.commit_every_envelopes`
    /// (a backlog), 1 a replica following a slow stream.
    #[arg(long, value_delimiter = ',', default_value = "64,1")]
    groups: Vec<usize>,
    /// Rounds per variant; each reports its fastest.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Variants to run (`memory` always runs: the others' reference).
    #[arg(long, value_delimiter = ',', default_value = "local-log,redb,fjall")]
    stores: Vec<String>,
}

const VARIANTS: [&str; 4] = ["memory", "local log", "redb", "fjall"];

/// One round of one variant.
struct Run {
    elapsed: Duration,
    written: u64,
    on_disk: u64,
    restart: Duration,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.envelope > 0 && args.keys > 0 && args.rounds > 0,
        "--envelope, --keys and --rounds must be positive"
    );
    for s in &args.stores {
        ensure!(
            VARIANTS[1..].contains(&s.replace('-', " ").as_str()),
            "--stores {s:?}: the stores are local-log, redb and fjall"
        );
    }
    let envelopes = workload(&args);
    let applied: usize = envelopes
        .iter()
        .flat_map(|e| &e.changes)
        .map(|c| c.key().len() + c.value().map_or(0, |v| v.len()))
        .sum();
    let mut want = State::new(Lineage(LINEAGE));
    for e in &envelopes {
        want.apply_changes(&e.changes);
    }
    println!(
        "{} changes in {} envelopes, {} keys at the end, {:.1} MiB of keys and values applied",
        args.changes,
        envelopes.len(),
        want.len(),
        applied as f64 / MIB
    );
    for &group in &args.groups {
        let groups: Vec<Vec<Arc<ChangeBatch>>> =
            envelopes.chunks(group.max(1)).map(<[_]>::to_vec).collect();
        println!(
            "\n### {group} envelope(s) per commit ({} commits)\n",
            groups.len()
        );
        println!("| store | apply + durable | vs memory | written | on disk | restart |");
        println!("|---|---|---|---|---|---|");
        let mut memory_best = None;
        // Rounds alternate the variants, so a slow spell of the machine hits each alike.
        let mut best: Vec<Option<Run>> = VARIANTS.iter().map(|_| None).collect();
        for _ in 0..args.rounds {
            for (i, name) in VARIANTS.iter().enumerate() {
                if i > 0 && !args.stores.iter().any(|s| s.replace('-', " ") == *name) {
                    continue;
                }
                let run = run(name, &groups, want.digest())
                    .with_context(|| format!("variant {name}, {group} envelope(s) a commit"))?;
                if best[i].as_ref().is_none_or(|b| run.elapsed < b.elapsed) {
                    best[i] = Some(run);
                }
            }
        }
        for (name, run) in VARIANTS.iter().zip(best) {
            let Some(run) = run else {
                continue; // not asked for
            };
            let secs = run.elapsed.as_secs_f64();
            let memory = *memory_best.get_or_insert(secs);
            let durable = *name != "memory";
            println!(
                "| {name} | {:.2} s, {:.0}k changes/s | {:.2}× | {} | {} | {} |",
                secs,
                args.changes as f64 / secs / 1e3,
                memory / secs,
                if durable {
                    format!(
                        "{:.0} MiB ({:.2}× applied)",
                        run.written as f64 / MIB,
                        run.written as f64 / applied as f64
                    )
                } else {
                    "—".into()
                },
                if durable {
                    format!("{:.0} MiB", run.on_disk as f64 / MIB)
                } else {
                    "—".into()
                },
                if durable {
                    format!("{:.2} s", run.restart.as_secs_f64())
                } else {
                    "—".into()
                },
            );
        }
    }
    Ok(())
}

const MIB: f64 = 1024.0 * 1024.0;
const LINEAGE: [u8; 16] = [7; 16];

/// The envelopes: puts of random values over `keys` keys, a delete every `delete_every`
/// changes, deterministic (xorshift) so that runs compare.
fn workload(a: &Args) -> Vec<Arc<ChangeBatch>> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::new();
    let mut changes = Vec::with_capacity(a.envelope);
    for i in 0..a.changes {
        let key = format!("key-{:08}", next() % a.keys as u64);
        if a.delete_every > 0 && i % a.delete_every == a.delete_every - 1 {
            changes.push(Change::delete(key));
        } else {
            let mut v = Vec::with_capacity(a.value_bytes + 8);
            while v.len() < a.value_bytes {
                v.extend_from_slice(&next().to_le_bytes());
            }
            v.truncate(a.value_bytes);
            changes.push(Change::put(key, Bytes::from(v)));
        }
        if changes.len() == a.envelope || i + 1 == a.changes {
            let seq = out.len() as u64 + 1;
            out.push(Arc::new(ChangeBatch {
                lineage: Lineage(LINEAGE),
                prev_seq: seq - 1,
                seq,
                kind: BatchKind::Applied,
                changes: std::mem::take(&mut changes),
            }));
        }
    }
    out
}

/// What the writer thread does with each group: its store's commit.
type Commit = Box<dyn FnMut(&[Arc<ChangeBatch>], Position, Option<State>) -> Result<()> + Send>;

/// One round: opens the variant's store in a fresh directory, applies and commits every
/// group, closes it, reads it back.
fn run(name: &str, groups: &[Vec<Arc<ChangeBatch>>], want: Digest) -> Result<Run> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().to_path_buf();
    let written_before = written_bytes()?;
    let local = match name {
        "local log" => Some(LocalStore::open_durable(&path, "compare")?),
        _ => None,
    };
    let commit: Option<Commit> = match name {
        "memory" => None,
        "local log" => {
            let store = local.clone().context("opened above")?;
            Some(Box::new(move |batches, cursor, snapshot| {
                Ok(store.commit(batches, &cursor, snapshot)?)
            }))
        }
        "redb" => Some(redb_commit(&path)?),
        "fjall" => Some(fjall_commit(&path)?),
        other => anyhow::bail!("no variant {other}"),
    };

    let t = Instant::now();
    let mut state = State::new(Lineage(LINEAGE));
    let final_state = std::thread::scope(|scope| -> Result<State> {
        let writer = commit.map(|mut commit| {
            // One group in flight while the next is applied, as the engine does.
            let (tx, rx) =
                mpsc::sync_channel::<(Vec<Arc<ChangeBatch>>, Position, Option<State>)>(0);
            let handle = scope.spawn(move || -> Result<()> {
                for (batches, cursor, snapshot) in rx {
                    commit(&batches, cursor, snapshot)?;
                }
                Ok(())
            });
            (tx, handle)
        });
        for group in groups {
            for b in group {
                state.apply_changes(&b.changes);
            }
            let last = group.last().context("empty group")?;
            state.set_position(last.lineage, last.seq);
            let cursor = Position {
                lineage: last.lineage,
                seq: last.seq,
                stream_seq: last.seq,
                digest: state.digest(),
            };
            if let Some((tx, _)) = &writer {
                let snapshot = local
                    .as_ref()
                    .filter(|l| l.wants_snapshot(state.len()))
                    .map(|_| state.clone());
                if tx.send((group.clone(), cursor, snapshot)).is_err() {
                    break; // the writer failed: its error is below
                }
            }
        }
        if let Some((tx, handle)) = writer {
            drop(tx);
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
        }
        Ok(std::mem::replace(&mut state, State::new(Lineage(LINEAGE))))
    })?;
    let elapsed = t.elapsed();
    ensure!(
        final_state.digest() == want,
        "{name}: the replica's digest differs"
    );
    // The stores are closed by now (the writer thread dropped its handle; the local store's
    // last handle, dropped here, waits for a local snapshot being written): what they wrote
    // for these changes is counted, except work a store leaves for after a restart (fjall
    // recovers unflushed memtables from its journal).
    drop(local);
    let written = written_bytes()? - written_before;
    let on_disk = dir_size(&path)?;

    let t = Instant::now();
    let restarted = match name {
        "memory" => want,
        "local log" => {
            let loaded = LocalStore::open_durable(&path, "compare")?
                .load()?
                .context("nothing on disk")?;
            ensure!(loaded.intact(), "the local store's replica is not intact");
            loaded.computed
        }
        "redb" => redb_read(&path)?.digest(),
        "fjall" => fjall_read(&path)?.digest(),
        _ => unreachable!("matched above"),
    };
    let restart = t.elapsed();
    ensure!(
        restarted == want,
        "{name}: the replica read back has another digest"
    );
    Ok(Run {
        elapsed,
        written,
        on_disk,
        restart,
    })
}

const ENTRIES: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("entries");
const META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");

fn redb_commit(dir: &Path) -> Result<Commit> {
    let db = redb::Database::create(dir.join("replica.redb"))?;
    Ok(Box::new(move |batches, cursor, _| {
        let tx = db.begin_write()?;
        {
            let mut entries = tx.open_table(ENTRIES)?;
            for c in batches.iter().flat_map(|b| &b.changes) {
                match c {
                    Change::Put { key, value } => {
                        entries.insert(&**key, &value[..])?;
                    }
                    Change::Delete { key } => {
                        entries.remove(&**key)?;
                    }
                }
            }
            tx.open_table(META)?
                .insert("cursor", &cursor.encode()[..])?;
        }
        tx.commit()?;
        Ok(())
    }))
}

fn redb_read(dir: &Path) -> Result<State> {
    use redb::{ReadableDatabase, ReadableTable};
    let db = redb::Database::create(dir.join("replica.redb"))?;
    let tx = db.begin_read()?;
    let table = tx.open_table(ENTRIES)?;
    let mut state = State::new(Lineage(LINEAGE));
    let mut batch: Vec<(String, Vec<u8>)> = Vec::with_capacity(BATCH);
    for row in table.iter()? {
        let (k, v) = row?;
        batch.push((k.value().to_owned(), v.value().to_vec()));
        if batch.len() == BATCH {
            link(&mut state, &mut batch);
        }
    }
    link(&mut state, &mut batch);
    Ok(state)
}

fn fjall_commit(dir: &Path) -> Result<Commit> {
    let db = fjall::Database::builder(dir).open()?;
    let entries = db.keyspace("entries", fjall::KeyspaceCreateOptions::default)?;
    let meta = db.keyspace("meta", fjall::KeyspaceCreateOptions::default)?;
    Ok(Box::new(move |batches, cursor, _| {
        let mut batch = db.batch();
        for c in batches.iter().flat_map(|b| &b.changes) {
            match c {
                Change::Put { key, value } => batch.insert(&entries, &**key, &value[..]),
                Change::Delete { key } => batch.remove(&entries, &**key),
            }
        }
        batch.insert(&meta, "cursor", &cursor.encode()[..]);
        batch.commit()?;
        db.persist(fjall::PersistMode::SyncData)?;
        Ok(())
    }))
}

fn fjall_read(dir: &Path) -> Result<State> {
    let db = fjall::Database::builder(dir).open()?;
    let entries = db.keyspace("entries", fjall::KeyspaceCreateOptions::default)?;
    let mut state = State::new(Lineage(LINEAGE));
    let mut batch: Vec<(String, Vec<u8>)> = Vec::with_capacity(BATCH);
    for kv in entries.iter() {
        let (k, v) = kv.into_inner()?;
        batch.push((String::from_utf8(k.to_vec())?, v.to_vec()));
        if batch.len() == BATCH {
            link(&mut state, &mut batch);
        }
    }
    link(&mut state, &mut batch);
    Ok(state)
}

/// Entries read back per prepared batch.
const BATCH: usize = 4096;

/// Links read entries into `state` as a restore does (hashed together, then linked).
fn link(state: &mut State, batch: &mut Vec<(String, Vec<u8>)>) {
    let mut p = Prepared::puts(batch.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
    state.put_prepared(&mut p);
    batch.clear();
}

fn written_bytes() -> Result<u64> {
    let io = std::fs::read_to_string("/proc/self/io").context("reading /proc/self/io")?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no write_bytes in /proc/self/io")
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let meta = e.metadata()?;
        total += if meta.is_dir() {
            dir_size(&e.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}
