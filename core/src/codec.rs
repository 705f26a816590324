//! The wire codec: a fixed header naming the message kind and protocol version, then a
//! MessagePack body (rmp-serde). Decoding never panics and never allocates more than a small
//! multiple of its input.
//!
//! ## Wire format
//!
//! ```text
//! offset size  field
//! 0      2     magic "DS"
//! 2      1     kind: 'E' envelope ('M' manifest, 'C' chunk, 'S' segment: see `snapshot`)
//! 3      2     protocol version, u16 big-endian (1)
//! 5      ..    MessagePack body
//!
//! envelope body (an array):
//!   [ lineage: bin 16, seq: uint, part: uint, parts: uint, digest: bin 32,
//!     produced_at_ms: uint, changes: [ [key: str, value: bin | nil], ... ] ]
//!   a nil value is a delete
//! ```
//!
//! ## Invariants
//!
//! - The version is checked before the body is read; a message of another version is refused
//!   as such, never misread.
//! - Input longer than [`MAX_MESSAGE_BYTES`] is refused before decoding; the body decoder
//!   reads length-prefixed strings and bins incrementally and preallocates sequences at most
//!   to serde's cautious bound, so a length prefix claiming more than the input holds fails
//!   instead of allocating.
//! - A decoded envelope satisfies every limit of `change` and `envelope`; trailing bytes after
//!   the body are an error.

use crate::change::{Change, ChangeError, Key};
use crate::digest::Digest;
use crate::envelope::{Envelope, Lineage, MAX_TXN_PARTS, PROTOCOL_VERSION};
use bytes::Bytes;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeTuple, Serializer};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// Largest message the decoder accepts (NATS's own hard limit on `max_payload`).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Most changes one envelope may hold.
pub const MAX_CHANGES_PER_ENVELOPE: usize = 1 << 20;

/// Length of the fixed header.
pub const HEADER_LEN: usize = 5;

/// The kinds of message the protocol defines.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// A delta envelope on the pipeline's stream.
    Envelope,
    /// A snapshot manifest in the bucket.
    Manifest,
    /// A snapshot chunk of base entries in the bucket.
    Chunk,
    /// A snapshot delta segment in the bucket.
    Segment,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Envelope => b'E',
            Kind::Manifest => b'M',
            Kind::Chunk => b'C',
            Kind::Segment => b'S',
        }
    }

    /// The name used in errors.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Envelope => "envelope",
            Kind::Manifest => "snapshot manifest",
            Kind::Chunk => "snapshot chunk",
            Kind::Segment => "snapshot segment",
        }
    }
}

/// Why a message could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("cannot encode {kind}: {source}")]
    Body {
        kind: &'static str,
        source: rmp_serde::encode::Error,
    },
    #[error("invalid {kind}: {reason}")]
    Invalid { kind: &'static str, reason: String },
}

/// Why a message could not be decoded; each names what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{kind} of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{kind} truncated: {len} bytes is shorter than the {HEADER_LEN}-byte header")]
    Truncated { kind: &'static str, len: usize },
    #[error("not a deltasync message: expected magic \"DS\", found {found:02x?}")]
    BadMagic { found: [u8; 2] },
    #[error("expected a {expected}, found message kind {found:?}")]
    WrongKind { expected: &'static str, found: char },
    #[error("{kind} has protocol version {found}; this build reads version {supported}")]
    UnsupportedVersion {
        kind: &'static str,
        found: u16,
        supported: u16,
    },
    #[error("malformed {kind} body: {source}")]
    Body {
        kind: &'static str,
        source: rmp_serde::decode::Error,
    },
    #[error("{kind} has trailing bytes after its body")]
    TrailingBytes { kind: &'static str },
    #[error("invalid {kind}: {reason}")]
    Invalid { kind: &'static str, reason: String },
    #[error("invalid envelope: change {index}: {source}")]
    InvalidChange { index: usize, source: ChangeError },
}

/// Writes the header for `kind` into a new buffer with room for `body_hint` more bytes.
fn header(kind: Kind, body_hint: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body_hint);
    out.extend_from_slice(b"DS");
    out.push(kind.byte());
    out.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    out
}

/// Encodes `body` as a message of `kind`.
pub fn encode_body<T: Serialize>(
    kind: Kind,
    body: &T,
    hint: usize,
) -> Result<Vec<u8>, EncodeError> {
    let mut out = header(kind, hint);
    body.serialize(&mut rmp_serde::Serializer::new(&mut out))
        .map_err(|source| EncodeError::Body {
            kind: kind.name(),
            source,
        })?;
    Ok(out)
}

/// Checks the header of a message of `kind` and returns its body.
pub fn check_header(kind: Kind, input: &[u8]) -> Result<&[u8], DecodeError> {
    let name = kind.name();
    if input.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge {
            kind: name,
            len: input.len(),
            max: MAX_MESSAGE_BYTES,
        });
    }
    if input.len() < HEADER_LEN {
        return Err(DecodeError::Truncated {
            kind: name,
            len: input.len(),
        });
    }
    if &input[..2] != b"DS" {
        return Err(DecodeError::BadMagic {
            found: [input[0], input[1]],
        });
    }
    if input[2] != kind.byte() {
        return Err(DecodeError::WrongKind {
            expected: name,
            found: char::from(input[2]),
        });
    }
    let version = u16::from_be_bytes([input[3], input[4]]);
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            kind: name,
            found: version,
            supported: PROTOCOL_VERSION,
        });
    }
    Ok(&input[HEADER_LEN..])
}

/// Decodes the body of a message of `kind`, refusing trailing bytes.
pub fn decode_body<T: serde::de::DeserializeOwned>(
    kind: Kind,
    input: &[u8],
) -> Result<T, DecodeError> {
    decode_body_with(kind, input, std::marker::PhantomData::<T>)
}

/// [`decode_body`] through a seed: for a decoder that builds its value from bytes as they are
/// read (and so takes state of its own).
pub fn decode_body_with<T, S>(kind: Kind, input: &[u8], seed: S) -> Result<T, DecodeError>
where
    S: for<'de> serde::de::DeserializeSeed<'de, Value = T>,
{
    let body = check_header(kind, input)?;
    // Strings and binaries are handed to the visitors as slices of `body` (a reader over
    // `io::Read` copies each into a buffer of its own first: ~4% of a bootstrap's CPU).
    let mut de = rmp_serde::Deserializer::from_read_ref(body);
    // Our formats nest about five deep; rmp-serde's default of 1024 levels overflows a 2 MiB
    // thread stack in debug builds on hostile input (found by the snapshot fuzz tests).
    de.set_max_depth(16);
    let value = seed
        .deserialize(&mut de)
        .map_err(|source| DecodeError::Body {
            kind: kind.name(),
            source,
        })?;
    // The body ends there: reading one more value must find the end of the input at its
    // first byte (this reader does not tell how much it consumed).
    match serde::de::IgnoredAny::deserialize(&mut de) {
        Err(rmp_serde::decode::Error::InvalidMarkerRead(e))
            if e.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            Ok(value)
        }
        _ => Err(DecodeError::TrailingBytes { kind: kind.name() }),
    }
}

/// Encodes an envelope.
pub fn encode_envelope(env: &Envelope) -> Result<Vec<u8>, EncodeError> {
    let hint = 64
        + env
            .changes
            .iter()
            .map(Change::encoded_len_bound)
            .sum::<usize>();
    let wire = WireEnvelopeOut {
        lineage: serde_bytes::Bytes::new(&env.lineage.0),
        seq: env.seq,
        part: env.part,
        parts: env.parts,
        digest: serde_bytes::Bytes::new(&env.digest.0),
        produced_at_ms: env.produced_at_ms,
        changes: WireChanges(&env.changes),
    };
    encode_body(Kind::Envelope, &wire, hint)
}

/// Decodes and validates an envelope.
pub fn decode_envelope(input: &[u8]) -> Result<Envelope, DecodeError> {
    let wire: WireEnvelopeIn = decode_body(Kind::Envelope, input)?;
    let invalid = |reason: String| DecodeError::Invalid {
        kind: "envelope",
        reason,
    };
    if wire.seq == 0 {
        return Err(invalid("sequence 0 (sequences start at 1)".into()));
    }
    if wire.parts == 0 || wire.parts > MAX_TXN_PARTS || wire.part == 0 || wire.part > wire.parts {
        return Err(invalid(format!(
            "part {} of {} (parts count from 1, at most {MAX_TXN_PARTS})",
            wire.part, wire.parts
        )));
    }
    if wire
        .seq
        .checked_add(u64::from(wire.parts - wire.part))
        .is_none()
    {
        return Err(invalid(format!(
            "part {} of {} at sequence {} would end past the last sequence",
            wire.part, wire.parts, wire.seq
        )));
    }
    if u64::from(wire.part) > wire.seq {
        return Err(invalid(format!(
            "part {} cannot be at sequence {}",
            wire.part, wire.seq
        )));
    }
    let changes = wire.changes.0;
    for (index, c) in changes.iter().enumerate() {
        c.validate()
            .map_err(|source| DecodeError::InvalidChange { index, source })?;
    }
    Ok(Envelope {
        lineage: Lineage(wire.lineage.0),
        seq: wire.seq,
        part: wire.part,
        parts: wire.parts,
        digest: Digest(wire.digest.0),
        produced_at_ms: wire.produced_at_ms,
        changes,
    })
}

#[derive(Serialize)]
struct WireEnvelopeOut<'a> {
    lineage: &'a serde_bytes::Bytes,
    seq: u64,
    part: u32,
    parts: u32,
    digest: &'a serde_bytes::Bytes,
    produced_at_ms: u64,
    changes: WireChanges<'a>,
}

#[derive(Deserialize)]
struct WireEnvelopeIn {
    lineage: FixedBytes<16>,
    seq: u64,
    part: u32,
    parts: u32,
    digest: FixedBytes<32>,
    produced_at_ms: u64,
    changes: ChangesIn,
}

/// An array of changes whose length is checked against [`MAX_CHANGES_PER_ENVELOPE`] before
/// any element is decoded, so a message of millions of tiny changes is refused before it
/// costs memory.
pub(crate) struct ChangesIn(pub(crate) Vec<Change>);

impl<'de> Deserialize<'de> for ChangesIn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ChangesIn, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ChangesIn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "an array of at most {MAX_CHANGES_PER_ENVELOPE} changes")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ChangesIn, A::Error> {
                let hint = seq.size_hint().unwrap_or(0);
                if hint > MAX_CHANGES_PER_ENVELOPE {
                    return Err(de::Error::invalid_length(hint, &self));
                }
                // Preallocate no more than the input could hold (a change is at least 3 bytes).
                let mut out = Vec::with_capacity(hint.min(64 * 1024));
                while let Some(c) = seq.next_element::<Change>()? {
                    if out.len() == MAX_CHANGES_PER_ENVELOPE {
                        return Err(de::Error::invalid_length(out.len() + 1, &self));
                    }
                    out.push(c);
                }
                Ok(ChangesIn(out))
            }
        }
        d.deserialize_seq(V)
    }
}

/// Serializes a slice of changes as an array of `[key, value|nil]` pairs.
pub(crate) struct WireChanges<'a>(pub(crate) &'a [Change]);

impl Serialize for WireChanges<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter())
    }
}

impl Serialize for Change {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(2)?;
        t.serialize_element(self.key())?;
        t.serialize_element(&self.value().map(|v| serde_bytes::Bytes::new(v)))?;
        t.end()
    }
}

impl<'de> Deserialize<'de> for Change {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Change, D::Error> {
        d.deserialize_tuple(2, ChangeVisitor)
    }
}

struct ChangeVisitor;

impl<'de> Visitor<'de> for ChangeVisitor {
    type Value = Change;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a change: [key string, value bytes or nil]")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Change, A::Error> {
        let key: KeyIn = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(0, &self))?;
        let value: Option<BytesIn> = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(1, &self))?;
        if seq.next_element::<de::IgnoredAny>()?.is_some() {
            return Err(de::Error::invalid_length(3, &self));
        }
        Ok(match value {
            Some(v) => Change::Put {
                key: key.0,
                value: v.0,
            },
            None => Change::Delete { key: key.0 },
        })
    }
}

/// A key read straight from the input into its shared allocation.
pub(crate) struct KeyIn(pub(crate) Key);

impl<'de> Deserialize<'de> for KeyIn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<KeyIn, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KeyIn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a UTF-8 key")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<KeyIn, E> {
                Ok(KeyIn(Arc::from(s)))
            }
        }
        d.deserialize_str(V)
    }
}

/// A value read straight from the input into its own allocation (so a replica never pins a
/// whole message buffer for one surviving value).
pub(crate) struct BytesIn(pub(crate) Bytes);

impl<'de> Deserialize<'de> for BytesIn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<BytesIn, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = BytesIn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("value bytes")
            }
            fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<BytesIn, E> {
                Ok(BytesIn(Bytes::copy_from_slice(b)))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// Exactly `N` bytes, as a MessagePack bin.
pub(crate) struct FixedBytes<const N: usize>(pub(crate) [u8; N]);

impl<'de, const N: usize> Deserialize<'de> for FixedBytes<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<const N: usize>;
        impl<const N: usize> Visitor<'_> for V<N> {
            type Value = FixedBytes<N>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "exactly {N} bytes")
            }
            fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<FixedBytes<N>, E> {
                let arr: [u8; N] = b
                    .try_into()
                    .map_err(|_| E::invalid_length(b.len(), &self))?;
                Ok(FixedBytes(arr))
            }
        }
        d.deserialize_bytes(V::<N>)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        FixedBytes::<32>::deserialize(d).map(|b| Digest(b.0))
    }
}

impl Serialize for Lineage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Lineage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Lineage, D::Error> {
        FixedBytes::<16>::deserialize(d).map(|b| Lineage(b.0))
    }
}

/// A message of the pipeline's stream, classified: what a reader of the stream (recovery, a
/// replica, a snapshot writer's fencing) sees at a position.
#[derive(Debug, Clone)]
pub enum Classified {
    /// A valid envelope (of any lineage).
    Envelope(Envelope),
    /// Not part of any history: garbage, a wrong version, a truncated message.
    Foreign { reason: String },
}

/// Decodes a payload, classifying anything that is not a valid envelope as foreign.
pub fn classify(payload: &[u8]) -> Classified {
    match decode_envelope(payload) {
        Ok(e) => Classified::Envelope(e),
        Err(e) => Classified::Foreign {
            reason: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn sample() -> Envelope {
        Envelope {
            lineage: Lineage([9; 16]),
            seq: 42,
            part: 1,
            parts: 1,
            digest: Digest([3; 32]),
            produced_at_ms: 1_700_000_000_000,
            changes: vec![
                Change::put("a", &b"1"[..]),
                Change::delete("b"),
                Change::put("", &b""[..]),
            ],
        }
    }

    fn err(input: &[u8]) -> String {
        match decode_envelope(input) {
            Ok(e) => panic!("decoded garbage into {e:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn an_envelope_round_trips() {
        let env = sample();
        let bytes = encode_envelope(&env).unwrap_or_default();
        assert_eq!(&bytes[..5], b"DSE\x00\x01");
        assert_eq!(decode_envelope(&bytes).ok(), Some(env));
    }

    #[test]
    fn garbage_and_wrong_versions_are_refused_with_reasons() {
        let good = encode_envelope(&sample()).unwrap_or_default();
        assert!(err(b"").contains("truncated"));
        assert!(err(b"{\"op\":1}").contains("magic"));
        assert!(
            err(b"DSM\x00\x01").contains("expected a envelope")
                || err(b"DSM\x00\x01").contains("kind")
        );
        let mut v2 = good.clone();
        v2[4] = 2;
        assert!(err(&v2).contains("protocol version 2"), "{}", err(&v2));
        assert!(err(&good[..good.len() - 3]).contains("malformed"));
        // After the body: a whole value, a value cut short, a byte no value starts with, many
        // bytes.
        for tail in [&[0u8][..], &[0xc4], &[0xc1], &[0x92, 1, 2, 3, 4, 5]] {
            let mut trailing = good.clone();
            trailing.extend_from_slice(tail);
            assert!(
                err(&trailing).contains("trailing bytes"),
                "{tail:?}: {}",
                err(&trailing)
            );
        }
        assert!(decode_envelope(&good).is_ok());
    }

    #[test]
    fn semantic_limits_are_checked() {
        let mut e = sample();
        e.seq = 0;
        assert!(err(&encode_envelope(&e).unwrap_or_default()).contains("sequence 0"));
        let mut e = sample();
        e.part = 3;
        e.parts = 2;
        assert!(err(&encode_envelope(&e).unwrap_or_default()).contains("part 3 of 2"));
        let mut e = sample();
        e.changes = vec![Change::put("k".repeat(2000), &b""[..])];
        assert!(
            err(&encode_envelope(&e).unwrap_or_default()).contains("change 0: key is 2000 bytes")
        );
    }

    #[test]
    fn a_length_prefix_larger_than_the_input_fails_without_allocating() {
        // Header, then an array claiming 7 fields whose `changes` claims 2^32-1 elements.
        let mut m = b"DSE\x00\x01".to_vec();
        m.push(0x97);
        m.extend_from_slice(&[0xc4, 16]);
        m.extend_from_slice(&[1; 16]);
        m.extend_from_slice(&[1, 1, 1, 0xc4, 32]);
        m.extend_from_slice(&[0; 32]);
        m.push(0);
        m.extend_from_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff]);
        assert!(err(&m).contains("malformed"));
    }
}
