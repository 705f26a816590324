//! Operator commands that need no running producer: take a snapshot now, and read a
//! pipeline's status from NATS.
//!
//! Talks to the pipeline's stream and bucket through `deltasync_nats` (the stream's status
//! and newest envelope through `deltasync_nats::status`, shared with the consumer's
//! `status`); no async-nats call of its own.
//!
//! ## Invariants
//!
//! - `status` reads the retention limits from the stream's own configuration on the server,
//!   never from the caller's settings, and judges the latest snapshot's headroom (how much
//!   more the stream can take before retention prunes an envelope no snapshot covers) the way
//!   the consumer judges a replica's: `deltasync_core::retention`, the minimum over
//!   messages, bytes and age. It changes nothing (no stream or bucket update).

use crate::error::ProducerError;
use crate::handoff::SnapshotInfo;
use deltasync_config::settings::Settings;
use deltasync_core::names;
use deltasync_nats::history;
use deltasync_nats::status::StreamView;
pub use deltasync_nats::status::{HeadEnvelope, StreamStatus};
use deltasync_nats::store::{self, StoreError};
use deltasync_nats::NatsError;
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

/// How much more the stream can take before retention prunes an envelope that the latest
/// snapshot does not cover (the first one after its position).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SnapshotHeadroom {
    /// The latest snapshot's stream position.
    pub position: u64,
    /// Stream messages after it: what only the stream holds.
    pub uncovered: u64,
    /// Envelopes after the snapshot are already pruned: no replica can follow from it.
    pub pruned: bool,
    /// Messages that can still arrive before retention prunes the first uncovered one
    /// (`None`: no limit applies).
    pub messages: Option<u64>,
    /// At the stream's recent rate, seconds until then.
    pub secs: Option<f64>,
    /// The limit that binds first: "messages", "bytes" or "age".
    pub limit: Option<&'static str>,
}

/// A pipeline's status as read from NATS by `status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
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
    /// The latest snapshot's headroom under the stream's own limits (with a stream and a
    /// snapshot).
    pub snapshot_headroom: Option<SnapshotHeadroom>,
}

/// Reads the pipeline's status without changing anything. Retention limits are the stream's
/// own, not `settings`'.
pub async fn pipeline_status(settings: &Settings) -> Result<PipelineStatus, ProducerError> {
    settings.validate()?;
    let client = deltasync_nats::connect(&settings.nats).await?;
    let js = deltasync_nats::jetstream(client, &settings.nats);
    let mut out = PipelineStatus {
        pipeline: settings.pipeline.clone(),
        stream: None,
        head: None,
        foreign_after_head: 0,
        last_snapshot: None,
        snapshot_headroom: None,
    };
    let view = match StreamView::read(&js, settings).await {
        Ok(v) => v,
        Err(NatsError::StreamNotFound { .. }) => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    out.stream = Some(view.status.clone());
    let (head, foreign) = view
        .head_envelope(STATUS_LOOKBACK)
        .await
        .map_err(|source| ProducerError::Publish {
            stream: view.status.name.clone(),
            seq: 0,
            source,
        })?;
    out.head = head;
    out.foreign_after_head = foreign;
    if let Ok(kv) = store::bucket(&js, settings).await {
        let latest = store::latest_manifest(&kv)
            .await
            .map_err(|source| ProducerError::Snapshot { seq: 0, source })?;
        out.last_snapshot = latest.as_ref().map(SnapshotInfo::from);
        if let Some(m) = &latest {
            let h = view.headroom(m.stream_seq).await;
            out.snapshot_headroom = Some(SnapshotHeadroom {
                position: m.stream_seq,
                uncovered: h.lag,
                pruned: h.pruned,
                messages: h.headroom.messages,
                secs: h.headroom.secs,
                limit: h.headroom.limit,
            });
        }
    }
    Ok(out)
}
