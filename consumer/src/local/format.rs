//! The local replica's files as bytes: framed records (length, CRC-32C, kind, payload) shared
//! by the local snapshot and the log, and the payloads they carry. Pure: no files, no clock.
//!
//! ```text
//! record         [len: u32 le][crc32c(kind ‖ payload): u32 le][kind: u8][payload: len - 1 B]
//!
//! replica.snap   SNAP_HEADER  version u8 = 1, generation u64, position 65 B, pipeline
//!                ENTRIES      (key len u32, key, value len u32, value)*   ~1 MiB per record
//!                END          entries u64
//! log.<gen>      LOG_HEADER   version u8 = 1, generation u64, pipeline
//!                COMMIT       position 65 B, changes u32,
//!                             (op u8: 1 put | 2 del, key len u32, key[, value len u32, value])*
//! ```
//!
//! All integers are little-endian; `pipeline` is a u16 length and its UTF-8 bytes; a position
//! is [`Position::encode`]'s 65 bytes.
//!
//! ## Invariants
//!
//! - A record is read whole or not at all: a frame that ends past the end of the file, whose
//!   length is out of bounds or whose checksum differs is reported as [`Bad`], never decoded.
//!   A crash while appending leaves at most one such frame, at the end of the log.
//! - Decoding never panics on any input: lengths are checked against what remains.
//! - A `COMMIT` may be written in pieces ([`commit_chunked`]): its first 8 bytes stay zero
//!   until the rest is written, then take the length and checksum. A crash in between leaves a
//!   frame of length 0 (or one cut short), which reads as [`Bad`]: the bytes on disk are those
//!   of [`commit`], only their order of writing differs.

use bytes::Bytes;
use deltasync_core::{Change, Position};
use std::io::Read as _;

/// The format version every header carries.
pub const VERSION: u8 = 1;
/// The local snapshot's first record.
pub const SNAP_HEADER: u8 = 1;
/// A block of snapshot entries.
pub const ENTRIES: u8 = 2;
/// The local snapshot's last record: how many entries it holds.
pub const END: u8 = 3;
/// A log's first record.
pub const LOG_HEADER: u8 = 4;
/// One group commit: the changes applied since the previous one and the position after them.
pub const COMMIT: u8 = 5;

/// The largest record a reader accepts (a longer length is damage, not a record): larger than
/// any commit the engine makes (bounded by `MAX_ACCUMULATED_CHANGES` changes of at most
/// 1 MiB each would not fit, but a commit is also bounded by the stream's message sizes).
pub const MAX_RECORD: usize = 1 << 31;

/// Bytes of a record's frame before its kind: length and checksum.
pub const FRAME: usize = 8;
const PUT: u8 = 1;
const DEL: u8 = 2;

/// Appends one framed record of `kind` whose payload `write` appends to `out`.
pub fn frame(out: &mut Vec<u8>, kind: u8, write: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME]);
    out.push(kind);
    write(out);
    let len = (out.len() - start - FRAME) as u32;
    let crc = crc32c::crc32c(&out[start + FRAME..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// A header: the snapshot's (with the position it holds) or a log's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The snapshot's generation: logs of this generation and later follow it. A log's own.
    pub generation: u64,
    /// The pipeline the replica belongs to.
    pub pipeline: String,
    /// The snapshot's position (`None` for a log).
    pub position: Option<Position>,
}

/// Appends a header record (`SNAP_HEADER` when it has a position, else `LOG_HEADER`).
pub fn header(out: &mut Vec<u8>, h: &Header) {
    let kind = if h.position.is_some() {
        SNAP_HEADER
    } else {
        LOG_HEADER
    };
    frame(out, kind, |p| {
        p.push(VERSION);
        p.extend_from_slice(&h.generation.to_le_bytes());
        if let Some(pos) = &h.position {
            p.extend_from_slice(&pos.encode());
        }
        let name = h.pipeline.as_bytes();
        p.extend_from_slice(&(name.len().min(u16::MAX as usize) as u16).to_le_bytes());
        p.extend_from_slice(&name[..name.len().min(u16::MAX as usize)]);
    });
}

/// Decodes a header record's payload of `kind`.
pub fn read_header(kind: u8, payload: &[u8]) -> Result<Header, String> {
    let mut c = Cursor(payload);
    let version = c.u8()?;
    if version != VERSION {
        return Err(format!(
            "format version {version}, this build reads {VERSION}"
        ));
    }
    let generation = c.u64()?;
    let position = match kind {
        SNAP_HEADER => Some(Position::decode(
            c.take(deltasync_core::position::STORED_LEN)?,
        )?),
        LOG_HEADER => None,
        other => return Err(format!("record kind {other} where a header belongs")),
    };
    let n = c.u16()? as usize;
    let pipeline = std::str::from_utf8(c.take(n)?)
        .map_err(|_| "the pipeline name is not UTF-8".to_owned())?
        .to_owned();
    c.end()?;
    Ok(Header {
        generation,
        pipeline,
        position,
    })
}

/// Appends one entry to an `ENTRIES` payload.
pub fn entry(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
}

/// Decodes an `ENTRIES` payload, handing each put's key and value (slices of the payload) to
/// `put`, in order; stops at the first malformed one.
pub fn read_entries<'a>(
    payload: &'a [u8],
    mut put: impl FnMut(&'a str, &'a [u8]),
) -> Result<(), String> {
    let mut c = Cursor(payload);
    while !c.0.is_empty() {
        let key = c.key_str()?;
        let n = c.u32()? as usize;
        put(key, c.take(n)?);
    }
    Ok(())
}

/// Appends an `END` record.
pub fn end(out: &mut Vec<u8>, entries: u64) {
    frame(out, END, |p| p.extend_from_slice(&entries.to_le_bytes()));
}

/// Decodes an `END` payload.
pub fn read_end(payload: &[u8]) -> Result<u64, String> {
    let mut c = Cursor(payload);
    let n = c.u64()?;
    c.end()?;
    Ok(n)
}

/// Appends a `COMMIT` record of `changes` ending at `position`.
pub fn commit<'a>(
    out: &mut Vec<u8>,
    position: &Position,
    count: usize,
    changes: impl Iterator<Item = &'a Change>,
) {
    frame(out, COMMIT, |p| {
        p.extend_from_slice(&position.encode());
        p.extend_from_slice(&(count as u32).to_le_bytes());
        let mut written = 0usize;
        for change in changes {
            written += 1;
            match change {
                Change::Put { key, value } => {
                    p.push(PUT);
                    entry(p, key, value);
                }
                Change::Delete { key } => {
                    p.push(DEL);
                    p.extend_from_slice(&(key.len() as u32).to_le_bytes());
                    p.extend_from_slice(key.as_bytes());
                }
            }
        }
        debug_assert_eq!(written, count, "the count announced is the count written");
    });
}

/// Encodes the same `COMMIT` record as [`commit`] without holding it whole: `emit` receives
/// it in order, in pieces of about `chunk` bytes staged in `buf` (a value of `chunk` bytes or
/// more is passed straight from the change, uncopied). The frame's first 8 bytes (length and
/// checksum) are only known at the end: the first piece starts with 8 zero bytes in their
/// place and the real ones are returned, for the caller to write over them. Until it does, the
/// record reads as damaged, never as a record (a length of 0 is refused).
///
/// So a commit of tens of MiB costs a buffer of `chunk` that stays in the cache, not a fresh
/// allocation (page faults, zeroing) as large as the commit, copied again into the page cache.
pub fn commit_chunked<'a, E>(
    buf: &mut Vec<u8>,
    chunk: usize,
    position: &Position,
    count: usize,
    changes: impl Iterator<Item = &'a Change>,
    mut emit: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<[u8; FRAME], E> {
    let mut len = 0usize;
    let mut crc = 0u32;
    let mut piece = |bytes: &[u8], crc_from: usize, len: &mut usize, crc: &mut u32| {
        *len += bytes.len() - crc_from;
        *crc = crc32c::crc32c_append(*crc, &bytes[crc_from..]);
        emit(bytes)
    };
    buf.clear();
    buf.extend_from_slice(&[0; FRAME]);
    buf.push(COMMIT);
    buf.extend_from_slice(&position.encode());
    buf.extend_from_slice(&(count as u32).to_le_bytes());
    // Only the first piece holds frame bytes, which the checksum and length leave out.
    let mut skip = FRAME;
    let mut written = 0usize;
    for change in changes {
        written += 1;
        if buf.len() >= chunk {
            piece(buf, skip, &mut len, &mut crc)?;
            buf.clear();
            skip = 0;
        }
        match change {
            Change::Put { key, value } => {
                buf.push(PUT);
                buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
                buf.extend_from_slice(key.as_bytes());
                buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
                if value.len() >= chunk {
                    piece(buf, skip, &mut len, &mut crc)?;
                    buf.clear();
                    skip = 0;
                    piece(value, 0, &mut len, &mut crc)?;
                } else {
                    buf.extend_from_slice(value);
                }
            }
            Change::Delete { key } => {
                buf.push(DEL);
                buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
                buf.extend_from_slice(key.as_bytes());
            }
        }
    }
    debug_assert_eq!(written, count, "the count announced is the count written");
    if !buf.is_empty() {
        piece(buf, skip, &mut len, &mut crc)?;
        buf.clear();
    }
    let mut head = [0u8; FRAME];
    head[..4].copy_from_slice(&(len as u32).to_le_bytes());
    head[4..].copy_from_slice(&crc.to_le_bytes());
    Ok(head)
}

/// Decodes a `COMMIT` payload.
pub fn read_commit(payload: &[u8]) -> Result<(Position, Vec<Change>), String> {
    let mut c = Cursor(payload);
    let position = Position::decode(c.take(deltasync_core::position::STORED_LEN)?)?;
    let count = c.u32()? as usize;
    // Each change takes at least 5 bytes: a count larger than that is damage.
    let mut changes = Vec::with_capacity(count.min(c.0.len() / 5));
    for _ in 0..count {
        match c.u8()? {
            PUT => {
                let key = c.key()?;
                let value = c.bytes()?;
                changes.push(Change::Put { key, value });
            }
            DEL => changes.push(Change::Delete { key: c.key()? }),
            op => return Err(format!("change op {op}")),
        }
    }
    c.end()?;
    Ok((position, changes))
}

/// Why a frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bad {
    /// The file ends inside the frame (a write cut short).
    Torn { at: u64 },
    /// The frame's length is impossible or its checksum differs.
    Damaged { at: u64, reason: String },
}

impl std::fmt::Display for Bad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bad::Torn { at } => write!(f, "a record cut short at byte {at}"),
            Bad::Damaged { at, reason } => write!(f, "a damaged record at byte {at}: {reason}"),
        }
    }
}

/// What [`Records::read`] found: a record `(kind, payload)`, a clean end of file (`None`), or a
/// frame that cannot be read.
pub type Read<'a> = Result<Option<(u8, &'a [u8])>, Bad>;

/// Reads framed records one at a time from `inner`, reusing one buffer.
#[derive(Debug)]
pub struct Records<R> {
    inner: R,
    buf: Vec<u8>,
    /// Where the next frame starts.
    pub offset: u64,
}

impl<R: std::io::Read> Records<R> {
    /// A reader at the start of `inner`.
    pub fn new(inner: R) -> Self {
        Records {
            inner,
            buf: Vec::new(),
            offset: 0,
        }
    }

    /// The next record as `(kind, payload)`; `Ok(None)` at a clean end of file.
    pub fn read(&mut self) -> std::io::Result<Read<'_>> {
        let at = self.offset;
        let mut head = [0u8; FRAME];
        let got = read_full(&mut self.inner, &mut head)?;
        if got == 0 {
            return Ok(Ok(None));
        }
        if got < FRAME {
            return Ok(Err(Bad::Torn { at }));
        }
        let len = u32::from_le_bytes(head[..4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(head[4..].try_into().unwrap_or_default());
        if len == 0 || len > MAX_RECORD {
            return Ok(Err(Bad::Damaged {
                at,
                reason: format!("length {len}"),
            }));
        }
        self.buf.clear();
        let got = (&mut self.inner)
            .take(len as u64)
            .read_to_end(&mut self.buf)?;
        if got < len {
            return Ok(Err(Bad::Torn { at }));
        }
        if crc32c::crc32c(&self.buf) != crc {
            return Ok(Err(Bad::Damaged {
                at,
                reason: "checksum differs".into(),
            }));
        }
        self.offset += (FRAME + len) as u64;
        Ok(Ok(Some((self.buf[0], &self.buf[1..]))))
    }
}

/// Reads until `buf` is full or the end of input; returns how many bytes were read.
fn read_full(r: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A bounds-checked reader over a payload.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("{n} bytes wanted, {} left", self.0.len()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
    fn key(&mut self) -> Result<deltasync_core::change::Key, String> {
        Ok(self.key_str()?.into())
    }
    fn key_str(&mut self) -> Result<&'a str, String> {
        let n = self.u32()? as usize;
        let raw = self.take(n)?;
        std::str::from_utf8(raw).map_err(|_| "a key that is not UTF-8".to_owned())
    }
    fn bytes(&mut self) -> Result<Bytes, String> {
        let n = self.u32()? as usize;
        Ok(Bytes::copy_from_slice(self.take(n)?))
    }
    fn end(&self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(format!("{} bytes after the record's content", self.0.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltasync_core::{Digest, Lineage};
    use proptest::prelude::*;

    fn pos(seq: u64) -> Position {
        Position {
            lineage: Lineage([7; 16]),
            seq,
            stream_seq: seq + 3,
            digest: Digest([seq as u8; 32]),
        }
    }

    fn changes(n: usize) -> Vec<Change> {
        (0..n)
            .map(|i| {
                if i % 3 == 2 {
                    Change::Delete {
                        key: format!("k{i}").into(),
                    }
                } else {
                    Change::put(format!("k{i}"), vec![i as u8; i % 7])
                }
            })
            .collect()
    }

    fn records(bytes: &[u8]) -> (Vec<(u8, Vec<u8>)>, Option<Bad>) {
        let mut r = Records::new(bytes);
        let mut out = Vec::new();
        loop {
            match r.read().expect("reading a slice") {
                Ok(Some((k, p))) => out.push((k, p.to_vec())),
                Ok(None) => return (out, None),
                Err(bad) => return (out, Some(bad)),
            }
        }
    }

    #[test]
    fn headers_entries_and_commits_read_back_as_written() {
        let mut out = Vec::new();
        let snap = Header {
            generation: 9,
            pipeline: "orders".into(),
            position: Some(pos(41)),
        };
        header(&mut out, &snap);
        frame(&mut out, ENTRIES, |p| {
            entry(p, "a", b"1");
            entry(p, "b", b"");
        });
        end(&mut out, 2);
        let log = Header {
            generation: 10,
            pipeline: "orders".into(),
            position: None,
        };
        header(&mut out, &log);
        let cs = changes(5);
        commit(&mut out, &pos(42), cs.len(), cs.iter());

        let (recs, bad) = records(&out);
        assert_eq!(bad, None);
        assert_eq!(recs.len(), 5);
        assert_eq!(read_header(recs[0].0, &recs[0].1), Ok(snap));
        let mut es = Vec::new();
        read_entries(&recs[1].1, |k, v| es.push(Change::put(k, v.to_vec()))).expect("entries");
        assert_eq!(
            es,
            vec![
                Change::put("a", b"1".to_vec()),
                Change::put("b", Vec::new())
            ]
        );
        assert_eq!(read_end(&recs[2].1), Ok(2));
        assert_eq!(read_header(recs[3].0, &recs[3].1), Ok(log));
        assert_eq!(recs[4].0, COMMIT);
        assert_eq!(read_commit(&recs[4].1), Ok((pos(42), cs)));
    }

    #[test]
    fn another_version_is_refused_by_name() {
        let mut out = Vec::new();
        frame(&mut out, LOG_HEADER, |p| {
            p.push(VERSION + 1);
            p.extend_from_slice(&0u64.to_le_bytes());
            p.extend_from_slice(&0u16.to_le_bytes());
        });
        let (recs, _) = records(&out);
        let err = read_header(recs[0].0, &recs[0].1).expect_err("version 2");
        assert!(err.contains("format version 2"), "{err}");
    }

    /// `commit_chunked`'s pieces with its returned frame written over their first 8 bytes.
    fn chunked(chunk: usize, at: &Position, cs: &[Change]) -> (Vec<u8>, usize) {
        let mut out = Vec::new();
        let mut pieces = 0;
        let mut buf = Vec::new();
        let head = commit_chunked(&mut buf, chunk, at, cs.len(), cs.iter(), |p| {
            pieces += 1;
            out.extend_from_slice(p);
            Ok::<_, ()>(())
        })
        .expect("a vec takes every piece");
        assert_eq!(
            &out[..FRAME],
            &[0; FRAME],
            "the frame's place is left zeroed"
        );
        out[..FRAME].copy_from_slice(&head);
        (out, pieces)
    }

    #[test]
    fn a_chunked_commit_is_the_same_record_and_passes_large_values_through() {
        let mut cs = changes(50);
        cs.push(Change::put("big", vec![7u8; 1000]));
        cs.push(Change::delete("gone"));
        let mut whole = Vec::new();
        commit(&mut whole, &pos(3), cs.len(), cs.iter());
        for chunk in [1, 2, 9, 64, 100, 999, 1000, 1001, 1 << 20] {
            let (out, pieces) = chunked(chunk, &pos(3), &cs);
            assert_eq!(out, whole, "chunk {chunk}");
            if chunk < 1000 {
                assert!(pieces > 2, "chunk {chunk}: {pieces} pieces");
            }
        }
    }

    #[test]
    fn a_commit_whose_frame_was_not_written_yet_is_never_read_as_a_record() {
        let cs = changes(20);
        let mut out = Vec::new();
        commit_chunked(&mut Vec::new(), 16, &pos(8), cs.len(), cs.iter(), |p| {
            out.extend_from_slice(p);
            Ok::<_, ()>(())
        })
        .expect("a vec takes every piece");
        for cut in 0..=out.len() {
            let (recs, bad) = records(&out[..cut]);
            assert!(recs.is_empty(), "cut at {cut}: a record was read");
            assert_eq!(bad.is_some(), cut > 0, "cut at {cut}: {bad:?}");
        }
    }

    proptest! {
        /// Whatever the changes and the chunk size, the pieces and the frame are the bytes
        /// `commit` writes.
        #[test]
        fn a_chunked_commit_equals_the_whole_one(
            n in 0usize..40,
            chunk in 1usize..300,
            big in proptest::option::of(0usize..600),
        ) {
            let mut cs = changes(n);
            if let Some(len) = big {
                cs.insert(cs.len() / 2, Change::put("v", vec![3u8; len]));
            }
            let mut whole = Vec::new();
            commit(&mut whole, &pos(n as u64), cs.len(), cs.iter());
            prop_assert_eq!(chunked(chunk, &pos(n as u64), &cs).0, whole);
        }

        /// Cutting a log anywhere yields the whole records before the cut, then a torn frame
        /// (or a clean end exactly at a boundary): never a record that was not written.
        #[test]
        fn a_log_cut_anywhere_reads_back_a_prefix_of_its_records(
            sizes in proptest::collection::vec(0usize..20, 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut out = Vec::new();
            let mut bounds = vec![0];
            for (i, n) in sizes.iter().enumerate() {
                let cs = changes(*n);
                commit(&mut out, &pos(i as u64), cs.len(), cs.iter());
                bounds.push(out.len());
            }
            let cut = cut.index(out.len() + 1);
            let (recs, bad) = records(&out[..cut]);
            let whole = bounds.iter().filter(|&&b| b <= cut).count() - 1;
            prop_assert_eq!(recs.len(), whole);
            for (i, (k, p)) in recs.iter().enumerate() {
                prop_assert_eq!(*k, COMMIT);
                let (at, cs) = read_commit(p).expect("whole record");
                prop_assert_eq!(at, pos(i as u64));
                prop_assert_eq!(cs, changes(sizes[i]));
            }
            if bounds.contains(&cut) {
                prop_assert_eq!(bad, None);
            } else {
                prop_assert_eq!(bad, Some(Bad::Torn { at: bounds[whole] as u64 }));
            }
        }

        /// Any single flipped byte is caught by the checksum or the frame's length, or reads
        /// as a different valid frame only if it hits a length (then the rest is damaged).
        #[test]
        fn a_flipped_byte_is_never_decoded_as_the_record(
            n in 1usize..20,
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let mut out = Vec::new();
            let cs = changes(n);
            commit(&mut out, &pos(5), cs.len(), cs.iter());
            let i = at.index(out.len());
            out[i] ^= flip;
            let (recs, bad) = records(&out);
            prop_assert!(recs.is_empty(), "a damaged record was read: {:?}", recs);
            prop_assert!(bad.is_some());
        }

        /// Decoding arbitrary bytes as any payload returns an error or a value, never panics.
        #[test]
        fn garbage_payloads_are_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = read_commit(&bytes);
            let _ = read_header(SNAP_HEADER, &bytes);
            let _ = read_header(LOG_HEADER, &bytes);
            let _ = read_end(&bytes);
            let _ = read_entries(&bytes, |_, _| {});
        }
    }
}
