//! The store's garbage collection: removing manifests beyond the ones kept and blobs no
//! remaining manifest references, once they are old enough on the server's clock.
//!
//! Talks to JetStream's KV bucket (listing, entry times, the bucket's newest write, purges at
//! a revision); what may go is `deltasync_core::snapshot::gc`'s verdict.

use super::{list_keys, read_manifest, read_manifests, read_pointer, server_ms, StoreError};
use async_nats::jetstream::kv;
use deltasync_config::settings::Settings;
use deltasync_core::snapshot::gc::{referenced_blobs, unreferenced_blob, Policy};
use deltasync_core::snapshot::Manifest;
use std::collections::HashSet;

/// What garbage collection removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub manifests_removed: usize,
    pub blobs_removed: usize,
}

/// Removes manifests beyond the newest `snapshot.keep` once their successor is older than
/// `snapshot.gc_grace` (a reader mid-download of one keeps working), then blobs no remaining
/// manifest references that were written more than `gc_grace` ago.
///
/// Ages are judged on the server's clock only: the time the server stored each key
/// (manifests and blobs alike) against the time it stored the bucket's newest write (a
/// lower bound of "now" that no writer's clock skews; just after a snapshot it is that
/// snapshot's `latest`). Manifests written meanwhile by another writer are read again right
/// before blobs are removed, and a blob is removed only at the revision whose age was judged,
/// so one written again since is kept. What may go is `deltasync_core::snapshot::gc`'s verdict;
/// this lists, reads the server's times, re-checks and purges.
pub async fn gc(kv: &kv::Store, settings: &Settings) -> Result<GcReport, StoreError> {
    let policy = Policy::new(settings.snapshot.keep, settings.snapshot.gc_grace);
    let now = server_now_ms(kv).await?;
    let latest = read_pointer(kv).await?.map(|(p, _)| p.manifest);
    let manifests = list_manifests_stored(kv).await?;
    let stored: Vec<(&str, u64)> = manifests
        .iter()
        .map(|(key, _, stored_ms)| (key.as_str(), *stored_ms))
        .collect();
    let removable = policy.removable_manifests(now, latest.as_deref(), &stored);
    let mut report = GcReport::default();
    let mut remaining = Vec::new();
    for ((key, m, _), removable) in manifests.iter().zip(removable) {
        if removable {
            kv.purge(key).await.map_err(|e| StoreError::Write {
                key: key.clone(),
                source: e.into(),
            })?;
            report.manifests_removed += 1;
        } else {
            remaining.push(m);
        }
    }
    let mut referenced = referenced_blobs(remaining);
    let mut doomed = Vec::new();
    for key in list_keys(kv).await? {
        if !unreferenced_blob(&key, &referenced) {
            continue;
        }
        let entry = kv.entry(&key).await.map_err(|e| StoreError::Read {
            key: key.clone(),
            source: e.into(),
        })?;
        let Some(entry) = entry else { continue };
        if policy.old_enough(now, server_ms(entry.created.unix_timestamp_nanos())) {
            doomed.push((key, entry.revision));
        }
    }
    if doomed.is_empty() {
        return Ok(report);
    }
    // A writer may have stored a manifest reusing some of these since they were listed.
    let seen: HashSet<&str> = manifests.iter().map(|(k, _, _)| k.as_str()).collect();
    for key in list_keys(kv).await? {
        if key.starts_with("manifest.") && !seen.contains(key.as_str()) {
            match read_manifest(kv, &key).await {
                Ok(m) => referenced.extend(m.blob_keys()),
                Err(StoreError::Missing { .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }
    for (key, revision) in doomed {
        if referenced.contains(&key) {
            continue;
        }
        match kv.purge_expect_revision(&key, Some(revision)).await {
            Ok(()) => report.blobs_removed += 1,
            // Written again since its age was judged: it is new, keep it.
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
            Err(e) => {
                return Err(StoreError::Write {
                    key,
                    source: e.into(),
                })
            }
        }
    }
    Ok(report)
}

/// The server's time of the bucket's newest write, in milliseconds since the epoch.
async fn server_now_ms(kv: &kv::Store) -> Result<u64, StoreError> {
    let mut stream = kv.stream.clone();
    let info = stream.info().await.map_err(|e| StoreError::Read {
        key: "(bucket info)".into(),
        source: e.into(),
    })?;
    Ok(server_ms(info.state.last_timestamp.unix_timestamp_nanos()))
}

/// Every manifest with the server's time of storing it, oldest first (by that time).
async fn list_manifests_stored(kv: &kv::Store) -> Result<Vec<(String, Manifest, u64)>, StoreError> {
    let mut out = read_manifests(kv).await?;
    out.sort_by_key(|l| (l.stored_ms, l.manifest.seq, l.revision));
    Ok(out
        .into_iter()
        .map(|l| (l.key, l.manifest, l.stored_ms))
        .collect())
}
