//! The follower: decides how to start (resume, bootstrap, or a reason-coded re-snapshot),
//! then reads the pipeline's stream, applies envelopes, commits batches of them with the
//! cursor, and re-snapshots when the history it needs is gone or its replica diverged.
//!
//! Talks to JetStream through `deltasync_nats` (the stream tail, stream bounds, snapshots) and
//! the crate's `nats` module (one-message probes, the server-side marker), to the local store
//! on blocking threads, and publishes into the [`Replica`] handle.
//!
//! Every decision (what a message means, when to re-read or re-snapshot and why, how a local
//! cursor relates to the stream, whether the reader stalled) is the [`Follower`]'s: this
//! module only carries its steps out.
//!
//! ## Invariants
//!
//! - Continuity is judged by the follower (envelope sequence, stream position, digest): a
//!   stream message that is not an envelope is counted and skipped; envelopes already
//!   accounted for are skipped; any other break (gap, lineage, digest, fork) leads to a re-read
//!   or a re-snapshot with its reason, never to a silent skip.
//! - JetStream does not say when it pruned a position: the engine compares the stream's first
//!   sequence with the position it needs, and treats a tail that starts later than asked
//!   (`HistoryError::Pruned`) as lost messages to be judged by the next envelope.
//! - A position is committed (changes and cursor in one synced local log record) before it is
//!   acknowledged to the server, shown in the status, or published as a view or change batch.
//! - Re-snapshots are bounded: `consumer.resync_max_attempts` consecutive attempts without
//!   progress past the stream position where the previous one was decided (re-applying the
//!   envelopes before a break that is still there is no progress), with jittered exponential
//!   backoff, then a clear error.
//!
//! ```text
//!  reader task: Tail (ordered consumer) ─ decode ─► channel ─► engine ─► Follower (steps)
//!                                                                 │ batch of transactions
//!                                                                 ▼
//!                  blocking thread: one log record (changes + cursor), fdatasync
//!                                                                 │ durable
//!                                                                 ▼
//!                          marker reset · status · view · change batches to subscribers
//! ```

use crate::follower::{
    self, BatchKind, Bounds, ChangeBatch, Continuity, Follower, Judge, LineagePlan, NoSnapshotPlan,
    Reason, Refusal, Step,
};
use crate::local::{LoadedReplica, LocalError, LocalStore};
use crate::nats::marker::Marker;
use crate::nats::{self, Bucket, JetStream};
use crate::replica::{Replica, ResyncRecord, StatusEvent, SyncRun};
use crate::ConsumerError;
use deltasync_config::settings::Settings;
use deltasync_core::envelope::now_ms;
use deltasync_core::recovery;
use deltasync_core::recovery::Classified;
use deltasync_core::state::diff;
use deltasync_core::Position;
use deltasync_core::{names, Envelope, Lineage, State};
use deltasync_nats::history::{self, HistoryError, StreamItem, Tail};
use deltasync_nats::store;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Decoded stream messages buffered ahead of the engine (each at most one envelope).
const READ_AHEAD: usize = 32;

/// Items taken from the reader per turn of the event loop.
const ITEMS_PER_TURN: usize = 256;

/// Changes the engine accumulates while a commit is being written before it waits for that
/// commit: with large envelopes, `4 × commit_every_envelopes` transactions would hold millions
/// of changes (and their old values) in memory twice over.
const MAX_ACCUMULATED_CHANGES: usize = 256 * 1024;

/// How often the engine reads the stream's bounds (lag, idle end of `--once`, stalls).
const TICK: Duration = Duration::from_secs(1);

/// What `run` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The committed position at exit.
    pub cursor: Position,
    /// Whether the replica held a verified state at exit.
    pub bootstrapped: bool,
}

/// The stream reader: a task owning a [`Tail`] that decodes ahead of the engine. Dropping it
/// stops the task.
struct Reader {
    rx: mpsc::Receiver<Result<StreamItem, HistoryError>>,
    task: JoinHandle<()>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Reader {
    fn open(js: &JetStream, settings: &Settings, from: u64) -> Reader {
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        let js = js.clone();
        let settings = settings.clone();
        let task = tokio::spawn(async move {
            let mut tail = match Tail::open(&js, &settings, from).await {
                Ok(t) => t,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            while let Some(item) = tail.next().await {
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        Reader { rx, task }
    }
}

/// A batch handed to the local store, not yet durable.
struct Inflight {
    handle: JoinHandle<Result<(), LocalError>>,
    cursor: Position,
    entries: usize,
    view: Option<State>,
    batches: Vec<Arc<ChangeBatch>>,
    /// When the producer made the last transaction of the commit.
    produced_at_ms: Option<u64>,
    started: Instant,
}

/// What a tick asks the loop to do next.
#[derive(Debug, PartialEq, Eq)]
enum Tick {
    Continue,
    /// `--once` has nothing more to read.
    Done,
    /// Reopen the reader at `from`.
    Reopen {
        from: u64,
    },
    /// Re-snapshot for `reason`.
    Resync {
        reason: Reason,
    },
}

/// What an item asks the loop to do next.
enum Next {
    Continue,
    /// Read the stream again from this stream sequence.
    Reopen {
        from: u64,
    },
    /// Re-snapshot; `want` is the lineage the snapshot must have, when known.
    Resync {
        reason: Reason,
        want: Option<Lineage>,
    },
    /// An envelope of another lineage.
    LineageChange {
        env: Envelope,
        stream_seq: u64,
    },
}

enum Event {
    Cancelled,
    Committed(Result<Result<(), LocalError>, tokio::task::JoinError>),
    CommitDue,
    Item(Option<Result<StreamItem, HistoryError>>),
    Tick,
    ViewWanted,
}

pub(crate) struct Engine {
    settings: Settings,
    js: JetStream,
    kv: Bucket,
    store: LocalStore,
    replica: Replica,
    marker: Marker,
    once: bool,

    /// The decisions and the replica as applied (may be ahead of `committed`).
    follower: Follower,
    /// When the reader last delivered something (or was opened).
    last_item_at: Instant,

    /// Transactions applied and not yet handed to the store.
    batch: Vec<Arc<ChangeBatch>>,
    batch_txns: usize,
    /// Changes in those transactions (bounds the memory a backlog can hold).
    batch_changes: usize,
    batch_started: Option<Instant>,
    /// When the producer made the last transaction of the batch (for the lag in time).
    batch_produced_at_ms: Option<u64>,
    inflight: Option<Inflight>,
    /// The durable position.
    committed: Position,
    bootstrapped: bool,

    /// Re-snapshot attempts since an envelope was last applied.
    resync_attempts: u32,
}

impl Engine {
    pub(crate) fn new(
        settings: Settings,
        js: JetStream,
        kv: Bucket,
        store: LocalStore,
        replica: Replica,
        marker: Marker,
        once: bool,
    ) -> Engine {
        Engine {
            settings,
            js,
            kv,
            store,
            replica,
            marker,
            once,
            follower: Follower::new(),
            last_item_at: Instant::now(),
            batch: Vec::new(),
            batch_txns: 0,
            batch_changes: 0,
            batch_started: None,
            batch_produced_at_ms: None,
            inflight: None,
            committed: Position::default(),
            bootstrapped: false,
            resync_attempts: 0,
        }
    }

    /// Starts from `loaded` (the local replica, if any), then follows until cancelled (or, with
    /// `--once`, until the stream's head at start), and commits.
    pub(crate) async fn run(
        mut self,
        loaded: Option<LoadedReplica>,
        cancel: &CancellationToken,
    ) -> Result<Outcome, ConsumerError> {
        let result = self.run_inner(loaded, cancel).await;
        // Whatever happened, what was applied and verified is committed before exit.
        let flushed = self.flush().await;
        self.marker.finish(self.settings.nats.request_timeout).await;
        result?;
        flushed?;
        Ok(Outcome {
            cursor: self.committed,
            bootstrapped: self.bootstrapped,
        })
    }

    async fn run_inner(
        &mut self,
        loaded: Option<LoadedReplica>,
        cancel: &CancellationToken,
    ) -> Result<(), ConsumerError> {
        self.start(loaded, cancel).await?;
        if cancel.is_cancelled() {
            return Ok(());
        }
        // The head as it is now: the lag (and readiness) are right from the start, and it is
        // where `--once` stops.
        let head = retrying("reading the stream's head", || async {
            Ok(history::bounds(&self.js, &self.settings).await?)
        })
        .await?
        .last_seq;
        self.follower.saw_last_seq(head);
        self.update_lag();
        let target = if self.once {
            tracing::info!(
                head,
                from = self.follower.resume_from(),
                "Catching up to the stream's head (--once)"
            );
            Some(head)
        } else {
            None
        };
        let mut reader = self.open_reader(self.follower.resume_from());
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let interval = self.settings.consumer.commit_interval;
        loop {
            if let Some(t) = target {
                if self.follower.position() >= t {
                    tracing::info!(
                        seq = self.follower.applied().seq,
                        stream_seq = t,
                        "Caught up to the stream's head as it was at start"
                    );
                    return Ok(());
                }
            }
            let deadline = self.batch_started.map(|t| t + interval);
            let event = tokio::select! {
                biased;
                _ = cancel.cancelled() => Event::Cancelled,
                r = wait_inflight(&mut self.inflight), if self.inflight.is_some() => Event::Committed(r),
                _ = sleep_until(deadline), if deadline.is_some() && self.inflight.is_none() => Event::CommitDue,
                item = reader.rx.recv() => Event::Item(item),
                _ = tick.tick() => Event::Tick,
                _ = self.replica.view_requested() => Event::ViewWanted,
            };
            match event {
                Event::Cancelled => {
                    tracing::info!(
                        seq = self.follower.applied().seq,
                        "Stopping: committing what was applied"
                    );
                    return Ok(());
                }
                Event::Committed(r) => {
                    self.finish_inflight(r)?;
                    self.maybe_commit().await?;
                }
                Event::CommitDue => self.submit()?,
                Event::ViewWanted => self.publish_view_if_idle(),
                Event::Tick => {
                    self.publish_view_if_idle();
                    match self.on_tick().await {
                        Tick::Done if target.is_some() => {
                            tracing::info!(
                                seq = self.follower.applied().seq,
                                "Nothing more to read: the stream's head was reached (--once)"
                            );
                            return Ok(());
                        }
                        Tick::Reopen { from } => {
                            tracing::warn!(
                                from,
                                head = self.follower.known_last_seq(),
                                silent_for = ?self.last_item_at.elapsed(),
                                "The stream reader delivered nothing while the stream holds more; reopening it"
                            );
                            self.replica.record(StatusEvent::ReaderStall);
                            reader = self.open_reader(from);
                        }
                        Tick::Resync { reason } => {
                            drop(reader);
                            self.resync(reason, None, cancel).await?;
                            reader = self.open_reader(self.follower.resume_from());
                        }
                        Tick::Done | Tick::Continue => {}
                    }
                }
                Event::Item(None) => {
                    reader = self.open_reader(self.follower.resume_from());
                }
                Event::Item(Some(first)) => {
                    let mut next = Some(first);
                    let mut taken = 0;
                    while let Some(item) = next.take() {
                        taken += 1;
                        match self.on_item(item).await {
                            Next::Continue => {
                                if self.follower.settled() {
                                    // Caught up with a continuous history: earlier re-snapshots
                                    // are behind us.
                                    self.resync_attempts = 0;
                                }
                            }
                            Next::Reopen { from } => {
                                reader = self.open_reader(from);
                                break;
                            }
                            Next::Resync { reason, want } => {
                                drop(reader);
                                self.resync(reason, want, cancel).await?;
                                reader = self.open_reader(self.follower.resume_from());
                                break;
                            }
                            Next::LineageChange { env, stream_seq } => {
                                drop(reader);
                                self.lineage_change(env, stream_seq, cancel).await?;
                                reader = self.open_reader(self.follower.resume_from());
                                break;
                            }
                        }
                        self.maybe_commit().await?;
                        if cancel.is_cancelled() || taken >= ITEMS_PER_TURN {
                            break;
                        }
                        if let Some(t) = target {
                            if self.follower.position() >= t {
                                break;
                            }
                        }
                        next = reader.rx.try_recv().ok();
                    }
                    self.update_lag();
                }
            }
        }
    }

    // ---------------------------------------------------------------- start-up

    async fn start(
        &mut self,
        loaded: Option<LoadedReplica>,
        cancel: &CancellationToken,
    ) -> Result<(), ConsumerError> {
        let Some(local) = loaded else {
            self.decide(
                Reason::Bootstrap,
                "no local replica: loading the latest snapshot",
            );
            return self.resync(Reason::Bootstrap, None, cancel).await;
        };
        let cursor = local.cursor;
        let intact = local.intact();
        let computed = local.computed;
        if let Some(reason) = &local.cursor_error {
            tracing::error!(store = %self.store.describe(), %reason, "The local replica's cursor is unreadable");
        }
        self.follower.restore(local.state, cursor);
        if !intact {
            tracing::error!(
                store = %self.store.describe(),
                seq = cursor.seq,
                stored = %cursor.digest,
                computed = %computed,
                "The local replica does not match its stored digest (changed or damaged on disk)"
            );
            self.decide(
                Reason::CorruptLocal,
                "repairing the ranges that differ from the latest snapshot",
            );
            // The entries as found are what is on disk: the repair's diff is taken from them.
            self.committed = cursor;
            return self.resync(Reason::CorruptLocal, None, cancel).await;
        }
        self.committed = cursor;
        self.bootstrapped = true;
        let (continuity, why) = retrying("checking the local cursor against the stream", || {
            self.continuity(&cursor)
        })
        .await?;
        let reason = continuity.reason();
        self.decide(reason, why);
        if continuity != Continuity::Continues {
            return self.resync(reason, None, cancel).await;
        }
        // The replica on disk is verified and continues the history: readers may use it
        // while the engine catches up.
        self.replica.committed(
            cursor,
            self.follower.state().len(),
            Some(self.follower.state().clone()),
            Vec::new(),
            true,
        );
        Ok(())
    }

    /// Logs (at the reason's level) and counts a decision.
    fn decide(&self, reason: Reason, why: &str) {
        self.replica.record(StatusEvent::Decision(reason));
        let applied = self.follower.applied();
        macro_rules! log {
            ($level:ident, $what:literal) => {
                tracing::$level!(
                    reason = reason.as_str(),
                    lineage = %applied.lineage,
                    seq = applied.seq,
                    stream_seq = applied.stream_seq,
                    "{}: {why}",
                    $what
                )
            };
        }
        match reason.level() {
            tracing::Level::ERROR => log!(error, "Re-snapshot"),
            tracing::Level::WARN => log!(warn, "Re-snapshot"),
            _ => log!(info, "Start-up decision"),
        }
    }

    /// How `c` relates to the retained history (the follower judges; this reads).
    async fn continuity(&self, c: &Position) -> Result<(Continuity, &'static str), ConsumerError> {
        let pointer = store::read_pointer(&self.kv).await?.map(|(p, _)| p.lineage);
        let b = self.bounds().await?;
        match Follower::judge(c, pointer, b) {
            Judge::Decided(continuity, why) => Ok((continuity, why)),
            Judge::NeedCursorMessage { at } => {
                let found = self.message_at(at).await?;
                Ok(Follower::judge_cursor_message(c, found.as_ref()))
            }
            Judge::NeedFirstEnvelope { from } => {
                let first = self.first_envelope(from).await?;
                Ok(Follower::judge_first(
                    c,
                    b,
                    first.as_ref().map(|(s, e)| (*s, e)),
                ))
            }
        }
    }

    /// The message at stream sequence `at`, classified (None: there is none).
    async fn message_at(&self, at: u64) -> Result<Option<Classified>, ConsumerError> {
        match nats::message_at(&self.js, &self.settings, at).await {
            Ok(payload) => Ok(payload.map(|p| recovery::classify(&p))),
            Err(detail) => Err(ConsumerError::Probe {
                stream: names::stream_name(&self.settings.pipeline),
                from: at,
                detail,
            }),
        }
    }

    /// The stream's bounds, as the follower takes them.
    async fn bounds(&self) -> Result<Bounds, ConsumerError> {
        let b = history::bounds(&self.js, &self.settings).await?;
        Ok(Bounds {
            first_seq: b.first_seq,
            last_seq: b.last_seq,
            messages: b.messages,
        })
    }

    /// The first envelope at or after stream sequence `from`, if the stream holds one now.
    async fn first_envelope(&self, from: u64) -> Result<Option<(u64, Envelope)>, ConsumerError> {
        let mut from = from;
        for _ in 0..8 {
            let mut tail = match Tail::open(&self.js, &self.settings, from).await {
                Ok(t) => t,
                Err(HistoryError::Pruned { first, .. }) => {
                    from = first;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            loop {
                match tail.next_within(self.settings.nats.request_timeout).await {
                    None => return Ok(None),
                    Some(Err(HistoryError::Pruned { first, .. })) => {
                        // Skipped messages before `first` are gone either way; read from there.
                        from = first;
                        break;
                    }
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(item)) => match item.item {
                        Classified::Envelope(e) => return Ok(Some((item.stream_seq, e))),
                        Classified::Foreign { .. } if item.pending == 0 => return Ok(None),
                        Classified::Foreign { .. } => {}
                    },
                }
            }
        }
        Ok(None)
    }

    // ---------------------------------------------------------------- following

    async fn on_item(&mut self, item: Result<StreamItem, HistoryError>) -> Next {
        let item = match item {
            Ok(i) => i,
            Err(HistoryError::Pruned { wanted, first, .. }) => {
                let now = history::bounds(&self.js, &self.settings)
                    .await
                    .ok()
                    .map(|b| b.first_seq);
                let step = self.follower.on_lost(wanted, first, now);
                if let Step::Reread { why, .. } = step {
                    tracing::warn!(
                        wanted,
                        first,
                        why,
                        "The stream no longer holds messages the replica asked for; the next envelope decides whether one of them mattered"
                    );
                }
                return self.carry_out(step, first);
            }
            Err(e) => {
                let from = self.follower.resume_from();
                tracing::warn!(error = %e, from, "Reading the stream failed; reopening it");
                tokio::time::sleep(jitter(Duration::from_millis(500))).await;
                return Next::Reopen { from };
            }
        };
        self.last_item_at = Instant::now();
        let started = Instant::now();
        let keep = self.keep_changes();
        let step = self
            .follower
            .on_message(item.stream_seq, item.pending, item.item, keep);
        if let Step::Applied(_) = step {
            self.replica
                .metrics()
                .apply_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        self.carry_out(step, item.stream_seq)
    }

    /// Carries out a follower step about the message at `stream_seq`.
    fn carry_out(&mut self, step: Step, stream_seq: u64) -> Next {
        match step {
            Step::Applied(txn) => {
                self.replica.record(StatusEvent::Applied {
                    changes: txn.changes as u64,
                });
                self.batch_produced_at_ms = Some(txn.produced_at_ms);
                if let Some(b) = txn.batch {
                    self.batch.push(Arc::new(b));
                }
                self.batch_txns += 1;
                self.batch_changes += txn.changes;
                self.batch_started.get_or_insert_with(Instant::now);
                if self.follower.progressed() {
                    // Past the break that caused the last re-snapshot.
                    self.resync_attempts = 0;
                }
                Next::Continue
            }
            Step::Buffered => Next::Continue,
            Step::Skipped { why, seq } => {
                self.replica.metrics().skipped(why);
                tracing::debug!(seq, stream_seq, why, "Envelope already applied; skipped");
                Next::Continue
            }
            Step::Foreign { reason } => {
                self.replica.record(StatusEvent::Foreign);
                tracing::error!(stream_seq, %reason, "A message in the pipeline's stream is not an envelope; skipped");
                Next::Continue
            }
            Step::Reread { from, why } => {
                if why == "gap in the envelope sequence" {
                    tracing::warn!(stream_seq, from, "Gap in the envelope sequence; re-reading the stream after the last applied envelope");
                }
                Next::Reopen { from }
            }
            Step::Resync { reason, want, why } => {
                if reason == Reason::DigestMismatch {
                    tracing::error!(stream_seq, "The replica diverged from the producer");
                }
                if reason == Reason::Fork {
                    tracing::error!(stream_seq, "The stream forks the replica's history");
                }
                self.decide(reason, why);
                Next::Resync { reason, want }
            }
            Step::LineageChange { env, stream_seq } => Next::LineageChange { env, stream_seq },
        }
    }

    /// Whether applied transactions keep their changes: the local log, subscribers and the
    /// feed need them. (A re-snapshot's diff is computed only for subscribers: the feed resets
    /// instead.)
    fn keep_changes(&self) -> bool {
        self.store.is_durable() || self.replica.has_subscribers() || self.replica.feed_on()
    }

    async fn lineage_change(
        &mut self,
        env: Envelope,
        stream_seq: u64,
        cancel: &CancellationToken,
    ) -> Result<(), ConsumerError> {
        self.flush().await?;
        let latest = retrying("reading the latest snapshot pointer", || async {
            Ok(store::read_pointer(&self.kv).await?)
        })
        .await?
        .map(|(p, _)| p.lineage);
        let plan = self
            .follower
            .lineage_plan(&env, stream_seq, latest, self.bootstrapped);
        match plan {
            LineagePlan::Adopted { reason, txn } => {
                // The new lineage starts from exactly the replica's state: commit the move to
                // it like a re-snapshot that fetched nothing.
                self.decide(
                    reason,
                    "a new lineage starts from the replica's own state (its digest matches): adopting it without a download",
                );
                let from_seq = txn.prev_seq;
                let changes = txn.changes;
                self.batch_produced_at_ms = Some(txn.produced_at_ms);
                if let Some(b) = txn.batch {
                    self.batch.push(Arc::new(b));
                }
                self.batch_txns += 1;
                self.batch_changes += changes;
                self.batch_started.get_or_insert_with(Instant::now);
                self.flush().await?;
                self.replica.record(StatusEvent::Resync(ResyncRecord {
                    reason,
                    at_ms: now_ms(),
                    from_seq,
                    seq: txn.cursor.seq,
                    bytes_fetched: 0,
                    ranges_rebuilt: 0,
                    segments_applied: 0,
                    duration_ms: 0,
                }));
                tracing::info!(reason = reason.as_str(), lineage = %env.lineage, stream_seq, "Adopted a new lineage that starts from the replica's state");
                Ok(())
            }
            LineagePlan::StartFromFirst { reason } => {
                // A new lineage starts from the empty state, and its first envelope is here.
                if self.bootstrapped {
                    self.decide(
                        reason,
                        "a new lineage starts in the stream: following it from its first envelope",
                    );
                }
                let env_lineage = env.lineage;
                // Whether anything followed the envelope when it was read.
                let pending = u64::from(!self.follower.caught_up());
                self.start_lineage(env.lineage, stream_seq - 1, reason)
                    .await?;
                let keep = self.keep_changes();
                let step =
                    self.follower
                        .on_message(stream_seq, pending, Classified::Envelope(env), keep);
                match self.carry_out(step, stream_seq) {
                    Next::Continue => Ok(()),
                    // The first envelope of a lineage cannot be a gap or a duplicate;
                    // anything else is judged again from a snapshot of that lineage.
                    _ => self.resync(reason, Some(env_lineage), cancel).await,
                }
            }
            LineagePlan::Resync { reason, want } => {
                self.decide(
                    reason,
                    "the stream continues another lineage than the replica's",
                );
                self.resync(reason, want, cancel).await
            }
        }
    }

    /// Opens the stream reader at `from`; its silence is measured from now.
    fn open_reader(&mut self, from: u64) -> Reader {
        self.last_item_at = Instant::now();
        Reader::open(&self.js, &self.settings, from)
    }

    async fn on_tick(&mut self) -> Tick {
        let b = match self.bounds().await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "Reading the stream's bounds failed");
                return Tick::Continue;
            }
        };
        let silent = self.last_item_at.elapsed();
        let tick = self.follower.on_bounds(b, silent, self.once);
        self.update_lag();
        let tick = match tick {
            follower::Tick::Probe { from } => match self.probe(from).await {
                Ok(found) => self.follower.on_probe(from, b.last_seq, found, self.once),
                Err(e) => {
                    tracing::warn!(error = %e, from, "Probing the stream after the reader's position failed");
                    follower::Tick::ReaderStalled { from }
                }
            },
            t => t,
        };
        match tick {
            follower::Tick::Continue | follower::Tick::Probe { .. } => Tick::Continue,
            follower::Tick::Done => Tick::Done,
            follower::Tick::ReaderStalled { from } => Tick::Reopen { from },
            follower::Tick::Resync { reason, why } => {
                tracing::error!(
                    last_seq = b.last_seq,
                    stream_seq = self.follower.accepted_stream_seq(),
                    "The stream ends before the replica's position"
                );
                self.decide(reason, why);
                Tick::Resync { reason }
            }
        }
    }

    /// The stream sequence of the first message at or after `from`, if any (one request to
    /// the stream leader).
    async fn probe(&self, from: u64) -> Result<Option<u64>, ConsumerError> {
        nats::first_at_or_after(&self.js, &self.settings, from)
            .await
            .map_err(|detail| ConsumerError::Probe {
                stream: names::stream_name(&self.settings.pipeline),
                from,
                detail,
            })
    }

    fn update_lag(&self) {
        let pos = if self.batch_txns == 0 && self.inflight.is_none() {
            self.committed.stream_seq.max(self.follower.position())
        } else {
            self.committed.stream_seq
        };
        self.replica
            .set_lag(self.follower.known_last_seq().saturating_sub(pos));
    }

    // ---------------------------------------------------------------- commits

    /// Hands the batch to the store when it is due and the store is free (or the backlog is
    /// too large to keep accumulating).
    async fn maybe_commit(&mut self) -> Result<(), ConsumerError> {
        if self.batch_txns == 0 {
            return Ok(());
        }
        let every = self.settings.consumer.commit_every_envelopes;
        let due = self.batch_txns >= every
            || self.follower.caught_up()
            || self
                .batch_started
                .is_some_and(|t| t.elapsed() >= self.settings.consumer.commit_interval);
        if !due {
            return Ok(());
        }
        if let Some(i) = &self.inflight {
            // A commit that already returned is collected here rather than at the next turn
            // of the event loop (up to `ITEMS_PER_TURN` envelopes later): the store never sits
            // idle while due transactions pile up, and the group left for the end is smaller.
            let done = i.handle.is_finished();
            if !done
                && self.batch_txns < every.saturating_mul(4)
                && self.batch_changes < MAX_ACCUMULATED_CHANGES
            {
                return Ok(()); // keep accumulating while the store writes
            }
            let r = wait_inflight(&mut self.inflight).await;
            self.finish_inflight(r)?;
        }
        self.submit()
    }

    /// Hands the current batch to the store (the caller made sure none is in flight).
    fn submit(&mut self) -> Result<(), ConsumerError> {
        if self.batch_txns == 0 || self.inflight.is_some() {
            return Ok(());
        }
        let cursor = self.follower.applied();
        let entries = self.follower.state().len();
        let batches = std::mem::take(&mut self.batch);
        let produced_at_ms = self.batch_produced_at_ms.take();
        self.batch_txns = 0;
        self.batch_changes = 0;
        self.batch_started = None;
        let view = self.want_view().then(|| self.follower.state().clone());
        if self.store.is_durable() {
            let store = self.store.clone();
            let for_store = batches.clone();
            // The state is at `cursor` here: a copy-on-write clone for a local snapshot.
            let snapshot = store
                .wants_snapshot(entries)
                .then(|| self.follower.state().clone());
            let handle =
                tokio::task::spawn_blocking(move || store.commit(&for_store, &cursor, snapshot));
            self.inflight = Some(Inflight {
                handle,
                cursor,
                entries,
                view,
                batches,
                produced_at_ms,
                started: Instant::now(),
            });
        } else {
            self.complete(cursor, entries, view, batches, produced_at_ms);
        }
        Ok(())
    }

    /// Whether to publish a view with the next commit: when a reader asked for one, or when
    /// caught up (the view then costs little: few buckets change after it). Not on every
    /// commit of a backlog: every bucket the next transactions touch would be copied.
    fn want_view(&mut self) -> bool {
        self.replica.take_view_wanted() || self.follower.caught_up()
    }

    fn finish_inflight(
        &mut self,
        r: Result<Result<(), LocalError>, tokio::task::JoinError>,
    ) -> Result<(), ConsumerError> {
        let Some(i) = self.inflight.take() else {
            return Ok(());
        };
        match r {
            Ok(Ok(())) => {
                self.replica
                    .metrics()
                    .commit_seconds
                    .observe(i.started.elapsed().as_secs_f64());
                self.complete(i.cursor, i.entries, i.view, i.batches, i.produced_at_ms);
                Ok(())
            }
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(ConsumerError::Writer(e.to_string())),
        }
    }

    /// The commit of `cursor` is durable: tell the server, the status, the readers.
    fn complete(
        &mut self,
        cursor: Position,
        entries: usize,
        view: Option<State>,
        batches: Vec<Arc<ChangeBatch>>,
        produced_at_ms: Option<u64>,
    ) {
        self.committed = cursor;
        self.marker.committed(cursor.stream_seq);
        self.replica.set_last_produced(produced_at_ms);
        let batches = if self.replica.has_subscribers() || self.replica.feed_on() {
            batches
        } else {
            Vec::new()
        };
        self.replica
            .committed(cursor, entries, view, batches, self.bootstrapped);
        self.update_lag();
    }

    /// Publishes a view of the committed state when one is wanted (or the replica is caught
    /// up) and nothing applied awaits its commit; otherwise the next commit publishes it.
    fn publish_view_if_idle(&mut self) {
        let idle = self.batch_txns == 0
            && self.inflight.is_none()
            && self.bootstrapped
            && (self.follower.state().lineage(), self.follower.state().seq())
                == (self.committed.lineage, self.committed.seq);
        if !idle || self.replica.view_seq() == (self.committed.lineage, self.committed.seq) {
            return;
        }
        if self.want_view() {
            self.replica.committed(
                self.committed,
                self.follower.state().len(),
                Some(self.follower.state().clone()),
                Vec::new(),
                true,
            );
        }
    }

    /// Commits everything applied and waits until it is durable.
    async fn flush(&mut self) -> Result<(), ConsumerError> {
        if self.inflight.is_some() {
            let r = wait_inflight(&mut self.inflight).await;
            self.finish_inflight(r)?;
        }
        if self.batch_txns > 0 {
            self.submit()?;
            if self.inflight.is_some() {
                let r = wait_inflight(&mut self.inflight).await;
                self.finish_inflight(r)?;
            }
        }
        // A view at the committed position, for readers after a stop or before a resync.
        if self.replica.view_seq() != (self.committed.lineage, self.committed.seq)
            && self.follower.state().seq() == self.committed.seq
            && self.bootstrapped
        {
            self.replica.committed(
                self.committed,
                self.follower.state().len(),
                Some(self.follower.state().clone()),
                Vec::new(),
                true,
            );
        }
        Ok(())
    }

    /// Replaces the replica with `next` at `cursor`: writes it as the local snapshot (when
    /// durable), then publishes, with `diff(state, next)` for subscribers.
    async fn replace(
        &mut self,
        next: State,
        cursor: Position,
        kind: BatchKind,
    ) -> Result<(), ConsumerError> {
        self.flush().await?;
        let changes = if self.replica.has_subscribers() {
            diff(self.follower.state(), &next)
        } else {
            Vec::new()
        };
        let batches = vec![Arc::new(ChangeBatch {
            lineage: cursor.lineage,
            prev_seq: self.follower.applied().seq,
            seq: cursor.seq,
            kind,
            changes,
        })];
        if self.store.is_durable() {
            let started = Instant::now();
            let store = self.store.clone();
            let snapshot = next.clone();
            tokio::task::spawn_blocking(move || store.replace(&snapshot, &cursor))
                .await
                .map_err(|e| ConsumerError::Writer(e.to_string()))??;
            self.replica
                .metrics()
                .commit_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        self.follower.restore(next, cursor);
        self.bootstrapped = true;
        let view = Some(self.follower.state().clone());
        let entries = self.follower.state().len();
        // A snapshot's production time is not the last envelope's: unknown until one applies.
        self.complete(cursor, entries, view, batches, None);
        Ok(())
    }

    // ---------------------------------------------------------------- re-snapshots

    /// Re-snapshots for `reason`, retrying with jittered backoff; fails once
    /// `resync_max_attempts` attempts were made without an envelope applied in between.
    async fn resync(
        &mut self,
        reason: Reason,
        want: Option<Lineage>,
        cancel: &CancellationToken,
    ) -> Result<(), ConsumerError> {
        self.flush().await?;
        if let Some(at) = self.follower.hole_to_confirm() {
            let found = self.message_at(at).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "Could not read the last envelope applied; an older snapshot may be loaded");
                None
            });
            self.follower.confirm_hole(found.as_ref());
        }
        let max = self.settings.consumer.resync_max_attempts;
        loop {
            self.resync_attempts += 1;
            let attempt = self.resync_attempts;
            if attempt > max {
                return Err(ConsumerError::resync_failed(
                    reason,
                    max,
                    "see the attempts logged before",
                ));
            }
            let delay = resync_delay(attempt, reason);
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
            match self.resync_once(reason, want, attempt >= max).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt >= max => {
                    return Err(ConsumerError::resync_failed(
                        reason,
                        attempt,
                        &e.to_string(),
                    ))
                }
                Err(e) => {
                    tracing::warn!(reason = reason.as_str(), attempt, max, error = %e, "Re-snapshot attempt failed; retrying");
                }
            }
        }
    }

    async fn resync_once(
        &mut self,
        reason: Reason,
        want: Option<Lineage>,
        last_attempt: bool,
    ) -> Result<(), ConsumerError> {
        let started = Instant::now();
        let Some(m) = store::latest_manifest(&self.kv).await? else {
            return self.start_without_snapshot(reason, want).await;
        };
        let at = Position {
            lineage: m.lineage,
            seq: m.seq,
            stream_seq: m.stream_seq,
            digest: m.digest,
        };
        match self.follower.snapshot_acceptable(&at, want, last_attempt) {
            Ok(()) => {}
            Err(Refusal::OtherLineage) => {
                return Err(ConsumerError::SnapshotLineage {
                    wanted: want.map(|w| w.to_hex()).unwrap_or_default(),
                    found: m.lineage.to_hex(),
                })
            }
            Err(Refusal::NotAhead {
                snapshot_seq,
                replica_seq,
            }) => {
                return Err(ConsumerError::SnapshotNotAhead {
                    snapshot_seq,
                    replica_seq,
                })
            }
        }
        let mut next = self.follower.state().clone();
        let report = self.resync_reporting(reason, &mut next, &m).await?;
        let from_seq = self.follower.applied().seq;
        let b = self.bounds().await?;
        let cursor = Follower::snapshot_cursor(at, b);
        if cursor.stream_seq != m.stream_seq {
            tracing::warn!(
                snapshot_stream_seq = m.stream_seq,
                last_seq = b.last_seq,
                from = cursor.stream_seq + 1,
                "The snapshot was taken from a stream since purged or recreated: following the stream from its first message"
            );
        }
        self.replace(next, cursor, BatchKind::Resync { reason })
            .await?;
        let elapsed = started.elapsed();
        self.replica
            .metrics()
            .snapshot_seconds
            .observe(elapsed.as_secs_f64());
        self.replica.record(StatusEvent::Resync(ResyncRecord {
            reason,
            at_ms: now_ms(),
            from_seq,
            seq: m.seq,
            bytes_fetched: report.bytes_fetched,
            ranges_rebuilt: report.ranges_rebuilt,
            segments_applied: report.segments_applied,
            duration_ms: elapsed.as_millis() as u64,
        }));
        tracing::info!(
            reason = reason.as_str(),
            lineage = %m.lineage,
            seq = m.seq,
            stream_seq = m.stream_seq,
            bytes_fetched = report.bytes_fetched,
            snapshot_bytes = m.total_bytes(),
            ranges_rebuilt = report.ranges_rebuilt,
            segments_applied = report.segments_applied,
            entries = self.follower.state().len(),
            ms = elapsed.as_millis() as u64,
            "Replica restored from the snapshot and verified"
        );
        Ok(())
    }

    /// Brings `next` to manifest `m` (`store::resync`) while the replica's status and metrics
    /// show how far it has come, and the log says so every few seconds for a long one.
    async fn resync_reporting(
        &mut self,
        reason: Reason,
        next: &mut State,
        m: &deltasync_core::snapshot::Manifest,
    ) -> Result<store::ResyncReport, ConsumerError> {
        let progress = store::SyncProgress::default();
        self.replica.set_sync(Some(SyncRun {
            reason,
            seq: m.seq,
            started_at_ms: now_ms(),
            progress: progress.clone(),
        }));
        let logger = {
            let progress = progress.clone();
            let seq = m.seq;
            tokio::spawn(async move {
                let started = Instant::now();
                let mut tick = tokio::time::interval(SYNC_LOG_EVERY);
                tick.tick().await; // the first tick is immediate
                loop {
                    tick.tick().await;
                    let (done, planned) = (progress.fetched_bytes(), progress.planned_bytes());
                    tracing::info!(
                        reason = reason.as_str(),
                        seq,
                        fetched_bytes = done,
                        remaining_bytes = planned.saturating_sub(done),
                        fetched_entries = progress.fetched_entries(),
                        remaining_entries = progress
                            .planned_entries()
                            .saturating_sub(progress.fetched_entries()),
                        percent = (done * 100).checked_div(planned).unwrap_or(0),
                        secs = started.elapsed().as_secs(),
                        "Loading the snapshot"
                    );
                }
            })
        };
        let result = store::resync_with_progress(&self.kv, next, m, &progress).await;
        logger.abort();
        self.replica.set_sync(None);
        Ok(result?)
    }

    /// No snapshot in the bucket: start from the stream's envelope 1 when it is retained, or
    /// wait for the pipeline's first envelope when there is no history at all.
    async fn start_without_snapshot(
        &mut self,
        reason: Reason,
        want: Option<Lineage>,
    ) -> Result<(), ConsumerError> {
        let b = self.bounds().await?;
        let first = if b.messages > 0 {
            self.first_envelope(b.first_seq).await?
        } else {
            None
        };
        let plan = Follower::without_snapshot(
            b,
            first.as_ref().map(|(s, e)| (*s, e)),
            want,
            self.bootstrapped,
        );
        match plan {
            NoSnapshotPlan::StartLineage {
                lineage,
                stream_seq,
            } => self.start_lineage(lineage, stream_seq, reason).await,
            NoSnapshotPlan::NoSnapshot { lineage, seq } => Err(ConsumerError::NoSnapshot {
                lineage: lineage.to_hex(),
                seq,
            }),
            NoSnapshotPlan::Wait { stream_seq } => {
                tracing::info!(
                    from = stream_seq + 1,
                    "The pipeline has no history yet (no snapshot, no envelope): waiting for its first envelope"
                );
                self.follower.wait_after(stream_seq);
                Ok(())
            }
            NoSnapshotPlan::NoHistory => Err(ConsumerError::NoHistory),
        }
    }

    /// Starts lineage `lineage` from the empty state, its envelope 1 following stream
    /// sequence `stream_seq`.
    async fn start_lineage(
        &mut self,
        lineage: Lineage,
        stream_seq: u64,
        reason: Reason,
    ) -> Result<(), ConsumerError> {
        let from_seq = self.follower.applied().seq;
        let cursor = follower::lineage_start(lineage, stream_seq);
        self.replace(State::new(lineage), cursor, BatchKind::Resync { reason })
            .await?;
        self.replica.record(StatusEvent::Resync(ResyncRecord {
            reason,
            at_ms: now_ms(),
            from_seq,
            seq: 0,
            bytes_fetched: 0,
            ranges_rebuilt: 0,
            segments_applied: 0,
            duration_ms: 0,
        }));
        tracing::info!(reason = reason.as_str(), %lineage, stream_seq, "Following a new lineage from its first envelope");
        Ok(())
    }
}

/// Attempts at a NATS read outside a re-snapshot before giving up.
const READ_ATTEMPTS: u32 = 5;

/// Runs `f` until it succeeds, at most [`READ_ATTEMPTS`] times, pausing 250 ms, 500 ms, ...
/// (each plus up to as much again at random, so replicas do not retry in step): a request
/// timing out once (a busy server) must not stop a replica.
async fn retrying<T, F, Fut>(what: &str, f: F) -> Result<T, ConsumerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ConsumerError>>,
{
    use backon::{ExponentialBuilder, Retryable};
    let backoff = ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(10))
        .with_max_times(READ_ATTEMPTS as usize - 1)
        .with_jitter();
    let mut attempt = 0u32;
    f.retry(backoff)
        .notify(|e, pause| {
            attempt += 1;
            tracing::warn!(attempt, error = %e, ?pause, "{what} failed; retrying");
        })
        .await
}

async fn wait_inflight(
    inflight: &mut Option<Inflight>,
) -> Result<Result<(), LocalError>, tokio::task::JoinError> {
    match inflight {
        Some(i) => (&mut i.handle).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// A uniformly random fraction of `max`.
fn jitter(max: Duration) -> Duration {
    let r = getrandom::u64().unwrap_or(0) % 1_000_000;
    max.mul_f64(r as f64 / 1_000_000.0)
}

/// How often a snapshot load in progress is logged.
const SYNC_LOG_EVERY: Duration = Duration::from_secs(5);

/// Delay before re-snapshot attempt `attempt` for `reason`: [`backoff`], except that a
/// start-up bootstrap's first attempt waits for nothing — replicas start at their own times,
/// and the spread (up to a quarter second) was a sixth of a 1M-key bootstrap. Replicas that
/// re-snapshot for one event together (a pruned stream, a new lineage) keep the spread.
fn resync_delay(attempt: u32, reason: Reason) -> Duration {
    if attempt <= 1 && reason == Reason::Bootstrap {
        return Duration::ZERO;
    }
    backoff(attempt)
}

/// Delay before re-snapshot attempt `attempt` (1-based): the first is spread over 0–250 ms so
/// that replicas resyncing together do not download together; later ones back off
/// exponentially (0.5–1.5 × 250 ms × 2^(n-1), at most 10 s).
fn backoff(attempt: u32) -> Duration {
    if attempt <= 1 {
        return jitter(Duration::from_millis(250));
    }
    let base = Duration::from_millis(250u64 << (attempt - 1).min(6)).min(Duration::from_secs(10));
    base / 2 + jitter(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_spreads_the_first_attempt_and_grows_after() {
        for _ in 0..100 {
            assert!(backoff(1) <= Duration::from_millis(250));
            let b3 = backoff(3);
            assert!(b3 >= Duration::from_millis(500) && b3 <= Duration::from_millis(1500));
            assert!(backoff(30) <= Duration::from_secs(15));
            assert!(resync_delay(1, Reason::Pruned) <= Duration::from_millis(250));
            assert!(resync_delay(2, Reason::Bootstrap) >= Duration::from_millis(250));
        }
        assert_eq!(resync_delay(1, Reason::Bootstrap), Duration::ZERO);
    }
}
