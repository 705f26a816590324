//! The batching engine: owns the producer's `State`, groups submitted changes into envelopes
//! (by count, bytes and linger), keeps explicit transactions atomic (one envelope, or a
//! multi-part split), computes each envelope's digest, and schedules snapshot cuts.
//!
//! Talks to no server: it runs on its own thread (the CPU-bound half of the producer: state
//! updates and digests) and hands envelopes, in order, to the publisher task over a bounded
//! channel — which is where backpressure from the acknowledgement window reaches callers.
//!
//! ## Invariants
//!
//! - Envelopes leave the engine with consecutive sequences from the recovered position + 1;
//!   the state's position is always the last envelope handed over.
//! - A transaction's changes are applied to the state at once and its parts leave back to
//!   back, nothing in between; its digest is the state's after all of it.
//! - Changes submitted earlier are in envelopes before changes submitted later (a pending
//!   batch is sealed before a transaction, a full state, a flush or a snapshot cut).
//! - No envelope leaves before the stream's retention can keep it together with every
//!   envelope after the newest durable snapshot ([`Horizon`]); otherwise the engine cuts a
//!   snapshot of its live state (a transaction boundary) and waits until it is durable. The
//!   wait is here, not in the publisher: a snapshot is written only once the publisher has
//!   its last envelope acknowledged.
//! - A transaction that could not fit even right after a snapshot is refused whole.
//! - When its input ends, envelopes not yet covered by a durable snapshot get a final one.
//! - A snapshot is cut only at the end of a complete transaction. Recovery can leave the state
//!   positioned on the parts of a transaction abandoned by a crash (never applied); until the
//!   engine produces its next envelope, every cut (scheduled, for room, asked for, final) is
//!   at the last complete transaction before them instead, relabelled to its sequence and
//!   stream sequence — the state is the same, and a reader following from there skips the
//!   abandoned parts.

use crate::budget::{Admit, Durable, Horizon, RetentionLimits, Schedule, Stuck, Unblock};
use crate::error::ProducerError;
use crate::handoff::{CommitReceipt, Notify, Outgoing, SnapshotInfo, SnapshotJob};
use crate::shared::Shared;
use deltasync_config::settings::{Settings, ENVELOPE_STREAM_OVERHEAD};
use deltasync_core::envelope::{now_ms, split_transaction, Envelope, Lineage, MAX_TXN_PARTS};
use deltasync_core::state::free_in_background;
use deltasync_core::{diff, Change, State};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// How soon a due snapshot trigger is looked at again while a snapshot is still being written.
const SNAPSHOT_RECHECK: Duration = Duration::from_millis(200);

/// What callers ask of the engine, in order.
#[derive(Debug)]
pub(crate) enum Command {
    /// Changes with no atomicity asked: batched freely. The permit is one of the few places
    /// such chunks have in the queue ([`crate::producer`]'s `SUBMITS_QUEUED`), given back once
    /// the engine has taken them into envelopes.
    Submit(Vec<Change>, tokio::sync::OwnedSemaphorePermit),
    /// An atomic transaction; with `if_seq`, only when the head is still that sequence.
    Transaction {
        changes: Vec<Change>,
        if_seq: Option<u64>,
        reply: Option<oneshot::Sender<Result<CommitReceipt, ProducerError>>>,
    },
    /// A full state: commit the difference from the current one, atomically.
    FullState {
        state: Box<State>,
        reply: Option<oneshot::Sender<Result<CommitReceipt, ProducerError>>>,
    },
    /// Answered when everything before is acknowledged.
    Flush(oneshot::Sender<Result<deltasync_core::Position, ProducerError>>),
    /// Take a snapshot now.
    Snapshot(oneshot::Sender<Result<SnapshotInfo, ProducerError>>),
}

/// The engine's state; see the module documentation.
pub(crate) struct Engine {
    state: State,
    lineage: Lineage,
    batch: Vec<Change>,
    batch_bytes: usize,
    /// When the pending batch must be sealed (first change + linger).
    linger_until: Option<Instant>,
    max_changes: usize,
    max_bytes: usize,
    linger: Duration,
    out: mpsc::Sender<Outgoing>,
    shared: Arc<Shared>,
    schedule: Schedule,
    /// The retention budget counted from the newest durable snapshot.
    horizon: Horizon,
    /// The snapshot task's news of durable snapshots.
    durable: watch::Receiver<Durable>,
    /// The retention limits (the tighter of the settings and the stream's own), re-read by
    /// the snapshot task.
    limits: watch::Receiver<RetentionLimits>,
    /// Envelope sequence of the last cut handed to the snapshot task (not cut again while it
    /// is being written).
    last_cut: u64,
    /// The last complete transaction (envelope and stream sequence) while the state's
    /// position is past it, on the parts of a transaction abandoned before recovery; `None`
    /// once the engine produced an envelope (its head is then a transaction's end).
    abandoned_after: Option<Durable>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("lineage", &self.lineage)
            .field("seq", &self.state.seq())
            .field("batch", &self.batch.len())
            .finish_non_exhaustive()
    }
}

/// The publisher is gone: it failed (the cause is in `shared`) or shut down.
struct Closed;

impl Engine {
    pub(crate) fn new(
        settings: &Settings,
        state: State,
        txn: Durable,
        schedule: Schedule,
        out: mpsc::Sender<Outgoing>,
        shared: Arc<Shared>,
    ) -> Engine {
        let p = &settings.producer;
        let durable = shared.durable.subscribe();
        let covered = *durable.borrow();
        let mut limits = shared.limits.subscribe();
        let horizon =
            Horizon::for_limits(settings, *limits.borrow_and_update(), covered, state.seq());
        let abandoned_after = (txn.seq < state.seq()).then_some(txn);
        if let Some(txn) = abandoned_after {
            tracing::info!(
                txn_seq = txn.seq,
                txn_stream_seq = txn.stream_seq,
                head = state.seq(),
                "The stream ends with parts of an abandoned transaction; snapshots are cut at \
                 the last complete transaction until the next envelope"
            );
        }
        Engine {
            abandoned_after,
            horizon,
            durable,
            limits,
            last_cut: covered.seq,
            lineage: state.lineage(),
            state,
            batch: Vec::new(),
            batch_bytes: 0,
            linger_until: None,
            max_changes: p.batch_max_changes,
            max_bytes: p.batch_max_bytes,
            linger: p.linger,
            out,
            shared,
            schedule,
        }
    }

    /// Serves commands until every sender is gone (then seals the last batch and writes a
    /// final snapshot when envelopes are not covered) or the publisher fails. Returns the
    /// final snapshot's failure.
    pub(crate) async fn run(mut self, rx: mpsc::Receiver<Command>) -> Result<(), ProducerError> {
        let result = if self.serve(rx).await.is_err() {
            // The publisher stopped; its cause is what shutdown reports.
            Ok(())
        } else {
            self.final_snapshot().await
        };
        // `shutdown` waits for this thread: the state's million frees (~0.1 s at 1M keys)
        // happen on another.
        let lineage = self.state.lineage();
        free_in_background(std::mem::replace(&mut self.state, State::new(lineage)));
        result
    }

    /// Writes a snapshot of the final position unless a durable one covers it already.
    async fn final_snapshot(&mut self) -> Result<(), ProducerError> {
        self.horizon.advance(*self.durable.borrow_and_update());
        let seq = self.cut_point();
        if seq <= self.horizon.covered().seq {
            return Ok(());
        }
        tracing::info!(
            seq,
            covered = self.horizon.covered().seq,
            "Writing a final snapshot: envelopes are not yet covered by one"
        );
        let (tx, rx) = oneshot::channel();
        self.schedule.taken(&self.shared.snapshot_phase);
        let job = self.job(Some(tx));
        if self
            .send(Outgoing::Notify(Notify::Snapshot(Box::new(job))))
            .await
            .is_err()
        {
            return Ok(());
        }
        let err = match rx.await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(ProducerError::Snapshot {
                source: deltasync_nats::store::StoreError::Stale { latest_seq, .. },
                ..
            })) if latest_seq >= seq => return Ok(()),
            Ok(Err(e)) => e,
            Err(_) => self.shared.stopped_error(),
        };
        if self.out.is_closed() && self.shared.has_failed() {
            // The publisher failed: that failure is reported, not this consequence.
            return Ok(());
        }
        tracing::error!(
            seq,
            covered = self.horizon.covered().seq,
            error = %err,
            "Final snapshot failed: envelopes after the newest snapshot are held only by the \
             stream, whose retention may prune them before the producer runs again"
        );
        Err(err)
    }

    async fn serve(&mut self, mut rx: mpsc::Receiver<Command>) -> Result<(), Closed> {
        // A recovered position far enough past the latest snapshot is cut right away.
        self.maybe_snapshot().await?;
        loop {
            // A trigger that is due while the previous snapshot still runs is looked at again
            // a little later, not in a busy loop. A count or retention trigger too: when the
            // input stops, no further envelope would look at it, and the latest snapshot could
            // stay behind what the stream retains, so that no replica could start from it.
            let phase = &self.shared.snapshot_phase;
            let snapshot_at = if self.schedule.owed() || phase.running() || phase.retry() {
                // While one is written, look now and then whether it failed (then cut again).
                Some(Instant::now() + SNAPSHOT_RECHECK)
            } else {
                self.schedule.deadline().map(|t| {
                    let t = Instant::from_std(t);
                    let now = Instant::now();
                    if t <= now {
                        now + SNAPSHOT_RECHECK
                    } else {
                        t
                    }
                })
            };
            let wake = match (self.linger_until, snapshot_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let cmd = tokio::select! {
                biased;
                cmd = rx.recv() => cmd,
                () = sleep_until(wake) => {
                    if self.linger_until.is_some_and(|t| Instant::now() >= t) {
                        self.seal_batch().await?;
                    }
                    self.maybe_snapshot().await?;
                    continue;
                }
                // The stream's limits changed: an idle producer past half of a lowered limit
                // cuts a snapshot now, not at its next envelope.
                Ok(()) = self.limits.changed() => {
                    self.apply_limits();
                    self.maybe_snapshot().await?;
                    continue;
                }
            };
            let Some(cmd) = cmd else {
                return self.seal_batch().await;
            };
            self.handle(cmd).await?;
        }
    }

    async fn handle(&mut self, cmd: Command) -> Result<(), Closed> {
        match cmd {
            Command::Submit(changes, room) => {
                let taken = self.submit(changes).await;
                drop(room);
                taken
            }
            Command::Transaction {
                changes,
                if_seq,
                reply,
            } => {
                self.seal_batch().await?;
                // Here, in the one loop that hands out sequences, nothing can move the head
                // between the check and the commit.
                if let Err(err) = check_head(if_seq, self.state.seq()) {
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(err));
                    }
                    return Ok(());
                }
                self.transaction(changes, reply).await?;
                self.maybe_snapshot().await
            }
            Command::FullState { state, reply } => {
                self.seal_batch().await?;
                let changes = diff(&self.state, &state);
                drop(state);
                if changes.is_empty() {
                    // Nothing to publish: answer once the current position is durable.
                    let receipt = CommitReceipt::unchanged(self.state.seq(), self.state.digest());
                    return self
                        .send(Outgoing::Notify(Notify::Commit { receipt, reply }))
                        .await;
                }
                self.transaction(changes, reply).await?;
                self.maybe_snapshot().await
            }
            Command::Flush(reply) => {
                self.seal_batch().await?;
                self.send(Outgoing::Notify(Notify::Flush(reply))).await
            }
            Command::Snapshot(reply) => {
                self.seal_batch().await?;
                self.schedule.taken(&self.shared.snapshot_phase);
                self.last_cut = self.cut_point();
                let job = self.job(Some(reply));
                self.send(Outgoing::Notify(Notify::Snapshot(Box::new(job))))
                    .await
            }
        }
    }

    /// Adds changes to the pending batch, sealing envelopes as the limits are reached.
    async fn submit(&mut self, changes: Vec<Change>) -> Result<(), Closed> {
        if self.batch.is_empty() && changes.len() <= self.max_changes {
            let bytes: usize = changes.iter().map(Change::encoded_len_bound).sum();
            if bytes <= self.max_bytes {
                // The common case: a caller's chunk becomes the batch without copying.
                self.batch = changes;
                self.batch_bytes = bytes;
                return self.after_add().await;
            }
        }
        for c in changes {
            if self.batch.capacity() == 0 {
                self.batch.reserve(self.max_changes.min(1 << 16));
            }
            let len = c.encoded_len_bound();
            if !self.batch.is_empty() && self.batch_bytes + len > self.max_bytes {
                self.seal_batch().await?;
            }
            self.batch_bytes += len;
            self.batch.push(c);
            if self.batch.len() >= self.max_changes {
                self.seal_batch().await?;
            }
        }
        self.after_add().await
    }

    async fn after_add(&mut self) -> Result<(), Closed> {
        if self.batch.len() >= self.max_changes || self.batch_bytes >= self.max_bytes {
            return self.seal_batch().await;
        }
        if !self.batch.is_empty() && self.linger_until.is_none() {
            if self.linger.is_zero() {
                return self.seal_batch().await;
            }
            self.linger_until = Some(Instant::now() + self.linger);
        }
        Ok(())
    }

    /// Publishes the pending batch as one envelope.
    async fn seal_batch(&mut self) -> Result<(), Closed> {
        self.linger_until = None;
        if self.batch.is_empty() {
            return Ok(());
        }
        // Not replaced by a preallocated vector: the next batch is usually a caller's chunk,
        // taken as it is (see `submit`), and a fresh allocation would only be freed again.
        let changes = std::mem::take(&mut self.batch);
        let bytes = std::mem::take(&mut self.batch_bytes);
        let cost = bytes as u64 + ENVELOPE_STREAM_OVERHEAD;
        if self.make_room(1, cost).await? == Admit::Never {
            // `Settings::validate` makes the byte room hold the largest envelope.
            let err = ProducerError::Internal(format!(
                "an envelope of {cost} bytes exceeds the stream's retention budget"
            ));
            self.shared.fail(err);
            return Err(Closed);
        }
        let digest = self.state.apply_changes(&changes);
        let seq = self.state.seq() + 1;
        self.state.set_position(self.lineage, seq);
        self.abandoned_after = None;
        self.schedule.count(bytes as u64);
        self.horizon.produced(seq, cost);
        let env = Envelope {
            lineage: self.lineage,
            seq,
            part: 1,
            parts: 1,
            digest,
            produced_at_ms: now_ms(),
            changes,
        };
        self.shared.produced(seq);
        self.send(Outgoing::Envelope { env, notify: None }).await?;
        self.maybe_snapshot().await
    }

    /// Publishes one atomic transaction (the pending batch is already sealed).
    async fn transaction(
        &mut self,
        changes: Vec<Change>,
        reply: Option<oneshot::Sender<Result<CommitReceipt, ProducerError>>>,
    ) -> Result<(), Closed> {
        let (parts, bytes) = count_parts(&changes, self.max_bytes);
        let cost = bytes as u64 + parts as u64 * ENVELOPE_STREAM_OVERHEAD;
        let refused = if parts > MAX_TXN_PARTS as usize {
            Some(ProducerError::TransactionTooLarge {
                changes: changes.len(),
                bytes,
                parts,
            })
        } else if self.make_room(parts as u64, cost).await? == Admit::Never {
            Some(ProducerError::TransactionBeyondRetention {
                changes: changes.len(),
                bytes: cost,
                parts,
            })
        } else {
            None
        };
        if let Some(err) = refused {
            // `Producer::submit_transaction` refuses these before they get here; a full state
            // (whose caller awaits the answer) can still be refused here.
            tracing::error!(error = %err, "Transaction refused; nothing of it is published");
            if let Some(reply) = reply {
                let _ = reply.send(Err(err));
            }
            return Ok(());
        }
        let n = changes.len();
        let digest = self.state.apply_changes(&changes);
        let first_seq = self.state.seq() + 1;
        let envs = split_transaction(
            self.lineage,
            first_seq,
            digest,
            now_ms(),
            changes,
            self.max_bytes,
        );
        let last_seq = first_seq + envs.len() as u64 - 1;
        self.state.set_position(self.lineage, last_seq);
        self.abandoned_after = None;
        self.shared.produced(last_seq);
        let receipt = CommitReceipt {
            first_seq,
            last_seq,
            parts: envs.len() as u32,
            digest,
            changes: n,
            bytes: bytes as u64,
            stream_seq: 0,
        };
        let mut notify = Some(Notify::Commit { receipt, reply });
        let count = envs.len();
        for (i, env) in envs.into_iter().enumerate() {
            let bytes: u64 = env
                .changes
                .iter()
                .map(|c| c.encoded_len_bound() as u64)
                .sum();
            self.schedule.count(bytes);
            self.horizon
                .produced(env.seq, bytes + ENVELOPE_STREAM_OVERHEAD);
            let notify = if i + 1 == count { notify.take() } else { None };
            self.send(Outgoing::Envelope { env, notify }).await?;
        }
        Ok(())
    }

    /// Cuts a snapshot when one is due (always at a transaction boundary: the engine's state
    /// never holds part of a transaction, and a position on abandoned parts is cut at the
    /// last complete transaction before them).
    async fn maybe_snapshot(&mut self) -> Result<(), Closed> {
        self.follow_limits();
        if !self.schedule.due(&self.shared.snapshot_phase) {
            return Ok(());
        }
        self.horizon.advance(*self.durable.borrow());
        if self.abandoned_after.is_some() && self.cut_point() <= self.horizon.covered().seq {
            // Over abandoned parts whose last complete transaction a durable snapshot covers:
            // a cut would write that snapshot again (the next envelope moves the cut point).
            self.schedule.skipped(&self.shared.snapshot_phase);
            return Ok(());
        }
        self.cut().await
    }

    /// Hands a snapshot of the live state (a transaction boundary) to the publisher, which
    /// passes it to the snapshot task once its last envelope is acknowledged.
    async fn cut(&mut self) -> Result<(), Closed> {
        self.schedule.taken(&self.shared.snapshot_phase);
        self.last_cut = self.cut_point();
        let job = self.job(None);
        self.send(Outgoing::Notify(Notify::Snapshot(Box::new(job))))
            .await
    }

    /// Publishes an envelope with no changes after the parts of an abandoned transaction, so
    /// that the head is a transaction's end (a snapshot can be cut there).
    async fn close_abandoned(&mut self) -> Result<(), Closed> {
        let seq = self.state.seq() + 1;
        self.state.set_position(self.lineage, seq);
        self.abandoned_after = None;
        self.schedule.count(0);
        self.horizon.produced(seq, ENVELOPE_STREAM_OVERHEAD);
        tracing::info!(
            seq,
            "Published an empty envelope ending the abandoned transaction's parts: they leave \
             no room in the stream's retention after the last complete transaction"
        );
        let env = Envelope {
            lineage: self.lineage,
            seq,
            part: 1,
            parts: 1,
            digest: self.state.digest(),
            produced_at_ms: now_ms(),
            changes: Vec::new(),
        };
        self.shared.produced(seq);
        self.send(Outgoing::Envelope { env, notify: None }).await
    }

    /// Where a snapshot of the live state is cut: its position, or, while that position is
    /// on the parts of a transaction abandoned before recovery, the last complete
    /// transaction before them (the store refuses a cut at a non-final part).
    fn cut_point(&self) -> u64 {
        self.abandoned_after.map_or(self.state.seq(), |t| t.seq)
    }

    /// A snapshot job of the live state at [`Engine::cut_point`].
    ///
    /// Over abandoned parts the cut is the state relabelled to the last complete transaction
    /// and its stream sequence (option "cut at the last complete transaction", not "wait for
    /// the next one"): the state is identical, since abandoned parts are never applied, and a
    /// reader following from that stream sequence skips them. Waiting for the next complete
    /// transaction instead could wait without end: when the stream's retention has no room
    /// for the next envelope, [`Engine::make_room`] holds publishing back until a snapshot is
    /// durable, and no transaction can complete while nothing is published. This cut needs
    /// no envelope, so it is always possible. When even a durable cut there leaves no room
    /// (the abandoned parts plus the next transaction exceed the retention), `make_room`
    /// ends the abandoned parts with an empty envelope, which fits: the abandoned
    /// transaction fitted whole.
    fn job(
        &self,
        reply: Option<oneshot::Sender<Result<SnapshotInfo, ProducerError>>>,
    ) -> SnapshotJob {
        match self.abandoned_after {
            None => SnapshotJob {
                cut: self.state.clone(),
                at: None,
                reply,
            },
            Some(txn) => {
                let mut cut = self.state.clone();
                cut.set_position(self.lineage, txn.seq);
                SnapshotJob {
                    cut,
                    at: Some(txn.stream_seq),
                    reply,
                }
            }
        }
    }

    /// Waits until `envelopes` more envelopes of `bytes` in all fit in the stream's retention
    /// counted from the newest durable snapshot, cutting a snapshot of the current position
    /// when one is needed; `Never` when they cannot fit at all.
    async fn make_room(&mut self, envelopes: u64, bytes: u64) -> Result<Admit, Closed> {
        let mut held = false;
        let mut reported_failure = false;
        loop {
            self.follow_limits();
            self.horizon.advance(*self.durable.borrow_and_update());
            let admit = self.horizon.admits(envelopes, bytes, self.shared.acked());
            if admit != Admit::Full {
                if held {
                    self.shared.held_back(None);
                    tracing::info!(
                        covered = self.horizon.covered().seq,
                        "Snapshot durable; publishing resumes"
                    );
                }
                return Ok(admit);
            }
            if self.out.is_closed() {
                return Err(Closed);
            }
            let head = self.cut_point();
            let phase = &self.shared.snapshot_phase;
            let retry = phase.retry();
            let stuck = Stuck {
                cut_point: head,
                abandoned: self.abandoned_after.is_some(),
                last_cut: self.last_cut,
                running: phase.running(),
                retry,
            };
            match self.horizon.unblock(stuck, self.shared.acked()) {
                Unblock::Cut => self.cut().await?,
                Unblock::EndAbandoned => {
                    self.close_abandoned().await?;
                    continue;
                }
                Unblock::Wait => {}
            }
            if !held {
                held = true;
                let reason = format!(
                    "the stream's retention would prune envelopes after the newest durable \
                     snapshot ({}) that no snapshot covers: waiting for a snapshot at {head}",
                    self.horizon.covered().seq
                );
                tracing::warn!(
                    covered = self.horizon.covered().seq,
                    head,
                    "Publishing held back until a snapshot of the current position is durable"
                );
                self.shared.held_back(Some(reason));
            }
            if retry && self.shared.shutting_down() {
                // A stop while snapshots fail would otherwise wait for one without end: the
                // rest is not published, and the stop reports why.
                let err = ProducerError::StoppedWhileHeldBack {
                    covered: self.horizon.covered().seq,
                    head,
                };
                tracing::error!(error = %err, "Stopping without publishing the rest");
                self.shared.fail(err);
                return Err(Closed);
            }
            if retry && !reported_failure {
                reported_failure = true;
                let reason = format!(
                    "a snapshot failed while the stream's retention would prune envelopes after \
                     the newest durable snapshot ({}): nothing more is published until one is \
                     written (retrying)",
                    self.horizon.covered().seq
                );
                tracing::error!(
                    covered = self.horizon.covered().seq,
                    head,
                    "Publishing stopped: a snapshot failed and the stream's retention leaves no \
                     room for more envelopes until one is written"
                );
                self.shared.held_back(Some(reason));
            }
            tokio::select! {
                _ = self.durable.changed() => {}
                Ok(()) = self.limits.changed() => self.apply_limits(),
                () = tokio::time::sleep(SNAPSHOT_RECHECK) => {}
            }
        }
    }

    /// Counts against the stream's limits as the snapshot task last read them (a lowered
    /// limit holds publishing back, and cuts snapshots sooner, from the next envelope on).
    fn follow_limits(&mut self) {
        if self.limits.has_changed().unwrap_or(false) {
            self.apply_limits();
        }
    }

    /// Counts against the limits the snapshot task published last.
    fn apply_limits(&mut self) {
        let limits = *self.limits.borrow_and_update();
        self.horizon
            .set_room(limits.envelope_room(), limits.byte_room());
        self.schedule.set_limits(limits);
    }

    async fn send(&mut self, out: Outgoing) -> Result<(), Closed> {
        match self.out.send(out).await {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendError(out)) => {
                // The publisher stopped: answer whoever waits on this with its cause.
                let err = self.shared.stopped_error();
                let notify = match out {
                    Outgoing::Envelope { notify, .. } => notify,
                    Outgoing::Notify(n) => Some(n),
                };
                match notify {
                    Some(Notify::Commit {
                        reply: Some(reply), ..
                    }) => {
                        let _ = reply.send(Err(err));
                    }
                    Some(Notify::Flush(reply)) => {
                        let _ = reply.send(Err(err));
                    }
                    Some(Notify::Snapshot(job)) => (*job).fail(err),
                    _ => {}
                }
                Err(Closed)
            }
        }
    }
}

/// Refuses a transaction that cannot be published whole: more parts than a replica buffers,
/// or more than the stream's retention keeps after a snapshot. Checked before it is handed to
/// the engine, so a caller that does not await its answer still learns of it.
pub(crate) fn check_transaction(
    settings: &Settings,
    changes: &[Change],
) -> Result<(), ProducerError> {
    let (parts, bytes) = count_parts(changes, settings.producer.batch_max_bytes);
    if parts > MAX_TXN_PARTS as usize {
        return Err(ProducerError::TransactionTooLarge {
            changes: changes.len(),
            bytes,
            parts,
        });
    }
    let cost = bytes as u64 + parts as u64 * ENVELOPE_STREAM_OVERHEAD;
    let s = &settings.stream;
    if s.envelope_room().is_some_and(|m| parts as u64 > m)
        || s.byte_room().is_some_and(|m| cost > m)
    {
        return Err(ProducerError::TransactionBeyondRetention {
            changes: changes.len(),
            bytes: cost,
            parts,
        });
    }
    Ok(())
}

/// A conditional transaction's check: with `if_seq`, the head (the last envelope handed over,
/// after the pending batch is sealed) must be that sequence, else nothing of it is taken.
pub(crate) fn check_head(if_seq: Option<u64>, head: u64) -> Result<(), ProducerError> {
    match if_seq {
        Some(expected) if expected != head => Err(ProducerError::HeadMoved { expected, head }),
        _ => Ok(()),
    }
}

/// How many parts `split_transaction` will cut `changes` into, and their encoded bytes.
fn count_parts(changes: &[Change], max_bytes: usize) -> (usize, usize) {
    let (mut parts, mut current, mut total) = (1usize, 0usize, 0usize);
    let mut in_part = 0usize;
    for c in changes {
        let len = c.encoded_len_bound();
        if in_part > 0 && current + len > max_bytes {
            parts += 1;
            current = 0;
            in_part = 0;
        }
        current += len;
        in_part += 1;
        total += len;
    }
    (parts, total)
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conditional_transaction_goes_only_at_the_expected_head() {
        assert!(check_head(None, 7).is_ok());
        assert!(check_head(Some(7), 7).is_ok());
        assert!(check_head(Some(0), 0).is_ok());
        for (expected, head) in [(6, 7), (8, 7), (0, 1), (1, 0)] {
            match check_head(Some(expected), head) {
                Err(ProducerError::HeadMoved {
                    expected: e,
                    head: h,
                }) => {
                    assert_eq!((e, h), (expected, head));
                }
                other => panic!("{expected} at {head}: {other:?}"),
            }
        }
    }

    #[test]
    fn parts_are_counted_as_split_transaction_cuts_them() {
        let changes: Vec<Change> = (0..10)
            .map(|i| Change::put(format!("k{i}"), vec![0u8; 100]))
            .collect();
        let (parts, bytes) = count_parts(&changes, 250);
        let envs = split_transaction(
            Lineage([1; 16]),
            1,
            deltasync_core::Digest::ZERO,
            0,
            changes,
            250,
        );
        assert_eq!(parts, envs.len());
        assert_eq!(
            bytes,
            envs.iter()
                .flat_map(|e| &e.changes)
                .map(Change::encoded_len_bound)
                .sum::<usize>()
        );
        assert_eq!(count_parts(&[], 250).0, 1);
    }
}
