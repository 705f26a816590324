//! The delta envelope: one message of a pipeline's history, and the lineage that names it.
//!
//! ## Invariants
//!
//! - Within a lineage, envelope sequences are gapless from 1: envelope `n + 1` follows
//!   envelope `n`, and the stream holds no other envelope between them.
//! - The lineage id is random and stays the same for as long as the history is continuous: a
//!   producer restart recovers and keeps it; only a deliberate operator action (or an empty
//!   pipeline) starts a new one.
//! - `digest` is the state digest after applying the whole transaction the envelope belongs
//!   to. A transaction too large for one message is split into `parts` envelopes with
//!   consecutive sequences, `part` counting 1..=parts; every part carries the same digest, and
//!   a replica applies the transaction only when its last part has arrived — all or nothing.
//!   A replica's cursor only ever names the last part of a transaction.
//!
//! The wire format is in `codec`.

use crate::change::Change;
use crate::digest::Digest;
use std::fmt;

/// The protocol version this build writes and reads.
pub const PROTOCOL_VERSION: u16 = 1;

/// Most parts one transaction may span (bounds what a replica buffers).
pub const MAX_TXN_PARTS: u32 = 1024;

/// A pipeline history's identity: 128 random bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lineage(pub [u8; 16]);

impl Lineage {
    /// A fresh random lineage from the operating system's generator.
    pub fn random() -> Lineage {
        let mut b = [0u8; 16];
        // getrandom only fails when the OS has no entropy source at all; nothing can run then.
        #[allow(clippy::expect_used)]
        getrandom::fill(&mut b).expect("the operating system's random generator is unavailable");
        Lineage(b)
    }

    /// Lower-case hex, 32 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 32 hex characters.
    pub fn from_hex(s: &str) -> Result<Lineage, hex::FromHexError> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(s, &mut out)?;
        Ok(Lineage(out))
    }
}

impl fmt::Debug for Lineage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lineage({})", self.to_hex())
    }
}

impl fmt::Display for Lineage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// One message of the history.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Envelope {
    /// The history this envelope belongs to.
    pub lineage: Lineage,
    /// Gapless position within the lineage, from 1.
    pub seq: u64,
    /// Which part of its transaction this is, 1-based.
    pub part: u32,
    /// How many parts the transaction has (1 for a transaction that fits one message).
    pub parts: u32,
    /// State digest after the whole transaction.
    pub digest: Digest,
    /// Production time, milliseconds since the Unix epoch (informational: lag and age).
    pub produced_at_ms: u64,
    /// The changes, applied in order.
    pub changes: Vec<Change>,
}

impl Envelope {
    /// Whether this envelope completes its transaction.
    pub fn is_last_part(&self) -> bool {
        self.part == self.parts
    }

    /// The sequence of the last part of this envelope's transaction.
    pub fn txn_last_seq(&self) -> u64 {
        self.seq + u64::from(self.parts - self.part)
    }
}

/// Splits one transaction into envelopes of at most `max_bytes` of encoded changes each
/// (at least one change per part), with consecutive sequences from `first_seq`.
///
/// Every part gets `digest`, the state digest after the whole transaction. An empty
/// transaction gives one empty envelope (it still advances the sequence, which is how a
/// producer can mark a point in the history).
pub fn split_transaction(
    lineage: Lineage,
    first_seq: u64,
    digest: Digest,
    produced_at_ms: u64,
    changes: Vec<Change>,
    max_bytes: usize,
) -> Vec<Envelope> {
    let mut groups: Vec<Vec<Change>> = Vec::new();
    let mut current: Vec<Change> = Vec::new();
    let mut bytes = 0usize;
    for c in changes {
        let len = c.encoded_len_bound();
        if !current.is_empty() && bytes + len > max_bytes {
            groups.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += len;
        current.push(c);
    }
    groups.push(current);
    let parts = groups.len() as u32;
    groups
        .into_iter()
        .enumerate()
        .map(|(i, changes)| Envelope {
            lineage,
            seq: first_seq + i as u64,
            part: i as u32 + 1,
            parts,
            digest,
            produced_at_ms,
            changes,
        })
        .collect()
}

/// Milliseconds since the Unix epoch, for `produced_at_ms`.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_transaction_is_split_into_consecutive_parts() {
        let changes: Vec<Change> = (0..10)
            .map(|i| Change::put(format!("k{i}"), vec![0u8; 100]))
            .collect();
        let d = Digest([7; 32]);
        let parts = split_transaction(Lineage([1; 16]), 5, d, 0, changes, 250);
        assert_eq!(parts.len(), 5);
        for (i, e) in parts.iter().enumerate() {
            assert_eq!(e.seq, 5 + i as u64);
            assert_eq!(e.part, i as u32 + 1);
            assert_eq!(e.parts, 5);
            assert_eq!(e.digest, d);
            assert_eq!(e.changes.len(), 2);
            assert_eq!(e.txn_last_seq(), 9);
        }
        assert!(parts[4].is_last_part() && !parts[3].is_last_part());
    }

    #[test]
    fn an_empty_transaction_is_one_empty_envelope() {
        let parts = split_transaction(Lineage([1; 16]), 1, Digest::ZERO, 0, vec![], 100);
        assert_eq!(parts.len(), 1);
        assert!(parts[0].changes.is_empty() && parts[0].is_last_part());
    }

    #[test]
    fn lineage_hex_round_trips_and_random_lineages_differ() {
        let a = Lineage::random();
        assert_eq!(Lineage::from_hex(&a.to_hex()).ok(), Some(a));
        assert_ne!(a, Lineage::random());
    }
}
