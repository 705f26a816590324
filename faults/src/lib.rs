//! The deltasync fault suite. Everything is in `tests/it`: real nats-server processes (single
//! node and a 3-node cluster, through `deltasync-testkit`), the real producer and consumer
//! (libraries in-process, binaries as child processes), faults injected into all of them, and
//! every test ending by comparing each replica with an independent model of what was committed.
//!
//! The crate builds the real `deltasync-producer` and `deltasync-consumer` binaries from their
//! own sources under the names `faults-producer` and `faults-consumer`, so the tests always run
//! the current code (see `Cargo.toml`). This library is empty.
