//! The fault suite: integration tests against real nats-server processes (never a mock), with
//! the real producer and consumer, each ending by comparing every replica with a model of what
//! the producer acknowledged. Run with `cargo test -p deltasync-faults`; the long chaos run is
//! `DELTASYNC_CHAOS_SECS=600 cargo test -p deltasync-faults --release chaos`, a failed chaos
//! run is replayed with `DELTASYNC_CHAOS_SEED=<seed printed>`.
//!
//! Talks to nats-server through `deltasync-testkit` (private servers and clusters on random
//! loopback ports, temporary stores, killed on Drop), to the producer and consumer libraries,
//! and to the real binaries as child processes: `target/<profile>/deltasync-producer` and
//! `deltasync-consumer` of the workspace build, which `deltasync_testkit::workspace_bin` first
//! makes up to date with `cargo build` (once per test process).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod backpressure;
mod chaos;
mod cluster;
mod damage;
mod producer_kill;
mod retention;
mod server_restart;
