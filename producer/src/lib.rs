//! The deltasync producer: the single writer of a pipeline's history. It owns a keyed state,
//! publishes each change set as a delta envelope (gapless sequence, lineage, digest of the
//! state after it) to the pipeline's JetStream stream, and keeps snapshots in its KV bucket.
//!
//! Talks to NATS through `deltasync_nats` and [`publisher`], the one module of this crate
//! that calls async-nats itself (and [`api::nats`], the write API's NATS service), to its
//! inputs (the Rust API, NDJSON in [`ingest`], synthetic [`sources`], programs in any language
//! through the write [`api`] of `serve`) and, optionally, to HTTP clients ([`http`]).
//!
//! ```text
//!   Rust API / ingest / sources
//!            │ changes, transactions, full states
//!            ▼
//!   engine      batching, State + digests, snapshot cuts          (engine.rs, own thread;
//!               when to cut and how far retention lets it publish: budget.rs)
//!            │ envelopes, in order
//!            ▼
//!   publisher   window of acks, expected-last-sequence fence      (publisher.rs)
//!            │                          │ durable cuts
//!            ▼                          ▼
//!   stream DELTASYNC_<pipeline>     snapshot task → KV deltasync_<pipeline>  (snapshots.rs)
//! ```
//!
//! What these parts share sits below them: `shared.rs` (status, failure, durable snapshot,
//! limits) and `handoff.rs` (receipts, cuts, envelopes in flight), so the modules import each
//! other in one direction only.
//!
//! ## Invariants
//!
//! - Envelope sequences in the stream are gapless and never duplicated or interleaved with
//!   another producer's: a second writer fences this one (see [`publisher`]).
//! - A restart recovers and continues the lineage; only [`Producer::start_new_lineage`]
//!   (the `new-lineage --yes` command) or an empty pipeline starts a new one.
//! - Anything reported as committed is acknowledged by the stream.
//!
//! ```no_run
//! use deltasync_producer::{Change, Producer};
//! use deltasync_config::settings::Settings;
//!
//! # async fn example() -> Result<(), deltasync_producer::ProducerError> {
//! let mut settings = Settings::default();
//! settings.pipeline = "prices".into();
//! settings.nats.url = "nats://127.0.0.1:4222".into();
//! let producer = Producer::start(settings).await?;
//! let receipt = producer.commit(vec![Change::put("ETH", "3141.5")]).await?;
//! assert_eq!(receipt.parts, 1);
//! producer.shutdown().await?;
//! # Ok(())
//! # }
//! ```

pub mod api;
mod budget;
pub mod cli;
mod engine;
pub mod error;
mod handoff;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod ops;
mod producer;
pub mod publisher;
mod shared;
mod snapshots;
pub mod sources;

pub use budget::RetentionLimits;
pub use deltasync_core::{Change, Key};
pub use error::ProducerError;
pub use handoff::{CommitReceipt, SnapshotInfo};
pub use producer::{NewLineage, PendingCommit, Position, Producer};
pub use shared::{Lifecycle, Observer, Status};
