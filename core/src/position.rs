//! A position in a pipeline's history: the last complete transaction a state holds, where
//! its envelope is in the stream, and the digest of the state there. The producer's
//! acknowledged position, a replica's cursor and the status both report are this one type.
//!
//! Pure; the consumer stores [`Position::encode`]'s 65 bytes beside its entries.
//!
//! ## Stored form
//!
//! ```text
//!  0   1  format version (1)
//!  1  16  lineage
//! 17   8  seq, u64 big-endian         last complete transaction
//! 25   8  stream_seq, u64 big-endian  its stream sequence
//! 33  32  digest                      of the state at seq
//! ```

use crate::digest::Digest;
use crate::envelope::Lineage;
use crate::state::State;

/// Version byte of the stored form.
pub const STORED_VERSION: u8 = 1;
/// Length of the stored form.
pub const STORED_LEN: usize = 1 + 16 + 8 + 8 + 32;

/// The last complete transaction a state holds (the producer's acknowledged one, or a
/// replica's cursor).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Position {
    /// The history (lineage) the position is in.
    pub lineage: Lineage,
    /// Envelope sequence of the last part of the last complete transaction (0: none yet).
    pub seq: u64,
    /// Stream sequence of that envelope: following resumes at `stream_seq + 1`.
    pub stream_seq: u64,
    /// State digest at `seq`.
    pub digest: Digest,
}

impl Position {
    /// The 65-byte stored form.
    pub fn encode(&self) -> [u8; STORED_LEN] {
        let mut out = [0u8; STORED_LEN];
        out[0] = STORED_VERSION;
        out[1..17].copy_from_slice(&self.lineage.0);
        out[17..25].copy_from_slice(&self.seq.to_be_bytes());
        out[25..33].copy_from_slice(&self.stream_seq.to_be_bytes());
        out[33..65].copy_from_slice(&self.digest.0);
        out
    }

    /// Parses the stored form, naming what is wrong.
    pub fn decode(b: &[u8]) -> Result<Position, String> {
        if b.len() != STORED_LEN {
            return Err(format!("{} bytes, expected {STORED_LEN}", b.len()));
        }
        if b[0] != STORED_VERSION {
            return Err(format!(
                "format version {}, this build reads {STORED_VERSION}",
                b[0]
            ));
        }
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(x)
        };
        let mut lineage = [0u8; 16];
        lineage.copy_from_slice(&b[1..17]);
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&b[33..65]);
        Ok(Position {
            lineage: Lineage(lineage),
            seq: u64_at(17),
            stream_seq: u64_at(25),
            digest: Digest(digest),
        })
    }

    /// The cursor of `state` with its envelope stored at `stream_seq`.
    pub fn of(state: &State, stream_seq: u64) -> Position {
        Position {
            lineage: state.lineage(),
            seq: state.seq(),
            stream_seq,
            digest: state.digest(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Position {
        Position {
            lineage: Lineage([7; 16]),
            seq: 42,
            stream_seq: 1 << 40,
            digest: Digest([9; 32]),
        }
    }

    #[test]
    fn the_stored_form_round_trips_and_is_laid_out_as_documented() {
        let p = sample();
        let b = p.encode();
        assert_eq!(b.len(), STORED_LEN);
        assert_eq!(b[0], STORED_VERSION);
        assert_eq!(&b[1..17], &[7; 16]);
        assert_eq!(&b[17..25], &42u64.to_be_bytes());
        assert_eq!(&b[25..33], &(1u64 << 40).to_be_bytes());
        assert_eq!(&b[33..65], &[9; 32]);
        assert_eq!(Position::decode(&b), Ok(p));
    }

    #[test]
    fn a_wrong_length_or_version_is_refused_by_name() {
        let b = sample().encode();
        let short = Position::decode(&b[..64]).expect_err("64 bytes");
        assert!(short.contains("64 bytes, expected 65"), "{short}");
        let mut other = b;
        other[0] = 2;
        let version = Position::decode(&other).expect_err("version 2");
        assert!(version.contains("format version 2"), "{version}");
    }

    #[test]
    fn the_position_of_a_state_names_its_lineage_sequence_and_digest() {
        let s = State::new(Lineage([3; 16]));
        let p = Position::of(&s, 17);
        assert_eq!(
            (p.lineage, p.seq, p.stream_seq, p.digest),
            (s.lineage(), 0, 17, s.digest())
        );
    }
}
