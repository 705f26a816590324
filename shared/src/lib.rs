//! deltasync's protocol: what the producer and every consumer must agree on.
//!
//! The pure, synchronous core (`change`, `envelope`, `codec`, `digest`, `state`) does no I/O
//! and is tested without a server. `settings` and `telemetry` are shared start-up plumbing;
//! `nats` is the only module in this crate that talks to async-nats.

pub mod change;
pub mod codec;
pub mod digest;
pub mod envelope;
pub mod settings;
pub mod snapshot;
pub mod state;
pub mod telemetry;

pub use change::{Change, Key};
pub use digest::Digest;
pub use envelope::{Envelope, Lineage};
pub use state::{diff, Applied, ApplyError, State};
