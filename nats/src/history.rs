//! Reading a pipeline's history from its stream: following the stream from a position
//! ([`Tail`], [`read_range`]) and recovering the current state from the latest snapshot plus
//! the envelopes after it ([`recover`]). The producer's start-up and every consumer's
//! bootstrap share it. The verdict on what was read is `deltasync_core::recovery`'s pure
//! `decide`; this module only reads.
//!
//! ## Invariants
//!
//! - JetStream never reports that a start position was pruned (an ordered consumer silently
//!   starts at the first surviving message), so [`Tail`] checks the first delivered stream
//!   sequence against the one asked for and reports [`HistoryError::Pruned`].
//! - Recovery never reuses a sequence number: it hands the pure `decide` every message from
//!   the snapshot's cut to the stream's last sequence ([`read_range`] never ends quietly on a
//!   stall) and continues only on its verdict.

use crate::store::{self, StoreError};
use async_nats::jetstream::{self, consumer};
use deltasync_config::settings::Settings;
use deltasync_core::names;
use deltasync_core::recovery::{classify, Classified, Cut, Decision, Refusal, Start};
use deltasync_core::retention::StreamBounds as Bounds;
use deltasync_core::snapshot::Manifest;
use deltasync_core::state::{ApplyError, State};
use futures::StreamExt;
use std::collections::VecDeque;
use std::time::Duration;

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

/// Reads the stream's bounds.
pub async fn bounds(js: &jetstream::Context, settings: &Settings) -> Result<Bounds, HistoryError> {
    crate::connect::stream_bounds(js, settings)
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
