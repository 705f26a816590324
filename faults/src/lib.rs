//! The deltasync fault suite. Everything is in `tests/it`: real nats-server processes (single
//! node and a 3-node cluster, through `deltasync-testkit`), the real producer and consumer
//! (libraries in-process, binaries as child processes), faults injected into all of them, and
//! every test ending by comparing each replica with an independent model of what was committed.
//!
//! The binaries are the workspace's own `deltasync-producer` and `deltasync-consumer`, built
//! from the current sources by `deltasync_testkit::workspace_bin`. This library is empty.
