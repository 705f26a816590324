//! NDJSON ingestion: parses change lines from a file or stdin and hands them to the producer,
//! stopping at the first bad line with an error naming it.
//!
//! Talks to its input (a blocking reader on its own thread, so parsing runs beside the
//! engine; an async reader, e.g. an HTTP body, is bridged onto that thread) and to a
//! [`Producer`].
//!
//! The line format, its reader and its writer are `deltasync_core::ndjson`'s (shared with the
//! consumer's `replay`); this module only drives it: reads a file or stdin in chunks,
//! parses them on a thread of their own and hands them over in batches.
//!
//! ## Invariants
//!
//! - At the first bad line ingestion stops: every line before it is published and
//!   acknowledged, nothing of the bad line (a whole transaction) or after it is.
//! - Plain put/del lines are batched freely into envelopes; a `txn` line is one atomic
//!   transaction. A transaction the pipeline cannot publish whole (more parts than a replica
//!   buffers, more than the stream's retention keeps after a snapshot) is a bad line.
//! - A line longer than [`max_line_bytes`] is a bad line; it is never read into memory whole.
//! - With receipts asked for ([`ingest_with`]), every piece is committed as an atomic
//!   transaction and its receipt is handed over once it is acknowledged, in input order: a
//!   `txn` line is one; consecutive plain lines read together (a chunk of up to 4096 lines,
//!   fewer when the input pauses, split further only when the pipeline cannot publish them
//!   as one transaction) are another.

use crate::error::ProducerError;
use crate::handoff::CommitReceipt;
use crate::producer::{PendingCommit, Producer};
use bytes::Bytes;
pub use deltasync_core::ndjson::{parse_line, Parsed};
use deltasync_core::ndjson::{parse_plain, Plain};
use deltasync_core::Position;
use deltasync_core::{Change, Key};
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::io::AsyncRead;
use tokio::sync::mpsc;
use tokio_util::io::SyncIoBridge;
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
    /// Any async reader (an HTTP request body), read on the parsing thread through a bridge
    /// to the runtime that was current when [`ingest`] started.
    Async(Box<dyn AsyncRead + Send + Unpin>),
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
            Input::Reader(_) | Input::Async(_) => "input".into(),
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
        /// What the lines before it became (all durable).
        committed: Box<IngestReport>,
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
        /// What the lines before the failure became (all durable).
        committed: Box<IngestReport>,
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
    /// The first envelope sequence the ingestion could have published: one past the
    /// producer's head when it started. Envelopes `first_seq..=position.seq` hold its changes
    /// (and those of other callers of the same producer, if any, in between).
    pub first_seq: u64,
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

/// A piece of the input committed as one transaction ([`ingest_with`] with receipts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinesReceipt {
    /// Its first line (1-based; blank lines before it included).
    pub first_line: u64,
    /// Its last line.
    pub last_line: u64,
    /// What the transaction became, once acknowledged.
    pub receipt: CommitReceipt,
}

/// Reads `input` to its end (or to `cancel`) and publishes it through `producer`; returns
/// once every envelope is acknowledged.
pub async fn ingest(
    producer: &Producer,
    input: Input,
    cancel: CancellationToken,
) -> Result<IngestReport, IngestError> {
    ingest_with(producer, input, cancel, None).await
}

/// [`ingest`], and with `receipts`, every piece of the input committed as one transaction
/// whose receipt is sent there once acknowledged, in input order (see the module's
/// invariants); all are sent before this returns.
pub async fn ingest_with(
    producer: &Producer,
    input: Input,
    cancel: CancellationToken,
    receipts: Option<mpsc::UnboundedSender<LinesReceipt>>,
) -> Result<IngestReport, IngestError> {
    let started = Instant::now();
    let first_seq = producer.status().produced_seq + 1;
    let name = input.name();
    let max_line = max_line_bytes(producer.settings());
    let input = match input {
        Input::Async(r) => Input::Reader(Box::new(SyncIoBridge::new(r))),
        other => other,
    };
    // Receipts are awaited in order beside the reading, so commits stay pipelined.
    let waiter = receipts.map(|out| {
        let (tx, rx) = mpsc::unbounded_channel::<(PendingCommit, u64, u64)>();
        (tx, tokio::spawn(forward_receipts(rx, out)))
    });
    // Two chunks read ahead keep the engine fed (it is the slower side); every chunk queued
    // holds its keys, values and changes (~0.8 MB at 4,096 lines of 100-byte values), and
    // their memory stays with this thread's allocator arena once freed.
    let (tx, mut rx) = mpsc::channel::<Item>(2);
    // A plain thread, not the blocking pool: on cancellation it may sit in a read of stdin
    // forever, and nothing waits for it (the runtime would wait for a blocking-pool task).
    std::thread::Builder::new()
        .name("deltasync-ingest".into())
        .spawn(move || parse_input(input, max_line, &tx))
        .map_err(|e| ProducerError::Internal(format!("cannot start the ingest thread: {e}")))?;
    let (mut lines, mut changes, mut transactions) = (0u64, 0u64, 0u64);
    let mut cancelled = false;
    let mut failure = None;
    let pending = waiter.as_ref().map(|(tx, _)| tx);
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
                let first = lines + 1;
                lines = line;
                match pending {
                    Some(p) => commit_chunk(producer, chunk, p, first, line).await?,
                    None => producer.submit_many(chunk).await?,
                }
            }
            Some(Item::Txn { changes: txn, line }) => {
                changes += txn.len() as u64;
                transactions += 1;
                let first = lines + 1;
                lines = line;
                // Not awaited one by one: the final flush covers it. A transaction that cannot
                // be published whole is refused here, before anything of it is handed over.
                match producer.submit_transaction(txn).await {
                    Ok(commit) => {
                        if let Some(p) = pending {
                            let _ = p.send((commit, first, line));
                        }
                    }
                    Err(
                        e @ (ProducerError::TransactionTooLarge { .. }
                        | ProducerError::TransactionBeyondRetention { .. }),
                    ) => {
                        failure = Some(Failure::BadLine {
                            line,
                            reason: e.to_string(),
                        });
                        lines = line - 1;
                        transactions -= 1;
                        changes -= txn_len(&e);
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
                failure = Some(Failure::BadLine { line, reason });
                lines = line - 1;
                break;
            }
            Some(Item::ReadFailed { line, source }) => {
                failure = Some(Failure::Read { line, source });
                lines = line;
                break;
            }
        }
    }
    // Closing the channel stops the parser at its next chunk.
    drop(rx);
    let position = producer.flush().await?;
    if let Some((tx, task)) = waiter {
        drop(tx);
        task.await
            .map_err(|e| ProducerError::Internal(format!("ingest receipts task: {e}")))??;
    }
    let report = IngestReport {
        lines,
        changes,
        transactions,
        first_seq,
        elapsed: started.elapsed(),
        position,
        cancelled,
    };
    match failure {
        None => {}
        Some(Failure::BadLine { line, reason }) => {
            return Err(IngestError::BadLine {
                input: name,
                line,
                reason,
                committed: Box::new(report),
            })
        }
        Some(Failure::Read { line, source }) => {
            return Err(IngestError::Read {
                input: name,
                line,
                source,
                committed: Box::new(report),
            })
        }
    }
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

/// Why the loop stopped short, before the report of what was committed is known.
enum Failure {
    BadLine { line: u64, reason: String },
    Read { line: u64, source: std::io::Error },
}

/// Changes of a transaction refused whole (to take them off the count).
fn txn_len(e: &ProducerError) -> u64 {
    match e {
        ProducerError::TransactionTooLarge { changes, .. }
        | ProducerError::TransactionBeyondRetention { changes, .. } => *changes as u64,
        _ => 0,
    }
}

/// Commits plain lines read together as one transaction (receipts mode); halves a piece the
/// pipeline cannot publish as one transaction until each fits (one change always does).
async fn commit_chunk(
    producer: &Producer,
    chunk: Vec<Change>,
    pending: &mpsc::UnboundedSender<(PendingCommit, u64, u64)>,
    first_line: u64,
    last_line: u64,
) -> Result<(), ProducerError> {
    let mut todo = vec![chunk];
    while let Some(mut piece) = todo.pop() {
        if piece.len() <= 1 || crate::engine::check_transaction(producer.settings(), &piece).is_ok()
        {
            let commit = producer.submit_transaction(piece).await?;
            let _ = pending.send((commit, first_line, last_line));
            continue;
        }
        let rest = piece.split_off(piece.len() / 2);
        // The second half is committed after the first.
        todo.push(rest);
        todo.push(piece);
    }
    Ok(())
}

/// Awaits the commits in order and sends their receipts on.
async fn forward_receipts(
    mut rx: mpsc::UnboundedReceiver<(PendingCommit, u64, u64)>,
    out: mpsc::UnboundedSender<LinesReceipt>,
) -> Result<(), ProducerError> {
    while let Some((commit, first_line, last_line)) = rx.recv().await {
        let receipt = commit.wait().await?;
        let _ = out.send(LinesReceipt {
            first_line,
            last_line,
            receipt,
        });
    }
    Ok(())
}

/// The parsing thread: reads lines and sends chunks until the input ends, a line is bad,
/// or the receiver is gone.
fn parse_input(input: Input, max_line: u64, tx: &mpsc::Sender<Item>) {
    // A file or stdin (the command line's inputs) gets a progress bar on a terminal.
    let mut bar = None;
    let reader: Box<dyn Read> = match input {
        Input::Stdin => {
            let b = deltasync_config::progress::bytes_bar("ingesting stdin", None);
            let r = Box::new(b.wrap_read(std::io::stdin().lock()));
            bar = Some(b);
            r
        }
        Input::File(path) => match std::fs::File::open(&path) {
            Ok(f) => {
                let len = f.metadata().ok().map(|m| m.len());
                let b = deltasync_config::progress::bytes_bar(
                    &format!("ingesting {}", path.display()),
                    len,
                );
                let r = Box::new(b.wrap_read(f));
                bar = Some(b);
                r
            }
            Err(source) => {
                let _ = tx.blocking_send(Item::ReadFailed { line: 0, source });
                return;
            }
        },
        Input::Reader(r) => r,
        // Bridged in `ingest_with` before the thread starts (a bridge needs the runtime).
        Input::Async(_) => {
            let source = std::io::Error::other("an async input reached the parsing thread");
            let _ = tx.blocking_send(Item::ReadFailed { line: 0, source });
            return;
        }
    };
    parse_lines(BufReader::with_capacity(1 << 20, reader), max_line, tx);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
}
