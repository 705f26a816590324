//! Fuzzing the snapshot decoders (`decode_pointer`, `decode_manifest`, `decode_chunk`,
//! `decode_segment`) and the edge cases of `plan`: no I/O, no NATS.
//!
//! Bad input gets an error, never a panic and never an allocation its length prefixes ask
//! for. Inputs are arbitrary bytes, arbitrary bytes after each valid header, random
//! MessagePack trees, shape-aware bodies (right structure, random values), and mutations
//! (bit flips, truncation, insertion, duplication, removal, overwrites with length markers)
//! of valid encodings made by `plan`, `encode_manifest` and `encode_pointer`.
//!
//! ## Oracles
//!
//! ```text
//! every decoder              Ok or Err, never a panic
//! decode_pointer / manifest  Ok => re-encodes to bytes that decode to the same value;
//!                            a manifest passes Manifest::validate
//! decode_chunk / segment     with the manifest's BlobRef: Ok only for the original bytes
//!                            (the content hash); with a BlobRef naming the mutated bytes'
//!                            hash (a hostile producer): Ok => keys inside the range's
//!                            buckets, every change within the limits
//! huge length prefixes       Err within a second, peak RSS up by at most a few MiB, inside
//!                            a child process with a 1 GiB address-space ceiling
//! deep nesting (100 000)     Err, without overflowing a 2 MiB thread stack (libtest's and
//!                            tokio's default), in the same kind of child process
//! ```
//!
//! Failing cases proptest finds are kept in `proptest-regressions/snapshot_fuzz.txt`. The
//! defaults keep this file near 10 s in a debug build; for a longer run:
//! `PROPTEST_CASES=50000 cargo test --release -p deltasync-core --test snapshot_fuzz`.

use bytes::Bytes;
use deltasync_core::change::{Change, MAX_KEY_BYTES, MAX_VALUE_BYTES};
use deltasync_core::codec::{decode_envelope, HEADER_LEN};
use deltasync_core::digest::{bucket_of, Digest, BUCKETS};
use deltasync_core::envelope::Lineage;
use deltasync_core::snapshot::{
    apply_segment, chunk_key, content_hash, decode_chunk, decode_chunks_prepared, decode_manifest,
    decode_pointer, decode_segment, encode_manifest, encode_pointer, manifest_key, plan,
    replace_range, segment_key, verify, BlobRef, Chunk, Manifest, Plan, Pointer, RangeRef, Segment,
    SegmentRef, MAX_BLOB_BYTES, MAX_RESERVED_ENTRIES, MAX_SEGMENTS, MIN_ENTRY_BYTES,
};
use deltasync_core::state::State;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::FileFailurePersistence;
use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

/// The lineage of every test state.
const L: Lineage = Lineage([3; 16]);

/// Where failing cases are kept (the default location does not work for `tests/*.rs`).
const REGRESSIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/proptest-regressions/snapshot_fuzz.txt"
);

/// The valid headers of the snapshot kinds, protocol version 1.
const MANIFEST_HEADER: &[u8; HEADER_LEN] = b"DSM\x00\x01";
const CHUNK_HEADER: &[u8; HEADER_LEN] = b"DSC\x00\x01";
const SEGMENT_HEADER: &[u8; HEADER_LEN] = b"DSS\x00\x01";

/// `cases` per test, unless `PROPTEST_CASES` asks for another number.
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS))),
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Valid encodings to mutate

/// A valid encoding and what a reader would check it against.
#[derive(Debug, Clone)]
enum Target {
    Pointer(Vec<u8>),
    Manifest(Vec<u8>),
    Chunk {
        bytes: Vec<u8>,
        blob: BlobRef,
        range: RangeRef,
    },
    Segment {
        bytes: Vec<u8>,
        blob: BlobRef,
        seg: SegmentRef,
    },
}

impl Target {
    fn bytes(&self) -> &[u8] {
        match self {
            Target::Pointer(b) | Target::Manifest(b) => b,
            Target::Chunk { bytes, .. } | Target::Segment { bytes, .. } => bytes,
        }
    }
}

/// Every blob of `plans`, by key, as a reader would fetch them from the bucket.
fn blob_map<'a>(plans: impl IntoIterator<Item = &'a Plan>) -> HashMap<String, Bytes> {
    plans
        .into_iter()
        .flat_map(|p| &p.blobs)
        .map(|b| (b.key.clone(), b.bytes.clone()))
        .collect()
}

/// A base snapshot and an incremental one on top of it, with small blobs so that ranges have
/// several chunks and the segment several pieces.
static TARGETS: LazyLock<Vec<Target>> = LazyLock::new(|| {
    let mut s1 = State::new(L);
    let mut changes: Vec<Change> = (0..300)
        .map(|i| Change::put(format!("order/{i:04}"), vec![i as u8; i % 120]))
        .collect();
    changes.push(Change::put("", Bytes::new()));
    changes.push(Change::put("é/ü/€", vec![0xff; 3]));
    s1.apply_changes(&changes);
    s1.set_position(L, 10);
    let p1 = plan(&s1, 110, None, 4096, 2048, 1).expect("plan the base");
    let mut s2 = s1.clone();
    let churn: Vec<Change> = (0..40)
        .map(|i| Change::put(format!("order/{:04}", i * 7), vec![0xab; 90]))
        .chain((0..8).map(|i| Change::delete(format!("order/{:04}", i * 13 + 1))))
        .collect();
    s2.apply_changes(&churn);
    s2.set_position(L, 12);
    let p2 = plan(&s2, 112, Some((&p1.manifest, &s1)), 4096, 2048, 2).expect("plan the segment");
    assert_eq!(
        p2.manifest.segments.len(),
        1,
        "the second plan stacks a segment"
    );
    assert!(
        p2.manifest.segments[0].pieces.len() > 1,
        "several segment pieces"
    );
    assert!(
        p1.manifest.ranges.iter().any(|r| r.chunks.len() > 1),
        "a range of several chunks"
    );
    let blobs = blob_map([&p1, &p2]);

    let mut targets = Vec::new();
    let pointer = Pointer {
        lineage: L,
        seq: 12,
        manifest: manifest_key(L, 12),
    };
    targets.push(Target::Pointer(encode_pointer(&pointer).expect("pointer")));
    for p in [&p1, &p2] {
        targets.push(Target::Manifest(
            encode_manifest(&p.manifest).expect("manifest"),
        ));
    }
    let m = &p2.manifest;
    for range in &m.ranges {
        for blob in &range.chunks {
            targets.push(Target::Chunk {
                bytes: blobs[&chunk_key(&blob.hash)].to_vec(),
                blob: blob.clone(),
                range: range.clone(),
            });
        }
    }
    for seg in &m.segments {
        for blob in &seg.pieces {
            targets.push(Target::Segment {
                bytes: blobs[&segment_key(&blob.hash)].to_vec(),
                blob: blob.clone(),
                seg: seg.clone(),
            });
        }
    }
    // The fixture itself must be readable, or the mutations below prove nothing.
    assert_eq!(assemble(&blobs, m).as_ref(), Ok(&s2));
    targets
});

// ---------------------------------------------------------------------------------------------
// Decoding and its oracles

/// Assembles `m` from `blobs` as a reader does: chunks, then segments, then verification.
fn assemble(blobs: &HashMap<String, Bytes>, m: &Manifest) -> Result<State, String> {
    let mut s = State::new(m.lineage);
    for r in &m.ranges {
        let mut chunks = Vec::new();
        for c in &r.chunks {
            let key = chunk_key(&c.hash);
            let bytes = blobs.get(&key).ok_or(format!("{key} is missing"))?;
            chunks.push(decode_chunk(bytes, c, r).map_err(|e| e.to_string())?);
        }
        replace_range(&mut s, r, chunks);
    }
    for seg in &m.segments {
        for p in &seg.pieces {
            let key = segment_key(&p.hash);
            let bytes = blobs.get(&key).ok_or(format!("{key} is missing"))?;
            let piece = decode_segment(bytes, p, seg).map_err(|e| e.to_string())?;
            apply_segment(&mut s, &piece, |_| true);
        }
    }
    s.set_position(m.lineage, m.seq);
    verify(&s, m)?;
    Ok(s)
}

/// A reference naming `bytes`' own hash: what a hostile or buggy producer could write into a
/// manifest, so that the body decoder sees the bytes.
fn self_ref(bytes: &[u8]) -> BlobRef {
    BlobRef {
        hash: content_hash(bytes),
        bytes: bytes.len() as u64,
        entries: 0,
    }
}

/// The range of all buckets, and a narrow one.
static RANGES: LazyLock<[RangeRef; 2]> = LazyLock::new(|| {
    let range = |first_bucket: u32, end_bucket: u32| RangeRef {
        first_bucket,
        end_bucket,
        digest: Digest::ZERO,
        chunks: Vec::new(),
    };
    [range(0, BUCKETS as u32), range(256, 512)]
});

fn any_segment_ref(from_seq: u64, to_seq: u64) -> SegmentRef {
    SegmentRef {
        from_seq,
        to_seq,
        pieces: Vec::new(),
    }
}

fn check_pointer(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(p) = decode_pointer(bytes) {
        let again = encode_pointer(&p).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(decode_pointer(&again).ok(), Some(p));
    }
    Ok(())
}

fn check_manifest(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(m) = decode_manifest(bytes) {
        prop_assert_eq!(m.validate(), Ok(()));
        check_reserve_hints(&m)?;
        let again = encode_manifest(&m).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(decode_manifest(&again).ok(), Some(m));
    }
    Ok(())
}

/// What a load reserves from a decoded manifest's counts stays within what its blobs could
/// hold and within the global bound, whatever the counts say.
fn check_reserve_hints(m: &Manifest) -> Result<(), TestCaseError> {
    let all: Vec<usize> = (0..m.ranges.len()).collect();
    let hints = m.reserve_hints(&all);
    prop_assert_eq!(hints.len(), all.len());
    let total: u128 = hints.iter().map(|&h| h as u128).sum();
    prop_assert!(total <= MAX_RESERVED_ENTRIES as u128, "{total} reserved");
    for (r, &h) in m.ranges.iter().zip(&hints) {
        let holdable: u128 = r
            .chunks
            .iter()
            .map(|c| u128::from(c.bytes / MIN_ENTRY_BYTES))
            .sum();
        prop_assert!(
            h as u128 <= holdable,
            "{h} reserved for {holdable} holdable"
        );
    }
    Ok(())
}

/// `decode_chunk`, with `decode_chunks_prepared` (the restore's decoder) run on the same input
/// and checked against it: accepted and refused alike, the same entries when accepted (put
/// into an empty state, the same digest and count), the same reason when refused for an
/// entry or the range.
fn decode_chunk_checked(
    bytes: &[u8],
    blob: &BlobRef,
    range: &RangeRef,
) -> Result<Result<Chunk, String>, TestCaseError> {
    let chunk = decode_chunk(bytes, blob, range).map_err(|e| e.to_string());
    let prepared = decode_chunks_prepared(&[(bytes, blob, range)])
        .pop()
        .expect("one result per blob")
        .map_err(|e| e.to_string());
    match (&chunk, prepared) {
        (Ok(c), Ok(mut p)) => {
            let mut from_chunk = State::new(L);
            from_chunk.insert_many(c.entries.clone());
            let mut from_prepared = State::new(L);
            from_prepared.put_prepared(&mut p);
            prop_assert_eq!(from_prepared.digest(), from_chunk.digest());
            prop_assert_eq!(from_prepared.len(), from_chunk.len());
        }
        (Err(a), Err(b)) => {
            // The restore's decoder checks each entry as it reads it, so it may name an
            // entry's fault where the other, reading the whole body first, names the body's.
            if a.contains("invalid snapshot chunk") && b.contains("invalid snapshot chunk") {
                prop_assert_eq!(a, &b);
            }
        }
        (a, b) => prop_assert!(false, "decode_chunk: {a:?}, decode_chunks_prepared: {b:?}"),
    }
    Ok(chunk)
}

/// A decoded chunk keeps every promise a reader relies on.
fn check_chunk(c: &Chunk, range: &RangeRef) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        (c.first_bucket, c.end_bucket),
        (range.first_bucket, range.end_bucket)
    );
    for (k, v) in &c.entries {
        prop_assert!(k.len() <= MAX_KEY_BYTES && v.len() <= MAX_VALUE_BYTES);
        prop_assert!(
            range.buckets().contains(&bucket_of(k)),
            "{k:?} outside the range"
        );
    }
    Ok(())
}

fn check_segment(s: &Segment, seg: &SegmentRef) -> Result<(), TestCaseError> {
    prop_assert_eq!((s.from_seq, s.to_seq), (seg.from_seq, seg.to_seq));
    for c in &s.changes {
        prop_assert_eq!(c.validate(), Ok(()));
    }
    Ok(())
}

/// Runs every decoder over `bytes`, the chunk and segment decoders with references naming the
/// bytes' own hash so that their bodies are read.
fn decode_everything(bytes: &[u8]) -> Result<(), TestCaseError> {
    check_pointer(bytes)?;
    check_manifest(bytes)?;
    let own = self_ref(bytes);
    for range in RANGES.iter() {
        if let Ok(c) = decode_chunk_checked(bytes, &own, range)? {
            check_chunk(&c, range)?;
        }
    }
    for seg in [any_segment_ref(0, 1), any_segment_ref(10, 12)] {
        if let Ok(s) = decode_segment(bytes, &own, &seg) {
            check_segment(&s, &seg)?;
        }
    }
    let _ = decode_envelope(bytes);
    Ok(())
}

/// The oracle for a mutation of a valid encoding.
fn check_mutated(target: &Target, bytes: &[u8]) -> Result<(), TestCaseError> {
    let unchanged = bytes == target.bytes();
    match target {
        Target::Pointer(_) => check_pointer(bytes)?,
        Target::Manifest(_) => check_manifest(bytes)?,
        Target::Chunk { blob, range, .. } => {
            match decode_chunk_checked(bytes, blob, range)? {
                Ok(c) => {
                    prop_assert!(unchanged, "a changed chunk was accepted");
                    check_chunk(&c, range)?;
                }
                Err(e) => {
                    prop_assert!(!unchanged, "the original chunk was refused: {e}");
                    prop_assert!(e.to_string().contains("content hash"), "{e}");
                }
            }
            if let Ok(c) = decode_chunk_checked(bytes, &self_ref(bytes), range)? {
                check_chunk(&c, range)?;
            }
        }
        Target::Segment { blob, seg, .. } => {
            match decode_segment(bytes, blob, seg) {
                Ok(s) => {
                    prop_assert!(unchanged, "a changed segment was accepted");
                    check_segment(&s, seg)?;
                }
                Err(e) => {
                    prop_assert!(!unchanged, "the original segment was refused: {e}");
                    prop_assert!(e.to_string().contains("content hash"), "{e}");
                }
            }
            if let Ok(s) = decode_segment(bytes, &self_ref(bytes), seg) {
                check_segment(&s, seg)?;
            }
        }
    }
    decode_everything(bytes)
}

// ---------------------------------------------------------------------------------------------
// Mutations

/// Bytes that start MessagePack length-prefixed items: arrays, maps, strings, bins, exts, of
/// each width, plus the never-used 0xc1 and a few edges.
const MARKERS: [u8; 20] = [
    0x90, 0x9f, 0x80, 0x8f, 0xa0, 0xbf, 0xc0, 0xc1, 0xc4, 0xc5, 0xc6, 0xc7, 0xc9, 0xd9, 0xda, 0xdb,
    0xdc, 0xdd, 0xde, 0xdf,
];

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit { at: Index, bit: u8 },
    Overwrite { at: Index, byte: u8 },
    Truncate { at: Index },
    Insert { at: Index, bytes: Vec<u8> },
    Duplicate { start: Index, len: usize, at: Index },
    Remove { start: Index, len: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        2 => (any::<Index>(), prop_oneof![prop::sample::select(&MARKERS[..]), any::<u8>()])
            .prop_map(|(at, byte)| Mutation::Overwrite { at, byte }),
        1 => any::<Index>().prop_map(|at| Mutation::Truncate { at }),
        2 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..9))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        2 => (any::<Index>(), 1usize..64, any::<Index>())
            .prop_map(|(start, len, at)| Mutation::Duplicate { start, len, at }),
        1 => (any::<Index>(), 1usize..16).prop_map(|(start, len)| Mutation::Remove { start, len }),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    let n = bytes.len();
    match m {
        Mutation::FlipBit { at, bit } => bytes[at.index(n)] ^= 1 << bit,
        Mutation::Overwrite { at, byte } => bytes[at.index(n)] = *byte,
        Mutation::Truncate { at } => bytes.truncate(at.index(n)),
        Mutation::Insert { at, bytes: new } => {
            let at = at.index(n + 1);
            bytes.splice(at..at, new.iter().copied());
        }
        Mutation::Duplicate { start, len, at } => {
            let start = start.index(n);
            let region = bytes[start..(start + len).min(n)].to_vec();
            let at = at.index(n + 1);
            bytes.splice(at..at, region);
        }
        Mutation::Remove { start, len } => {
            let start = start.index(n);
            bytes.drain(start..(start + len).min(n));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// MessagePack, written by hand so that inputs can claim any length

mod mp {
    pub fn array(out: &mut Vec<u8>, n: u32) {
        match n {
            0..=15 => out.push(0x90 | n as u8),
            16..=0xffff => {
                out.push(0xdc);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            _ => {
                out.push(0xdd);
                out.extend_from_slice(&n.to_be_bytes());
            }
        }
    }

    pub fn map(out: &mut Vec<u8>, n: u32) {
        match n {
            0..=15 => out.push(0x80 | n as u8),
            16..=0xffff => {
                out.push(0xde);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            _ => {
                out.push(0xdf);
                out.extend_from_slice(&n.to_be_bytes());
            }
        }
    }

    /// A str header claiming `n` bytes (the bytes themselves are the caller's).
    pub fn str_header(out: &mut Vec<u8>, n: u32) {
        match n {
            0..=31 => out.push(0xa0 | n as u8),
            32..=0xff => out.extend_from_slice(&[0xd9, n as u8]),
            0x100..=0xffff => {
                out.push(0xda);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            _ => {
                out.push(0xdb);
                out.extend_from_slice(&n.to_be_bytes());
            }
        }
    }

    pub fn str(out: &mut Vec<u8>, s: &str) {
        str_header(out, s.len() as u32);
        out.extend_from_slice(s.as_bytes());
    }

    /// A bin header claiming `n` bytes.
    pub fn bin_header(out: &mut Vec<u8>, n: u32) {
        match n {
            0..=0xff => out.extend_from_slice(&[0xc4, n as u8]),
            0x100..=0xffff => {
                out.push(0xc5);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            _ => {
                out.push(0xc6);
                out.extend_from_slice(&n.to_be_bytes());
            }
        }
    }

    pub fn bin(out: &mut Vec<u8>, b: &[u8]) {
        bin_header(out, b.len() as u32);
        out.extend_from_slice(b);
    }

    pub fn uint(out: &mut Vec<u8>, v: u64) {
        match v {
            0..=0x7f => out.push(v as u8),
            0x80..=0xff => out.extend_from_slice(&[0xcc, v as u8]),
            0x100..=0xffff => {
                out.push(0xcd);
                out.extend_from_slice(&(v as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                out.push(0xce);
                out.extend_from_slice(&(v as u32).to_be_bytes());
            }
            _ => {
                out.push(0xcf);
                out.extend_from_slice(&v.to_be_bytes());
            }
        }
    }

    pub fn nil(out: &mut Vec<u8>) {
        out.push(0xc0);
    }

    /// A MessagePack value tree, for random structured inputs.
    #[derive(Debug, Clone)]
    pub enum Value {
        Nil,
        Bool(bool),
        Int(i64),
        UInt(u64),
        F64(f64),
        Str(String),
        Bin(Vec<u8>),
        Ext(i8, Vec<u8>),
        Array(Vec<Value>),
        Map(Vec<(Value, Value)>),
    }

    pub fn write(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::Nil => nil(out),
            Value::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
            Value::Int(i) if *i >= 0 => uint(out, *i as u64),
            Value::Int(i) if *i >= -32 => out.push(*i as i8 as u8),
            Value::Int(i) => {
                out.push(0xd3);
                out.extend_from_slice(&i.to_be_bytes());
            }
            Value::UInt(u) => uint(out, *u),
            Value::F64(f) => {
                out.push(0xcb);
                out.extend_from_slice(&f.to_be_bytes());
            }
            Value::Str(s) => str(out, s),
            Value::Bin(b) => bin(out, b),
            Value::Ext(t, b) => {
                out.push(0xc7);
                out.push(b.len() as u8);
                out.push(*t as u8);
                out.extend_from_slice(b);
            }
            Value::Array(items) => {
                array(out, items.len() as u32);
                for i in items {
                    write(out, i);
                }
            }
            Value::Map(pairs) => {
                map(out, pairs.len() as u32);
                for (k, v) in pairs {
                    write(out, k);
                    write(out, v);
                }
            }
        }
    }
}

fn leaf() -> impl Strategy<Value = mp::Value> {
    use mp::Value;
    prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::Bool),
        prop_oneof![any::<i64>(), -40i64..300].prop_map(Value::Int),
        prop_oneof![any::<u64>(), Just(4096u64), Just(u32::MAX as u64 + 1)].prop_map(Value::UInt),
        any::<f64>().prop_map(Value::F64),
        prop_oneof![
            Just("manifest".to_owned()),
            Just("latest".to_owned()),
            Just("first_bucket".to_owned()),
            Just("entries".to_owned()),
            Just("changes".to_owned()),
            "\\PC{0,12}",
        ]
        .prop_map(Value::Str),
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..40),
            Just(vec![3; 16]),
            Just(vec![0; 32]),
        ]
        .prop_map(Value::Bin),
        (any::<i8>(), prop::collection::vec(any::<u8>(), 0..8)).prop_map(|(t, b)| Value::Ext(t, b)),
    ]
}

fn any_value() -> impl Strategy<Value = mp::Value> {
    leaf().prop_recursive(5, 64, 12, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..12).prop_map(mp::Value::Array),
            prop::collection::vec((inner.clone(), inner), 0..6).prop_map(mp::Value::Map),
        ]
    })
}

// ---------------------------------------------------------------------------------------------
// Shape-aware bodies: the right structure with random values, so that decoding reaches the
// checks after the MessagePack layer (buckets, limits, sequence ranges).

/// Keys near and past the limits, and keys that land in the narrow test range.
fn fuzz_key() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "\\PC{0,12}",
        1 => Just("k".repeat(MAX_KEY_BYTES)),
        1 => Just("k".repeat(MAX_KEY_BYTES + 1)),
        2 => (0u32..20_000).prop_map(|i| format!("key-{i}")),
    ]
}

/// A value as the wire might carry it: bin (within or past the limit), str, nil, a number.
#[derive(Debug, Clone)]
enum FuzzValue {
    Bin(usize),
    Str(String),
    Nil,
    Number(u64),
}

fn fuzz_value() -> impl Strategy<Value = FuzzValue> {
    prop_oneof![
        24 => (0usize..64).prop_map(FuzzValue::Bin),
        1 => Just(FuzzValue::Bin(MAX_VALUE_BYTES)),
        1 => Just(FuzzValue::Bin(MAX_VALUE_BYTES + 1)),
        3 => "\\PC{0,8}".prop_map(FuzzValue::Str),
        6 => Just(FuzzValue::Nil),
        3 => any::<u64>().prop_map(FuzzValue::Number),
    ]
}

fn write_fuzz_value(out: &mut Vec<u8>, v: &FuzzValue) {
    match v {
        FuzzValue::Bin(n) => mp::bin(out, &vec![0x5a; *n]),
        FuzzValue::Str(s) => mp::str(out, s),
        FuzzValue::Nil => mp::nil(out),
        FuzzValue::Number(n) => mp::uint(out, *n),
    }
}

/// Buckets and sequence numbers: mostly the ones the test references expect.
fn near(expected: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => Just(expected),
        1 => Just(expected + 1),
        1 => Just(expected.saturating_sub(1)),
        1 => any::<u64>(),
    ]
}

/// `[first_bucket, end_bucket, part, [[key, value], ...]]` for the narrow range, sometimes
/// with a wrong entry arity.
fn chunk_body() -> impl Strategy<Value = Vec<u8>> {
    (
        near(256),
        near(512),
        any::<u32>(),
        prop::collection::vec((fuzz_key(), fuzz_value(), 2u32..4), 0..6),
    )
        .prop_map(|(first, end, part, entries)| {
            let mut out = CHUNK_HEADER.to_vec();
            mp::array(&mut out, 4);
            mp::uint(&mut out, first);
            mp::uint(&mut out, end);
            mp::uint(&mut out, part.into());
            mp::array(&mut out, entries.len() as u32);
            for (k, v, arity) in &entries {
                mp::array(&mut out, *arity);
                mp::str(&mut out, k);
                write_fuzz_value(&mut out, v);
                if *arity == 3 {
                    mp::nil(&mut out);
                }
            }
            out
        })
}

/// `[from_seq, to_seq, part, [[key, value|nil], ...]]` for (10, 12].
fn segment_body() -> impl Strategy<Value = Vec<u8>> {
    (
        near(10),
        near(12),
        any::<u32>(),
        prop::collection::vec((fuzz_key(), fuzz_value(), 1u32..4), 0..6),
    )
        .prop_map(|(from, to, part, changes)| {
            let mut out = SEGMENT_HEADER.to_vec();
            mp::array(&mut out, 4);
            mp::uint(&mut out, from);
            mp::uint(&mut out, to);
            mp::uint(&mut out, part.into());
            mp::array(&mut out, changes.len() as u32);
            for (k, v, arity) in &changes {
                mp::array(&mut out, *arity);
                mp::str(&mut out, k);
                if *arity >= 2 {
                    write_fuzz_value(&mut out, v);
                }
                if *arity == 3 {
                    mp::array(&mut out, 0);
                }
            }
            out
        })
}

/// A size or count from a manifest: honest small ones, ones at and around the limits, and
/// hostile ones (billions, the integer's maximum).
fn any_count() -> impl Strategy<Value = u64> + Clone {
    prop_oneof![
        0u64..100_000,
        prop::sample::select(vec![
            MAX_BLOB_BYTES,
            MAX_BLOB_BYTES + 1,
            MAX_BLOB_BYTES / MIN_ENTRY_BYTES,
            MAX_RESERVED_ENTRIES as u64,
            1 << 32,
            1 << 40,
            u64::MAX / 2,
            u64::MAX,
        ]),
        any::<u64>(),
    ]
}

/// Manifests of valid structure (power-of-two ranges, chained segments) whose every count
/// is untrusted: many chunks per range, claiming anything.
fn hostile_manifest() -> impl Strategy<Value = Manifest> {
    let blob = (any_count(), any_count()).prop_map(|(bytes, entries)| BlobRef {
        hash: [7; 32],
        bytes,
        entries,
    });
    (
        0u32..=12,
        prop::collection::vec(blob, 0..40),
        prop::collection::vec(any_count(), 0..3),
    )
        .prop_map(|(log, chunks, piece_counts)| {
            let n = 1u32 << log;
            let width = BUCKETS as u32 / n;
            let ranges = (0..n)
                .map(|i| RangeRef {
                    first_bucket: i * width,
                    end_bucket: (i + 1) * width,
                    digest: Digest::ZERO,
                    chunks: chunks.clone(),
                })
                .collect();
            let pieces = piece_counts
                .iter()
                .map(|&c| BlobRef {
                    hash: [8; 32],
                    bytes: c,
                    entries: c,
                })
                .collect();
            Manifest {
                lineage: L,
                seq: 6,
                stream_seq: 106,
                digest: Digest::ZERO,
                entries: u64::MAX,
                payload_bytes: u64::MAX,
                created_at_ms: 1_700_000_000_000,
                base_seq: 5,
                ranges,
                segments: vec![SegmentRef {
                    from_seq: 5,
                    to_seq: 6,
                    pieces,
                }],
                bytes_written: 0,
            }
        })
}

/// Manifests with random structure (ranges that may overlap, leave gaps or overrun; segments
/// that may not chain), encoded by `encode_manifest`: decoding must agree with `validate`.
fn any_manifest() -> impl Strategy<Value = Manifest> {
    let blob =
        (any::<[u8; 32]>(), any_count(), any_count()).prop_map(|(hash, bytes, entries)| BlobRef {
            hash,
            bytes,
            entries,
        });
    let ranges = prop_oneof![
        // Valid cuts: powers of two.
        (0u32..=12).prop_map(|log| {
            let n = 1u32 << log;
            let width = BUCKETS as u32 / n;
            (0..n).map(|i| (i * width, (i + 1) * width)).collect()
        }),
        // Arbitrary boundaries.
        prop::collection::vec((0u32..=4200, 0u32..=4200), 0..6),
    ];
    (
        ranges,
        prop::collection::vec(blob.clone(), 0..3),
        0u64..50,
        prop::collection::vec(1u64..5, 0..4),
        any::<bool>(),
        prop::collection::vec(blob, 0..3),
    )
        .prop_map(|(bounds, chunks, base_seq, steps, chained, pieces)| {
            let ranges = bounds
                .into_iter()
                .map(|(first_bucket, end_bucket)| RangeRef {
                    first_bucket,
                    end_bucket,
                    digest: Digest([first_bucket as u8; 32]),
                    chunks: chunks.clone(),
                })
                .collect();
            let mut at = base_seq;
            let segments: Vec<SegmentRef> = steps
                .iter()
                .map(|step| {
                    let from_seq = if chained { at } else { at + 1 };
                    at = from_seq + step;
                    SegmentRef {
                        from_seq,
                        to_seq: at,
                        pieces: pieces.clone(),
                    }
                })
                .collect();
            Manifest {
                lineage: L,
                seq: at,
                stream_seq: at + 100,
                digest: Digest([9; 32]),
                entries: 5,
                payload_bytes: 50,
                created_at_ms: 1_700_000_000_000,
                base_seq,
                ranges,
                segments,
                bytes_written: 0,
            }
        })
}

// ---------------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn arbitrary_bytes_never_panic_a_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_everything(&bytes)?;
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_header_never_panic_a_decoder(
        header in prop::sample::select(vec![MANIFEST_HEADER, CHUNK_HEADER, SEGMENT_HEADER]),
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(&body);
        decode_everything(&bytes)?;
    }

    #[test]
    fn random_messagepack_after_a_valid_header_never_panics_a_decoder(
        header in prop::sample::select(vec![MANIFEST_HEADER, CHUNK_HEADER, SEGMENT_HEADER]),
        value in any_value(),
    ) {
        let mut bytes = header.to_vec();
        mp::write(&mut bytes, &value);
        decode_everything(&bytes)?;
        // The same tree under the pointer and manifest tags reaches their struct decoders.
        for tag in ["latest", "manifest"] {
            let mut tagged = header.to_vec();
            mp::array(&mut tagged, 2);
            mp::str(&mut tagged, tag);
            mp::write(&mut tagged, &value);
            decode_everything(&tagged)?;
        }
    }

    #[test]
    fn mutated_valid_encodings_are_refused_or_decode_to_valid_values(
        pick in any::<Index>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let target = pick.get(&TARGETS);
        let mut bytes = target.bytes().to_vec();
        for m in &mutations {
            mutate(&mut bytes, m);
        }
        check_mutated(target, &bytes)?;
    }

}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn shape_aware_chunks_decode_only_within_their_range_and_limits(bytes in chunk_body()) {
        let range = &RANGES[1];
        if let Ok(c) = decode_chunk_checked(&bytes, &self_ref(&bytes), range)? {
            check_chunk(&c, range)?;
        }
    }

    #[test]
    fn shape_aware_segments_decode_only_for_their_sequences_and_limits(bytes in segment_body()) {
        let seg = any_segment_ref(10, 12);
        if let Ok(s) = decode_segment(&bytes, &self_ref(&bytes), &seg) {
            check_segment(&s, &seg)?;
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// A manifest's counts are untrusted: one claiming more than a NATS message can carry, or
    /// more entries than its bytes can hold, is refused; one that decodes sizes nothing beyond
    /// the bound, even when mutated.
    #[test]
    fn hostile_counts_in_a_manifest_are_refused_or_reserve_within_the_bound(
        m in hostile_manifest(),
        mutations in prop::collection::vec(mutation(), 0..3),
    ) {
        let mut bytes = encode_manifest(&m).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let possible = m
            .ranges
            .iter()
            .flat_map(|r| &r.chunks)
            .chain(m.segments.iter().flat_map(|s| &s.pieces))
            .all(|b| b.bytes <= MAX_BLOB_BYTES && b.entries <= b.bytes / MIN_ENTRY_BYTES);
        if mutations.is_empty() {
            match decode_manifest(&bytes) {
                Ok(decoded) => {
                    prop_assert!(possible, "impossible counts decoded");
                    check_reserve_hints(&decoded)?;
                }
                Err(e) => {
                    prop_assert!(!possible, "refused: {e}");
                    prop_assert!(e.to_string().contains("claims"), "{e}");
                }
            }
        }
        for mu in &mutations {
            mutate(&mut bytes, mu);
        }
        check_manifest(&bytes)?;
    }

    #[test]
    fn a_manifest_decodes_exactly_when_its_structure_is_valid(m in any_manifest()) {
        let bytes = encode_manifest(&m).map_err(|e| TestCaseError::fail(e.to_string()))?;
        match (m.validate(), decode_manifest(&bytes)) {
            (Ok(()), Ok(decoded)) => prop_assert_eq!(decoded, m),
            (Err(reason), Err(e)) => {
                prop_assert!(e.to_string().contains(&reason), "{e} does not say {reason}");
            }
            (expected, got) => {
                prop_assert!(false, "validate says {expected:?}, decode says {got:?}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Length prefixes claiming huge sizes: refused fast, without allocating what they claim

/// Set in the child process that runs one test alone under an address-space ceiling.
const CHILD_ENV: &str = "DELTASYNC_SNAPSHOT_FUZZ_CHILD";

/// The child's address-space ceiling, in KiB (`ulimit -v`): far below the 4 GiB the inputs
/// claim, well above what a test binary needs.
const CEILING_KIB: u64 = 1024 * 1024;

/// Runs the test named `name` of this binary alone, in a child process whose address space
/// is capped at [`CEILING_KIB`], and fails unless it passes. Returns `true` in the child,
/// where the caller then does the work.
fn in_capped_child(name: &str) -> bool {
    if std::env::var_os(CHILD_ENV).is_some() {
        return true;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("ulimit -v {CEILING_KIB} && exec \"$0\" \"$@\""))
        .arg(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .expect("run the test binary as a child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{name} failed in a child capped at {CEILING_KIB} KiB of address space ({}):\n\
         {stdout}\n{stderr}",
        out.status
    );
    false
}

/// Peak resident set size of this process in KiB (`VmHWM`), after resetting it to the
/// current size by writing 5 to `/proc/self/clear_refs`.
fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// The largest resident-memory growth a refused input may cause: the serde and rmp buffers
/// that are sized by what the input holds, plus noise.
const MAX_RSS_GROWTH_KIB: u64 = 6 * 1024;

/// Checks that `decode` refuses `input` within a second without growing the peak RSS by more
/// than [`MAX_RSS_GROWTH_KIB`].
fn refused_cheaply<T: std::fmt::Debug, E: std::fmt::Display>(
    what: &str,
    input: &[u8],
    decode: impl Fn(&[u8]) -> Result<T, E>,
) {
    reset_peak_rss();
    let before = status_kib("VmRSS:");
    let start = Instant::now();
    let result = decode(input);
    let took = start.elapsed();
    let peak = status_kib("VmHWM:");
    match result {
        Ok(v) => panic!("{what}: decoded into {v:?}"),
        Err(e) => println!(
            "{what}: refused in {took:?}, peak RSS +{} KiB: {e}",
            peak - before
        ),
    }
    assert!(took < Duration::from_secs(1), "{what}: took {took:?}");
    assert!(
        peak.saturating_sub(before) <= MAX_RSS_GROWTH_KIB,
        "{what}: peak RSS grew from {before} KiB to {peak} KiB"
    );
}

/// The manifest body up to (excluding) `ranges`: `["manifest", [lineage, seq, stream_seq,
/// digest, entries, payload_bytes, created_at_ms, base_seq, ranges, segments, bytes_written]`.
fn manifest_prefix() -> Vec<u8> {
    let mut out = MANIFEST_HEADER.to_vec();
    mp::array(&mut out, 2);
    mp::str(&mut out, "manifest");
    mp::array(&mut out, 11);
    mp::bin(&mut out, &L.0);
    for v in [5, 105] {
        mp::uint(&mut out, v);
    }
    mp::bin(&mut out, &[0; 32]);
    for v in [0, 0, 0, 5] {
        mp::uint(&mut out, v);
    }
    out
}

/// One range `[first, end, digest, []]`.
fn range_item(out: &mut Vec<u8>, first: u64, end: u64) {
    mp::array(out, 4);
    mp::uint(out, first);
    mp::uint(out, end);
    mp::bin(out, &[0; 32]);
    mp::array(out, 0);
}

/// A complete manifest of one range over all buckets and no segments, hand-encoded.
fn manifest_by_hand() -> Vec<u8> {
    let mut out = manifest_prefix();
    mp::array(&mut out, 1);
    range_item(&mut out, 0, BUCKETS as u64);
    mp::array(&mut out, 0);
    mp::uint(&mut out, 0);
    out
}

/// A chunk body `[256, 512, 0, entries]` with `entries` written by the caller.
fn chunk_prefix() -> Vec<u8> {
    let mut out = CHUNK_HEADER.to_vec();
    mp::array(&mut out, 4);
    for v in [256, 512, 0] {
        mp::uint(&mut out, v);
    }
    out
}

/// A segment body `[10, 12, 0, changes]` with `changes` written by the caller.
fn segment_prefix() -> Vec<u8> {
    let mut out = SEGMENT_HEADER.to_vec();
    mp::array(&mut out, 4);
    for v in [10, 12, 0] {
        mp::uint(&mut out, v);
    }
    out
}

/// A key that lands in buckets 256..512, the narrow test range.
fn key_in_narrow_range() -> String {
    (0..)
        .map(|i| format!("k{i}"))
        .find(|k| RANGES[1].buckets().contains(&bucket_of(k)))
        .expect("some key lands in the range")
}

#[test]
fn length_prefixes_claiming_gigabytes_are_refused_fast_without_allocating() {
    if !in_capped_child("length_prefixes_claiming_gigabytes_are_refused_fast_without_allocating") {
        return;
    }
    const HUGE: u32 = u32::MAX;
    let chunk = |b: &[u8]| decode_chunk(b, &self_ref(b), &RANGES[1]);
    // The restore's decoder, which reads entries straight into their allocations.
    let prepared = |b: &[u8]| {
        decode_chunks_prepared(&[(b, &self_ref(b), &RANGES[1])])
            .pop()
            .expect("one result per blob")
    };
    let segment = |b: &[u8]| decode_segment(b, &self_ref(b), &any_segment_ref(10, 12));
    let key = key_in_narrow_range();

    // The hand encodings are right: with honest lengths they decode.
    let m = decode_manifest(&manifest_by_hand()).expect("the hand-encoded manifest");
    assert_eq!((m.ranges.len(), m.seq), (1, 5));
    let mut ok_chunk = chunk_prefix();
    mp::array(&mut ok_chunk, 1);
    mp::array(&mut ok_chunk, 2);
    mp::str(&mut ok_chunk, &key);
    mp::bin(&mut ok_chunk, b"v");
    assert_eq!(
        chunk(&ok_chunk)
            .expect("the hand-encoded chunk")
            .entries
            .len(),
        1
    );
    assert_eq!(
        prepared(&ok_chunk)
            .expect("the hand-encoded chunk, prepared")
            .len(),
        1
    );
    let mut ok_segment = segment_prefix();
    mp::array(&mut ok_segment, 1);
    mp::array(&mut ok_segment, 2);
    mp::str(&mut ok_segment, &key);
    mp::nil(&mut ok_segment);
    assert_eq!(
        segment(&ok_segment)
            .expect("the hand-encoded segment")
            .changes
            .len(),
        1
    );

    // Manifest: 2^32-1 ranges, with nothing after, or one real range after.
    let mut b = manifest_prefix();
    mp::array(&mut b, HUGE);
    refused_cheaply("manifest with 2^32-1 ranges", &b, decode_manifest);
    range_item(&mut b, 0, BUCKETS as u64);
    refused_cheaply(
        "manifest with 2^32-1 ranges, one present",
        &b,
        decode_manifest,
    );
    // ... 2^32-1 chunks in a range, 2^32-1 segments.
    let mut b = manifest_prefix();
    mp::array(&mut b, 1);
    mp::array(&mut b, 4);
    mp::uint(&mut b, 0);
    mp::uint(&mut b, BUCKETS as u64);
    mp::bin(&mut b, &[0; 32]);
    mp::array(&mut b, HUGE);
    refused_cheaply("manifest range with 2^32-1 chunks", &b, decode_manifest);
    let mut b = manifest_prefix();
    mp::array(&mut b, 1);
    range_item(&mut b, 0, BUCKETS as u64);
    mp::array(&mut b, HUGE);
    refused_cheaply("manifest with 2^32-1 segments", &b, decode_manifest);
    // ... a 4 GiB tag, a 4 GiB lineage, the struct as a map of 2^32-1 fields, a 4 GiB ext.
    let mut b = MANIFEST_HEADER.to_vec();
    mp::array(&mut b, 2);
    mp::str_header(&mut b, HUGE);
    b.extend_from_slice(b"manifest");
    refused_cheaply("manifest tag of 4 GiB", &b, decode_manifest);
    let mut b = MANIFEST_HEADER.to_vec();
    mp::array(&mut b, 2);
    mp::str(&mut b, "manifest");
    mp::array(&mut b, 11);
    mp::bin_header(&mut b, HUGE);
    b.extend_from_slice(&L.0);
    refused_cheaply("manifest lineage of 4 GiB", &b, decode_manifest);
    let mut b = MANIFEST_HEADER.to_vec();
    mp::array(&mut b, 2);
    mp::str(&mut b, "manifest");
    mp::map(&mut b, HUGE);
    mp::str(&mut b, "unknown");
    mp::bin_header(&mut b, HUGE);
    refused_cheaply("manifest as a map of 2^32-1 fields", &b, decode_manifest);
    let mut b = MANIFEST_HEADER.to_vec();
    mp::array(&mut b, 2);
    mp::str(&mut b, "manifest");
    b.extend_from_slice(&[0xc9, 0xff, 0xff, 0xff, 0xff, 0x01]);
    refused_cheaply("manifest as an ext of 4 GiB", &b, decode_manifest);

    // Pointer: a 4 GiB manifest key.
    let mut b = MANIFEST_HEADER.to_vec();
    mp::array(&mut b, 2);
    mp::str(&mut b, "latest");
    mp::array(&mut b, 3);
    mp::bin(&mut b, &L.0);
    mp::uint(&mut b, 5);
    mp::str_header(&mut b, HUGE);
    b.extend_from_slice(b"manifest.");
    refused_cheaply("pointer with a 4 GiB manifest key", &b, decode_pointer);

    // Chunk: 2^32-1 entries; a 4 GiB key; a 4 GiB value; an entry of 2^32-1 elements.
    let mut b = chunk_prefix();
    mp::array(&mut b, HUGE);
    refused_cheaply("chunk with 2^32-1 entries", &b, chunk);
    refused_cheaply("chunk with 2^32-1 entries (prepared)", &b, prepared);
    let mut with_one = b.clone();
    with_one.extend_from_slice(&ok_chunk[chunk_prefix().len() + 1..]);
    refused_cheaply("chunk with 2^32-1 entries, one present", &with_one, chunk);
    refused_cheaply(
        "chunk with 2^32-1 entries, one present (prepared)",
        &with_one,
        prepared,
    );
    let mut b = chunk_prefix();
    mp::array(&mut b, 1);
    mp::array(&mut b, 2);
    mp::str_header(&mut b, HUGE);
    b.extend_from_slice(key.as_bytes());
    refused_cheaply("chunk key of 4 GiB", &b, chunk);
    refused_cheaply("chunk key of 4 GiB (prepared)", &b, prepared);
    let mut b = chunk_prefix();
    mp::array(&mut b, 1);
    mp::array(&mut b, 2);
    mp::str(&mut b, &key);
    mp::bin_header(&mut b, HUGE);
    b.extend_from_slice(&[0x5a; 100]);
    refused_cheaply("chunk value of 4 GiB", &b, chunk);
    refused_cheaply("chunk value of 4 GiB (prepared)", &b, prepared);
    let mut b = chunk_prefix();
    mp::array(&mut b, 1);
    mp::array(&mut b, HUGE);
    mp::str(&mut b, &key);
    mp::bin(&mut b, b"v");
    refused_cheaply("chunk entry of 2^32-1 elements", &b, chunk);
    refused_cheaply("chunk entry of 2^32-1 elements (prepared)", &b, prepared);

    // Segment: 2^32-1 changes; a 4 GiB value; a change of 2^32-1 elements whose third
    // element (skipped as IgnoredAny) claims 4 GiB.
    let mut b = segment_prefix();
    mp::array(&mut b, HUGE);
    refused_cheaply("segment with 2^32-1 changes", &b, segment);
    let mut b = segment_prefix();
    mp::array(&mut b, 1);
    mp::array(&mut b, 2);
    mp::str(&mut b, &key);
    mp::bin_header(&mut b, HUGE);
    refused_cheaply("segment value of 4 GiB", &b, segment);
    let mut b = segment_prefix();
    mp::array(&mut b, 1);
    mp::array(&mut b, HUGE);
    mp::str(&mut b, &key);
    mp::nil(&mut b);
    mp::bin_header(&mut b, HUGE);
    refused_cheaply("segment change with a skipped 4 GiB element", &b, segment);
}

/// Nesting far past rmp-serde's depth limit (1024), unless `DELTASYNC_FUZZ_DEPTH` asks for
/// another depth (to find where a decoder overflows).
fn nesting(out: &mut Vec<u8>) {
    let depth = std::env::var("DELTASYNC_FUZZ_DEPTH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    out.extend(std::iter::repeat_n(0x91, depth));
}

// Deep nesting where a decoder skips a value (serde's IgnoredAny recurses through it), each
// in its own child so that a stack overflow (an abort) names its case. The child runs the
// decoder on a libtest thread, whose 2 MiB stack is also tokio's default for worker threads.

#[test]
fn a_chunk_with_a_deeply_nested_unknown_field_is_refused_without_overflowing_the_stack() {
    if !in_capped_child(
        "a_chunk_with_a_deeply_nested_unknown_field_is_refused_without_overflowing_the_stack",
    ) {
        return;
    }
    let mut b = CHUNK_HEADER.to_vec();
    mp::map(&mut b, 1);
    mp::str(&mut b, "unknown");
    nesting(&mut b);
    refused_cheaply("chunk with a deeply nested unknown field", &b, |b| {
        decode_chunk(b, &self_ref(b), &RANGES[1])
    });
    refused_cheaply(
        "chunk with a deeply nested unknown field (prepared)",
        &b,
        |b| {
            decode_chunks_prepared(&[(b, &self_ref(b), &RANGES[1])])
                .pop()
                .expect("one result per blob")
        },
    );
}

#[test]
fn a_segment_change_with_a_deeply_nested_extra_element_is_refused_without_overflowing_the_stack() {
    if !in_capped_child(
        "a_segment_change_with_a_deeply_nested_extra_element_is_refused_without_overflowing_the_stack",
    ) {
        return;
    }
    let mut b = segment_prefix();
    mp::array(&mut b, 1);
    mp::array(&mut b, 3);
    mp::str(&mut b, &key_in_narrow_range());
    mp::nil(&mut b);
    nesting(&mut b);
    refused_cheaply(
        "segment change with a deeply nested third element",
        &b,
        |b| decode_segment(b, &self_ref(b), &any_segment_ref(10, 12)),
    );
}

#[test]
fn a_manifest_with_a_deeply_nested_unknown_field_is_refused_without_overflowing_the_stack() {
    if !in_capped_child(
        "a_manifest_with_a_deeply_nested_unknown_field_is_refused_without_overflowing_the_stack",
    ) {
        return;
    }
    let mut b = MANIFEST_HEADER.to_vec();
    mp::array(&mut b, 2);
    mp::str(&mut b, "manifest");
    mp::map(&mut b, 1);
    mp::str(&mut b, "unknown");
    nesting(&mut b);
    refused_cheaply(
        "manifest with a deeply nested unknown field",
        &b,
        decode_manifest,
    );
    let mut b = MANIFEST_HEADER.to_vec();
    nesting(&mut b);
    refused_cheaply("a manifest of nothing but nesting", &b, decode_manifest);
}

#[test]
fn an_envelope_change_with_a_deeply_nested_extra_element_is_refused_without_overflowing_the_stack()
{
    // The envelope shares the change decoder and `decode_body` with the snapshot kinds.
    if !in_capped_child(
        "an_envelope_change_with_a_deeply_nested_extra_element_is_refused_without_overflowing_the_stack",
    ) {
        return;
    }
    let mut b = b"DSE\x00\x01".to_vec();
    mp::array(&mut b, 7);
    mp::bin(&mut b, &L.0);
    for v in [1, 1, 1] {
        mp::uint(&mut b, v);
    }
    mp::bin(&mut b, &[0; 32]);
    mp::uint(&mut b, 0);
    mp::array(&mut b, 1);
    mp::array(&mut b, 3);
    mp::str(&mut b, "k");
    mp::nil(&mut b);
    nesting(&mut b);
    refused_cheaply(
        "envelope change with a deeply nested third element",
        &b,
        decode_envelope,
    );
}

// ---------------------------------------------------------------------------------------------
// Edge cases of `plan`

/// A state of `changes` at `seq`.
fn state_at(changes: &[Change], seq: u64) -> State {
    let mut s = State::new(L);
    s.apply_changes(changes);
    s.set_position(L, seq);
    s
}

/// The manifest survives its own encoding, and the plan's blobs assemble to `expected`.
fn check_plan(plans: &[&Plan], expected: &State) -> Manifest {
    let last = plans.last().expect("a plan");
    let m = decode_manifest(&encode_manifest(&last.manifest).expect("encode the manifest"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m, last.manifest);
    let assembled =
        assemble(&blob_map(plans.iter().copied()), &m).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&assembled, expected);
    assert_eq!(assembled.digest(), expected.digest());
    m
}

#[test]
fn an_empty_state_plans_empty_chunks_that_assemble_to_the_empty_digest() {
    let empty = state_at(&[], 0);
    let p = plan(&empty, 0, None, 512 * 1024, 1024 * 1024, 0).expect("plan");
    let m = check_plan(&[&p], &empty);
    assert_eq!(
        (m.seq, m.base_seq, m.entries, m.payload_bytes),
        (0, 0, 0, 0)
    );
    assert_eq!(m.digest, Digest::ZERO);
    assert_eq!(m.ranges.len(), 16);
    assert!(m.segments.is_empty());
    assert!(m
        .ranges
        .iter()
        .flat_map(|r| &r.chunks)
        .all(|c| c.entries == 0));
    // Every empty range encodes identically apart from its buckets, so the hashes differ and
    // nothing collides in the bucket.
    assert_eq!(blob_map([&p]).len(), 16);
}

#[test]
fn one_bucket_larger_than_a_blob_is_cut_into_several_chunks_that_reassemble_exactly() {
    const MAX_BLOB: usize = 4096;
    let bucket = 7;
    let crowded: Vec<String> = (0..)
        .map(|i| format!("crowded/{i}"))
        .filter(|k| bucket_of(k) == bucket)
        .take(30)
        .collect();
    let mut changes: Vec<Change> = crowded
        .iter()
        .enumerate()
        .map(|(i, k)| Change::put(k.as_str(), vec![i as u8; 1000]))
        .collect();
    changes.extend((0..50).map(|i| Change::put(format!("elsewhere/{i}"), vec![1; 10])));
    let s = state_at(&changes, 3);
    let p = plan(&s, 3, None, 1 << 20, MAX_BLOB, 0).expect("plan");
    let m = check_plan(&[&p], &s);
    let range = m
        .ranges
        .iter()
        .find(|r| r.buckets().contains(&bucket))
        .expect("a range holds the bucket");
    let in_range = s
        .iter()
        .filter(|(k, _)| range.buckets().contains(&bucket_of(k)))
        .count();
    assert!(range.chunks.len() >= 7, "{} chunks", range.chunks.len());
    assert_eq!(
        range.chunks.iter().map(|c| c.entries).sum::<u64>(),
        in_range as u64
    );
    assert!(p.blobs.iter().all(|b| b.bytes.len() <= MAX_BLOB));
    assert!(range
        .chunks
        .iter()
        .all(|c| c.bytes <= MAX_BLOB as u64 && c.entries > 0));

    // The range alone, rebuilt from its chunks over a replica that has it wrong.
    let blobs = blob_map([&p]);
    let chunks: Vec<Chunk> = range
        .chunks
        .iter()
        .map(|c| decode_chunk(&blobs[&chunk_key(&c.hash)], c, range))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut keys: Vec<&str> = chunks
        .iter()
        .flat_map(|c| &c.entries)
        .map(|(k, _)| &**k)
        .collect();
    assert!(
        keys.is_sorted(),
        "chunks hold their range's entries in key order"
    );
    keys.dedup();
    assert_eq!(keys.len(), in_range);
    let mut replica = s.clone();
    replica.apply_changes(&[
        Change::put(crowded[0].as_str(), &b"stale"[..]),
        Change::delete(crowded[1].as_str()),
    ]);
    assert_ne!(verify(&replica, &m), Ok(()));
    replace_range(&mut replica, range, chunks);
    assert_eq!(replica, s);
    assert_eq!(verify(&replica, &m), Ok(()));
}

#[test]
fn an_entry_larger_than_a_blob_gets_a_chunk_of_its_own() {
    // A blob cannot be below `max_blob` when one entry is not: the entry is kept whole.
    let s = state_at(
        &[
            Change::put("big", vec![1; 10_000]),
            Change::put("small", vec![2; 10]),
        ],
        1,
    );
    let p = plan(&s, 1, None, 1 << 20, 4096, 0).expect("plan");
    check_plan(&[&p], &s);
    let big = p
        .manifest
        .ranges
        .iter()
        .flat_map(|r| &r.chunks)
        .find(|c| c.bytes > 4096);
    assert_eq!(big.map(|c| c.entries), Some(1));
}

#[test]
fn more_than_max_segments_incremental_snapshots_force_a_rebase() {
    let base: Vec<Change> = (0..2000)
        .map(|i| Change::put(format!("k{i:05}"), vec![i as u8; 50]))
        .collect();
    let mut state = state_at(&base, 1);
    let mut plans = vec![plan(&state, 1, None, 16 * 1024, 64 * 1024, 0).expect("plan")];
    let mut prev_state = state.clone();
    for round in 0..=MAX_SEGMENTS as u64 {
        let seq = round + 2;
        state.apply_changes(&[
            Change::put(format!("k{:05}", round * 31), vec![0xee; 50]),
            Change::delete(format!("k{:05}", round * 31 + 1)),
        ]);
        state.set_position(L, seq);
        let prev = plans.last().expect("a previous plan");
        let p = plan(
            &state,
            seq,
            Some((&prev.manifest, &prev_state)),
            16 * 1024,
            64 * 1024,
            0,
        )
        .expect("plan");
        let segments = p.manifest.segments.len();
        if round < MAX_SEGMENTS as u64 {
            assert_eq!(
                segments,
                round as usize + 1,
                "round {round} stacks a segment"
            );
            assert_eq!(p.manifest.base_seq, 1);
        } else {
            assert_eq!(segments, 0, "segment {} rebases", MAX_SEGMENTS + 1);
            assert_eq!(p.manifest.base_seq, seq);
        }
        plans.push(p);
        let refs: Vec<&Plan> = plans.iter().collect();
        check_plan(&refs, &state);
        prev_state = state.clone();
    }
    // The rebased snapshot needs no blob of the earlier ones.
    let last = plans.last().expect("the rebase");
    assert_eq!(
        assemble(&blob_map([last]), &last.manifest).as_ref(),
        Ok(&state)
    );
}

#[test]
fn deleting_every_key_then_snapshotting_gives_the_empty_digest() {
    let keys: Vec<String> = (0..500).map(|i| format!("doomed/{i}")).collect();
    let puts: Vec<Change> = keys
        .iter()
        .map(|k| Change::put(k.as_str(), vec![7; 40]))
        .collect();
    let full = state_at(&puts, 1);
    let p1 = plan(&full, 1, None, 8 * 1024, 64 * 1024, 0).expect("plan the full state");
    let deletes: Vec<Change> = keys.iter().map(|k| Change::delete(k.as_str())).collect();
    let mut empty = full.clone();
    empty.apply_changes(&deletes);
    empty.set_position(L, 2);
    assert!(empty.is_empty());
    assert_eq!(empty.digest(), Digest::ZERO);

    // Stacked: one segment of 500 deletes on the full base (it may rebase instead if the
    // deletes outweigh the base; both must assemble to nothing).
    let p2 = plan(
        &empty,
        2,
        Some((&p1.manifest, &full)),
        8 * 1024,
        64 * 1024,
        0,
    )
    .expect("plan the deletions");
    let m = check_plan(&[&p1, &p2], &empty);
    assert_eq!((m.entries, m.payload_bytes, m.digest), (0, 0, Digest::ZERO));
    if let [seg] = m.segments.as_slice() {
        let blobs = blob_map([&p2]);
        let changes: usize = seg
            .pieces
            .iter()
            .map(|p| decode_segment(&blobs[&segment_key(&p.hash)], p, seg).map(|s| s.changes))
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_else(|e| panic!("{e}"))
            .iter()
            .inspect(|cs| assert!(cs.iter().all(|c| c.value().is_none())))
            .map(Vec::len)
            .sum();
        assert_eq!(changes, keys.len());
    }
    // A fresh base of the emptied state: empty chunks only.
    let p3 = plan(&empty, 2, None, 8 * 1024, 64 * 1024, 0).expect("plan a new base");
    let m3 = check_plan(&[&p3], &empty);
    assert!(m3
        .ranges
        .iter()
        .flat_map(|r| &r.chunks)
        .all(|c| c.entries == 0));
}

/// The largest reservation a manifest that decodes can ask for, made for real in a child
/// capped at 1 GiB of address space: 4096 one-bucket ranges of many chunks, each claiming as
/// many entries as the largest possible blob can hold. Sized from the counts, that is
/// trillions of table slots (an allocation failure aborts the process); bounded, it is
/// [`MAX_RESERVED_ENTRIES`].
#[test]
fn the_largest_claims_a_decodable_manifest_can_make_reserve_a_bounded_table() {
    if !in_capped_child("the_largest_claims_a_decodable_manifest_can_make_reserve_a_bounded_table")
    {
        return;
    }
    let claim = BlobRef {
        hash: [7; 32],
        bytes: MAX_BLOB_BYTES,
        entries: MAX_BLOB_BYTES / MIN_ENTRY_BYTES,
    };
    let m = Manifest {
        lineage: L,
        seq: 5,
        stream_seq: 105,
        digest: Digest::ZERO,
        entries: u64::MAX,
        payload_bytes: u64::MAX,
        created_at_ms: 1_700_000_000_000,
        base_seq: 5,
        ranges: (0..BUCKETS as u32)
            .map(|b| RangeRef {
                first_bucket: b,
                end_bucket: b + 1,
                digest: Digest::ZERO,
                chunks: vec![claim.clone(); 4],
            })
            .collect(),
        segments: Vec::new(),
        bytes_written: 0,
    };
    let bytes = encode_manifest(&m).expect("the manifest encodes");
    let m = decode_manifest(&bytes).expect("the counts are each possible");
    let all: Vec<usize> = (0..m.ranges.len()).collect();
    let hints = m.reserve_hints(&all);
    assert!(hints.iter().sum::<usize>() <= MAX_RESERVED_ENTRIES);
    let mut state = State::new(L);
    let start = Instant::now();
    for (r, h) in m.ranges.iter().zip(hints) {
        state.reserve_buckets(r.buckets(), h);
    }
    println!("reserved in {:?}", start.elapsed());
}
