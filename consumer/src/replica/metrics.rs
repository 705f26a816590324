//! The replica's Prometheus metrics (prometheus-client), served at `/metrics` and read by
//! `/v1/status`. Pure bookkeeping: no I/O. A child of the replica handle, which owns the
//! registry and alone changes what the status shows (through [`Metrics::count`]).
//!
//! ```text
//! deltasync_consumer_envelopes_applied_total           transactions applied (after their last part)
//! deltasync_consumer_changes_applied_total             changes in them
//! deltasync_consumer_envelopes_skipped_total{reason}   duplicate | stale
//! deltasync_consumer_foreign_messages_total            stream messages that are not envelopes
//! deltasync_consumer_sync_decisions_total{reason}      start-up and resync decisions, by reason
//! deltasync_consumer_resyncs_total{reason}             re-snapshots done, by reason
//! deltasync_consumer_snapshot_fetched_bytes_total      snapshot bytes downloaded
//! deltasync_consumer_snapshot_seconds                  histogram of re-snapshot durations
//! deltasync_consumer_apply_seconds                     histogram of decode-to-applied per envelope
//! deltasync_consumer_commit_seconds                    histogram of durable commits
//! deltasync_consumer_lag_messages                      stream messages after the committed position
//! deltasync_consumer_lag_seconds                       0 when caught up, else now - when the producer
//!                                                      made the last applied envelope (its clock)
//! deltasync_consumer_last_applied_timestamp_seconds    when the producer made the last applied envelope
//! deltasync_consumer_sync_fetched_bytes                a snapshot load running now: bytes fetched,
//! deltasync_consumer_sync_remaining_bytes              bytes and base entries still to fetch
//! deltasync_consumer_sync_remaining_entries            (all 0 when none runs)
//! deltasync_consumer_seq                               committed envelope sequence
//! deltasync_consumer_entries                           keys in the replica
//! deltasync_consumer_ready                             1 when bootstrapped and within max lag
//! deltasync_consumer_feed_bytes                        bytes counted by the feed's batches
//! deltasync_consumer_feed_batches                      batches in the feed
//! deltasync_consumer_followers                         open watches and waiting long-polls
//! deltasync_consumer_followers_lost_total              followers told to re-read (must-refetch, Reset)
//! deltasync_build_info{version,role}                   1, naming the build (role "consumer")
//! process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
//!                                                      the standard process metrics
//! ```
//!
//! A `reason` label is a [`Reason`](crate::follower::Reason) label (`follower/reason.rs`).

use super::{Notifies, StatusEvent};
use prometheus_client::encoding::text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// Counts one follower in `deltasync_consumer_followers` while it lives.
#[derive(Debug)]
pub(crate) struct Following(Gauge);

impl Following {
    pub(crate) fn new(m: &Metrics) -> Following {
        m.followers.inc();
        Following(m.followers.clone())
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Every metric of one consumer. Cloning shares the underlying values.
#[derive(Clone, Debug)]
pub struct Metrics {
    // What the status shows is private: only `count` changes it, and only the replica can
    // call that (it wakes the status waiters).
    envelopes_applied: Counter,
    changes_applied: Counter,
    pub(crate) envelopes_skipped: Family<Labels, Counter>,
    foreign_messages: Counter,
    reader_stalls: Counter,
    decisions: Family<Labels, Counter>,
    pub(crate) resyncs: Family<Labels, Counter>,
    snapshot_bytes: Counter,
    pub(crate) snapshot_seconds: Histogram,
    pub(crate) apply_seconds: Histogram,
    pub(crate) commit_seconds: Histogram,
    pub(crate) lag: Gauge,
    pub(crate) lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub(crate) last_applied_timestamp: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub(crate) sync_fetched_bytes: Gauge,
    pub(crate) sync_remaining_bytes: Gauge,
    pub(crate) sync_remaining_entries: Gauge,
    pub(crate) seq: Gauge,
    pub(crate) entries: Gauge,
    pub(crate) ready: Gauge,
    pub(crate) feed_bytes: Gauge,
    pub(crate) feed_batches: Gauge,
    pub(crate) followers: Gauge,
    pub(crate) followers_lost: Counter,
}

fn reason(r: &str) -> Labels {
    vec![("reason".to_owned(), r.to_owned())]
}

impl Metrics {
    /// Fresh metrics and the registry that exposes them.
    pub fn new() -> (Metrics, Registry) {
        let m = Metrics {
            envelopes_applied: Counter::default(),
            changes_applied: Counter::default(),
            envelopes_skipped: Family::default(),
            foreign_messages: Counter::default(),
            reader_stalls: Counter::default(),
            decisions: Family::default(),
            resyncs: Family::default(),
            snapshot_bytes: Counter::default(),
            snapshot_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            apply_seconds: Histogram::new(exponential_buckets(1e-6, 2.0, 22)),
            commit_seconds: Histogram::new(exponential_buckets(1e-4, 2.0, 16)),
            lag: Gauge::default(),
            lag_seconds: Gauge::default(),
            last_applied_timestamp: Gauge::default(),
            sync_fetched_bytes: Gauge::default(),
            sync_remaining_bytes: Gauge::default(),
            sync_remaining_entries: Gauge::default(),
            seq: Gauge::default(),
            entries: Gauge::default(),
            ready: Gauge::default(),
            feed_bytes: Gauge::default(),
            feed_batches: Gauge::default(),
            followers: Gauge::default(),
            followers_lost: Counter::default(),
        };
        let mut top = Registry::default();
        top.register(
            "deltasync_build",
            "The deltasync build: its version and role",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION")),
                ("role", "consumer"),
            ]),
        );
        deltasync_config::process_metrics::register(&mut top);
        let r = top.sub_registry_with_prefix("deltasync_consumer");
        r.register(
            "envelopes_applied",
            "Transactions applied (counted at their last part)",
            m.envelopes_applied.clone(),
        );
        r.register(
            "changes_applied",
            "Changes applied",
            m.changes_applied.clone(),
        );
        r.register(
            "envelopes_skipped",
            "Envelopes skipped as duplicate or stale",
            m.envelopes_skipped.clone(),
        );
        r.register(
            "foreign_messages",
            "Stream messages that are not valid envelopes, skipped",
            m.foreign_messages.clone(),
        );
        r.register(
            "reader_stalls",
            "Stream readers reopened because they delivered nothing while the stream held more",
            m.reader_stalls.clone(),
        );
        r.register(
            "sync_decisions",
            "Start-up and resynchronisation decisions, by reason",
            m.decisions.clone(),
        );
        r.register("resyncs", "Re-snapshots done, by reason", m.resyncs.clone());
        r.register_with_unit(
            "snapshot_fetched",
            "Snapshot bytes downloaded",
            prometheus_client::registry::Unit::Bytes,
            m.snapshot_bytes.clone(),
        );
        r.register(
            "snapshot_seconds",
            "Duration of re-snapshots (download, verify, commit)",
            m.snapshot_seconds.clone(),
        );
        r.register(
            "apply_seconds",
            "Time to apply one envelope",
            m.apply_seconds.clone(),
        );
        r.register(
            "commit_seconds",
            "Time of one durable commit of entries and cursor",
            m.commit_seconds.clone(),
        );
        r.register(
            "lag_messages",
            "Stream messages after the committed position",
            m.lag.clone(),
        );
        r.register_with_unit(
            "lag",
            "0 when caught up, else the time since the producer made the last applied envelope",
            prometheus_client::registry::Unit::Seconds,
            m.lag_seconds.clone(),
        );
        r.register_with_unit(
            "sync_fetched",
            "A snapshot load running now: snapshot bytes fetched (0 when none runs)",
            prometheus_client::registry::Unit::Bytes,
            m.sync_fetched_bytes.clone(),
        );
        r.register_with_unit(
            "sync_remaining",
            "A snapshot load running now: snapshot bytes still to fetch (0 when none runs)",
            prometheus_client::registry::Unit::Bytes,
            m.sync_remaining_bytes.clone(),
        );
        r.register(
            "sync_remaining_entries",
            "A snapshot load running now: base entries still to fetch (0 when none runs)",
            m.sync_remaining_entries.clone(),
        );
        r.register_with_unit(
            "last_applied_timestamp",
            "When the producer made the last applied envelope, since the Unix epoch",
            prometheus_client::registry::Unit::Seconds,
            m.last_applied_timestamp.clone(),
        );
        r.register("seq", "Committed envelope sequence", m.seq.clone());
        r.register("entries", "Keys in the replica", m.entries.clone());
        r.register(
            "ready",
            "1 when bootstrapped and within the allowed lag",
            m.ready.clone(),
        );
        r.register(
            "feed_bytes",
            "Bytes counted by the batches in the change feed",
            m.feed_bytes.clone(),
        );
        r.register(
            "feed_batches",
            "Batches in the change feed",
            m.feed_batches.clone(),
        );
        r.register(
            "followers",
            "Open watches (SSE and Replica::watch) and waiting long-polls",
            m.followers.clone(),
        );
        r.register(
            "followers_lost",
            "Followers told to re-read the state (must-refetch, Reset)",
            m.followers_lost.clone(),
        );
        (m, top)
    }

    /// Counts a change the status shows. Only [`Replica::record`](super::Replica::record) can call
    /// this (it alone holds a [`Notifies`]): the replica then wakes its status waiters.
    pub(crate) fn count(&self, event: &StatusEvent, _: Notifies) {
        match event {
            StatusEvent::Applied { changes } => {
                self.envelopes_applied.inc();
                self.changes_applied.inc_by(*changes);
            }
            StatusEvent::Foreign => {
                self.foreign_messages.inc();
            }
            StatusEvent::ReaderStall => {
                self.reader_stalls.inc();
            }
            StatusEvent::Decision(r) => {
                self.decisions.get_or_create(&reason(r.as_str())).inc();
            }
            StatusEvent::Resync(record) => {
                self.resyncs
                    .get_or_create(&reason(record.reason.as_str()))
                    .inc();
                self.snapshot_bytes.inc_by(record.bytes_fetched);
            }
        }
    }

    pub(crate) fn envelopes_applied(&self) -> u64 {
        self.envelopes_applied.get()
    }

    pub(crate) fn changes_applied(&self) -> u64 {
        self.changes_applied.get()
    }

    pub(crate) fn foreign_messages(&self) -> u64 {
        self.foreign_messages.get()
    }

    pub(crate) fn reader_stalls(&self) -> u64 {
        self.reader_stalls.get()
    }

    pub(crate) fn snapshot_bytes(&self) -> u64 {
        self.snapshot_bytes.get()
    }

    pub(crate) fn skipped(&self, r: &str) {
        self.envelopes_skipped.get_or_create(&reason(r)).inc();
    }

    /// How often each decision was taken, by reason.
    pub fn decisions(&self) -> std::collections::BTreeMap<String, u64> {
        let mut out = std::collections::BTreeMap::new();
        for r in crate::follower::Reason::ALL {
            if let Some(c) = self.decisions.get(&reason(r.as_str())) {
                out.insert(r.as_str().to_owned(), c.get());
            }
        }
        out
    }

    /// Re-snapshots done, by reason.
    pub fn resyncs(&self) -> std::collections::BTreeMap<String, u64> {
        let mut out = std::collections::BTreeMap::new();
        for r in crate::follower::Reason::ALL {
            if let Some(c) = self.resyncs.get(&reason(r.as_str())) {
                out.insert(r.as_str().to_owned(), c.get());
            }
        }
        out
    }
}

/// The registry in Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = text::encode(&mut out, registry);
    out
}
