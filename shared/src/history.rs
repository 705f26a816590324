//! Reading a pipeline's history from its stream: classifying messages, following the stream
//! from a position, and recovering the current state from the latest snapshot plus the
//! envelopes after it. The producer's start-up and every consumer's bootstrap share it.
//!
//! Talks to JetStream (ordered consumers, stream info) and, through `store`, the KV bucket.
//!
//! ## Invariants
//!
//! - Continuity is judged by envelope sequence alone; stream sequences only say where to read.
//! - JetStream never reports that a start position was pruned (an ordered consumer silently
//!   starts at the first surviving message), so [`Tail`] checks the first delivered stream
//!   sequence against the one asked for and reports [`HistoryError::Pruned`].
//! - Recovery never reuses a sequence number. It continues a lineage only after proving, in
//!   the pure [`decide`], that it saw every envelope of it: the snapshot's envelope is where
//!   the manifest says (or aged out at or below the stream's last sequence), every position
//!   after it is retained and was read to the stream's last sequence ([`read_range`] never
//!   ends quietly on a stall), and the envelopes continue without a gap. Anything else is a
//!   [`Refusal`] naming what is lost or broken.
//!
//! ```text
//!  bucket: latest ──▶ manifest (lineage L, seq n, stream_seq p, digest d)
//!  stream: … │ p: L:n (last part, digest d) │ p+1 … last_seq: envelopes L:n+1 …, foreign │
//!            └ may be aged out ┘  └──────── must all be retained and read ────────────┘
//! ```

use crate::codec::decode_envelope;
use crate::digest::Digest;
use crate::envelope::{Envelope, Lineage};
use crate::settings::Settings;
use crate::snapshot::Manifest;
use crate::state::{Applied, ApplyError, State};
use crate::store::StoreError;
use crate::{names, store};
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use std::collections::VecDeque;
use std::time::Duration;

/// A message of the pipeline's stream, classified.
#[derive(Debug, Clone)]
pub enum Classified {
    /// A valid envelope (of any lineage).
    Envelope(Envelope),
    /// Not part of any history: garbage, a wrong version, a truncated message.
    Foreign { reason: String },
}

/// Decodes a payload, classifying anything that is not a valid envelope as foreign.
pub fn classify(payload: &[u8]) -> Classified {
    match decode_envelope(payload) {
        Ok(e) => Classified::Envelope(e),
        Err(e) => Classified::Foreign {
            reason: e.to_string(),
        },
    }
}

/// Why the history could not be read or recovered.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("stream {stream}: {source}")]
    Stream {
        stream: String,
        source: async_nats::Error,
    },
    #[error("reading stream {stream} from sequence {from}: {source}")]
    Read {
        stream: String,
        from: u64,
        source: async_nats::Error,
    },
    #[error(
        "stream {stream} no longer holds sequence {wanted}: the first retained message is {first}"
    )]
    Pruned {
        stream: String,
        wanted: u64,
        first: u64,
    },
    #[error(transparent)]
    Snapshot(#[from] store::StoreError),
    #[error("the history is broken at stream sequence {stream_seq}: {source}")]
    Broken { stream_seq: u64, source: ApplyError },
    #[error(
        "reading stream {stream}: no message arrived for stream sequence {at} (the stream's \
         last is {last}) in {attempts} attempts of {wait:?} each; refusing to recover from a \
         partial read"
    )]
    Stalled {
        stream: String,
        at: u64,
        last: u64,
        attempts: u32,
        wait: Duration,
    },
    #[error("refusing to continue the history of stream {stream}: {refusal}")]
    Refused { stream: String, refusal: Refusal },
}

/// One message read from the stream.
#[derive(Debug, Clone)]
pub struct StreamItem {
    /// Where it is in the stream.
    pub stream_seq: u64,
    /// When the server stored it (ms since the epoch).
    pub stored_at_ms: u64,
    /// Messages after it in the stream when it was delivered.
    pub pending: u64,
    /// What it is.
    pub item: Classified,
}

/// The stream's current bounds (one stream info request; see [`nats::stream_bounds`]).
pub use crate::nats::StreamBounds as Bounds;

/// Reads the stream's bounds.
pub async fn bounds(js: &jetstream::Context, settings: &Settings) -> Result<Bounds, HistoryError> {
    crate::nats::stream_bounds(js, settings)
        .await
        .map_err(|e| HistoryError::Stream {
            stream: names::stream_name(&settings.pipeline),
            source: e.into(),
        })
}

/// Follows the stream from a stream sequence, in order, forever (or until dropped).
pub struct Tail {
    stream: String,
    messages: consumer::pull::Ordered,
    /// The stream sequence asked for, until the first message has been checked against it.
    check_from: Option<u64>,
}

impl std::fmt::Debug for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tail")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl Tail {
    /// Opens a tail at stream sequence `from` (at least 1).
    pub async fn open(
        js: &jetstream::Context,
        settings: &Settings,
        from: u64,
    ) -> Result<Tail, HistoryError> {
        let name = names::stream_name(&settings.pipeline);
        let read_err = |source: async_nats::Error| HistoryError::Read {
            stream: name.clone(),
            from,
            source,
        };
        let stream = js.get_stream(&name).await.map_err(|e| read_err(e.into()))?;
        let info = stream.get_info().await.map_err(|e| read_err(e.into()))?;
        let from = from.max(1);
        if info.state.messages > 0 && from < info.state.first_sequence {
            return Err(HistoryError::Pruned {
                stream: name,
                wanted: from,
                first: info.state.first_sequence,
            });
        }
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                max_batch: tail_batch(settings),
                ..Default::default()
            })
            .await
            .map_err(|e| read_err(e.into()))?;
        let messages = consumer.messages().await.map_err(|e| read_err(e.into()))?;
        Ok(Tail {
            stream: name,
            messages,
            check_from: Some(from),
        })
    }

    /// The next message, waiting for one to arrive. `None` when the consumer ended.
    pub async fn next(&mut self) -> Option<Result<StreamItem, HistoryError>> {
        let msg = match self.messages.next().await? {
            Ok(m) => m,
            Err(e) => {
                return Some(Err(HistoryError::Read {
                    stream: self.stream.clone(),
                    from: self.check_from.unwrap_or(0),
                    source: e.into(),
                }))
            }
        };
        let (stream_seq, pending, stored_at_ms) = match msg.info() {
            Ok(i) => (
                i.stream_sequence,
                i.pending,
                (i.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64,
            ),
            Err(e) => {
                return Some(Err(HistoryError::Read {
                    stream: self.stream.clone(),
                    from: 0,
                    source: e,
                }))
            }
        };
        if let Some(wanted) = self.check_from.take() {
            if stream_seq > wanted {
                return Some(Err(HistoryError::Pruned {
                    stream: self.stream.clone(),
                    wanted,
                    first: stream_seq,
                }));
            }
        }
        Some(Ok(StreamItem {
            stream_seq,
            stored_at_ms,
            pending,
            item: classify(&msg.payload),
        }))
    }

    /// The next message, or `None` when none arrives within `wait`.
    pub async fn next_within(
        &mut self,
        wait: Duration,
    ) -> Option<Result<StreamItem, HistoryError>> {
        tokio::time::timeout(wait, self.next()).await.ok().flatten()
    }
}

/// Messages one pull of a [`Tail`] may ask for. The ordered consumer's default (200) of
/// messages up to `stream.max_message_bytes` each (1 MiB) overflows the server's pending limit
/// per connection (64 MiB) while a reader works through a backlog of large envelopes, and the
/// server cuts the connection as a slow consumer; 16 MiB in flight is plenty to keep a reader
/// busy.
fn tail_batch(settings: &Settings) -> i64 {
    let max_message = i64::from(settings.stream.max_message_bytes).max(64 * 1024);
    (16 * 1024 * 1024 / max_message).clamp(8, 200)
}

// ---------------------------------------------------------------------------------------------
// Recovery: asynchronous reading, then a pure decision over what was read.

/// Times a read of the history may stall (no message within `nats.request_timeout`) before
/// recovery gives up naming the position; each stall re-opens the reader where it stopped.
const READ_ATTEMPTS: u32 = 3;

/// A snapshot's cut, as its manifest states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    pub lineage: Lineage,
    /// The envelope the state is after (the last part of a complete transaction).
    pub seq: u64,
    /// Where envelope `seq` is in the stream.
    pub stream_seq: u64,
    /// The state digest the manifest records.
    pub digest: Digest,
}

impl From<&Manifest> for Cut {
    fn from(m: &Manifest) -> Cut {
        Cut {
            lineage: m.lineage,
            seq: m.seq,
            stream_seq: m.stream_seq,
            digest: m.digest,
        }
    }
}

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

/// The snapshot's own message: its envelope, the last part of its transaction, its digest.
fn check_cut(cut: Cut, item: &Classified) -> Result<(), Refusal> {
    match item {
        Classified::Envelope(e) if e.lineage == cut.lineage && e.seq == cut.seq => {
            if !e.is_last_part() {
                return Err(Refusal::InsideTransaction {
                    cut,
                    part: e.part,
                    parts: e.parts,
                });
            }
            if e.digest != cut.digest {
                return Err(Refusal::NotInStream {
                    cut,
                    found: format!(
                        "envelope {}:{} recording digest {}",
                        e.lineage, e.seq, e.digest
                    ),
                });
            }
            Ok(())
        }
        Classified::Envelope(e) => Err(Refusal::NotInStream {
            cut,
            found: format!(
                "envelope {}:{} (part {} of {})",
                e.lineage, e.seq, e.part, e.parts
            ),
        }),
        Classified::Foreign { reason } => Err(Refusal::NotInStream {
            cut,
            found: format!("a foreign message ({reason})"),
        }),
    }
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

/// Reads every message from stream sequence `from` to `to`, in order, proving it reached
/// `to`: trailing deleted messages (which no consumer delivers) are found first in the
/// stream's list of deleted sequences, and a read that stalls is re-opened where it stopped, [`READ_ATTEMPTS`] times,
/// before failing with the position.
pub async fn read_range(
    js: &jetstream::Context,
    settings: &Settings,
    from: u64,
    to: u64,
    mut each: impl FnMut(u64, Classified) -> bool,
) -> Result<(), HistoryError> {
    let name = names::stream_name(&settings.pipeline);
    if from > to {
        return Ok(());
    }
    let stream = js.get_stream(&name).await.map_err(|e| HistoryError::Read {
        stream: name.clone(),
        from,
        source: e.into(),
    })?;
    // The last message not deleted, from the stream's list of deleted sequences (stream
    // info, which both roles may ask for).
    let info = stream
        .info_builder()
        .with_deleted(true)
        .fetch()
        .await
        .map_err(|e| HistoryError::Read {
            stream: name.clone(),
            from,
            source: e.into(),
        })?
        .info;
    let deleted: std::collections::HashSet<u64> =
        info.state.deleted.unwrap_or_default().into_iter().collect();
    let mut end = to;
    while deleted.contains(&end) {
        if end == from {
            return Ok(()); // every position deleted
        }
        end -= 1;
    }
    let wait = settings.nats.request_timeout;
    let mut pos = from;
    let mut stalls = 0;
    'reopen: while pos <= end {
        let mut tail = Tail::open(js, settings, pos).await?;
        // Deleted messages are skipped silently, so the first one delivered may be past
        // `pos`; what is missing is judged by `decide` from the positions.
        tail.check_from = None;
        loop {
            match tail.next_within(wait).await {
                Some(Ok(item)) => {
                    if item.stream_seq > end {
                        break 'reopen;
                    }
                    pos = item.stream_seq + 1;
                    stalls = 0;
                    if !each(item.stream_seq, item.item) || pos > end {
                        break 'reopen;
                    }
                }
                Some(Err(e)) => return Err(e),
                None => {
                    stalls += 1;
                    if stalls >= READ_ATTEMPTS {
                        return Err(HistoryError::Stalled {
                            stream: name,
                            at: pos,
                            last: end,
                            attempts: stalls,
                            wait,
                        });
                    }
                    tracing::warn!(
                        stream_seq = pos,
                        last = end,
                        attempt = stalls,
                        "Reading the history stalled; reading again from there"
                    );
                    continue 'reopen;
                }
            }
        }
    }
    Ok(())
}

/// What recovery found: where the lineage continues.
#[derive(Debug)]
pub struct Recovered {
    /// The state after the last complete transaction, positioned at the last envelope in
    /// the stream (parts of an abandoned transaction count: the next envelope follows them).
    pub state: State,
    /// The stream's last sequence when recovery read it to the end (envelope or not).
    pub last_stream_seq: u64,
    /// The stream sequence of the last envelope of the lineage (the snapshot's when none
    /// followed it).
    pub last_envelope_stream_seq: u64,
    /// The last complete transaction and its stream sequence: where a snapshot of the
    /// recovered state is cut.
    pub txn_seq: u64,
    pub txn_stream_seq: u64,
    /// The snapshot recovery started from.
    pub manifest: Option<Manifest>,
    /// Messages that were not envelopes.
    pub foreign_messages: u64,
    /// Parts of a transaction the producer never completed.
    pub abandoned_parts: u64,
    /// Envelopes applied after the snapshot.
    pub envelopes_applied: u64,
}

/// What [`recover_history`] concluded.
#[derive(Debug)]
pub enum Recovery {
    /// No history at all: no snapshot, no envelope.
    Empty,
    /// The lineage continues.
    Continue(Box<Recovered>),
    /// The lineage cannot continue. `snapshot` is the newest verified state there is (the
    /// snapshot recovery started from), for a new lineage to start from.
    Refused {
        refusal: Refusal,
        snapshot: Option<Box<(Manifest, State)>>,
    },
}

/// Recovers the pipeline's current state: the latest snapshot (or, when it does not load,
/// the newest older one of its lineage that does, or the stream's start), then every message
/// after it up to the stream's last sequence, decided by [`decide`].
pub async fn recover_history(
    js: &jetstream::Context,
    settings: &Settings,
) -> Result<Recovery, HistoryError> {
    let b = bounds(js, settings).await?;
    let kv = store::bucket(js, settings).await?;
    // Older snapshots of the latest one's lineage, newest first, once they are needed.
    let mut older: Option<VecDeque<Manifest>> = None;
    let mut loaded = match store::load_latest(&kv, settings).await {
        Ok(l) => l,
        Err(
            e @ (StoreError::Corrupt { .. }
            | StoreError::Missing { .. }
            | StoreError::Verify { .. }),
        ) => {
            tracing::error!(error = %e, "The latest snapshot is damaged; recovering from an older snapshot of its lineage or the stream");
            let list = older.insert(older_candidates(&kv, None).await?);
            next_loadable(&kv, list).await
        }
        Err(e) => return Err(e.into()),
    };
    loop {
        let (start, snapshot) = match loaded.take() {
            Some(l) => {
                let keep = Box::new((l.manifest.clone(), l.state.clone()));
                let cut = Cut::from(&l.manifest);
                (
                    Start::Snapshot {
                        cut,
                        state: Box::new(l.state),
                    },
                    Some(keep),
                )
            }
            None => (Start::Beginning, None),
        };
        let from = start.read_from(&b);
        let manifest = snapshot.as_ref().map(|s| s.0.clone());
        let decided = match Decision::new(start, &b) {
            Ok(mut d) => {
                let mut refused = None;
                if d.wants_more() {
                    read_range(js, settings, from, b.last_seq, |seq, item| {
                        match d.push(seq, &item) {
                            Ok(()) => d.wants_more(),
                            Err(r) => {
                                refused = Some(r);
                                false
                            }
                        }
                    })
                    .await?;
                }
                match refused {
                    Some(r) => Err(r),
                    None => d.finish(),
                }
            }
            Err(r) => Err(r),
        };
        match decided {
            Ok(None) => return Ok(Recovery::Empty),
            Ok(Some(c)) => {
                return Ok(Recovery::Continue(Box::new(Recovered {
                    last_stream_seq: c.expected_last_stream_seq,
                    last_envelope_stream_seq: c.last_envelope_stream_seq,
                    txn_seq: c.txn_seq,
                    txn_stream_seq: c.txn_stream_seq,
                    manifest,
                    foreign_messages: c.foreign_messages,
                    abandoned_parts: c.abandoned_parts,
                    envelopes_applied: c.envelopes_applied,
                    state: c.state,
                })))
            }
            // A snapshot cut inside a transaction (older versions wrote such cuts): an
            // older snapshot of its lineage may still be good.
            Err(r @ Refusal::InsideTransaction { .. }) if snapshot.is_some() => {
                tracing::error!(refusal = %r, "Skipping a snapshot cut inside a transaction");
                let list = match &mut older {
                    Some(l) => l,
                    None => {
                        let cut = snapshot.as_ref().map(|s| Cut::from(&s.0));
                        older.insert(older_candidates(&kv, cut).await?)
                    }
                };
                loaded = next_loadable(&kv, list).await;
            }
            Err(refusal) => return Ok(Recovery::Refused { refusal, snapshot }),
        }
    }
}

/// Manifests older than the latest one, of the latest pointer's lineage, newest first.
async fn older_candidates(
    kv: &async_nats::jetstream::kv::Store,
    below: Option<Cut>,
) -> Result<VecDeque<Manifest>, HistoryError> {
    let lineage = match store::read_pointer(kv).await {
        Ok(Some((p, _))) => Some(p.lineage),
        _ => None,
    };
    let mut list: Vec<Manifest> = store::list_manifests(kv)
        .await?
        .into_iter()
        .map(|(_, m)| m)
        .filter(|m| lineage.is_none_or(|l| l == m.lineage))
        .filter(|m| below.is_none_or(|c| m.stream_seq < c.stream_seq))
        .collect();
    // Without a readable pointer: the newest lineage, judged by stream position.
    if lineage.is_none() {
        if let Some(newest) = list.iter().max_by_key(|m| m.stream_seq).map(|m| m.lineage) {
            list.retain(|m| m.lineage == newest);
        }
    }
    list.sort_by_key(|m| std::cmp::Reverse((m.stream_seq, m.seq)));
    Ok(list.into())
}

/// The first of `list` that loads and verifies (taken off the list); `None` when none does.
async fn next_loadable(
    kv: &async_nats::jetstream::kv::Store,
    list: &mut VecDeque<Manifest>,
) -> Option<store::Loaded> {
    while let Some(m) = list.pop_front() {
        let key = crate::snapshot::manifest_key(m.lineage, m.seq);
        match store::load(kv, m).await {
            Ok(l) => {
                tracing::warn!(manifest = %key, "Recovering from an older snapshot");
                return Some(l);
            }
            Err(e) => tracing::error!(manifest = %key, error = %e, "Snapshot unusable too"),
        }
    }
    tracing::warn!("No usable snapshot; recovering by replaying the stream from its start");
    None
}

/// [`recover_history`], with a refusal as an error. `None` when there is no history at all.
pub async fn recover(
    js: &jetstream::Context,
    settings: &Settings,
) -> Result<Option<Recovered>, HistoryError> {
    match recover_history(js, settings).await? {
        Recovery::Empty => Ok(None),
        Recovery::Continue(r) => Ok(Some(*r)),
        Recovery::Refused { refusal, .. } => Err(HistoryError::Refused {
            stream: names::stream_name(&settings.pipeline),
            refusal,
        }),
    }
}
