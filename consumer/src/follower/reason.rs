//! Why the replica takes the path it takes: the reason of every start-up decision and
//! re-snapshot, decided by the follower (and, at start-up, by the engine from the follower's
//! judgement), carried by change batches, and shown as the `reason` label of logs, metrics
//! and `/v1/status`.
//!
//! Talks to nothing.
//!
//! ## Adding a reason
//!
//! Everything a reason needs is in this file, and the compiler asks for each (every `match`
//! below is exhaustive): the variant with its doc comment, its label in [`Reason::as_str`]
//! (and its place in [`Reason::ALL`]: the tests below check both against serde's name), the
//! level it is logged at ([`Reason::level`]) and, if a replica can give up on it, the advice
//! it gives up with ([`Reason::give_up_advice`]). Then decide it in the follower
//! (`follower.rs`), test that, and add a row to the README's "Resync reasons and what to do".

use serde::Serialize;

/// Why the replica took the path it took; the label of logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The local cursor continues the retained history: follow from it.
    Resume,
    /// No local state: load the latest snapshot.
    Bootstrap,
    /// The envelopes after the position are no longer in the stream.
    Pruned,
    /// The stream or the latest snapshot belongs to another lineage.
    LineageChanged,
    /// An envelope is missing from the stream.
    Gap,
    /// The replica's digest after a transaction differs from the producer's.
    DigestMismatch,
    /// The local replica does not match its stored digest.
    CorruptLocal,
    /// The stream forks the replica's history: an envelope reuses a sequence the replica
    /// has at a later stream position or with another digest, or the stream ends before the
    /// replica's position (purged or recreated).
    Fork,
}

impl Reason {
    /// Every reason, in label order.
    pub const ALL: [Reason; 8] = [
        Reason::Resume,
        Reason::Bootstrap,
        Reason::Pruned,
        Reason::LineageChanged,
        Reason::Gap,
        Reason::DigestMismatch,
        Reason::CorruptLocal,
        Reason::Fork,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Resume => "resume",
            Reason::Bootstrap => "bootstrap",
            Reason::Pruned => "pruned",
            Reason::LineageChanged => "lineage_changed",
            Reason::Gap => "gap",
            Reason::DigestMismatch => "digest_mismatch",
            Reason::CorruptLocal => "corrupt_local",
            Reason::Fork => "fork",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Reason {
    /// The level the decision is logged at: `INFO` for the start-up paths that need no
    /// re-snapshot of a damaged history (resume, bootstrap), `ERROR` for a replica or a
    /// history that diverged (data an operator must look at), `WARN` for the rest.
    pub fn level(self) -> tracing::Level {
        match self {
            Reason::Resume | Reason::Bootstrap => tracing::Level::INFO,
            Reason::DigestMismatch | Reason::CorruptLocal | Reason::Fork => tracing::Level::ERROR,
            Reason::Pruned | Reason::LineageChanged | Reason::Gap => tracing::Level::WARN,
        }
    }

    /// What an operator can do when re-snapshots for this reason keep failing (the consumer
    /// gives up with it); `None` when the last error says enough.
    pub fn give_up_advice(self) -> Option<&'static str> {
        match self {
            Reason::Pruned => Some(
                "the stream prunes envelopes before this replica reaches them, even from the \
                 newest snapshot: it cannot keep up. Retain more history (stream.max_messages, \
                 stream.max_age) or snapshot more often",
            ),
            Reason::Fork => Some(
                "the stream holds a history that forks the newest snapshot's (sequences reused \
                 at later stream positions, or a stream purged or recreated behind the bucket): \
                 it cannot be followed until a snapshot past the fork is written or the \
                 pipeline starts a new lineage",
            ),
            Reason::Resume
            | Reason::Bootstrap
            | Reason::LineageChanged
            | Reason::Gap
            | Reason::DigestMismatch
            | Reason::CorruptLocal => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_label_is_the_serialized_name_and_all_lists_each_reason_once() {
        let mut seen = std::collections::BTreeSet::new();
        for r in Reason::ALL {
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str(), "{r:?}");
            assert_eq!(r.to_string(), r.as_str());
            assert!(seen.insert(r.as_str()), "{r:?} listed twice");
        }
    }

    #[test]
    fn the_labels_stay_what_metrics_status_and_logs_show() {
        let labels: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            labels,
            [
                "resume",
                "bootstrap",
                "pruned",
                "lineage_changed",
                "gap",
                "digest_mismatch",
                "corrupt_local",
                "fork"
            ]
        );
    }

    #[test]
    fn divergence_is_logged_as_an_error_and_start_up_paths_as_info() {
        use tracing::Level;
        let levels: Vec<(Reason, Level)> = Reason::ALL.iter().map(|r| (*r, r.level())).collect();
        assert_eq!(
            levels,
            [
                (Reason::Resume, Level::INFO),
                (Reason::Bootstrap, Level::INFO),
                (Reason::Pruned, Level::WARN),
                (Reason::LineageChanged, Level::WARN),
                (Reason::Gap, Level::WARN),
                (Reason::DigestMismatch, Level::ERROR),
                (Reason::CorruptLocal, Level::ERROR),
                (Reason::Fork, Level::ERROR),
            ]
        );
    }

    #[test]
    fn only_pruned_and_fork_give_up_with_advice() {
        let advised: Vec<Reason> = Reason::ALL
            .into_iter()
            .filter(|r| r.give_up_advice().is_some())
            .collect();
        assert_eq!(advised, [Reason::Pruned, Reason::Fork]);
        assert!(Reason::Pruned
            .give_up_advice()
            .unwrap()
            .contains("Retain more history"));
    }
}
