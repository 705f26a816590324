//! Fencing snapshot writers: the pure rules that decide whether a writer's cut may become a
//! snapshot and be named by `latest`. No I/O: `deltasync-nats`'s `store` (write side) reads
//! the envelope the stream holds at the cut and the current `latest`, and asks these rules;
//! recovery (`crate::recovery`) checks a snapshot's cut against the stream with the same
//! [`Cut::check`].
//!
//! ## Invariants
//!
//! - A cut is in the history only when the stream holds, at its stream sequence, the
//!   envelope of its lineage and sequence, that envelope is the last part of its transaction,
//!   and it records the cut's digest ([`Cut::check`]).
//! - `latest` never moves backwards within a lineage, nor to another lineage's cut at or
//!   before the stream position the snapshot it names was cut at; a tie between two
//!   different cuts goes to the one already there ([`may_replace_latest`]).
//! - A `latest` whose manifest is gone or unreadable protects nothing.

use super::{Cut, Manifest, Pointer};
use crate::codec::Classified;
use crate::digest::Digest;
use crate::envelope::Lineage;

/// Why the message at a cut's stream sequence is not the cut's envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CutMismatch {
    /// The cut's envelope is there, but not the last part of its transaction: no replica can
    /// start from it (the transaction's next part cannot apply without its earlier parts).
    #[error(
        "the envelope there is part {part} of {parts} of a transaction; snapshots are cut \
         only at a transaction's last part"
    )]
    InsideTransaction { part: u32, parts: u32 },
    /// The cut's envelope is there, recording another state digest.
    #[error("the envelope there records digest {found}")]
    Digest { found: Digest },
    /// Another envelope is there.
    #[error("the stream holds envelope {lineage}:{seq} there")]
    OtherEnvelope {
        lineage: Lineage,
        seq: u64,
        part: u32,
        parts: u32,
    },
    /// Something that is not an envelope is there.
    #[error("the stream holds a foreign message there ({reason})")]
    Foreign { reason: String },
}

impl Cut {
    /// Is `found`, the message at this cut's stream sequence, the cut's own envelope: its
    /// lineage and sequence, the last part of its transaction, recording its digest?
    pub fn check(&self, found: &Classified) -> Result<(), CutMismatch> {
        match found {
            Classified::Envelope(e) if e.lineage == self.lineage && e.seq == self.seq => {
                if !e.is_last_part() {
                    return Err(CutMismatch::InsideTransaction {
                        part: e.part,
                        parts: e.parts,
                    });
                }
                if e.digest != self.digest {
                    return Err(CutMismatch::Digest { found: e.digest });
                }
                Ok(())
            }
            Classified::Envelope(e) => Err(CutMismatch::OtherEnvelope {
                lineage: e.lineage,
                seq: e.seq,
                part: e.part,
                parts: e.parts,
            }),
            Classified::Foreign { reason } => Err(CutMismatch::Foreign {
                reason: reason.clone(),
            }),
        }
    }

    /// Whether a writer must prove this cut against the stream: a new lineage's empty start
    /// (sequence 0) has no envelope to be part of yet.
    pub fn needs_fencing(&self) -> bool {
        self.seq > 0
    }
}

/// Why a cut may not replace the snapshot `latest` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stale {
    /// The lineage of the snapshot `latest` names.
    pub latest_lineage: Lineage,
    /// Its sequence (the pointer's within the lineage, the manifest's across lineages).
    pub latest_seq: u64,
}

/// Whether deciding [`may_replace_latest`] needs the manifest `latest` names: only across
/// lineages, where the stream positions of the two cuts are compared.
pub fn needs_latest_manifest(latest: &Pointer, cut: &Cut) -> bool {
    latest.lineage != cut.lineage
}

/// May `cut` replace the snapshot `latest` names? `latest_manifest` is the manifest it names
/// (`None` when it is gone or unreadable); it is consulted only when
/// [`needs_latest_manifest`].
///
/// - Same lineage: only a later sequence (a pointer at sequence 0, a new lineage's empty
///   start, protects nothing).
/// - Another lineage: only a position strictly later in the stream. A new lineage starts with
///   a marker envelope after the old lineage's last one; a zombie of the old lineage is at or
///   behind the position the new lineage's snapshot names; a tie between two different cuts
///   goes to the one already there.
pub fn may_replace_latest(
    latest: &Pointer,
    latest_manifest: Option<&Manifest>,
    cut: &Cut,
) -> Result<(), Stale> {
    if latest.lineage == cut.lineage {
        if latest.seq >= cut.seq && latest.seq > 0 {
            return Err(Stale {
                latest_lineage: latest.lineage,
                latest_seq: latest.seq,
            });
        }
        return Ok(());
    }
    match latest_manifest {
        Some(m) if m.stream_seq >= cut.stream_seq => Err(Stale {
            latest_lineage: latest.lineage,
            latest_seq: m.seq,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Change;
    use crate::envelope::Envelope;

    const A: Lineage = Lineage([1; 16]);
    const B: Lineage = Lineage([2; 16]);
    const D: Digest = Digest([7; 32]);

    fn cut(lineage: Lineage, seq: u64, stream_seq: u64) -> Cut {
        Cut {
            lineage,
            seq,
            stream_seq,
            digest: D,
        }
    }

    fn envelope(lineage: Lineage, seq: u64, part: u32, parts: u32, digest: Digest) -> Classified {
        Classified::Envelope(Envelope {
            lineage,
            seq,
            part,
            parts,
            digest,
            produced_at_ms: 0,
            changes: vec![Change::put("k", &b"v"[..])],
        })
    }

    fn pointer(lineage: Lineage, seq: u64) -> Pointer {
        Pointer {
            lineage,
            seq,
            manifest: format!("manifest.{lineage}.{seq:020}"),
        }
    }

    fn manifest(lineage: Lineage, seq: u64, stream_seq: u64) -> Manifest {
        Manifest {
            lineage,
            seq,
            stream_seq,
            digest: D,
            entries: 0,
            payload_bytes: 0,
            created_at_ms: 0,
            base_seq: seq,
            ranges: Vec::new(),
            segments: Vec::new(),
            bytes_written: 0,
        }
    }

    #[test]
    fn the_cuts_own_last_part_with_its_digest_is_in_the_history() {
        assert_eq!(cut(A, 5, 9).check(&envelope(A, 5, 1, 1, D)), Ok(()));
        assert_eq!(cut(A, 5, 9).check(&envelope(A, 5, 3, 3, D)), Ok(()));
    }

    #[test]
    fn a_cut_inside_a_transaction_is_refused_naming_the_part() {
        let err = cut(A, 5, 9)
            .check(&envelope(A, 5, 2, 3, D))
            .expect_err("not the last part");
        assert_eq!(err, CutMismatch::InsideTransaction { part: 2, parts: 3 });
        assert!(err.to_string().contains("part 2 of 3"), "{err}");
    }

    #[test]
    fn another_digest_at_the_cut_is_refused_naming_it() {
        let other = Digest([8; 32]);
        let err = cut(A, 5, 9)
            .check(&envelope(A, 5, 1, 1, other))
            .expect_err("digest differs");
        assert_eq!(err, CutMismatch::Digest { found: other });
        assert!(err.to_string().contains(&other.to_string()), "{err}");
    }

    #[test]
    fn another_envelope_at_the_cut_is_refused_whatever_differs() {
        for found in [
            envelope(B, 5, 1, 1, D),
            envelope(A, 4, 1, 1, D),
            envelope(A, 6, 1, 1, D),
        ] {
            let err = cut(A, 5, 9).check(&found).expect_err("another envelope");
            assert!(matches!(err, CutMismatch::OtherEnvelope { .. }), "{err:?}");
        }
        let err = cut(A, 5, 9)
            .check(&envelope(B, 5, 1, 1, D))
            .expect_err("another lineage");
        assert_eq!(
            err.to_string(),
            format!("the stream holds envelope {B}:5 there")
        );
    }

    #[test]
    fn a_foreign_message_at_the_cut_is_refused_with_its_reason() {
        let found = Classified::Foreign {
            reason: "bad magic".into(),
        };
        let err = cut(A, 5, 9).check(&found).expect_err("foreign");
        assert_eq!(
            err,
            CutMismatch::Foreign {
                reason: "bad magic".into()
            }
        );
        assert!(err.to_string().contains("bad magic"), "{err}");
    }

    #[test]
    fn only_a_cut_after_sequence_zero_is_fenced() {
        assert!(!cut(A, 0, 0).needs_fencing());
        assert!(cut(A, 1, 1).needs_fencing());
    }

    #[test]
    fn within_a_lineage_only_a_later_sequence_replaces_latest() {
        let latest = pointer(A, 10);
        assert_eq!(may_replace_latest(&latest, None, &cut(A, 11, 20)), Ok(()));
        for seq in [10, 9, 1, 0] {
            assert_eq!(
                may_replace_latest(&latest, None, &cut(A, seq, 20)),
                Err(Stale {
                    latest_lineage: A,
                    latest_seq: 10
                }),
                "seq {seq}"
            );
        }
        assert!(!needs_latest_manifest(&latest, &cut(A, 11, 20)));
    }

    #[test]
    fn a_latest_at_a_lineages_empty_start_protects_nothing() {
        let latest = pointer(A, 0);
        assert_eq!(may_replace_latest(&latest, None, &cut(A, 0, 0)), Ok(()));
        assert_eq!(may_replace_latest(&latest, None, &cut(A, 1, 3)), Ok(()));
    }

    #[test]
    fn across_lineages_only_a_strictly_later_stream_position_replaces_latest() {
        let latest = pointer(A, 10);
        let m = manifest(A, 10, 50);
        assert!(needs_latest_manifest(&latest, &cut(B, 1, 51)));
        assert_eq!(
            may_replace_latest(&latest, Some(&m), &cut(B, 1, 51)),
            Ok(())
        );
        // A tie between two different cuts goes to the one already there.
        assert_eq!(
            may_replace_latest(&latest, Some(&m), &cut(B, 1, 50)),
            Err(Stale {
                latest_lineage: A,
                latest_seq: 10
            })
        );
        // A zombie of an older lineage behind the new lineage's snapshot.
        assert_eq!(
            may_replace_latest(&latest, Some(&m), &cut(B, 99, 40)),
            Err(Stale {
                latest_lineage: A,
                latest_seq: 10
            })
        );
    }

    #[test]
    fn across_lineages_the_manifests_seq_is_reported() {
        let latest = pointer(A, 10);
        let m = manifest(A, 12, 50);
        assert_eq!(
            may_replace_latest(&latest, Some(&m), &cut(B, 1, 30)),
            Err(Stale {
                latest_lineage: A,
                latest_seq: 12
            })
        );
    }

    #[test]
    fn a_latest_whose_manifest_is_missing_protects_nothing_across_lineages() {
        let latest = pointer(A, 10);
        assert_eq!(may_replace_latest(&latest, None, &cut(B, 1, 1)), Ok(()));
    }
}
