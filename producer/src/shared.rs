//! The state the producer's parts share while it runs: its status (what `/v1/status` and
//! `status` show), the failure that ended it, the newest durable snapshot and the retention
//! limits the engine counts against; and [`Observer`], the read-only view HTTP serves.
//!
//! Talks to nothing: the handle, the engine, the publisher and the snapshot task write it,
//! HTTP reads it.

use crate::budget::{Durable, Phase, RetentionLimits};
use crate::error::ProducerError;
use crate::handoff::{Acked, SnapshotInfo};
use crate::metrics::Metrics;
use deltasync_core::{Digest, Lineage, Position};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use tokio::sync::watch;

/// Where the producer is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    /// Publishing.
    Running,
    /// Taking no more input, awaiting acknowledgements.
    ShuttingDown,
    /// Shut down cleanly.
    Stopped,
    /// Stopped by a failure (see `error`).
    Failed,
}

/// The producer's status, as `/v1/status` and `status --json` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    /// The pipeline.
    pub pipeline: String,
    /// The lineage (hex).
    pub lineage: String,
    /// Last envelope acknowledged by the stream.
    pub seq: u64,
    /// Stream sequence of envelope `seq`.
    pub stream_seq: u64,
    /// State digest after the last complete transaction acknowledged (hex).
    pub digest: String,
    /// Last envelope handed to the publisher (≥ `seq`; the difference is in flight).
    pub produced_seq: u64,
    /// Foreign messages found in the stream since start (recovery included).
    pub foreign_messages: u64,
    /// The latest snapshot written (at start: the one recovery started from).
    pub last_snapshot: Option<SnapshotInfo>,
    /// Running, shutting down, stopped or failed.
    pub phase: Lifecycle,
    /// Why it failed.
    pub error: Option<String>,
    /// Why publishing is held back, while it is: the next envelope would go past what the
    /// stream's retention keeps after the newest durable snapshot, and the engine waits for a
    /// snapshot of its current position.
    pub held_back: Option<String>,
    /// The retention limits publishing is held back against: the tighter of the settings and
    /// the stream's own configuration (re-read while running).
    pub retention_limits: RetentionLimits,
}

/// State shared by the handle, the engine, the publisher, the snapshot task and HTTP.
#[derive(Debug)]
pub(crate) struct Shared {
    pub metrics: Metrics,
    pub snapshot_phase: Phase,
    /// The newest durable snapshot, published by the snapshot task; the engine holds
    /// publishing back against it (retention must not prune what no snapshot covers).
    pub durable: watch::Sender<Durable>,
    /// The retention limits, published by the snapshot task (which re-reads the stream's own);
    /// the engine counts against them.
    pub limits: watch::Sender<RetentionLimits>,
    /// What `status` reports, updated by every part as it goes.
    pub status: Mutex<Status>,
    /// The lineage published (fixed for the producer's life).
    pub lineage: Lineage,
    /// The failure that ended the producer; the first one wins.
    pub failure: OnceLock<Arc<ProducerError>>,
    /// Recovered and publishing (not failed, not shutting down): `/readyz`.
    pub ready: AtomicBool,
}

impl Shared {
    pub(crate) fn status_lock(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn acknowledged(&self, acked: Acked) {
        let mut s = self.status_lock();
        s.seq = acked.seq;
        s.stream_seq = acked.stream_seq;
        if s.digest.is_empty() || acked.txn_seq == acked.seq {
            s.digest = acked.digest.to_hex();
        }
    }

    pub(crate) fn produced(&self, seq: u64) {
        self.status_lock().produced_seq = seq;
    }

    pub(crate) fn foreign_message(&self) {
        self.status_lock().foreign_messages += 1;
    }

    pub(crate) fn snapshot_written(&self, info: SnapshotInfo) {
        self.status_lock().last_snapshot = Some(info);
    }

    /// A snapshot is durable (an older one than known changes nothing).
    pub(crate) fn snapshot_durable(&self, d: Durable) {
        self.durable.send_if_modified(|cur| {
            let newer = d.seq > cur.seq || (d.seq == cur.seq && d.stream_seq > cur.stream_seq);
            if newer {
                *cur = d;
            }
            newer
        });
    }

    /// The retention limits to count against from now on.
    pub(crate) fn set_limits(&self, limits: RetentionLimits) {
        let changed = self.limits.send_if_modified(|cur| {
            let changed = *cur != limits;
            *cur = limits;
            changed
        });
        if changed {
            self.status_lock().retention_limits = limits;
        }
    }

    /// The last envelope acknowledged: (envelope seq, stream seq).
    pub(crate) fn acked(&self) -> (u64, u64) {
        let s = self.status_lock();
        (s.seq, s.stream_seq)
    }

    /// Publishing is held back for `reason`, or no longer (`None`).
    pub(crate) fn held_back(&self, reason: Option<String>) {
        self.status_lock().held_back = reason;
    }

    pub(crate) fn position(&self) -> Position {
        let s = self.status_lock();
        Position {
            lineage: self.lineage,
            seq: s.seq,
            stream_seq: s.stream_seq,
            digest: Digest::from_hex(&s.digest).unwrap_or_default(),
        }
    }

    /// Records the failure that ends the producer (the first one wins).
    pub(crate) fn fail(&self, err: ProducerError) -> Arc<ProducerError> {
        let cause = self.failure.get_or_init(|| Arc::new(err)).clone();
        self.ready.store(false, Ordering::Release);
        let mut s = self.status_lock();
        s.phase = Lifecycle::Failed;
        s.error = Some(cause.to_string());
        cause
    }

    /// Whether a failure ended the producer.
    pub(crate) fn has_failed(&self) -> bool {
        self.failure.get().is_some()
    }

    /// The error for a caller arriving after the producer stopped.
    pub(crate) fn stopped_error(&self) -> ProducerError {
        match self.failure.get() {
            Some(cause) => ProducerError::shared(cause),
            None => ProducerError::ShutDown,
        }
    }

    /// Whether a clean stop has been asked for.
    pub(crate) fn shutting_down(&self) -> bool {
        self.status_lock().phase == Lifecycle::ShuttingDown
    }

    pub(crate) fn set_phase(&self, phase: Lifecycle) {
        let mut s = self.status_lock();
        if s.phase != Lifecycle::Failed {
            s.phase = phase;
        }
    }
}

/// A read-only view of a running producer for health checks, status and metrics (what the
/// HTTP endpoint serves). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Observer(pub(crate) Arc<Shared>);

impl Observer {
    /// The current status.
    pub fn status(&self) -> Status {
        self.0.status_lock().clone()
    }
    /// Prometheus text exposition of the producer's metrics.
    pub fn metrics_text(&self) -> String {
        self.0.metrics.render()
    }
    /// The metrics themselves.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }
    /// Recovered and publishing (not failed, not shutting down).
    pub fn ready(&self) -> bool {
        self.0.ready.load(Ordering::Acquire)
    }
    /// Not failed.
    pub fn healthy(&self) -> bool {
        self.0.failure.get().is_none()
    }
}
