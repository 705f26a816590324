//! The background snapshot task: writes the cuts the batching engine takes, one at a time and
//! off the publishing path, through `deltasync_nats::store`, each incremental on the one
//! before; and re-reads the stream's own retention limits for the engine to count against.
//!
//! Talks to the snapshot bucket (`store::write_snapshot`) and to the stream's info (its
//! limits); receives cuts from the publisher once the envelope they end at is acknowledged,
//! reports through the producer's shared status. When cuts are taken is [`crate::budget`]'s.

use crate::budget::{Durable, RetentionLimits};
use crate::error::ProducerError;
use crate::handoff::{SnapshotInfo, SnapshotJob};
use crate::publisher::JetStream;
use crate::shared::Shared;
use deltasync_config::settings::Settings;
use deltasync_core::retention::StreamLimits;
use deltasync_core::snapshot::Manifest;
use deltasync_core::state::{free_in_background, State};
use deltasync_nats::store::{self, StoreError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Pause after a failed snapshot before the next attempt.
const SNAPSHOT_RETRY_AFTER: Duration = Duration::from_secs(2);

/// How often the snapshot task re-reads the stream's own limits (besides after each snapshot).
pub(crate) const LIMITS_RECHECK: Duration = Duration::from_secs(2);

/// Writes cuts one at a time, keeping the previous one (manifest and state) so the next
/// snapshot is incremental; the first is incremental on `base`, the snapshot the producer
/// recovered from, when given (a restarted producer's first snapshot then writes what
/// changed since, not the whole state again).
pub(crate) async fn run(
    js: JetStream,
    settings: Arc<Settings>,
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<(SnapshotJob, u64)>,
    base: Option<(Manifest, State)>,
) {
    let mut prev: Option<(Manifest, State)> = base;
    let mut watch = LimitsWatch::default();
    let mut recheck = tokio::time::interval(LIMITS_RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (job, stream_seq) = tokio::select! {
            next = rx.recv() => match next {
                Some(next) => next,
                None => break,
            },
            _ = recheck.tick() => {
                watch.refresh(&js, &settings, &shared).await;
                continue;
            }
        };
        let seq = job.cut.seq();
        let started = Instant::now();
        let result = store::write_snapshot(
            &js,
            &settings,
            &job.cut,
            stream_seq,
            prev.as_ref().map(|(m, s)| (m, s)),
        )
        .await;
        let m = &shared.metrics;
        match result {
            Ok(manifest) => {
                m.snapshots.inc();
                m.snapshot_bytes_written.inc_by(manifest.bytes_written);
                m.snapshot_total_bytes.set(manifest.total_bytes() as i64);
                let info = SnapshotInfo::from(&manifest);
                tracing::info!(
                    seq,
                    stream_seq,
                    entries = info.entries,
                    total_bytes = info.total_bytes,
                    bytes_written = info.bytes_written,
                    took = ?started.elapsed(),
                    "Snapshot stored"
                );
                shared.snapshot_written(info.clone());
                shared.snapshot_durable(Durable {
                    seq: manifest.seq,
                    stream_seq: manifest.stream_seq,
                });
                shared.snapshot_phase.set_idle();
                prev = Some((manifest, job.cut));
                if let Some(reply) = job.reply {
                    let _ = reply.send(Ok(info));
                }
            }
            Err(StoreError::Stale { latest_seq, .. }) if latest_seq >= seq => {
                // The bucket already has a snapshot at or past this cut (an operator's
                // `snapshot`, or one written before a restart): nothing to do.
                tracing::info!(
                    seq,
                    latest_seq,
                    "Snapshot not needed: the latest one is already at or past this cut"
                );
                shared.snapshot_durable(Durable { seq, stream_seq });
                shared.snapshot_phase.set_idle();
                if let Some(reply) = job.reply {
                    let _ = reply.send(Err(ProducerError::Snapshot {
                        seq,
                        source: StoreError::Stale {
                            latest_lineage: job.cut.lineage().to_hex(),
                            latest_seq,
                            seq,
                        },
                    }));
                }
            }
            Err(source) => {
                m.snapshot_failures.inc();
                tracing::error!(seq, stream_seq, error = %source, retry_in = ?SNAPSHOT_RETRY_AFTER, "Snapshot failed; retrying");
                if let Some(reply) = job.reply {
                    let _ = reply.send(Err(ProducerError::Snapshot { seq, source }));
                }
                // The engine cuts again once the phase says so (it looks while one runs).
                tokio::time::sleep(SNAPSHOT_RETRY_AFTER).await;
                shared.snapshot_phase.set_retry();
            }
        }
        // After each snapshot (the stream moved on by a retention's worth at most).
        watch.refresh(&js, &settings, &shared).await;
        recheck.reset();
    }
    // The last snapshot's state may hold the last references to every entry (the engine
    // has handed its own off already): freed off the runtime, as shutdown waits for this.
    if let Some((_, state)) = prev {
        free_in_background(state);
    }
}

/// What the snapshot task last read of the stream's own limits.
#[derive(Debug, Default)]
struct LimitsWatch {
    /// The stream's limits last read.
    seen: Option<StreamLimits>,
    /// The last read failed (reported once until one succeeds).
    failing: bool,
}

impl LimitsWatch {
    /// Reads the stream's own limits (one stream info request) and hands the tighter of them
    /// and the settings to the engine; WARN when they differ from the settings.
    async fn refresh(&mut self, js: &JetStream, settings: &Settings, shared: &Shared) {
        let stream = match deltasync_nats::stream_bounds_and_limits(js, settings).await {
            Ok((_, stream)) => stream,
            Err(error) => {
                if !self.failing {
                    self.failing = true;
                    tracing::warn!(%error, "Cannot read the stream's limits; counting with the last known ones");
                }
                return;
            }
        };
        self.failing = false;
        let ours = RetentionLimits::tighter(&settings.stream, None);
        if self.seen != Some(stream) {
            let theirs = (stream.max_messages, stream.max_bytes);
            if theirs != (ours.max_messages, ours.max_bytes) {
                tracing::warn!(
                    stream_max_messages = ?stream.max_messages,
                    stream_max_bytes = ?stream.max_bytes,
                    settings_max_messages = ?ours.max_messages,
                    settings_max_bytes = ?ours.max_bytes,
                    "The stream's limits differ from the settings (changed by hand?): publishing \
                     is held back against the tighter of both; the next start sets the stream \
                     back to the settings"
                );
            } else if self.seen.is_some() {
                tracing::info!("The stream's limits are the settings' again");
            }
            self.seen = Some(stream);
        }
        shared.set_limits(RetentionLimits::tighter(&settings.stream, Some(&stream)));
    }
}
