//! The snapshot store: writes and reads snapshots (see `snapshot` for the format) in the
//! pipeline's KV bucket. Shared by the producer (writing), consumers (bootstrap and
//! incremental re-snapshot) and the ops commands.
//!
//! Talks to JetStream: KV gets and puts, plain pipelined publishes to `$KV.<bucket>.<key>` for
//! blobs, a direct get on the pipeline's stream to fence snapshot writers.
//!
//! ## Invariants
//!
//! - Blobs, then the manifest, then `latest` by compare-and-set: readers never see a
//!   half-written snapshot, and a writer whose state is not part of the stream's history (a
//!   zombie) cannot move `latest`, nor can any writer move it backwards in a lineage, nor to
//!   another lineage's cut at or before the stream position `latest` names (ties refused).
//! - A snapshot is cut only at the last part of a complete transaction: the envelope at its
//!   stream position must be that part, with the state's digest.
//! - Everything read is verified (content hashes, range digests, state digest) before it is
//!   handed out; a failed verification hands out nothing.
//! - A writer re-checks the blobs it reuses after storing its manifest and before moving
//!   `latest`, and cuts a new base if another writer's garbage collection removed one.
//!   Garbage collection judges ages on the server's clock only and removes a blob only at the
//!   revision it judged.
//! - Listings order manifests by what no writer's clock decides: [`list_manifests`] by the
//!   cut's place in the stream's history (then the server's order of writes), garbage
//!   collection by the server's time of storing them. `created_at_ms` is informational.
//! - A manifest's counts are untrusted: loads reserve at most
//!   [`snapshot::MAX_RESERVED_ENTRIES`] table slots whatever it claims.

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use deltasync_config::settings::Settings;
use deltasync_core::change::Change;
use deltasync_core::codec::classify;
use deltasync_core::codec::DecodeError;
use deltasync_core::names;
use deltasync_core::snapshot::fence::{may_replace_latest, needs_latest_manifest};
use deltasync_core::snapshot::gc::{referenced_blobs, unreferenced_blob, Policy};
use deltasync_core::snapshot::{
    self, apply_segment, catch_up_segments, decode_manifest, decode_pointer, differing_ranges,
    encode_manifest, encode_pointer, manifest_key, verify, Cut, Manifest, Pointer, LATEST_KEY,
};
use deltasync_core::state::State;
use futures::{StreamExt, TryStreamExt};
use std::collections::HashSet;
use std::sync::Arc;

/// How many blob reads or writes are in flight at once.
const CONCURRENCY: usize = 32;

/// Most fetched blobs checked and decoded by one blocking task: one per lane of the widest
/// multi-buffer SHA-256 kernel (16 on AVX-512), so their content hashes cost one pass.
const DECODE_BATCH: usize = 16;

/// Decoding tasks in flight while the state applies earlier results: with the applier, that
/// keeps both cores of a small machine busy without queueing much decoded data.
const DECODE_TASKS: usize = 2;

/// Why a snapshot could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("bucket {bucket}: {source}")]
    Bucket {
        bucket: String,
        source: async_nats::Error,
    },
    #[error("reading {key} from the snapshot bucket: {source}")]
    Read {
        key: String,
        source: async_nats::Error,
    },
    #[error("the snapshot bucket has no {key} (referenced by a manifest)")]
    Missing { key: String },
    #[error("{key} in the snapshot bucket is corrupt: {source}")]
    Corrupt {
        key: String,
        source: deltasync_core::codec::DecodeError,
    },
    #[error("snapshot {manifest} does not verify: {reason}")]
    Verify { manifest: String, reason: String },
    #[error("writing {key} to the snapshot bucket: {source}")]
    Write {
        key: String,
        source: async_nats::Error,
    },
    #[error("encoding a snapshot: {0}")]
    Encode(#[from] deltasync_core::codec::EncodeError),
    #[error(
        "refusing to move the latest snapshot from {latest_lineage}:{latest_seq} back to {seq}"
    )]
    Stale {
        latest_lineage: String,
        latest_seq: u64,
        seq: u64,
    },
    #[error("another writer moved the latest snapshot pointer meanwhile: {source}")]
    Raced { source: async_nats::Error },
    #[error("the state at {lineage}:{seq} is not the stream's history at stream sequence {stream_seq}: {reason}")]
    NotInHistory {
        lineage: String,
        seq: u64,
        stream_seq: u64,
        reason: String,
    },
}

/// A verified snapshot turned into a state.
#[derive(Debug)]
pub struct Loaded {
    /// Positioned at the manifest's lineage and sequence.
    pub state: State,
    pub manifest: Manifest,
    /// Bytes downloaded.
    pub bytes_fetched: u64,
}

/// What an incremental re-snapshot did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResyncReport {
    pub bytes_fetched: u64,
    pub segments_applied: usize,
    pub ranges_rebuilt: usize,
}

/// Opens the pipeline's bucket.
pub async fn bucket(js: &jetstream::Context, settings: &Settings) -> Result<kv::Store, StoreError> {
    let bucket = names::bucket_name(&settings.pipeline);
    js.get_key_value(&bucket)
        .await
        .map_err(|e| StoreError::Bucket {
            bucket,
            source: e.into(),
        })
}

async fn get(kv: &kv::Store, key: &str) -> Result<Option<Bytes>, StoreError> {
    kv.get(key).await.map_err(|e| StoreError::Read {
        key: key.to_string(),
        source: e.into(),
    })
}

async fn get_required(kv: &kv::Store, key: String) -> Result<Bytes, StoreError> {
    get(kv, &key).await?.ok_or(StoreError::Missing { key })
}

/// Reads `latest` and its revision.
pub async fn read_pointer(kv: &kv::Store) -> Result<Option<(Pointer, u64)>, StoreError> {
    let entry = kv.entry(LATEST_KEY).await.map_err(|e| StoreError::Read {
        key: LATEST_KEY.into(),
        source: e.into(),
    })?;
    match entry {
        Some(e) if e.operation == kv::Operation::Put => {
            let p = decode_pointer(&e.value).map_err(|source| StoreError::Corrupt {
                key: LATEST_KEY.into(),
                source,
            })?;
            Ok(Some((p, e.revision)))
        }
        _ => Ok(None),
    }
}

/// Reads and decodes one manifest.
pub async fn read_manifest(kv: &kv::Store, key: &str) -> Result<Manifest, StoreError> {
    let bytes = get_required(kv, key.to_string()).await?;
    decode_manifest(&bytes).map_err(|source| StoreError::Corrupt {
        key: key.to_string(),
        source,
    })
}

/// The manifest `latest` points at.
pub async fn latest_manifest(kv: &kv::Store) -> Result<Option<Manifest>, StoreError> {
    match read_pointer(kv).await? {
        Some((p, _)) => Ok(Some(read_manifest(kv, &p.manifest).await?)),
        None => Ok(None),
    }
}

/// Every manifest in the bucket, oldest first in the stream's history: by the position of
/// its cut (`stream_seq`, then `seq`), and among cuts at the same position by the order the
/// server stored them (the KV revision). Never by `created_at_ms`, which is the writer's
/// clock: a writer whose clock is off would list a newer cut as older, and a caller picking
/// the newest usable snapshot (recovery's fallback, `verify`, `rebuild`) would pick the wrong
/// one.
pub async fn list_manifests(kv: &kv::Store) -> Result<Vec<(String, Manifest)>, StoreError> {
    Ok(list_manifests_with_stored_ms(kv)
        .await?
        .into_iter()
        .map(|(key, m, _)| (key, m))
        .collect())
}

/// [`list_manifests`], each with the server's time of storing it (milliseconds since the
/// epoch): the age to show for a snapshot, which no writer's clock skews.
pub async fn list_manifests_with_stored_ms(
    kv: &kv::Store,
) -> Result<Vec<(String, Manifest, u64)>, StoreError> {
    let mut out = read_manifests(kv).await?;
    out.sort_by_key(|l| (l.manifest.stream_seq, l.manifest.seq, l.revision));
    Ok(out
        .into_iter()
        .map(|l| (l.key, l.manifest, l.stored_ms))
        .collect())
}

/// A manifest as the bucket holds it, with what the server assigned when storing it.
struct Listed {
    key: String,
    manifest: Manifest,
    /// The server's time of storing it, in milliseconds since the epoch.
    stored_ms: u64,
    /// Its KV revision: the server's order of writes to the bucket.
    revision: u64,
}

/// Every manifest in the bucket, in no particular order. One removed meanwhile is left out;
/// a corrupt one is logged and left out.
async fn read_manifests(kv: &kv::Store) -> Result<Vec<Listed>, StoreError> {
    let mut out = Vec::new();
    for key in list_keys(kv)
        .await?
        .into_iter()
        .filter(|k| k.starts_with("manifest."))
    {
        let entry = kv.entry(&key).await.map_err(|e| StoreError::Read {
            key: key.clone(),
            source: e.into(),
        })?;
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            continue; // removed meanwhile
        };
        match decode_manifest(&entry.value) {
            Ok(manifest) => out.push(Listed {
                key,
                manifest,
                stored_ms: server_ms(entry.created.unix_timestamp_nanos()),
                revision: entry.revision,
            }),
            Err(source) => {
                let e = StoreError::Corrupt { key, source };
                tracing::error!(error = %e, "Skipping a corrupt snapshot manifest");
            }
        }
    }
    Ok(out)
}

async fn list_keys(kv: &kv::Store) -> Result<Vec<String>, StoreError> {
    let read = |e: async_nats::Error| StoreError::Read {
        key: "(key listing)".into(),
        source: e,
    };
    let keys = kv.keys().await.map_err(|e| read(e.into()))?;
    keys.try_collect().await.map_err(|e| read(e.into()))
}

/// Loads the latest snapshot, verified. `None` when the bucket has none.
pub async fn load_latest(
    kv: &kv::Store,
    _settings: &Settings,
) -> Result<Option<Loaded>, StoreError> {
    match latest_manifest(kv).await? {
        Some(m) => Ok(Some(load(kv, m).await?)),
        None => Ok(None),
    }
}

/// Loads a snapshot into a fresh state, verifying every blob, range and the state digest.
pub async fn load(kv: &kv::Store, manifest: Manifest) -> Result<Loaded, StoreError> {
    let started = std::time::Instant::now();
    let mut state = State::new(manifest.lineage);
    let all: Vec<usize> = (0..manifest.ranges.len()).collect();
    let bytes_fetched = rebuild_ranges(kv, &mut state, &manifest, &all).await?;
    state.set_position(manifest.lineage, manifest.seq);
    verify(&state, &manifest).map_err(|reason| verify_err(&manifest, reason))?;
    tracing::debug!(
        seq = manifest.seq,
        entries = state.len(),
        bytes_fetched,
        ms = started.elapsed().as_millis() as u64,
        "Snapshot loaded"
    );
    Ok(Loaded {
        state,
        manifest,
        bytes_fetched,
    })
}

fn verify_err(m: &Manifest, reason: String) -> StoreError {
    StoreError::Verify {
        manifest: manifest_key(m.lineage, m.seq),
        reason,
    }
}

/// Rebuilds `ranges` of `state` from their base chunks plus every segment (restricted to
/// those ranges). Returns the bytes fetched.
async fn rebuild_ranges(
    kv: &kv::Store,
    state: &mut State,
    m: &Manifest,
    ranges: &[usize],
) -> Result<u64, StoreError> {
    if ranges.is_empty() {
        return Ok(0);
    }
    let mut keep = vec![false; deltasync_core::digest::BUCKETS];
    // As the manifest says, but bounded (its counts are untrusted): see `reserve_hints`.
    let hints = m.reserve_hints(ranges);
    for (&r, entries) in ranges.iter().zip(hints) {
        state.clear_buckets(m.ranges[r].buckets());
        state.reserve_buckets(m.ranges[r].buckets(), entries);
        for b in m.ranges[r].buckets() {
            keep[b] = true;
        }
    }
    let blobs: Vec<(usize, usize)> = ranges
        .iter()
        .flat_map(|&r| (0..m.ranges[r].chunks.len()).map(move |c| (r, c)))
        .collect();
    let keys = blobs
        .iter()
        .map(|&(r, c)| snapshot::chunk_key(&m.ranges[r].chunks[c].hash))
        .collect();
    let shared = Arc::new(m.ranges.clone());
    let decode = move |batch: &[(usize, &[u8])]| {
        let refs: Vec<_> = batch
            .iter()
            .map(|&(i, bytes)| {
                let (r, c) = blobs[i];
                (bytes, &shared[r].chunks[c], &shared[r])
            })
            .collect();
        // Changes for `apply_changes`, built here rather than on the applying thread.
        snapshot::decode_chunks(&refs)
            .into_iter()
            .map(|chunk| {
                let entries = chunk?.entries.into_iter();
                Ok(entries
                    .map(|(key, value)| Change::Put { key, value })
                    .collect::<Vec<_>>())
            })
            .collect()
    };
    let apply = |state: &mut State, changes: &Vec<Change>| {
        state.apply_changes(changes);
    };
    let mut fetched = fetch_and_apply(kv, state, keys, decode, apply).await?;
    let all: Vec<usize> = (0..m.segments.len()).collect();
    fetched += apply_segments(kv, state, m, &all, move |b| keep[b]).await?;
    Ok(fetched)
}

/// Fetches and applies segments `which` of `m`, restricted to buckets `keep` accepts.
async fn apply_segments(
    kv: &kv::Store,
    state: &mut State,
    m: &Manifest,
    which: &[usize],
    keep: impl Fn(usize) -> bool + Send + 'static,
) -> Result<u64, StoreError> {
    let pieces: Vec<(usize, usize)> = which
        .iter()
        .flat_map(|&s| (0..m.segments[s].pieces.len()).map(move |p| (s, p)))
        .collect();
    let keys = pieces
        .iter()
        .map(|&(s, p)| snapshot::segment_key(&m.segments[s].pieces[p].hash))
        .collect();
    let shared = Arc::new(m.segments.clone());
    let decode = move |batch: &[(usize, &[u8])]| {
        let refs: Vec<_> = batch
            .iter()
            .map(|&(i, bytes)| {
                let (s, p) = pieces[i];
                (bytes, &shared[s].pieces[p], &shared[s])
            })
            .collect();
        snapshot::decode_segments(&refs)
    };
    let apply = move |state: &mut State, seg: &snapshot::Segment| apply_segment(state, seg, &keep);
    fetch_and_apply(kv, state, keys, decode, apply).await
}

/// Fetches the blobs `keys`, checks and decodes them with `decode` on blocking threads, and
/// applies what they decode to `state` with `apply`, in the order of `keys`, on another
/// blocking thread. Returns the bytes fetched.
///
/// ```text
/// fetch (CONCURRENCY gets in flight, in order)
///   -> batches of up to DECODE_BATCH ready blobs -> decode (DECODE_TASKS batches at once)
///   -> apply (one thread owning the state) -> drop (yet another thread)
/// ```
///
/// The stages overlap, so a load costs about its slowest stage, applying, rather than their
/// sum; a batch's content hashes are computed together with multi-buffer SHA-256, and the
/// applying thread neither builds nor frees what it applies. `decode` gets
/// `(index in keys, bytes)` pairs and returns one result per blob; the first failure (a
/// fetch or a decode, in the order of `keys`) stops the pipeline. `state` is moved to the
/// applying thread meanwhile: on error it holds what was applied before the failure, and if
/// this future is dropped midway it is left empty (callers treat both as unverified).
async fn fetch_and_apply<T: Send + 'static>(
    kv: &kv::Store,
    state: &mut State,
    keys: Vec<String>,
    decode: impl Fn(&[(usize, &[u8])]) -> Vec<Result<T, DecodeError>> + Send + Sync + 'static,
    mut apply: impl FnMut(&mut State, &T) + Send + 'static,
) -> Result<u64, StoreError> {
    if keys.is_empty() {
        return Ok(0);
    }
    let keys = Arc::new(keys);
    let decode = Arc::new(decode);
    let mut owned = std::mem::replace(state, State::new(state.lineage()));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<T>>(DECODE_TASKS);
    let (garbage, applied) = std::sync::mpsc::channel::<Vec<T>>();
    tokio::task::spawn_blocking(move || applied.into_iter().for_each(drop));
    let applier = tokio::task::spawn_blocking(move || {
        while let Some(items) = rx.blocking_recv() {
            for item in &items {
                apply(&mut owned, item);
            }
            // Freeing a batch costs the applying thread about as much as converting it.
            garbage.send(items).ok();
        }
        owned
    });
    let pipeline = async {
        let mut fetched = 0u64;
        let mut decoded = futures::stream::iter(0..keys.len())
            .map(|i| {
                let key = keys[i].clone();
                async move { get_required(kv, key).await.map(|bytes| (i, bytes)) }
            })
            .buffered(CONCURRENCY)
            .ready_chunks(DECODE_BATCH)
            .map(|batch| {
                let (keys, decode) = (keys.clone(), decode.clone());
                async move {
                    let batch = batch.into_iter().collect::<Result<Vec<_>, _>>()?;
                    let bytes: u64 = batch.iter().map(|(_, b)| b.len() as u64).sum();
                    let items = tokio::task::spawn_blocking(move || {
                        let refs: Vec<(usize, &[u8])> =
                            batch.iter().map(|(i, b)| (*i, &b[..])).collect();
                        decode(&refs)
                            .into_iter()
                            .zip(&batch)
                            .map(|(r, (i, _))| {
                                r.map_err(|source| StoreError::Corrupt {
                                    key: keys[*i].clone(),
                                    source,
                                })
                            })
                            .collect::<Result<Vec<T>, StoreError>>()
                    })
                    .await
                    .map_err(|e| StoreError::Read {
                        key: "(decoding snapshot blobs)".into(),
                        source: e.into(),
                    })??;
                    Ok::<_, StoreError>((bytes, items))
                }
            })
            .buffered(DECODE_TASKS);
        while let Some(next) = decoded.next().await {
            let (bytes, items) = next?;
            fetched += bytes;
            if tx.send(items).await.is_err() {
                break; // the applier panicked: its join below says so
            }
        }
        Ok::<u64, StoreError>(fetched)
    }
    .await;
    drop(tx);
    match applier.await {
        Ok(applied) => *state = applied,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => {
            return Err(StoreError::Read {
                key: "(applying snapshot blobs)".into(),
                source: e.into(),
            })
        }
    }
    pipeline
}

/// Brings `local` to the manifest's state downloading as little as it can: the segments after
/// its position when it is inside the manifest's segment chain, then the base chunks of any
/// range whose digest still differs. On error `local` may be partly updated; the caller
/// treats it as unverified (and must not commit it).
pub async fn resync(
    kv: &kv::Store,
    local: &mut State,
    m: &Manifest,
) -> Result<ResyncReport, StoreError> {
    let mut report = ResyncReport::default();
    if let Some(segs) = catch_up_segments(local, m) {
        report.bytes_fetched += apply_segments(kv, local, m, &segs, |_| true).await?;
        report.segments_applied = segs.len();
    }
    let differing = differing_ranges(local, m);
    report.ranges_rebuilt = differing.len();
    report.bytes_fetched += rebuild_ranges(kv, local, m, &differing).await?;
    local.set_position(m.lineage, m.seq);
    verify(local, m).map_err(|reason| verify_err(m, reason))?;
    Ok(report)
}

/// Writes a snapshot of `state` — a consistent cut whose envelope `state.seq()` is stored at
/// `stream_seq` — and moves `latest` to it. `prev` is the previous snapshot and the state it
/// describes (both kept by the writer), which lets this one be incremental.
///
/// Blobs of `prev` still in the bucket are reused, not written again. Another writer's
/// garbage collection may remove them meanwhile (a cron'd `snapshot` next to the producer):
/// after the manifest is stored and right before `latest` moves, every reused blob is checked
/// again, and if one is gone the snapshot is cut again as a new base that reuses nothing, so
/// `latest` never names a manifest whose blobs are not all in the bucket.
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

    // The previous snapshot's blobs are not written again while they are in the bucket. One
    // that is gone (purged, lost) would stay referenced by every snapshot stacked on that base,
    // and no replica could load them: cut a new base instead, writing whatever is missing.
    let present: HashSet<String> = match prev {
        Some(_) => list_keys(&kv).await?.into_iter().collect(),
        None => HashSet::new(),
    };
    let known: HashSet<String> = prev
        .map(|(m, _)| m.blob_keys().filter(|k| present.contains(k)).collect())
        .unwrap_or_default();
    let prev = match prev {
        Some((m, s)) => {
            let missing: Vec<String> = m.blob_keys().filter(|k| !present.contains(k)).collect();
            if missing.is_empty() {
                Some((m, s))
            } else {
                tracing::warn!(
                    missing = missing.len(),
                    first = %missing[0],
                    prev_seq = m.seq,
                    "Blobs of the previous snapshot are missing from the bucket; cutting a new base that writes them again"
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
        let present: HashSet<String> = list_keys(&kv).await?.into_iter().collect();
        let gone: Vec<&String> = reused.iter().filter(|k| !present.contains(*k)).collect();
        if !gone.is_empty() {
            tracing::warn!(
                gone = gone.len(),
                first = %gone[0],
                seq = manifest.seq,
                "Blobs this snapshot reused were removed meanwhile (another writer's garbage collection); cutting it again as a new base"
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

/// Plans a snapshot of `state` (incremental on `prev` when given) and writes its blobs except
/// those in `known` (already in the bucket). Returns the manifest, not yet stored.
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
    let plan = tokio::task::spawn_blocking(move || {
        snapshot::plan(
            &state_for_plan,
            stream_seq,
            prev_owned.as_ref().map(|(m, s)| (m, s)),
            target,
            max_blob,
            created,
        )
    })
    .await
    .map_err(|e| StoreError::Write {
        key: "(planning)".into(),
        source: e.into(),
    })??;

    let bucket_name = names::bucket_name(&settings.pipeline);
    let fresh: Vec<snapshot::Blob> = plan
        .blobs
        .into_iter()
        .filter(|b| !known.contains(&b.key))
        .collect();
    let written: u64 = fresh.iter().map(|b| b.bytes.len() as u64).sum();
    futures::stream::iter(fresh.into_iter().map(|b| {
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
    }))
    .buffer_unordered(CONCURRENCY)
    .try_collect::<Vec<()>>()
    .await?;
    let mut manifest = plan.manifest;
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

/// Milliseconds since the epoch of a server timestamp (given in nanoseconds).
fn server_ms(unix_nanos: i128) -> u64 {
    (unix_nanos / 1_000_000).max(0) as u64
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
