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

use crate::codec::decode_envelope;
use crate::envelope::Envelope;
use crate::settings::Settings;
use crate::snapshot::Manifest;
use crate::state::{ApplyError, State};
use crate::store::StoreError;
use crate::{names, store};
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
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
        "stream {stream} holds envelopes from sequence {first_seq} of lineage {lineage} but the \
         bucket has no snapshot to start from"
    )]
    NoSnapshot {
        stream: String,
        lineage: String,
        first_seq: u64,
    },
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

/// The newest older snapshot that loads and whose following envelopes are still retained;
/// `None` (replay the stream from its start) when there is none. The stream's first envelope
/// must then be envelope 1, which `recover` checks; otherwise the original error stands.
async fn fallback_snapshot(
    kv: &async_nats::jetstream::kv::Store,
    b: Bounds,
    original: StoreError,
) -> Result<Option<store::Loaded>, HistoryError> {
    let manifests = store::list_manifests(kv).await?;
    for (key, m) in manifests.into_iter().rev() {
        if b.messages > 0 && m.stream_seq + 1 < b.first_seq {
            continue; // its tail is pruned
        }
        match store::load(kv, m).await {
            Ok(l) => {
                tracing::warn!(manifest = %key, "Recovering from an older snapshot");
                return Ok(Some(l));
            }
            Err(e) => tracing::error!(manifest = %key, error = %e, "Snapshot unusable too"),
        }
    }
    if b.messages > 0 && b.first_seq == 1 {
        tracing::warn!("Recovering by replaying the whole stream");
        return Ok(None);
    }
    Err(original.into())
}

/// What recovery found.
#[derive(Debug)]
pub struct Recovered {
    /// The state after the last complete transaction, positioned at the last envelope in
    /// the stream (parts of an abandoned transaction count: the next envelope follows them).
    pub state: State,
    /// The stream sequence of the last message read (envelope or foreign).
    pub last_stream_seq: u64,
    /// The stream sequence of the last envelope read (0 when none).
    pub last_envelope_stream_seq: u64,
    /// The snapshot recovery started from.
    pub manifest: Option<Manifest>,
    /// Messages that were not envelopes.
    pub foreign_messages: u64,
    /// Parts of a transaction the producer never completed.
    pub abandoned_parts: u64,
    /// Envelopes applied after the snapshot.
    pub envelopes_applied: u64,
}

/// Recovers the pipeline's current state: the latest snapshot, then every envelope after it
/// up to the stream's last message at the time of the call. `None` when there is no history
/// at all (no snapshot, no message).
pub async fn recover(
    js: &jetstream::Context,
    settings: &Settings,
) -> Result<Option<Recovered>, HistoryError> {
    let b = bounds(js, settings).await?;
    let kv = store::bucket(js, settings).await?;
    let loaded = match store::load_latest(&kv, settings).await {
        Ok(l) => l,
        Err(
            e @ (StoreError::Corrupt { .. }
            | StoreError::Missing { .. }
            | StoreError::Verify { .. }),
        ) => {
            tracing::error!(error = %e, "The latest snapshot is damaged; recovering from an older snapshot or the stream");
            fallback_snapshot(&kv, b, e).await?
        }
        Err(e) => return Err(e.into()),
    };
    let (mut state, from, manifest) = match loaded {
        Some(l) => (Some(l.state), l.manifest.stream_seq + 1, Some(l.manifest)),
        None if b.messages == 0 => return Ok(None),
        None => (None, b.first_seq, None),
    };
    let mut rec = Recovered {
        state: State::new(Default::default()),
        last_stream_seq: b.last_seq,
        last_envelope_stream_seq: manifest.as_ref().map_or(0, |m| m.stream_seq),
        manifest,
        foreign_messages: 0,
        abandoned_parts: 0,
        envelopes_applied: 0,
    };
    let mut last_env_seq = state.as_ref().map_or(0, State::seq);
    if from <= b.last_seq {
        let mut tail = Tail::open(js, settings, from).await?;
        // The messages up to `last_seq` may have been deleted meanwhile: a quiet stream ends
        // the read instead of waiting forever.
        while let Some(item) = tail.next_within(settings.nats.request_timeout).await {
            let item = item?;
            let caught_up = item.stream_seq >= b.last_seq || item.pending == 0;
            match item.item {
                Classified::Foreign { reason } => {
                    rec.foreign_messages += 1;
                    tracing::error!(stream_seq = item.stream_seq, %reason, "Foreign message in the pipeline's stream, skipped");
                }
                Classified::Envelope(env) => {
                    let s = match &mut state {
                        Some(s) => s,
                        None if env.seq == 1 && env.part == 1 => {
                            state.insert(State::new(env.lineage))
                        }
                        None => {
                            return Err(HistoryError::NoSnapshot {
                                stream: names::stream_name(&settings.pipeline),
                                lineage: env.lineage.to_hex(),
                                first_seq: env.seq,
                            })
                        }
                    };
                    match s.apply(&env) {
                        Ok(_) => {
                            rec.envelopes_applied += 1;
                            last_env_seq = env.seq;
                            rec.last_envelope_stream_seq = item.stream_seq;
                        }
                        Err(ApplyError::Duplicate { .. } | ApplyError::Stale { .. }) => {}
                        Err(source) => {
                            return Err(HistoryError::Broken {
                                stream_seq: item.stream_seq,
                                source,
                            })
                        }
                    }
                }
            }
            if caught_up {
                break;
            }
        }
    }
    let Some(mut state) = state else {
        // Only foreign messages and no snapshot: there is no history.
        return Ok(None);
    };
    if state.has_pending_parts() {
        rec.abandoned_parts = last_env_seq - state.seq();
        tracing::warn!(
            parts = rec.abandoned_parts,
            "The last transaction in the stream is incomplete; it is abandoned"
        );
    }
    let lineage = state.lineage();
    state.set_position(lineage, last_env_seq);
    rec.state = state;
    Ok(Some(rec))
}
