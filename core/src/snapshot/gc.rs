//! Garbage collection's pure selection: which snapshot manifests and which blobs the bucket
//! may drop. No I/O: `deltasync-nats`'s `store` (gc side) lists the bucket, reads the server's
//! times, asks these rules, re-checks manifests written meanwhile and purges.
//!
//! ## Invariants
//!
//! - The manifest `latest` names is never removed, nor the newest [`Policy::keep`] (at least
//!   one).
//! - A manifest is removed only once its successor (the next one the server stored) is at
//!   least [`Policy::grace_ms`] old: a reader that picked it just before its successor
//!   arrived has that long to download it.
//! - A blob is removed only when no remaining manifest references it and the server stored
//!   it at least [`Policy::grace_ms`] ago: a writer that just wrote it for a manifest not
//!   yet stored has that long.
//! - Ages are differences of the server's times (each key's time of storing, and the
//!   bucket's newest write standing for "now"); no writer's clock enters.

use super::Manifest;
use std::collections::HashSet;
use std::time::Duration;

/// How much garbage collection keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Newest manifests always kept (at least 1).
    pub keep: usize,
    /// How old a manifest's successor, or an unreferenced blob, must be before removal.
    pub grace_ms: u64,
}

impl Policy {
    /// `snapshot.keep` and `snapshot.gc_grace`; a `keep` of 0 keeps one.
    pub fn new(keep: usize, grace: Duration) -> Policy {
        Policy {
            keep: keep.max(1),
            grace_ms: grace.as_millis() as u64,
        }
    }

    /// Whether something the server stored at `stored_ms` is old enough to go, judged at
    /// `now_ms` (both on the server's clock): at least `grace_ms` old.
    pub fn old_enough(&self, now_ms: u64, stored_ms: u64) -> bool {
        now_ms.saturating_sub(stored_ms) >= self.grace_ms
    }

    /// Which of `manifests` (key and the server's time of storing it, oldest stored first)
    /// may be removed at `now_ms`, one flag per manifest: not among the newest
    /// [`keep`](Policy::keep), not the one `latest` names, and with a successor at least
    /// [`grace_ms`](Policy::grace_ms) old.
    pub fn removable_manifests(
        &self,
        now_ms: u64,
        latest: Option<&str>,
        manifests: &[(&str, u64)],
    ) -> Vec<bool> {
        let n = manifests.len();
        manifests
            .iter()
            .enumerate()
            .map(|(i, (key, _))| {
                let successor_old_enough = manifests
                    .get(i + 1)
                    .is_some_and(|(_, stored_ms)| self.old_enough(now_ms, *stored_ms));
                i + self.keep < n && latest != Some(*key) && successor_old_enough
            })
            .collect()
    }
}

/// Whether `key` names a blob (a chunk or a segment piece) rather than a manifest or the
/// pointer.
pub fn is_blob_key(key: &str) -> bool {
    key.starts_with("chunk.") || key.starts_with("segment.")
}

/// The blobs `manifests` reference.
pub fn referenced_blobs<'a>(manifests: impl IntoIterator<Item = &'a Manifest>) -> HashSet<String> {
    manifests.into_iter().flat_map(|m| m.blob_keys()).collect()
}

/// Whether `key` is a blob no manifest in `referenced` needs: a candidate for removal once
/// [`Policy::old_enough`].
pub fn unreferenced_blob(key: &str, referenced: &HashSet<String>) -> bool {
    is_blob_key(key) && !referenced.contains(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: u64 = 1_000;

    fn policy(keep: usize) -> Policy {
        Policy::new(keep, Duration::from_millis(GRACE))
    }

    #[test]
    fn a_keep_of_zero_keeps_one() {
        assert_eq!(policy(0).keep, 1);
        let all_old = [("m1", 0), ("m2", 0)];
        assert_eq!(
            policy(0).removable_manifests(10_000, None, &all_old),
            vec![true, false]
        );
    }

    #[test]
    fn the_newest_keep_manifests_stay_however_old() {
        let old = [("m1", 0), ("m2", 0), ("m3", 0), ("m4", 0)];
        assert_eq!(
            policy(2).removable_manifests(10_000, None, &old),
            vec![true, true, false, false]
        );
        assert_eq!(
            policy(4).removable_manifests(10_000, None, &old),
            vec![false; 4]
        );
        assert_eq!(
            policy(9).removable_manifests(10_000, None, &old),
            vec![false; 4]
        );
    }

    #[test]
    fn the_manifest_latest_names_is_never_removed() {
        let old = [("m1", 0), ("m2", 0), ("m3", 0)];
        assert_eq!(
            policy(1).removable_manifests(10_000, Some("m1"), &old),
            vec![false, true, false]
        );
    }

    #[test]
    fn a_manifest_goes_only_once_its_successor_is_grace_old_ties_included() {
        let now = 10_000;
        // m2 stored exactly grace ago: m1 may go; m3 stored just under grace ago: m2 stays.
        let stored = [
            ("m1", 0),
            ("m2", now - GRACE),
            ("m3", now - GRACE + 1),
            ("m4", now),
        ];
        assert_eq!(
            policy(1).removable_manifests(now, None, &stored),
            vec![true, false, false, false]
        );
    }

    #[test]
    fn no_manifests_select_nothing() {
        assert!(policy(1).removable_manifests(10_000, None, &[]).is_empty());
    }

    #[test]
    fn age_is_judged_on_the_servers_times_with_the_boundary_old_enough() {
        let p = policy(1);
        assert!(p.old_enough(5_000, 4_000));
        assert!(!p.old_enough(5_000, 4_001));
        // A time of storing after "now" (the bucket's newest write) is new, not negative.
        assert!(!p.old_enough(5_000, 6_000));
        assert!(Policy::new(1, Duration::ZERO).old_enough(5_000, 5_000));
    }

    #[test]
    fn only_unreferenced_chunks_and_segments_are_blob_candidates() {
        let referenced: HashSet<String> = ["chunk.aa".to_string()].into();
        assert!(!unreferenced_blob("chunk.aa", &referenced));
        assert!(unreferenced_blob("chunk.bb", &referenced));
        assert!(unreferenced_blob("segment.cc", &referenced));
        assert!(!unreferenced_blob("latest", &referenced));
        assert!(!unreferenced_blob("manifest.x.1", &referenced));
    }
}
