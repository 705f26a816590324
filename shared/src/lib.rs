//! deltasync's protocol: what the producer and every consumer must agree on.
//!
//! The pure, synchronous core (`change`, `envelope`, `codec`, `digest`, `state`) does no I/O
//! and is tested without a server. `settings` and `telemetry` are shared start-up plumbing;
//! `nats` is the only module in this crate that talks to async-nats.

pub mod settings;
pub mod telemetry;
