//! What the replica committed, as the follower produces it and subscribers receive it: a
//! batch of changes with the sequence it leads to, and whether a transaction or a
//! re-snapshot made it.
//!
//! Talks to nothing: plain data, made by the follower (and `ops rebuild`), committed by the
//! engine through the local store, delivered by the replica handle.

use super::Reason;
use deltasync_core::{Change, Lineage};

/// How a batch of changes came about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchKind {
    /// One transaction of the stream, applied.
    Applied,
    /// A re-snapshot: the changes turn the previous state into the snapshot's.
    Resync { reason: Reason },
}

/// Changes the replica committed, with the sequence they lead to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeBatch {
    /// The lineage of `seq`.
    pub lineage: Lineage,
    /// The position before (for a re-snapshot possibly in another lineage).
    pub prev_seq: u64,
    /// The position after.
    pub seq: u64,
    /// A transaction or a re-snapshot.
    pub kind: BatchKind,
    /// In order; applying them to the state at `prev_seq` gives the state at `seq`.
    pub changes: Vec<Change>,
}
