//! The producer handle: start-up (connect, create the stream and bucket, recover the
//! pipeline's history), and the calls a Rust program makes (commit, submit, full state,
//! flush, snapshot, status, shutdown). The status they share lives in [`crate::shared`], the
//! data they hand each other in [`crate::handoff`].
//!
//! Talks to NATS only at start-up, through `deltasync_nats` (connect, stream and bucket,
//! recovery, the new lineage's first snapshot) and the publisher (the new lineage's first
//! envelope); after that it hands work to the batching engine (its own thread) and the
//! publisher task.
//!
//! ```text
//!  callers ──Command──▶ engine (thread: State, batching, digests, snapshot cuts)
//!                          │ Outgoing (bounded: backpressure)
//!                          ▼
//!                       publisher task ──publish──▶ stream   (window of ack futures)
//!                          │ cut + stream seq, once acknowledged
//!                          ▼
//!                       snapshot task ──────────▶ KV bucket
//! ```
//!
//! ## Invariants
//!
//! - A restart continues the recovered lineage, and only when recovery proved it saw every
//!   envelope of it (`recovery::decide`): it never reuses a sequence number. A new lineage
//!   starts only on an empty pipeline, through [`Producer::start_new_lineage`], or when the
//!   history is lost and `producer.on_lost_history = "new_lineage"`.
//! - A new lineage's first envelope is a marker published expecting the stream's last
//!   sequence: it fences every older writer, and the snapshot at it wins over theirs.
//! - Commit receipts, flushes and snapshot answers come after the envelopes they stand for
//!   are acknowledged by the stream.
//! - Once the producer failed (fenced, history broken), every call returns that failure.

use crate::budget::{self, Durable, Phase, RetentionLimits, Schedule};
use crate::engine::{Command, Engine};
use crate::error::{BoxError, ProducerError};
use crate::handoff::{Acked, CommitReceipt, SnapshotInfo};
use crate::metrics::Metrics;
use crate::publisher::{self, envelope_message, JetStream, NatsClient, Publisher};
use crate::shared::{Lifecycle, Observer, Shared, Status};
use crate::snapshots;
use bytes::Bytes;
use deltasync_config::settings::{OnLostHistory, Settings};
use deltasync_core::change::Key;
use deltasync_core::codec::encode_envelope;
use deltasync_core::envelope::{now_ms, Envelope, Lineage};
use deltasync_core::names;
use deltasync_core::snapshot::Manifest;
use deltasync_core::{Change, State};
use deltasync_nats::history::{HistoryError, Recovery};
use deltasync_nats::{history, store};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinHandle;

/// Changes `submit` buffers before handing them to the engine in one message.
const SUBMIT_CHUNK: usize = 1024;

/// Commands queued for the engine before callers wait (each carries up to a few thousand
/// changes).
const COMMAND_QUEUE: usize = 64;

/// Chunks of submitted changes (`submit`, `submit_many`) queued for the engine before
/// submitters wait. Such chunks come in bulk (an ingest reads far faster than the engine
/// applies): with the whole command queue theirs, 64 chunks of 4,096 changes, ~50 MB at
/// 100-byte values, sat queued, and their memory stayed with the allocator's arena of the
/// reading thread after they were freed. Four keep the engine fed.
const SUBMITS_QUEUED: usize = 4;

/// The durable position: the last envelope acknowledged by the stream.
pub use deltasync_core::Position;

/// A commit handed over without waiting; await [`PendingCommit::wait`] for its receipt.
#[derive(Debug)]
pub struct PendingCommit {
    rx: oneshot::Receiver<Result<CommitReceipt, ProducerError>>,
    shared: Arc<Shared>,
}

impl PendingCommit {
    /// Waits until the transaction is acknowledged by the stream.
    pub async fn wait(self) -> Result<CommitReceipt, ProducerError> {
        match self.rx.await {
            Ok(r) => r,
            Err(_) => Err(self.shared.stopped_error()),
        }
    }
}

/// How [`Producer::start_new_lineage`] starts the new history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewLineage {
    /// From an empty state (works even when the old history cannot be recovered).
    Empty,
    /// From the state recovered from the old lineage (which must be recoverable).
    KeepState,
}

/// Where a producer starts publishing.
struct Begin {
    state: State,
    expected_last: u64,
    acked: Acked,
    /// Stream sequence of envelope `acked.txn_seq`, the last complete transaction (before the
    /// parts of an abandoned one, when recovery found such parts at the end).
    txn_stream_seq: u64,
    manifest: Option<Manifest>,
    /// The state at `manifest`, when known: the producer's first snapshot is then
    /// incremental on it (segments of what changed since) rather than a full rewrite.
    base: Option<State>,
    foreign: u64,
}

/// The single writer of a pipeline's history.
///
/// Start it with [`Producer::start`], hand it changes, and shut it down to await the last
/// acknowledgements:
///
/// ```no_run
/// use deltasync_producer::{Change, Producer};
/// use deltasync_config::settings::{Overrides, Settings};
///
/// # async fn example() -> anyhow::Result<()> {
/// let settings = Settings::load(None, Overrides {
///     nats_url: Some("nats://127.0.0.1:4222".into()),
///     pipeline: Some("orders".into()),
///     ..Overrides::default()
/// })?;
/// let producer = Producer::start(settings).await?;
///
/// // An atomic transaction: returns once the stream has stored it.
/// let receipt = producer
///     .commit(vec![Change::put("order/1", &b"{\"qty\":5}"[..]), Change::delete("order/0")])
///     .await?;
/// println!("envelopes {}..={} digest {}", receipt.first_seq, receipt.last_seq, receipt.digest);
///
/// // The throughput path: changes batched into envelopes by count, bytes and linger.
/// for i in 0..100_000 {
///     producer.submit(Change::put(format!("k{i}"), i.to_string())).await?;
/// }
/// producer.flush().await?; // everything submitted so far is durable
///
/// // The full-state path: hand over the whole state, the producer publishes the difference.
/// producer
///     .commit_full_state([("order/1", "{\"qty\":6}"), ("order/2", "{\"qty\":1}")])
///     .await?;
///
/// producer.shutdown().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Producer {
    settings: Arc<Settings>,
    commands: mpsc::Sender<Command>,
    /// Places for chunks of submitted changes in the command queue (`SUBMITS_QUEUED`).
    submits: Arc<Semaphore>,
    buffer: Mutex<Vec<Change>>,
    shared: Arc<Shared>,
    client: NatsClient,
    publisher: JoinHandle<Result<Acked, ProducerError>>,
    snapshotter: JoinHandle<()>,
    engine: std::thread::JoinHandle<Result<(), ProducerError>>,
}

impl Producer {
    /// Connects, creates or updates the stream and bucket, recovers the pipeline's state
    /// (latest snapshot plus the envelopes after it) and continues its lineage; starts a new
    /// lineage when the pipeline has no history at all. When envelopes after the newest
    /// snapshot are gone, it refuses (naming what was lost), or with
    /// `producer.on_lost_history = "new_lineage"` starts a new lineage from that snapshot's
    /// state; it never continues the old lineage, which would reuse its sequence numbers.
    pub async fn start(settings: Settings) -> Result<Producer, ProducerError> {
        let (client, js) = connect(&settings).await?;
        let recovered = history::recover_history(&js, &settings)
            .await
            .map_err(|source| ProducerError::Recover { source })?;
        let begin = match recovered {
            Recovery::Continue(rec) => {
                let seq = rec.state.seq();
                tracing::info!(
                    lineage = %rec.state.lineage(),
                    seq,
                    digest = %rec.state.digest(),
                    keys = rec.state.len(),
                    snapshot_seq = rec.manifest.as_ref().map(|m| m.seq),
                    envelopes_after_snapshot = rec.envelopes_applied,
                    foreign = rec.foreign_messages,
                    abandoned_parts = rec.abandoned_parts,
                    stream_seq = rec.last_stream_seq,
                    "Recovered the pipeline; continuing its lineage"
                );
                Begin {
                    acked: Acked {
                        seq,
                        stream_seq: rec.last_envelope_stream_seq,
                        txn_seq: rec.txn_seq,
                        digest: rec.state.digest(),
                    },
                    txn_stream_seq: rec.txn_stream_seq,
                    expected_last: rec.last_stream_seq,
                    state: rec.state,
                    manifest: rec.manifest,
                    base: rec.snapshot_state,
                    foreign: rec.foreign_messages,
                }
            }
            Recovery::Empty => {
                let bounds = history::bounds(&js, &settings)
                    .await
                    .map_err(|source| ProducerError::Recover { source })?;
                let lineage = Lineage::random();
                tracing::info!(%lineage, stream_seq = bounds.last_seq, "The pipeline has no history: starting a new lineage");
                fresh(State::new(lineage), bounds.last_seq, None)
            }
            Recovery::Refused { refusal, snapshot }
                if refusal.is_lost_history()
                    && settings.producer.on_lost_history == OnLostHistory::NewLineage =>
            {
                let (state, from_seq) = match snapshot {
                    Some(s) => {
                        let (m, state) = *s;
                        (state, Some(m.seq))
                    }
                    None => (State::new(Lineage::default()), None),
                };
                tracing::error!(
                    lost = %refusal,
                    old_lineage = %state.lineage(),
                    from_snapshot_seq = from_seq,
                    keys = state.len(),
                    "History LOST: the old lineage cannot continue; starting a new lineage from the newest snapshot's state as producer.on_lost_history = \"new_lineage\" says (every consumer re-snapshots)"
                );
                let bounds = history::bounds(&js, &settings)
                    .await
                    .map_err(|source| ProducerError::Recover { source })?;
                begin_new_lineage(&js, &settings, state, bounds.last_seq).await?
            }
            Recovery::Refused { refusal, .. } => {
                return Err(ProducerError::Recover {
                    source: HistoryError::Refused {
                        stream: names::stream_name(&settings.pipeline),
                        refusal,
                    },
                })
            }
        };
        Producer::launch(settings, client, js, begin)
    }

    /// Starts a NEW lineage on the pipeline, whatever its history: an operator's decision
    /// when continuity is broken for good (history lost or corrupt). Every consumer then
    /// re-snapshots (reason "lineage changed").
    ///
    /// The new lineage starts from an empty state or from the old lineage's recovered state
    /// (when its newest envelopes are lost: the newest snapshot's). Its first envelope, a
    /// marker with no changes recording that state's digest, is published expecting the
    /// stream's last sequence, which fences the old producer (its next publish fails) and
    /// fails this call if another writer published meanwhile; a snapshot at the marker is
    /// written before anything else is published, so consumers can restore it, and it is
    /// later in the stream than any snapshot of the old lineage, which can no longer move
    /// `latest` back.
    pub async fn start_new_lineage(
        settings: Settings,
        from: NewLineage,
    ) -> Result<Producer, ProducerError> {
        let (client, js) = connect(&settings).await?;
        let recover_err = |source| ProducerError::Recover { source };
        let (state, expected_last) = match from {
            NewLineage::Empty => (State::new(Lineage::default()), None),
            NewLineage::KeepState => match history::recover_history(&js, &settings)
                .await
                .map_err(recover_err)?
            {
                Recovery::Continue(rec) => (rec.state, Some(rec.last_stream_seq)),
                Recovery::Empty => (State::new(Lineage::default()), None),
                Recovery::Refused {
                    refusal,
                    snapshot: Some(s),
                } if refusal.is_lost_history() => {
                    tracing::error!(lost = %refusal, snapshot_seq = s.0.seq, "History LOST after the newest snapshot; the new lineage keeps that snapshot's state");
                    (s.1, None)
                }
                Recovery::Refused { refusal, .. } => {
                    return Err(recover_err(HistoryError::Refused {
                        stream: names::stream_name(&settings.pipeline),
                        refusal,
                    }))
                }
            },
        };
        let expected_last = match expected_last {
            Some(e) => e,
            None => {
                history::bounds(&js, &settings)
                    .await
                    .map_err(recover_err)?
                    .last_seq
            }
        };
        let begin = begin_new_lineage(&js, &settings, state, expected_last).await?;
        Producer::launch(settings, client, js, begin)
    }

    fn launch(
        settings: Settings,
        client: NatsClient,
        js: JetStream,
        begin: Begin,
    ) -> Result<Producer, ProducerError> {
        let settings = Arc::new(settings);
        let lineage = begin.state.lineage();
        // What a reader can start from: the recovered snapshot of this lineage, or the
        // lineage's empty start (envelope 1 onwards).
        let covered = match &begin.manifest {
            Some(m) if m.lineage == lineage => Durable {
                seq: m.seq,
                stream_seq: m.stream_seq,
            },
            _ => Durable {
                seq: 0,
                stream_seq: if begin.state.seq() == 0 {
                    begin.expected_last
                } else {
                    0
                },
            },
        };
        let limits = RetentionLimits::tighter(&settings.stream, None);
        let shared = Arc::new(Shared {
            metrics: Metrics::new(),
            snapshot_phase: Phase::default(),
            durable: watch::Sender::new(covered),
            limits: watch::Sender::new(limits),
            status: Mutex::new(Status {
                pipeline: settings.pipeline.clone(),
                lineage: lineage.to_hex(),
                seq: begin.acked.seq,
                stream_seq: begin.acked.stream_seq,
                digest: begin.acked.digest.to_hex(),
                produced_seq: begin.state.seq(),
                foreign_messages: begin.foreign,
                last_snapshot: begin.manifest.as_ref().map(SnapshotInfo::from),
                phase: Lifecycle::Running,
                error: None,
                held_back: None,
                retention_limits: limits,
            }),
            lineage,
            failure: OnceLock::new(),
            ready: AtomicBool::new(false),
        });
        shared.metrics.foreign_messages.inc_by(begin.foreign);
        shared.metrics.last_seq.set(begin.acked.seq);

        let mut schedule = Schedule::new(&settings);
        let since = match &begin.manifest {
            Some(m) if m.lineage == lineage => begin.state.seq().saturating_sub(m.seq),
            _ => begin.state.seq(),
        };
        let age = begin
            .manifest
            .as_ref()
            .map(|m| Duration::from_millis(now_ms().saturating_sub(m.created_at_ms)));
        schedule.resume(since, age);

        let (out_tx, out_rx) = mpsc::channel(settings.producer.ack_window.max(16));
        let (snap_tx, snap_rx) = mpsc::unbounded_channel();
        let publisher = Publisher::new(
            js.clone(),
            &settings,
            lineage,
            begin.expected_last,
            begin.acked,
            shared.clone(),
            snap_tx,
        );
        let publisher = tokio::spawn(publisher.run(out_rx));
        let base = match (&begin.manifest, begin.base) {
            (Some(m), Some(s)) if m.lineage == lineage && s.seq() == m.seq => Some((m.clone(), s)),
            _ => None,
        };
        let snapshotter = tokio::spawn(snapshots::run(
            js,
            settings.clone(),
            shared.clone(),
            snap_rx,
            base,
        ));

        let txn = Durable {
            seq: begin.acked.txn_seq,
            stream_seq: begin.txn_stream_seq,
        };
        let engine = Engine::new(
            &settings,
            begin.state,
            txn,
            schedule,
            out_tx,
            shared.clone(),
        );
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| {
                ProducerError::Internal(format!("cannot build the engine's runtime: {e}"))
            })?;
        let engine = std::thread::Builder::new()
            .name(format!("deltasync-engine-{}", settings.pipeline))
            .spawn(move || runtime.block_on(engine.run(cmd_rx)))
            .map_err(|e| ProducerError::Internal(format!("cannot start the engine thread: {e}")))?;
        shared.ready.store(true, Ordering::Release);
        Ok(Producer {
            settings,
            commands: cmd_tx,
            submits: Arc::new(Semaphore::new(SUBMITS_QUEUED)),
            buffer: Mutex::new(Vec::new()),
            shared,
            client,
            publisher,
            snapshotter,
            engine,
        })
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The lineage it publishes.
    pub fn lineage(&self) -> Lineage {
        self.shared.lineage
    }

    /// Commits one atomic transaction and returns once it is durable (acknowledged by the
    /// stream): one envelope, or consecutive parts a replica applies all or nothing when it
    /// exceeds `producer.batch_max_bytes`. Changes submitted earlier come first.
    ///
    /// An empty transaction publishes one empty envelope (a marker in the history).
    pub async fn commit(&self, changes: Vec<Change>) -> Result<CommitReceipt, ProducerError> {
        self.submit_transaction(changes).await?.wait().await
    }

    /// Hands over one atomic transaction without waiting for it to be durable; the returned
    /// handle waits. Transactions and submitted changes are published in the order handed
    /// over.
    pub async fn submit_transaction(
        &self,
        changes: Vec<Change>,
    ) -> Result<PendingCommit, ProducerError> {
        self.submit_transaction_if(changes, None).await
    }

    /// Commits one atomic transaction only if the head (the last envelope handed over,
    /// whatever is still batched included) is `if_seq` when its turn comes; otherwise
    /// nothing of it is published and the wait returns [`ProducerError::HeadMoved`] with the
    /// head. The check and the commit are one step of the engine: no other commit can come
    /// between them. `None` commits unconditionally, like [`Producer::commit`].
    pub async fn commit_if(
        &self,
        changes: Vec<Change>,
        if_seq: Option<u64>,
    ) -> Result<CommitReceipt, ProducerError> {
        self.submit_transaction_if(changes, if_seq)
            .await?
            .wait()
            .await
    }

    async fn submit_transaction_if(
        &self,
        changes: Vec<Change>,
        if_seq: Option<u64>,
    ) -> Result<PendingCommit, ProducerError> {
        validate(&changes)?;
        crate::engine::check_transaction(&self.settings, &changes)?;
        self.flush_buffer().await?;
        let (tx, rx) = oneshot::channel();
        self.send(Command::Transaction {
            changes,
            if_seq,
            reply: Some(tx),
        })
        .await?;
        Ok(PendingCommit {
            rx,
            shared: self.shared.clone(),
        })
    }

    /// Queues one change for publication, batched with others into envelopes (by
    /// `producer.batch_max_changes`, `batch_max_bytes` and `linger`). Returns once queued;
    /// waits only when the producer is `ack_window` envelopes behind (backpressure). Call
    /// [`Producer::flush`] to wait until everything submitted is durable.
    pub async fn submit(&self, change: Change) -> Result<(), ProducerError> {
        change
            .validate()
            .map_err(|source| ProducerError::InvalidChange { index: 0, source })?;
        let full = {
            let mut buf = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
            buf.push(change);
            (buf.len() >= SUBMIT_CHUNK).then(|| std::mem::take(&mut *buf))
        };
        match full {
            Some(chunk) => self.send_submit(chunk).await,
            None => Ok(()),
        }
    }

    /// Queues many changes at once (the fastest path: no per-change work besides the limit
    /// check); batched like [`Producer::submit`].
    pub async fn submit_many(&self, changes: Vec<Change>) -> Result<(), ProducerError> {
        validate(&changes)?;
        self.flush_buffer().await?;
        if changes.is_empty() {
            return Ok(());
        }
        self.send_submit(changes).await
    }

    /// Replaces the whole state: publishes, as one atomic transaction, the puts and deletes
    /// that turn the current state into `entries` (the full-state path). Nothing is published
    /// when they are equal. Hashing the new state costs about a microsecond per entry, in the
    /// caller's task.
    pub async fn commit_full_state<K, V>(
        &self,
        entries: impl IntoIterator<Item = (K, V)>,
    ) -> Result<CommitReceipt, ProducerError>
    where
        K: Into<Key>,
        V: Into<Bytes>,
    {
        let mut state = State::new(self.lineage());
        for (i, (k, v)) in entries.into_iter().enumerate() {
            let c = Change::put(k, v);
            c.validate()
                .map_err(|source| ProducerError::InvalidChange { index: i, source })?;
            if let Change::Put { key, value } = c {
                state.insert(key, value);
            }
        }
        self.commit_state(state).await
    }

    /// Like [`Producer::commit_full_state`], with the new state already built.
    pub async fn commit_state(&self, state: State) -> Result<CommitReceipt, ProducerError> {
        self.flush_buffer().await?;
        let (tx, rx) = oneshot::channel();
        self.send(Command::FullState {
            state: Box::new(state),
            reply: Some(tx),
        })
        .await?;
        PendingCommit {
            rx,
            shared: self.shared.clone(),
        }
        .wait()
        .await
    }

    /// Publishes whatever is batched and waits until everything handed over so far is
    /// acknowledged; returns the durable position.
    pub async fn flush(&self) -> Result<Position, ProducerError> {
        self.flush_buffer().await?;
        let (tx, rx) = oneshot::channel();
        self.send(Command::Flush(tx)).await?;
        rx.await
            .unwrap_or_else(|_| Err(self.shared.stopped_error()))
    }

    /// Takes a snapshot now (a cut at the current position, written once that position is
    /// durable) and returns it.
    pub async fn snapshot(&self) -> Result<SnapshotInfo, ProducerError> {
        self.flush_buffer().await?;
        let (tx, rx) = oneshot::channel();
        self.send(Command::Snapshot(tx)).await?;
        rx.await
            .unwrap_or_else(|_| Err(self.shared.stopped_error()))
    }

    /// The NATS connection it publishes on (for the write API's service, which answers on it).
    pub(crate) fn client(&self) -> &NatsClient {
        &self.client
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.shared.status_lock().clone()
    }

    /// A view for health checks, status and metrics (see [`crate::http`]).
    pub fn observer(&self) -> Observer {
        Observer(self.shared.clone())
    }

    /// Stops taking input, publishes what is batched, awaits every outstanding
    /// acknowledgement and the snapshot being written, writes a final snapshot when envelopes
    /// are not covered by a durable one yet, and returns the final status. A failed final
    /// snapshot is an error (logged at ERROR): the history is intact, but a stream whose
    /// retention prunes could drop envelopes no snapshot holds until the producer runs again.
    pub async fn shutdown(self) -> Result<Status, ProducerError> {
        self.shared.ready.store(false, Ordering::Release);
        self.shared.set_phase(Lifecycle::ShuttingDown);
        let flushed = self.flush_buffer().await;
        let Producer {
            commands,
            shared,
            client,
            publisher,
            snapshotter,
            engine,
            ..
        } = self;
        drop(commands);
        let published = publisher
            .await
            .map_err(|e| ProducerError::Internal(format!("publisher task: {e}")))?;
        snapshotter
            .await
            .map_err(|e| ProducerError::Internal(format!("snapshot task: {e}")))?;
        let ended = tokio::task::spawn_blocking(move || engine.join())
            .await
            .map_err(|e| ProducerError::Internal(format!("engine thread: {e}")))?
            .map_err(|_| ProducerError::Internal("the engine thread panicked".into()))?;
        if let Err(e) = publisher::flush_client(&client).await {
            tracing::warn!(error = %e, "Flushing the NATS connection at shutdown failed");
        }
        flushed?;
        let acked = published?;
        ended?;
        if shared.has_failed() {
            // E.g. the engine gave up on input it could not publish (held back at the stop).
            return Err(shared.stopped_error());
        }
        shared.set_phase(Lifecycle::Stopped);
        let status = shared.status_lock().clone();
        tracing::info!(
            seq = acked.seq,
            stream_seq = acked.stream_seq,
            "Producer shut down; every envelope acknowledged"
        );
        Ok(status)
    }

    async fn flush_buffer(&self) -> Result<(), ProducerError> {
        let chunk = {
            let mut buf = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
            std::mem::take(&mut *buf)
        };
        if chunk.is_empty() {
            return Ok(());
        }
        self.send_submit(chunk).await
    }

    /// Hands over a chunk of submitted changes once one of its places in the queue is free.
    async fn send_submit(&self, changes: Vec<Change>) -> Result<(), ProducerError> {
        let room = self
            .submits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| self.shared.stopped_error())?;
        self.send(Command::Submit(changes, room)).await
    }

    async fn send(&self, cmd: Command) -> Result<(), ProducerError> {
        if let Some(cause) = self.shared.failure.get() {
            return Err(ProducerError::shared(cause));
        }
        self.commands
            .send(cmd)
            .await
            .map_err(|_| self.shared.stopped_error())
    }
}

/// Starts a new lineage holding `state`'s entries: publishes its first envelope, a marker
/// with no changes recording the state's digest, expecting the stream's last sequence to be
/// `expected_last` (a fence: any other writer's next publish fails, and so does this one if
/// another writer published meanwhile), then writes a snapshot at the marker.
async fn begin_new_lineage(
    js: &JetStream,
    settings: &Settings,
    mut state: State,
    expected_last: u64,
) -> Result<Begin, ProducerError> {
    let lineage = Lineage::random();
    let old = state.lineage();
    state.set_position(lineage, 1);
    let marker = Envelope {
        lineage,
        seq: 1,
        part: 1,
        parts: 1,
        digest: state.digest(),
        produced_at_ms: now_ms(),
        changes: Vec::new(),
    };
    let payload =
        encode_envelope(&marker).map_err(|source| ProducerError::Encode { seq: 1, source })?;
    let stream = names::stream_name(&settings.pipeline);
    let publish_err = |source: BoxError| ProducerError::Publish {
        stream: stream.clone(),
        seq: 1,
        source: format!(
            "publishing the new lineage's first envelope expecting the stream's last sequence \
             {expected_last} (another writer publishing? stop it first): {source}"
        )
        .into(),
    };
    let msg = envelope_message(payload.into(), lineage, 1, expected_last, false);
    let stream_seq = publisher::publish_one(js, names::subject(&settings.pipeline), msg)
        .await
        .map_err(publish_err)?;
    let manifest = store::write_snapshot(js, settings, &state, stream_seq, None)
        .await
        .map_err(|source| ProducerError::Snapshot { seq: 1, source })?;
    tracing::warn!(
        %lineage,
        previous_lineage = %old,
        keys = state.len(),
        stream_seq,
        "Started a NEW lineage: continuity with the previous history is broken; consumers will re-snapshot"
    );
    Ok(fresh(state, stream_seq, Some(manifest)))
}

fn fresh(state: State, stream_seq: u64, manifest: Option<Manifest>) -> Begin {
    Begin {
        acked: Acked {
            seq: state.seq(),
            stream_seq,
            txn_seq: state.seq(),
            digest: state.digest(),
        },
        txn_stream_seq: stream_seq,
        expected_last: stream_seq,
        base: manifest.as_ref().map(|_| state.clone()),
        state,
        manifest,
        foreign: 0,
    }
}

fn validate(changes: &[Change]) -> Result<(), ProducerError> {
    for (index, c) in changes.iter().enumerate() {
        c.validate()
            .map_err(|source| ProducerError::InvalidChange { index, source })?;
    }
    Ok(())
}

/// Connects and makes sure the stream and bucket exist with the settings' limits.
pub(crate) async fn connect(settings: &Settings) -> Result<(NatsClient, JetStream), ProducerError> {
    settings.validate()?;
    budget::check_retention(settings)?;
    let client = deltasync_nats::connect(&settings.nats).await?;
    let js = deltasync_nats::jetstream(client.clone(), &settings.nats);
    deltasync_nats::ensure_stream(&js, settings).await?;
    deltasync_nats::ensure_bucket(&js, settings).await?;
    Ok((client, js))
}
