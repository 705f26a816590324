//! The names of a pipeline's NATS resources, derived from the pipeline name alone.
//!
//! Pure functions, no I/O: the producer, the consumers and the operator tools all call these,
//! so they agree on the stream, subject, bucket and consumer names without configuring them,
//! and several pipelines can share one NATS account.
//!
//! ```text
//! pipeline "orders"
//!   stream     DELTASYNC_orders
//!   subject    deltasync.orders.envelopes
//!   KV bucket  deltasync_orders          (its stream: KV_deltasync_orders)
//!   consumer   deltasync_orders_<id>     (id sanitized)
//!   msg id     <lineage hex>-<seq>       (Nats-Msg-Id, for publish deduplication)
//! ```
//!
//! ## Invariants
//!
//! - Given a pipeline name that passed `Settings::validate` (`[A-Za-z0-9_-]{1,64}`), every
//!   name here is valid for NATS: stream and consumer names contain no `.`, `*`, `>`, path
//!   separators or whitespace; the subject is three literal tokens; the bucket name is
//!   `[A-Za-z0-9_-]+`.

/// The JetStream stream holding the pipeline's envelopes.
pub fn stream_name(pipeline: &str) -> String {
    format!("DELTASYNC_{pipeline}")
}

/// The subject envelopes are published on (the stream's only subject).
pub fn subject(pipeline: &str) -> String {
    format!("deltasync.{pipeline}.envelopes")
}

/// The KV bucket holding the pipeline's snapshot manifests and chunks.
pub fn bucket_name(pipeline: &str) -> String {
    format!("deltasync_{pipeline}")
}

/// Longest consumer name produced; NATS advises keeping names short (they are used in
/// subjects and, on the server, in file names).
pub const MAX_CONSUMER_NAME: usize = 128;

/// The durable consumer of replica `id` on the pipeline's stream.
///
/// Characters a consumer name cannot hold (`.`, `*`, `>`, `/`, `\`, whitespace, controls)
/// and anything outside `[A-Za-z0-9_-]` become `_`; the result is cut to
/// [`MAX_CONSUMER_NAME`] bytes. An empty id becomes `_`.
pub fn consumer_name(pipeline: &str, id: &str) -> String {
    let mut name = format!("deltasync_{pipeline}_");
    if id.is_empty() {
        name.push('_');
    }
    for c in id.chars() {
        if name.len() >= MAX_CONSUMER_NAME {
            break;
        }
        name.push(if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
            c
        } else {
            '_'
        });
    }
    name
}

/// The `Nats-Msg-Id` of envelope `seq` of lineage `lineage_hex`: unique per envelope across
/// lineages, so a retried publish is dropped by the stream's duplicate window.
pub fn msg_id(lineage_hex: &str, seq: u64) -> String {
    format!("{lineage_hex}-{seq}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_embed_the_pipeline() {
        assert_eq!(stream_name("orders"), "DELTASYNC_orders");
        assert_eq!(subject("orders"), "deltasync.orders.envelopes");
        assert_eq!(bucket_name("orders"), "deltasync_orders");
        assert_eq!(
            consumer_name("orders", "replica-1"),
            "deltasync_orders_replica-1"
        );
        assert_eq!(msg_id("00ff", 42), "00ff-42");
    }

    #[test]
    fn two_pipelines_never_share_a_name() {
        for f in [stream_name, subject, bucket_name] {
            assert_ne!(f("a"), f("b"));
        }
        assert_ne!(consumer_name("a", "x"), consumer_name("b", "x"));
        assert_ne!(msg_id("aa", 1), msg_id("ab", 1));
        assert_ne!(msg_id("aa", 1), msg_id("aa", 2));
    }

    #[test]
    fn consumer_names_are_sanitized() {
        let name = consumer_name("p", "host.example.com/a b*c>d\te\\f");
        assert_eq!(name, "deltasync_p_host_example_com_a_b_c_d_e_f");
        for bad in ['.', '*', '>', ' ', '\t', '/', '\\'] {
            assert!(!name.contains(bad));
        }
        assert_eq!(consumer_name("p", ""), "deltasync_p__");
        assert_eq!(consumer_name("p", "é"), "deltasync_p__");
        let long = consumer_name("p", &"x".repeat(500));
        assert_eq!(long.len(), MAX_CONSUMER_NAME);
    }

    #[test]
    fn the_subject_has_three_literal_tokens() {
        let s = subject("my-pipe_1");
        assert_eq!(s.split('.').count(), 3);
        assert!(!s.contains('*') && !s.contains('>') && !s.contains(' '));
    }
}
