//! Everything the consumer says to NATS itself: connecting, the pipeline's stream and bucket
//! handles, the two one-message stream probes the engine needs, the operator commands'
//! stream reader (`nats/reader.rs`) and the replica's position marker (`nats/marker.rs`).
//! The other modules hold only the handles named here and read the stream and the bucket
//! through `deltasync_nats`; this is the only module of the crate that names async-nats
//! (except `ops::status`'s consumer listing, left to the pipeline-status work).
//!
//! Talks to NATS JetStream. The probes and the reader are stream reads that belong in
//! `deltasync_nats::history`; they are written here while that crate's layout was moved.

pub mod marker;
pub mod reader;

use bytes::Bytes;
use deltasync_config::settings::Settings;
use deltasync_core::names;
use deltasync_nats::NatsError;

/// The pipeline's snapshot bucket.
pub use async_nats::jetstream::kv::Store as Bucket;
/// The JetStream context of a connection (stream, consumers, buckets).
pub use async_nats::jetstream::Context as JetStream;
/// A connection to the NATS server.
pub use async_nats::Client;
/// async-nats's catch-all error (consumer listing and deletion).
pub use async_nats::Error as ClientError;
/// A handle on the pipeline's stream (for `deltasync_nats::position_headroom`).
pub type Stream = async_nats::jetstream::stream::Stream<()>;

/// Connects as `nats` settings say and opens JetStream on the connection.
pub async fn connect(settings: &Settings) -> Result<(Client, JetStream), NatsError> {
    let client = deltasync_nats::connect(&settings.nats).await?;
    let js = deltasync_nats::jetstream(client.clone(), &settings.nats);
    Ok((client, js))
}

/// Flushes and closes the connection; a failure is only logged (the work is committed).
pub async fn drain(client: Client) {
    if let Err(e) = client.drain().await {
        tracing::debug!(error = %e, "Draining the NATS connection failed");
    }
}

/// A handle on the pipeline's stream without fetching its info; `None` when it cannot be had
/// now.
pub async fn stream(js: &JetStream, settings: &Settings) -> Option<Stream> {
    js.get_stream_no_info(names::stream_name(&settings.pipeline))
        .await
        .ok()
}

/// The payload of the message at stream sequence `at` (`None`: there is none). The error is
/// the server's or the client's message.
pub async fn message_at(
    js: &JetStream,
    settings: &Settings,
    at: u64,
) -> Result<Option<Bytes>, String> {
    use async_nats::jetstream::stream::RawMessageErrorKind;
    let stream = js
        .get_stream_no_info(names::stream_name(&settings.pipeline))
        .await
        .map_err(|e| e.to_string())?;
    match stream.get_raw_message(at).await {
        Ok(m) => Ok(Some(m.payload)),
        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// The stream sequence of the first message of the pipeline at or after `from`, if any (one
/// request to the stream leader). The error is the server's or the client's message.
pub async fn first_at_or_after(
    js: &JetStream,
    settings: &Settings,
    from: u64,
) -> Result<Option<u64>, String> {
    Ok(first_stored_at_or_after(js, settings, from)
        .await?
        .map(|(seq, _)| seq))
}

/// When the server stored the first message of the pipeline at or after stream sequence
/// `from` (ms since the Unix epoch, the server's clock); `None` when there is none.
pub async fn stored_ms_at_or_after(
    js: &JetStream,
    settings: &Settings,
    from: u64,
) -> Result<Option<u64>, String> {
    Ok(first_stored_at_or_after(js, settings, from)
        .await?
        .map(|(_, ms)| ms))
}

/// The stream sequence and stored time (ms, the server's clock) of the first message of the
/// pipeline at or after `from` (one direct get); `None` when there is none.
async fn first_stored_at_or_after(
    js: &JetStream,
    settings: &Settings,
    from: u64,
) -> Result<Option<(u64, u64)>, String> {
    use async_nats::jetstream::stream::RawMessageErrorKind;
    let stream = js
        .get_stream_no_info(names::stream_name(&settings.pipeline))
        .await
        .map_err(|e| e.to_string())?;
    match stream
        .raw_message_builder()
        .sequence(from)
        .next_by_subject(names::subject(&settings.pipeline))
        .send()
        .await
    {
        Ok(m) => {
            let ms = u64::try_from(m.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
            Ok(Some((m.sequence, ms)))
        }
        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// The first stream sequence in `first..=last` whose message the server stored at or after
/// `since_ms` (ms since the Unix epoch, the server's clock), found by bisection over the
/// stored times (about log2(last - first) direct reads); `None` when every message is older.
/// Deleted sequences are stepped over to the next message.
pub async fn first_stored_since(
    js: &JetStream,
    settings: &Settings,
    first: u64,
    last: u64,
    since_ms: u64,
) -> Result<Option<u64>, String> {
    // Invariant: every message before `lo` is older than `since_ms`; `found` is the best
    // message at or after it known to be new enough.
    let (mut lo, mut hi) = (first, last);
    let mut found = None;
    while lo <= hi {
        let mid = lo + (hi - lo) / 2;
        match first_stored_at_or_after(js, settings, mid).await? {
            Some((seq, ms)) if seq <= hi => {
                if ms >= since_ms {
                    found = Some(seq);
                    if mid == 0 {
                        break;
                    }
                    hi = mid - 1;
                } else {
                    lo = seq + 1;
                }
            }
            // Nothing stored in mid..=hi: the answer is before mid.
            _ => {
                if mid == 0 {
                    break;
                }
                hi = mid - 1;
            }
        }
    }
    Ok(found)
}
