//! The feed: a bounded ring of the most recent committed change batches, and the pure
//! decision of where a reader at a position stands in it (serve from here, wait, or re-read
//! the state). `/v1/changes`, `/v1/watch` and [`Replica::watch`](crate::Replica::watch) all
//! read it through a [`Cursor`].
//!
//! Talks to nothing: synchronous and I/O-free. The replica fills it in `Replica::committed`
//! (only durable commits, in order) and guards it with a mutex held for a few pointer copies.
//!
//! ## Invariants
//!
//! - The ring is gapless: every batch's `prev_seq` is the previous batch's `seq`, the first
//!   one's is `floor`, all in one `lineage`; `head` (the last `seq`, else `floor`) is the
//!   replica's committed position.
//! - A commit that does not continue the head (a re-snapshot, a lineage change, a batch the
//!   engine did not keep, a restart) resets the ring: it empties, `floor` becomes the new
//!   position and `epoch` grows. A re-snapshot's diff is never kept here (computing it is
//!   O(state)); readers behind the new floor re-read the state instead.
//! - The ring holds at most `max_bytes` (counted by [`batch_bytes`]), except that the batches
//!   of the latest commit are always kept (the engine held them all anyway, bounded by
//!   `consumer.commit_every_envelopes`): a reader at the previous commit's position is never
//!   lost, however large a commit is. Pruning the oldest batch raises `floor` to its `seq`.
//! - A cursor never yields a gap or a duplicate: it yields the batches after its position in
//!   order, or says it is lost (its next batch was pruned, or the ring was reset since it was
//!   placed) and must start again from a view.
//!
//! ```text
//!   floor        batches (seq of each)            head
//!     |  [ b1 | b2 | b3 | ... | bn ]                 |
//!     | prev_seq(b1) = floor, prev_seq(b(i+1)) = seq(bi), seq(bn) = head
//!
//!   reader at `after`:  after < floor          -> Lost (re-read the state)
//!                       after == seq of some bi -> serve b(i+1)..
//!                       after >= head          -> Wait (a faster replica may be ahead)
//!                       inside a transaction   -> Lost (no replica commits there)
//! ```
//!
//! Each batch's JSON line is encoded once, on first demand, and shared by every reader:
//!
//! ```text
//! {"seq":S,"prev_seq":P,"lineage":"<hex>","changes":[{"op":"put","key":K,"value":V},
//!  {"op":"put","key":K,"value_b64":"<base64>"},{"op":"del","key":K}]}\n
//! ```

use crate::follower::{BatchKind, ChangeBatch};
use bytes::Bytes;
use deltasync_core::{Change, Lineage};
use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

/// Bytes counted for a batch besides its changes.
const BATCH_OVERHEAD: usize = 128;
/// Bytes counted for a change besides its key and value.
const CHANGE_OVERHEAD: usize = 48;

/// The bytes a batch counts against `max_bytes`: keys and values plus a fixed overhead. The
/// encoded line, once a reader asked for it, comes on top (about 4/3 of the values that are
/// not JSON, about the same size for those that are).
pub fn batch_bytes(b: &ChangeBatch) -> usize {
    BATCH_OVERHEAD
        + b.changes
            .iter()
            .map(|c| {
                CHANGE_OVERHEAD
                    + c.key().len()
                    + match c {
                        Change::Put { value, .. } => value.len(),
                        Change::Delete { .. } => 0,
                    }
            })
            .sum::<usize>()
}

/// One committed batch in the feed, with its JSON line once encoded.
#[derive(Debug)]
pub struct FeedBatch {
    batch: Arc<ChangeBatch>,
    /// What it counts against the feed's bound.
    bytes: usize,
    /// The line, encoded by the first reader that asks and shared by all.
    line: OnceLock<Bytes>,
}

impl FeedBatch {
    pub fn new(batch: Arc<ChangeBatch>) -> FeedBatch {
        let bytes = batch_bytes(&batch);
        FeedBatch {
            batch,
            bytes,
            line: OnceLock::new(),
        }
    }

    /// The batch.
    pub fn batch(&self) -> &Arc<ChangeBatch> {
        &self.batch
    }

    /// Its JSON line, with the newline (encoded at the first call).
    pub fn line(&self) -> &Bytes {
        self.line.get_or_init(|| encode_line(&self.batch))
    }
}

/// Encodes `b` as the feed's JSON line (see the module header), with the newline.
pub fn encode_line(b: &ChangeBatch) -> Bytes {
    let mut out = Vec::with_capacity(batch_bytes(b) + b.changes.len() * 8);
    out.extend_from_slice(b"{\"seq\":");
    out.extend_from_slice(b.seq.to_string().as_bytes());
    out.extend_from_slice(b",\"prev_seq\":");
    out.extend_from_slice(b.prev_seq.to_string().as_bytes());
    out.extend_from_slice(b",\"lineage\":\"");
    out.extend_from_slice(b.lineage.to_hex().as_bytes());
    out.extend_from_slice(b"\",\"changes\":[");
    for (i, c) in b.changes.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        deltasync_core::ndjson::write_change(&mut out, c);
    }
    out.extend_from_slice(b"]}\n");
    Bytes::from(out)
}

/// Where a reader after a position stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stand {
    /// The batches from this index of the ring on follow the position.
    Serve { from: usize },
    /// Nothing after the position yet.
    Wait,
    /// The batches after the position are gone (pruned, another lineage, a re-snapshot, or a
    /// position inside a transaction): re-read the state.
    MustRefetch,
}

/// The ring of recent committed batches (see the module header).
#[derive(Debug)]
pub struct Feed {
    /// The bound; 0 keeps no batch (every commit resets).
    max_bytes: usize,
    lineage: Lineage,
    /// The position before the first batch.
    floor: u64,
    batches: VecDeque<Arc<FeedBatch>>,
    /// Bytes counted by the batches held.
    bytes: usize,
    /// Grows at every reset; 0 until the first commit.
    epoch: u64,
}

impl Feed {
    pub fn new(max_bytes: usize) -> Feed {
        Feed {
            max_bytes,
            lineage: Lineage::default(),
            floor: 0,
            batches: VecDeque::new(),
            bytes: 0,
            epoch: 0,
        }
    }

    /// The bound.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Whether it keeps batches at all.
    pub fn is_on(&self) -> bool {
        self.max_bytes > 0
    }

    pub fn lineage(&self) -> Lineage {
        self.lineage
    }

    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// The committed position.
    pub fn head(&self) -> u64 {
        self.batches.back().map_or(self.floor, |b| b.batch.seq)
    }

    /// 0 until the first commit, then one more at every reset.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn len(&self) -> usize {
        self.batches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Bytes counted by the batches held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Records a durable commit at `lineage`/`seq` that `batches` lead to: each batch that
    /// continues the head is kept; anything else resets the ring.
    pub fn commit(&mut self, lineage: Lineage, seq: u64, batches: &[Arc<ChangeBatch>]) {
        // Batches of this commit in the ring: pruning spares them, so that a reader at the
        // previous commit's head never loses continuity, however large this commit is.
        let mut fresh = 0;
        for b in batches {
            let continues = self.epoch > 0
                && self.is_on()
                && b.kind == BatchKind::Applied
                && b.lineage == self.lineage
                && b.prev_seq == self.head()
                && b.seq > b.prev_seq;
            if continues {
                let b = Arc::new(FeedBatch::new(b.clone()));
                self.bytes += b.bytes;
                self.batches.push_back(b);
                fresh += 1;
            } else {
                self.reset(b.lineage, b.seq);
                fresh = 0;
            }
        }
        if (lineage, seq) != (self.lineage, self.head()) || self.epoch == 0 {
            self.reset(lineage, seq);
        }
        self.prune(fresh);
    }

    fn reset(&mut self, lineage: Lineage, seq: u64) {
        self.batches.clear();
        self.bytes = 0;
        self.lineage = lineage;
        self.floor = seq;
        self.epoch += 1;
    }

    /// Drops the oldest batches while over the bound, but none of the newest `keep`.
    fn prune(&mut self, keep: usize) {
        while self.bytes > self.max_bytes && self.batches.len() > keep {
            if let Some(old) = self.batches.pop_front() {
                self.bytes -= old.bytes;
                self.floor = old.batch.seq;
            }
        }
    }

    /// Where a reader after `after` (of `lineage`, when it knows it) stands.
    pub fn stand(&self, lineage: Option<Lineage>, after: u64) -> Stand {
        if self.epoch == 0 {
            return Stand::Wait;
        }
        if lineage.is_some_and(|l| l != self.lineage) || after < self.floor {
            return Stand::MustRefetch;
        }
        if after >= self.head() {
            return Stand::Wait;
        }
        let i = self.batches.partition_point(|b| b.batch.seq <= after);
        match self.batches.get(i) {
            Some(b) if b.batch.prev_seq == after => Stand::Serve { from: i },
            _ => Stand::MustRefetch,
        }
    }

    /// At most `limit` batches from index `from` on.
    pub fn read(&self, from: usize, limit: usize) -> Vec<Arc<FeedBatch>> {
        self.batches
            .iter()
            .skip(from)
            .take(limit)
            .cloned()
            .collect()
    }
}

/// What a [`Cursor`] found.
#[derive(Debug)]
pub enum Step {
    /// The next batches, in order, without a gap.
    Batches(Vec<Arc<FeedBatch>>),
    /// Nothing new yet.
    Wait,
    /// Continuity is lost: re-read the state and start a new cursor after it.
    Lost,
}

/// A reader's place in the feed: the position it has, the lineage and the ring epoch it was
/// placed in. A reset of the ring after that loses it, even when its position would still
/// fit: the state it built may be one the re-snapshot replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// The last position the reader has.
    pub after: u64,
    /// Its lineage, once known.
    pub lineage: Option<Lineage>,
    /// The epoch it was placed in, once the feed had one.
    pub epoch: Option<u64>,
}

impl Cursor {
    /// A reader that has the state at `after` (of `lineage`, when known).
    pub fn after(after: u64, lineage: Option<Lineage>) -> Cursor {
        Cursor {
            after,
            lineage,
            epoch: None,
        }
    }

    /// A reader at the feed's head now.
    pub fn at_head(feed: &Feed) -> Cursor {
        Cursor {
            after: feed.head(),
            lineage: (feed.epoch > 0).then_some(feed.lineage),
            epoch: (feed.epoch > 0).then_some(feed.epoch),
        }
    }

    /// The next at most `limit` batches after the cursor (moving it past them), or why not.
    pub fn next(&mut self, feed: &Feed, limit: usize) -> Step {
        if feed.epoch == 0 {
            return Step::Wait;
        }
        if self.epoch.is_some_and(|e| e != feed.epoch) {
            return Step::Lost;
        }
        match feed.stand(self.lineage, self.after) {
            Stand::MustRefetch => Step::Lost,
            Stand::Wait => {
                self.lineage = Some(feed.lineage);
                self.epoch = Some(feed.epoch);
                Step::Wait
            }
            Stand::Serve { from } => {
                let batches = feed.read(from, limit.max(1));
                if let Some(last) = batches.last() {
                    self.after = last.batch.seq;
                }
                self.lineage = Some(feed.lineage);
                self.epoch = Some(feed.epoch);
                Step::Batches(batches)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::follower::Reason;
    use proptest::prelude::*;

    const L1: Lineage = Lineage([1; 16]);
    const L2: Lineage = Lineage([2; 16]);

    fn applied(lineage: Lineage, prev_seq: u64, seq: u64, value_len: usize) -> Arc<ChangeBatch> {
        Arc::new(ChangeBatch {
            lineage,
            prev_seq,
            seq,
            kind: BatchKind::Applied,
            changes: vec![Change::put(format!("k{seq:06}"), vec![b'x'; value_len])],
        })
    }

    fn seqs(step: &Step) -> Vec<u64> {
        match step {
            Step::Batches(b) => b.iter().map(|b| b.batch().seq).collect(),
            other => panic!("expected batches, got {other:?}"),
        }
    }

    #[test]
    fn a_reader_is_served_from_its_position_waits_at_the_head_and_is_lost_below_the_floor() {
        let mut f = Feed::new(1 << 20);
        assert_eq!(f.stand(None, 0), Stand::Wait, "nothing committed yet");
        f.commit(L1, 10, &[]);
        assert_eq!((f.floor(), f.head(), f.epoch()), (10, 10, 1));
        // A three-part transaction 11..=13, then 14.
        f.commit(L1, 14, &[applied(L1, 10, 13, 1), applied(L1, 13, 14, 1)]);
        assert_eq!((f.floor(), f.head(), f.len(), f.epoch()), (10, 14, 2, 1));
        assert_eq!(f.stand(None, 10), Stand::Serve { from: 0 });
        assert_eq!(f.stand(Some(L1), 13), Stand::Serve { from: 1 });
        assert_eq!(
            f.stand(None, 12),
            Stand::MustRefetch,
            "inside a transaction"
        );
        assert_eq!(f.stand(None, 14), Stand::Wait);
        assert_eq!(f.stand(None, 99), Stand::Wait, "ahead: a faster replica");
        assert_eq!(f.stand(None, 9), Stand::MustRefetch);
        assert_eq!(f.stand(Some(L2), 14), Stand::MustRefetch);
    }

    #[test]
    fn a_resync_batch_or_a_commit_that_skips_resets_the_ring() {
        let mut f = Feed::new(1 << 20);
        f.commit(L1, 1, &[]);
        f.commit(L1, 2, &[applied(L1, 1, 2, 1)]);
        let mut c = Cursor::after(1, None);
        assert_eq!(seqs(&c.next(&f, 10)), vec![2]);
        let resync = Arc::new(ChangeBatch {
            lineage: L1,
            prev_seq: 2,
            seq: 50,
            kind: BatchKind::Resync {
                reason: Reason::Gap,
            },
            changes: vec![],
        });
        f.commit(L1, 50, &[resync]);
        assert_eq!((f.floor(), f.head(), f.len(), f.epoch()), (50, 50, 0, 2));
        assert!(
            matches!(c.next(&f, 10), Step::Lost),
            "placed before the reset"
        );
        // A commit whose batch was not kept (position moved without one) also resets.
        f.commit(L1, 51, &[]);
        assert_eq!((f.floor(), f.epoch()), (51, 3));
        // Same position again (a view published later): nothing changes.
        f.commit(L1, 51, &[]);
        assert_eq!(f.epoch(), 3);
    }

    #[test]
    fn the_ring_keeps_its_byte_bound_and_always_the_latest_commit() {
        let one = batch_bytes(&applied(L1, 0, 1, 100));
        let mut f = Feed::new(3 * one);
        f.commit(L1, 0, &[]);
        for s in 1..=10 {
            f.commit(L1, s, &[applied(L1, s - 1, s, 100)]);
            assert!(f.bytes() <= 3 * one);
        }
        assert_eq!((f.floor(), f.head(), f.len()), (7, 10, 3));
        f.commit(L1, 11, &[applied(L1, 10, 11, 10 * one)]);
        assert_eq!(
            (f.floor(), f.head(), f.len()),
            (10, 11, 1),
            "too big, kept alone"
        );
        // One commit larger than the bound: all of it is kept, the older batches go.
        let big: Vec<_> = (12..=15).map(|s| applied(L1, s - 1, s, 10 * one)).collect();
        f.commit(L1, 15, &big);
        assert_eq!(
            (f.floor(), f.head(), f.len()),
            (11, 15, 4),
            "the whole commit is kept"
        );
        let mut off = Feed::new(0);
        off.commit(L1, 0, &[]);
        off.commit(L1, 1, &[applied(L1, 0, 1, 1)]);
        assert_eq!(
            (off.floor(), off.len()),
            (1, 0),
            "a feed that is off keeps nothing"
        );
    }

    #[test]
    fn the_line_is_encoded_once_in_the_documented_shape() {
        let b = Arc::new(ChangeBatch {
            lineage: L1,
            prev_seq: 4,
            seq: 5,
            kind: BatchKind::Applied,
            changes: vec![
                Change::put("a", &br#"{"x":1}"#[..]),
                Change::put("b", vec![0xff]),
                Change::delete("c"),
            ],
        });
        let fb = FeedBatch::new(b);
        let line = fb.line().clone();
        assert!(
            std::ptr::eq(fb.line().as_ptr(), line.as_ptr()),
            "shared, not re-encoded"
        );
        let text = std::str::from_utf8(&line).unwrap();
        assert_eq!(
            text,
            format!(
                "{{\"seq\":5,\"prev_seq\":4,\"lineage\":\"{}\",\"changes\":[\
                 {{\"op\":\"put\",\"key\":\"a\",\"value\":{{\"x\":1}}}},\
                 {{\"op\":\"put\",\"key\":\"b\",\"value_b64\":\"/w==\"}},\
                 {{\"op\":\"del\",\"key\":\"c\"}}]}}\n",
                L1.to_hex()
            )
        );
    }

    /// What happens to the replica, for the model test.
    #[derive(Clone, Debug)]
    enum Op {
        /// Commit `n` transactions (each of `parts` envelopes, values of `len` bytes).
        Commit { n: usize, parts: u64, len: usize },
        /// A re-snapshot `ahead` envelopes further (or a lineage change).
        Reset { ahead: u64, new_lineage: bool },
        /// Reader `r` reads at most `limit` batches.
        Read { r: usize, limit: usize },
        /// Reader `r` starts again from the head (as after re-reading the state).
        Restart { r: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (1..5usize, 1..3u64, 0..300usize)
                .prop_map(|(n, parts, len)| Op::Commit { n, parts, len }),
            1 => (0..5u64, any::<bool>())
                .prop_map(|(ahead, new_lineage)| Op::Reset { ahead, new_lineage }),
            5 => (0..4usize, 1..6usize).prop_map(|(r, limit)| Op::Read { r, limit }),
            1 => (0..4usize).prop_map(|r| Op::Restart { r }),
        ]
    }

    /// Every batch ever committed, with the epoch it was committed in: the model.
    struct Model {
        all: Vec<(u64, Arc<ChangeBatch>)>,
        /// How many of the newest batches the latest commit made.
        last_commit: usize,
        epoch: u64,
        lineage: Lineage,
        /// Position of the last reset.
        reset_at: u64,
        max_bytes: usize,
    }

    impl Model {
        fn head(&self) -> u64 {
            match self.all.last() {
                Some((e, b)) if *e == self.epoch => b.seq,
                _ => self.reset_at,
            }
        }

        /// The batches the bound lets the ring hold: the newest of this epoch whose bytes
        /// fit, and at least those of the latest commit.
        fn held(&self) -> Vec<Arc<ChangeBatch>> {
            let mut held = Vec::new();
            let mut bytes = 0;
            for (e, b) in self.all.iter().rev() {
                if *e != self.epoch {
                    break;
                }
                bytes += batch_bytes(b);
                if bytes > self.max_bytes && held.len() >= self.last_commit {
                    break;
                }
                held.push(b.clone());
            }
            held.reverse();
            held
        }
    }

    proptest! {
        #[test]
        fn readers_never_see_a_gap_or_a_duplicate_and_are_lost_exactly_when_the_model_says(
            max_bytes in prop_oneof![Just(0usize), 200..2000usize],
            ops in proptest::collection::vec(op(), 1..120),
        ) {
            let mut feed = Feed::new(max_bytes);
            let mut model = Model {
                all: Vec::new(),
                last_commit: 0,
                epoch: 1,
                lineage: L1,
                reset_at: 0,
                max_bytes,
            };
            feed.commit(L1, 0, &[]);
            // Each reader: its cursor, the epoch it was placed in, and what it received.
            let mut readers: Vec<(Cursor, u64, Vec<Arc<ChangeBatch>>)> =
                (0..4).map(|_| (Cursor::at_head(&feed), 1, Vec::new())).collect();
            for op in ops {
                match op {
                    Op::Commit { n, parts, len } => {
                        let mut batches = Vec::new();
                        for _ in 0..n {
                            let prev = model.head();
                            let b = applied(model.lineage, prev, prev + parts, len);
                            model.all.push((model.epoch, b.clone()));
                            if max_bytes == 0 {
                                // A feed that is off resets at every commit.
                                model.epoch += 1;
                                model.reset_at = b.seq;
                            }
                            batches.push(b);
                        }
                        model.last_commit = if max_bytes == 0 { 0 } else { n };
                        let head = model.head();
                        feed.commit(model.lineage, head, &batches);
                    }
                    Op::Reset { ahead, new_lineage } => {
                        let prev = model.head();
                        if new_lineage {
                            model.lineage = if model.lineage == L1 { L2 } else { L1 };
                        }
                        let seq = if new_lineage { ahead } else { prev + ahead };
                        model.epoch += 1;
                        model.reset_at = seq;
                        model.last_commit = 0;
                        let b = Arc::new(ChangeBatch {
                            lineage: model.lineage,
                            prev_seq: prev,
                            seq,
                            kind: BatchKind::Resync { reason: Reason::Gap },
                            changes: vec![],
                        });
                        feed.commit(model.lineage, seq, &[b]);
                    }
                    Op::Restart { r } => {
                        readers[r] = (Cursor::at_head(&feed), model.epoch, Vec::new());
                    }
                    Op::Read { r, limit } => {
                        let (cursor, placed, got) = &mut readers[r];
                        let after = cursor.after;
                        let held = model.held();
                        let floor = held.first().map_or(model.head(), |b| b.prev_seq);
                        let lost = *placed != model.epoch || after < floor;
                        let step = cursor.next(&feed, limit);
                        if lost {
                            prop_assert!(matches!(step, Step::Lost), "model says lost: {step:?}");
                            continue;
                        }
                        let want: Vec<u64> = held
                            .iter()
                            .filter(|b| b.seq > after)
                            .take(limit)
                            .map(|b| b.seq)
                            .collect();
                        match step {
                            Step::Batches(bs) => {
                                let got_seqs: Vec<u64> = bs.iter().map(|b| b.batch().seq).collect();
                                prop_assert_eq!(got_seqs, want);
                                for b in bs {
                                    let prev = got.last().map_or(after, |g| g.seq);
                                    prop_assert_eq!(b.batch().prev_seq, prev, "no gap, no duplicate");
                                    got.push(b.batch().clone());
                                }
                            }
                            Step::Wait => prop_assert!(want.is_empty()),
                            Step::Lost => prop_assert!(false, "lost while the model has {want:?}"),
                        }
                    }
                }
            }
            // Everything a reader received is the model's history, in order.
            for (_, placed, got) in &readers {
                let history: Vec<u64> = model
                    .all
                    .iter()
                    .filter(|(e, _)| e == placed)
                    .map(|(_, b)| b.seq)
                    .collect();
                let got: Vec<u64> = got.iter().map(|b| b.seq).collect();
                prop_assert!(
                    got.is_empty() || history.windows(got.len()).any(|w| w == got.as_slice()),
                    "{got:?} is a run of {history:?}"
                );
            }
        }
    }
}
