//! A pipeline's stream as the operators' `status` commands show it: one [`StreamStatus`]
//! and one reader ([`StreamView::read`]) shared by `deltasync-producer status` and
//! `deltasync-consumer status`, plus what each adds from the stream (the newest envelope,
//! a position's headroom, its durable consumers).
//!
//! Talks to the pipeline's stream (info, messages by sequence, one direct get for an age
//! limit) through async-nats; the verdicts are `deltasync_core`'s (`recovery::classify`,
//! `retention`). Changes nothing on the server.

use crate::connect::{position_headroom, stream_bounds_and_limits, NatsError};
use async_nats::jetstream::{self, stream::RawMessageErrorKind};
use deltasync_config::settings::Settings;
use deltasync_core::names;
use deltasync_core::recovery::{classify, Classified};
use deltasync_core::retention::{
    rate_and_oldest_age, PositionHeadroom, StreamBounds, StreamLimits,
};
use serde::Serialize;
use std::time::SystemTime;

/// The stream's extent, recent rate and its own limits.
#[derive(Debug, Clone, PartialEq, Serialize)]
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
    /// Age of the oldest message retained (`None`: the stream is empty).
    pub oldest_age_secs: Option<f64>,
    /// Messages per second over the retained window (the rate headroom is judged at).
    pub rate_per_sec: Option<f64>,
    /// The stream's own limits, as the server holds them (not the caller's settings);
    /// -1 is unlimited, as in the stream configuration.
    pub max_messages: i64,
    pub max_bytes: i64,
    /// 0 is unlimited.
    pub max_age_secs: f64,
    /// False when the stream discards new messages (publishes fail instead of pruning).
    pub discard_old: bool,
}

impl StreamStatus {
    /// The status of stream `name` with bounds `b` and its own `limits`, at `now`.
    pub fn of(name: String, b: &StreamBounds, limits: &StreamLimits, now: SystemTime) -> Self {
        let unlimited = |v: Option<u64>| v.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX));
        let (rate, oldest_age) = rate_and_oldest_age(b, now);
        StreamStatus {
            name,
            first_seq: b.first_seq,
            last_seq: b.last_seq,
            messages: b.messages,
            bytes: b.bytes,
            oldest_age_secs: oldest_age,
            rate_per_sec: rate,
            max_messages: unlimited(limits.max_messages),
            max_bytes: unlimited(limits.max_bytes),
            max_age_secs: limits.max_age.map_or(0.0, |a| a.as_secs_f64()),
            discard_old: limits.discard_old,
        }
    }
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

/// A durable consumer of the stream as a status lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct DurableConsumer {
    /// The consumer's name.
    pub name: String,
    /// Its acknowledged floor: the stream sequence everything up to is acknowledged.
    pub position: u64,
    /// Seconds since it was last delivered a message, if ever.
    pub idle_secs: Option<f64>,
}

/// The pipeline's stream, read once for a status: its status, bounds and own limits, and the
/// handle further reads go through.
#[derive(Debug)]
pub struct StreamView {
    /// As `status` shows it.
    pub status: StreamStatus,
    /// Its extent.
    pub bounds: StreamBounds,
    /// Its own retention limits (not the caller's settings).
    pub limits: StreamLimits,
    /// When it was read (ages and rates are judged at this time).
    pub at: SystemTime,
    stream: jetstream::stream::Stream,
    subject: String,
}

impl StreamView {
    /// Reads the pipeline's stream (info: bounds and limits). Fails with
    /// [`NatsError::StreamNotFound`] when it does not exist.
    pub async fn read(js: &jetstream::Context, settings: &Settings) -> Result<Self, NatsError> {
        let name = names::stream_name(&settings.pipeline);
        let (bounds, limits) = stream_bounds_and_limits(js, settings).await?;
        let stream = js
            .get_stream(&name)
            .await
            .map_err(|source| NatsError::StreamInfo {
                stream: name.clone(),
                source,
            })?;
        let at = SystemTime::now();
        Ok(StreamView {
            status: StreamStatus::of(name, &bounds, &limits, at),
            bounds,
            limits,
            at,
            stream,
            subject: names::subject(&settings.pipeline),
        })
    }

    /// The stream's durable consumers (replicas' and operators'; ephemeral readers are left
    /// out), each with its acknowledged position and how long it has been idle, by name.
    pub async fn durable_consumers(&self) -> Result<Vec<DurableConsumer>, async_nats::Error> {
        use futures::TryStreamExt;
        let infos: Vec<jetstream::consumer::Info> = self.stream.consumers().try_collect().await?;
        let now = self
            .at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let mut out: Vec<DurableConsumer> = infos
            .into_iter()
            .filter(|i| i.config.durable_name.is_some())
            .map(|info| DurableConsumer {
                idle_secs: info.delivered.last_active.map(|t| {
                    let ts = t.unix_timestamp_nanos() as f64 / 1e9;
                    (now - ts).max(0.0)
                }),
                position: info.ack_floor.stream_sequence,
                name: info.name,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The headroom of stream position `position` under the stream's own limits.
    pub async fn headroom(&self, position: u64) -> PositionHeadroom {
        position_headroom(
            &self.stream,
            &self.subject,
            &self.bounds,
            &self.limits,
            position,
            self.at,
        )
        .await
    }

    /// The newest envelope within the last `lookback` messages, and how many foreign
    /// messages follow it.
    pub async fn head_envelope(
        &self,
        lookback: u64,
    ) -> Result<(Option<HeadEnvelope>, u64), async_nats::Error> {
        let b = &self.bounds;
        let mut foreign = 0;
        let mut s = b.last_seq;
        let floor = b.first_seq.max(b.last_seq.saturating_sub(lookback));
        while s >= floor && s > 0 {
            match self.stream.get_raw_message(s).await {
                Ok(m) => match classify(&m.payload) {
                    Classified::Envelope(e) => {
                        let head = HeadEnvelope {
                            lineage: e.lineage.to_hex(),
                            seq: e.seq,
                            part: e.part,
                            parts: e.parts,
                            digest: e.digest.to_hex(),
                            stream_seq: s,
                            produced_at_ms: e.produced_at_ms,
                        };
                        return Ok((Some(head), foreign));
                    }
                    Classified::Foreign { .. } => foreign += 1,
                },
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(e.into()),
            }
            s -= 1;
        }
        Ok((None, foreign))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_stream_status_writes_missing_limits_as_the_configuration_does() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let b = StreamBounds {
            first_seq: 11,
            last_seq: 30,
            messages: 20,
            bytes: 2_000,
            first_ts: Some(now - Duration::from_secs(10)),
        };
        let limits = StreamLimits {
            max_messages: Some(100),
            max_bytes: None,
            max_age: Some(Duration::from_secs(60)),
            discard_old: true,
        };
        let s = StreamStatus::of("S".into(), &b, &limits, now);
        assert_eq!(
            (s.first_seq, s.last_seq, s.messages, s.bytes),
            (11, 30, 20, 2_000)
        );
        assert_eq!(
            (s.max_messages, s.max_bytes, s.max_age_secs),
            (100, -1, 60.0)
        );
        assert!(s.discard_old);
        assert_eq!(s.oldest_age_secs, Some(10.0));
        let (rate, age) = rate_and_oldest_age(&b, now);
        assert_eq!((s.rate_per_sec, s.oldest_age_secs), (rate, age));
    }
}
