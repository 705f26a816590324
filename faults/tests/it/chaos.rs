//! The chaos run: a seeded random sequence of faults — nats-server restarted (SIGTERM) or
//! killed (SIGKILL), consumer processes killed with SIGKILL and restarted, an in-memory
//! consumer restarted, the producer restarted, garbage published on the pipeline's subject, an
//! envelope deleted from the stream, snapshots on demand (in-process and by the `snapshot`
//! command beside the running producer) — for a bounded time while the producer commits
//! random transactions. Then the faults stop, everything settles, and every replica (two on
//! disk, one in memory) is compared with the model of what was acknowledged, and the retained
//! stream is replayed from the latest snapshot through `State::apply`.
//!
//! `DELTASYNC_CHAOS_SEED` replays a run (the seed is printed first and is in every assertion
//! message); `DELTASYNC_CHAOS_SECS` sets how long faults are injected (default 20, at most
//! 3600). The seed fixes the sequence of faults and transactions; timing still varies.
//!
//! Talks to a nats-server (jetstream `sync_interval: always`, as production is advised to run)
//! through the producer library, the producer binary (`snapshot`), the consumer binary (child
//! processes with data directories and HTTP), the consumer library, and plain async-nats
//! calls for garbage, deletions and inspection.

use crate::support::*;
use deltasync_consumer::Reason;
use deltasync_core::codec::encode_envelope;
use deltasync_core::recovery::Classified;
use deltasync_core::{names, Applied, ApplyError, Digest, Envelope, Lineage};
use deltasync_nats::store;
use deltasync_producer::{Change, Producer};
use deltasync_testkit::NatsServer;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Keys the random transactions touch.
const KEYS: u64 = 3000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    ServerRestart,
    ServerKill,
    ConsumerKill,
    MemoryConsumerRestart,
    ProducerRestart,
    Garbage,
    DeleteMessage,
    Snapshot,
    SnapshotCommand,
}

/// Relative weights of the faults.
const FAULTS: [(Fault, u64); 9] = [
    (Fault::ServerRestart, 2),
    (Fault::ServerKill, 2),
    (Fault::ConsumerKill, 4),
    (Fault::MemoryConsumerRestart, 2),
    (Fault::ProducerRestart, 2),
    (Fault::Garbage, 3),
    (Fault::DeleteMessage, 3),
    (Fault::Snapshot, 2),
    (Fault::SnapshotCommand, 1),
];

fn pick(rng: &mut Rng) -> Fault {
    let total: u64 = FAULTS.iter().map(|(_, w)| w).sum();
    let mut r = rng.below(total);
    for (f, w) in FAULTS {
        if r < w {
            return f;
        }
        r -= w;
    }
    unreachable!("weights cover the range")
}

/// What the run counts and reports.
#[derive(Debug, Default)]
struct Tally {
    faults: BTreeMap<Fault, u64>,
    /// Faults drawn that had nothing to act on (no envelope below the latest snapshot, ...).
    skipped: u64,
    producer_runs: u64,
    consumer_runs: u64,
    /// Commits that failed (the producer stopped), leaving their transaction's outcome to be
    /// read from the stream: why.
    producer_failures: Vec<String>,
    /// Consumer processes that exited by themselves for any other reason (restarted too).
    consumer_exits: Vec<String>,
    /// Consumer processes started while the server was down, which exit at once by design
    /// (an unreachable NATS fails fast): restarted, as a supervisor would.
    supervised_restarts: u64,
}

fn seed() -> u64 {
    match std::env::var("DELTASYNC_CHAOS_SEED") {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("DELTASYNC_CHAOS_SEED={v:?} is not a u64: {e}")),
        Err(_) => getrandom::u64().expect("random seed"),
    }
}

fn duration() -> Duration {
    let secs = match std::env::var("DELTASYNC_CHAOS_SECS") {
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .unwrap_or_else(|e| panic!("DELTASYNC_CHAOS_SECS={v:?} is not a number: {e}")),
        Err(_) => 20,
    };
    Duration::from_secs(secs.clamp(1, 3600))
}

/// A foreign payload: random bytes, a truncated envelope, or an envelope of another version.
fn garbage(rng: &mut Rng) -> Vec<u8> {
    let env = encode_envelope(&Envelope {
        lineage: Lineage::random(),
        seq: 1 + rng.below(1000),
        part: 1,
        parts: 1,
        digest: Digest::ZERO,
        produced_at_ms: 0,
        changes: vec![Change::put("garbage", "1")],
    })
    .expect("encodes");
    match rng.below(3) {
        0 => (0..rng.below(200)).map(|_| rng.next_u64() as u8).collect(),
        1 => env[..1 + rng.below(env.len() as u64 - 1) as usize].to_vec(),
        _ => {
            let mut v = env;
            v[4] = 2 + rng.below(200) as u8;
            v
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_chaos_run_ends_with_every_replica_equal_to_the_model() {
    logs();
    binaries(); // may build them: before anything timed starts
    let seed = seed();
    let run_for = duration();
    eprintln!(
        "chaos: seed {seed} (replay with DELTASYNC_CHAOS_SEED={seed}), faults for {run_for:?}"
    );
    let ctx = format!("chaos seed {seed}");
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let mut tally = Tally::default();

    let mut server = NatsServer::start_with_config(
        "listen: 127.0.0.1:{port}\njetstream { store_dir: \"{store_dir}\", sync_interval: always }\n",
    );
    let s = settings(&server.url(), &unique("chaos"), |s| {
        s.snapshot.every_envelopes = 150;
        s.stream.max_messages = 2000;
        s.producer.batch_max_bytes = 32 * 1024; // large transactions span several envelopes
        s.consumer.resync_max_attempts = 8;
    });
    let dir = tempfile::tempdir().unwrap();
    let model = Arc::new(Mutex::new(Model::default()));
    let mut load = Load::start_with(
        Producer::start(s.clone()).await.unwrap(),
        model.clone(),
        rng.next_u64(),
        KEYS,
        3,
    );
    tally.producer_runs += 1;
    let mut children: Vec<ChildConsumer> = (0..2)
        .map(|i| {
            let id = format!("chaos-{i}");
            ChildConsumer::new(&s, &id, &dir.path().join(&id), dir.path())
        })
        .collect();
    for c in &mut children {
        c.start();
        tally.consumer_runs += 1;
    }
    let mut memory = InProcess::memory(s.clone(), "chaos-memory");
    tally.consumer_runs += 1;
    let js = js(&server.url()).await;

    // ------------------------------------------------------------------ faults
    while started.elapsed() < run_for {
        // Progress between faults: the pipeline must keep committing (a condition, not a sleep).
        let more = 10 + rng.below(60);
        let target = model.lock().unwrap().txns + more;
        let deadline = Instant::now() + DEADLINE;
        while model.lock().unwrap().txns < target && !load.is_finished() {
            assert!(
                Instant::now() < deadline,
                "{ctx}: no progress for {DEADLINE:?} (committed {}, waiting for {target})",
                model.lock().unwrap().txns
            );
            tokio::time::sleep(POLL).await;
        }
        if load.is_finished() {
            load = recover_load(load, &s, &model, &mut rng, &mut tally, &ctx).await;
        }
        supervise(&mut children, &mut tally);
        if memory.is_finished() {
            let r = memory.join().await;
            tally
                .consumer_exits
                .push(format!("chaos-memory ended: {:?}", r.err()));
            memory = InProcess::memory(s.clone(), "chaos-memory");
            tally.consumer_runs += 1;
        }

        let fault = pick(&mut rng);
        let acted = match fault {
            Fault::ServerRestart => {
                tokio::task::block_in_place(|| server.restart());
                true
            }
            Fault::ServerKill => {
                tokio::task::block_in_place(|| {
                    server.kill9();
                    server.start_again();
                });
                true
            }
            Fault::ConsumerKill => {
                let c = &mut children[rng.below(2) as usize];
                c.kill9();
                c.start();
                tally.consumer_runs += 1;
                true
            }
            Fault::MemoryConsumerRestart => {
                if let Err(e) = memory.stop_result().await {
                    tally
                        .consumer_exits
                        .push(format!("chaos-memory stopped with an error: {e}"));
                }
                memory = InProcess::memory(s.clone(), "chaos-memory");
                tally.consumer_runs += 1;
                true
            }
            Fault::ProducerRestart => {
                let report = load.finish().await;
                let producer = settle(report, &s, &model, &mut tally, &ctx).await;
                producer
                    .shutdown()
                    .await
                    .unwrap_or_else(|e| panic!("{ctx}: producer shutdown: {e}"));
                load = Load::start_with(
                    start_producer(&s, &ctx).await,
                    model.clone(),
                    rng.next_u64(),
                    KEYS,
                    3,
                );
                tally.producer_runs += 1;
                true
            }
            Fault::Garbage => {
                let payload = garbage(&mut rng);
                // The server may be restarting: a lost garbage message is no loss.
                let sent = match js
                    .publish(names::subject(&s.pipeline), payload.into())
                    .await
                {
                    Ok(ack) => ack.await.is_ok(),
                    Err(_) => false,
                };
                sent
            }
            Fault::DeleteMessage => delete_below_snapshot(&js, &s, &mut rng).await,
            Fault::Snapshot => {
                // Only the latest cut may be refused as stale (a newer snapshot exists).
                let _ = load.producer().snapshot().await;
                true
            }
            Fault::SnapshotCommand => {
                let log = dir.path().join("snapshot-command.log");
                let out = tokio::task::block_in_place(|| {
                    producer_command(&s, &log).arg("snapshot").status().unwrap()
                });
                assert!(
                    out.success(),
                    "{ctx}: the snapshot command failed beside the running producer:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                true
            }
        };
        if acted {
            *tally.faults.entry(fault).or_default() += 1;
        } else {
            tally.skipped += 1;
        }
    }

    // ------------------------------------------------------------------ settle and check
    let report = load.finish().await;
    let producer = settle(report, &s, &model, &mut tally, &ctx).await;
    let p = producer
        .flush()
        .await
        .unwrap_or_else(|e| panic!("{ctx}: final flush: {e}"));
    let model = model.lock().unwrap().clone();
    assert_eq!(
        p.digest,
        model.digest(),
        "{ctx}: the producer's digest is the model's"
    );
    let mut checked = 0;
    supervise(&mut children, &mut tally);
    for c in &mut children {
        c.wait_for(&p, DEADLINE * 2, &ctx).await;
        let status = c.terminate();
        assert!(
            status.success(),
            "{ctx}: consumer {} stopped with {status}",
            c.id
        );
        let (state, cursor) = c.read_replica();
        assert_eq!(
            (cursor.lineage, cursor.seq, cursor.digest),
            (p.lineage, p.seq, p.digest),
            "{ctx}: consumer {}'s committed cursor",
            c.id
        );
        checked += assert_matches_model(&format!("replica {} on disk", c.id), &state, &model, &ctx);
    }
    memory.wait_for(&p, DEADLINE * 2, &ctx).await;
    checked += memory.check(&p, &model, &ctx).await;
    let memory_status = memory.replica.status();
    memory.stop().await;

    // The retained stream, from the latest snapshot on, is one chain ending at the model.
    let kv = store::bucket(&js, &s).await.unwrap();
    let loaded = store::load_latest(&kv, &s)
        .await
        .unwrap_or_else(|e| panic!("{ctx}: the latest snapshot loads: {e}"))
        .expect("a snapshot");
    let mut state = loaded.state;
    let mut chained = 0u64;
    for (stream_seq, item) in read_stream(&js, &s.pipeline).await {
        if stream_seq <= loaded.manifest.stream_seq {
            continue;
        }
        if let Classified::Envelope(env) = item {
            match state.apply(&env) {
                Ok(Applied::Committed { .. } | Applied::Buffered { .. }) => chained += 1,
                Err(e @ (ApplyError::Duplicate { .. } | ApplyError::Stale { .. })) => {
                    panic!("{ctx}: a duplicate in the stream at {stream_seq}: {e}")
                }
                Err(e) => panic!("{ctx}: the chain breaks at stream seq {stream_seq}: {e}"),
            }
        }
    }
    assert_eq!(
        state.seq(),
        p.seq,
        "{ctx}: the chain ends at the producer's position"
    );
    checked += assert_matches_model("the replayed stream", &state, &model, &ctx);
    producer
        .shutdown()
        .await
        .unwrap_or_else(|e| panic!("{ctx}: final shutdown: {e}"));

    let injected: u64 = tally.faults.values().sum();
    eprintln!(
        "chaos: seed {seed}, {:.1?} of faults, {:.1?} in all; faults injected {injected} {:?} \
         ({} drawn with nothing to act on); runs: producer {}, consumers {} ({} restarts of a \
         consumer started during a server restart); transactions {} ({} changes; {} failed \
         commits resolved from the stream); envelopes replayed after the latest snapshot \
         {chained}; entries checked {checked}; lost 0; memory replica decisions {:?}",
        run_for,
        started.elapsed(),
        tally.faults,
        tally.skipped,
        tally.producer_runs,
        tally.consumer_runs,
        tally.supervised_restarts,
        model.txns,
        model.changes,
        tally.producer_failures.len(),
        memory_status.decisions,
    );
    for c in &children {
        let text = c.log_text();
        let resyncs: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("Re-snapshot") || l.contains("restored from the snapshot"))
            .collect();
        eprintln!(
            "consumer {}: {} runs, {} resync log lines",
            c.id,
            c.runs,
            resyncs.len()
        );
    }
    assert!(
        tally.producer_failures.is_empty(),
        "{ctx}: the producer stopped during the run (its transactions were resolved from the \
         stream, nothing was lost, but it should ride out these faults): {:#?}",
        tally.producer_failures
    );
    assert!(
        tally.consumer_exits.is_empty(),
        "{ctx}: consumers ended by themselves during the run: {:#?}",
        tally.consumer_exits
    );
    assert!(
        !memory_status
            .decisions
            .contains_key(Reason::DigestMismatch.as_str()),
        "{ctx}: no replica diverged: {:?}",
        memory_status.decisions
    );
}

/// Restarts the consumer processes that exited, as a supervisor would, sorting out the exits
/// that are by design (started while the server was down) from the others.
fn supervise(children: &mut [ChildConsumer], tally: &mut Tally) {
    for c in children {
        if let Some(status) = c.exited() {
            let tail = c.log_tail(3);
            // A consumer started while the server restarts fails fast at connect, as documented
            // (a supervisor restarts it): refused, reset by a server shutting down, or no INFO
            // from one not yet serving. Anything else ended a running consumer by itself.
            if tail.contains("deltasync-consumer: error: cannot connect to NATS") {
                tally.supervised_restarts += 1;
            } else {
                tally
                    .consumer_exits
                    .push(format!("{} exited ({status}): {tail}", c.id));
            }
            c.start();
            tally.consumer_runs += 1;
        }
    }
}

/// Starts a producer, retrying while the server is still coming back.
async fn start_producer(s: &deltasync_config::settings::Settings, ctx: &str) -> Producer {
    eventually(
        &format!("{ctx}: the producer to start"),
        DEADLINE,
        async || match Producer::start(s.clone()).await {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("{ctx}: producer start failed, retrying: {e}");
                None
            }
        },
    )
    .await
}

/// Turns a finished load into a working producer: when a commit failed, its transaction may or
/// may not be in the stream; a restarted producer recovers the stream's state, which must be
/// the model with or without that transaction, and the model follows it.
async fn settle(
    report: LoadReport,
    s: &deltasync_config::settings::Settings,
    model: &Arc<Mutex<Model>>,
    tally: &mut Tally,
    ctx: &str,
) -> Producer {
    let Some((txn, err)) = report.error else {
        return report.producer;
    };
    eprintln!("{ctx}: a commit failed ({err}); recovering the producer");
    tally.producer_failures.push(err.to_string());
    drop(report.producer.shutdown().await);
    let producer = start_producer(s, ctx).await;
    tally.producer_runs += 1;
    let recovered = producer.status().digest;
    let mut m = model.lock().unwrap();
    let mut with = m.clone();
    with.apply(&txn);
    if recovered == with.digest().to_hex() {
        *m = with;
    } else {
        assert_eq!(
            recovered,
            m.digest().to_hex(),
            "{ctx}: after a failed commit the stream holds neither the model nor the model plus \
             that transaction"
        );
    }
    producer
}

async fn recover_load(
    load: Load,
    s: &deltasync_config::settings::Settings,
    model: &Arc<Mutex<Model>>,
    rng: &mut Rng,
    tally: &mut Tally,
    ctx: &str,
) -> Load {
    let report = load.finish().await;
    let producer = settle(report, s, model, tally, ctx).await;
    Load::start_with(producer, model.clone(), rng.next_u64(), KEYS, 3)
}

/// Deletes one message at or below the latest snapshot's stream sequence (a replica behind it
/// finds a hole and re-snapshots past it; the producer's recovery starts at the snapshot).
async fn delete_below_snapshot(
    js: &async_nats::jetstream::Context,
    s: &deltasync_config::settings::Settings,
    rng: &mut Rng,
) -> bool {
    let Ok(kv) = store::bucket(js, s).await else {
        return false;
    };
    let Ok(Some((pointer, _))) = store::read_pointer(&kv).await else {
        return false;
    };
    let Ok(m) = store::read_manifest(&kv, &pointer.manifest).await else {
        return false;
    };
    let Ok(stream) = js.get_stream(names::stream_name(&s.pipeline)).await else {
        return false;
    };
    let Ok(info) = stream.get_info().await else {
        return false;
    };
    let first = info.state.first_sequence;
    if m.stream_seq < first {
        return false;
    }
    let victim = first + rng.below(m.stream_seq - first + 1);
    matches!(stream.delete_message(victim).await, Ok(true))
}
