//! Operator commands that need no running producer: take a snapshot now, and read a
//! pipeline's status from NATS.
//!
//! Talks to the pipeline's stream (info, messages by sequence) and bucket through
//! `deltasync_shared::{nats, history, store}`.

use crate::error::ProducerError;
use crate::snapshots::SnapshotInfo;
use async_nats::jetstream::stream::RawMessageErrorKind;
use deltasync_shared::history::{self, classify, Classified};
use deltasync_shared::names;
use deltasync_shared::nats::{self, NatsError};
use deltasync_shared::settings::Settings;
use deltasync_shared::store::{self, StoreError};
use serde::Serialize;

/// Attempts of `snapshot` when another writer (a running producer) moves `latest` between its
/// read of the pointer and its compare-and-set.
const RACE_ATTEMPTS: u32 = 3;

/// How far back `status` looks from the stream's end for the last envelope.
const STATUS_LOOKBACK: u64 = 1000;

/// What the `snapshot` command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotOutcome {
    /// The latest snapshot after the command.
    pub snapshot: SnapshotInfo,
    /// False when the latest snapshot already was at the recovered position.
    pub written: bool,
}

/// Recovers the pipeline's state (latest snapshot plus envelopes after it) and writes a
/// snapshot of it at its last complete transaction (never inside one). Safe beside a running
/// producer: the store moves `latest` only forward.
pub async fn snapshot_now(settings: &Settings) -> Result<SnapshotOutcome, ProducerError> {
    let (_client, js) = crate::producer::connect(settings).await?;
    let rec = history::recover(&js, settings)
        .await
        .map_err(|source| ProducerError::Recover { source })?;
    let Some(rec) = rec else {
        return Err(ProducerError::Recover {
            source: history::HistoryError::Stream {
                stream: names::stream_name(&settings.pipeline),
                source: "the pipeline has no history yet: nothing to snapshot".into(),
            },
        });
    };
    // Cut at the last complete transaction: parts after it (a transaction still being
    // published, or one abandoned by a crash) are not part of any state a replica can start
    // from, and the store refuses a cut at a non-final part.
    let seq = rec.txn_seq;
    let mut state = rec.state;
    let lineage = state.lineage();
    state.set_position(lineage, seq);
    if rec.abandoned_parts > 0 {
        tracing::info!(
            seq,
            parts_after = rec.abandoned_parts,
            "The stream ends inside a transaction; cutting at the last complete one"
        );
    }
    // A running producer may move `latest` between our read of it and our compare-and-set:
    // write again, and the next attempt finds the pointer at or past this cut (`Stale`,
    // nothing to do) or still behind it (written).
    let mut attempts = 0;
    let written = loop {
        attempts += 1;
        let result = if seq == 0 {
            // No complete transaction in this lineage yet: nothing a replica could start from.
            Err(StoreError::Stale {
                latest_lineage: lineage.to_hex(),
                latest_seq: 0,
                seq,
            })
        } else {
            store::write_snapshot(&js, settings, &state, rec.txn_stream_seq, None).await
        };
        match result {
            Err(StoreError::Raced { .. }) if attempts < RACE_ATTEMPTS => {
                tracing::info!(
                    seq,
                    attempts,
                    "Another writer moved the latest snapshot meanwhile; writing again"
                );
            }
            other => break other,
        }
    };
    match written {
        Ok(m) => Ok(SnapshotOutcome {
            snapshot: SnapshotInfo::from(&m),
            written: true,
        }),
        Err(StoreError::Stale { .. }) => {
            let kv = store::bucket(&js, settings)
                .await
                .map_err(|source| ProducerError::Snapshot { seq, source })?;
            let latest = store::latest_manifest(&kv)
                .await
                .map_err(|source| ProducerError::Snapshot { seq, source })?;
            match latest {
                Some(m) => Ok(SnapshotOutcome {
                    snapshot: SnapshotInfo::from(&m),
                    written: false,
                }),
                None => Err(ProducerError::Internal(
                    "the pipeline has no complete transaction yet: nothing to snapshot".into(),
                )),
            }
        }
        Err(source) => Err(ProducerError::Snapshot { seq, source }),
    }
}

/// The stream's extent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamStatus {
    /// Stream name.
    pub name: String,
    /// First stream sequence retained.
    pub first_seq: u64,
    /// Last stream sequence.
    pub last_seq: u64,
    /// Messages retained.
    pub messages: u64,
    /// Bytes retained.
    pub bytes: u64,
}

/// The newest envelope in the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeadEnvelope {
    /// Lineage (hex).
    pub lineage: String,
    /// Envelope sequence.
    pub seq: u64,
    /// Part of its transaction.
    pub part: u32,
    /// Parts of its transaction.
    pub parts: u32,
    /// Digest after its transaction (hex).
    pub digest: String,
    /// Where it is in the stream.
    pub stream_seq: u64,
    /// When it was produced (ms since the epoch).
    pub produced_at_ms: u64,
}

/// A pipeline's status as read from NATS by `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PipelineStatus {
    /// The pipeline.
    pub pipeline: String,
    /// The stream, if it exists.
    pub stream: Option<StreamStatus>,
    /// The newest envelope within the last messages, if any.
    pub head: Option<HeadEnvelope>,
    /// Foreign messages after the head envelope.
    pub foreign_after_head: u64,
    /// The latest snapshot.
    pub last_snapshot: Option<SnapshotInfo>,
}

/// Reads the pipeline's status without changing anything.
pub async fn pipeline_status(settings: &Settings) -> Result<PipelineStatus, ProducerError> {
    settings.validate()?;
    let client = nats::connect(&settings.nats).await?;
    let js = nats::jetstream(client, &settings.nats);
    let name = names::stream_name(&settings.pipeline);
    let mut out = PipelineStatus {
        pipeline: settings.pipeline.clone(),
        stream: None,
        head: None,
        foreign_after_head: 0,
        last_snapshot: None,
    };
    let bounds = match nats::stream_bounds(&js, settings).await {
        Ok(b) => b,
        Err(NatsError::StreamNotFound { .. }) => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    out.stream = Some(StreamStatus {
        name: name.clone(),
        first_seq: bounds.first_seq,
        last_seq: bounds.last_seq,
        messages: bounds.messages,
        bytes: bounds.bytes,
    });
    let stream = js
        .get_stream(&name)
        .await
        .map_err(|e| ProducerError::Publish {
            stream: name.clone(),
            seq: 0,
            source: e.into(),
        })?;
    let mut s = bounds.last_seq;
    let floor = bounds
        .first_seq
        .max(bounds.last_seq.saturating_sub(STATUS_LOOKBACK));
    while s >= floor && s > 0 {
        match stream.get_raw_message(s).await {
            Ok(m) => match classify(&m.payload) {
                Classified::Envelope(e) => {
                    out.head = Some(HeadEnvelope {
                        lineage: e.lineage.to_hex(),
                        seq: e.seq,
                        part: e.part,
                        parts: e.parts,
                        digest: e.digest.to_hex(),
                        stream_seq: s,
                        produced_at_ms: e.produced_at_ms,
                    });
                    break;
                }
                Classified::Foreign { .. } => out.foreign_after_head += 1,
            },
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => {}
            Err(e) => {
                return Err(ProducerError::Publish {
                    stream: name.clone(),
                    seq: 0,
                    source: e.into(),
                })
            }
        }
        s -= 1;
    }
    if let Ok(kv) = store::bucket(&js, settings).await {
        let latest = store::latest_manifest(&kv)
            .await
            .map_err(|source| ProducerError::Snapshot { seq: 0, source })?;
        out.last_snapshot = latest.as_ref().map(SnapshotInfo::from);
    }
    Ok(out)
}
