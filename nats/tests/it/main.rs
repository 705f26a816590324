//! Integration tests of `deltasync-nats` against real nats-server processes.
//!
//! Talks to nats-server through `deltasync-testkit` (one private server, or cluster, per
//! test, random loopback ports, killed on Drop) and to it over the network through
//! `deltasync_nats::connect`. Never a mock. One binary keeps link time down.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

mod support;

mod nats_setup;
mod security;
mod snapshot_gc;
mod snapshots;
