//! The standard Prometheus process metrics (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`, ...) for both binaries' `/metrics`,
//! read at each scrape by the `metrics-process` crate and encoded by prometheus-client.
//!
//! Talks to the operating system (procfs on Linux) through `metrics-process`, at scrape time.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

/// Registers the process collector on `registry` (its names carry no prefix, as Prometheus
/// expects of `process_*`).
pub fn register(registry: &mut Registry) {
    registry.register_collector(Box::new(ProcessCollector));
}

#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = metrics_process::collector::collect();
        if let Some(v) = m.cpu_seconds_total {
            let counter = ConstCounter::new(v);
            let e = encoder.encode_descriptor(
                "process_cpu",
                "Total user and system CPU time spent",
                Some(&Unit::Seconds),
                counter.metric_type(),
            )?;
            counter.encode(e)?;
        }
        let gauges: [(&str, &str, Option<Unit>, Option<u64>); 7] = [
            (
                "process_open_fds",
                "Open file descriptors",
                None,
                m.open_fds,
            ),
            (
                "process_max_fds",
                "Most file descriptors it may open",
                None,
                m.max_fds,
            ),
            (
                "process_virtual_memory",
                "Virtual memory size",
                Some(Unit::Bytes),
                m.virtual_memory_bytes,
            ),
            (
                "process_virtual_memory_max",
                "Most virtual memory it may use",
                Some(Unit::Bytes),
                m.virtual_memory_max_bytes,
            ),
            (
                "process_resident_memory",
                "Resident memory size",
                Some(Unit::Bytes),
                m.resident_memory_bytes,
            ),
            (
                "process_start_time",
                "Start time since the Unix epoch",
                Some(Unit::Seconds),
                m.start_time_seconds,
            ),
            ("process_threads", "OS threads", None, m.threads),
        ];
        for (name, help, unit, value) in gauges {
            let Some(v) = value else { continue };
            let gauge = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
            let e = encoder.encode_descriptor(name, help, unit.as_ref(), gauge.metric_type())?;
            gauge.encode(e)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_metrics_are_encoded_without_a_prefix() {
        let mut top = Registry::default();
        register(&mut top);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &top).unwrap_or_default();
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(out.contains(name), "{name} missing from\n{out}");
        }
    }
}
