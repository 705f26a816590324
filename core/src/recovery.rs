//! The pure verdict on a pipeline's history: deciding, from a snapshot's cut and the messages
//! read after it (each [`classify`]d by `codec`), whether a lineage can be continued — and if
//! not, a [`Refusal`] naming what is lost or broken. The snapshot's own message is checked
//! with the rule snapshot writers are fenced by (`snapshot::fence`). No I/O:
//! `deltasync-nats`'s `history` reads the stream and the bucket and hands what it read to
//! [`decide`].
//!
//! ## Invariants
//!
//! - Continuity is judged by envelope sequence alone; stream sequences only say where to read.
//! - A lineage continues only after proving that every envelope of it was seen: the snapshot's
//!   envelope is where the manifest says (or aged out at or below the stream's last sequence),
//!   every position after it is retained and was read to the stream's last sequence, and the
//!   envelopes continue without a gap. Anything else is a [`Refusal`].
//!
//! ```text
//!  bucket: latest ──▶ manifest (lineage L, seq n, stream_seq p, digest d)
//!  stream: … │ p: L:n (last part, digest d) │ p+1 … last_seq: envelopes L:n+1 …, foreign │
//!            └ may be aged out ┘  └──────── must all be retained and read ────────────┘
//! ```

use crate::envelope::{Envelope, Lineage};
use crate::retention::StreamBounds as Bounds;
use crate::snapshot::fence::CutMismatch;
use crate::state::{Applied, ApplyError, State};

// Recovery's vocabulary, defined beside what it describes: a classified stream message
// (`codec`) and a snapshot's cut (`snapshot`).
pub use crate::codec::{classify, Classified};
pub use crate::snapshot::Cut;

/// Where recovery starts.
#[derive(Debug)]
pub enum Start {
    /// A loaded, verified snapshot and its cut.
    Snapshot { cut: Cut, state: Box<State> },
    /// The stream's first message (no usable snapshot).
    Beginning,
}

impl Start {
    /// The first stream sequence [`decide`] needs to see: the cut's own message (to prove it
    /// is in the stream) or the stream's start; never below what the stream retains.
    pub fn read_from(&self, b: &Bounds) -> u64 {
        let from = match self {
            Start::Snapshot { cut, .. } => cut.stream_seq.max(1),
            Start::Beginning => 1,
        };
        from.max(retained_from(b))
    }
}

/// The lowest stream sequence the stream still holds (`last_seq + 1` when it holds none).
fn retained_from(b: &Bounds) -> u64 {
    if b.messages == 0 {
        b.last_seq + 1
    } else {
        b.first_seq.max(1)
    }
}

/// The lineage continues: the state after its last complete transaction and the positions
/// the producer publishes from.
#[derive(Debug)]
pub struct Continue {
    /// After the last complete transaction; positioned at `seq` (parts of an abandoned
    /// transaction count: the next envelope follows them).
    pub state: State,
    /// The last envelope of the lineage in the stream: the next one published is `seq + 1`.
    pub seq: u64,
    /// The last complete transaction (`seq` minus the abandoned parts).
    pub txn_seq: u64,
    /// Stream sequence of envelope `txn_seq` (a snapshot of `state` at `txn_seq` is cut there).
    pub txn_stream_seq: u64,
    /// Stream sequence of envelope `seq`.
    pub last_envelope_stream_seq: u64,
    /// The stream's last sequence, read to the end: the next publish expects it.
    pub expected_last_stream_seq: u64,
    /// Messages that were not envelopes.
    pub foreign_messages: u64,
    /// Parts of a transaction the producer never completed.
    pub abandoned_parts: u64,
    /// Envelopes applied after the start.
    pub envelopes_applied: u64,
}

/// Why a deleted or missing range is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostCause {
    /// Below the stream's first retained message: aged out, pruned by a limit, or purged.
    NotRetained,
    /// Inside the retained range but gone: deleted messages.
    Deleted,
}

/// Why the history cannot be continued. See [`Refusal::is_lost_history`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The snapshot's position is past the stream's end.
    PastEnd { cut: Cut, last_seq: u64 },
    /// The stream holds something else at the snapshot's position.
    NotInStream { cut: Cut, found: String },
    /// The snapshot was cut at a part of a transaction that is not its last.
    InsideTransaction { cut: Cut, part: u32, parts: u32 },
    /// Stream positions that may have held envelopes after `after_seq` are gone.
    Lost {
        /// The lineage whose envelopes are lost; `None` from the stream's start.
        lineage: Option<Lineage>,
        /// The last envelope known before the loss (0 when none).
        after_seq: u64,
        /// The stream sequences lost.
        stream_from: u64,
        stream_to: u64,
        /// The first envelope of `lineage` retained after them, when there is one.
        next_seq: Option<u64>,
        cause: LostCause,
    },
    /// No snapshot, and the stream's first envelope is not the start of its lineage.
    NoSnapshot {
        lineage: Lineage,
        seq: u64,
        stream_seq: u64,
    },
    /// A lineage starts from a state neither empty nor the one before it (its snapshot is
    /// gone).
    LineageStart { lineage: Lineage, stream_seq: u64 },
    /// An envelope repeats a sequence the lineage already has: two writers forked it.
    Forked {
        lineage: Lineage,
        seq: u64,
        stream_seq: u64,
        after: u64,
    },
    /// An envelope of another lineage that is not that lineage's start.
    Interleaved {
        lineage: Lineage,
        seq: u64,
        stream_seq: u64,
        current: Lineage,
    },
    /// An envelope does not apply (digest mismatch, parts out of order, a gap no deletion
    /// explains).
    Broken {
        stream_seq: u64,
        #[source]
        source: ApplyError,
    },
}

impl Refusal {
    /// Envelopes of the history are gone (or the stream was replaced): the lineage cannot
    /// continue, but a new lineage may start from the newest snapshot's state. Otherwise the
    /// history is damaged (forked, interleaved, not applying): an operator must look.
    pub fn is_lost_history(&self) -> bool {
        matches!(
            self,
            Refusal::PastEnd { .. }
                | Refusal::NotInStream { .. }
                | Refusal::Lost { .. }
                | Refusal::NoSnapshot { .. }
                | Refusal::LineageStart { .. }
        )
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::PastEnd { cut, last_seq } => write!(
                f,
                "the snapshot at {}:{} names stream sequence {}, past the stream's last \
                 sequence {last_seq}: the stream was purged or recreated behind the bucket, \
                 and whatever followed envelope {} is lost",
                cut.lineage, cut.seq, cut.stream_seq, cut.seq
            ),
            Refusal::NotInStream { cut, found } => write!(
                f,
                "the snapshot at {}:{} is not the stream's history: stream sequence {} holds \
                 {found} (the stream was replaced behind the bucket)",
                cut.lineage, cut.seq, cut.stream_seq
            ),
            Refusal::InsideTransaction { cut, part, parts } => write!(
                f,
                "the snapshot at {}:{} (stream sequence {}) was cut inside a transaction, at \
                 part {part} of {parts}",
                cut.lineage, cut.seq, cut.stream_seq
            ),
            Refusal::Lost {
                lineage,
                after_seq,
                stream_from,
                stream_to,
                next_seq,
                cause,
            } => {
                match lineage {
                    Some(l) => write!(
                        f,
                        "the history of lineage {l} after envelope {after_seq} is lost: "
                    )?,
                    None => write!(f, "the history from the stream's start is lost: ")?,
                }
                let range = if stream_from == stream_to {
                    format!("stream sequence {stream_from} is")
                } else {
                    format!("stream sequences {stream_from}..={stream_to} are")
                };
                match cause {
                    LostCause::NotRetained => {
                        write!(f, "{range} no longer retained (aged out, pruned or purged)")?
                    }
                    LostCause::Deleted => write!(f, "{range} deleted")?,
                }
                match next_seq {
                    Some(n) if *n > after_seq + 1 => write!(
                        f,
                        "; they held envelopes {}..={} (the next retained is {n})",
                        after_seq + 1,
                        n - 1
                    ),
                    Some(_) => Ok(()),
                    None => write!(
                        f,
                        "; envelopes from {} on may have been among them",
                        after_seq + 1
                    ),
                }
            }
            Refusal::NoSnapshot {
                lineage,
                seq,
                stream_seq,
            } => write!(
                f,
                "the bucket has no usable snapshot and the stream's first envelope is \
                 {lineage}:{seq} at stream sequence {stream_seq}: envelopes 1..={} of that \
                 lineage are lost",
                seq.saturating_sub(1)
            ),
            Refusal::LineageStart {
                lineage,
                stream_seq,
            } => write!(
                f,
                "lineage {lineage} starts at stream sequence {stream_seq} from a state no \
                 usable snapshot holds"
            ),
            Refusal::Forked {
                lineage,
                seq,
                stream_seq,
                after,
            } => write!(
                f,
                "the history is forked: envelope {lineage}:{seq} at stream sequence \
                 {stream_seq} repeats a sequence after envelope {after} of the same lineage"
            ),
            Refusal::Interleaved {
                lineage,
                seq,
                stream_seq,
                current,
            } => write!(
                f,
                "envelope {lineage}:{seq} at stream sequence {stream_seq} interrupts lineage \
                 {current} without starting a lineage"
            ),
            Refusal::Broken { stream_seq, source } => write!(
                f,
                "the history is broken at stream sequence {stream_seq}: {source}"
            ),
        }
    }
}

/// Decides where the pipeline's history continues — the pure core of recovery, with no I/O.
///
/// `items` are every message the stream held from `start.read_from(b)` to `b.last_seq`, in
/// stream order (the reader proves it read to the end; a position missing from `items` is a
/// deleted message). Returns `Ok(None)` when there is no history at all. [`Decision`] is the
/// same decision fed one message at a time (what recovery does, without holding the
/// messages).
///
/// The rules, each of which refuses rather than guesses:
/// - the snapshot's position is at most the stream's last sequence, and when the stream still
///   holds it, it is the snapshot's own envelope (lineage, sequence, last part, digest);
/// - the stream retains every position after the snapshot (`first_seq ≤ stream_seq + 1`);
///   without a snapshot, every position from 1;
/// - envelopes continue the lineage without a gap; a gap across deleted messages is lost
///   history, a repeated sequence is a fork, and deleted messages after the last envelope
///   may have been envelopes (lost history);
/// - another lineage may start only at its envelope 1, part 1, from the state before it or an
///   empty one (its digest decides); it may not interrupt a lineage otherwise;
/// - parts of a transaction that never completed are abandoned (the next envelope follows
///   them).
pub fn decide(
    start: Start,
    b: &Bounds,
    items: &[(u64, Classified)],
) -> Result<Option<Continue>, Refusal> {
    let mut d = Decision::new(start, b)?;
    for (stream_seq, item) in items {
        if !d.wants_more() {
            break;
        }
        d.push(*stream_seq, item)?;
    }
    d.finish()
}

/// [`decide`], one message at a time: create it, [`Decision::push`] every message from
/// [`Decision::read_from`] to the stream's last sequence while [`Decision::wants_more`], then
/// [`Decision::finish`].
#[derive(Debug)]
pub struct Decision {
    b: Bounds,
    /// The snapshot started from, whose own message is checked when it comes.
    cut: Option<Cut>,
    /// The first position that continues the history.
    next: u64,
    /// Nothing was ever published.
    empty: bool,
    /// Positions after the start are no longer retained: refused; messages only name the
    /// first retained envelope.
    lost: Option<Refusal>,
    /// The lineage followed and its state (after its last complete transaction).
    cur: Option<State>,
    last_env_seq: u64,
    last_env_stream: u64,
    txn_stream_seq: u64,
    seen: Vec<Lineage>,
    foreign_messages: u64,
    envelopes_applied: u64,
    /// Deleted positions since the last envelope.
    hole: Option<(u64, u64)>,
    expect_stream: u64,
}

impl Decision {
    /// Starts a decision; refuses at once a snapshot past the stream's end.
    pub fn new(start: Start, b: &Bounds) -> Result<Decision, Refusal> {
        let first = retained_from(b);
        let mut d = Decision {
            b: *b,
            cut: None,
            next: 1,
            empty: false,
            lost: None,
            cur: None,
            last_env_seq: 0,
            last_env_stream: 0,
            txn_stream_seq: 0,
            seen: Vec::new(),
            foreign_messages: 0,
            envelopes_applied: 0,
            hole: None,
            expect_stream: 1,
        };
        match start {
            Start::Snapshot { cut, state } => {
                if cut.stream_seq > b.last_seq {
                    return Err(Refusal::PastEnd {
                        cut,
                        last_seq: b.last_seq,
                    });
                }
                let next = cut.stream_seq + 1;
                if next <= b.last_seq && first > next {
                    d.lost = Some(Refusal::Lost {
                        lineage: Some(cut.lineage),
                        after_seq: cut.seq,
                        stream_from: next,
                        stream_to: (first - 1).min(b.last_seq),
                        next_seq: None,
                        cause: LostCause::NotRetained,
                    });
                }
                let mut state = *state;
                state.set_position(cut.lineage, cut.seq);
                d.seen.push(cut.lineage);
                d.cur = Some(state);
                d.last_env_seq = cut.seq;
                d.last_env_stream = cut.stream_seq;
                d.txn_stream_seq = cut.stream_seq;
                d.next = next;
                // A (legacy) new lineage's empty start at sequence 0 has no envelope of its own.
                d.cut = (cut.seq > 0).then_some(cut);
            }
            Start::Beginning => {
                if b.last_seq == 0 {
                    d.empty = true; // nothing was ever published
                } else if first > 1 {
                    d.lost = Some(Refusal::Lost {
                        lineage: None,
                        after_seq: 0,
                        stream_from: 1,
                        stream_to: (first - 1).min(b.last_seq),
                        next_seq: None,
                        cause: LostCause::NotRetained,
                    });
                }
            }
        }
        d.expect_stream = d.next;
        Ok(d)
    }

    /// Whether more messages can change the decision.
    pub fn wants_more(&self) -> bool {
        !self.empty
            && !matches!(
                self.lost,
                Some(Refusal::Lost {
                    next_seq: Some(_),
                    ..
                })
            )
    }

    /// Takes the next message (stream order, from [`Start::read_from`]).
    pub fn push(&mut self, stream_seq: u64, item: &Classified) -> Result<(), Refusal> {
        if let Some(Refusal::Lost {
            lineage, next_seq, ..
        }) = &mut self.lost
        {
            if let Classified::Envelope(e) = item {
                if next_seq.is_none() && lineage.is_none_or(|l| l == e.lineage) {
                    *next_seq = Some(e.seq);
                }
            }
            return Ok(());
        }
        if let Some(cut) = self.cut.filter(|c| c.stream_seq == stream_seq) {
            check_cut(cut, item)?;
        }
        if stream_seq < self.next || stream_seq > self.b.last_seq || self.empty {
            return Ok(());
        }
        if stream_seq > self.expect_stream {
            let h = self
                .hole
                .get_or_insert((self.expect_stream, stream_seq - 1));
            h.1 = stream_seq - 1;
        }
        self.expect_stream = stream_seq + 1;
        let e = match item {
            Classified::Foreign { .. } => {
                self.foreign_messages += 1;
                return Ok(());
            }
            Classified::Envelope(e) => e,
        };
        let hole = self.hole;
        let lost_across = |hole: (u64, u64), lineage: Lineage, after_seq: u64| Refusal::Lost {
            lineage: Some(lineage),
            after_seq,
            stream_from: hole.0,
            stream_to: hole.1,
            next_seq: Some(e.seq),
            cause: LostCause::Deleted,
        };
        let last_env_seq = self.last_env_seq;
        let applied = match &mut self.cur {
            Some(s) if s.lineage() == e.lineage => {
                let expected = last_env_seq + 1;
                if e.seq > expected {
                    return Err(match hole {
                        Some(h) => lost_across(h, e.lineage, last_env_seq),
                        None => Refusal::Broken {
                            stream_seq,
                            source: ApplyError::Gap {
                                expected,
                                got: e.seq,
                            },
                        },
                    });
                }
                if e.seq < expected {
                    return Err(Refusal::Forked {
                        lineage: e.lineage,
                        seq: e.seq,
                        stream_seq,
                        after: last_env_seq,
                    });
                }
                s.apply(e)
                    .map_err(|source| Refusal::Broken { stream_seq, source })?
            }
            other => {
                let seen = self.seen.contains(&e.lineage);
                if e.seq != 1 || e.part != 1 || seen {
                    return Err(match (other, hole) {
                        (_, Some(h)) if !seen => lost_across(h, e.lineage, 0),
                        (Some(s), _) => Refusal::Interleaved {
                            lineage: e.lineage,
                            seq: e.seq,
                            stream_seq,
                            current: s.lineage(),
                        },
                        (None, _) => Refusal::NoSnapshot {
                            lineage: e.lineage,
                            seq: e.seq,
                            stream_seq,
                        },
                    });
                }
                let (state, applied) =
                    start_lineage(other.as_ref(), e).ok_or(Refusal::LineageStart {
                        lineage: e.lineage,
                        stream_seq,
                    })?;
                self.seen.push(e.lineage);
                *other = Some(state);
                self.txn_stream_seq = 0; // no complete transaction of this lineage yet
                applied
            }
        };
        if let Applied::Committed { .. } = applied {
            self.txn_stream_seq = stream_seq;
        }
        self.envelopes_applied += 1;
        self.last_env_seq = e.seq;
        self.last_env_stream = stream_seq;
        self.hole = None;
        Ok(())
    }

    /// The decision, once every message to the stream's last sequence was pushed.
    pub fn finish(mut self) -> Result<Option<Continue>, Refusal> {
        if let Some(lost) = self.lost {
            return Err(lost);
        }
        if self.empty {
            return Ok(None);
        }
        if self.expect_stream <= self.b.last_seq {
            // Not delivered up to the end: deleted (the reader read to `last_seq`).
            let h = self
                .hole
                .get_or_insert((self.expect_stream, self.b.last_seq));
            h.1 = self.b.last_seq;
        }
        if let Some((from, to)) = self.hole {
            return Err(Refusal::Lost {
                lineage: self.cur.as_ref().map(State::lineage),
                after_seq: self.last_env_seq,
                stream_from: from,
                stream_to: to,
                next_seq: None,
                cause: LostCause::Deleted,
            });
        }
        let Some(mut state) = self.cur else {
            return Ok(None); // only foreign messages: there is no history
        };
        let txn_seq = state.seq();
        let lineage = state.lineage();
        state.set_position(lineage, self.last_env_seq);
        Ok(Some(Continue {
            state,
            seq: self.last_env_seq,
            txn_seq,
            txn_stream_seq: self.txn_stream_seq,
            last_envelope_stream_seq: self.last_env_stream,
            expected_last_stream_seq: self.b.last_seq,
            foreign_messages: self.foreign_messages,
            abandoned_parts: self.last_env_seq - txn_seq,
            envelopes_applied: self.envelopes_applied,
        }))
    }
}

/// The snapshot's own message: its envelope, the last part of its transaction, its digest
/// ([`Cut::check`], the rule a snapshot writer is fenced by), as a refusal to recover.
fn check_cut(cut: Cut, item: &Classified) -> Result<(), Refusal> {
    cut.check(item).map_err(|mismatch| match mismatch {
        CutMismatch::InsideTransaction { part, parts } => {
            Refusal::InsideTransaction { cut, part, parts }
        }
        CutMismatch::Digest { found } => Refusal::NotInStream {
            cut,
            found: format!(
                "envelope {}:{} recording digest {found}",
                cut.lineage, cut.seq
            ),
        },
        CutMismatch::OtherEnvelope {
            lineage,
            seq,
            part,
            parts,
        } => Refusal::NotInStream {
            cut,
            found: format!("envelope {lineage}:{seq} (part {part} of {parts})"),
        },
        CutMismatch::Foreign { reason } => Refusal::NotInStream {
            cut,
            found: format!("a foreign message ({reason})"),
        },
    })
}

/// A lineage's first envelope: applied to the state before it (a lineage that kept the
/// state) or to an empty state, whichever its digest confirms. A first part of several
/// cannot be checked yet and starts empty (a lineage that keeps its state starts with a
/// one-part marker).
fn start_lineage(prev: Option<&State>, e: &Envelope) -> Option<(State, Applied)> {
    if let Some(prev) = prev.filter(|_| e.is_last_part()) {
        let mut kept = prev.clone();
        kept.set_position(e.lineage, 0);
        if let Ok(applied) = kept.apply(e) {
            return Some((kept, applied));
        }
    }
    let mut empty = State::new(e.lineage);
    let applied = empty.apply(e).ok()?;
    Some((empty, applied))
}
