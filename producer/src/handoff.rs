//! What the producer's parts hand each other: a caller's commit receipt, the last envelope
//! acknowledged, a snapshot cut and its report, and the envelopes and notifications the
//! batching engine hands the publisher. Plain data below the handle, the engine, the
//! publisher and the snapshot task, so none of them imports another for a type.
//!
//! Talks to nothing.

use crate::error::ProducerError;
use deltasync_core::envelope::Envelope;
use deltasync_core::snapshot::Manifest;
use deltasync_core::{Digest, Position, State};
use serde::Serialize;
use tokio::sync::oneshot;

/// What a committed transaction became, returned once it is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CommitReceipt {
    /// Sequence of its first envelope.
    pub first_seq: u64,
    /// Sequence of its last envelope (the position a replica reaches with it). When
    /// `parts` is 0 nothing was published and this is the position that was already current.
    pub last_seq: u64,
    /// Envelopes it took: 1, more for a multi-part transaction, 0 for a full state equal to
    /// the current one.
    pub parts: u32,
    /// State digest after it.
    #[serde(serialize_with = "hex_digest")]
    pub digest: Digest,
    /// Changes in it.
    pub changes: usize,
    /// Encoded bytes of its changes (an upper bound).
    pub bytes: u64,
    /// Stream sequence of its last envelope.
    pub stream_seq: u64,
}

impl CommitReceipt {
    pub(crate) fn unchanged(seq: u64, digest: Digest) -> CommitReceipt {
        CommitReceipt {
            first_seq: seq + 1,
            last_seq: seq,
            parts: 0,
            digest,
            changes: 0,
            bytes: 0,
            stream_seq: 0,
        }
    }
}

/// A written snapshot, as reported by status and `snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    /// Lineage of the cut (hex).
    pub lineage: String,
    /// Envelope sequence of the cut.
    pub seq: u64,
    /// Stream sequence of envelope `seq`; readers follow from the next one.
    pub stream_seq: u64,
    /// State digest at the cut (hex).
    pub digest: String,
    /// Keys in the state.
    pub entries: u64,
    /// When it was written (ms since the epoch).
    pub created_at_ms: u64,
    /// Bytes a full download fetches.
    pub total_bytes: u64,
    /// Bytes this snapshot wrote that earlier ones had not.
    pub bytes_written: u64,
}

impl From<&Manifest> for SnapshotInfo {
    fn from(m: &Manifest) -> Self {
        SnapshotInfo {
            lineage: m.lineage.to_hex(),
            seq: m.seq,
            stream_seq: m.stream_seq,
            digest: m.digest.to_hex(),
            entries: m.entries,
            created_at_ms: m.created_at_ms,
            total_bytes: m.total_bytes(),
            bytes_written: m.bytes_written,
        }
    }
}

/// A cut waiting to be written, and who waits for it.
#[derive(Debug)]
pub(crate) struct SnapshotJob {
    pub cut: State,
    /// The stream sequence of the cut's envelope when it is known already (a cut at the last
    /// complete transaction before abandoned parts); `None`: the stream sequence of the last
    /// envelope acknowledged when the job is resolved (the cut is at the engine's head).
    pub at: Option<u64>,
    pub reply: Option<oneshot::Sender<Result<SnapshotInfo, ProducerError>>>,
}

impl SnapshotJob {
    pub(crate) fn fail(self, err: ProducerError) {
        if let Some(reply) = self.reply {
            let _ = reply.send(Err(err));
        } else {
            tracing::warn!(seq = self.cut.seq(), error = %err, "Scheduled snapshot not written");
        }
    }
}

/// What a caller waits for; answered when the envelope it is attached to is acknowledged.
#[derive(Debug)]
pub(crate) enum Notify {
    /// A transaction's last part.
    Commit {
        receipt: CommitReceipt,
        reply: Option<oneshot::Sender<Result<CommitReceipt, ProducerError>>>,
    },
    /// Everything sent before it.
    Flush(oneshot::Sender<Result<Position, ProducerError>>),
    /// A snapshot cut at the envelope it is attached to (boxed: it carries a `State`, ten
    /// times the other variants).
    Snapshot(Box<SnapshotJob>),
}

/// What the batching engine hands the publisher, in order.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// An envelope to publish, and what waits on it.
    Envelope {
        env: Envelope,
        notify: Option<Notify>,
    },
    /// Answered once everything sent before it is acknowledged.
    Notify(Notify),
}

/// The last envelope the stream acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    /// Its envelope sequence (0 before any).
    pub seq: u64,
    /// Its stream sequence (for a lineage with no envelope yet: the stream's last sequence
    /// when the lineage started, where a reader of the lineage starts).
    pub stream_seq: u64,
    /// Envelope sequence of the last complete transaction acknowledged.
    pub txn_seq: u64,
    /// State digest after that transaction.
    pub digest: Digest,
}

fn hex_digest<S: serde::Serializer>(d: &Digest, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&d.to_hex())
}
