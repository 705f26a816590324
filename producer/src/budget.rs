//! The producer's retention budget and snapshot schedule: when the producer's state is cut
//! (every N envelopes, every T, and before the stream's retention could prune the envelopes
//! after the latest snapshot), and whether the next envelopes may be published yet. Pure
//! bookkeeping driven by the batching engine; the cuts are written by the snapshot task
//! ([`crate::snapshots`]).
//!
//! Talks to nothing (the settings and the stream limits it counts against are handed in).
//!
//! ## Invariants
//!
//! - A cut is a `State` clone (buckets shared copy-on-write) taken by the batching engine at a
//!   transaction boundary; it is written only after its last envelope is acknowledged, with
//!   that envelope's stream sequence, so the snapshot always names a stored envelope. Over
//!   the parts of a transaction abandoned before recovery, the cut is relabelled to the last
//!   complete transaction and carries its (recovered, stored) stream sequence.
//! - While held back, the engine never waits with nothing being written ([`Horizon::unblock`]):
//!   it cuts at the cut point, or, when that is covered already and abandoned parts still
//!   leave no room, ends them with an envelope of no changes.
//! - One snapshot is written at a time. The schedule cuts one after half of
//!   `stream.max_messages` envelopes or half of `stream.max_bytes` bytes, so publication
//!   rarely waits for one.
//! - Retention never prunes an envelope that no durable snapshot covers ([`Horizon`]): the
//!   envelopes published after the newest DURABLE snapshot stay within
//!   `StreamSettings::envelope_room` (counted in stream positions, so foreign messages count)
//!   and `StreamSettings::byte_room` (changes plus `ENVELOPE_STREAM_OVERHEAD` each). Before an
//!   envelope would go past that, the engine cuts a snapshot of its live state and waits until
//!   it is durable; while snapshots fail, nothing more is published. Age cannot be held back:
//!   the settings require time-based snapshots at most half of `stream.max_age` apart.
//! - The limits counted are the tighter of the settings and the stream's own configuration
//!   ([`RetentionLimits`]), re-read by the snapshot task after each snapshot and every
//!   [`LIMITS_RECHECK`](crate::snapshots::LIMITS_RECHECK) (one stream info request, off the publishing path): a limit an
//!   operator lowers by hand while the producer runs holds publishing back from then on (the
//!   engine applies new limits at once, and an idle engine past half of a lowered limit cuts a
//!   snapshot right away). A
//!   limit raised by hand above the settings loosens nothing (the next start sets the stream
//!   back to the settings, and retention would then prune what the higher limit let through).
//!   The server applies a lowered limit at once: what it prunes before the producer reads it
//!   (within [`LIMITS_RECHECK`](crate::snapshots::LIMITS_RECHECK)), or of what was already published past the newest snapshot,
//!   is lost to readers that had not read it (they resnapshot).
//!
//! ```text
//!  stream:  … [covered] e(c+1) e(c+2) … e(head) | e(head+1) … e(head+k)
//!              └ newest durable snapshot        └ admitted only if head+k stays within
//!                                                  the room counted from `covered`
//! ```

use crate::error::ProducerError;
use deltasync_config::settings::{
    Settings, StreamSettings, ENVELOPE_STREAM_OVERHEAD, MESSAGE_OVERHEAD_MARGIN,
};
use deltasync_core::retention::StreamLimits;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// The retention limits publishing is held back against: the tighter of the settings and the
/// stream's own configuration (`None`: no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct RetentionLimits {
    /// Messages the stream keeps.
    pub max_messages: Option<u64>,
    /// Bytes the stream keeps.
    pub max_bytes: Option<u64>,
}

impl RetentionLimits {
    /// The tighter of the settings' limits and the stream's own (`None`: not read yet).
    pub fn tighter(settings: &StreamSettings, stream: Option<&StreamLimits>) -> RetentionLimits {
        let ours = |v: i64| u64::try_from(v).ok().filter(|v| *v > 0);
        let min = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        RetentionLimits {
            max_messages: min(
                ours(settings.max_messages),
                stream.and_then(|s| s.max_messages),
            ),
            max_bytes: min(ours(settings.max_bytes), stream.and_then(|s| s.max_bytes)),
        }
    }

    /// These limits as stream settings (for the room and margin formulas).
    fn as_settings(&self) -> StreamSettings {
        let signed = |v: Option<u64>| v.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX));
        StreamSettings {
            max_messages: signed(self.max_messages),
            max_bytes: signed(self.max_bytes),
            ..StreamSettings::default()
        }
    }

    /// Envelopes (stream positions) that may be published past the newest durable snapshot.
    pub fn envelope_room(&self) -> Option<u64> {
        self.as_settings().envelope_room()
    }

    /// Bytes that may be published past the newest durable snapshot.
    pub fn byte_room(&self) -> Option<u64> {
        self.as_settings().byte_room()
    }
}

/// Bytes counted per envelope on top of its changes (header, message overhead in the
/// stream), so the byte trigger errs on the early side.
pub(crate) const ENVELOPE_OVERHEAD_BYTES: u64 = ENVELOPE_STREAM_OVERHEAD;

/// The newest snapshot known to be durable (written to the bucket, or found there already):
/// readers can start from it, so retention may prune envelope `seq` and everything before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Durable {
    /// Envelope sequence of the cut (0: the lineage's empty start).
    pub seq: u64,
    /// Stream sequence of envelope `seq` (for 0: the stream's last sequence when the lineage
    /// started, or 0 when unknown, which only makes the count more cautious).
    pub stream_seq: u64,
}

/// Whether more envelopes may be published now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Within the stream's retention, counted from the newest durable snapshot.
    Go,
    /// Not until a snapshot at the current position is durable.
    Full,
    /// Never: even right after a snapshot at the current position it would not fit.
    Never,
}

/// What the engine does while the next envelopes do not fit ([`Admit::Full`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unblock {
    /// Cut a snapshot at the cut point (always a complete transaction's end).
    Cut,
    /// End the parts of a transaction abandoned before recovery with an envelope of no
    /// changes: a snapshot at the last complete transaction before them is durable, and they
    /// still leave no room, so no cut could make more.
    EndAbandoned,
    /// Wait for the snapshot being written.
    Wait,
}

/// Where the engine stands while the next envelopes do not fit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stuck {
    /// Where a snapshot of the live state is cut: the head, or the last complete transaction
    /// while the head is on the parts of an abandoned one.
    pub cut_point: u64,
    /// The head is on the parts of a transaction abandoned before recovery.
    pub abandoned: bool,
    /// The last cut handed to the snapshot task.
    pub last_cut: u64,
    /// A snapshot is being written.
    pub running: bool,
    /// The last snapshot failed.
    pub retry: bool,
}

/// The retention budget: how far past the newest durable snapshot the producer may publish
/// (see the module documentation). Pure bookkeeping, driven by the engine.
#[derive(Debug)]
pub(crate) struct Horizon {
    /// Most envelopes (stream positions) past the covered one; `None` = unlimited.
    max_envelopes: Option<u64>,
    /// Most bytes past the covered one; `None` = unlimited.
    max_bytes: Option<u64>,
    covered: Durable,
    /// Envelopes produced after `covered.seq`, in order: (seq, bytes counted).
    since: VecDeque<(u64, u64)>,
    /// Sum of the bytes in `since`.
    bytes_since: u64,
    /// Last envelope produced.
    head: u64,
}

impl Horizon {
    /// A budget of `max_envelopes` and `max_bytes`, starting with the envelopes
    /// `covered.seq + 1 ..= head` already produced (recovered), each counted `unknown_cost`
    /// bytes.
    pub(crate) fn new(
        max_envelopes: Option<u64>,
        max_bytes: Option<u64>,
        covered: Durable,
        head: u64,
        unknown_cost: u64,
    ) -> Horizon {
        let mut h = Horizon {
            max_envelopes,
            max_bytes,
            covered,
            since: VecDeque::new(),
            bytes_since: 0,
            head: covered.seq,
        };
        for seq in covered.seq + 1..=head {
            h.produced(seq, unknown_cost);
        }
        h.head = h.head.max(head);
        h
    }

    /// The budget `limits` give (at start: the settings', which the stream is created and
    /// updated with).
    pub(crate) fn for_limits(
        settings: &Settings,
        limits: RetentionLimits,
        covered: Durable,
        head: u64,
    ) -> Horizon {
        let unknown = settings.producer.batch_max_bytes as u64 + ENVELOPE_OVERHEAD_BYTES;
        Horizon::new(
            limits.envelope_room(),
            limits.byte_room(),
            covered,
            head,
            unknown,
        )
    }

    /// The stream's limits changed: count against `max_envelopes` and `max_bytes` from now
    /// on (what is already produced counts as before).
    pub(crate) fn set_room(&mut self, max_envelopes: Option<u64>, max_bytes: Option<u64>) {
        self.max_envelopes = max_envelopes;
        self.max_bytes = max_bytes;
    }

    /// The newest durable snapshot.
    pub(crate) fn covered(&self) -> Durable {
        self.covered
    }

    /// Envelope `seq` (the next one) was produced, counting `bytes`.
    pub(crate) fn produced(&mut self, seq: u64, bytes: u64) {
        self.head = seq;
        self.since.push_back((seq, bytes));
        self.bytes_since += bytes;
    }

    /// A snapshot became durable (an older one than known changes nothing).
    pub(crate) fn advance(&mut self, durable: Durable) {
        if durable.seq < self.covered.seq {
            return;
        }
        self.covered = durable;
        while let Some(&(seq, bytes)) = self.since.front() {
            if seq > durable.seq {
                break;
            }
            self.since.pop_front();
            self.bytes_since -= bytes;
        }
    }

    /// What to do while the next envelopes do not fit, the last envelope acknowledged being
    /// `acked`. Never waits when nothing is being written: a cut at the cut point makes room
    /// unless the cut point is covered already, which over abandoned parts means they leave
    /// no room, and then an empty envelope (which fits: the abandoned transaction fitted
    /// whole) ends them, so that the next cut is past them.
    pub(crate) fn unblock(&self, s: Stuck, acked: (u64, u64)) -> Unblock {
        if s.retry {
            return Unblock::Cut;
        }
        if s.running {
            return Unblock::Wait;
        }
        if s.abandoned
            && s.cut_point <= self.covered.seq
            && self.admits(1, ENVELOPE_OVERHEAD_BYTES, acked) == Admit::Go
        {
            return Unblock::EndAbandoned;
        }
        if s.last_cut < s.cut_point {
            Unblock::Cut
        } else {
            Unblock::Wait
        }
    }

    /// Whether `envelopes` more envelopes of `bytes` in all may be produced now, the last
    /// envelope acknowledged being `acked` (envelope seq, stream seq): its stream position
    /// counts the foreign messages that landed since the covered snapshot.
    pub(crate) fn admits(&self, envelopes: u64, bytes: u64, acked: (u64, u64)) -> Admit {
        let fits = |distance: u64, bytes_since: u64| {
            self.max_envelopes.is_none_or(|m| distance <= m)
                && self.max_bytes.is_none_or(|m| bytes_since <= m)
        };
        if !fits(envelopes, bytes) {
            return Admit::Never;
        }
        let after = self.head + envelopes;
        let mut distance = after - self.covered.seq;
        let (acked_seq, acked_stream) = acked;
        if acked_seq >= self.covered.seq && acked_seq <= self.head {
            let stream_distance =
                acked_stream.saturating_sub(self.covered.stream_seq) + (after - acked_seq);
            distance = distance.max(stream_distance);
        }
        if fits(distance, self.bytes_since + bytes) {
            Admit::Go
        } else {
            Admit::Full
        }
    }
}

/// Phase of the background snapshot, shared between the engine (which schedules) and the
/// snapshot task (which writes).
#[derive(Debug, Default)]
pub(crate) struct Phase(AtomicU8);

const IDLE: u8 = 0;
const RUNNING: u8 = 1;
const RETRY: u8 = 2;

impl Phase {
    pub(crate) fn running(&self) -> bool {
        self.0.load(Ordering::Acquire) == RUNNING
    }
    pub(crate) fn retry(&self) -> bool {
        self.0.load(Ordering::Acquire) == RETRY
    }
    /// The snapshot being written is durable (or was not needed).
    pub(crate) fn set_idle(&self) {
        self.set(IDLE);
    }
    /// The snapshot being written failed: the engine cuts again.
    pub(crate) fn set_retry(&self) {
        self.set(RETRY);
    }
    fn set(&self, v: u8) {
        self.0.store(v, Ordering::Release);
    }
}

/// When the next snapshot is due; owned by the batching engine.
#[derive(Debug)]
pub(crate) struct Schedule {
    every_envelopes: u64,
    every: Duration,
    /// Half of `stream.max_messages` (None = unlimited).
    half_messages: Option<u64>,
    /// Half of `stream.max_bytes` (None = unlimited).
    half_bytes: Option<u64>,
    envelopes_since: u64,
    bytes_since: u64,
    /// When the first envelope after the latest snapshot was produced.
    first_since: Option<Instant>,
    warned: bool,
}

impl Schedule {
    pub(crate) fn new(settings: &Settings) -> Schedule {
        let half = |v: i64| (v > 0).then(|| (v as u64 / 2).max(1));
        Schedule {
            every_envelopes: settings.snapshot.every_envelopes,
            every: settings.snapshot.every,
            half_messages: half(settings.stream.max_messages),
            half_bytes: half(settings.stream.max_bytes),
            envelopes_since: 0,
            bytes_since: 0,
            first_since: None,
            warned: false,
        }
    }

    /// The stream's limits changed: the retention trigger fires at half of these from now on.
    pub(crate) fn set_limits(&mut self, limits: RetentionLimits) {
        let half = |v: u64| (v / 2).max(1);
        self.half_messages = limits.max_messages.map(half);
        self.half_bytes = limits.max_bytes.map(half);
    }

    /// The recovered position is `envelopes` past the latest snapshot, which is `age` old
    /// (no snapshot: `None`).
    pub(crate) fn resume(&mut self, envelopes: u64, age: Option<Duration>) {
        self.envelopes_since = envelopes;
        if envelopes > 0 {
            // The first of those envelopes is at most as old as the snapshot before it.
            let age = age.unwrap_or(self.every);
            self.first_since = Some(Instant::now().checked_sub(age).unwrap_or_else(Instant::now));
        }
    }

    /// Counts one envelope of `bytes` encoded change bytes.
    pub(crate) fn count(&mut self, bytes: u64) {
        self.envelopes_since += 1;
        self.bytes_since += bytes + ENVELOPE_OVERHEAD_BYTES;
        if self.first_since.is_none() {
            self.first_since = Some(Instant::now());
        }
    }

    /// When the time trigger fires, if armed.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        if self.every.is_zero() {
            return None;
        }
        self.first_since.map(|t| t + self.every)
    }

    /// Whether the count or the retention trigger has fired: a snapshot is owed, whether or not
    /// the previous one is still being written (the engine then looks again shortly, instead
    /// of waiting for the next envelope, which may never come).
    pub(crate) fn owed(&self) -> bool {
        self.envelopes_since > 0 && (self.by_count() || self.by_retention())
    }

    fn by_count(&self) -> bool {
        self.every_envelopes > 0 && self.envelopes_since >= self.every_envelopes
    }

    fn by_retention(&self) -> bool {
        self.half_messages
            .is_some_and(|h| self.envelopes_since >= h)
            || self.half_bytes.is_some_and(|h| self.bytes_since >= h)
    }

    /// Whether a snapshot should be cut now (the previous one is not running).
    pub(crate) fn due(&mut self, phase: &Phase) -> bool {
        if phase.retry() {
            // The last snapshot failed: cut again, even with no envelope since (the failed
            // cut's envelopes are still not covered by a snapshot).
            return true;
        }
        if self.envelopes_since == 0 {
            return false;
        }
        let by_count = self.by_count();
        let by_retention = self.by_retention();
        let by_time = self.deadline().is_some_and(|d| Instant::now() >= d);
        let due = by_count || by_retention || by_time;
        if due && phase.running() {
            if by_retention && !self.warned {
                self.warned = true;
                tracing::warn!(
                    envelopes = self.envelopes_since,
                    bytes = self.bytes_since,
                    "Half the stream's retention published since the latest snapshot while the previous snapshot is still being written"
                );
            }
            return false;
        }
        due
    }

    /// A cut was due but there is nothing to cut (the cut point is covered by a durable
    /// snapshot already): start counting again, no snapshot running.
    pub(crate) fn skipped(&mut self, phase: &Phase) {
        self.taken(phase);
        phase.set(IDLE);
    }

    /// A cut was taken: start counting again.
    pub(crate) fn taken(&mut self, phase: &Phase) {
        self.envelopes_since = 0;
        self.bytes_since = 0;
        self.first_since = None;
        self.warned = false;
        phase.set(RUNNING);
    }
}

/// Refuses settings under which the stream's retention cannot cover the distance between
/// two snapshots (on top of `Settings::validate`).
pub(crate) fn check_retention(settings: &Settings) -> Result<(), ProducerError> {
    let invalid = |key: &str, reason: String| {
        ProducerError::Settings(deltasync_config::settings::SettingsError::Invalid {
            key: key.to_owned(),
            reason,
        })
    };
    let s = &settings.stream;
    if s.max_messages > 0 && s.max_messages < 2 {
        return Err(invalid(
            "stream.max_messages",
            "must be at least 2: the stream keeps the envelopes between two snapshots".into(),
        ));
    }
    let envelope = (settings.producer.batch_max_bytes + MESSAGE_OVERHEAD_MARGIN) as i64;
    if s.max_bytes > 0 && s.max_bytes < 2 * envelope {
        return Err(invalid(
            "stream.max_bytes / producer.batch_max_bytes",
            format!(
                "stream.max_bytes {} cannot hold two full envelopes of {} bytes \
                 (producer.batch_max_bytes + margin): a snapshot every envelope would still \
                 let retention prune the envelope after it",
                s.max_bytes, envelope
            ),
        ));
    }
    // Age-limited retention without time-based snapshots is refused by `Settings::validate`.
    Ok(())
}
#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[derive(Debug, Clone)]
    enum Op {
        /// A transaction of `parts` envelopes of `cost` bytes each.
        Produce { parts: u64, cost: u64 },
        /// The oldest snapshot being written becomes durable.
        Durable,
        /// A snapshot is cut at the head (a schedule trigger).
        Cut,
        /// A foreign message lands in the stream.
        Foreign,
        /// An operator sets the stream's max_messages by hand, and the producer reads it.
        Limit { max_messages: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (1u64..4, 1u64..300).prop_map(|(parts, cost)| Op::Produce { parts, cost }),
            2 => Just(Op::Durable),
            1 => Just(Op::Cut),
            1 => Just(Op::Foreign),
            1 => (2u64..80).prop_map(|max_messages| Op::Limit { max_messages }),
        ]
    }

    /// A stream with limits retention (oldest dropped first) and a snapshot bucket, driven
    /// the way the engine drives its `Horizon`.
    struct World {
        max_messages: u64,
        max_bytes: Option<u64>,
        /// (stream seq, envelope seq or 0 for a foreign message, bytes)
        stream: VecDeque<(u64, u64, u64)>,
        last_stream_seq: u64,
        head: u64,
        /// Stream seq of envelope `head`.
        head_stream_seq: u64,
        /// Cuts handed to the snapshot task, oldest first.
        cuts: VecDeque<Durable>,
        durable: Durable,
        horizon: Horizon,
        /// The acknowledged stream position the last admission counted from: foreign
        /// messages after it are not counted yet.
        checked_at: u64,
        /// While the head is on abandoned parts: the last complete transaction before them.
        abandoned_after: Option<Durable>,
        /// The last cut handed to the snapshot task.
        last_cut: u64,
    }

    impl World {
        fn append(&mut self, env_seq: u64, bytes: u64) {
            self.last_stream_seq += 1;
            self.stream
                .push_back((self.last_stream_seq, env_seq, bytes));
            self.prune();
        }

        /// Retention drops the oldest messages beyond the limits.
        fn prune(&mut self) {
            loop {
                let total: u64 = self.stream.iter().map(|m| m.2).sum();
                let over = self.stream.len() as u64 > self.max_messages
                    || self.max_bytes.is_some_and(|b| total > b);
                if !over {
                    break;
                }
                self.stream.pop_front();
            }
        }

        /// A cut at the cut point (the head, or the last complete transaction before
        /// abandoned parts).
        fn cut(&mut self) {
            let at = self.abandoned_after.unwrap_or(Durable {
                seq: self.head,
                stream_seq: self.head_stream_seq,
            });
            self.last_cut = at.seq;
            if self.cuts.back().is_none_or(|c| c.seq < at.seq) {
                self.cuts.push_back(at);
            }
        }

        fn make_durable(&mut self) -> bool {
            match self.cuts.pop_front() {
                Some(d) => {
                    self.durable = d;
                    true
                }
                None => false,
            }
        }

        fn produce(&mut self, parts: u64, cost: u64) {
            loop {
                self.horizon.advance(self.durable);
                self.checked_at = self.head_stream_seq;
                match self
                    .horizon
                    .admits(parts, parts * cost, (self.head, self.head_stream_seq))
                {
                    Admit::Go => break,
                    Admit::Never => return,
                    Admit::Full => {
                        // Held back: the engine does what `unblock` says, and time passes
                        // until the snapshots being written are durable.
                        let stuck = Stuck {
                            cut_point: self.abandoned_after.map_or(self.head, |t| t.seq),
                            abandoned: self.abandoned_after.is_some(),
                            last_cut: self.last_cut,
                            running: !self.cuts.is_empty(),
                            retry: false,
                        };
                        let acked = (self.head, self.head_stream_seq);
                        match self.horizon.unblock(stuck, acked) {
                            Unblock::Cut => self.cut(),
                            Unblock::EndAbandoned => {
                                self.emit(1, ENVELOPE_OVERHEAD_BYTES);
                                continue;
                            }
                            Unblock::Wait => {}
                        }
                        assert!(
                            self.make_durable(),
                            "held back with no snapshot to wait for"
                        );
                    }
                }
            }
            self.emit(parts, cost);
        }

        fn emit(&mut self, parts: u64, cost: u64) {
            for _ in 0..parts {
                self.head += 1;
                self.horizon.produced(self.head, cost);
                self.append(self.head, cost);
                self.head_stream_seq = self.last_stream_seq;
            }
            self.abandoned_after = None;
        }

        /// Every envelope after the newest durable snapshot is still in the stream.
        fn check(&self) -> Result<(), TestCaseError> {
            let kept: BTreeSet<u64> = self.stream.iter().map(|m| m.1).collect();
            for seq in self.durable.seq + 1..=self.head {
                prop_assert!(
                    kept.contains(&seq),
                    "envelope {} pruned; newest durable snapshot at {}",
                    seq,
                    self.durable.seq
                );
            }
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
        ))]

        /// Whatever the sizes, snapshot timing and foreign messages (those the producer has
        /// not counted yet within the margin), retention never prunes an envelope that no
        /// durable snapshot covers, and a transaction is refused only when it cannot fit even
        /// right after a snapshot.
        #[test]
        fn retention_never_prunes_what_no_durable_snapshot_covers(
            max_messages in 2i64..80,
            max_bytes in prop_oneof![Just(-1i64), 700i64..5000],
            ops in prop::collection::vec(op(), 1..200),
        ) {
            let mut settings = Settings::default();
            settings.stream.max_messages = max_messages;
            settings.stream.max_bytes = max_bytes;
            let mut w = World {
                max_messages: max_messages as u64,
                max_bytes: (max_bytes > 0).then_some(max_bytes as u64),
                stream: VecDeque::new(),
                last_stream_seq: 0,
                head: 0,
                head_stream_seq: 0,
                cuts: VecDeque::new(),
                durable: Durable::default(),
                horizon: Horizon::new(
                    settings.stream.envelope_room(),
                    settings.stream.byte_room(),
                    Durable::default(),
                    0,
                    0,
                ),
                checked_at: 0,
                abandoned_after: None,
                last_cut: 0,
            };
            for op in ops {
                match op {
                    Op::Produce { parts, cost } => {
                        let before = w.head;
                        w.produce(parts, cost);
                        if w.head == before {
                            // Refused: it must not fit even in an empty budget.
                            let limits = RetentionLimits {
                                max_messages: Some(w.max_messages),
                                max_bytes: w.max_bytes,
                            };
                            let room_n = limits.envelope_room();
                            let room_b = limits.byte_room();
                            prop_assert!(
                                room_n.is_some_and(|m| parts > m)
                                    || room_b.is_some_and(|b| parts * cost > b),
                                "refused {} x {} with room {:?} / {:?}",
                                parts, cost, room_n, room_b
                            );
                        }
                    }
                    Op::Durable => {
                        w.make_durable();
                    }
                    Op::Cut => w.cut(),
                    Op::Foreign => {
                        // Foreign messages the producer has not seen yet (after the position
                        // it last counted from) eat into the tenth kept as margin.
                        let unseen = w
                            .stream
                            .iter()
                            .filter(|m| m.1 == 0 && m.0 > w.checked_at)
                            .count() as u64;
                        if unseen < w.max_messages / 10 {
                            w.append(0, 0);
                        }
                    }
                    Op::Limit { max_messages } => {
                        // The server applies a new limit at once: one below what is already in
                        // the stream past the newest durable snapshot (with the foreign
                        // messages not counted yet) prunes before any producer could react;
                        // only the others are the producer's to keep.
                        let limits = RetentionLimits {
                            max_messages: Some(max_messages),
                            max_bytes: w.max_bytes,
                        };
                        let room = limits.envelope_room().unwrap_or(max_messages);
                        let unseen = w
                            .stream
                            .iter()
                            .filter(|m| m.1 == 0 && m.0 > w.checked_at)
                            .count() as u64;
                        let uncovered = w.last_stream_seq - w.durable.stream_seq;
                        if uncovered <= room && (unseen == 0 || unseen < max_messages / 10) {
                            w.max_messages = max_messages;
                            w.prune();
                            w.horizon.set_room(limits.envelope_room(), limits.byte_room());
                        }
                    }
                }
                w.check()?;
            }
        }

        /// Started over the parts of a transaction abandoned by a crash (never applied; the
        /// head is on them), with a durable snapshot some way before: publishing is never
        /// held back without a snapshot to wait for (cuts are at the last complete
        /// transaction, and abandoned parts that leave no room are ended by an empty
        /// envelope), and retention never prunes what no durable snapshot covers.
        #[test]
        fn over_abandoned_parts_publishing_is_never_held_back_without_end(
            max_messages in 3i64..40,
            // (complete envelopes after the snapshot, abandoned parts), as fractions of the
            // room: together within it, as the crashed producer kept them.
            split in (0u64..100, 1u64..100),
            ops in prop::collection::vec(op(), 1..100),
        ) {
            let mut settings = Settings::default();
            settings.stream.max_messages = max_messages;
            let room = settings.stream.envelope_room().unwrap_or(max_messages as u64);
            let abandoned = (split.1 * (room - 1) / 100).max(1);
            let complete = split.0 * (room - abandoned) / 100;
            let covered = Durable { seq: 1, stream_seq: 1 };
            let txn = 1 + complete;
            let head = txn + abandoned;
            let mut w = World {
                max_messages: max_messages as u64,
                max_bytes: None,
                stream: VecDeque::new(),
                last_stream_seq: 0,
                head,
                head_stream_seq: head,
                cuts: VecDeque::new(),
                durable: covered,
                horizon: Horizon::new(Some(room), None, covered, head, 0),
                checked_at: head,
                abandoned_after: Some(Durable { seq: txn, stream_seq: txn }),
                last_cut: covered.seq,
            };
            for seq in 1..=head {
                w.append(seq, 0);
            }
            w.check()?;
            for op in ops {
                match op {
                    Op::Produce { parts, cost } => w.produce(parts.min(room), cost),
                    Op::Durable => {
                        w.make_durable();
                    }
                    Op::Cut => w.cut(),
                    Op::Foreign | Op::Limit { .. } => {}
                }
                w.check()?;
            }
        }
    }

    #[test]
    fn a_count_trigger_stays_owed_while_the_previous_snapshot_is_written() {
        let mut settings = Settings::default();
        settings.snapshot.every_envelopes = 10;
        let mut schedule = Schedule::new(&settings);
        let phase = Phase::default();
        for _ in 0..9 {
            schedule.count(100);
        }
        assert!(!schedule.owed());
        schedule.count(100);
        assert!(schedule.owed());
        phase.set(RUNNING);
        assert!(!schedule.due(&phase), "not cut while the previous one runs");
        assert!(
            schedule.owed(),
            "still owed: the engine looks again shortly"
        );
        phase.set(IDLE);
        assert!(schedule.due(&phase));
        schedule.taken(&phase);
        assert!(!schedule.owed());
    }

    #[test]
    fn a_failed_snapshot_is_cut_again_even_without_new_envelopes() {
        let mut settings = Settings::default();
        settings.snapshot.every_envelopes = 10;
        let mut schedule = Schedule::new(&settings);
        let phase = Phase::default();
        for _ in 0..10 {
            schedule.count(100);
        }
        assert!(schedule.due(&phase));
        schedule.taken(&phase);
        assert!(!schedule.due(&phase), "running");
        phase.set(RETRY);
        assert!(
            schedule.due(&phase),
            "the failed cut is retried although nothing was published"
        );
        schedule.taken(&phase);
        assert!(phase.running());
    }
}
