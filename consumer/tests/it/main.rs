//! Integration tests of `deltasync-consumer` against real nats-server processes.
//!
//! Talks to nats-server through `deltasync-testkit` (one private server per test, random
//! loopback port, temporary store, killed on Drop). Never a mock. One binary keeps link time
//! down; names are sentences.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod api;
mod crash;
mod feed;
mod follow;
mod fork;
mod ops;
mod resync;
mod with_producer;
