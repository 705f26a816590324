//! Reading a pipeline's history from its stream: following the stream from a position
//! (`stream`: [`Tail`], [`read_range`], [`bounds`]) and recovering the current state from the
//! latest snapshot plus the envelopes after it (`recovery`: [`recover`],
//! [`recover_history`]). The producer's start-up and every consumer's bootstrap share it.
//! The verdict on what was read is `deltasync_core::recovery`'s pure `decide`; this module
//! only reads. This file holds the error both sides report.
//!
//! Talks to JetStream (the pipeline's stream, through ordered consumers and stream info) and,
//! for recovery, to the snapshot bucket through `store`'s read side.

use crate::store;
use deltasync_core::recovery::Refusal;
use deltasync_core::state::ApplyError;
use std::time::Duration;

mod recovery;
mod stream;

pub use recovery::{recover, recover_history, Recovered, Recovery};
pub use stream::{bounds, read_range, StreamItem, Tail};

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
