//! The producer library's error type: one variant per failing step, each wrapping its source.
//!
//! Talks to nothing. A failure that ends the producer (fenced, history broken, NATS gone for
//! too long) is kept once behind an `Arc` and handed to every caller waiting on the producer
//! afterwards; [`ProducerError::Fenced`] is rebuilt as itself so callers can match on it.

use deltasync_config::settings::SettingsError;
use deltasync_core::change::ChangeError;
use deltasync_nats::history::HistoryError;
use deltasync_nats::store::StoreError;
use deltasync_nats::NatsError;
use std::sync::Arc;

/// A client error as the NATS layer reports it (the same type as `async_nats::Error`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the producer could not start, publish or snapshot.
#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    /// The settings cannot work for a producer.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// Connecting to NATS or creating the stream and bucket failed.
    #[error(transparent)]
    Nats(#[from] NatsError),
    /// The pipeline's history could not be recovered at start-up.
    #[error(
        "cannot recover the pipeline's history: {source}; if the history is lost for good, \
         `deltasync-producer new-lineage --yes` starts a new one (consumers re-snapshot)"
    )]
    Recover {
        /// What recovery found.
        #[source]
        source: HistoryError,
    },
    /// A change breaks the protocol's size limits; nothing of its transaction was taken.
    #[error("change {index} of the batch is refused: {source}")]
    InvalidChange {
        /// Position of the change in what the caller handed over.
        index: usize,
        /// The limit broken.
        #[source]
        source: ChangeError,
    },
    /// A transaction needs more parts than a replica buffers; nothing of it was taken.
    #[error(
        "a transaction of {changes} changes ({bytes} encoded bytes) needs {parts} envelopes, \
         more than the {max} a transaction may span",
        max = deltasync_core::envelope::MAX_TXN_PARTS
    )]
    TransactionTooLarge {
        /// Changes in the transaction.
        changes: usize,
        /// Their encoded size.
        bytes: usize,
        /// Envelopes it would need.
        parts: usize,
    },
    /// A transaction larger than the stream's retention keeps past a snapshot (by count or
    /// bytes): retention could prune part of it before any snapshot covers it. Nothing of it
    /// was taken.
    #[error(
        "a transaction of {changes} changes needs {parts} envelopes of {bytes} bytes in all \
         (changes plus overhead), more than the stream's retention keeps after a snapshot \
         (stream.max_messages less a tenth, stream.max_bytes less an eighth): split it, or \
         raise those limits"
    )]
    TransactionBeyondRetention {
        /// Changes in the transaction.
        changes: usize,
        /// Bytes it counts against `stream.max_bytes`.
        bytes: u64,
        /// Envelopes it would need.
        parts: usize,
    },
    /// A conditional transaction (`if_seq`) found the head elsewhere: another transaction
    /// came first. Nothing of it was taken; read the head and retry.
    #[error(
        "the head is envelope {head}, not {expected} as the transaction's if_seq expects: \
         nothing of it was committed"
    )]
    HeadMoved {
        /// The sequence the caller expected the head to be.
        expected: u64,
        /// The head the engine was at.
        head: u64,
    },
    /// A clean stop was asked for while publishing was held back by failing snapshots: what
    /// was not yet published is not published (publishing it would let retention prune
    /// envelopes no snapshot covers).
    #[error(
        "stopped while publishing was held back: snapshots fail and the stream's retention \
         leaves no room past the newest durable snapshot (envelope {covered}); the input after \
         envelope {head} was not published"
    )]
    StoppedWhileHeldBack {
        /// Newest durable snapshot's envelope sequence.
        covered: u64,
        /// Last envelope produced.
        head: u64,
    },
    /// Another producer wrote to the pipeline's stream: this one must stop. The history holds
    /// no envelope of this producer after `last_acknowledged_seq`.
    #[error(
        "fenced: another producer is writing pipeline {pipeline}: the stream holds {found} at \
         stream sequence {stream_seq}, where this producer (lineage {lineage}) expected its \
         envelope {expected_seq}; this producer stops (its last acknowledged envelope is \
         {last_acknowledged_seq})"
    )]
    Fenced {
        /// The pipeline.
        pipeline: String,
        /// This producer's lineage.
        lineage: String,
        /// The envelope this producer was publishing.
        expected_seq: u64,
        /// The last of this producer's envelopes acknowledged by the stream.
        last_acknowledged_seq: u64,
        /// What was found instead, e.g. `envelope 3fa2…:41 (part 1/1)`.
        found: String,
        /// Where it was found.
        stream_seq: u64,
    },
    /// Reading or writing the stream failed in a way retrying does not fix.
    #[error("publishing envelope {seq} to stream {stream} failed: {source}")]
    Publish {
        /// The stream.
        stream: String,
        /// The envelope.
        seq: u64,
        /// async-nats's error.
        #[source]
        source: BoxError,
    },
    /// NATS did not answer for longer than the producer retries.
    #[error(
        "stream {stream} unavailable for {waited:?} while publishing envelope {seq}: {source}"
    )]
    Unavailable {
        /// The stream.
        stream: String,
        /// The first envelope not acknowledged.
        seq: u64,
        /// How long the producer retried.
        waited: std::time::Duration,
        /// The last error.
        #[source]
        source: BoxError,
    },
    /// The stream holds this producer's envelopes out of order: something outside the
    /// protocol changed the stream. Never expected; the producer stops.
    #[error("the history in stream {stream} is broken at stream sequence {stream_seq}: {reason}")]
    Broken {
        /// The stream.
        stream: String,
        /// Where.
        stream_seq: u64,
        /// What is wrong.
        reason: String,
    },
    /// Encoding an envelope failed (a bug: limits are checked before).
    #[error("encoding envelope {seq}: {source}")]
    Encode {
        /// The envelope.
        seq: u64,
        /// The codec's error.
        #[source]
        source: deltasync_core::codec::EncodeError,
    },
    /// Writing a snapshot failed.
    #[error("writing the snapshot at {seq}: {source}")]
    Snapshot {
        /// The envelope sequence of the cut.
        seq: u64,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// The producer stopped earlier (see the cause); nothing more is published.
    #[error("the producer has stopped: {0}")]
    Stopped(Arc<ProducerError>),
    /// The producer was shut down; it takes no more input.
    #[error("the producer is shut down")]
    ShutDown,
    /// An internal task ended unexpectedly (a panic, reported as a bug).
    #[error("internal producer task failed: {0}")]
    Internal(String),
}

impl ProducerError {
    /// Whether this producer was fenced by another writer.
    pub fn is_fenced(&self) -> bool {
        match self {
            ProducerError::Fenced { .. } => true,
            ProducerError::Stopped(cause) => cause.is_fenced(),
            _ => false,
        }
    }

    /// The error to hand to another caller when `cause` ended the producer: a fence stays a
    /// [`ProducerError::Fenced`], anything else becomes [`ProducerError::Stopped`].
    pub(crate) fn shared(cause: &Arc<ProducerError>) -> ProducerError {
        match &**cause {
            ProducerError::Fenced {
                pipeline,
                lineage,
                expected_seq,
                last_acknowledged_seq,
                found,
                stream_seq,
            } => ProducerError::Fenced {
                pipeline: pipeline.clone(),
                lineage: lineage.clone(),
                expected_seq: *expected_seq,
                last_acknowledged_seq: *last_acknowledged_seq,
                found: found.clone(),
                stream_seq: *stream_seq,
            },
            ProducerError::ShutDown => ProducerError::ShutDown,
            _ => ProducerError::Stopped(cause.clone()),
        }
    }
}
