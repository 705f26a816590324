//! The follower: decides how to start (resume, bootstrap, or a reason-coded re-snapshot),
//! then reads the pipeline's stream, applies envelopes, commits batches of them with the
//! cursor, and re-snapshots when the history it needs is gone or its replica diverged.
//!
//! Talks to JetStream through `deltasync_shared::{history, store}` (the stream tail, stream
//! bounds, snapshots), to the local store on blocking threads, to the server-side marker, and
//! publishes into the [`Replica`] handle.
//!
//! ## Invariants
//!
//! - Continuity is judged by envelope sequence alone (`State::apply`): a stream message that is
//!   not an envelope is counted and skipped; duplicate and stale envelopes are skipped; any
//!   other break (gap, lineage, digest) leads to a re-read or a re-snapshot with its reason,
//!   never to a silent skip.
//! - JetStream does not say when it pruned a position: the engine compares the stream's first
//!   sequence with the position it needs, and treats a tail that starts later than asked
//!   (`HistoryError::Pruned`) as lost messages to be judged by the next envelope.
//! - A position is committed (entries and cursor in one local transaction) before it is
//!   acknowledged to the server, shown in the status, or published as a view or change batch.
//! - Re-snapshots are bounded: `consumer.resync_max_attempts` consecutive attempts without an
//!   envelope applied in between, with jittered exponential backoff, then a clear error.
//!
//! ```text
//!  reader task: Tail (ordered consumer) ─ decode ─► channel ─► engine: State::apply
//!                                                                 │ batch of transactions
//!                                                                 ▼
//!                     blocking thread: redb write txn (entries + cursor), fsync
//!                                                                 │ durable
//!                                                                 ▼
//!                          marker reset · status · view · change batches to subscribers
//! ```

use crate::local::{Cursor, LoadedReplica, LocalError, LocalStore};
use crate::marker::Marker;
use crate::replica::{BatchKind, ChangeBatch, Reason, Replica, ResyncRecord};
use crate::ConsumerError;
use async_nats::jetstream::{self, kv};
use deltasync_shared::envelope::now_ms;
use deltasync_shared::history::{self, Classified, HistoryError, StreamItem, Tail};
use deltasync_shared::settings::Settings;
use deltasync_shared::state::diff;
use deltasync_shared::{store, Applied, ApplyError, Change, Digest, Envelope, Lineage, State};
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

/// How often the engine reads the stream's bounds (lag, idle end of `--once`).
const TICK: Duration = Duration::from_secs(1);

/// How long `--once` waits with nothing more to read before it calls the stream's head read.
const ONCE_IDLE: Duration = Duration::from_secs(2);

/// How long the reader may deliver nothing while the stream holds messages after the engine's
/// position before it is reopened there. An ordered consumer can go quiet without an error:
/// after the stream leader of an R3 cluster was killed, one kept receiving heartbeats but no
/// messages for 20–36 s (about 1 run in 3 of the fault suite). The tick's bounds read sees it.
const READER_STALL: Duration = Duration::from_secs(5);

/// What `run` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The committed position at exit.
    pub cursor: Cursor,
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
    fn open(js: &jetstream::Context, settings: &Settings, from: u64) -> Reader {
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
    cursor: Cursor,
    entries: usize,
    view: Option<State>,
    batches: Vec<Arc<ChangeBatch>>,
    started: Instant,
}

/// What a tick asks the loop to do next.
#[derive(Debug, PartialEq, Eq)]
enum Tick {
    Continue,
    /// `--once` has nothing more to read.
    Done,
    /// The reader delivered nothing for `READER_STALL` while the stream held more: reopen it.
    ReaderStalled,
}

/// What an item asks the loop to do next.
enum Step {
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

/// How the local cursor relates to the retained history.
enum Continuity {
    Continues,
    Pruned,
    LineageChanged,
}

pub(crate) struct Engine {
    settings: Settings,
    js: jetstream::Context,
    kv: kv::Store,
    store: LocalStore,
    replica: Replica,
    marker: Marker,
    once: bool,

    /// The replica as applied; may be ahead of `committed`.
    state: State,
    /// Position of `state` (its last complete transaction) and that envelope's stream seq.
    applied: Cursor,
    /// Stream sequence of the last envelope `state` accepted, buffered parts included: the
    /// stream is re-read from the one after it.
    accepted_stream_seq: u64,
    /// Stream sequence of the last message read, of any kind.
    read_stream_seq: u64,
    /// The stream's last sequence as last seen.
    known_last_seq: u64,
    /// Whether the last message read had nothing after it.
    caught_up: bool,
    last_item_at: Instant,

    /// Changes of the buffered parts of the transaction in progress (when kept).
    parts: Vec<Change>,
    /// Whether `parts` holds every buffered part (false when nobody needed them).
    parts_kept: bool,

    /// Transactions applied and not yet handed to the store.
    batch: Vec<Arc<ChangeBatch>>,
    batch_txns: usize,
    /// Changes in those transactions (bounds the memory a backlog can hold).
    batch_changes: usize,
    batch_started: Option<Instant>,
    inflight: Option<Inflight>,
    /// The durable position.
    committed: Cursor,
    bootstrapped: bool,

    /// Re-snapshot attempts since an envelope was last applied.
    resync_attempts: u32,
    /// The envelope sequence a gap was re-read for (a second gap there means it is gone).
    reread_at: Option<u64>,
    /// Set when the tail skipped stream sequences: why (pruned, or deleted = gap).
    lost: Option<Reason>,
}

impl Engine {
    pub(crate) fn new(
        settings: Settings,
        js: jetstream::Context,
        kv: kv::Store,
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
            state: State::new(Lineage::default()),
            applied: Cursor::default(),
            accepted_stream_seq: 0,
            read_stream_seq: 0,
            known_last_seq: 0,
            caught_up: false,
            last_item_at: Instant::now(),
            parts: Vec::new(),
            parts_kept: true,
            batch: Vec::new(),
            batch_txns: 0,
            batch_changes: 0,
            batch_started: None,
            inflight: None,
            committed: Cursor::default(),
            bootstrapped: false,
            resync_attempts: 0,
            reread_at: None,
            lost: None,
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
        self.known_last_seq = self.known_last_seq.max(head);
        self.update_lag();
        let target = if self.once {
            tracing::info!(
                head,
                from = self.accepted_stream_seq + 1,
                "Catching up to the stream's head (--once)"
            );
            Some(head)
        } else {
            None
        };
        let mut reader = self.open_reader(self.accepted_stream_seq + 1);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let interval = self.settings.consumer.commit_interval;
        loop {
            if let Some(t) = target {
                if self.read_stream_seq.max(self.accepted_stream_seq) >= t {
                    tracing::info!(
                        seq = self.applied.seq,
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
                        seq = self.applied.seq,
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
                                seq = self.applied.seq,
                                "Nothing more to read: the stream's head was reached (--once)"
                            );
                            return Ok(());
                        }
                        Tick::ReaderStalled => {
                            let from = self.accepted_stream_seq + 1;
                            tracing::warn!(
                                from,
                                head = self.known_last_seq,
                                silent_for = ?self.last_item_at.elapsed(),
                                "The stream reader delivered nothing while the stream holds more; reopening it"
                            );
                            self.replica.metrics().reader_stalls.inc();
                            reader = self.open_reader(from);
                        }
                        Tick::Done | Tick::Continue => {}
                    }
                }
                Event::Item(None) => {
                    reader = self.open_reader(self.accepted_stream_seq + 1);
                }
                Event::Item(Some(first)) => {
                    let mut next = Some(first);
                    let mut taken = 0;
                    while let Some(item) = next.take() {
                        taken += 1;
                        match self.on_item(item).await {
                            Step::Continue => {
                                if self.caught_up && self.lost.is_none() && self.reread_at.is_none()
                                {
                                    // Caught up with a continuous history: earlier re-snapshots
                                    // are behind us.
                                    self.resync_attempts = 0;
                                }
                            }
                            Step::Reopen { from } => {
                                reader = self.open_reader(from);
                                break;
                            }
                            Step::Resync { reason, want } => {
                                drop(reader);
                                self.resync(reason, want, cancel).await?;
                                reader = self.open_reader(self.accepted_stream_seq + 1);
                                break;
                            }
                            Step::LineageChange { env, stream_seq } => {
                                drop(reader);
                                self.lineage_change(env, stream_seq, cancel).await?;
                                reader = self.open_reader(self.accepted_stream_seq + 1);
                                break;
                            }
                        }
                        self.maybe_commit().await?;
                        if cancel.is_cancelled() || taken >= ITEMS_PER_TURN {
                            break;
                        }
                        if let Some(t) = target {
                            if self.read_stream_seq >= t {
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
        self.state = local.state;
        self.applied = cursor;
        self.accepted_stream_seq = cursor.stream_seq;
        self.read_stream_seq = cursor.stream_seq;
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
        let continuity = retrying("checking the local cursor against the stream", || {
            self.continuity(&cursor)
        })
        .await?;
        match continuity {
            Continuity::Continues => {
                self.decide(
                    Reason::Resume,
                    "the local cursor continues the retained history",
                );
                // The replica on disk is verified and continues the history: readers may use
                // it while the engine catches up.
                self.replica.committed(
                    cursor,
                    self.state.len(),
                    Some(self.state.clone()),
                    Vec::new(),
                    true,
                );
                Ok(())
            }
            Continuity::Pruned => {
                self.decide(
                    Reason::Pruned,
                    "the envelopes after the local cursor are no longer in the stream",
                );
                self.resync(Reason::Pruned, None, cancel).await
            }
            Continuity::LineageChanged => {
                self.decide(
                    Reason::LineageChanged,
                    "the pipeline's history is another lineage than the local replica's",
                );
                self.resync(Reason::LineageChanged, None, cancel).await
            }
        }
    }

    /// Logs and counts a decision.
    fn decide(&self, reason: Reason, why: &str) {
        self.replica.metrics().decision(reason.as_str());
        match reason {
            Reason::Resume | Reason::Bootstrap => tracing::info!(
                reason = reason.as_str(),
                lineage = %self.applied.lineage,
                seq = self.applied.seq,
                stream_seq = self.applied.stream_seq,
                "Start-up decision: {why}"
            ),
            Reason::DigestMismatch | Reason::CorruptLocal => tracing::error!(
                reason = reason.as_str(),
                lineage = %self.applied.lineage,
                seq = self.applied.seq,
                "Re-snapshot: {why}"
            ),
            _ => tracing::warn!(
                reason = reason.as_str(),
                lineage = %self.applied.lineage,
                seq = self.applied.seq,
                stream_seq = self.applied.stream_seq,
                "Re-snapshot: {why}"
            ),
        }
    }

    /// Whether the stream still holds everything after `c`.
    async fn continuity(&self, c: &Cursor) -> Result<Continuity, ConsumerError> {
        if let Some((p, _)) = store::read_pointer(&self.kv).await? {
            if p.lineage != c.lineage {
                return Ok(Continuity::LineageChanged);
            }
        }
        let b = history::bounds(&self.js, &self.settings).await?;
        if c.stream_seq > b.last_seq {
            tracing::warn!(
                stream_seq = c.stream_seq,
                last = b.last_seq,
                "The stream ends before the local cursor: it was recreated"
            );
            return Ok(Continuity::Pruned);
        }
        if c.stream_seq + 1 >= b.first_seq {
            return Ok(Continuity::Continues);
        }
        // Messages after the cursor are gone; judge by envelope sequence whether any of them
        // was an envelope the replica lacks.
        match self.first_envelope(b.first_seq).await? {
            Some((_, e)) if e.lineage != c.lineage => Ok(Continuity::LineageChanged),
            Some((_, e)) if e.seq <= c.seq + 1 => Ok(Continuity::Continues),
            Some(_) => Ok(Continuity::Pruned),
            None if b.last_seq > c.stream_seq => Ok(Continuity::Pruned),
            None => Ok(Continuity::Continues),
        }
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

    async fn on_item(&mut self, item: Result<StreamItem, HistoryError>) -> Step {
        let item = match item {
            Ok(i) => i,
            Err(HistoryError::Pruned { wanted, first, .. }) => {
                let reason = match history::bounds(&self.js, &self.settings).await {
                    Ok(b) if b.first_seq > wanted => Reason::Pruned,
                    Ok(_) => Reason::Gap,
                    Err(_) => Reason::Pruned,
                };
                tracing::warn!(
                    wanted,
                    first,
                    why = if reason == Reason::Pruned { "pruned" } else { "deleted" },
                    "The stream no longer holds messages the replica asked for; the next envelope decides whether one of them mattered"
                );
                self.lost = Some(reason);
                return Step::Reopen { from: first };
            }
            Err(e) => {
                tracing::warn!(error = %e, from = self.accepted_stream_seq + 1, "Reading the stream failed; reopening it");
                tokio::time::sleep(jitter(Duration::from_millis(500))).await;
                return Step::Reopen {
                    from: self.accepted_stream_seq + 1,
                };
            }
        };
        self.read_stream_seq = item.stream_seq;
        self.known_last_seq = self.known_last_seq.max(item.stream_seq + item.pending);
        self.caught_up = item.pending == 0;
        self.last_item_at = Instant::now();
        match item.item {
            Classified::Foreign { reason } => {
                self.replica.metrics().foreign_messages.inc();
                tracing::error!(stream_seq = item.stream_seq, %reason, "A message in the pipeline's stream is not an envelope; skipped");
                Step::Continue
            }
            Classified::Envelope(env) => self.on_envelope(env, item.stream_seq),
        }
    }

    fn on_envelope(&mut self, env: Envelope, stream_seq: u64) -> Step {
        let started = Instant::now();
        let result = self.state.apply(&env);
        match result {
            Ok(Applied::Buffered { .. }) => {
                if env.part == 1 {
                    self.parts.clear();
                    self.parts_kept = self.keep_changes();
                }
                if self.parts_kept {
                    self.parts.extend(env.changes);
                }
                self.accepted_stream_seq = stream_seq;
                self.reread_at = None;
                self.lost = None;
                Step::Continue
            }
            Ok(Applied::Committed { seq, changes }) => {
                let m = self.replica.metrics();
                m.envelopes_applied.inc();
                m.changes_applied.inc_by(changes as u64);
                let prev_seq = self.applied.seq;
                let keep = if env.part == 1 {
                    self.keep_changes()
                } else {
                    self.parts_kept && self.keep_changes()
                };
                if keep {
                    let mut all = if env.part == 1 {
                        Vec::new()
                    } else {
                        std::mem::take(&mut self.parts)
                    };
                    if all.is_empty() {
                        all = env.changes;
                    } else {
                        all.extend(env.changes);
                    }
                    self.batch.push(Arc::new(ChangeBatch {
                        lineage: env.lineage,
                        prev_seq,
                        seq,
                        kind: BatchKind::Applied,
                        changes: all,
                    }));
                }
                self.parts.clear();
                self.parts_kept = true;
                self.applied = Cursor {
                    lineage: env.lineage,
                    seq,
                    stream_seq,
                    digest: env.digest,
                };
                self.accepted_stream_seq = stream_seq;
                self.batch_txns += 1;
                self.batch_changes += changes;
                self.batch_started.get_or_insert_with(Instant::now);
                self.resync_attempts = 0;
                self.reread_at = None;
                self.lost = None;
                m.apply_seconds.observe(started.elapsed().as_secs_f64());
                Step::Continue
            }
            Err(ApplyError::Duplicate { seq }) => {
                self.replica.metrics().skipped("duplicate");
                tracing::debug!(seq, stream_seq, "Duplicate envelope skipped");
                Step::Continue
            }
            Err(ApplyError::Stale { seq, current }) => {
                self.replica.metrics().skipped("stale");
                tracing::debug!(seq, current, stream_seq, "Stale envelope skipped");
                Step::Continue
            }
            Err(ApplyError::LineageMismatch { .. }) => Step::LineageChange { env, stream_seq },
            Err(e @ ApplyError::DigestMismatch { .. }) => {
                tracing::error!(stream_seq, error = %e, "The replica diverged from the producer");
                self.decide(
                    Reason::DigestMismatch,
                    "the digest after a transaction differs from the producer's",
                );
                Step::Resync {
                    reason: Reason::DigestMismatch,
                    want: Some(env.lineage),
                }
            }
            Err(e @ (ApplyError::Gap { .. } | ApplyError::PartOutOfOrder { .. })) => {
                let expected = match e {
                    ApplyError::Gap { expected, .. } => expected,
                    _ => env.seq,
                };
                if let Some(reason) = self.lost.take() {
                    self.decide(
                        reason,
                        "an envelope the replica needs is no longer in the stream",
                    );
                    return Step::Resync {
                        reason,
                        want: Some(env.lineage),
                    };
                }
                if self.reread_at == Some(expected) {
                    self.decide(
                        Reason::Gap,
                        "an envelope is missing from the stream (re-reading did not find it)",
                    );
                    return Step::Resync {
                        reason: Reason::Gap,
                        want: Some(env.lineage),
                    };
                }
                tracing::warn!(stream_seq, error = %e, from = self.accepted_stream_seq + 1, "Gap in the envelope sequence; re-reading the stream after the last applied envelope");
                self.reread_at = Some(expected);
                Step::Reopen {
                    from: self.accepted_stream_seq + 1,
                }
            }
        }
    }

    fn keep_changes(&self) -> bool {
        self.store.is_durable() || self.replica.has_subscribers()
    }

    async fn lineage_change(
        &mut self,
        env: Envelope,
        stream_seq: u64,
        cancel: &CancellationToken,
    ) -> Result<(), ConsumerError> {
        self.flush().await?;
        let reason = if self.bootstrapped {
            Reason::LineageChanged
        } else {
            Reason::Bootstrap
        };
        let latest = retrying("reading the latest snapshot pointer", || async {
            Ok(store::read_pointer(&self.kv).await?)
        })
        .await?
        .map(|(p, _)| p.lineage);
        if latest != Some(env.lineage) && env.seq == 1 && env.part == 1 {
            // A new lineage starts from the empty state, and its first envelope is here.
            if self.bootstrapped {
                self.decide(
                    reason,
                    "a new lineage starts in the stream: following it from its first envelope",
                );
            }
            self.start_lineage(env.lineage, stream_seq - 1, reason)
                .await?;
            if let Step::Continue = self.on_envelope(env, stream_seq) {
                return Ok(());
            }
            // The first envelope of a lineage cannot be a gap or a duplicate; anything else
            // is judged again from a snapshot.
            return self.resync(reason, None, cancel).await;
        }
        self.decide(
            reason,
            "the stream continues another lineage than the replica's",
        );
        self.resync(reason, Some(env.lineage), cancel).await
    }

    /// Opens the stream reader at `from`; its silence is measured from now.
    fn open_reader(&mut self, from: u64) -> Reader {
        self.last_item_at = Instant::now();
        Reader::open(&self.js, &self.settings, from)
    }

    async fn on_tick(&mut self) -> Tick {
        match history::bounds(&self.js, &self.settings).await {
            Ok(b) => {
                self.known_last_seq = b.last_seq;
                self.update_lag();
                let read_all = b.last_seq <= self.read_stream_seq.max(self.accepted_stream_seq);
                let silent = self.last_item_at.elapsed();
                if self.once && (read_all || (self.caught_up && silent >= ONCE_IDLE)) {
                    Tick::Done
                } else if !read_all && silent >= READER_STALL {
                    Tick::ReaderStalled
                } else {
                    Tick::Continue
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "Reading the stream's bounds failed");
                Tick::Continue
            }
        }
    }

    fn update_lag(&self) {
        let pos = if self.batch_txns == 0 && self.inflight.is_none() {
            self.committed.stream_seq.max(self.read_stream_seq)
        } else {
            self.committed.stream_seq
        };
        self.replica
            .set_lag(self.known_last_seq.saturating_sub(pos));
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
            || self.caught_up
            || self
                .batch_started
                .is_some_and(|t| t.elapsed() >= self.settings.consumer.commit_interval);
        if !due {
            return Ok(());
        }
        if self.inflight.is_some() {
            if self.batch_txns < every.saturating_mul(4)
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
        let cursor = self.applied;
        let entries = self.state.len();
        let batches = std::mem::take(&mut self.batch);
        self.batch_txns = 0;
        self.batch_changes = 0;
        self.batch_started = None;
        let view = self.want_view().then(|| self.state.clone());
        if self.store.is_durable() {
            let store = self.store.clone();
            let for_store = batches.clone();
            let handle = tokio::task::spawn_blocking(move || store.commit(&for_store, &cursor));
            self.inflight = Some(Inflight {
                handle,
                cursor,
                entries,
                view,
                batches,
                started: Instant::now(),
            });
        } else {
            self.complete(cursor, entries, view, batches);
        }
        Ok(())
    }

    /// Whether to publish a view with the next commit: when a reader asked for one, or when
    /// caught up (the view then costs little: few buckets change after it). Not on every
    /// commit of a backlog: every bucket the next transactions touch would be copied.
    fn want_view(&mut self) -> bool {
        self.replica.take_view_wanted() || self.caught_up
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
                self.complete(i.cursor, i.entries, i.view, i.batches);
                Ok(())
            }
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(ConsumerError::Writer(e.to_string())),
        }
    }

    /// The commit of `cursor` is durable: tell the server, the status, the readers.
    fn complete(
        &mut self,
        cursor: Cursor,
        entries: usize,
        view: Option<State>,
        batches: Vec<Arc<ChangeBatch>>,
    ) {
        self.committed = cursor;
        self.marker.committed(cursor.stream_seq);
        let batches = if self.replica.has_subscribers() {
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
            && (self.state.lineage(), self.state.seq())
                == (self.committed.lineage, self.committed.seq);
        if !idle || self.replica.view_seq() == (self.committed.lineage, self.committed.seq) {
            return;
        }
        if self.want_view() {
            self.replica.committed(
                self.committed,
                self.state.len(),
                Some(self.state.clone()),
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
            && self.state.seq() == self.committed.seq
            && self.bootstrapped
        {
            self.replica.committed(
                self.committed,
                self.state.len(),
                Some(self.state.clone()),
                Vec::new(),
                true,
            );
        }
        Ok(())
    }

    /// Replaces the replica with `next` at `cursor`: commits `diff(state, next)` and the
    /// cursor in one transaction, then publishes.
    async fn replace(
        &mut self,
        next: State,
        cursor: Cursor,
        kind: BatchKind,
    ) -> Result<(), ConsumerError> {
        self.flush().await?;
        let need_changes = self.store.is_durable() || self.replica.has_subscribers();
        let changes = if need_changes {
            diff(&self.state, &next)
        } else {
            Vec::new()
        };
        let batches = vec![Arc::new(ChangeBatch {
            lineage: cursor.lineage,
            prev_seq: self.applied.seq,
            seq: cursor.seq,
            kind,
            changes,
        })];
        if self.store.is_durable() {
            let started = Instant::now();
            let store = self.store.clone();
            let for_store = batches.clone();
            tokio::task::spawn_blocking(move || store.commit(&for_store, &cursor))
                .await
                .map_err(|e| ConsumerError::Writer(e.to_string()))??;
            self.replica
                .metrics()
                .commit_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        self.state = next;
        self.applied = cursor;
        self.accepted_stream_seq = cursor.stream_seq;
        self.read_stream_seq = self.read_stream_seq.max(cursor.stream_seq);
        self.parts.clear();
        self.parts_kept = true;
        self.lost = None;
        self.reread_at = None;
        self.bootstrapped = true;
        let view = Some(self.state.clone());
        let entries = self.state.len();
        self.complete(cursor, entries, view, batches);
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
            let delay = backoff(attempt);
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
            match self.resync_once(reason, want).await {
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
    ) -> Result<(), ConsumerError> {
        let started = Instant::now();
        let Some(m) = store::latest_manifest(&self.kv).await? else {
            return self.start_without_snapshot(reason, want).await;
        };
        if let Some(w) = want {
            if m.lineage != w {
                return Err(ConsumerError::SnapshotLineage {
                    wanted: w.to_hex(),
                    found: m.lineage.to_hex(),
                });
            }
        }
        let mut next = self.state.clone();
        let report = store::resync(&self.kv, &mut next, &m).await?;
        let from_seq = self.applied.seq;
        let cursor = Cursor {
            lineage: m.lineage,
            seq: m.seq,
            stream_seq: m.stream_seq,
            digest: m.digest,
        };
        self.replace(next, cursor, BatchKind::Resync { reason })
            .await?;
        let elapsed = started.elapsed();
        let metrics = self.replica.metrics();
        metrics.resync(reason.as_str());
        metrics.snapshot_bytes.inc_by(report.bytes_fetched);
        metrics.snapshot_seconds.observe(elapsed.as_secs_f64());
        self.replica.record_resync(ResyncRecord {
            reason,
            at_ms: now_ms(),
            from_seq,
            seq: m.seq,
            bytes_fetched: report.bytes_fetched,
            ranges_rebuilt: report.ranges_rebuilt,
            segments_applied: report.segments_applied,
            duration_ms: elapsed.as_millis() as u64,
        });
        tracing::info!(
            reason = reason.as_str(),
            lineage = %m.lineage,
            seq = m.seq,
            stream_seq = m.stream_seq,
            bytes_fetched = report.bytes_fetched,
            snapshot_bytes = m.total_bytes(),
            ranges_rebuilt = report.ranges_rebuilt,
            segments_applied = report.segments_applied,
            entries = self.state.len(),
            ms = elapsed.as_millis() as u64,
            "Replica restored from the snapshot and verified"
        );
        Ok(())
    }

    /// No snapshot in the bucket: start from the stream's envelope 1 when it is retained, or
    /// wait for the pipeline's first envelope when there is no history at all.
    async fn start_without_snapshot(
        &mut self,
        reason: Reason,
        want: Option<Lineage>,
    ) -> Result<(), ConsumerError> {
        let b = history::bounds(&self.js, &self.settings).await?;
        let first = if b.messages > 0 {
            self.first_envelope(b.first_seq).await?
        } else {
            None
        };
        match first {
            Some((stream_seq, e))
                if e.seq == 1 && e.part == 1 && want.is_none_or(|w| w == e.lineage) =>
            {
                self.start_lineage(e.lineage, stream_seq - 1, reason).await
            }
            Some((_, e)) => Err(ConsumerError::NoSnapshot {
                lineage: e.lineage.to_hex(),
                seq: e.seq,
            }),
            None if !self.bootstrapped => {
                tracing::info!(
                    from = b.last_seq + 1,
                    "The pipeline has no history yet (no snapshot, no envelope): waiting for its first envelope"
                );
                self.state = State::new(Lineage::default());
                self.applied = Cursor {
                    stream_seq: b.last_seq,
                    ..Cursor::default()
                };
                self.accepted_stream_seq = b.last_seq;
                self.read_stream_seq = b.last_seq;
                Ok(())
            }
            None => Err(ConsumerError::NoHistory),
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
        let from_seq = self.applied.seq;
        let cursor = Cursor {
            lineage,
            seq: 0,
            stream_seq,
            digest: Digest::ZERO,
        };
        self.replace(State::new(lineage), cursor, BatchKind::Resync { reason })
            .await?;
        self.replica.metrics().resync(reason.as_str());
        self.replica.record_resync(ResyncRecord {
            reason,
            at_ms: now_ms(),
            from_seq,
            seq: 0,
            bytes_fetched: 0,
            ranges_rebuilt: 0,
            segments_applied: 0,
            duration_ms: 0,
        });
        tracing::info!(reason = reason.as_str(), %lineage, stream_seq, "Following a new lineage from its first envelope");
        Ok(())
    }
}

/// Attempts at a NATS read outside a re-snapshot before giving up.
const READ_ATTEMPTS: u32 = 5;

/// Runs `f` until it succeeds, at most [`READ_ATTEMPTS`] times with backoff: a request timing
/// out once (a busy server) must not stop a replica.
async fn retrying<T, F, Fut>(what: &str, mut f: F) -> Result<T, ConsumerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ConsumerError>>,
{
    let mut attempt = 1;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < READ_ATTEMPTS => {
                tracing::warn!(attempt, error = %e, "{what} failed; retrying");
                tokio::time::sleep(backoff(attempt + 1)).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
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
        }
    }
}
