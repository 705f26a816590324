//! The stream reader: a pipeline's stream followed in order from a stream sequence
//! ([`Tail`]), read completely between two positions ([`read_range`]), and its bounds
//! ([`bounds`]). Each message comes classified (`deltasync_core::codec::classify`).
//!
//! Talks to JetStream: the pipeline's stream (info, an ordered pull consumer per reader).
//!
//! ## Invariants
//!
//! - JetStream never reports that a start position was pruned (an ordered consumer silently
//!   starts at the first surviving message), so [`Tail`] checks the first delivered stream
//!   sequence against the one asked for and reports [`HistoryError::Pruned`].
//! - [`read_range`] never ends quietly on a stall: it proves it read to the position asked
//!   for or fails naming where it stopped.

use super::HistoryError;
use async_nats::jetstream::{self, consumer};
use deltasync_config::settings::Settings;
use deltasync_core::codec::{classify, Classified};
use deltasync_core::names;
use deltasync_core::retention::StreamBounds as Bounds;
use futures::StreamExt;
use std::time::Duration;

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
