//! deltasync's protocol core: what the producer and every consumer must agree on, and the
//! verdicts that carry its guarantees. Synchronous, no I/O: Cargo keeps async runtimes, the
//! NATS client and the configuration loader out of this crate, and everything here is tested
//! without a server.
//!
//! - `change`, `envelope`, `codec`: what a delta is and its bytes on the wire (and a stream
//!   message classified as an envelope or foreign).
//! - `digest`, `state`: the keyed state and the digest that proves two copies equal.
//! - `snapshot`: the chunked snapshot format and its manifest; `snapshot::fence` (may a
//!   writer's cut become `latest`) and `snapshot::gc` (what garbage collection may remove).
//! - `names`: the stream, subject and bucket names of a pipeline.
//! - `ndjson`: the re-ingestible NDJSON line (`ingest` reads it, `replay` writes it).
//! - `position`: where a state is in the history (lineage, sequence, stream sequence, digest).
//! - `recovery`: whether a history read from the stream can be continued.
//! - `retention`: how far a stream's own limits are from pruning a position.

pub mod change;
pub mod codec;
pub mod digest;
pub mod envelope;
pub mod names;
pub mod ndjson;
pub mod position;
pub mod recovery;
pub mod retention;
pub mod snapshot;
pub mod state;

pub use change::{Change, Key};
pub use digest::Digest;
pub use envelope::{Envelope, Lineage};
pub use position::Position;
pub use state::{diff, Applied, ApplyError, HashedChanges, Prepared, State};
