//! The follower against a simple model, through hostile histories: gaps, re-deliveries,
//! forks (sequences reused at later stream positions), pruned starts, deleted tails, lineage
//! switches, lineage-start markers (matching the replica's state, of the empty state, or of a
//! state the replica lacks), partial and abandoned multi-part transactions, foreign and undecodable messages,
//! streams recreated behind the bucket, and restarts from the local cursor.
//!
//! Talks to nothing: a small driver plays the engine (a reader over a `Vec` stream, a bucket
//! with one latest snapshot) and carries out every step the follower returns.
//!
//! ## Invariants checked
//!
//! - Never twice: every applied transaction follows the previous one (its `prev_seq` is the
//!   replica's sequence, its stream position is later), and the replica's entries always equal
//!   a `BTreeMap` model that applies exactly the transactions reported.
//! - Never a silent skip: an envelope is skipped only at a stream position already accounted
//!   for, or when the replica's own history holds that very envelope (same digest).
//! - Ends equal: when the bucket's snapshot and the stream after it hold the whole remaining
//!   history, the replica ends equal to the producer's final state; otherwise it may end
//!   behind or refuse, never ahead on another history.
//! - A reader is never reopened when the stream holds nothing after its position.
//! - A new lineage is adopted without a snapshot only when the replica's entries equal the
//!   producer's state after its first envelope (a marker whose digest the replica's state
//!   does not give is never adopted: the replica re-snapshots).
//!
//! Cases: 256 by default (a few seconds); `PROPTEST_CASES=20000` for a long run.

use super::*;
use deltasync_core::recovery::classify;
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};

const L1: Lineage = Lineage([1; 16]);
const L2: Lineage = Lineage([2; 16]);
/// The lineage a lineage-start marker starts.
const LM: Lineage = Lineage([3; 16]);

/// Re-snapshot attempts before the driver gives up (the engine's `resync_max_attempts`).
const MAX_ATTEMPTS: u32 = 4;

#[derive(Clone, Debug)]
enum Msg {
    Env(Envelope),
    Foreign,
    Undecodable,
}

/// A snapshot the producer could have written.
#[derive(Clone, Debug)]
struct Snap {
    cursor: Position,
    state: State,
    /// seq → digest of every envelope of the history up to it (its lineage).
    ancestry: HashMap<u64, Digest>,
    /// How many envelopes of the authoritative list it covers.
    covers: usize,
}

/// A generated transaction: changes (key index, value or delete) and parts.
#[derive(Clone, Debug)]
struct TxnSpec {
    changes: Vec<(u8, Option<u8>)>,
    parts: u32,
}

#[derive(Clone, Debug)]
struct Plan {
    txns: Vec<TxnSpec>,
    /// Index of the first transaction of lineage L2 (the rest are L1).
    switch_at: Option<usize>,
    /// A lineage-start marker (lineage LM, envelope 1, no changes) before transaction `at`,
    /// as `producer new-lineage` publishes it: of the state so far (kind 0, keep-state), of
    /// the empty state (kind 1, empty), or of the state so far plus a change never published
    /// (kind 2: a state the replica lacks; only its snapshot at the marker has it).
    marker: Option<(usize, u8)>,
    /// Fork: after authoritative transaction `at` (of the last lineage), orphans are
    /// published, then the history goes on reusing their sequences.
    fork: Option<(usize, Vec<TxnSpec>)>,
    /// An abandoned transaction before transaction `at`: `published` of `parts` parts.
    abandon: Option<(usize, u32)>,
    /// Per slot: foreign/undecodable messages before each envelope (0, 1 = foreign, 2 = bad).
    noise: Vec<u8>,
    /// Stream positions deleted (as fractions of the length, per mille).
    deletes: Vec<u16>,
    /// Pruned prefix (per mille of the length).
    prune: u16,
    /// Foreign messages appended then deleted (a deleted tail).
    deleted_tail: u8,
    /// Which snapshot the bucket holds (index into candidates, modulo).
    snap_pick: u16,
    /// Prefix of the undamaged stream the replica read before the damage (per mille).
    phase1: u16,
    /// Whether the replica restarts from its cursor before phase 2.
    restart: bool,
    /// Whether the stream is recreated (positions from 1) behind the bucket in phase 2,
    /// holding only the history after the snapshot.
    recreate: bool,
    /// Re-delivery choices (per delivered message: 0 = none, else go back that far and
    /// deliver again from there).
    redeliver: Vec<u8>,
}

fn key(k: u8) -> String {
    format!("k{k}")
}

fn to_changes(spec: &[(u8, Option<u8>)]) -> Vec<Change> {
    spec.iter()
        .map(|&(k, v)| match v {
            Some(v) => Change::put(key(k), vec![v]),
            None => Change::delete(key(k)),
        })
        .collect()
}

/// The producer side: builds the stream layout and the authoritative history.
struct Builder {
    stream: Vec<Msg>,
    /// Stream indices (0-based) of the authoritative envelopes, in order.
    auth: Vec<usize>,
    state: State,
    seq: u64,
    ancestry: HashMap<u64, Digest>,
    snaps: Vec<Snap>,
    noise: std::vec::IntoIter<u8>,
    /// Stream index where the history goes on after orphans.
    fork_start: Option<usize>,
    /// The orphans' (lineage, seq, digest).
    orphans: Vec<(Lineage, u64, Digest)>,
    /// Per envelope 1 (one part) published, orphans included: the producer's entries after it.
    starts: HashMap<(Lineage, Digest), BTreeMap<String, Vec<u8>>>,
    /// Index in `auth` and stream index of a marker the replica's history cannot give.
    lacking_marker: Option<(usize, usize)>,
    /// Index in `auth` of the marker.
    marker_auth: Option<usize>,
}

impl Builder {
    fn push(&mut self, m: Msg) -> usize {
        self.stream.push(m);
        self.stream.len() - 1
    }

    fn noise(&mut self) {
        match self.noise.next().unwrap_or(0) % 4 {
            1 => {
                self.push(Msg::Foreign);
            }
            2 => {
                self.push(Msg::Undecodable);
            }
            _ => {}
        }
    }

    /// The envelopes of one transaction on the current state (which it advances).
    fn envelopes(&mut self, t: &TxnSpec) -> Vec<Envelope> {
        let changes = to_changes(&t.changes);
        let digest = self.state.apply_changes(&changes);
        let parts = t.parts.max(1);
        let per = changes.len().div_ceil(parts as usize).max(1);
        let mut chunks: Vec<Vec<Change>> = changes.chunks(per).map(<[Change]>::to_vec).collect();
        chunks.resize(parts as usize, Vec::new());
        let lineage = self.state.lineage();
        let first = self.seq + 1;
        let envs: Vec<Envelope> = chunks
            .into_iter()
            .enumerate()
            .map(|(i, c)| Envelope {
                lineage,
                seq: first + i as u64,
                part: i as u32 + 1,
                parts,
                digest,
                produced_at_ms: 0,
                changes: c,
            })
            .collect();
        self.seq = first + u64::from(parts) - 1;
        let lineage = self.state.lineage();
        self.state.set_position(lineage, self.seq);
        if first == 1 && parts == 1 {
            self.starts.insert((lineage, digest), entries(&self.state));
        }
        envs
    }

    /// Publishes a lineage-start marker of kind `kind` (see [`Plan::marker`]) and records the
    /// new lineage's snapshot at it.
    fn marker(&mut self, kind: u8) {
        match kind % 3 {
            1 => self.state = State::new(LM),
            2 => {
                let _ = self
                    .state
                    .apply_changes(&[Change::put("hidden", &b"h"[..])]);
            }
            _ => {}
        }
        let digest = self.state.digest();
        self.state.set_position(LM, 1);
        self.seq = 1;
        self.ancestry.clear();
        self.ancestry.insert(1, digest);
        self.starts.insert((LM, digest), entries(&self.state));
        self.noise();
        let i = self.push(Msg::Env(Envelope {
            lineage: LM,
            seq: 1,
            part: 1,
            parts: 1,
            digest,
            produced_at_ms: 0,
            changes: Vec::new(),
        }));
        self.auth.push(i);
        self.marker_auth = Some(self.auth.len() - 1);
        if kind % 3 == 2 {
            self.lacking_marker = Some((self.auth.len() - 1, i));
        }
        self.snap();
    }

    /// Publishes an authoritative transaction and records the snapshot after it.
    fn txn(&mut self, t: &TxnSpec) {
        for e in self.envelopes(t) {
            self.noise();
            self.ancestry.insert(e.seq, e.digest);
            let i = self.push(Msg::Env(e));
            self.auth.push(i);
        }
        self.snap();
    }

    fn snap(&mut self) {
        let stream_seq = self.auth.last().map_or(0, |&i| i as u64 + 1);
        self.snaps.push(Snap {
            cursor: Position {
                lineage: self.state.lineage(),
                seq: self.seq,
                stream_seq,
                digest: self.state.digest(),
            },
            state: self.state.clone(),
            ancestry: self.ancestry.clone(),
            covers: self.auth.len(),
        });
    }
}

/// A generated scenario.
struct Scenario {
    /// Phase 1: the undamaged prefix the replica reads first.
    phase1: Vec<Msg>,
    /// Phase 2: the stream (None = deleted or pruned), positions from 1.
    stream: Vec<Option<Msg>>,
    snap: Snap,
    /// The snapshot's stream position as its manifest records it (before any rebase).
    snap_stream_seq: u64,
    final_state: State,
    final_seq: u64,
    /// Whether the snapshot and the stream after it hold the whole remaining history.
    recoverable: bool,
    /// Orphan envelopes that differ from the authoritative one at their sequence.
    orphans: Vec<(Lineage, u64, Digest)>,
    /// Per envelope 1 (one part) published, orphans included: the producer's entries after it.
    starts: HashMap<(Lineage, Digest), BTreeMap<String, Vec<u8>>>,
}

fn build(p: &Plan) -> Scenario {
    let mut b = Builder {
        stream: Vec::new(),
        auth: Vec::new(),
        state: State::new(L1),
        seq: 0,
        ancestry: HashMap::new(),
        snaps: Vec::new(),
        noise: p.noise.clone().into_iter(),
        fork_start: None,
        orphans: Vec::new(),
        starts: HashMap::new(),
        lacking_marker: None,
        marker_auth: None,
    };
    b.snap();
    for (i, t) in p.txns.iter().enumerate() {
        if let Some((at, kind)) = p.marker {
            if at == i {
                b.marker(kind);
            }
        }
        if p.switch_at == Some(i) {
            // A new lineage: its producer writes its snapshot at sequence 0 before publishing,
            // which replaces every snapshot of the old one.
            b.state = State::new(L2);
            b.seq = 0;
            b.ancestry.clear();
            b.snaps.clear();
            b.snap();
        }
        if let Some((at, published)) = p.abandon {
            if at == i {
                let spec = TxnSpec {
                    changes: vec![(0, Some(99)), (1, Some(98)), (2, Some(97))],
                    parts: published + 1,
                };
                let (saved_state, saved_seq) = (b.state.clone(), b.seq);
                let envs = b.envelopes(&spec);
                // The producer crashed after `published` parts: the transaction never happened,
                // the history goes on after its parts.
                for e in envs.into_iter().take(published as usize) {
                    b.noise();
                    b.ancestry.insert(e.seq, e.digest);
                    let i = b.push(Msg::Env(e));
                    b.auth.push(i);
                }
                b.state = saved_state;
                b.seq = saved_seq + u64::from(published);
                let lineage = b.state.lineage();
                b.state.set_position(lineage, b.seq);
            }
        }
        if let Some((at, orphans)) = &p.fork {
            if *at == i {
                // Orphans: published from this point, then lost to the producer (aged out,
                // purged, a read that stalled), which goes on from here reusing their
                // sequences.
                let saved = (b.state.clone(), b.seq, b.ancestry.clone());
                for o in orphans {
                    for e in b.envelopes(o) {
                        b.noise();
                        b.orphans.push((e.lineage, e.seq, e.digest));
                        b.push(Msg::Env(e));
                    }
                }
                (b.state, b.seq, b.ancestry) = saved;
                b.fork_start = Some(b.stream.len());
            }
        }
        b.txn(t);
    }
    let authoritative: std::collections::HashSet<(Lineage, u64, Digest)> = b
        .auth
        .iter()
        .filter_map(|&i| match &b.stream[i] {
            Msg::Env(e) => Some((e.lineage, e.seq, e.digest)),
            _ => None,
        })
        .collect();
    let orphans: Vec<_> = b
        .orphans
        .iter()
        .filter(|o| !authoritative.contains(o))
        .copied()
        .collect();
    let final_state = b.state.clone();
    let final_seq = b.snaps.last().map_or(0, |s| s.cursor.seq);
    let len = b.stream.len();
    // The replica reads an undamaged prefix first, ending before the history goes on after
    // orphans (past that point the undamaged stream itself forks), and before a marker of a
    // state it lacks (only the bucket's snapshot holds that state).
    let phase1_len = (len * usize::from(p.phase1) / 1000)
        .min(b.fork_start.unwrap_or(len))
        .min(b.lacking_marker.map_or(len, |(_, i)| i));
    let phase1 = b.stream[..phase1_len].to_vec();

    // The bucket's snapshot.
    let snap = b.snaps[usize::from(p.snap_pick) % b.snaps.len()].clone();

    // Phase 2's stream.
    let mut stream: Vec<Option<Msg>>;
    let mut auth_pos: Vec<usize>; // 0-based positions of the authoritative envelopes
    let mut snap = snap;
    if p.recreate {
        // Recreated behind the bucket: the producer continued from the snapshot in a new
        // stream (positions from 1).
        stream = Vec::new();
        auth_pos = vec![usize::MAX; snap.covers];
        for &i in &b.auth[snap.covers..] {
            stream.push(Some(b.stream[i].clone()));
            auth_pos.push(stream.len() - 1);
        }
    } else {
        stream = b.stream.iter().cloned().map(Some).collect();
        auth_pos = b.auth.clone();
        let prune = len * usize::from(p.prune) / 1000;
        for m in stream.iter_mut().take(prune) {
            *m = None;
        }
        for d in &p.deletes {
            let i = len * usize::from(*d) / 1000;
            if i < len {
                stream[i] = None;
            }
        }
    }
    for _ in 0..p.deleted_tail {
        stream.push(None);
    }
    // What the engine does with the snapshot's position (rebased behind a recreated stream).
    let bounds = bounds_of(&stream);
    let snap_stream_seq = snap.cursor.stream_seq;
    snap.cursor = Follower::snapshot_cursor(snap.cursor, bounds);

    // Recoverable: the envelopes after the snapshot's position are exactly the authoritative
    // ones after it, and the last one survives (a deleted last envelope is noticed only when
    // another follows it). A snapshot of the old lineage before a keep-state marker stays
    // recoverable (the marker's own snapshot never landed): a replica that missed old
    // envelopes before the marker takes that snapshot when it is ahead of it, then adopts
    // the marker in place.
    let after: Vec<usize> = (snap.cursor.stream_seq as usize..stream.len())
        .filter(|&i| matches!(stream[i], Some(Msg::Env(_))))
        .collect();
    let recoverable = after == auth_pos[snap.covers..]
        && b.lacking_marker.is_none_or(|(k, _)| snap.covers > k)
        // A replica that adopted the marker's lineage and then finds the stream recreated
        // behind it wants a snapshot of that lineage: it refuses an older one of the old
        // lineage (the marker's own snapshot replaces it as `latest` right after the marker).
        && !(p.recreate && b.marker_auth.is_some_and(|k| snap.covers <= k))
        && auth_pos
            .last()
            .is_none_or(|&i| i != usize::MAX && matches!(stream[i], Some(Msg::Env(_))));
    Scenario {
        phase1,
        stream,
        snap,
        snap_stream_seq,
        final_state,
        final_seq,
        recoverable,
        orphans,
        starts: b.starts,
    }
}

fn bounds_of(stream: &[Option<Msg>]) -> Bounds {
    let last_seq = stream.len() as u64;
    let first_seq = stream
        .iter()
        .position(Option::is_some)
        .map_or(last_seq + 1, |i| i as u64 + 1);
    Bounds {
        first_seq,
        last_seq,
        messages: stream.iter().filter(|m| m.is_some()).count() as u64,
    }
}

fn classified(m: &Msg) -> Classified {
    match m {
        Msg::Env(e) => Classified::Envelope(e.clone()),
        Msg::Foreign => Classified::Foreign {
            reason: "a foreign message".into(),
        },
        Msg::Undecodable => classify(b"\x00not an envelope"),
    }
}

fn entries(s: &State) -> BTreeMap<String, Vec<u8>> {
    s.iter().map(|(k, v)| (k.to_owned(), v.to_vec())).collect()
}

/// How a run ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Idle,
    Refused(Reason),
}

/// The driver: plays the engine around the follower, checking the invariants as it goes.
struct Driver {
    f: Follower,
    /// The model: the entries the reported steps lead to.
    model: BTreeMap<String, Vec<u8>>,
    /// seq → digest of the replica's own history (its lineage).
    ancestry: HashMap<u64, Digest>,
    stream: Vec<Option<Msg>>,
    snap: Snap,
    snap_stream_seq: u64,
    redeliver: std::vec::IntoIter<u8>,
    resyncs: Vec<Reason>,
    attempts: u32,
    /// The replica's position as the reported steps lead to (sequence, stream sequence).
    at: (u64, u64),
    /// Per envelope 1 (one part) published, orphans included: the producer's entries after it.
    starts: HashMap<(Lineage, Digest), BTreeMap<String, Vec<u8>>>,
    /// Whether the stream was recreated behind the replica (phase 2 of a `recreate` plan).
    recreated: bool,
}

impl Driver {
    fn restore(&mut self, state: State, cursor: Position, ancestry: HashMap<u64, Digest>) {
        self.model = entries(&state);
        self.ancestry = ancestry;
        self.at = (cursor.seq, cursor.stream_seq);
        self.f.restore(state, cursor);
    }

    fn bounds(&self) -> Bounds {
        bounds_of(&self.stream)
    }

    /// Re-snapshots from the bucket; `Err` when it cannot (the engine retries, then fails).
    fn resync(&mut self, reason: Reason, want: Option<Lineage>) -> Result<(), End> {
        self.resyncs.push(reason);
        let at = Position {
            stream_seq: self.snap_stream_seq,
            ..self.snap.cursor
        };
        loop {
            self.attempts += 1;
            if self.attempts > MAX_ATTEMPTS {
                return Err(End::Refused(reason));
            }
            // The bucket's snapshot never changes here: a refused one is refused again until
            // the last attempt, which takes one not past a hole.
            match self
                .f
                .snapshot_acceptable(&at, want, self.attempts == MAX_ATTEMPTS)
            {
                Ok(()) => break,
                Err(Refusal::NotAhead { .. }) => continue,
                Err(Refusal::OtherLineage) => return Err(End::Refused(reason)),
            }
        }
        let snap = self.snap.clone();
        self.restore(snap.state, snap.cursor, snap.ancestry);
        Ok(())
    }

    /// Carries out a step about message `m` at `pos`; returns where to read next.
    fn step(
        &mut self,
        step: Step,
        pos: u64,
        m: Option<&Msg>,
        accepted_before: u64,
    ) -> Result<Option<u64>, End> {
        match step {
            Step::Applied(txn) => {
                prop_assert_like(
                    txn.prev_seq == self.at.0,
                    "applied on the replica's position",
                );
                prop_assert_like(txn.cursor.seq > txn.prev_seq, "a transaction moves forward");
                prop_assert_like(pos > accepted_before, "a message is applied once");
                prop_assert_like(pos > self.at.1, "a transaction's stream position is new");
                self.at = (txn.cursor.seq, txn.cursor.stream_seq);
                let batch = txn.batch.expect("kept");
                for c in &batch.changes {
                    match c {
                        Change::Put { key, value } => {
                            self.model.insert(key.to_string(), value.to_vec());
                        }
                        Change::Delete { key } => {
                            self.model.remove(&key.to_string());
                        }
                    }
                }
                if let Some(Msg::Env(e)) = m {
                    // The parts of the transaction are the replica's history now.
                    for s in e.seq + 1 - u64::from(e.parts)..=e.seq {
                        self.ancestry.insert(s, e.digest);
                    }
                }
                assert_eq!(
                    entries(self.f.state()),
                    self.model,
                    "the replica equals the model"
                );
                if self.f.progressed() {
                    self.attempts = 0;
                }
                Ok(None)
            }
            Step::Buffered | Step::Foreign { .. } => Ok(None),
            Step::Skipped { seq, .. } => {
                let Some(Msg::Env(e)) = m else {
                    panic!("skipped a message that is not an envelope")
                };
                let known = self.ancestry.get(&seq) == Some(&e.digest)
                    && e.lineage == self.f.applied().lineage;
                assert!(
                    pos <= accepted_before || known,
                    "envelope {seq} at stream position {pos} was skipped silently (accepted up to {accepted_before})"
                );
                Ok(None)
            }
            Step::Reread { from, .. } => Ok(Some(from)),
            Step::Resync { reason, want, .. } => {
                let (lineage, before) = (self.f.applied().lineage, self.at.0);
                let accepted_at = self.f.accepted_stream_seq() as usize;
                if let Some(at) = self.f.hole_to_confirm() {
                    let found = self.stream[at as usize - 1].as_ref().map(classified);
                    self.f.confirm_hole(found.as_ref());
                }
                self.resync(reason, want)?;
                // The stream kept the last envelope the replica accepted where it read it, so
                // it holds nothing the replica lacks before that position.
                let in_place = !self.recreated
                    && accepted_at > 0
                    && self
                        .stream
                        .get(accepted_at - 1)
                        .is_some_and(Option::is_some);
                if matches!(reason, Reason::Gap | Reason::Pruned) && in_place {
                    // The replica was verified and lacks only what the stream lost: a
                    // snapshot that would take it back is refused, never loaded.
                    prop_assert_like(
                        self.f.applied().lineage != lineage
                            || self.at.0 >= before
                            || self.attempts == MAX_ATTEMPTS,
                        "a re-snapshot for a hole in a stream never recreated moves the replica \
                         back only at its last attempt",
                    );
                }
                Ok(Some(self.f.resume_from()))
            }
            Step::LineageChange { env, stream_seq } => {
                let pointer = Some(self.snap.cursor.lineage);
                match self.f.lineage_plan(&env, stream_seq, pointer, true) {
                    LineagePlan::Adopted { reason, txn } => {
                        self.resyncs.push(reason);
                        assert_eq!(
                            Some(&entries(self.f.state())),
                            self.starts.get(&(env.lineage, env.digest)),
                            "a lineage is adopted only from the producer's state at its start"
                        );
                        assert_eq!((txn.cursor.seq, txn.cursor.stream_seq), (1, stream_seq));
                        prop_assert_like(
                            txn.prev_seq == self.at.0,
                            "adopted from the replica's position",
                        );
                        for c in &txn.batch.expect("kept").changes {
                            match c {
                                Change::Put { key, value } => {
                                    self.model.insert(key.to_string(), value.to_vec());
                                }
                                Change::Delete { key } => {
                                    self.model.remove(&key.to_string());
                                }
                            }
                        }
                        assert_eq!(
                            entries(self.f.state()),
                            self.model,
                            "the replica equals the model"
                        );
                        self.at = (1, stream_seq);
                        self.ancestry = HashMap::from([(1, env.digest)]);
                        if self.f.progressed() {
                            self.attempts = 0;
                        }
                        Ok(None)
                    }
                    LineagePlan::StartFromFirst { reason } => {
                        self.resyncs.push(reason);
                        self.restore(
                            State::new(env.lineage),
                            crate::follower::lineage_start(env.lineage, stream_seq - 1),
                            HashMap::new(),
                        );
                        let before = self.f.accepted_stream_seq();
                        let step = self.f.on_message(
                            stream_seq,
                            1,
                            Classified::Envelope(env.clone()),
                            true,
                        );
                        match step {
                            s @ (Step::Applied(_) | Step::Buffered) => {
                                if let Step::Buffered = s {
                                    self.ancestry.insert(env.seq, env.digest);
                                }
                                self.step(s, stream_seq, Some(&Msg::Env(env)), before)?;
                                Ok(None)
                            }
                            _ => {
                                self.resync(reason, Some(env.lineage))?;
                                Ok(Some(self.f.resume_from()))
                            }
                        }
                    }
                    LineagePlan::Resync { reason, want } => {
                        self.resync(reason, want)?;
                        Ok(Some(self.f.resume_from()))
                    }
                }
            }
        }
    }

    /// Reads from `from` until nothing is left; `Err` when the replica gives up.
    fn follow(&mut self, mut from: u64) -> Result<End, End> {
        let mut budget = 20_000;
        let mut opened = true; // the first message delivered is checked against `from`
        loop {
            budget -= 1;
            assert!(budget > 0, "the follower loops");
            let next =
                (from.max(1) as usize - 1..self.stream.len()).find(|&i| self.stream[i].is_some());
            let Some(i) = next else {
                // Nothing to read: ticks, with the reader silent for long.
                let b = self.bounds();
                match self.f.on_bounds(b, READER_STALL * 2, false) {
                    Tick::Continue => return Ok(End::Idle),
                    Tick::Probe { from: probe_from } => {
                        let found = (probe_from.max(1) as usize - 1..self.stream.len())
                            .find(|&i| self.stream[i].is_some())
                            .map(|i| i as u64 + 1);
                        let t = self.f.on_probe(probe_from, b.last_seq, found, false);
                        assert_eq!(
                            t,
                            Tick::Continue,
                            "a reader with nothing to read is not reopened"
                        );
                        // A second tick: still quiet, no probe.
                        assert_eq!(self.f.on_bounds(b, READER_STALL * 2, false), Tick::Continue);
                        return Ok(End::Idle);
                    }
                    Tick::Resync { reason, .. } => {
                        self.resync(reason, None)?;
                        from = self.f.resume_from();
                        opened = true;
                        continue;
                    }
                    t => panic!("unexpected tick {t:?} with nothing to read"),
                }
            };
            let pos = i as u64 + 1;
            if opened && pos > from.max(1) {
                // Tail reports the skipped start; the engine asks the follower.
                opened = false;
                let step = self.f.on_lost(from, pos, Some(self.bounds().first_seq));
                if let Some(f) = self.step(step, pos, None, self.f.accepted_stream_seq())? {
                    from = f;
                    opened = true;
                }
                continue;
            }
            opened = false;
            let pending = self.stream[i + 1..].iter().filter(|m| m.is_some()).count() as u64;
            let m = self.stream[i].clone().expect("present");
            let before = self.f.accepted_stream_seq();
            let step = self.f.on_message(pos, pending, classified(&m), true);
            if let (Step::Buffered, Msg::Env(e)) = (&step, &m) {
                self.ancestry.insert(e.seq, e.digest);
            }
            match self.step(step, pos, Some(&m), before)? {
                Some(f) => {
                    from = f;
                    opened = true;
                }
                None => {
                    from = pos + 1;
                    // Sometimes the reader goes back and delivers earlier positions again.
                    let back = self.redeliver.next().unwrap_or(0);
                    if back > 0 && u64::from(back) < pos {
                        from = pos - u64::from(back);
                    }
                }
            }
        }
    }
}

/// An assertion inside the driver (panics: proptest reports and shrinks it).
fn prop_assert_like(cond: bool, what: &str) {
    assert!(cond, "{what}");
}

fn run(p: &Plan) -> Result<(), TestCaseError> {
    let sc = build(p);
    let start = Snap {
        cursor: Position {
            lineage: L1,
            ..Position::default()
        },
        state: State::new(L1),
        ancestry: HashMap::new(),
        covers: 0,
    };
    // Phase 1: bootstrap from the empty snapshot, read the undamaged prefix.
    let mut d = Driver {
        f: Follower::new(),
        model: BTreeMap::new(),
        ancestry: HashMap::new(),
        stream: sc.phase1.iter().cloned().map(Some).collect(),
        snap: start.clone(),
        snap_stream_seq: 0,
        redeliver: p.redeliver.clone().into_iter(),
        resyncs: Vec::new(),
        attempts: 0,
        at: (0, 0),
        starts: sc.starts.clone(),
        recreated: false,
    };
    d.restore(start.state.clone(), start.cursor, HashMap::new());
    let end = d.follow(1);
    prop_assert_eq!(end, Ok(End::Idle), "the undamaged prefix is followed");
    prop_assert!(
        d.resyncs.iter().all(|r| *r == Reason::LineageChanged),
        "no resync on an undamaged prefix but lineage switches: {:?}",
        d.resyncs
    );

    // Phase 2: the damage, the bucket's snapshot, maybe a restart.
    // Whether the replica holds (applied or buffered) an envelope of the orphaned branch.
    let lineage = d.f.state().lineage();
    let on_orphan = sc
        .orphans
        .iter()
        .any(|(l, s, dg)| *l == lineage && d.ancestry.get(s) == Some(dg));
    // (A restart judges the bucket's lineage first: a newer lineage there is reason enough.)
    let undamaged = p.deletes.is_empty()
        && p.prune == 0
        && !p.recreate
        && !(p.restart && sc.snap.cursor.lineage != lineage);
    let phase1_resyncs = d.resyncs.len();
    d.stream = sc.stream.clone();
    d.recreated = p.recreate;
    d.snap = sc.snap.clone();
    d.snap_stream_seq = sc.snap_stream_seq;
    let mut from = d.f.resume_from();
    // A replica cannot notice a stream recreated behind it until the new stream holds an
    // envelope after its position or ends before it, or (at a restart) holds another message
    // at its cursor's position.
    let pos = if p.restart {
        d.f.applied().stream_seq
    } else {
        d.f.accepted_stream_seq()
    };
    let blind = p.recreate
        && d.stream.len() as u64 >= pos
        && !d.stream[pos as usize..]
            .iter()
            .any(|m| matches!(m, Some(Msg::Env(_))))
        && (!p.restart
            || d.f.applied().seq == 0
            || pos == 0
            || d.stream[pos as usize - 1].is_none());
    if p.restart {
        let c = d.f.applied();
        let state = {
            let mut s = d.f.state().clone();
            s.set_position(c.lineage, c.seq); // buffered parts are not stored
            s
        };
        let ancestry = d.ancestry.clone();
        d.f = Follower::new();
        d.restore(state, c, ancestry);
        let b = d.bounds();
        let continuity = match Follower::judge(&c, Some(d.snap.cursor.lineage), b) {
            Judge::Decided(c, _) => c,
            Judge::NeedCursorMessage { at } => {
                let found = d.stream[at as usize - 1].as_ref().map(classified);
                Follower::judge_cursor_message(&c, found.as_ref()).0
            }
            Judge::NeedFirstEnvelope { from } => {
                let first = (from as usize - 1..d.stream.len()).find_map(|i| match &d.stream[i] {
                    Some(Msg::Env(e)) => Some((i as u64 + 1, e.clone())),
                    _ => None,
                });
                Follower::judge_first(&c, b, first.as_ref().map(|(s, e)| (*s, e))).0
            }
        };
        let reason = match continuity {
            Continuity::Continues => None,
            Continuity::Pruned => Some(Reason::Pruned),
            Continuity::LineageChanged => Some(Reason::LineageChanged),
            Continuity::Fork => Some(Reason::Fork),
        };
        if let Some(r) = reason {
            if let Err(e) = d.resync(r, None) {
                prop_assert!(!sc.recoverable, "refused ({e:?}) although recoverable");
                return Ok(());
            }
        }
        from = d.f.resume_from();
    }
    let ended = d.follow(from);
    if on_orphan && undamaged {
        // The history goes on reusing the orphans' sequences later in the stream.
        prop_assert_eq!(
            d.resyncs.get(phase1_resyncs).copied(),
            Some(Reason::Fork),
            "a replica on the orphaned branch re-snapshots for a fork first: {:?}",
            d.resyncs
        );
    }
    match ended {
        Ok(End::Idle) => {
            if sc.recoverable && !blind {
                let applied = d.f.applied();
                prop_assert_eq!(
                    entries(d.f.state()),
                    entries(&sc.final_state),
                    "ends equal to the producer (resyncs {:?})",
                    d.resyncs
                );
                prop_assert_eq!(applied.lineage, sc.final_state.lineage());
                prop_assert_eq!(applied.seq, sc.final_seq);
            }
        }
        Ok(e) | Err(e) => {
            prop_assert!(
                !sc.recoverable,
                "refused ({e:?}) although recoverable; resyncs {:?}",
                d.resyncs
            );
        }
    }
    Ok(())
}

fn txn_spec() -> impl Strategy<Value = TxnSpec> {
    (
        prop::collection::vec((0u8..4, prop::option::weighted(0.8, 0u8..6)), 0..4),
        1u32..=3,
    )
        .prop_map(|(changes, parts)| TxnSpec { changes, parts })
}

fn plan() -> impl Strategy<Value = Plan> {
    let history = (
        prop::collection::vec(txn_spec(), 0..9),
        prop::option::weighted(0.25, 0usize..9),
        prop::option::weighted(0.3, (0usize..9, 0u8..3)),
        prop::option::weighted(0.4, (0usize..9, prop::collection::vec(txn_spec(), 1..3))),
        prop::option::weighted(0.2, (0usize..9, 1u32..3)),
        prop::collection::vec(0u8..8, 0..24),
    );
    let damage = (
        prop::collection::vec(0u16..1000, 0..3),
        prop_oneof![3 => Just(0u16), 1 => 0u16..1000],
        0u8..3,
        any::<u16>(),
        0u16..=1000,
        any::<bool>(),
        prop::bool::weighted(0.15),
        prop::collection::vec(prop_oneof![6 => Just(0u8), 1 => 1u8..4], 1..8),
    );
    (history, damage).prop_map(
        |(
            (txns, switch_at, marker, fork, abandon, noise),
            (deletes, prune, deleted_tail, snap_pick, phase1, restart, recreate, redeliver),
        )| Plan {
            txns,
            switch_at,
            marker,
            fork,
            abandon,
            noise,
            deletes,
            prune,
            deleted_tail,
            snap_pick,
            phase1,
            restart,
            recreate,
            redeliver,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_follower_never_applies_twice_never_skips_silently_and_ends_equal_to_the_model(p in plan()) {
        run(&p)?;
    }
}
