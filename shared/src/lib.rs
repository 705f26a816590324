//! deltasync's protocol: what the producer and every consumer must agree on.
//!
//! The pure, synchronous core (`change`, `envelope`, `codec`, `digest`, `state`, `snapshot`,
//! `retention`) does no I/O and is tested without a server. `settings` and `telemetry` are
//! shared start-up plumbing. Three modules talk to async-nats: `nats` (connecting, creating the stream and
//! bucket), `history` (reading the stream, recovery) and `store` (snapshots in the bucket).

pub mod change;
pub mod codec;
pub mod digest;
pub mod envelope;
pub mod history;
pub mod names;
pub mod nats;
pub mod retention;
pub mod settings;
pub mod snapshot;
pub mod state;
pub mod store;
pub mod telemetry;

pub use change::{Change, Key};
pub use digest::Digest;
pub use envelope::{Envelope, Lineage};
pub use state::{diff, Applied, ApplyError, State};
