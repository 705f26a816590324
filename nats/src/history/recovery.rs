//! Recovery: the pipeline's current state from the latest snapshot (or an older one of its
//! lineage, or the stream's start) plus every message after it to the stream's last
//! sequence, continued only on the pure verdict of `deltasync_core::recovery` (`Decision`).
//!
//! Talks to the snapshot bucket through `store`'s read side and to the stream through
//! [`read_range`].
//!
//! ## Invariants
//!
//! - Recovery never reuses a sequence number: it hands the pure `decide` every message from
//!   the snapshot's cut to the stream's last sequence ([`read_range`] never ends quietly on a
//!   stall) and continues only on its verdict.

use super::{bounds, read_range, HistoryError};
use crate::store::{self, StoreError};
use async_nats::jetstream;
use deltasync_config::settings::Settings;
use deltasync_core::names;
use deltasync_core::recovery::{Decision, Refusal, Start};
use deltasync_core::snapshot::{Cut, Manifest};
use deltasync_core::state::State;
use std::collections::VecDeque;

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
    /// The state at that snapshot (a copy-on-write clone taken before the envelopes after
    /// it were applied): the base the producer's next snapshot is cut incrementally on.
    pub snapshot_state: Option<State>,
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
                    snapshot_state: snapshot.map(|s| s.1),
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
        let key = deltasync_core::snapshot::manifest_key(m.lineage, m.seq);
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
