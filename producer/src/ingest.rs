//! NDJSON ingestion: parses change lines from a file or stdin and hands them to the producer,
//! stopping at the first bad line with an error naming it.
//!
//! Talks to its input (a blocking reader on its own thread, so parsing runs beside the
//! engine) and to a [`Producer`].
//!
//! ## Input
//!
//! ```text
//! {"op":"put","key":"k1","value":{"any":"json"}}    value stored as its compact JSON bytes
//! {"op":"del","key":"k1"}
//! {"txn":[{"op":"put","key":"a","value":1},{"op":"del","key":"b"}]}   atomic
//! {"op":"put","key":"k2","value_b64":"AJ+Slg=="}     bytes that are not JSON (as replay prints them)
//! ```
//!
//! Lines may also carry `seq` and `lineage` (what replay prints); they are ignored. Blank
//! lines are skipped. Any other field is refused (a misspelt `vlaue` must not store nothing).
//!
//! ## Invariants
//!
//! - At the first bad line ingestion stops: every line before it is published and
//!   acknowledged, nothing of the bad line (a whole transaction) or after it is.
//! - Plain put/del lines are batched freely into envelopes; a `txn` line is one atomic
//!   transaction. A transaction the pipeline cannot publish whole (more parts than a replica
//!   buffers, more than the stream's retention keeps after a snapshot) is a bad line.
//! - A line longer than [`max_line_bytes`] is a bad line; it is never read into memory whole.

use crate::error::ProducerError;
use crate::producer::Producer;
use base64::Engine as _;
use bytes::Bytes;
use deltasync_core::change::{MAX_KEY_BYTES, MAX_VALUE_BYTES};
use deltasync_core::Position;
use deltasync_core::{Change, Key};
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Changes parsed before they are handed to the producer in one piece.
const CHUNK: usize = 4096;

/// The least a line may hold: a change at its key and value limits, JSON-escaped.
const MIN_LINE_BYTES: u64 = 4 * 1024 * 1024;

/// The most a line may hold, whatever the settings allow a transaction to be.
const MAX_LINE_BYTES: u64 = 1 << 30;

/// The longest line `ingest` reads under `settings`: four times the largest transaction the
/// pipeline publishes (JSON escaping and base64 make a change's text larger than its bytes),
/// at least 4 MiB and at most 1 GiB.
pub fn max_line_bytes(settings: &deltasync_config::settings::Settings) -> u64 {
    let parts = u64::from(deltasync_core::envelope::MAX_TXN_PARTS)
        .min(settings.stream.envelope_room().unwrap_or(u64::MAX));
    let mut txn = parts.saturating_mul(settings.producer.batch_max_bytes as u64);
    if let Some(room) = settings.stream.byte_room() {
        txn = txn.min(room);
    }
    txn.saturating_mul(4).clamp(MIN_LINE_BYTES, MAX_LINE_BYTES)
}

/// Where NDJSON comes from.
pub enum Input {
    /// Standard input.
    Stdin,
    /// A file.
    File(PathBuf),
    /// Any reader (tests, embedding).
    Reader(Box<dyn Read + Send>),
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl Input {
    /// How errors name it.
    pub fn name(&self) -> String {
        match self {
            Input::Stdin => "stdin".into(),
            Input::File(p) => p.display().to_string(),
            Input::Reader(_) => "input".into(),
        }
    }
}

/// Why ingestion stopped short.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// A line is not a valid change; everything before it was published.
    #[error("{input} line {line}: {reason} (lines before it are published and acknowledged; nothing of line {line} or after it is)")]
    BadLine {
        /// The input's name.
        input: String,
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        reason: String,
    },
    /// The input could not be read.
    #[error("reading {input} after line {line}: {source}")]
    Read {
        /// The input's name.
        input: String,
        /// Lines read before the failure.
        line: u64,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Publishing failed.
    #[error(transparent)]
    Producer(#[from] ProducerError),
}

/// What an ingestion did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IngestReport {
    /// Lines read and published (blank lines included).
    pub lines: u64,
    /// Changes published.
    pub changes: u64,
    /// `txn` lines published.
    pub transactions: u64,
    /// From start to the last acknowledgement.
    pub elapsed: Duration,
    /// The durable position at the end.
    pub position: Position,
    /// Whether it stopped early because it was cancelled.
    pub cancelled: bool,
}

impl IngestReport {
    /// Changes per second.
    pub fn rate(&self) -> f64 {
        self.changes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// What the parsing thread hands over; `line` is the last line the item covers.
enum Item {
    Changes { changes: Vec<Change>, line: u64 },
    Txn { changes: Vec<Change>, line: u64 },
    End { line: u64 },
    Bad { line: u64, reason: String },
    ReadFailed { line: u64, source: std::io::Error },
}

/// Reads `input` to its end (or to `cancel`) and publishes it through `producer`; returns
/// once every envelope is acknowledged.
pub async fn ingest(
    producer: &Producer,
    input: Input,
    cancel: CancellationToken,
) -> Result<IngestReport, IngestError> {
    let started = Instant::now();
    let name = input.name();
    let max_line = max_line_bytes(producer.settings());
    let (tx, mut rx) = mpsc::channel::<Item>(16);
    // A plain thread, not the blocking pool: on cancellation it may sit in a read of stdin
    // forever, and nothing waits for it (the runtime would wait for a blocking-pool task).
    std::thread::Builder::new()
        .name("deltasync-ingest".into())
        .spawn(move || parse_input(input, max_line, &tx))
        .map_err(|e| ProducerError::Internal(format!("cannot start the ingest thread: {e}")))?;
    let (mut lines, mut changes, mut transactions) = (0u64, 0u64, 0u64);
    let mut cancelled = false;
    let mut failure = None;
    loop {
        let item = tokio::select! {
            biased;
            () = cancel.cancelled() => {
                cancelled = true;
                tracing::info!(changes, "Interrupted: no more input taken; awaiting acknowledgements");
                break;
            }
            item = rx.recv() => item,
        };
        match item {
            None => break,
            Some(Item::Changes {
                changes: chunk,
                line,
            }) => {
                changes += chunk.len() as u64;
                lines = line;
                producer.submit_many(chunk).await?;
            }
            Some(Item::Txn { changes: txn, line }) => {
                changes += txn.len() as u64;
                transactions += 1;
                lines = line;
                // Not awaited one by one: the final flush covers it. A transaction that cannot
                // be published whole is refused here, before anything of it is handed over.
                match producer.submit_transaction(txn).await {
                    Ok(pending) => drop(pending),
                    Err(
                        e @ (ProducerError::TransactionTooLarge { .. }
                        | ProducerError::TransactionBeyondRetention { .. }),
                    ) => {
                        failure = Some(IngestError::BadLine {
                            input: name.clone(),
                            line,
                            reason: e.to_string(),
                        });
                        lines = line - 1;
                        transactions -= 1;
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Some(Item::End { line }) => {
                lines = line;
                break;
            }
            Some(Item::Bad { line, reason }) => {
                failure = Some(IngestError::BadLine {
                    input: name.clone(),
                    line,
                    reason,
                });
                lines = line - 1;
                break;
            }
            Some(Item::ReadFailed { line, source }) => {
                failure = Some(IngestError::Read {
                    input: name.clone(),
                    line,
                    source,
                });
                lines = line;
                break;
            }
        }
    }
    // Closing the channel stops the parser at its next chunk.
    drop(rx);
    let position = producer.flush().await?;
    if let Some(err) = failure {
        return Err(err);
    }
    let report = IngestReport {
        lines,
        changes,
        transactions,
        elapsed: started.elapsed(),
        position,
        cancelled,
    };
    tracing::info!(
        lines,
        changes,
        transactions,
        seq = position.seq,
        elapsed = ?report.elapsed,
        changes_per_second = report.rate() as u64,
        "Ingested; every envelope acknowledged"
    );
    Ok(report)
}

/// The parsing thread: reads lines and sends chunks until the input ends, a line is bad,
/// or the receiver is gone.
fn parse_input(input: Input, max_line: u64, tx: &mpsc::Sender<Item>) {
    let reader: Box<dyn Read> = match input {
        Input::Stdin => Box::new(std::io::stdin().lock()),
        Input::File(path) => match std::fs::File::open(&path) {
            Ok(f) => Box::new(f),
            Err(source) => {
                let _ = tx.blocking_send(Item::ReadFailed { line: 0, source });
                return;
            }
        },
        Input::Reader(r) => r,
    };
    parse_lines(BufReader::with_capacity(1 << 20, reader), max_line, tx);
}

fn parse_lines(mut reader: BufReader<Box<dyn Read>>, max_line: u64, tx: &mpsc::Sender<Item>) {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = Chunk::default();
    let mut line = 0u64;
    let send = |item: Item| tx.blocking_send(item).is_ok();
    loop {
        buf.clear();
        // One byte past the limit tells a line at the limit from a longer one.
        match (&mut reader).take(max_line + 1).read_until(b'\n', &mut buf) {
            Ok(0) => break,
            Ok(n) if n as u64 > max_line && buf.last() != Some(&b'\n') => {
                line += 1;
                if !chunk.is_empty() {
                    send(Item::Changes {
                        changes: chunk.take(),
                        line: line - 1,
                    });
                }
                send(Item::Bad {
                    line,
                    reason: format!(
                        "line is longer than {max_line} bytes, the most a line may hold under \
                         these settings (4 × the largest transaction, at least 4 MiB)"
                    ),
                });
                return;
            }
            Ok(_) => {}
            Err(source) => {
                if !chunk.is_empty() {
                    send(Item::Changes {
                        changes: chunk.take(),
                        line,
                    });
                }
                send(Item::ReadFailed { line, source });
                return;
            }
        }
        line += 1;
        let trimmed = buf.trim_ascii();
        let parsed = match parse_plain(trimmed) {
            Some(plain) => {
                chunk.push_plain(plain);
                None
            }
            None => Some(parse_line(trimmed)),
        };
        match parsed {
            None | Some(Ok(Parsed::Change(_))) => {
                if let Some(Ok(Parsed::Change(c))) = parsed {
                    chunk.changes.push(c);
                }
                // A full chunk goes now; so does a partial one when the next read may block
                // (a live stdin must not hold lines back until more arrive).
                if (chunk.len() >= CHUNK || reader.buffer().is_empty())
                    && !send(Item::Changes {
                        changes: chunk.take(),
                        line,
                    })
                {
                    return;
                }
            }
            Some(Ok(Parsed::Blank)) => {}
            Some(Ok(Parsed::Txn(txn))) => {
                if !chunk.is_empty()
                    && !send(Item::Changes {
                        changes: chunk.take(),
                        line: line - 1,
                    })
                {
                    return;
                }
                if !send(Item::Txn { changes: txn, line }) {
                    return;
                }
            }
            Some(Err(reason)) => {
                if !chunk.is_empty() {
                    send(Item::Changes {
                        changes: chunk.take(),
                        line: line - 1,
                    });
                }
                send(Item::Bad { line, reason });
                return;
            }
        }
    }
    if !chunk.is_empty()
        && !send(Item::Changes {
            changes: chunk.take(),
            line,
        })
    {
        return;
    }
    send(Item::End { line });
}

/// Changes parsed and not yet handed over.
///
/// The values of plain puts are copied into one buffer per chunk and handed over as slices
/// of it: one allocation (made and freed on different threads) per chunk instead of one or
/// two per value. Nothing holds the slices longer than the envelope they are encoded into —
/// the state copies the entries it keeps — so a buffer lives about as long as its chunk.
#[derive(Default)]
struct Chunk {
    changes: Vec<Change>,
    values: Vec<u8>,
    /// The plain puts: their index in `changes` and where their value is in `values`.
    slices: Vec<(usize, std::ops::Range<usize>)>,
}

impl Chunk {
    fn len(&self) -> usize {
        self.changes.len()
    }

    fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    fn push_plain(&mut self, plain: Plain<'_>) {
        let key = Key::from(plain.key);
        match plain.value {
            Some(v) => {
                let at = self.values.len();
                self.values.extend_from_slice(v);
                self.slices
                    .push((self.changes.len(), at..self.values.len()));
                // The value is filled in by `take`.
                self.changes.push(Change::Put {
                    key,
                    value: Bytes::new(),
                });
            }
            None => self.changes.push(Change::Delete { key }),
        }
    }

    /// The changes so far, values filled in; leaves the chunk empty.
    fn take(&mut self) -> Vec<Change> {
        let room = self.values.len() + self.values.len() / 8;
        let values = Bytes::from(std::mem::replace(
            &mut self.values,
            Vec::with_capacity(room),
        ));
        let mut changes = std::mem::replace(&mut self.changes, Vec::with_capacity(CHUNK));
        for (i, range) in self.slices.drain(..) {
            if let Some(Change::Put { value, .. }) = changes.get_mut(i) {
                *value = values.slice(range);
            }
        }
        changes
    }
}

/// One parsed line.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    /// Nothing but whitespace.
    Blank,
    /// A put or delete.
    Change(Change),
    /// An atomic transaction.
    Txn(Vec<Change>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineFields<'a> {
    #[serde(borrow)]
    op: Option<&'a RawValue>,
    #[serde(borrow)]
    key: Option<&'a RawValue>,
    /// Present-but-null is a value (`null`), not a missing one: hence `present`.
    #[serde(borrow, default, deserialize_with = "present")]
    value: Option<&'a RawValue>,
    /// Bytes that are not JSON, base64 (RFC 4648, padded), as `replay` prints them.
    #[serde(borrow, default, deserialize_with = "present")]
    value_b64: Option<&'a RawValue>,
    #[serde(borrow)]
    txn: Option<&'a RawValue>,
    #[allow(dead_code)]
    seq: Option<IgnoredAny>,
    #[allow(dead_code)]
    lineage: Option<IgnoredAny>,
}

/// A field that is present, whatever its JSON value (serde maps a JSON `null` to `None` for a
/// plain `Option`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue as Deserialize<'de>>::deserialize(d).map(Some)
}

/// Parses one NDJSON line (without or with its line break); the error says what is wrong.
pub fn parse_line(line: &[u8]) -> Result<Parsed, String> {
    let trimmed = line.trim_ascii();
    if trimmed.is_empty() {
        return Ok(Parsed::Blank);
    }
    if let Some(plain) = parse_plain(trimmed) {
        return Ok(Parsed::Change(plain.into_change()));
    }
    parse_general(trimmed)
}

/// Any line, through serde (`trimmed` is not blank).
fn parse_general(trimmed: &[u8]) -> Result<Parsed, String> {
    if trimmed[0] != b'{' {
        return Err(match serde_json::from_slice::<IgnoredAny>(trimmed) {
            Ok(_) => format!("expected a JSON object, got {}", kind_of_bytes(trimmed)),
            Err(e) => invalid_json(&e),
        });
    }
    let fields: LineFields<'_> = serde_json::from_slice(trimmed).map_err(|e| {
        if e.is_data() {
            json_message(&e)
        } else {
            invalid_json(&e)
        }
    })?;
    match fields.txn {
        Some(txn) => {
            if fields.op.is_some()
                || fields.key.is_some()
                || fields.value.is_some()
                || fields.value_b64.is_some()
            {
                return Err("a `txn` line carries no `op`, `key` or `value` of its own".into());
            }
            let items: Vec<&RawValue> = serde_json::from_str(txn.get())
                .map_err(|_| format!("`txn` must be an array, got {}", kind_of(txn)))?;
            if items.is_empty() {
                return Err("empty txn: a transaction needs at least one change".into());
            }
            let mut changes = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let at = |reason: String| format!("txn item {}: {reason}", i + 1);
                if !item.get().starts_with('{') {
                    return Err(at(format!("expected a JSON object, got {}", kind_of(item))));
                }
                let f: LineFields<'_> =
                    serde_json::from_str(item.get()).map_err(|e| at(json_message(&e)))?;
                if f.txn.is_some() {
                    return Err(at("transactions do not nest".into()));
                }
                changes.push(change_of(&f).map_err(at)?);
            }
            Ok(Parsed::Txn(changes))
        }
        None => change_of(&fields).map(Parsed::Change),
    }
}

/// The fast path for the common lines, `{"op":"put","key":K,"value":V}` and
/// `{"op":"del","key":K}` written compactly (no whitespace outside strings) with a key free
/// of escapes: parsed in one pass without serde. `None` for anything else, valid or not —
/// [`parse_line`]'s general path then decides, with its error messages. Whatever it accepts,
/// the general path accepts too and turns into the same change.
fn parse_plain(line: &[u8]) -> Option<Plain<'_>> {
    // Valid UTF-8 as a whole, so every piece cut at an ASCII byte is valid too.
    std::str::from_utf8(line).ok()?;
    let rest = line.strip_prefix(br#"{"op":""#)?;
    let (put, rest) = match rest.strip_prefix(br#"put","key":""#) {
        Some(r) => (true, r),
        None => (false, rest.strip_prefix(br#"del","key":""#)?),
    };
    // The key ends at its closing quote; an escape or a control character (which JSON
    // refuses in strings) sends the line to the general path.
    let end = string_stop(rest, 0);
    if rest.get(end) != Some(&b'"') || end > MAX_KEY_BYTES {
        return None;
    }
    let key = std::str::from_utf8(&rest[..end]).ok()?;
    let rest = &rest[end + 1..];
    if put {
        let value = rest.strip_prefix(br#","value":"#)?.strip_suffix(b"}")?;
        if value.len() > MAX_VALUE_BYTES || json_value_end(value)? != value.len() {
            return None;
        }
        Some(Plain {
            key,
            value: Some(value),
        })
    } else {
        (rest == b"}").then_some(Plain { key, value: None })
    }
}

/// A line [`parse_plain`] took, borrowed from it.
struct Plain<'a> {
    key: &'a str,
    /// The value's compact JSON; `None` for a delete.
    value: Option<&'a [u8]>,
}

impl Plain<'_> {
    fn into_change(self) -> Change {
        let key = Key::from(self.key);
        match self.value {
            Some(v) => Change::Put {
                key,
                value: Bytes::copy_from_slice(v),
            },
            None => Change::Delete { key },
        }
    }
}

/// Where the JSON value starting at `v[0]` ends, when it is valid JSON (RFC 8259, as
/// serde_json reads it) with no whitespace outside its strings and at most 64 levels of
/// nesting; `None` otherwise (not necessarily invalid: the general path decides).
fn json_value_end(v: &[u8]) -> Option<usize> {
    const MAX_DEPTH: usize = 64;
    // Open containers: `true` for an object.
    let mut stack = [false; MAX_DEPTH];
    let mut depth = 0;
    let mut i = 0;
    'value: loop {
        match *v.get(i)? {
            open @ (b'{' | b'[') => {
                let object = open == b'{';
                i += 1;
                if v.get(i) == Some(if object { &b'}' } else { &b']' }) {
                    i += 1;
                } else {
                    if depth == MAX_DEPTH {
                        return None;
                    }
                    stack[depth] = object;
                    depth += 1;
                    if object {
                        i = member_name_end(v, i)?;
                    }
                    continue 'value;
                }
            }
            b'"' => i = json_string_end(v, i)?,
            b't' => i = literal_end(v, i, b"true")?,
            b'f' => i = literal_end(v, i, b"false")?,
            b'n' => i = literal_end(v, i, b"null")?,
            b'-' | b'0'..=b'9' => i = json_number_end(v, i)?,
            _ => return None,
        }
        // A value ended: close containers, or go on after a comma.
        loop {
            if depth == 0 {
                return Some(i);
            }
            let object = stack[depth - 1];
            match *v.get(i)? {
                b',' => {
                    i += 1;
                    if object {
                        i = member_name_end(v, i)?;
                    }
                    continue 'value;
                }
                b'}' if object => {}
                b']' if !object => {}
                _ => return None,
            }
            i += 1;
            depth -= 1;
        }
    }
}

/// After `"name":` starting at `v[i]`.
fn member_name_end(v: &[u8], i: usize) -> Option<usize> {
    let i = json_string_end(v, i)?;
    (*v.get(i)? == b':').then_some(i + 1)
}

/// After the string starting at `v[i]` (its opening quote).
fn json_string_end(v: &[u8], mut i: usize) -> Option<usize> {
    if *v.get(i)? != b'"' {
        return None;
    }
    i += 1;
    loop {
        i = string_stop(v, i);
        match *v.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => match *v.get(i + 1)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                b'u' => {
                    if !v.get(i + 2..i + 6)?.iter().all(u8::is_ascii_hexdigit) {
                        return None;
                    }
                    i += 6;
                }
                _ => return None,
            },
            _ => return None,
        }
    }
}

/// The first index from `i` holding a byte that stops a JSON string scan — `"`, `\` or a
/// control character — or `v.len()`; eight bytes at a time.
fn string_stop(v: &[u8], mut i: usize) -> usize {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    /// High bit set in the bytes of `x` below `n` (n ≤ 128); exact for the lowest such byte.
    fn below(x: u64, n: u8) -> u64 {
        x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH
    }
    while let Some(word) = v.get(i..i + 8) {
        let mut w = [0; 8];
        w.copy_from_slice(word);
        let x = u64::from_le_bytes(w);
        let hits = below(x ^ (ONES * u64::from(b'"')), 1)
            | below(x ^ (ONES * u64::from(b'\\')), 1)
            | below(x, 0x20);
        if hits != 0 {
            return i + (hits.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < v.len() && !matches!(v[i], b'"' | b'\\' | 0..=0x1f) {
        i += 1;
    }
    i
}

/// After the number starting at `v[i]`: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
fn json_number_end(v: &[u8], mut i: usize) -> Option<usize> {
    let digits = |v: &[u8], i: usize| {
        v.get(i..)
            .map_or(0, |r| r.iter().take_while(|b| b.is_ascii_digit()).count())
    };
    if v.get(i) == Some(&b'-') {
        i += 1;
    }
    match *v.get(i)? {
        b'0' => i += 1,
        b'1'..=b'9' => i += digits(v, i),
        _ => return None,
    }
    if v.get(i) == Some(&b'.') {
        let n = digits(v, i + 1);
        if n == 0 {
            return None;
        }
        i += 1 + n;
    }
    if matches!(v.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(v.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let n = digits(v, i);
        if n == 0 {
            return None;
        }
        i += n;
    }
    // A digit right after a leading zero ("01") is not JSON.
    (!v.get(i).is_some_and(u8::is_ascii_digit)).then_some(i)
}

fn literal_end(v: &[u8], i: usize, word: &[u8]) -> Option<usize> {
    let end = i + word.len();
    (v.get(i..end)? == word).then_some(end)
}

fn change_of(f: &LineFields<'_>) -> Result<Change, String> {
    let op = f.op.ok_or("missing `op` (\"put\" or \"del\") or `txn`")?;
    let op_str =
        json_str(op).ok_or_else(|| format!("`op` must be a string, got {}", kind_of(op)))?;
    let key = |raw: Option<&RawValue>| -> Result<Key, String> {
        let raw = raw.ok_or("missing `key`")?;
        json_str(raw)
            .map(|k| Key::from(&*k))
            .ok_or_else(|| format!("`key` must be a string, got {}", kind_of(raw)))
    };
    let change = match &*op_str {
        "put" => {
            let k = key(f.key)?;
            let value = match (f.value, f.value_b64) {
                (Some(v), None) => compact(v.get()),
                (None, Some(b64)) => {
                    let text = json_str(b64).ok_or_else(|| {
                        format!("`value_b64` must be a string, got {}", kind_of(b64))
                    })?;
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(text.as_bytes())
                        .map_err(|e| format!("`value_b64` is not base64: {e}"))?;
                    Bytes::from(bytes)
                }
                (Some(_), Some(_)) => {
                    return Err("op \"put\" takes `value` or `value_b64`, not both".into())
                }
                (None, None) => {
                    return Err(
                        "missing `value` (any JSON value) or `value_b64` for op \"put\"".into(),
                    )
                }
            };
            Change::Put { key: k, value }
        }
        "del" => {
            if f.value.is_some() || f.value_b64.is_some() {
                return Err("op \"del\" takes no `value`".into());
            }
            Change::Delete { key: key(f.key)? }
        }
        other => {
            return Err(format!(
                "unknown op {other:?} (expected \"put\" or \"del\")"
            ))
        }
    };
    change.validate().map_err(|e| e.to_string())?;
    Ok(change)
}

/// The string a JSON value holds, borrowed when it has no escapes; `None` when the value is
/// not a string.
fn json_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    let s = raw.get();
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    if !inner.contains('\\') {
        // A valid JSON string without escapes is its own content.
        return Some(Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(s).ok().map(Cow::Owned)
}

/// The compact JSON bytes of a valid JSON text: whitespace outside strings removed, object
/// key order kept.
fn compact(json: &str) -> Bytes {
    if !json
        .bytes()
        .any(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        return Bytes::copy_from_slice(json.as_bytes());
    }
    let mut out = Vec::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in json.as_bytes() {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            if b == b'"' {
                in_string = true;
            }
            out.push(b);
        }
    }
    Bytes::from(out)
}

fn kind_of(raw: &RawValue) -> &'static str {
    kind_of_bytes(raw.get().as_bytes())
}

fn kind_of_bytes(b: &[u8]) -> &'static str {
    match b.first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

fn invalid_json(e: &serde_json::Error) -> String {
    format!("invalid JSON at column {}: {}", e.column(), json_message(e))
}

/// serde_json's message without its "at line 1 column N" suffix (the line is ours to name).
fn json_message(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    full.strip_suffix(&suffix).unwrap_or(&full).to_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn change(line: &str) -> Change {
        match parse_line(line.as_bytes()) {
            Ok(Parsed::Change(c)) => c,
            other => panic!("{line}: {other:?}"),
        }
    }

    fn error(line: &str) -> String {
        match parse_line(line.as_bytes()) {
            Err(e) => e,
            other => panic!("{line} parsed: {other:?}"),
        }
    }

    #[test]
    fn a_null_value_is_stored_as_null_not_refused_as_missing() {
        assert_eq!(
            change(r#"{"op":"put","key":"a","value":null}"#),
            Change::put("a", &b"null"[..])
        );
    }

    #[test]
    fn value_b64_carries_bytes_that_are_not_json() {
        assert_eq!(
            change(r#"{"op":"put","key":"bin","value_b64":"AJ+Slg=="}"#),
            Change::put("bin", &[0u8, 159, 146, 150][..])
        );
        assert!(error(r#"{"op":"put","key":"k","value_b64":"***"}"#).contains("not base64"));
        assert!(
            error(r#"{"op":"put","key":"k","value":1,"value_b64":"AA=="}"#).contains("not both")
        );
        assert!(error(r#"{"op":"del","key":"k","value_b64":"AA=="}"#).contains("takes no `value`"));
    }

    #[test]
    fn puts_store_the_compact_json_of_any_value() {
        assert_eq!(
            change(r#"{"op":"put","key":"a","value":{"x": [1, 2], "s": "a b"}}"#),
            Change::put("a", &br#"{"x":[1,2],"s":"a b"}"#[..])
        );
        assert_eq!(
            change(r#"{"op":"put","key":"a","value":5}"#),
            Change::put("a", &b"5"[..])
        );
        assert_eq!(
            change(r#"{"op":"put","key":"a\"b","value":"v"}"#),
            Change::put("a\"b", &br#""v""#[..])
        );
        assert_eq!(change(r#"{"op":"del","key":"a"}"#), Change::delete("a"));
    }

    #[test]
    fn replay_fields_are_ignored_and_blank_lines_skipped() {
        assert_eq!(
            change(r#"{"seq":4,"lineage":"00ff","op":"del","key":"a"}"#),
            Change::delete("a")
        );
        assert_eq!(parse_line(b"  \r\n"), Ok(Parsed::Blank));
    }

    #[test]
    fn a_txn_is_parsed_whole() {
        let parsed =
            parse_line(br#"{"txn":[{"op":"put","key":"a","value":1},{"op":"del","key":"b"}]}"#);
        assert_eq!(
            parsed,
            Ok(Parsed::Txn(vec![
                Change::put("a", &b"1"[..]),
                Change::delete("b")
            ]))
        );
    }

    /// Lines the fast path may take: whenever it does, the general path gives the same.
    const TRICKY: &[&str] = &[
        r#"{"op":"put","key":"k","value":{"n":1,"p":"9e3779...."}}"#,
        r#"{"op":"put","key":"k","value":[1,-2.5e+3,0,-0,0.0,1E9,true,false,null,"",{},[]]}"#,
        r#"{"op":"put","key":"k","value":{"a":{"b":[{"c":"\"\\\/\b\f\n\r\t\u00e9"}]}}}"#,
        r#"{"op":"put","key":"k","value":"a b\u12"}"#,
        r#"{"op":"put","key":"k","value":"\x"}"#,
        r#"{"op":"put","key":"k","value":01}"#,
        r#"{"op":"put","key":"k","value":1.}"#,
        r#"{"op":"put","key":"k","value":1e}"#,
        r#"{"op":"put","key":"k","value":-}"#,
        r#"{"op":"put","key":"k","value":.5}"#,
        r#"{"op":"put","key":"k","value":tru}"#,
        r#"{"op":"put","key":"k","value":nulll}"#,
        r#"{"op":"put","key":"k","value":{"a"}}"#,
        r#"{"op":"put","key":"k","value":{"a":}}"#,
        r#"{"op":"put","key":"k","value":{"a":1,}}"#,
        r#"{"op":"put","key":"k","value":[1,]}"#,
        r#"{"op":"put","key":"k","value":[1}}"#,
        r#"{"op":"put","key":"k","value":{1:2}}"#,
        r#"{"op":"put","key":"k","value":1}}"#,
        r#"{"op":"put","key":"k","value":1 }"#,
        r#"{"op":"put","key":"k","value":"é ü"}"#,
        r#"{"op":"put","key":"ké","value":{ "a": 1 }}"#,
        r#"{"op":"put","key":"k\"","value":1}"#,
        r#"{"op":"put","key":"k","value":1,"seq":3}"#,
        r#"{"op":"put","key":"k"}"#,
        r#"{"op":"put","key":"k","value":"x","value":"y"}"#,
        r#"{"op":"del","key":"k"}"#,
        r#"{"op":"del","key":"k","value":1}"#,
        r#"{"op":"del","key":"k"}}"#,
        r#"{"op":"del","key":""}"#,
        "{\"op\":\"put\",\"key\":\"k\",\"value\":\"a\tb\"}",
        "{\"op\":\"put\",\"key\":\"k\x01\",\"value\":1}",
    ];

    fn agrees(line: &[u8]) {
        if let Some(fast) = parse_plain(line) {
            assert_eq!(
                parse_general(line),
                Ok(Parsed::Change(fast.into_change())),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn the_fast_path_agrees_with_the_general_one() {
        for line in TRICKY {
            agrees(line.as_bytes());
        }
        // Random mutations of valid lines: every byte changed, removed or repeated.
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let alphabet = b"{}[]\",:.-+eE019tfnulsr\\u a\x01\xc3\xa9";
        for line in TRICKY {
            let line = line.as_bytes();
            for _ in 0..2000 {
                let mut m = line.to_vec();
                for _ in 0..1 + (rng % 3) {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let at = (rng % m.len() as u64) as usize;
                    let b = alphabet[((rng >> 32) % alphabet.len() as u64) as usize];
                    match (rng >> 8) % 3 {
                        0 => m[at] = b,
                        1 => {
                            m.remove(at);
                        }
                        _ => m.insert(at, b),
                    }
                }
                agrees(&m);
            }
        }
    }

    #[test]
    fn string_stop_finds_the_first_quote_backslash_or_control_byte() {
        for len in 0..20 {
            for at in 0..=len {
                for stop in [b'"', b'\\', 0, 0x1f] {
                    // Bytes around the stops that must not stop the scan.
                    let mut v: Vec<u8> = (0..len)
                        .map(|i| [b'a', 0x20, 0x7f, 0xc3, 0xff][i % 5])
                        .collect();
                    if at < len {
                        v[at] = stop;
                        v.extend_from_slice(b"\"\\\x01");
                    }
                    for from in 0..=at.min(v.len()) {
                        assert_eq!(string_stop(&v, from), at, "{v:?} from {from}");
                    }
                }
            }
        }
    }

    #[test]
    fn chunks_carry_every_change_in_order_with_its_own_value() {
        let mut input = String::new();
        let mut expected = Vec::new();
        for i in 0..10_000 {
            let line = match i % 7 {
                0 => format!(r#"{{"op":"put","key":"k{i}","value": {{"spaced": {i}}}}}"#),
                1 => format!(r#"{{"op":"del","key":"k{}"}}"#, i - 1),
                2 => String::new(),
                _ => format!(
                    r#"{{"op":"put","key":"k{i}","value":{{"n":{i},"s":"{}"}}}}"#,
                    "x".repeat(i % 50)
                ),
            };
            if let Ok(Parsed::Change(c)) = parse_line(line.as_bytes()) {
                expected.push(c);
            }
            input.push_str(&line);
            input.push('\n');
        }
        let (tx, mut rx) = mpsc::channel(1024);
        let reader: Box<dyn Read> = Box::new(std::io::Cursor::new(input.into_bytes()));
        parse_lines(BufReader::with_capacity(4096, reader), MAX_LINE_BYTES, &tx);
        drop(tx);
        let mut got = Vec::new();
        let mut chunks = 0;
        while let Some(item) = rx.blocking_recv() {
            match item {
                Item::Changes { changes, .. } => {
                    chunks += 1;
                    got.extend(changes);
                }
                Item::End { line } => assert_eq!(line, 10_000),
                _ => panic!("unexpected item"),
            }
        }
        assert!(chunks > 2, "{chunks} chunks");
        assert_eq!(got, expected);
    }

    #[test]
    fn a_line_over_the_cap_is_refused_by_number_after_the_lines_before_it() {
        let line = r#"{"op":"put","key":"a","value":1}"#;
        let input = format!("{line}\n{line}\n{}\n{line}\n", "x".repeat(100));
        let (tx, mut rx) = mpsc::channel(16);
        let reader: Box<dyn Read> = Box::new(std::io::Cursor::new(input.into_bytes()));
        parse_lines(BufReader::with_capacity(16, reader), line.len() as u64, &tx);
        drop(tx);
        let mut got = 0;
        let mut bad = None;
        while let Some(item) = rx.blocking_recv() {
            match item {
                Item::Changes { changes, .. } => got += changes.len(),
                Item::Bad { line, reason } => bad = Some((line, reason)),
                _ => panic!("unexpected item"),
            }
        }
        assert_eq!(got, 2);
        let (line, reason) = bad.expect("the long line is refused");
        assert_eq!(line, 3);
        assert!(reason.contains("longer than 32 bytes"), "{reason}");
    }

    #[test]
    fn the_fast_path_takes_the_common_lines() {
        for line in [
            r#"{"op":"put","key":"key-00000001","value":{"n":1,"p":"9e3779.."}}"#,
            r#"{"op":"put","key":"k","value":{"x":[1,2],"s":"a b","e":"\"q\""}}"#,
            r#"{"op":"put","key":"k","value":-12.5e-3}"#,
            r#"{"op":"del","key":"k"}"#,
        ] {
            assert!(parse_plain(line.as_bytes()).is_some(), "{line}");
        }
    }

    #[test]
    fn every_bad_line_kind_is_named() {
        assert!(
            error("{\"op\":").starts_with("invalid JSON"),
            "{}",
            error("{\"op\":")
        );
        assert!(error("not json").starts_with("invalid JSON"));
        assert_eq!(error("[1]"), "expected a JSON object, got an array");
        assert!(error(r#"{"op":"upsert","key":"a"}"#).contains("unknown op \"upsert\""));
        assert_eq!(error(r#"{"op":"put","value":1}"#), "missing `key`");
        assert_eq!(
            error(r#"{"op":"put","key":1,"value":1}"#),
            "`key` must be a string, got a number"
        );
        assert_eq!(
            error(r#"{"op":5,"key":"a"}"#),
            "`op` must be a string, got a number"
        );
        assert!(error(r#"{"op":"put","key":"a"}"#).contains("missing `value`"));
        assert!(error(r#"{"key":"a"}"#).contains("missing `op`"));
        assert!(
            error(&format!(r#"{{"op":"del","key":"{}"}}"#, "k".repeat(1025)))
                .contains("key is 1025 bytes")
        );
        let big = format!(
            r#"{{"op":"put","key":"a","value":"{}"}}"#,
            "v".repeat(512 * 1024)
        );
        assert!(
            error(&big).contains("value of 524290 bytes"),
            "{}",
            error(&big)
        );
        assert_eq!(
            error(r#"{"txn":[]}"#),
            "empty txn: a transaction needs at least one change"
        );
        assert_eq!(
            error(r#"{"txn":{}}"#),
            "`txn` must be an array, got an object"
        );
        assert!(error(
            r#"{"txn":[{"op":"put","key":"a","value":1},{"op":"put","key":2,"value":1}]}"#
        )
        .starts_with("txn item 2: `key` must be a string"));
        assert!(error(r#"{"op":"put","key":"a","vlaue":1}"#).contains("unknown field `vlaue`"));
    }
}
