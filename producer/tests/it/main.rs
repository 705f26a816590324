//! The producer's integration tests, one binary: every test starts its own nats-server (or
//! cluster) through the testkit and uses its own pipeline names.

mod abandoned;
mod api;
mod api_permissions;
mod cli;
mod fencing;
mod http;
mod ingest;
mod limits;
mod lost_history;
mod publishing;
mod recovery;
mod shutdown;
mod snapshots;
mod support;
