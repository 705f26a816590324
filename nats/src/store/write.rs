//! The store's write side, what the producer and the `snapshot` command use: writing a
//! snapshot of a state (blobs, manifest, then `latest` by compare-and-set) after fencing the
//! writer, and garbage collection after it.
//!
//! Talks to JetStream: a direct get on the pipeline's stream (the envelope at the cut),
//! pipelined publishes of blobs to `$KV.<bucket>.<key>`, KV puts and the compare-and-set of
//! `latest`. Planning is `deltasync_core::snapshot::plan`; the fencing rules are
//! `deltasync_core::snapshot::fence`'s.

use super::{bucket, gc, list_revisions, read_manifest, read_pointer, StoreError};
use async_nats::jetstream::{self, kv};
use deltasync_config::settings::Settings;
use deltasync_core::codec::classify;
use deltasync_core::names;
use deltasync_core::snapshot::fence::{may_replace_latest, needs_latest_manifest};
use deltasync_core::snapshot::{
    self, encode_manifest, encode_pointer, manifest_key, Cut, Manifest, Pointer, LATEST_KEY,
};
use deltasync_core::state::State;
use futures::{StreamExt, TryStreamExt};
use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;

/// Writes a snapshot of `state` — a consistent cut whose envelope `state.seq()` is stored at
/// `stream_seq` — and moves `latest` to it. `prev` is the previous snapshot and the state it
/// describes (both kept by the writer), which lets this one be incremental.
///
/// Blobs of `prev` the bucket holds as `prev` left them (last written before its manifest)
/// are reused, not written again; one removed or overwritten since is written again. Another
/// writer's garbage collection may remove them meanwhile (a cron'd `snapshot` next to the
/// producer): after the manifest is stored and right before `latest` moves, every reused blob
/// is checked again, and if one is gone or was written since, the snapshot is cut again as a
/// new base that reuses nothing, so `latest` never names a manifest whose blobs are not all in
/// the bucket as it was cut.
pub async fn write_snapshot(
    js: &jetstream::Context,
    settings: &Settings,
    state: &State,
    stream_seq: u64,
    prev: Option<(&Manifest, &State)>,
) -> Result<Manifest, StoreError> {
    write_snapshot_with_hook(js, settings, state, stream_seq, prev, || Box::pin(async {})).await
}

/// [`write_snapshot`], running `before_manifest` after the reuse decision and the blob
/// writes, before the manifest is stored: tests use it to interleave another writer's
/// garbage collection deterministically. Not for other uses.
#[doc(hidden)]
pub async fn write_snapshot_with_hook(
    js: &jetstream::Context,
    settings: &Settings,
    state: &State,
    stream_seq: u64,
    prev: Option<(&Manifest, &State)>,
    before_manifest: impl FnOnce() -> futures::future::BoxFuture<'static, ()>,
) -> Result<Manifest, StoreError> {
    let kv = bucket(js, settings).await?;
    let cut = Cut {
        lineage: state.lineage(),
        seq: state.seq(),
        stream_seq,
        digest: state.digest(),
    };
    check_in_history(js, settings, &cut).await?;
    let (_, latest_rev) = check_not_stale(&kv, &cut).await?;

    // The previous snapshot's blobs are not written again while the bucket holds them as that
    // snapshot left them. One that is gone (purged, lost), or written since its manifest (an
    // overwrite: the key no longer names its content), would stay referenced by every
    // snapshot stacked on that base, and no replica could load them: cut a new base instead,
    // writing those again.
    let wait = settings.nats.request_timeout;
    let listed = match prev {
        Some(_) => list_revisions(js, &kv, wait).await?,
        None => HashMap::new(),
    };
    let known: HashSet<String> = prev
        .map(|(m, _)| sound_blobs(m, &listed).collect())
        .unwrap_or_default();
    let prev = match prev {
        Some((m, s)) => {
            let unsound: Vec<String> = m.blob_keys().filter(|k| !known.contains(k)).collect();
            if unsound.is_empty() {
                Some((m, s))
            } else {
                let missing = unsound.iter().filter(|k| !listed.contains_key(*k)).count();
                tracing::warn!(
                    missing,
                    written_since = unsound.len() - missing,
                    first = %unsound[0],
                    prev_seq = m.seq,
                    "Blobs of the previous snapshot are missing from the bucket or were written after it; cutting a new base that writes them again"
                );
                None
            }
        }
        None => None,
    };
    let mut manifest = write_blobs(js, settings, state, stream_seq, prev, &known).await?;
    before_manifest().await;
    let key = manifest_key(manifest.lineage, manifest.seq);
    put_manifest(&kv, &key, &manifest).await?;
    // Re-check what this snapshot reuses, now that its manifest protects it from any later
    // collection: a collection that ran since the reuse decision may have removed some.
    let reused: Vec<String> = manifest.blob_keys().filter(|k| known.contains(k)).collect();
    if !reused.is_empty() {
        let now = list_revisions(js, &kv, wait).await?;
        let gone: Vec<&String> = reused
            .iter()
            .filter(|k| now.get(*k) != listed.get(*k))
            .collect();
        if !gone.is_empty() {
            tracing::warn!(
                gone = gone.len(),
                first = %gone[0],
                seq = manifest.seq,
                "Blobs this snapshot reused were removed or written again meanwhile (another writer's garbage collection, or an overwrite); cutting it again as a new base"
            );
            manifest = write_blobs(js, settings, state, stream_seq, None, &HashSet::new()).await?;
            put_manifest(&kv, &key, &manifest).await?;
        }
    }
    let pointer = encode_pointer(&Pointer {
        lineage: manifest.lineage,
        seq: manifest.seq,
        manifest: key,
    })?;
    match latest_rev {
        Some(rev) => kv
            .update(LATEST_KEY, pointer.into(), rev)
            .await
            .map(|_| ())
            .map_err(|e| StoreError::Raced { source: e.into() })?,
        None => kv
            .create(LATEST_KEY, pointer.into())
            .await
            .map(|_| ())
            .map_err(|e| StoreError::Raced { source: e.into() })?,
    }
    if let Err(e) = gc(&kv, settings).await {
        tracing::warn!(error = %e, "Snapshot garbage collection failed; it will be retried after the next snapshot");
    }
    Ok(manifest)
}

/// The blobs of `prev` the bucket holds as `prev` left them: listed (`revisions`: key → the
/// revision of its last write) at a revision below its manifest's. A blob is written before
/// the manifests that reference it, so one written after `prev`'s manifest was overwritten,
/// or written again by another writer (the same bytes, but nothing says so: it is written
/// once more). Without `prev`'s manifest in the listing (removed by another writer) none is.
fn sound_blobs<'a>(
    prev: &'a Manifest,
    revisions: &'a HashMap<String, u64>,
) -> impl Iterator<Item = String> + 'a {
    let bound = revisions
        .get(&manifest_key(prev.lineage, prev.seq))
        .copied();
    prev.blob_keys()
        .filter(move |k| matches!((revisions.get(k), bound), (Some(r), Some(b)) if *r < b))
}

/// Blobs encoded ahead of the writes in flight: with [`WRITES_IN_FLIGHT`], what a snapshot
/// holds in memory at once (about 8 MiB at the default 512 KiB chunk target), however large
/// the state.
const BLOBS_AHEAD: usize = 4;

/// Blob writes awaiting their acknowledgement at once. Fewer than the store's reads: a
/// loopback server keeps up with a dozen 512 KiB publishes, and each one held costs its
/// bytes.
const WRITES_IN_FLIGHT: usize = 12;

/// Lowers the calling thread's scheduling priority (nice 10), for background work that must
/// not slow the foreground; a failure leaves it as it was.
fn background_priority() {
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), 10) {
        tracing::debug!(error = %e, "Cannot lower the snapshot thread's priority");
    }
}

/// Plans a snapshot of `state` (incremental on `prev` when given) and writes its blobs except
/// those in `known` (already in the bucket). Returns the manifest, not yet stored.
///
/// The plan runs on a thread of its own, at a lower priority, and hands each blob over as it
/// is encoded; blobs are written while the next are cut, so only the few in flight are held,
/// never the whole snapshot (a new base of a state is as large as its payload).
async fn write_blobs(
    js: &jetstream::Context,
    settings: &Settings,
    state: &State,
    stream_seq: u64,
    prev: Option<(&Manifest, &State)>,
    known: &HashSet<String>,
) -> Result<Manifest, StoreError> {
    let target = settings.snapshot.chunk_target_bytes;
    let max_blob = (settings.stream.max_message_bytes.max(4096) as usize).saturating_sub(16 * 1024);
    let state_for_plan = state.clone();
    let prev_owned = prev.map(|(m, s)| (m.clone(), s.clone()));
    let created = deltasync_core::envelope::now_ms();
    let (tx, rx) = tokio::sync::mpsc::channel::<snapshot::Blob>(BLOBS_AHEAD);
    let (done, planned) = tokio::sync::oneshot::channel();
    // A thread of its own at a lower priority: the plan and the writes it feeds overlap, and
    // at the same priority they took both cores from the engine and publisher, whose publish
    // rate during a snapshot fell to ~0.6× of the rate without one (the target is ≥ 0.8×).
    let spawned = std::thread::Builder::new()
        .name("deltasync-snapshot".into())
        .spawn(move || {
            background_priority();
            let planned = snapshot::plan_each(
                &state_for_plan,
                stream_seq,
                prev_owned.as_ref().map(|(m, s)| (m, s)),
                target,
                max_blob,
                created,
                // A closed channel: the writes failed, the plan stops.
                &mut |blob| match tx.blocking_send(blob) {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(_) => ControlFlow::Break(()),
                },
            );
            let _ = done.send(planned);
        });
    let planning = |e: String| StoreError::Write {
        key: "(planning)".into(),
        source: e.into(),
    };
    spawned.map_err(|e| planning(format!("cannot start the snapshot thread: {e}")))?;

    let bucket_name = names::bucket_name(&settings.pipeline);
    let mut written = 0u64;
    let blobs = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|blob| (blob, rx))
    })
    .filter(|b| futures::future::ready(!known.contains(&b.key)))
    .map(|b| {
        written += b.bytes.len() as u64;
        let subject = format!("$KV.{bucket_name}.{}", b.key);
        async move {
            let werr = |e: async_nats::Error| StoreError::Write {
                key: b.key.clone(),
                source: e,
            };
            let ack = js
                .publish(subject, b.bytes)
                .await
                .map_err(|e| werr(e.into()))?;
            ack.await.map_err(|e| werr(e.into()))?;
            Ok::<(), StoreError>(())
        }
    })
    .buffer_unordered(WRITES_IN_FLIGHT)
    .try_for_each(|()| futures::future::ready(Ok(())))
    .await;
    // On a failed write the channel is closed by now (dropped with the stream): the plan
    // stops at its next blob, and this waits for no more than that.
    let planned = planned
        .await
        .map_err(|_| planning("the snapshot thread stopped before its plan ended".into()))?;
    blobs?;
    let mut manifest = match planned? {
        ControlFlow::Continue(manifest) => manifest,
        ControlFlow::Break(()) => {
            return Err(planning(
                "the blob writer stopped before the plan ended".into(),
            ))
        }
    };
    manifest.bytes_written = written;
    Ok(manifest)
}

async fn put_manifest(kv: &kv::Store, key: &str, manifest: &Manifest) -> Result<(), StoreError> {
    let encoded = encode_manifest(manifest)?;
    kv.put(key, encoded.into())
        .await
        .map(|_| ())
        .map_err(|e| StoreError::Write {
            key: key.to_string(),
            source: e.into(),
        })
}

/// Fencing: the envelope at `stream_seq` must be `state`'s position in `state`'s lineage
/// (the rule is `Cut::check`'s; this reads the envelope).
async fn check_in_history(
    js: &jetstream::Context,
    settings: &Settings,
    cut: &Cut,
) -> Result<(), StoreError> {
    if !cut.needs_fencing() {
        return Ok(()); // a new lineage's empty start: nothing to be part of yet
    }
    let not_in = |reason: String| StoreError::NotInHistory {
        lineage: cut.lineage.to_hex(),
        seq: cut.seq,
        stream_seq: cut.stream_seq,
        reason,
    };
    let name = names::stream_name(&settings.pipeline);
    let stream = js
        .get_stream(&name)
        .await
        .map_err(|e| not_in(e.to_string()))?;
    let msg = stream
        .direct_get(cut.stream_seq)
        .await
        .map_err(|e| not_in(e.to_string()))?;
    cut.check(&classify(&msg.payload))
        .map_err(|mismatch| not_in(mismatch.to_string()))
}

/// Refuses to move `latest` backwards (the rule is `may_replace_latest`'s; this reads the
/// pointer, and the manifest it names when the rule needs it); returns the pointer and
/// revision.
async fn check_not_stale(
    kv: &kv::Store,
    cut: &Cut,
) -> Result<(Option<Pointer>, Option<u64>), StoreError> {
    let Some((p, rev)) = read_pointer(kv).await? else {
        return Ok((None, None));
    };
    let latest_manifest = if needs_latest_manifest(&p, cut) {
        match read_manifest(kv, &p.manifest).await {
            Ok(m) => Some(m),
            // A latest pointer whose manifest is gone or corrupt protects nothing.
            Err(StoreError::Missing { .. } | StoreError::Corrupt { .. }) => None,
            Err(e) => return Err(e),
        }
    } else {
        None
    };
    may_replace_latest(&p, latest_manifest.as_ref(), cut).map_err(|stale| StoreError::Stale {
        latest_lineage: stale.latest_lineage.to_hex(),
        latest_seq: stale.latest_seq,
        seq: cut.seq,
    })?;
    Ok((Some(p), Some(rev)))
}
