//! deltasync consumer: keeps an exact replica of a pipeline's keyed state and never silently
//! skips a change.
//!
//! A consumer bootstraps from the pipeline's latest snapshot (verified chunk by chunk, then
//! range by range, then the whole digest), follows the envelope stream from the snapshot's
//! position, applies each transaction all-or-nothing and checks the producer's digest after
//! it, and commits what it applied with its cursor as one record of a local log (with
//! `--data-dir`; a local snapshot replaces the log from time to time). When the history it needs is gone (pruned, deleted), belongs to another
//! lineage, or its replica diverged (digest mismatch, a replica changed on disk), it
//! re-snapshots — downloading only the segments after its position or the bucket ranges whose
//! digest differs — and says why, in logs and metrics.
//!
//! Talks to NATS JetStream (the stream and the snapshot bucket through `deltasync_nats`;
//! connecting, probes and a per-replica durable consumer as a position marker through
//! [`nats`], the only module that names async-nats), to the local disk ([`local`]) and to
//! HTTP clients ([`http`]).
//!
//! ```text
//!  lib.rs     Consumer, run(), options, errors
//!  engine     carries out the follower's steps: reading, commits, re-snapshots
//!  follower   every decision about the history, synchronous and I/O-free; the resync
//!             reasons (follower/reason.rs) and the change batches it makes (follower/batch.rs)
//!  local      the replica and cursor on disk: a local snapshot and an append-only log
//!  replica    the read handle: views, status, change batch subscriptions, watch() and
//!             wait_for(), the feed of recent batches (replica/feed.rs), and its
//!             Prometheus metrics (replica/metrics.rs, re-exported as `metrics`)
//!  nats       what the consumer says to NATS itself: connect, probes, the ops reader, and
//!             the replica's position shown on the server (nats/marker.rs)
//!  http       /healthz /readyz /metrics /v1/status, reads (http/reads.rs: /v1/keys,
//!             /v1/state, /v1/checksum), following (http/feed.rs: /v1/changes, /v1/watch),
//!             query parameters (http/params.rs)
//!  ndjson     entries as NDJSON (dump, /v1/state, /v1/keys)
//!  cli, ops   command line; operator commands (replay, rebuild, verify, status)
//! ```
//!
//! # Example
//!
//! A service that keeps a replica in memory, reads it concurrently, and reacts to changes:
//!
//! ```no_run
//! use deltasync_consumer::{BatchKind, Consumer, Options, Storage, WatchEvent};
//! use deltasync_config::settings::Settings;
//! use futures::StreamExt;
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn example() -> anyhow::Result<()> {
//! let mut settings = Settings::default();
//! settings.pipeline = "orders".into();
//! let options = Options {
//!     id: "pricing-service-1".into(),
//!     storage: Storage::Memory,
//!     http: None,
//!     once: false,
//! };
//! let consumer = Consumer::new(settings, options)?;
//! let replica = consumer.replica();
//! let mut changes = replica.subscribe();
//! let cancel = CancellationToken::new();
//! let running = tokio::spawn(consumer.run(cancel.clone()));
//!
//! // Wait until the replica holds a verified state.
//! replica
//!     .wait_until(std::time::Duration::from_secs(30), |s| s.bootstrapped)
//!     .await
//!     .map_err(|s| anyhow::anyhow!("not bootstrapped: {s:?}"))?;
//!
//! // Consistent reads: one view is one sequence, whatever the consumer does meanwhile.
//! let view = replica.view();
//! println!("{} keys at sequence {}", view.len(), view.seq());
//! if let Some(v) = view.get("order-42") {
//!     println!("order-42 = {}", String::from_utf8_lossy(v));
//! }
//!
//! // Informer-style reactions to committed changes, in sequence order.
//! while let Ok(batch) = changes.recv().await {
//!     match batch.kind {
//!         BatchKind::Applied => println!("seq {}: {} changes", batch.seq, batch.changes.len()),
//!         BatchKind::Resync { reason } => println!("re-snapshot ({reason}) to {}", batch.seq),
//!     }
//! #   break;
//! }
//!
//! // Or a watch that never misses or repeats a change: the state, then every batch after
//! // it, and a fresh state whenever continuity is lost (kube-runtime's watcher pattern).
//! let mut watch = Box::pin(replica.watch());
//! while let Some(event) = watch.next().await {
//!     match event {
//!         WatchEvent::Init(view) | WatchEvent::Reset(view) => println!("state at {}", view.seq()),
//!         WatchEvent::Batch(batch) => println!("seq {}: {} changes", batch.seq, batch.changes.len()),
//!     }
//! #   break;
//! }
//!
//! // Read-your-writes: wait until the replica applied a producer receipt's `last_seq`.
//! let view = replica.wait_for(42, std::time::Duration::from_secs(5)).await?;
//! println!("at {}", view.seq());
//! cancel.cancel();
//! running.await??;
//! # Ok(())
//! # }
//! ```

pub mod cli;
pub mod engine;
pub mod follower;
pub mod http;
pub mod local;
pub mod nats;
pub mod ndjson;
pub mod ops;
pub mod replica;

pub use deltasync_core::Position;
pub use engine::Outcome;
pub use follower::{BatchKind, ChangeBatch, Reason};
pub use replica::metrics;
pub use replica::{
    FeedStatus, HeadroomStatus, Replica, ResyncRecord, Status, SyncStatus, View, WaitError,
    WatchEvent,
};

use deltasync_config::settings::Settings;
use deltasync_nats::history::HistoryError;
use deltasync_nats::store::StoreError;
use deltasync_nats::NatsError;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Longest the HTTP endpoint may take to finish its responses at a stop.
const HTTP_DRAIN: Duration = Duration::from_secs(5);

/// Where a replica keeps its state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Storage {
    /// Memory only: every start bootstraps from the latest snapshot.
    Memory,
    /// A local snapshot and log in this directory, with the cursor: restarts resume from it.
    Durable(PathBuf),
}

/// How to run one replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Stable identity; names the replica's durable consumer on the server.
    pub id: String,
    /// Memory or a data directory.
    pub storage: Storage,
    /// Address of the HTTP endpoint (port 0 picks a free one); off when `None`.
    pub http: Option<SocketAddr>,
    /// Catch up to the stream's head as it was at start, commit, and return.
    pub once: bool,
}

impl Options {
    /// The options the settings describe: `consumer.id` (else the host name),
    /// `consumer.data_dir` (else memory), `consumer.http`.
    pub fn from_settings(settings: &Settings) -> Options {
        let c = &settings.consumer;
        Options {
            id: c.id.clone().unwrap_or_else(host_name),
            storage: c.data_dir.clone().map_or(Storage::Memory, Storage::Durable),
            http: c.http,
            once: false,
        }
    }
}

/// This machine's host name (the default replica id), `consumer` when it cannot be read.
pub fn host_name() -> String {
    let uname = rustix::system::uname();
    let name = uname.nodename().to_string_lossy().trim().to_owned();
    if name.is_empty() {
        "consumer".to_owned()
    } else {
        name
    }
}

/// Why a consumer stopped with an error. One variant per failing step.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error(
        "pipeline {pipeline} is not set up on the server (no stream or snapshot bucket): {detail}"
    )]
    PipelineMissing { pipeline: String, detail: String },
    #[error(transparent)]
    Local(#[from] local::LocalError),
    #[error(transparent)]
    Snapshot(#[from] StoreError),
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error("gave up after {attempts} re-snapshot attempts (reason {reason}): {detail}")]
    ResyncFailed {
        reason: Reason,
        attempts: u32,
        detail: String,
    },
    #[error(
        "the latest snapshot is of lineage {found}, but the stream continues lineage {wanted}"
    )]
    SnapshotLineage { wanted: String, found: String },
    #[error(
        "the latest snapshot is at envelope {snapshot_seq}, not past the replica's verified \
         envelope {replica_seq}: it holds nothing the replica lacks (waiting for a newer one; \
         the producer writes one every `snapshot.every_envelopes`, or run `deltasync-producer \
         snapshot`)"
    )]
    SnapshotNotAhead { snapshot_seq: u64, replica_seq: u64 },
    #[error(
        "the bucket has no snapshot and the stream's first envelope is {lineage}:{seq}, not \
         envelope 1: there is nothing to start from"
    )]
    NoSnapshot { lineage: String, seq: u64 },
    #[error(
        "the bucket has no snapshot and the stream no envelope: the replica's history is gone"
    )]
    NoHistory,
    #[error("the local store's writer failed: {0}")]
    Writer(String),
    #[error("probing stream {stream} for a message at or after {from}: {detail}")]
    Probe {
        stream: String,
        from: u64,
        detail: String,
    },
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl ConsumerError {
    fn resync_failed(reason: Reason, attempts: u32, last: &str) -> ConsumerError {
        let detail = match reason.give_up_advice() {
            Some(advice) => format!("{advice}. Last error: {last}"),
            None => format!("last error: {last}"),
        };
        ConsumerError::ResyncFailed {
            reason,
            attempts,
            detail,
        }
    }
}

/// One replica: create it, take its [`Replica`] handle, then [`run`](Consumer::run) it.
#[derive(Debug)]
pub struct Consumer {
    settings: Settings,
    options: Options,
    replica: Replica,
}

impl Consumer {
    /// Prepares a replica (no I/O yet).
    pub fn new(settings: Settings, options: Options) -> Result<Consumer, ConsumerError> {
        let replica = Replica::new(
            &options.id,
            &settings.pipeline,
            matches!(options.storage, Storage::Durable(_)),
            settings.consumer.max_ready_lag,
            settings.consumer.feed_max_bytes,
        );
        Ok(Consumer {
            settings,
            options,
            replica,
        })
    }

    /// The read handle; valid before, during and after `run`.
    pub fn replica(&self) -> Replica {
        self.replica.clone()
    }

    /// Runs the replica until `cancel` (or, with `once`, until caught up), then commits.
    pub async fn run(self, cancel: CancellationToken) -> Result<Outcome, ConsumerError> {
        let http_stop = CancellationToken::new();
        let http = match self.options.http {
            Some(addr) => {
                let (listener, local) = http::bind(addr)
                    .await
                    .map_err(|source| ConsumerError::Http { addr, source })?;
                tracing::info!(addr = %local, "HTTP endpoint listening");
                self.replica.set_http_addr(local);
                Some(tokio::spawn(http::serve(
                    listener,
                    http::Api {
                        replica: self.replica.clone(),
                        stop: http_stop.clone(),
                        keepalive: self.settings.consumer.watch_keepalive,
                    },
                )))
            }
            None => None,
        };
        let result = self.follow(&cancel).await;
        http_stop.cancel();
        if let Some(mut h) = http {
            // Watches and long-polls end at the stop, but a client that stopped reading keeps
            // its response stuck in a full socket: do not let it hold the exit open.
            if tokio::time::timeout(HTTP_DRAIN, &mut h).await.is_err() {
                tracing::warn!(
                    "HTTP clients still connected after the stop; closing their connections"
                );
                h.abort();
            }
        }
        result
    }

    async fn follow(&self, cancel: &CancellationToken) -> Result<Outcome, ConsumerError> {
        let pipeline = self.settings.pipeline.clone();
        let store = match &self.options.storage {
            Storage::Memory => local::LocalStore::Memory,
            Storage::Durable(dir) => {
                let dir = dir.clone();
                let log_bytes = self.settings.consumer.local_snapshot_log_bytes;
                tokio::task::spawn_blocking(move || {
                    local::LocalStore::open_durable_with(&dir, &pipeline, log_bytes)
                })
                .await
                .map_err(|e| ConsumerError::Writer(e.to_string()))??
            }
        };
        let loaded = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.load())
                .await
                .map_err(|e| ConsumerError::Writer(e.to_string()))??
        };
        if let Some(l) = &loaded {
            tracing::info!(
                store = %store.describe(),
                lineage = %l.cursor.lineage,
                seq = l.cursor.seq,
                stream_seq = l.cursor.stream_seq,
                entries = l.state.len(),
                "Local replica loaded"
            );
        }
        let (client, js) = nats::connect(&self.settings).await?;
        let Some(kv) = self.wait_for_pipeline(&js, cancel).await? else {
            return Ok(Outcome {
                cursor: loaded.map(|l| l.cursor).unwrap_or_default(),
                bootstrapped: false,
            });
        };
        let marker = nats::marker::Marker::start(js.clone(), &self.settings, &self.options.id);
        let headroom_stop = cancel.child_token();
        let headroom = tokio::spawn(ops::refresh_headroom(
            js.clone(),
            self.settings.clone(),
            self.replica.clone(),
            headroom_stop.clone(),
        ));
        let engine = engine::Engine::new(
            self.settings.clone(),
            js,
            kv,
            store,
            self.replica.clone(),
            marker,
            self.options.once,
        );
        let outcome = engine.run(loaded, cancel).await;
        headroom_stop.cancel();
        let _ = headroom.await;
        nats::drain(client).await;
        outcome
    }

    /// Waits until the pipeline's stream and bucket exist (the producer creates them). With
    /// `once`, does not wait. `None` when cancelled meanwhile.
    async fn wait_for_pipeline(
        &self,
        js: &nats::JetStream,
        cancel: &CancellationToken,
    ) -> Result<Option<nats::Bucket>, ConsumerError> {
        let mut delay = Duration::from_millis(200);
        loop {
            let found = match deltasync_nats::history::bounds(js, &self.settings).await {
                Ok(_) => deltasync_nats::store::bucket(js, &self.settings)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match found {
                Ok(kv) => return Ok(Some(kv)),
                Err(detail) if self.options.once => {
                    return Err(ConsumerError::PipelineMissing {
                        pipeline: self.settings.pipeline.clone(),
                        detail,
                    })
                }
                Err(detail) => {
                    tracing::warn!(pipeline = %self.settings.pipeline, %detail, "The pipeline is not set up yet; waiting for its producer");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(None),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}

/// Runs one replica as the settings and options say: what the binary calls.
pub async fn run(
    settings: Settings,
    options: Options,
    cancel: CancellationToken,
) -> Result<Outcome, ConsumerError> {
    Consumer::new(settings, options)?.run(cancel).await
}
