//! The store's read side, what consumers, recovery and the ops commands use: the manifest
//! `latest` names, manifests listed in the history's order, and snapshots loaded (or a
//! replica brought up to one incrementally), every byte verified before it is handed out.
//!
//! Talks to JetStream's KV bucket through the shared reads in `store` (gets of blobs in a
//! pipelined fetch, decode and apply); decoding and verification are
//! `deltasync_core::snapshot`'s.

use super::{get_required, read_manifest, read_manifests, read_pointer, StoreError, CONCURRENCY};
use async_nats::jetstream::kv;
use deltasync_config::settings::Settings;
use deltasync_core::codec::DecodeError;
use deltasync_core::snapshot::{
    self, apply_segment, catch_up_segments, differing_ranges, manifest_key, verify, Manifest,
};
use deltasync_core::state::{Prepared, State};
use futures::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Most fetched blobs checked and decoded by one blocking task, their content hashes computed
/// in one multi-buffer SHA-256 pass. Half the lanes of the widest kernel (16 on AVX-512): at
/// 16, a 1M-key bootstrap held ~10 MB more blobs and decoded entries in flight (heaptrack) and
/// was no faster (`deltasync-consumer run --ephemeral --once`, 6 runs each, alternating).
const DECODE_BATCH: usize = 8;

/// Decoding tasks in flight while the state applies earlier results: with the applier, that
/// keeps both cores of a small machine busy without queueing much decoded data.
const DECODE_TASKS: usize = 2;

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

/// How far a snapshot load or re-snapshot has come, readable while it runs (for status,
/// metrics and progress logs): what it plans to fetch, and what it fetched so far. Cheap to
/// clone; every clone shares the counters.
#[derive(Debug, Clone, Default)]
pub struct SyncProgress(Arc<SyncCounters>);

#[derive(Debug, Default)]
struct SyncCounters {
    planned_bytes: AtomicU64,
    planned_entries: AtomicU64,
    fetched_bytes: AtomicU64,
    fetched_entries: AtomicU64,
}

impl SyncProgress {
    /// Blob bytes the load plans to fetch (known once it has compared the manifest with the
    /// replica; 0 before).
    pub fn planned_bytes(&self) -> u64 {
        self.0.planned_bytes.load(Ordering::Relaxed)
    }

    /// Entries in the base chunks it plans to fetch (segments' changes not counted).
    pub fn planned_entries(&self) -> u64 {
        self.0.planned_entries.load(Ordering::Relaxed)
    }

    /// Blob bytes fetched and decoded so far.
    pub fn fetched_bytes(&self) -> u64 {
        self.0.fetched_bytes.load(Ordering::Relaxed)
    }

    /// Base-chunk entries fetched and decoded so far.
    pub fn fetched_entries(&self) -> u64 {
        self.0.fetched_entries.load(Ordering::Relaxed)
    }

    fn plan(&self, bytes: u64, entries: u64) {
        self.0.planned_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.0.planned_entries.fetch_add(entries, Ordering::Relaxed);
    }

    fn fetched(&self, bytes: u64, entries: u64) {
        self.0.fetched_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.0.fetched_entries.fetch_add(entries, Ordering::Relaxed);
    }
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
    load_with_progress(kv, manifest, &SyncProgress::default()).await
}

/// [`load`], counting what it fetches in `progress` as it goes.
pub async fn load_with_progress(
    kv: &kv::Store,
    manifest: Manifest,
    progress: &SyncProgress,
) -> Result<Loaded, StoreError> {
    let started = std::time::Instant::now();
    let mut state = State::new(manifest.lineage);
    let all: Vec<usize> = (0..manifest.ranges.len()).collect();
    plan_ranges(progress, &manifest, &all);
    let bytes_fetched = rebuild_ranges(kv, &mut state, &manifest, &all, progress).await?;
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

/// Adds to `progress` what rebuilding `ranges` fetches: their base chunks and, when there is
/// any, every segment (each is read for the changes in those ranges).
fn plan_ranges(progress: &SyncProgress, m: &Manifest, ranges: &[usize]) {
    if ranges.is_empty() {
        return;
    }
    let (bytes, entries) = ranges
        .iter()
        .flat_map(|&r| &m.ranges[r].chunks)
        .fold((0, 0), |(b, e), c| (b + c.bytes, e + c.entries));
    progress.plan(bytes + m.segment_bytes(), entries);
}

/// Rebuilds `ranges` of `state` from their base chunks plus every segment (restricted to
/// those ranges). Returns the bytes fetched.
async fn rebuild_ranges(
    kv: &kv::Store,
    state: &mut State,
    m: &Manifest,
    ranges: &[usize],
    progress: &SyncProgress,
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
    let entries = blobs
        .iter()
        .map(|&(r, c)| m.ranges[r].chunks[c].entries)
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
        // Entries built whole here (read straight into their allocations, hashed), so that
        // the applying thread only links them into the state's tables.
        snapshot::decode_chunks_prepared(&refs)
    };
    let apply = |state: &mut State, prepared: &mut Prepared| state.put_prepared(prepared);
    let mut fetched = fetch_and_apply(kv, state, keys, entries, decode, apply, progress).await?;
    let all: Vec<usize> = (0..m.segments.len()).collect();
    fetched += apply_segments(kv, state, m, &all, move |b| keep[b], progress).await?;
    Ok(fetched)
}

/// Fetches and applies segments `which` of `m`, restricted to buckets `keep` accepts.
async fn apply_segments(
    kv: &kv::Store,
    state: &mut State,
    m: &Manifest,
    which: &[usize],
    keep: impl Fn(usize) -> bool + Send + 'static,
    progress: &SyncProgress,
) -> Result<u64, StoreError> {
    let pieces: Vec<(usize, usize)> = which
        .iter()
        .flat_map(|&s| (0..m.segments[s].pieces.len()).map(move |p| (s, p)))
        .collect();
    let keys = pieces
        .iter()
        .map(|&(s, p)| snapshot::segment_key(&m.segments[s].pieces[p].hash))
        .collect();
    // Segments carry changes, not base entries: they count bytes only.
    let entries = vec![0; pieces.len()];
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
    let apply =
        move |state: &mut State, seg: &mut snapshot::Segment| apply_segment(state, seg, &keep);
    fetch_and_apply(kv, state, keys, entries, decode, apply, progress).await
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
    entries: Vec<u64>,
    decode: impl Fn(&[(usize, &[u8])]) -> Vec<Result<T, DecodeError>> + Send + Sync + 'static,
    mut apply: impl FnMut(&mut State, &mut T) + Send + 'static,
    progress: &SyncProgress,
) -> Result<u64, StoreError> {
    if keys.is_empty() {
        return Ok(0);
    }
    let keys = Arc::new(keys);
    let entries = Arc::new(entries);
    let decode = Arc::new(decode);
    let mut owned = std::mem::replace(state, State::new(state.lineage()));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<T>>(DECODE_TASKS);
    let (garbage, applied) = std::sync::mpsc::channel::<Vec<T>>();
    tokio::task::spawn_blocking(move || applied.into_iter().for_each(drop));
    let applier = tokio::task::spawn_blocking(move || {
        while let Some(mut items) = rx.blocking_recv() {
            for item in &mut items {
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
                let (keys, decode, entries) = (keys.clone(), decode.clone(), entries.clone());
                async move {
                    let batch = batch.into_iter().collect::<Result<Vec<_>, _>>()?;
                    let bytes: u64 = batch.iter().map(|(_, b)| b.len() as u64).sum();
                    let batch_entries: u64 = batch.iter().map(|(i, _)| entries[*i]).sum();
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
                    Ok::<_, StoreError>((bytes, batch_entries, items))
                }
            })
            .buffered(DECODE_TASKS);
        while let Some(next) = decoded.next().await {
            let (bytes, batch_entries, items) = next?;
            fetched += bytes;
            progress.fetched(bytes, batch_entries);
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
    resync_with_progress(kv, local, m, &SyncProgress::default()).await
}

/// [`resync`], counting what it plans and fetches in `progress` as it goes.
pub async fn resync_with_progress(
    kv: &kv::Store,
    local: &mut State,
    m: &Manifest,
    progress: &SyncProgress,
) -> Result<ResyncReport, StoreError> {
    let mut report = ResyncReport::default();
    let catch_up = catch_up_segments(local, m);
    if let Some(segs) = &catch_up {
        let bytes = segs
            .iter()
            .flat_map(|&s| &m.segments[s].pieces)
            .map(|p| p.bytes)
            .sum();
        progress.plan(bytes, 0);
    }
    if let Some(segs) = catch_up {
        report.bytes_fetched += apply_segments(kv, local, m, &segs, |_| true, progress).await?;
        report.segments_applied = segs.len();
    }
    let differing = differing_ranges(local, m);
    report.ranges_rebuilt = differing.len();
    plan_ranges(progress, m, &differing);
    report.bytes_fetched += rebuild_ranges(kv, local, m, &differing, progress).await?;
    local.set_position(m.lineage, m.seq);
    verify(local, m).map_err(|reason| verify_err(m, reason))?;
    Ok(report)
}
