//! Property test of producer recovery's pure core, `recovery::decide`: generated histories
//! (transactions of one or several parts, abandoned transactions, foreign messages, new
//! lineages with and without a marker, snapshots) are damaged (a pruned start, an aged-out
//! stream, deleted messages) and recovered from a genuine or a wrong snapshot, and the result
//! is checked against the writer's ground truth:
//!
//! - safety: when recovery continues, it continues the writer's last lineage at exactly the
//!   writer's last sequence (never reusing one) with the writer's state; "no history" only when
//!   nothing was ever published;
//!   (a wrong snapshot, which the store refuses to write, is only held to this where the
//!   stream still holds the position it names);
//! - liveness, against a simple model: from a genuine snapshot (or the stream's start) whose
//!   every later position is retained, whose later envelopes are all there and with no deleted
//!   message after the last envelope, recovery continues.
//!
//! No I/O, no NATS. Failing cases are kept in `proptest-regressions/recovery_model.txt`.
//! Longer run: `PROPTEST_CASES=20000 cargo test --release -p deltasync-core --test
//! recovery_model`.

use deltasync_core::change::Change;
use deltasync_core::envelope::{split_transaction, Envelope, Lineage};
use deltasync_core::recovery::{decide, Classified, Cut, Refusal, Start};
use deltasync_core::retention::StreamBounds as Bounds;
use deltasync_core::state::State;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::FileFailurePersistence;

const REGRESSIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/proptest-regressions/recovery_model.txt"
);

fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS))),
        ..ProptestConfig::default()
    }
}

/// What the writer does next.
#[derive(Debug, Clone)]
enum Step {
    /// A transaction; `max_bytes` small splits it into parts; `crash_after` publishes only
    /// that many of its parts (an abandoned transaction).
    Txn {
        changes: Vec<(u8, Option<u8>)>,
        max_bytes: usize,
        crash_after: Option<usize>,
    },
    Foreign,
    /// A snapshot of the last complete transaction.
    Snapshot,
    /// An operator's new lineage: with a marker envelope (from the kept or an empty state),
    /// or the old way (no marker, empty, starting at the next transaction).
    NewLineage {
        marker: bool,
        keep: bool,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (
            prop::collection::vec((0u8..6, prop::option::weighted(0.8, 0u8..4)), 0..5),
            prop_oneof![Just(1usize << 20), Just(1usize)],
            prop::option::weighted(0.15, 0usize..3),
        )
            .prop_map(|(changes, max_bytes, crash_after)| Step::Txn {
                changes,
                max_bytes,
                crash_after
            }),
        1 => Just(Step::Foreign),
        2 => Just(Step::Snapshot),
        1 => (any::<bool>(), any::<bool>()).prop_map(|(marker, keep)| Step::NewLineage { marker, keep }),
    ]
}

/// Which snapshot recovery starts from.
#[derive(Debug, Clone)]
enum Pick {
    None,
    Genuine(Index),
    /// A genuine state at a wrong stream position.
    Shifted(Index, i8),
    /// A genuine state at a position past the stream's end.
    PastEnd(Index, u8),
    /// A cut at a non-final part (what the `snapshot` command used to write).
    InsideTxn(Index),
}

fn pick() -> impl Strategy<Value = Pick> {
    prop_oneof![
        2 => Just(Pick::None),
        6 => any::<Index>().prop_map(Pick::Genuine),
        1 => (any::<Index>(), prop_oneof![-3i8..0, 1i8..4]).prop_map(|(i, d)| Pick::Shifted(i, d)),
        1 => (any::<Index>(), 1u8..4).prop_map(|(i, d)| Pick::PastEnd(i, d)),
        1 => any::<Index>().prop_map(Pick::InsideTxn),
    ]
}

/// What happened to the stream afterwards.
#[derive(Debug, Clone)]
struct Damage {
    /// Messages removed from the start (limits, age): a fraction of the stream.
    prune: Option<Index>,
    /// Everything aged out.
    aged_out: bool,
    /// Messages deleted one by one.
    deleted: Vec<Index>,
}

fn damage() -> impl Strategy<Value = Damage> {
    (
        prop::option::weighted(0.3, any::<Index>()),
        prop::bool::weighted(0.1),
        prop::collection::vec(any::<Index>(), 0..3).prop_map(|mut v| {
            // Usually none.
            v.truncate(v.len().saturating_sub(1));
            v
        }),
    )
        .prop_map(|(prune, aged_out, deleted)| Damage {
            prune,
            aged_out,
            deleted,
        })
}

enum Msg {
    Envelope(Envelope),
    Foreign,
}

/// The single writer: what it published and what it knows.
struct Writer {
    lineage: Lineage,
    next_lineage: u8,
    /// After the last complete transaction, positioned at it.
    state: State,
    /// The last envelope published in `lineage`.
    seq: u64,
    txn_stream_seq: u64,
    /// Start a fresh lineage (no marker) at the next transaction.
    fresh_pending: bool,
    msgs: Vec<Msg>,
    cuts: Vec<(Cut, State)>,
    /// Non-final parts and the state before their transaction.
    inside: Vec<(Cut, State)>,
}

impl Writer {
    fn new() -> Writer {
        Writer {
            lineage: Lineage([1; 16]),
            next_lineage: 2,
            state: State::new(Lineage([1; 16])),
            seq: 0,
            txn_stream_seq: 0,
            fresh_pending: false,
            msgs: Vec::new(),
            cuts: Vec::new(),
            inside: Vec::new(),
        }
    }

    fn new_lineage(&mut self) -> Lineage {
        let l = Lineage([self.next_lineage; 16]);
        self.next_lineage += 1;
        l
    }

    fn publish(&mut self, e: Envelope) -> u64 {
        self.msgs.push(Msg::Envelope(e));
        self.msgs.len() as u64
    }

    fn step(&mut self, s: &Step) {
        match s {
            Step::Foreign => self.msgs.push(Msg::Foreign),
            Step::Snapshot => {
                if self.state.seq() > 0 {
                    let cut = Cut {
                        lineage: self.lineage,
                        seq: self.state.seq(),
                        stream_seq: self.txn_stream_seq,
                        digest: self.state.digest(),
                    };
                    self.cuts.push((cut, self.state.clone()));
                }
            }
            Step::NewLineage { marker: false, .. } => self.fresh_pending = true,
            Step::NewLineage { marker: true, keep } => {
                self.fresh_pending = false;
                let l = self.new_lineage();
                let mut state = if *keep {
                    self.state.clone()
                } else {
                    State::new(l)
                };
                state.set_position(l, 1);
                let e = Envelope {
                    lineage: l,
                    seq: 1,
                    part: 1,
                    parts: 1,
                    digest: state.digest(),
                    produced_at_ms: 0,
                    changes: Vec::new(),
                };
                self.lineage = l;
                self.state = state;
                self.seq = 1;
                self.txn_stream_seq = self.publish(e);
            }
            Step::Txn {
                changes,
                max_bytes,
                crash_after,
            } => {
                if *crash_after == Some(0) {
                    return; // nothing reaches the stream
                }
                if std::mem::take(&mut self.fresh_pending) {
                    let l = self.new_lineage();
                    self.lineage = l;
                    self.state = State::new(l);
                    self.seq = 0;
                }
                let changes: Vec<Change> = changes
                    .iter()
                    .map(|(k, v)| match v {
                        Some(v) => Change::put(format!("k{k}"), format!("v{v}")),
                        None => Change::delete(format!("k{k}")),
                    })
                    .collect();
                let mut after = self.state.clone();
                let digest = after.apply_changes(&changes);
                let parts =
                    split_transaction(self.lineage, self.seq + 1, digest, 0, changes, *max_bytes);
                let n = parts.len();
                let publish = crash_after.map_or(n, |k| k.min(n));
                for e in parts.into_iter().take(publish) {
                    let last = e.is_last_part();
                    let seq = e.seq;
                    let digest = e.digest;
                    let at = self.publish(e);
                    self.seq = seq;
                    if last {
                        after.set_position(self.lineage, seq);
                        self.state = after.clone();
                        self.txn_stream_seq = at;
                    } else {
                        let mut before = self.state.clone();
                        before.set_position(self.lineage, seq);
                        let cut = Cut {
                            lineage: self.lineage,
                            seq,
                            stream_seq: at,
                            digest,
                        };
                        self.inside.push((cut, before));
                    }
                }
            }
        }
    }
}

fn check(steps: &[Step], pick: &Pick, damage: &Damage) -> Result<(), TestCaseError> {
    let mut w = Writer::new();
    for s in steps {
        w.step(s);
    }
    let len = w.msgs.len() as u64;
    // Positions 1..=len; removed ones.
    let pruned = if damage.aged_out {
        len
    } else {
        damage.prune.map_or(0, |i| i.index(len as usize + 1) as u64)
    };
    let mut deleted: Vec<u64> = if len == 0 {
        Vec::new()
    } else {
        damage
            .deleted
            .iter()
            .map(|i| i.index(len as usize) as u64 + 1)
            .collect()
    };
    deleted.sort_unstable();
    deleted.dedup();
    let present = |p: u64| p > pruned && p <= len && deleted.binary_search(&p).is_err();
    let first_present = (1..=len).find(|&p| present(p));
    let b = Bounds {
        first_seq: first_present.unwrap_or(len + 1),
        last_seq: len,
        messages: (1..=len).filter(|&p| present(p)).count() as u64,
        bytes: 0,
        first_ts: None,
    };

    let (start, genuine) = match pick {
        Pick::None => (Start::Beginning, true),
        Pick::Genuine(i) if !w.cuts.is_empty() => {
            let (cut, state) = w.cuts[i.index(w.cuts.len())].clone();
            (
                Start::Snapshot {
                    cut,
                    state: Box::new(state),
                },
                true,
            )
        }
        Pick::Shifted(i, d) if !w.cuts.is_empty() => {
            let (mut cut, state) = w.cuts[i.index(w.cuts.len())].clone();
            cut.stream_seq = cut.stream_seq.saturating_add_signed(i64::from(*d)).max(1);
            (
                Start::Snapshot {
                    cut,
                    state: Box::new(state),
                },
                false,
            )
        }
        Pick::PastEnd(i, d) if !w.cuts.is_empty() => {
            let (mut cut, state) = w.cuts[i.index(w.cuts.len())].clone();
            cut.stream_seq = len + u64::from(*d);
            (
                Start::Snapshot {
                    cut,
                    state: Box::new(state),
                },
                false,
            )
        }
        Pick::InsideTxn(i) if !w.inside.is_empty() => {
            let (cut, state) = w.inside[i.index(w.inside.len())].clone();
            (
                Start::Snapshot {
                    cut,
                    state: Box::new(state),
                },
                false,
            )
        }
        _ => (Start::Beginning, true),
    };
    let start_pos = match &start {
        Start::Snapshot { cut, .. } => cut.stream_seq,
        Start::Beginning => 0,
    };
    let from = start.read_from(&b);
    let items: Vec<(u64, Classified)> = (from..=len)
        .filter(|&p| present(p))
        .map(|p| {
            let c = match &w.msgs[p as usize - 1] {
                Msg::Envelope(e) => Classified::Envelope(e.clone()),
                Msg::Foreign => Classified::Foreign {
                    reason: "garbage".into(),
                },
            };
            (p, c)
        })
        .collect();
    let any_envelope = w.msgs.iter().any(|m| matches!(m, Msg::Envelope(_)));

    // The model: what must continue.
    let env_pos: Vec<u64> = (1..=len)
        .filter(|&p| matches!(w.msgs[p as usize - 1], Msg::Envelope(_)))
        .collect();
    let last_env_pos = env_pos.last().copied().unwrap_or(0);
    let intact = genuine
        && (start_pos >= len || b.first_seq <= start_pos + 1)
        && (start_pos > 0 || len == 0 || b.first_seq == 1)
        && env_pos
            .iter()
            .filter(|&&p| p > start_pos)
            .all(|&p| present(p))
        && !deleted.iter().any(|&p| p > last_env_pos.max(start_pos));

    // A wrong cut (the store refuses to write one; a replaced stream can show one) is only
    // detectable where the stream still holds its position.
    let observable = genuine || present(start_pos);
    let outcome = decide(start, &b, &items);
    match &outcome {
        Ok(Some(_)) | Ok(None) if !observable => {}
        Ok(Some(c)) => {
            prop_assert!(any_envelope);
            prop_assert_eq!(c.state.lineage(), w.lineage, "the writer's last lineage");
            prop_assert_eq!(c.seq, w.seq, "exactly the writer's last sequence");
            prop_assert_eq!(c.txn_seq, w.state.seq());
            prop_assert_eq!(c.state.seq(), w.seq);
            prop_assert!(c.state == w.state, "the writer's state");
            prop_assert_eq!(c.abandoned_parts, w.seq - w.state.seq());
            prop_assert_eq!(c.expected_last_stream_seq, len);
            if c.txn_seq == 0 {
                prop_assert_eq!(c.txn_stream_seq, 0);
            } else if let Some(Msg::Envelope(e)) =
                w.msgs.get(c.txn_stream_seq.wrapping_sub(1) as usize)
            {
                prop_assert_eq!((e.lineage, e.seq), (w.lineage, w.state.seq()));
                prop_assert!(e.is_last_part());
            } else {
                prop_assert!(false, "txn_stream_seq {} is no envelope", c.txn_stream_seq);
            }
        }
        Ok(None) => prop_assert!(
            !any_envelope,
            "no history although envelopes were published"
        ),
        Err(r) => {
            prop_assert!(!r.to_string().is_empty());
            if let Refusal::Lost {
                stream_from,
                stream_to,
                ..
            } = r
            {
                prop_assert!(stream_from <= stream_to && *stream_to <= len, "{r}");
            }
        }
    }
    if intact {
        prop_assert!(
            outcome.is_ok(),
            "an intact history was refused: {}",
            outcome.err().map(|r| r.to_string()).unwrap_or_default()
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn recovery_continues_only_at_the_writers_exact_position_and_always_when_intact(
        steps in prop::collection::vec(step(), 0..24),
        pick in pick(),
        damage in damage(),
    ) {
        check(&steps, &pick, &damage)?;
    }
}

/// Repro 2 of issue 11: snapshot at 1, envelope 2, the stream aged out: refused, naming the
/// lost stream sequence and envelope.
#[test]
fn an_aged_out_tail_after_the_snapshot_is_refused_naming_what_was_lost() {
    let l = Lineage([9; 16]);
    let mut s = State::new(l);
    let d1 = s.apply_changes(&[Change::put("a", "1")]);
    s.set_position(l, 1);
    let cut = Cut {
        lineage: l,
        seq: 1,
        stream_seq: 1,
        digest: d1,
    };
    let b = Bounds {
        first_seq: 3,
        last_seq: 2,
        messages: 0,
        bytes: 0,
        first_ts: None,
    };
    let start = Start::Snapshot {
        cut,
        state: Box::new(s),
    };
    assert_eq!(start.read_from(&b), 3);
    let err = decide(start, &b, &[]).expect_err("refused");
    assert!(err.is_lost_history());
    let text = err.to_string();
    assert!(
        text.contains("after envelope 1")
            && text.contains("stream sequence 2 is no longer retained")
            && text.contains("envelopes from 2 on"),
        "{text}"
    );
}
