//! The producer's Prometheus metrics: one registry per producer (so several producers in one
//! process, as in tests, never mix their figures), rendered as text by `/metrics`; beside them
//! `deltasync_build_info{version,role="producer"}`. Names follow Prometheus practice: the
//! unit before `_total` (`deltasync_producer_published_bytes_total`,
//! `deltasync_producer_snapshot_written_bytes_total`).
//!
//! Talks to nothing; the publisher, the batching engine and the snapshot task update it.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Every figure the producer exports. Cheap to update from any task (atomics).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Envelopes acknowledged by the stream.
    pub envelopes: Counter,
    /// Changes in acknowledged envelopes.
    pub changes: Counter,
    /// Encoded envelope bytes acknowledged.
    pub bytes: Counter,
    /// Seconds from sending an envelope to its acknowledgement.
    pub publish_latency: Histogram,
    /// Publishes awaiting their acknowledgement right now.
    pub ack_window_in_use: Gauge,
    /// Messages in the stream that are not envelopes (someone published into the subject).
    pub foreign_messages: Counter,
    /// Envelopes published again after the stream refused them (foreign message, timeout).
    pub republished: Counter,
    /// Snapshots written.
    pub snapshots: Counter,
    /// Snapshot bytes written (only chunks not already in the bucket).
    pub snapshot_bytes_written: Counter,
    /// Bytes of the latest snapshot (what a full download fetches).
    pub snapshot_total_bytes: Gauge,
    /// Snapshots that failed.
    pub snapshot_failures: Counter,
    /// Envelope sequence last acknowledged.
    pub last_seq: Gauge<u64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered under `deltasync_producer_`.
    pub fn new() -> Metrics {
        let mut top = Registry::default();
        top.register(
            "deltasync_build",
            "The deltasync build: its version and role",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION")),
                ("role", "producer"),
            ]),
        );
        deltasync_config::process_metrics::register(&mut top);
        let registry = top.sub_registry_with_prefix("deltasync_producer");
        let m = Metrics {
            registry: Registry::default(),
            envelopes: Counter::default(),
            changes: Counter::default(),
            bytes: Counter::default(),
            // 100 µs .. ~6.5 s
            publish_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 17)),
            ack_window_in_use: Gauge::default(),
            foreign_messages: Counter::default(),
            republished: Counter::default(),
            snapshots: Counter::default(),
            snapshot_bytes_written: Counter::default(),
            snapshot_total_bytes: Gauge::default(),
            snapshot_failures: Counter::default(),
            last_seq: Gauge::default(),
        };
        registry.register(
            "envelopes",
            "Envelopes acknowledged by the stream",
            m.envelopes.clone(),
        );
        registry.register(
            "changes",
            "Changes in acknowledged envelopes",
            m.changes.clone(),
        );
        registry.register_with_unit(
            "published",
            "Encoded envelope bytes acknowledged",
            prometheus_client::registry::Unit::Bytes,
            m.bytes.clone(),
        );
        registry.register(
            "publish_latency_seconds",
            "Time from sending an envelope to its acknowledgement",
            m.publish_latency.clone(),
        );
        registry.register(
            "ack_window_in_use",
            "Publishes awaiting their acknowledgement",
            m.ack_window_in_use.clone(),
        );
        registry.register(
            "foreign_messages",
            "Messages in the stream that are not envelopes",
            m.foreign_messages.clone(),
        );
        registry.register(
            "republished_envelopes",
            "Envelopes published again after the stream refused or lost them",
            m.republished.clone(),
        );
        registry.register("snapshots", "Snapshots written", m.snapshots.clone());
        registry.register_with_unit(
            "snapshot_written",
            "Snapshot bytes written to the bucket",
            prometheus_client::registry::Unit::Bytes,
            m.snapshot_bytes_written.clone(),
        );
        registry.register(
            "snapshot_size_bytes",
            "Bytes of the latest snapshot",
            m.snapshot_total_bytes.clone(),
        );
        registry.register(
            "snapshot_failures",
            "Snapshots that failed",
            m.snapshot_failures.clone(),
        );
        registry.register(
            "last_seq",
            "Envelope sequence last acknowledged",
            m.last_seq.clone(),
        );
        Metrics { registry: top, ..m }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
