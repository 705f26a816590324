//! The follower: every decision the consumer takes about the history, as synchronous, I/O-free
//! code. It holds the replica as applied in memory and its position, takes what the engine
//! read (stream messages, the stream's bounds, the snapshot pointer, the result of a probe) and
//! answers what to do: a transaction was applied (commit it), a message was skipped, re-read
//! the stream from a position, re-snapshot for a reason, probe the stream, wait.
//!
//! Talks to nothing. The engine (`engine.rs`) carries out its steps against JetStream, the
//! bucket and the local store, like a `raft-rs` `RawNode` driver; `follower/model_tests.rs`
//! drives it through hostile histories against a simple model. Its vocabulary lives beside
//! it: `follower/reason.rs` (why it re-snapshots: [`Reason`]) and `follower/batch.rs` (the
//! [`ChangeBatch`]es it makes, which the engine commits and the replica handle delivers).
//!
//! ## Invariants
//!
//! - Continuity is judged by envelope sequence; stream positions only say where to read and
//!   whether an envelope is new. A transaction is applied whole or not at all (its parts are
//!   buffered in [`State`] and at most [`MAX_TXN_PARTS`] long: the codec refuses longer ones
//!   and the follower counts any that reaches it as foreign), and only if the producer's
//!   digest after it matches.
//! - Nothing is skipped silently: a message is skipped only if it is foreign (counted), or an
//!   envelope already accounted for (a re-delivery at a stream position the replica read
//!   already, or the same envelope again). Every other break (gap, lost messages, another
//!   lineage, a digest mismatch, a fork) leads to a re-read or a re-snapshot with its reason.
//! - **Forks.** The producer publishes envelope `n` with `Nats-Expected-Last-Sequence` set to
//!   the stream sequence of envelope `n - 1` and with `Nats-Msg-Id <lineage>-<n>`
//!   (`producer/src/publisher.rs`): a retry of `n` is either deduplicated (same stream
//!   sequence) or refused (the stream's last sequence moved on), so envelope `n` can be stored
//!   at one stream position only, directly after `n - 1`. A legitimate duplicate therefore
//!   never sits at a *later* stream position than the envelope it repeats. Hence, for an
//!   envelope of the replica's lineage:
//!
//!   ```text
//!   seq <= accepted seq  and  stream seq >  accepted stream seq   → fork (a reused sequence)
//!   seq == cursor seq    and  digest     != cursor digest         → fork (another history)
//!   stream's last seq    <  accepted stream seq                   → fork (purged, recreated)
//!   seq <= accepted seq  otherwise                                → duplicate or stale: skip
//!   ```
//!
//!   "Accepted" counts buffered parts of the transaction in progress. A fork is never skipped
//!   as a duplicate: the replica re-snapshots with reason `fork`.
//! - **Lineage starts.** An envelope of another lineage that starts it (envelope 1, one part)
//!   and whose changes on the replica's state give exactly its digest (a full-state digest)
//!   is adopted in place: the states are equal, nothing is fetched, and it is still recorded
//!   as a re-snapshot for `lineage_changed`. A start that verifies on the empty state only is
//!   followed from the empty state; any other start keeps the replica as it is and
//!   re-snapshots wanting the new lineage (its snapshot may land a moment after its marker:
//!   an older snapshot of another lineage is refused and the attempt retried, unless it is a
//!   snapshot of the replica's own lineage ahead of its position, which fills envelopes of
//!   the old lineage the replica missed before the marker; see
//!   [`Follower::snapshot_acceptable`]).
//! - A re-snapshot for a hole (a gap, or envelopes pruned while following) does not take the
//!   replica back: when the stream still holds the last envelope applied where it was read, a
//!   snapshot not past the hole is refused until a newer one lands (or the last attempt; see
//!   [`Follower::snapshot_acceptable`]).
//! - A reader that delivers nothing while the stream's last sequence is beyond the read
//!   position is not assumed stalled: the engine probes for a message after the position
//!   first. A stream whose tail was deleted (its last sequence holds nothing) is caught up.

use deltasync_core::envelope::MAX_TXN_PARTS;
use deltasync_core::recovery::Classified;
use deltasync_core::Position;
use deltasync_core::{Applied, ApplyError, Change, Digest, Envelope, Lineage, State};
use std::time::Duration;

mod batch;
mod reason;
pub use batch::{BatchKind, ChangeBatch};
pub use reason::Reason;

/// How long the reader may deliver nothing while the stream holds messages after the
/// position before the engine probes the stream (and reopens the reader if the probe finds a
/// message). An ordered consumer can go quiet without an error: after the stream leader of an
/// R3 cluster was killed, one kept receiving heartbeats but no messages for 20–36 s.
pub const READER_STALL: Duration = Duration::from_secs(5);

/// How long `--once` waits with nothing more to read before it calls the stream's head read.
pub const ONCE_IDLE: Duration = Duration::from_secs(2);

/// The stream's bounds as the follower needs them (from one stream info request).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Lowest stream sequence still stored (`last_seq + 1` when the stream is empty).
    pub first_seq: u64,
    /// Highest stream sequence ever assigned.
    pub last_seq: u64,
    /// Messages stored.
    pub messages: u64,
}

/// A transaction applied to the in-memory replica: the engine commits it.
#[derive(Debug)]
pub struct Txn {
    /// The position after it.
    pub cursor: Position,
    /// The position before it.
    pub prev_seq: u64,
    /// Changes applied.
    pub changes: usize,
    /// Its changes, when the caller asked to keep them.
    pub batch: Option<ChangeBatch>,
    /// When the producer made its last envelope, ms since the Unix epoch (its clock).
    pub produced_at_ms: u64,
}

/// What to do after a stream message.
#[derive(Debug)]
pub enum Step {
    /// A complete transaction was applied in memory: commit it.
    Applied(Txn),
    /// A part of a multi-part transaction was buffered.
    Buffered,
    /// An envelope already accounted for, skipped (`duplicate` or `stale`).
    Skipped { why: &'static str, seq: u64 },
    /// Not an envelope: count and log it.
    Foreign { reason: String },
    /// Read the stream again from this stream sequence.
    Reread { from: u64, why: &'static str },
    /// Re-snapshot; `want` is the lineage the snapshot must have, when known.
    Resync {
        reason: Reason,
        want: Option<Lineage>,
        why: &'static str,
    },
    /// An envelope of another lineage: the engine reads the snapshot pointer and asks
    /// [`Follower::lineage_plan`].
    LineageChange { env: Envelope, stream_seq: u64 },
}

/// What to do after a look at the stream's bounds.
#[derive(Debug, PartialEq, Eq)]
pub enum Tick {
    Continue,
    /// `--once` has nothing more to read.
    Done,
    /// The reader delivered nothing for [`READER_STALL`] while the stream's last sequence is
    /// beyond the position: ask the stream for the first message at or after `from`.
    Probe {
        from: u64,
    },
    /// The probe found a message the reader did not deliver: reopen the reader at `from`.
    ReaderStalled {
        from: u64,
    },
    /// The stream ends before the replica's position: it was purged or recreated.
    Resync {
        reason: Reason,
        why: &'static str,
    },
}

/// How a local cursor relates to the retained history (the start-up decision).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continuity {
    Continues,
    Pruned,
    LineageChanged,
    Fork,
}

impl Continuity {
    /// The reason of the start-up decision it leads to: resume when the cursor continues the
    /// history, else a re-snapshot for why it does not.
    pub fn reason(self) -> Reason {
        match self {
            Continuity::Continues => Reason::Resume,
            Continuity::Pruned => Reason::Pruned,
            Continuity::LineageChanged => Reason::LineageChanged,
            Continuity::Fork => Reason::Fork,
        }
    }
}

/// A start-up judgement that may need the first envelope retained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judge {
    Decided(Continuity, &'static str),
    /// Read the message at `at` (the cursor's own envelope, still retained), then ask
    /// [`Follower::judge_cursor_message`].
    NeedCursorMessage {
        at: u64,
    },
    /// Read the first envelope at or after `from`, then ask [`Follower::judge_first`].
    NeedFirstEnvelope {
        from: u64,
    },
}

/// What to do with an envelope of another lineage.
#[derive(Debug)]
pub enum LineagePlan {
    /// The envelope starts its lineage from exactly the replica's state (a lineage-start
    /// marker): the follower adopted it and is at its envelope 1 now. Commit `txn` (its batch
    /// is a re-snapshot for `reason` that fetched nothing).
    Adopted { reason: Reason, txn: Txn },
    /// A new lineage starts here from the empty state (its first envelope verifies on it):
    /// restore the empty state of it just before `stream_seq`, then feed the envelope again.
    StartFromFirst { reason: Reason },
    Resync {
        reason: Reason,
        want: Option<Lineage>,
    },
}

/// What to do when the bucket holds no snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSnapshotPlan {
    /// Start `lineage` from the empty state; its envelope 1 follows `stream_seq`.
    StartLineage { lineage: Lineage, stream_seq: u64 },
    /// The stream starts after envelope 1 of `lineage`: nothing to start from.
    NoSnapshot { lineage: Lineage, seq: u64 },
    /// No history at all yet: wait for the first envelope after `stream_seq`.
    Wait { stream_seq: u64 },
    /// No history although the replica had one.
    NoHistory,
}

/// Why a re-snapshot refuses the bucket's latest snapshot
/// ([`Follower::snapshot_acceptable`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// It belongs to another lineage than the one the history continues with.
    OtherLineage,
    /// It is not past the replica's verified position: it holds nothing the replica lacks.
    NotAhead { snapshot_seq: u64, replica_seq: u64 },
}

/// The decisions, and the in-memory replica they are about.
#[derive(Debug)]
pub struct Follower {
    /// The replica as applied; may be ahead of the engine's committed position.
    state: State,
    /// Position of `state` (its last complete transaction) and that envelope's stream seq.
    applied: Position,
    /// Sequence and stream sequence of the last envelope accepted, buffered parts included:
    /// the stream is re-read from the one after it, and an envelope at or below `accepted_seq`
    /// found after `accepted_stream_seq` is a fork.
    accepted_seq: u64,
    accepted_stream_seq: u64,
    /// Stream sequence of the last message read, of any kind.
    read_stream_seq: u64,
    /// The stream's last sequence as last seen.
    known_last_seq: u64,
    /// Whether the stream held nothing after the last message read (as delivered), or a probe
    /// found nothing after the position.
    caught_up: bool,
    /// The stream's last sequence when a probe found nothing after the position: while it
    /// stays the same, the reader's silence is not a stall (the stream's tail was deleted).
    quiet_at_last_seq: Option<u64>,
    /// Changes of the buffered parts of the transaction in progress (when kept).
    parts: Vec<Change>,
    /// Whether `parts` holds every buffered part (false when nobody needed them).
    parts_kept: bool,
    /// The envelope sequence a gap was re-read for (a second gap there means it is gone).
    reread_at: Option<u64>,
    /// Set when the reader skipped stream sequences: why (pruned, or deleted = gap).
    lost: Option<Reason>,
    /// The stream position at which the last re-snapshot was decided: re-applying envelopes
    /// before it (from an older snapshot) is no progress, so a resync that leads back to the
    /// same break counts as another attempt instead of looping forever.
    resync_at: u64,
    /// The hole a re-snapshot for a gap or a pruned stream was decided for.
    hole: Option<Hole>,
}

/// Envelopes the stream no longer holds, found while following: none after the last one the
/// replica accepted was delivered until a later one. Confirmed once the message at the
/// accepted envelope's stream position is still that envelope: the stream was not recreated
/// behind the replica, so what it lacks would lie after that position, and it is gone.
#[derive(Clone, Copy, Debug)]
struct Hole {
    /// Sequence and stream sequence of the last envelope accepted before the hole.
    after_seq: u64,
    after_stream_seq: u64,
    confirmed: bool,
}

impl Default for Follower {
    fn default() -> Self {
        Follower::new()
    }
}

impl Follower {
    /// A follower with no replica yet.
    pub fn new() -> Follower {
        Follower {
            state: State::new(Lineage::default()),
            applied: Position::default(),
            accepted_seq: 0,
            accepted_stream_seq: 0,
            read_stream_seq: 0,
            known_last_seq: 0,
            caught_up: false,
            quiet_at_last_seq: None,
            parts: Vec::new(),
            parts_kept: true,
            reread_at: None,
            lost: None,
            resync_at: 0,
            hole: None,
        }
    }

    /// The replica as applied.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The position of [`Follower::state`].
    pub fn applied(&self) -> Position {
        self.applied
    }

    /// Stream sequence of the last envelope accepted (buffered parts included).
    pub fn accepted_stream_seq(&self) -> u64 {
        self.accepted_stream_seq
    }

    /// Where the reader resumes after an error: the message after the last accepted one.
    pub fn resume_from(&self) -> u64 {
        self.accepted_stream_seq + 1
    }

    /// The furthest stream position read or accepted, or the stream's last sequence once a
    /// probe found nothing after that (a deleted tail: the replica is caught up, no lag).
    pub fn position(&self) -> u64 {
        self.quiet_at_last_seq
            .map_or(self.read(), |l| self.read().max(l))
    }

    /// The furthest stream position read or accepted.
    fn read(&self) -> u64 {
        self.read_stream_seq.max(self.accepted_stream_seq)
    }

    /// The stream's last sequence as last seen.
    pub fn known_last_seq(&self) -> u64 {
        self.known_last_seq
    }

    /// Records the stream's last sequence read by the engine.
    pub fn saw_last_seq(&mut self, last_seq: u64) {
        self.known_last_seq = self.known_last_seq.max(last_seq);
    }

    /// Whether the last message read had nothing after it.
    pub fn caught_up(&self) -> bool {
        self.caught_up
    }

    /// Caught up with a continuous history (no loss or re-read pending), past the position
    /// where the last re-snapshot was decided.
    pub fn settled(&self) -> bool {
        self.caught_up && self.lost.is_none() && self.reread_at.is_none() && self.progressed()
    }

    /// Whether the replica accepted an envelope after the position where the last re-snapshot
    /// was decided (the engine then starts counting re-snapshot attempts afresh).
    pub fn progressed(&self) -> bool {
        self.accepted_stream_seq > self.resync_at
    }

    /// The hole after the last envelope accepted, to be confirmed (none before the first).
    fn hole_after(&self) -> Option<Hole> {
        (self.accepted_stream_seq > 0).then_some(Hole {
            after_seq: self.accepted_seq,
            after_stream_seq: self.accepted_stream_seq,
            confirmed: false,
        })
    }

    /// The stream position whose message confirms the hole of the re-snapshot just decided
    /// (see [`Follower::confirm_hole`]); None when there is nothing to confirm.
    pub fn hole_to_confirm(&self) -> Option<u64> {
        self.hole
            .filter(|h| !h.confirmed)
            .map(|h| h.after_stream_seq)
    }

    /// `found` is the message at [`Follower::hole_to_confirm`]'s position (None: deleted, or
    /// it could not be read). The hole is confirmed when it is still the envelope the replica
    /// accepted there; otherwise the stream may have been recreated with the envelope at an
    /// earlier position, and an older snapshot may lead to it: the hole is forgotten.
    pub fn confirm_hole(&mut self, found: Option<&Classified>) {
        let lineage = self.applied.lineage;
        let Some(h) = self.hole.as_mut() else { return };
        match found {
            Some(Classified::Envelope(e)) if e.lineage == lineage && e.seq == h.after_seq => {
                h.confirmed = true;
            }
            _ => self.hole = None,
        }
    }

    fn resync_step(
        &mut self,
        stream_seq: u64,
        reason: Reason,
        want: Option<Lineage>,
        why: &'static str,
    ) -> Step {
        self.resync_at = self.resync_at.max(stream_seq);
        self.hole = None;
        Step::Resync { reason, want, why }
    }

    /// Replaces the replica with `state` at `cursor` (a local replica, a snapshot, the start
    /// of a lineage), dropping buffered parts and pending judgements.
    pub fn restore(&mut self, state: State, cursor: Position) {
        self.state = state;
        self.applied = cursor;
        self.accepted_seq = cursor.seq;
        self.accepted_stream_seq = cursor.stream_seq;
        self.read_stream_seq = cursor.stream_seq;
        self.quiet_at_last_seq = None;
        self.parts.clear();
        self.parts_kept = true;
        self.lost = None;
        self.reread_at = None;
        self.hole = None;
    }

    /// No history yet: wait at the empty state of no lineage, after `stream_seq`.
    pub fn wait_after(&mut self, stream_seq: u64) {
        self.restore(
            State::new(Lineage::default()),
            Position {
                stream_seq,
                ..Position::default()
            },
        );
        self.read_stream_seq = stream_seq;
    }

    // ------------------------------------------------------------------ following

    /// The reader found stream sequences `wanted..first` gone. `first_seq_now` is the stream's
    /// first sequence read just after (None when it could not be read): messages below it were
    /// pruned by retention, others deleted (a gap).
    pub fn on_lost(&mut self, wanted: u64, first: u64, first_seq_now: Option<u64>) -> Step {
        let reason = match first_seq_now {
            Some(f) if f <= wanted => Reason::Gap,
            _ => Reason::Pruned,
        };
        self.lost = Some(reason);
        Step::Reread {
            from: first,
            why: if reason == Reason::Pruned {
                "pruned"
            } else {
                "deleted"
            },
        }
    }

    /// One message read at `stream_seq` with `pending` messages after it. `keep`: whether the
    /// applied transaction's changes are wanted (a durable store or subscribers).
    pub fn on_message(
        &mut self,
        stream_seq: u64,
        pending: u64,
        item: Classified,
        keep: bool,
    ) -> Step {
        self.read_stream_seq = stream_seq;
        self.known_last_seq = self.known_last_seq.max(stream_seq + pending);
        self.caught_up = pending == 0;
        self.quiet_at_last_seq = None;
        match item {
            Classified::Foreign { reason } => Step::Foreign { reason },
            Classified::Envelope(env)
                if env.parts == 0
                    || env.parts > MAX_TXN_PARTS
                    || env.part == 0
                    || env.part > env.parts =>
            {
                Step::Foreign {
                    reason: format!(
                        "envelope {} is part {} of {} (parts count from 1, at most {MAX_TXN_PARTS})",
                        env.seq, env.part, env.parts
                    ),
                }
            }
            Classified::Envelope(env) => self.on_envelope(env, stream_seq, keep),
        }
    }

    /// Whether `env` (of the replica's lineage) is a fork of the replica's history.
    fn is_fork(&self, env: &Envelope, stream_seq: u64) -> Option<&'static str> {
        if env.lineage != self.state.lineage() || env.seq > self.accepted_seq {
            return None;
        }
        if stream_seq > self.accepted_stream_seq {
            return Some(
                "an envelope reuses a sequence the replica already has, at a later stream position (a forked history)",
            );
        }
        if env.seq == self.applied.seq && env.seq > 0 && env.digest != self.applied.digest {
            return Some(
                "an envelope at the replica's sequence records another digest (a forked history)",
            );
        }
        None
    }

    fn on_envelope(&mut self, env: Envelope, stream_seq: u64, keep: bool) -> Step {
        if let Some(why) = self.is_fork(&env, stream_seq) {
            return self.resync_step(stream_seq, Reason::Fork, Some(env.lineage), why);
        }
        if env.lineage != self.state.lineage() && stream_seq <= self.accepted_stream_seq {
            // Another lineage at a position the replica's history has moved past: a
            // re-delivery (of the lineage it left, say its start marker), not a lineage change.
            return Step::Skipped {
                why: "stale",
                seq: env.seq,
            };
        }
        match self.state.apply(&env) {
            Ok(Applied::Buffered { .. }) => {
                if env.part == 1 {
                    self.parts.clear();
                    self.parts_kept = keep;
                }
                if self.parts_kept {
                    self.parts.extend(env.changes);
                }
                self.accepted_seq = env.seq;
                self.accepted_stream_seq = stream_seq;
                self.reread_at = None;
                self.lost = None;
                Step::Buffered
            }
            Ok(Applied::Committed { seq, changes }) => {
                let prev_seq = self.applied.seq;
                let produced_at_ms = env.produced_at_ms;
                let keep = keep && (env.part == 1 || self.parts_kept);
                let batch = keep.then(|| {
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
                    ChangeBatch {
                        lineage: env.lineage,
                        prev_seq,
                        seq,
                        kind: BatchKind::Applied,
                        changes: all,
                    }
                });
                self.parts.clear();
                self.parts_kept = true;
                self.applied = Position {
                    lineage: env.lineage,
                    seq,
                    stream_seq,
                    digest: env.digest,
                };
                self.accepted_seq = seq;
                self.accepted_stream_seq = stream_seq;
                self.reread_at = None;
                self.lost = None;
                Step::Applied(Txn {
                    cursor: self.applied,
                    prev_seq,
                    changes,
                    batch,
                    produced_at_ms,
                })
            }
            Err(ApplyError::Duplicate { seq }) => Step::Skipped {
                why: "duplicate",
                seq,
            },
            Err(ApplyError::Stale { seq, .. }) => Step::Skipped { why: "stale", seq },
            Err(ApplyError::LineageMismatch { .. }) => Step::LineageChange { env, stream_seq },
            Err(ApplyError::DigestMismatch { .. }) => self.resync_step(
                stream_seq,
                Reason::DigestMismatch,
                Some(env.lineage),
                "the digest after a transaction differs from the producer's",
            ),
            Err(e @ (ApplyError::Gap { .. } | ApplyError::PartOutOfOrder { .. })) => {
                let expected = match e {
                    ApplyError::Gap { expected, .. } => expected,
                    _ => env.seq,
                };
                if let Some(reason) = self.lost.take() {
                    let step = self.resync_step(
                        stream_seq,
                        reason,
                        Some(env.lineage),
                        "an envelope the replica needs is no longer in the stream",
                    );
                    self.hole = self.hole_after();
                    return step;
                }
                if self.reread_at == Some(expected) {
                    let step = self.resync_step(
                        stream_seq,
                        Reason::Gap,
                        Some(env.lineage),
                        "an envelope is missing from the stream (re-reading did not find it)",
                    );
                    self.hole = self.hole_after();
                    return step;
                }
                self.reread_at = Some(expected);
                Step::Reread {
                    from: self.accepted_stream_seq + 1,
                    why: "gap in the envelope sequence",
                }
            }
        }
    }

    /// What to do with an envelope of another lineage found at `stream_seq`, given the
    /// lineage of the bucket's latest snapshot (`pointer`) and whether the replica held a
    /// verified state.
    pub fn lineage_plan(
        &mut self,
        env: &Envelope,
        stream_seq: u64,
        pointer: Option<Lineage>,
        bootstrapped: bool,
    ) -> LineagePlan {
        let reason = if bootstrapped {
            Reason::LineageChanged
        } else {
            Reason::Bootstrap
        };
        let whole_start = env.seq == 1 && env.part == 1 && env.parts == 1;
        if bootstrapped && whole_start {
            if let Some(txn) = self.adopt(env, stream_seq, reason) {
                return LineagePlan::Adopted { reason, txn };
            }
        }
        // A single-part start must verify on the empty state: one that does not starts from a
        // state the replica lacks (its snapshot follows its marker), so the replica keeps what
        // it has and waits for that snapshot rather than emptying itself first.
        let from_empty = !whole_start || State::new(env.lineage).apply(env).is_ok();
        if pointer != Some(env.lineage) && env.seq == 1 && env.part == 1 && from_empty {
            LineagePlan::StartFromFirst { reason }
        } else {
            self.resync_at = self.resync_at.max(stream_seq);
            LineagePlan::Resync {
                reason,
                want: Some(env.lineage),
            }
        }
    }

    /// Adopts `env`, envelope 1 of another lineage, when its changes applied to the replica's
    /// state give exactly its digest: the digest covers the whole state, so the new lineage
    /// starts from the replica's state and nothing needs fetching.
    fn adopt(&mut self, env: &Envelope, stream_seq: u64, reason: Reason) -> Option<Txn> {
        let mut next = self.state.clone();
        next.set_position(env.lineage, 0); // drops buffered parts of the old lineage
        let Ok(Applied::Committed { seq, changes }) = next.apply(env) else {
            return None;
        };
        let prev_seq = self.applied.seq;
        self.state = next;
        self.applied = Position {
            lineage: env.lineage,
            seq,
            stream_seq,
            digest: env.digest,
        };
        self.accepted_seq = seq;
        self.accepted_stream_seq = stream_seq;
        self.read_stream_seq = self.read_stream_seq.max(stream_seq);
        self.parts.clear();
        self.parts_kept = true;
        self.reread_at = None;
        self.lost = None;
        Some(Txn {
            cursor: self.applied,
            prev_seq,
            changes,
            batch: Some(ChangeBatch {
                lineage: env.lineage,
                prev_seq,
                seq,
                kind: BatchKind::Resync { reason },
                changes: env.changes.clone(),
            }),
            produced_at_ms: env.produced_at_ms,
        })
    }

    // ------------------------------------------------------------------ bounds

    /// A look at the stream's bounds, the reader silent for `silent`.
    pub fn on_bounds(&mut self, b: Bounds, silent: Duration, once: bool) -> Tick {
        self.known_last_seq = b.last_seq;
        if b.last_seq < self.accepted_stream_seq {
            // Positions start again in a recreated stream.
            self.resync_at = b.last_seq;
            return Tick::Resync {
                reason: Reason::Fork,
                why: "the stream ends before the replica's position: it was purged or recreated",
            };
        }
        let read_all = b.last_seq <= self.position() || b.messages == 0;
        if once && (read_all || (self.caught_up && silent >= ONCE_IDLE)) {
            Tick::Done
        } else if !read_all && silent >= READER_STALL {
            Tick::Probe {
                from: self.read() + 1,
            }
        } else {
            Tick::Continue
        }
    }

    /// The probe asked for by [`Tick::Probe`]: `found` is the stream sequence of the first
    /// message at or after `from` (None: there is none), `last_seq` the stream's last sequence
    /// read before the probe.
    pub fn on_probe(&mut self, from: u64, last_seq: u64, found: Option<u64>, once: bool) -> Tick {
        match found {
            Some(_) if from == self.read() + 1 => Tick::ReaderStalled { from },
            Some(_) => Tick::Continue, // the reader moved meanwhile
            None => {
                self.quiet_at_last_seq = Some(last_seq);
                self.caught_up = true;
                if once {
                    Tick::Done
                } else {
                    Tick::Continue
                }
            }
        }
    }

    // ------------------------------------------------------------------ start-up

    /// Judges a local cursor against the bucket's latest snapshot lineage and the stream.
    pub fn judge(c: &Position, pointer: Option<Lineage>, b: Bounds) -> Judge {
        if let Some(p) = pointer {
            if p != c.lineage {
                return Judge::Decided(
                    Continuity::LineageChanged,
                    "the pipeline's history is another lineage than the local replica's",
                );
            }
        }
        if c.stream_seq > b.last_seq {
            return Judge::Decided(
                Continuity::Fork,
                "the stream ends before the local cursor: it was purged or recreated",
            );
        }
        if c.seq > 0 && c.stream_seq >= b.first_seq {
            // The cursor's own envelope is still there: it must be that envelope (a stream
            // recreated and grown past the cursor holds something else there).
            return Judge::NeedCursorMessage { at: c.stream_seq };
        }
        if c.stream_seq + 1 >= b.first_seq {
            return Judge::Decided(
                Continuity::Continues,
                "the local cursor continues the retained history",
            );
        }
        Judge::NeedFirstEnvelope { from: b.first_seq }
    }

    /// [`Follower::judge`] continued: `found` is the message at the cursor's stream position
    /// (None: deleted since).
    pub fn judge_cursor_message(
        c: &Position,
        found: Option<&Classified>,
    ) -> (Continuity, &'static str) {
        let same = match found {
            // Deleted: nothing to compare; what follows is judged as it is read.
            None => true,
            Some(Classified::Foreign { .. }) => false,
            // A snapshot may be cut after the parts of an abandoned transaction: its position
            // is then a non-final part, whose digest is that of the transaction never applied.
            Some(Classified::Envelope(e)) => {
                e.lineage == c.lineage
                    && e.seq == c.seq
                    && (e.digest == c.digest || !e.is_last_part())
            }
        };
        if same {
            (
                Continuity::Continues,
                "the local cursor continues the retained history",
            )
        } else {
            (
                Continuity::Fork,
                "the stream holds another message at the local cursor's position: it was recreated",
            )
        }
    }

    /// [`Follower::judge`] continued: messages after the cursor are gone, `first` is the first
    /// envelope retained (its stream sequence and itself).
    pub fn judge_first(
        c: &Position,
        b: Bounds,
        first: Option<(u64, &Envelope)>,
    ) -> (Continuity, &'static str) {
        match first {
            Some((_, e)) if e.lineage != c.lineage => (
                Continuity::LineageChanged,
                "the stream continues another lineage than the local replica's",
            ),
            // Everything retained lies after the cursor's stream position: an envelope the
            // replica has already, there, is a reused sequence.
            Some((_, e)) if e.seq <= c.seq => (
                Continuity::Fork,
                "the stream holds, after the local cursor, an envelope the replica already has (a forked history)",
            ),
            Some((_, e)) if e.seq == c.seq + 1 => (
                Continuity::Continues,
                "the pruned messages held no envelope the replica lacks",
            ),
            Some(_) => (
                Continuity::Pruned,
                "the envelopes after the local cursor are no longer in the stream",
            ),
            None if b.last_seq > c.stream_seq => (
                Continuity::Pruned,
                "the envelopes after the local cursor are no longer in the stream",
            ),
            None => (Continuity::Continues, "nothing after the local cursor"),
        }
    }

    /// Whether a snapshot at `m` may be loaded by a re-snapshot that wants lineage `want`;
    /// `Err` says why not (the engine retries with backoff: a newer snapshot
    /// may land meanwhile).
    ///
    /// **Lineage.** One of lineage `want` is taken, or one whose position covers the message
    /// that decided the re-snapshot (the history moved on to its lineage there: a new
    /// lineage's snapshot is cut at the stream's last sequence), or one of the replica's own
    /// lineage ahead of it. Any other older snapshot of another lineage would lead straight
    /// back to the same break. One of the replica's lineage ahead of its position need not: a
    /// lineage-start marker fails to verify on the replica's state also when the replica
    /// missed the old lineage's last envelopes (deleted or pruned before it read them; the
    /// marker hides the gap, no envelope of the old lineage follows to reveal it). That
    /// snapshot fills the hole and the marker is then adopted in place, which matters when the
    /// marker's own snapshot never lands (the producer stopped between publishing the marker
    /// and writing it): refusing would stop the consumer on a history it can follow. It never
    /// sends the replica back, and cannot loop: once loaded, the replica is at its position,
    /// and the same snapshot is not ahead any more.
    ///
    /// **Not ahead.** After a gap or a pruned stream found while following and confirmed
    /// ([`Follower::confirm_hole`]), the replica's state is verified and the envelope after it
    /// is gone from the stream for good: a snapshot of that lineage not past the hole holds
    /// nothing the replica lacks, and loading it would move the replica (and everything that
    /// reads it) back in time only to meet the same hole again. It is refused until a snapshot
    /// past the hole lands, but only while attempts remain: the `last_attempt` takes it, since
    /// the replica may hold envelopes of a branch the producer abandoned (a fork not yet
    /// revealed), and then that older snapshot is the history to follow. An unconfirmed hole
    /// refuses nothing: the stream may have been
    /// recreated with the envelope at an earlier position, which an older snapshot reaches.
    /// (At start-up a stream that holds no envelope after the cursor is judged pruned although
    /// its tail may only have been deleted: an older snapshot is taken then too, and followed
    /// back to where the replica was. After a digest mismatch or a fork the replica's own state
    /// is in doubt, and an older snapshot is what it needs.)
    pub fn snapshot_acceptable(
        &self,
        m: &Position,
        want: Option<Lineage>,
        last_attempt: bool,
    ) -> Result<(), Refusal> {
        let lineage_ok = want.is_none_or(|w| w == m.lineage)
            || m.stream_seq >= self.resync_at
            || (m.lineage == self.applied.lineage && m.seq > self.applied.seq);
        if !lineage_ok {
            return Err(Refusal::OtherLineage);
        }
        match self.hole {
            Some(h)
                if h.confirmed
                    && !last_attempt
                    && m.lineage == self.applied.lineage
                    && m.seq <= h.after_seq =>
            {
                Err(Refusal::NotAhead {
                    snapshot_seq: m.seq,
                    replica_seq: self.applied.seq,
                })
            }
            _ => Ok(()),
        }
    }

    /// The cursor a snapshot at `m` gives. A snapshot whose stream position is beyond the
    /// stream's last sequence was taken from a stream since recreated: its envelopes are
    /// followed from the new stream's first message (and a reused sequence there is a fork).
    pub fn snapshot_cursor(m: Position, b: Bounds) -> Position {
        if m.stream_seq > b.last_seq {
            Position {
                stream_seq: b.first_seq.saturating_sub(1).min(b.last_seq),
                ..m
            }
        } else {
            m
        }
    }

    /// What to do without a snapshot: `first` is the first envelope retained, `want` the
    /// lineage required, `bootstrapped` whether the replica held a verified state.
    pub fn without_snapshot(
        b: Bounds,
        first: Option<(u64, &Envelope)>,
        want: Option<Lineage>,
        bootstrapped: bool,
    ) -> NoSnapshotPlan {
        match first {
            Some((stream_seq, e))
                if e.seq == 1 && e.part == 1 && want.is_none_or(|w| w == e.lineage) =>
            {
                NoSnapshotPlan::StartLineage {
                    lineage: e.lineage,
                    stream_seq: stream_seq - 1,
                }
            }
            Some((_, e)) => NoSnapshotPlan::NoSnapshot {
                lineage: e.lineage,
                seq: e.seq,
            },
            None if !bootstrapped => NoSnapshotPlan::Wait {
                stream_seq: b.last_seq,
            },
            None => NoSnapshotPlan::NoHistory,
        }
    }
}

/// The cursor of the empty state of `lineage`, its envelope 1 following `stream_seq`.
pub fn lineage_start(lineage: Lineage, stream_seq: u64) -> Position {
    Position {
        lineage,
        seq: 0,
        stream_seq,
        digest: Digest::ZERO,
    }
}

#[cfg(test)]
mod model_tests;

#[cfg(test)]
mod tests {
    use super::*;

    const L: Lineage = Lineage([7; 16]);

    #[test]
    fn a_continuing_cursor_resumes_and_every_other_continuity_resyncs_for_itself() {
        assert_eq!(Continuity::Continues.reason(), Reason::Resume);
        assert_eq!(Continuity::Pruned.reason(), Reason::Pruned);
        assert_eq!(Continuity::LineageChanged.reason(), Reason::LineageChanged);
        assert_eq!(Continuity::Fork.reason(), Reason::Fork);
    }

    /// Envelope `seq` (one part) of lineage `L` that puts `key`, on `state`.
    fn env(state: &mut State, seq: u64, key: &str) -> Envelope {
        let changes = vec![Change::put(key, &b"v"[..])];
        let digest = state.apply_changes(&changes);
        state.set_position(L, seq);
        Envelope {
            lineage: L,
            seq,
            part: 1,
            parts: 1,
            digest,
            produced_at_ms: 0,
            changes,
        }
    }

    fn following() -> (Follower, Envelope, Envelope) {
        let mut producer = State::new(L);
        let e1 = env(&mut producer, 1, "a");
        let e2 = env(&mut producer, 2, "b");
        let mut f = Follower::new();
        f.restore(State::new(L), lineage_start(L, 0));
        for (pos, e) in [(1, &e1), (2, &e2)] {
            let step = f.on_message(pos, 0, Classified::Envelope(e.clone()), false);
            assert!(matches!(step, Step::Applied(_)), "{step:?}");
        }
        (f, e1, e2)
    }

    #[test]
    fn a_sequence_reused_at_a_later_stream_position_is_a_fork_not_a_duplicate() {
        let (mut f, _, e2) = following();
        // The same envelope again where it was: a re-delivery.
        let step = f.on_message(2, 0, Classified::Envelope(e2.clone()), false);
        assert!(
            matches!(
                step,
                Step::Skipped {
                    why: "duplicate",
                    ..
                }
            ),
            "{step:?}"
        );
        // Any envelope 2 (even the same one) stored again later: a producer reused it.
        let step = f.on_message(3, 0, Classified::Envelope(e2), false);
        assert!(
            matches!(
                step,
                Step::Resync {
                    reason: Reason::Fork,
                    ..
                }
            ),
            "{step:?}"
        );
    }

    #[test]
    fn another_digest_at_the_replicas_sequence_is_a_fork() {
        let (mut f, e1, _) = following();
        let mut other = State::new(L);
        let _ = env(&mut other, 1, "a");
        let forked = env(&mut other, 2, "x");
        let step = f.on_message(2, 0, Classified::Envelope(forked), false);
        assert!(
            matches!(
                step,
                Step::Resync {
                    reason: Reason::Fork,
                    ..
                }
            ),
            "{step:?}"
        );
        // An older envelope re-delivered where it was stays a stale skip.
        let step = f.on_message(1, 1, Classified::Envelope(e1), false);
        assert!(
            matches!(step, Step::Skipped { why: "stale", .. }),
            "{step:?}"
        );
    }

    #[test]
    fn a_stream_that_ends_before_the_position_is_a_fork() {
        let (mut f, _, _) = following();
        let b = Bounds {
            first_seq: 1,
            last_seq: 1,
            messages: 1,
        };
        let tick = f.on_bounds(b, Duration::ZERO, false);
        assert!(
            matches!(
                tick,
                Tick::Resync {
                    reason: Reason::Fork,
                    ..
                }
            ),
            "{tick:?}"
        );
        let c = f.applied();
        assert_eq!(
            Follower::judge(&c, Some(L), b),
            Judge::Decided(
                Continuity::Fork,
                "the stream ends before the local cursor: it was purged or recreated"
            )
        );
    }

    #[test]
    fn a_deleted_tail_is_probed_once_then_caught_up() {
        let (mut f, _, _) = following();
        // Stream position 3 held a message that was deleted: last_seq 3, nothing after 2.
        let b = Bounds {
            first_seq: 1,
            last_seq: 3,
            messages: 2,
        };
        assert_eq!(
            f.on_bounds(b, Duration::from_secs(1), false),
            Tick::Continue
        );
        assert_eq!(f.on_bounds(b, READER_STALL, false), Tick::Probe { from: 3 });
        assert_eq!(f.on_probe(3, 3, None, false), Tick::Continue);
        assert_eq!(f.position(), 3, "caught up: no lag");
        assert_eq!(f.on_bounds(b, READER_STALL * 10, false), Tick::Continue);
        // The stream grows and the reader stays silent: probed again, found, reopened.
        let b = Bounds {
            last_seq: 4,
            messages: 3,
            ..b
        };
        assert_eq!(f.on_bounds(b, READER_STALL, false), Tick::Probe { from: 3 });
        assert_eq!(
            f.on_probe(3, 4, Some(4), false),
            Tick::ReaderStalled { from: 3 }
        );
    }

    #[test]
    fn a_cursor_position_holding_another_message_is_a_fork_at_start_up() {
        let (f, _, e2) = following();
        let c = f.applied();
        let b = Bounds {
            first_seq: 1,
            last_seq: 9,
            messages: 9,
        };
        assert_eq!(
            Follower::judge(&c, Some(L), b),
            Judge::NeedCursorMessage { at: 2 }
        );
        let same = Classified::Envelope(e2);
        assert_eq!(
            Follower::judge_cursor_message(&c, Some(&same)).0,
            Continuity::Continues
        );
        let foreign = Classified::Foreign {
            reason: "garbage".into(),
        };
        assert_eq!(
            Follower::judge_cursor_message(&c, Some(&foreign)).0,
            Continuity::Fork
        );
        assert_eq!(
            Follower::judge_cursor_message(&c, None).0,
            Continuity::Continues
        );
    }

    /// A lineage-start marker of lineage `l` (envelope 1, no changes) recording `digest`.
    #[test]
    fn a_snapshot_not_past_a_confirmed_hole_is_refused_until_the_last_attempt() {
        // The replica applied envelopes 1 and 2 (stream positions 1, 2); envelope 3 was
        // deleted from the stream, and envelope 4 arrives at position 4, twice.
        let (mut f, _, _) = following();
        let mut producer = f.state().clone();
        let _e3 = env(&mut producer, 3, "c");
        let e4 = env(&mut producer, 4, "d");
        let step = f.on_message(4, 0, Classified::Envelope(e4.clone()), false);
        assert!(matches!(step, Step::Reread { from: 3, .. }), "{step:?}");
        let step = f.on_message(4, 0, Classified::Envelope(e4.clone()), false);
        assert!(
            matches!(
                step,
                Step::Resync {
                    reason: Reason::Gap,
                    ..
                }
            ),
            "{step:?}"
        );
        let snap = |seq: u64| Position {
            lineage: L,
            seq,
            stream_seq: seq,
            digest: Digest::ZERO,
        };
        // Unconfirmed, the hole refuses nothing: the stream may have been recreated.
        assert_eq!(f.hole_to_confirm(), Some(2));
        assert_eq!(f.snapshot_acceptable(&snap(1), None, false), Ok(()));

        // The message at position 2 is still envelope 2: the stream lost envelope 3.
        let (_, _, e2) = following();
        f.confirm_hole(Some(&Classified::Envelope(e2)));
        assert_eq!(f.hole_to_confirm(), None);
        for seq in [0, 1, 2] {
            assert_eq!(
                f.snapshot_acceptable(&snap(seq), None, false),
                Err(Refusal::NotAhead {
                    snapshot_seq: seq,
                    replica_seq: 2
                }),
                "a snapshot at {seq} holds nothing the replica lacks"
            );
            assert_eq!(f.snapshot_acceptable(&snap(seq), None, true), Ok(()));
        }
        assert_eq!(f.snapshot_acceptable(&snap(3), None, false), Ok(()));
        // Another lineage's snapshot is judged by lineage only.
        let other = Position {
            lineage: Lineage([9; 16]),
            ..snap(1)
        };
        assert_eq!(f.snapshot_acceptable(&other, None, false), Ok(()));
        // Loaded, the snapshot clears the hole.
        f.restore(producer, snap(4));
        assert_eq!(f.snapshot_acceptable(&snap(1), None, false), Ok(()));

        // Another message at the position (a recreated stream), or none: no hole is kept.
        for found in [None, Some(Classified::Foreign { reason: "x".into() })] {
            let (mut f, _, _) = following();
            let _ = f.on_message(4, 0, Classified::Envelope(e4.clone()), false);
            let _ = f.on_message(4, 0, Classified::Envelope(e4.clone()), false);
            f.confirm_hole(found.as_ref());
            assert_eq!(f.snapshot_acceptable(&snap(1), None, false), Ok(()));
        }
    }

    fn marker(l: Lineage, digest: Digest) -> Envelope {
        Envelope {
            lineage: l,
            seq: 1,
            part: 1,
            parts: 1,
            digest,
            produced_at_ms: 0,
            changes: Vec::new(),
        }
    }

    #[test]
    fn a_lineage_start_marker_of_the_replicas_own_state_is_adopted_without_a_snapshot() {
        const NEW: Lineage = Lineage([9; 16]);
        let (mut f, _, e2) = following();
        let digest = f.state().digest();
        let m = marker(NEW, digest);
        let step = f.on_message(3, 0, Classified::Envelope(m.clone()), false);
        assert!(matches!(step, Step::LineageChange { .. }), "{step:?}");
        // The bucket's pointer still names the old lineage (its snapshot comes after).
        match f.lineage_plan(&m, 3, Some(L), true) {
            LineagePlan::Adopted { reason, txn } => {
                assert_eq!(reason, Reason::LineageChanged);
                assert_eq!(txn.prev_seq, 2);
                let b = txn.batch.expect("a batch");
                assert_eq!(b.kind, BatchKind::Resync { reason });
                assert!(b.changes.is_empty());
            }
            p => panic!("{p:?}"),
        }
        assert_eq!(
            f.applied(),
            Position {
                lineage: NEW,
                seq: 1,
                stream_seq: 3,
                digest
            }
        );
        assert_eq!(f.state().lineage(), NEW);
        assert_eq!(f.state().len(), 2);
        assert_eq!(f.resume_from(), 4);
        // Re-deliveries of the old lineage and of the marker are skipped, not followed back.
        let step = f.on_message(2, 1, Classified::Envelope(e2), false);
        assert!(
            matches!(step, Step::Skipped { why: "stale", .. }),
            "{step:?}"
        );
        let step = f.on_message(3, 0, Classified::Envelope(m), false);
        assert!(matches!(step, Step::Skipped { .. }), "{step:?}");
        assert_eq!(f.applied().lineage, NEW);
    }

    #[test]
    fn a_lineage_start_marker_of_another_state_re_snapshots_keeping_the_replica() {
        const NEW: Lineage = Lineage([9; 16]);
        let (mut f, _, _) = following();
        let mut other = State::new(NEW);
        let _ = other.apply_changes(&[Change::put("z", &b"z"[..])]);
        let m = marker(NEW, other.digest());
        let _ = f.on_message(3, 0, Classified::Envelope(m.clone()), false);
        match f.lineage_plan(&m, 3, Some(L), true) {
            LineagePlan::Resync { reason, want } => {
                assert_eq!((reason, want), (Reason::LineageChanged, Some(NEW)));
            }
            p => panic!("{p:?}"),
        }
        assert_eq!(f.applied().lineage, L, "nothing adopted");
        assert_eq!(
            f.state().len(),
            2,
            "the replica is kept for the re-snapshot"
        );
        // An older snapshot of the old lineage is refused: the new one is awaited.
        let old_snap = Position {
            lineage: L,
            seq: 2,
            stream_seq: 2,
            digest: Digest::ZERO,
        };
        assert_eq!(
            f.snapshot_acceptable(&old_snap, Some(NEW), false),
            Err(Refusal::OtherLineage)
        );
        let new_snap = Position {
            lineage: NEW,
            seq: 1,
            stream_seq: 3,
            ..old_snap
        };
        assert!(f.snapshot_acceptable(&new_snap, Some(NEW), false).is_ok());
        // A marker of the empty state (`NewLineage::Empty`) is followed from the empty state.
        let empty = marker(NEW, State::new(NEW).digest());
        assert!(matches!(
            f.lineage_plan(&empty, 3, Some(L), true),
            LineagePlan::StartFromFirst {
                reason: Reason::LineageChanged
            }
        ));
    }

    #[test]
    fn a_marker_after_old_envelopes_the_replica_missed_takes_an_old_snapshot_ahead_of_it() {
        const NEW: Lineage = Lineage([9; 16]);
        // The producer: envelopes 1 and 2, then a keep-state marker of the state after 2.
        let mut producer = State::new(L);
        let e1 = env(&mut producer, 1, "a");
        let _e2 = env(&mut producer, 2, "b");
        let m = marker(NEW, producer.digest());
        // The replica read envelope 1; envelope 2 (stream position 2) was deleted before it
        // read it, and the marker hides that gap: its state does not give the marker's digest.
        let mut f = Follower::new();
        f.restore(State::new(L), lineage_start(L, 0));
        let step = f.on_message(1, 1, Classified::Envelope(e1), false);
        assert!(matches!(step, Step::Applied(_)), "{step:?}");
        let step = f.on_message(3, 0, Classified::Envelope(m.clone()), false);
        assert!(matches!(step, Step::LineageChange { .. }), "{step:?}");
        match f.lineage_plan(&m, 3, Some(L), true) {
            LineagePlan::Resync { reason, want } => {
                assert_eq!((reason, want), (Reason::LineageChanged, Some(NEW)));
            }
            p => panic!("{p:?}"),
        }
        // The marker's own snapshot never landed: the bucket's latest is the old lineage's
        // snapshot after envelope 2. It is ahead of the replica, so it is loaded (refusing it
        // stopped the consumer); one at the replica's own position is still refused.
        let at_replica = Position {
            lineage: L,
            seq: 1,
            stream_seq: 1,
            digest: Digest::ZERO,
        };
        assert!(f
            .snapshot_acceptable(&at_replica, Some(NEW), false)
            .is_err());
        let ahead = Position {
            lineage: L,
            seq: 2,
            stream_seq: 2,
            digest: producer.digest(),
        };
        assert!(f.snapshot_acceptable(&ahead, Some(NEW), false).is_ok());
        f.restore(producer.clone(), ahead);
        let step = f.on_message(3, 0, Classified::Envelope(m.clone()), false);
        assert!(matches!(step, Step::LineageChange { .. }), "{step:?}");
        assert!(
            matches!(
                f.lineage_plan(&m, 3, Some(L), true),
                LineagePlan::Adopted { .. }
            ),
            "the marker is adopted on the snapshot's state"
        );
        assert_eq!((f.applied().lineage, f.applied().seq), (NEW, 1));
        // Loaded, the same snapshot is no longer ahead: a marker of a state the old
        // lineage never had breaks again, and it is refused (no loop back to it).
        let mut again = Follower::new();
        again.restore(producer, ahead);
        let mut lacking = State::new(NEW);
        let _ = lacking.apply_changes(&[Change::put("z", &b"z"[..])]);
        let m2 = marker(NEW, lacking.digest());
        let _ = again.on_message(3, 0, Classified::Envelope(m2.clone()), false);
        assert!(matches!(
            again.lineage_plan(&m2, 3, Some(L), true),
            LineagePlan::Resync { .. }
        ));
        assert!(again.snapshot_acceptable(&ahead, Some(NEW), false).is_err());
    }

    #[test]
    fn a_transaction_longer_than_max_txn_parts_is_foreign_and_never_buffered() {
        let (mut f, _, _) = following();
        let mut e = env(&mut State::new(L), 3, "z");
        e.parts = MAX_TXN_PARTS + 1;
        let step = f.on_message(3, 0, Classified::Envelope(e), false);
        assert!(matches!(step, Step::Foreign { .. }), "{step:?}");
        assert!(!f.state().has_pending_parts());
        assert_eq!(f.applied().seq, 2);
    }

    #[test]
    fn a_snapshot_from_a_recreated_stream_is_followed_from_the_new_streams_start() {
        let m = Position {
            lineage: L,
            seq: 9,
            stream_seq: 90,
            digest: Digest::ZERO,
        };
        let b = Bounds {
            first_seq: 1,
            last_seq: 5,
            messages: 5,
        };
        assert_eq!(Follower::snapshot_cursor(m, b).stream_seq, 0);
        let b = Bounds {
            first_seq: 80,
            last_seq: 100,
            messages: 21,
        };
        assert_eq!(Follower::snapshot_cursor(m, b), m);
    }
}
