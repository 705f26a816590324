//! How much more a stream can take before its retention prunes a position: the headroom
//! that `deltasync-consumer status`, a consumer's `/v1/status` and `deltasync-producer
//! status` show. Pure; `deltasync-nats` reads the stream's bounds and limits from the server.
//!
//! ## Invariants
//!
//! - Headroom is judged by the stream's own limits ([`StreamLimits`], its configuration on
//!   the server), never by a caller's settings, and is the minimum over every limit that
//!   prunes: messages, bytes (in messages of the stream's mean stored size) and age.

use std::time::{Duration, SystemTime};

/// How much more the stream can take before retention prunes a position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Headroom {
    pub messages: Option<u64>,
    pub secs: Option<f64>,
    pub limit: Option<&'static str>,
}

/// Headroom of a position `lag` messages behind the head, under `limits`, for a stream that
/// stores `messages` messages in `bytes` bytes and grows at `rate` messages per second;
/// `next_age_secs` is the age of the first message after the position (`None` when there
/// is none yet). Each limit gives a number of messages (and, at the rate, seconds):
///
/// - messages: `max_messages - lag`;
/// - bytes: `max_bytes / (bytes / messages) - lag`, the mean stored message size standing
///   in for the size of the messages still to come;
/// - age: `max_age - next_age` seconds, times the rate in messages.
///
/// The headroom is the minimum of those; with discard new nothing is pruned for count or
/// size (publishes fail instead), so only age counts.
pub fn headroom(
    limits: &StreamLimits,
    messages: u64,
    bytes: u64,
    lag: u64,
    rate: Option<f64>,
    next_age_secs: Option<f64>,
) -> Headroom {
    let mut candidates: Vec<(&'static str, Option<u64>, Option<f64>)> = Vec::new();
    let in_secs = |m: u64| rate.filter(|r| *r > 0.0).map(|r| m as f64 / r);
    if limits.discard_old {
        if let Some(max) = limits.max_messages {
            let m = max.saturating_sub(lag);
            candidates.push(("messages", Some(m), in_secs(m)));
        }
        if let Some(max) = limits.max_bytes {
            if messages > 0 && bytes > 0 {
                // Messages that fit: max_bytes / mean size, rounded down.
                let fit = (u128::from(max) * u128::from(messages) / u128::from(bytes)) as u64;
                let m = fit.saturating_sub(lag);
                candidates.push(("bytes", Some(m), in_secs(m)));
            }
        }
    }
    if let Some(max_age) = limits.max_age {
        let secs = (max_age.as_secs_f64() - next_age_secs.unwrap_or(0.0)).max(0.0);
        let m = rate.filter(|r| *r > 0.0).map(|r| (secs * r).floor() as u64);
        candidates.push(("age", m, Some(secs)));
    }
    let messages = candidates.iter().filter_map(|c| c.1).min();
    let secs = candidates
        .iter()
        .filter_map(|c| c.2)
        .min_by(|a, b| a.total_cmp(b));
    // The binding limit: the smallest in seconds when the rate is known, else in messages.
    let limit = candidates
        .iter()
        .filter(|c| c.2.is_some())
        .min_by(|a, b| {
            a.2.unwrap_or(f64::INFINITY)
                .total_cmp(&b.2.unwrap_or(f64::INFINITY))
        })
        .or_else(|| {
            candidates
                .iter()
                .filter(|c| c.1.is_some())
                .min_by_key(|c| c.1)
        })
        .map(|c| c.0);
    Headroom {
        messages,
        secs,
        limit,
    }
}

/// The rate headroom is judged at (messages per second over the retained window) and the
/// age of the oldest retained message, in seconds, at `now`.
pub fn rate_and_oldest_age(
    b: &StreamBounds,
    now: std::time::SystemTime,
) -> (Option<f64>, Option<f64>) {
    let oldest_age = b
        .first_ts
        .and_then(|t| now.duration_since(t).ok())
        .map(|d| d.as_secs_f64());
    let rate = oldest_age
        .filter(|a| *a > 0.0 && b.messages > 1)
        .map(|a| b.messages as f64 / a);
    (rate, oldest_age)
}

/// A stream position's headroom as the stream stands: what `status` shows for every consumer
/// and a running consumer's `/v1/status` for itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PositionHeadroom {
    /// Stream messages after the position.
    pub lag: u64,
    /// The position is already pruned (its next message is gone): a re-snapshot is due.
    pub pruned: bool,
    /// By [`headroom`] (all zero when pruned).
    pub headroom: Headroom,
}

/// Where the envelope stream currently starts and ends. A consumer whose next envelope is
/// below `first_seq` has been pruned past and must restore a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamBounds {
    /// Lowest stream sequence still stored (`last_seq + 1` when the stream is empty).
    pub first_seq: u64,
    /// Highest stream sequence ever assigned (0 when nothing was ever published).
    pub last_seq: u64,
    /// Messages currently stored.
    pub messages: u64,
    /// Bytes currently stored.
    pub bytes: u64,
    /// When the oldest stored message was stored; `None` when the stream is empty.
    pub first_ts: Option<SystemTime>,
}

/// The retention limits a stream really has: read from its own configuration on the server,
/// which an operator (or another deployment's settings) may have set differently from the
/// caller's settings. `None` is "no limit".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// The tighter of `max_messages` and `max_messages_per_subject` (the envelope stream has
    /// one subject, so both count the same messages).
    pub max_messages: Option<u64>,
    /// `max_bytes`.
    pub max_bytes: Option<u64>,
    /// `max_age`.
    pub max_age: Option<Duration>,
    /// Retention removes old messages to make room (discard old). With discard new the
    /// server refuses publishes instead and never prunes for space.
    pub discard_old: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn limits(messages: Option<u64>, bytes: Option<u64>, age: Option<u64>) -> StreamLimits {
        StreamLimits {
            max_messages: messages,
            max_bytes: bytes,
            max_age: age.map(Duration::from_secs),
            discard_old: true,
        }
    }

    #[test]
    fn headroom_by_bytes_counts_how_many_messages_of_the_mean_size_fit() {
        // 4 MiB of ~10 KiB envelopes: about 400 fit, whatever max_messages says.
        let l = limits(Some(1_000_000), Some(4 << 20), None);
        let h = headroom(&l, 100, 100 * 10_240, 100, Some(10.0), None);
        assert_eq!(h.messages, Some(409 - 100));
        assert_eq!(h.limit, Some("bytes"));
        assert_eq!(h.secs, Some(30.9));
    }

    #[test]
    fn headroom_by_age_is_what_remains_of_the_next_messages_life() {
        let l = limits(Some(1_000_000), None, Some(60));
        let h = headroom(&l, 10, 1000, 5, Some(2.0), Some(50.0));
        assert_eq!(
            (h.messages, h.secs, h.limit),
            (Some(20), Some(10.0), Some("age"))
        );
        // Without a rate, the age limit gives seconds only; messages come from the count.
        let h = headroom(&l, 10, 1000, 5, None, Some(50.0));
        assert_eq!((h.messages, h.secs), (Some(999_995), Some(10.0)));
        // Discard new: count and size never prune.
        let mut l = limits(Some(10), Some(10), None);
        l.discard_old = false;
        assert_eq!(headroom(&l, 10, 1000, 5, Some(1.0), None).messages, None);
    }

    proptest! {
        /// The headroom never exceeds what any single limit allows.
        #[test]
        fn headroom_is_the_minimum_over_every_limit(
            max_messages in proptest::option::of(1u64..10_000),
            max_bytes in proptest::option::of(1u64..10_000_000),
            max_age in proptest::option::of(1u64..100_000),
            messages in 1u64..10_000,
            mean in 1u64..100_000,
            lag in 0u64..20_000,
            rate in proptest::option::of(0.01f64..1000.0),
            next_age in proptest::option::of(0.0f64..200_000.0),
        ) {
            let l = limits(max_messages, max_bytes, max_age);
            let h = headroom(&l, messages, messages * mean, lag, rate, next_age);
            if let (Some(m), Some(max)) = (h.messages, max_messages) {
                prop_assert!(m <= max.saturating_sub(lag));
            }
            if let (Some(m), Some(max)) = (h.messages, max_bytes) {
                prop_assert!(m <= (max / mean).saturating_sub(lag));
            }
            if let (Some(s), Some(age)) = (h.secs, max_age) {
                prop_assert!(s <= age as f64);
            }
            let any = max_messages.is_some() || max_bytes.is_some();
            prop_assert_eq!(h.messages.is_some(), any || (max_age.is_some() && rate.is_some()));
        }
    }
}
