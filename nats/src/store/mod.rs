//! The snapshot store: snapshots (see `deltasync_core::snapshot` for the format) in the
//! pipeline's KV bucket, split by who uses it: `read` (consumers' bootstrap and incremental
//! re-snapshot, recovery, the ops commands: the pointer, manifests, verified loads), `write`
//! (the producer and the `snapshot` command: writing a snapshot and moving `latest`) and
//! `gc` (removing what no snapshot needs). This file holds what all three share: the
//! errors, the bucket handle and the plain reads of the pointer, manifests and keys.
//!
//! Talks to JetStream: KV gets, puts and purges, plain pipelined publishes to
//! `$KV.<bucket>.<key>` for blobs, a direct get on the pipeline's stream to fence snapshot
//! writers. The rules it obeys are pure and live in `deltasync_core::snapshot` (`fence`,
//! `gc`); this module does the I/O around them.
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
//! - A writer reuses a blob of the previous snapshot only while its last write is older than
//!   that snapshot's manifest (a later write overwrote it, or wrote it again), re-checks the
//!   blobs it reuses after storing its manifest and before moving `latest`, and cuts a new
//!   base if one was removed (another writer's garbage collection) or written meanwhile.
//!   Garbage collection judges ages on the server's clock only and removes a blob only at the
//!   revision it judged.
//! - Listings order manifests by what no writer's clock decides: [`list_manifests`] by the
//!   cut's place in the stream's history (then the server's order of writes), garbage
//!   collection by the server's time of storing them. `created_at_ms` is informational.
//! - A manifest's counts are untrusted: loads reserve at most
//!   [`deltasync_core::snapshot::MAX_RESERVED_ENTRIES`] table slots whatever it claims.

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use deltasync_config::settings::Settings;
use deltasync_core::names;
use deltasync_core::snapshot::{decode_manifest, decode_pointer, Manifest, Pointer, LATEST_KEY};
use futures::{StreamExt, TryStreamExt};

mod gc;
mod read;
mod write;

pub use gc::{gc, GcReport};
pub use read::{
    latest_manifest, list_manifests, list_manifests_with_stored_ms, load, load_latest,
    load_with_progress, resync, resync_with_progress, Loaded, ResyncReport, SyncProgress,
};
pub use write::{write_snapshot, write_snapshot_with_hook};

/// How many blob reads or writes are in flight at once.
const CONCURRENCY: usize = 32;

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

/// Every key in the bucket with the revision of its last write (deleted and purged keys left
/// out), read headers-only like [`list_keys`], so no value is transferred and the same
/// permissions suffice. Listing stops with an error when nothing arrives for `wait` while
/// entries are still pending (entries removed while listing leave the count stale).
async fn list_revisions(
    js: &jetstream::Context,
    kv: &kv::Store,
    wait: std::time::Duration,
) -> Result<std::collections::HashMap<String, u64>, StoreError> {
    use async_nats::jetstream::consumer::{push, DeliverPolicy};
    let read = |e: async_nats::Error| StoreError::Read {
        key: "(key listing with revisions)".into(),
        source: e,
    };
    let consumer = kv
        .stream
        .create_consumer(push::OrderedConfig {
            deliver_subject: js.client().new_inbox(),
            description: Some("deltasync blob revisions".into()),
            filter_subject: format!("{}>", kv.prefix),
            headers_only: true,
            deliver_policy: DeliverPolicy::LastPerSubject,
            replay_policy: async_nats::jetstream::consumer::ReplayPolicy::Instant,
            ..Default::default()
        })
        .await
        .map_err(|e| read(e.into()))?;
    let mut out = std::collections::HashMap::new();
    if consumer.cached_info().num_pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await.map_err(|e| read(e.into()))?;
    loop {
        let message = match tokio::time::timeout(wait, messages.next()).await {
            Ok(Some(m)) => m.map_err(|e| read(e.into()))?,
            Ok(None) => return Err(read("the listing ended before its last entry".into())),
            Err(_) => {
                return Err(read(
                    format!("no entry within {wait:?} while entries were pending").into(),
                ))
            }
        };
        let info = message.info().map_err(|e| read(e.to_string().into()))?;
        let (revision, pending) = (info.stream_sequence, info.pending);
        if let Some(key) = message.subject.strip_prefix(kv.prefix.as_str()) {
            let removed = message
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
            if removed {
                out.remove(key);
            } else {
                out.insert(key.to_owned(), revision);
            }
        }
        if pending == 0 {
            return Ok(out);
        }
    }
}

/// Milliseconds since the epoch of a server timestamp (given in nanoseconds).
fn server_ms(unix_nanos: i128) -> u64 {
    (unix_nanos / 1_000_000).max(0) as u64
}
