//! The replica's local store: what a durable replica comes back from after a restart. The
//! replica lives in memory (the follower's `State`); the data directory holds a local snapshot
//! and an append-only log of what was applied after it (Redis's RDB + AOF, Kafka Streams'
//! checkpoint + changelog) — or nothing at all (`--ephemeral`).
//!
//! Synchronous: the engine calls it on blocking threads, and the local snapshot is written by a
//! thread of its own from a copy-on-write clone of the state. Talks to the file system only.
//!
//! ```text
//! <data-dir>/
//!  ├─ LOCK                  locked by the one process that has the directory open
//!  ├─ replica.snap          the local snapshot: the entries at a position, generation g
//!  ├─ replica.snap.tmp      a local snapshot being written (removed at open)
//!  └─ log.<generation>      20 digits; generations ≥ g follow the snapshot, in order:
//!                           one COMMIT record (changes + the position after them) per commit
//! ```
//!
//! The records are [`format`]'s. A commit appends one record — streamed through a small
//! buffer, its frame's length and checksum written last over zeros — and `fdatasync`s the log:
//! one sync per group of envelopes the engine commits together (`consumer.commit_interval`,
//! `consumer.commit_every_envelopes`). Once the logs since the last local snapshot hold
//! `consumer.local_snapshot_log_bytes` and twice the replica's size (the last snapshot's, or
//! the entries times the mean change record when that is larger), the next commit starts a
//! new log generation and a new local snapshot of the state at that commit; when it is renamed
//! into place the logs it covers are deleted. A replica so written costs about its applied bytes
//! once in the log plus at most half of that again in snapshots.
//!
//! ## Invariants
//!
//! - [`LocalStore::commit`] returns once its record is on disk (written and synced): only then
//!   does the engine acknowledge the position to the server or show it to readers.
//! - The replica is the local snapshot (or nothing) plus every COMMIT record of the logs of its
//!   generation and later, in order. Each record names the position after it, digest included,
//!   and [`LocalStore::load`] checks the state's digest after every record: a record that does
//!   not follow what precedes it, or entries changed on disk, are caught, never used as valid.
//! - A record cut short by a crash (or damaged) ends its log: it is not applied, and nothing is
//!   ever appended after it (each open writes to a new generation). The replica then resumes
//!   from the last whole record, which is never later than what the engine acknowledged.
//! - A commit whose write fails may leave part of its record, which then ends the log: the
//!   store refuses every later commit of the process (until a `replace` starts a new log), so
//!   nothing is acknowledged that would sit unread after it.
//! - A local snapshot is written to `replica.snap.tmp`, synced, renamed into place and the
//!   directory synced before the logs it covers are deleted: a crash at any point leaves the
//!   old snapshot with every log, or the new one (stale logs are deleted at the next open).
//! - One process at a time: `LOCK` is held while the store is open (a second open fails).
//! - A data directory belongs to one pipeline: every header names it; opening it for another
//!   is refused.

pub mod format;

use crate::follower::ChangeBatch;
use deltasync_core::state::PreparedBuilder;
use deltasync_core::{Change, Digest, HashedChanges, Lineage, Position, Prepared, State};
use format::{Bad, Header, Records};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

/// The local snapshot's file name inside the data directory.
pub const SNAPSHOT_FILE: &str = "replica.snap";
const SNAPSHOT_TMP: &str = "replica.snap.tmp";
const LOCK_FILE: &str = "LOCK";
const LOG_PREFIX: &str = "log.";
/// The file of the B-tree store this one replaced; ignored (a re-snapshot follows) and named
/// in a warning.
const OLD_REDB_FILE: &str = "replica.redb";
/// Entries per `ENTRIES` record of a local snapshot are cut at about this many bytes.
const SNAPSHOT_BLOCK: usize = 1 << 20;
/// A commit record is written in pieces of about this many bytes (see
/// [`format::commit_chunked`]): small enough to stay in the cache between encoding and copying
/// into the page cache.
const COMMIT_CHUNK: usize = 256 << 10;
/// `consumer.local_snapshot_log_bytes`'s default, for callers without settings.
pub const DEFAULT_SNAPSHOT_LOG_BYTES: u64 = 64 << 20;

/// Why the local store failed. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot create data directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data directory {path} is in use by another process (its LOCK is held)")]
    Locked { path: PathBuf },
    #[error("reading replica {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing replica {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("replica {path} has an unreadable header: {reason}")]
    BadHeader { path: PathBuf, reason: String },
    #[error(
        "replica {path} belongs to pipeline {found:?}, not {expected:?}; use another data \
         directory"
    )]
    OtherPipeline {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("the replica writer stopped: {0}")]
    Writer(String),
}

/// A replica read back from disk.
#[derive(Debug)]
pub struct LoadedReplica {
    /// The entries, positioned at the cursor.
    pub state: State,
    /// What the files say the entries are.
    pub cursor: Position,
    /// The digest of the entries as loaded; differs from `cursor.digest` when the files were
    /// changed behind the replica's back.
    pub computed: Digest,
    /// Why the local snapshot could not be read (then `state` is empty and `cursor` the
    /// default).
    pub cursor_error: Option<String>,
}

impl LoadedReplica {
    /// Whether the entries match the stored digest (and the snapshot was readable).
    pub fn intact(&self) -> bool {
        self.cursor_error.is_none() && self.computed == self.cursor.digest
    }
}

/// Where the replica lives.
#[derive(Clone, Debug)]
pub enum LocalStore {
    /// Nowhere: every start bootstraps from a snapshot.
    Memory,
    /// A local snapshot and a log in a data directory.
    Durable(Arc<Journal>),
}

/// An open data directory: the log being appended and the local snapshot being written.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    pipeline: String,
    snapshot_log_bytes: u64,
    writer: Mutex<Writer>,
    /// Held for as long as the directory is open.
    _lock: File,
}

#[derive(Debug)]
struct Writer {
    /// The log appended to.
    log: File,
    generation: u64,
    /// Bytes appended to logs since the last local snapshot started.
    log_bytes: u64,
    /// The size of the newest local snapshot.
    snapshot_bytes: u64,
    /// Bytes and changes this process appended to logs: the mean size of a change record,
    /// which estimates what a snapshot of the replica would take when there is none yet.
    appended_bytes: u64,
    appended_changes: u64,
    /// Bytes this store has written (logs and snapshots).
    written: u64,
    /// A local snapshot being written in the background: its generation and thread.
    snapshot: Option<(u64, JoinHandle<Result<u64, LocalError>>)>,
    buf: Vec<u8>,
    /// Why a commit's write failed: its record may be partly on disk, ending the log, and a
    /// record appended after it would never be read. Later commits are refused (the engine
    /// stops at a failed commit; this keeps its commit at exit from claiming a position no
    /// restart would find). A `replace` starts a new log generation and clears it.
    failed: Option<String>,
    /// Tests: the next commit's write fails after this many bytes of its record.
    #[cfg(test)]
    fail_after: Option<usize>,
}

impl LocalStore {
    /// Opens (creating if needed) the data directory `dir` for `pipeline`, with the default
    /// local-snapshot threshold.
    pub fn open_durable(dir: &Path, pipeline: &str) -> Result<LocalStore, LocalError> {
        Self::open_durable_with(dir, pipeline, DEFAULT_SNAPSHOT_LOG_BYTES)
    }

    /// Opens (creating if needed) the data directory `dir` for `pipeline`: takes its lock,
    /// checks every header names `pipeline`, removes what a crash left behind (a partial
    /// snapshot, logs a snapshot covers) and starts a new log generation. A new local
    /// snapshot is written once the logs hold `snapshot_log_bytes` (and twice the last one).
    pub fn open_durable_with(
        dir: &Path,
        pipeline: &str,
        snapshot_log_bytes: u64,
    ) -> Result<LocalStore, LocalError> {
        std::fs::create_dir_all(dir).map_err(|source| LocalError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| LocalError::Write {
                path: lock_path.clone(),
                source,
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(LocalError::Locked {
                    path: dir.to_path_buf(),
                })
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(LocalError::Write {
                    path: lock_path,
                    source,
                })
            }
        }
        if dir.join(OLD_REDB_FILE).exists() {
            tracing::warn!(
                file = %dir.join(OLD_REDB_FILE).display(),
                "A replica in the old B-tree format is ignored (the replica is loaded from a \
                 snapshot instead); delete the file"
            );
        }
        remove_if_exists(&dir.join(SNAPSHOT_TMP))?;
        let files = Files::scan(dir)?;
        let snapshot_generation = match &files.snapshot {
            Some(path) => {
                let h = read_snapshot_header(path)?;
                check_pipeline(path, &h.pipeline, pipeline)?;
                h.generation
            }
            None => 0,
        };
        let mut log_bytes = 0;
        for (generation, path) in &files.logs {
            if *generation < snapshot_generation {
                remove_if_exists(path)?; // covered by the snapshot; a crash left it
                continue;
            }
            if let Some(h) = read_log_header(path)? {
                check_pipeline(path, &h.pipeline, pipeline)?;
            }
            log_bytes += file_len(path)?;
        }
        let generation = files.logs.last().map_or(snapshot_generation, |(g, _)| {
            (g + 1).max(snapshot_generation)
        });
        let mut written = 0;
        let log = create_log(dir, generation, pipeline, &mut written)?;
        let snapshot_bytes = match &files.snapshot {
            Some(path) => file_len(path)?,
            None => 0,
        };
        Ok(LocalStore::Durable(Arc::new(Journal {
            dir: dir.to_path_buf(),
            pipeline: pipeline.to_owned(),
            snapshot_log_bytes,
            writer: Mutex::new(Writer {
                log,
                generation,
                log_bytes,
                snapshot_bytes,
                appended_bytes: 0,
                appended_changes: 0,
                written,
                snapshot: None,
                buf: Vec::new(),
                failed: None,
                #[cfg(test)]
                fail_after: None,
            }),
            _lock: lock,
        })))
    }

    /// Whether commits reach a disk.
    pub fn is_durable(&self) -> bool {
        matches!(self, LocalStore::Durable(_))
    }

    /// Reads the replica back: the local snapshot, then every log after it, checking the
    /// digest after each record. `None` when there is none (a new data directory, or memory).
    pub fn load(&self) -> Result<Option<LoadedReplica>, LocalError> {
        match self {
            LocalStore::Memory => Ok(None),
            LocalStore::Durable(j) => read_replica(&j.dir, Some(&j.pipeline)),
        }
    }

    /// Whether the next commit should carry a clone of the state (which holds `entries`
    /// keys) for a new local snapshot: no snapshot is being written, and the logs since the
    /// last one hold `consumer.local_snapshot_log_bytes` and twice the replica's size — the
    /// last local snapshot's, or, when larger or when there is none, `entries` times the mean
    /// change record. So a snapshot costs at most half the bytes applied, and a replica caught
    /// up from an empty start is not snapshotted half-way through its backlog.
    pub fn wants_snapshot(&self, entries: usize) -> bool {
        let LocalStore::Durable(j) = self else {
            return false;
        };
        let w = j.lock();
        let estimate = (entries as u64)
            .saturating_mul(w.appended_bytes)
            .checked_div(w.appended_changes)
            .unwrap_or(0);
        let replica = w.snapshot_bytes.max(estimate);
        w.snapshot.as_ref().is_none_or(|(_, h)| h.is_finished())
            && w.log_bytes >= j.snapshot_log_bytes.max(replica.saturating_mul(2))
    }

    /// Appends the changes of `batches` (in order) and `cursor` as one record and returns once
    /// it is on disk. With `snapshot` (the state at `cursor`, which [`Self::wants_snapshot`]
    /// asked for), then starts a new log generation and writes a local snapshot of it in the
    /// background. A no-op in memory.
    pub fn commit(
        &self,
        batches: &[Arc<ChangeBatch>],
        cursor: &Position,
        snapshot: Option<State>,
    ) -> Result<(), LocalError> {
        let LocalStore::Durable(j) = self else {
            return Ok(());
        };
        let mut w = j.lock();
        let path = j.log_path(w.generation);
        if let Some(why) = &w.failed {
            return Err(LocalError::Writer(format!(
                "an earlier commit to {} failed ({why}); nothing more is committed by this \
                 process, a restart resumes from the last whole commit",
                path.display()
            )));
        }
        let count = batches.iter().map(|b| b.changes.len()).sum();
        let mut buf = std::mem::take(&mut w.buf);
        #[cfg(test)]
        let mut fail_after = w.fail_after.take();
        // The record is streamed through a small buffer; its frame's length and checksum are
        // written over their place once known, and the whole synced after.
        let log = &mut w.log;
        let written: std::io::Result<u64> = (|| {
            let start = log.stream_position()?;
            let head = format::commit_chunked(
                &mut buf,
                COMMIT_CHUNK,
                cursor,
                count,
                batches.iter().flat_map(|b| b.changes.iter()),
                |piece| {
                    #[cfg(test)]
                    if let Some(left) = &mut fail_after {
                        if piece.len() > *left {
                            log.write_all(&piece[..*left])?;
                            return Err(std::io::Error::other("injected write failure"));
                        }
                        *left -= piece.len();
                    }
                    log.write_all(piece)
                },
            )?;
            let end = log.stream_position()?;
            log.seek(SeekFrom::Start(start))?;
            log.write_all(&head)?;
            log.seek(SeekFrom::Start(end))?;
            log.sync_data()?;
            Ok(end - start)
        })();
        let len = match written {
            Ok(len) => len,
            Err(source) => {
                w.failed = Some(source.to_string());
                return Err(LocalError::Write { path, source });
            }
        };
        w.log_bytes += len;
        w.written += len;
        w.appended_bytes += len;
        w.appended_changes += count as u64;
        // Keep a buffer of a usual size (a change larger than a chunk may have grown it).
        if buf.capacity() <= 4 * COMMIT_CHUNK {
            w.buf = buf;
        }
        j.reap(&mut w);
        if let Some(state) = snapshot {
            if w.snapshot.is_none() {
                j.start_snapshot(&mut w, state, *cursor)?;
            }
        }
        Ok(())
    }

    /// Replaces the replica with `state` at `cursor` (a bootstrap or a re-snapshot): writes it
    /// as the local snapshot, synchronously, and drops every log before it. Returns once it is
    /// on disk. A no-op in memory.
    pub fn replace(&self, state: &State, cursor: &Position) -> Result<(), LocalError> {
        let LocalStore::Durable(j) = self else {
            return Ok(());
        };
        let mut w = j.lock();
        if let Some((_, handle)) = w.snapshot.take() {
            // A snapshot of the state being replaced: let it finish, its result no longer
            // matters (it covers fewer logs than this one).
            let _ = handle.join();
        }
        let generation = j.rotate(&mut w)?;
        let written = write_snapshot(&j.dir, &j.pipeline, state, cursor, generation)?;
        w.written += written;
        w.snapshot_bytes = written;
        w.log_bytes = 0;
        // The replica is now this snapshot with a fresh log: a failed record before it is
        // behind it.
        w.failed = None;
        remove_logs_before(&j.dir, generation)?;
        Ok(())
    }

    /// Bytes written to the data directory since it was opened (logs and local snapshots).
    pub fn written_bytes(&self) -> u64 {
        match self {
            LocalStore::Memory => 0,
            LocalStore::Durable(j) => j.lock().written,
        }
    }

    /// The data directory, for messages.
    pub fn describe(&self) -> String {
        match self {
            LocalStore::Memory => "memory".to_owned(),
            LocalStore::Durable(j) => j.dir.display().to_string(),
        }
    }
}

impl Journal {
    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        // A panic while holding the lock leaves the writer as it was: files are the truth.
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn log_path(&self, generation: u64) -> PathBuf {
        log_path(&self.dir, generation)
    }

    /// Starts the next log generation and returns it; the current log is complete.
    fn rotate(&self, w: &mut Writer) -> Result<u64, LocalError> {
        let generation = w.generation + 1;
        w.log = create_log(&self.dir, generation, &self.pipeline, &mut w.written)?;
        w.generation = generation;
        Ok(generation)
    }

    /// Rotates the log and writes `state` (at `cursor`) as the snapshot of the new
    /// generation on a thread of its own.
    fn start_snapshot(
        &self,
        w: &mut Writer,
        state: State,
        cursor: Position,
    ) -> Result<(), LocalError> {
        let generation = self.rotate(w)?;
        w.log_bytes = 0;
        let (dir, pipeline) = (self.dir.clone(), self.pipeline.clone());
        let handle = std::thread::Builder::new()
            .name("local-snapshot".into())
            .spawn(move || {
                let bytes = write_snapshot(&dir, &pipeline, &state, &cursor, generation)?;
                drop(state);
                remove_logs_before(&dir, generation)?;
                Ok(bytes)
            })
            .map_err(|e| LocalError::Writer(format!("cannot start the snapshot thread: {e}")))?;
        w.snapshot = Some((generation, handle));
        Ok(())
    }

    /// Collects a finished background snapshot. A failed one is logged, not fatal: the logs
    /// it would have replaced are all still there, and the next commit past the threshold
    /// tries again.
    fn reap(&self, w: &mut Writer) {
        if !w.snapshot.as_ref().is_some_and(|(_, h)| h.is_finished()) {
            return;
        }
        let Some((generation, handle)) = w.snapshot.take() else {
            return;
        };
        match handle.join() {
            Ok(Ok(bytes)) => {
                w.snapshot_bytes = bytes;
                w.written += bytes;
                tracing::debug!(generation, bytes, dir = %self.dir.display(), "Local snapshot written");
            }
            Ok(Err(e)) => {
                tracing::warn!(generation, error = %e, "Writing the local snapshot failed; the log is kept and it will be tried again");
            }
            Err(_) => {
                tracing::error!(
                    generation,
                    "The local snapshot thread panicked; the log is kept"
                );
            }
        }
    }
}

impl Drop for Journal {
    /// Waits for a local snapshot being written, so that no thread changes the directory
    /// after its lock is released.
    fn drop(&mut self) {
        let w = self.writer.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some((_, handle)) = w.snapshot.take() {
            let _ = handle.join();
        }
    }
}

// ------------------------------------------------------------------------------- files

/// What a data directory holds.
struct Files {
    snapshot: Option<PathBuf>,
    /// Logs by generation, ascending.
    logs: Vec<(u64, PathBuf)>,
}

impl Files {
    fn scan(dir: &Path) -> Result<Files, LocalError> {
        let rerr = |source| LocalError::Read {
            path: dir.to_path_buf(),
            source,
        };
        let mut logs = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(rerr)? {
            let entry = entry.map_err(rerr)?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(g) = name.strip_prefix(LOG_PREFIX) {
                if let Ok(g) = g.parse::<u64>() {
                    logs.push((g, entry.path()));
                }
            }
        }
        logs.sort();
        let snapshot = dir.join(SNAPSHOT_FILE);
        Ok(Files {
            snapshot: snapshot.exists().then_some(snapshot),
            logs,
        })
    }
}

fn log_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("{LOG_PREFIX}{generation:020}"))
}

fn file_len(path: &Path) -> Result<u64, LocalError> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|source| LocalError::Read {
            path: path.to_path_buf(),
            source,
        })
}

fn remove_if_exists(path: &Path) -> Result<(), LocalError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(LocalError::Write {
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Syncs the directory itself, so that a file created, renamed or removed in it stays so.
fn sync_dir(dir: &Path) -> Result<(), LocalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| LocalError::Write {
            path: dir.to_path_buf(),
            source,
        })
}

fn check_pipeline(path: &Path, found: &str, expected: &str) -> Result<(), LocalError> {
    if found == expected {
        Ok(())
    } else {
        Err(LocalError::OtherPipeline {
            path: path.to_path_buf(),
            found: found.to_owned(),
            expected: expected.to_owned(),
        })
    }
}

/// Creates log `generation` holding only its header, synced with its directory entry.
fn create_log(
    dir: &Path,
    generation: u64,
    pipeline: &str,
    written: &mut u64,
) -> Result<File, LocalError> {
    let path = log_path(dir, generation);
    let werr = |source| LocalError::Write {
        path: path.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .map_err(werr)?;
    let mut buf = Vec::new();
    format::header(
        &mut buf,
        &Header {
            generation,
            pipeline: pipeline.to_owned(),
            position: None,
        },
    );
    file.write_all(&buf).map_err(werr)?;
    file.sync_all().map_err(werr)?;
    sync_dir(dir)?;
    *written += buf.len() as u64;
    Ok(file)
}

/// Removes every log before `generation` (a snapshot of that generation is in place).
fn remove_logs_before(dir: &Path, generation: u64) -> Result<(), LocalError> {
    for (g, path) in Files::scan(dir)?.logs {
        if g < generation {
            remove_if_exists(&path)?;
        }
    }
    sync_dir(dir)
}

/// Writes `state` at `cursor` as the local snapshot of `generation`: to a temporary file,
/// synced, renamed into place, directory synced. Returns the bytes written.
fn write_snapshot(
    dir: &Path,
    pipeline: &str,
    state: &State,
    cursor: &Position,
    generation: u64,
) -> Result<u64, LocalError> {
    let tmp = dir.join(SNAPSHOT_TMP);
    let werr = |source| LocalError::Write {
        path: tmp.clone(),
        source,
    };
    let mut file = File::create(&tmp).map_err(werr)?;
    let mut buf = Vec::with_capacity(SNAPSHOT_BLOCK + (64 << 10));
    format::header(
        &mut buf,
        &Header {
            generation,
            pipeline: pipeline.to_owned(),
            position: Some(*cursor),
        },
    );
    let mut total = 0u64;
    let mut entries = 0u64;
    let mut it = state.iter().peekable();
    while it.peek().is_some() {
        format::frame(&mut buf, format::ENTRIES, |p| {
            let start = p.len();
            while p.len() - start < SNAPSHOT_BLOCK {
                let Some((k, v)) = it.next() else { break };
                format::entry(p, k, v);
                entries += 1;
            }
        });
        file.write_all(&buf).map_err(werr)?;
        total += buf.len() as u64;
        buf.clear();
    }
    format::end(&mut buf, entries);
    file.write_all(&buf).map_err(werr)?;
    total += buf.len() as u64;
    file.sync_all().map_err(werr)?;
    drop(file);
    let path = dir.join(SNAPSHOT_FILE);
    std::fs::rename(&tmp, &path).map_err(|source| LocalError::Write {
        path: path.clone(),
        source,
    })?;
    sync_dir(dir)?;
    Ok(total)
}

// ------------------------------------------------------------------------------- reading

fn open_read(path: &Path) -> Result<Records<BufReader<File>>, LocalError> {
    let file = File::open(path).map_err(|source| LocalError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Records::new(BufReader::with_capacity(1 << 20, file)))
}

fn read_err(path: &Path) -> impl Fn(std::io::Error) -> LocalError + '_ {
    move |source| LocalError::Read {
        path: path.to_path_buf(),
        source,
    }
}

fn read_snapshot_header(path: &Path) -> Result<Header, LocalError> {
    let mut r = open_read(path)?;
    let bad = |reason: String| LocalError::BadHeader {
        path: path.to_path_buf(),
        reason,
    };
    match r.read().map_err(read_err(path))? {
        Ok(Some((kind, payload))) => format::read_header(kind, payload).map_err(bad),
        Ok(None) => Err(bad("the file is empty".into())),
        Err(b) => Err(bad(b.to_string())),
    }
}

/// A log's header; `None` when the log was cut short before its header was whole.
fn read_log_header(path: &Path) -> Result<Option<Header>, LocalError> {
    let mut r = open_read(path)?;
    match r.read().map_err(read_err(path))? {
        Ok(Some((kind, payload))) => {
            format::read_header(kind, payload)
                .map(Some)
                .map_err(|reason| LocalError::BadHeader {
                    path: path.to_path_buf(),
                    reason,
                })
        }
        Ok(None) | Err(Bad::Torn { .. }) => Ok(None),
        Err(b @ Bad::Damaged { .. }) => Err(LocalError::BadHeader {
            path: path.to_path_buf(),
            reason: b.to_string(),
        }),
    }
}

/// Reads a local snapshot's entries into a new state. `Ok(Err(reason))` when the file is
/// damaged (then nothing of it is usable).
fn read_snapshot(path: &Path) -> Result<Result<(Header, State), String>, LocalError> {
    let mut r = open_read(path)?;
    let header = match r.read().map_err(read_err(path))? {
        Ok(Some((kind, payload))) => match format::read_header(kind, payload) {
            Ok(h) => h,
            Err(reason) => return Ok(Err(reason)),
        },
        Ok(None) => return Ok(Err("the file is empty".into())),
        Err(b) => return Ok(Err(b.to_string())),
    };
    let Some(position) = header.position else {
        return Ok(Err("a log header where the snapshot's belongs".into()));
    };
    let mut state = State::new(position.lineage);
    // Records are read, checked, decoded and built into entries on a thread of their own
    // while this one links the entries into the state: a restart keeps both cores busy.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Prepared>(4);
    let (read, entries) = std::thread::scope(|s| {
        let reader = s.spawn(move || read_snapshot_entries(&mut r, path, &tx));
        let mut entries = 0u64;
        for mut prepared in rx {
            entries += prepared.len() as u64;
            state.put_prepared(&mut prepared);
        }
        (reader.join(), entries)
    });
    let read = match read {
        Ok(read) => read?,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    match read {
        Ok(n) if n == entries && n == state.len() as u64 => {}
        Ok(n) => {
            return Ok(Err(format!(
                "it ends saying {n} entries, {entries} were read ({} distinct)",
                state.len()
            )))
        }
        Err(reason) => return Ok(Err(reason)),
    }
    state.set_position(position.lineage, position.seq);
    Ok(Ok((header, state)))
}

/// Reads a local snapshot's `ENTRIES` records up to its `END`, sending each as prepared puts
/// to `tx`; returns the count `END` states, or why the file is damaged.
fn read_snapshot_entries(
    r: &mut Records<BufReader<File>>,
    path: &Path,
    tx: &std::sync::mpsc::SyncSender<Prepared>,
) -> Result<Result<u64, String>, LocalError> {
    loop {
        match r.read().map_err(read_err(path))? {
            Ok(Some((format::ENTRIES, payload))) => {
                // Each entry read straight from the record into its allocation.
                let mut puts = PreparedBuilder::with_capacity(0);
                if let Err(reason) = format::read_entries(payload, |k, v| puts.push(k, v)) {
                    return Ok(Err(reason));
                }
                if tx.send(puts.finish()).is_err() {
                    return Ok(Err("the snapshot's entries were no longer wanted".into()));
                }
            }
            Ok(Some((format::END, payload))) => return Ok(format::read_end(payload)),
            Ok(Some((kind, _))) => return Ok(Err(format!("record kind {kind} in a snapshot"))),
            Ok(None) => return Ok(Err("it ends before its END record".into())),
            Err(b) => return Ok(Err(b.to_string())),
        }
    }
}

/// Reads the replica in `dir` (snapshot, then logs), checking the pipeline when given.
///
/// A store writing a local snapshot meanwhile may delete the logs it covers after they were
/// listed: the read then starts again from the new listing (a few times at most).
fn read_replica(dir: &Path, pipeline: Option<&str>) -> Result<Option<LoadedReplica>, LocalError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match read_replica_once(dir, pipeline) {
            Err(LocalError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound && attempt < 5 => {}
            other => return other,
        }
    }
}

fn read_replica_once(
    dir: &Path,
    pipeline: Option<&str>,
) -> Result<Option<LoadedReplica>, LocalError> {
    let files = Files::scan(dir)?;
    let (mut state, mut cursor, generation) = match &files.snapshot {
        Some(path) => match read_snapshot(path)? {
            Ok((h, state)) => {
                if let Some(p) = pipeline {
                    check_pipeline(path, &h.pipeline, p)?;
                }
                let cursor = h.position.unwrap_or_default();
                if state.digest() != cursor.digest {
                    // Entries changed behind the replica's back: the logs cannot apply.
                    let computed = state.digest();
                    return Ok(Some(LoadedReplica {
                        state,
                        cursor,
                        computed,
                        cursor_error: None,
                    }));
                }
                (state, Some(cursor), h.generation)
            }
            Err(reason) => {
                return Ok(Some(LoadedReplica {
                    state: State::new(Lineage::default()),
                    cursor: Position::default(),
                    computed: Digest::default(),
                    cursor_error: Some(format!("{}: {reason}", path.display())),
                }))
            }
        },
        None => (State::new(Lineage::default()), None, 0),
    };
    // The logs are read, checked, decoded and hashed on a thread of their own while this one
    // applies what it decoded (decoding was a third of a replay's time on one thread, and
    // hashing the puts a part of applying them).
    let logs: Vec<(u64, PathBuf)> = files
        .logs
        .iter()
        .filter(|(g, _)| *g >= generation)
        .cloned()
        .collect();
    let mut mismatch = false;
    std::thread::scope(|scope| -> Result<(), LocalError> {
        let (tx, rx) = mpsc::sync_channel::<Piece>(2);
        let reader = std::thread::Builder::new()
            .name("deltasync-replay".into())
            .spawn_scoped(scope, move || read_logs(&logs, pipeline, &tx))
            .map_err(read_err(dir))?;
        for piece in rx.iter() {
            state.apply_hashed(&piece.changes);
            if let Some(at) = piece.end {
                state.set_position(at.lineage, at.seq);
                cursor = Some(at);
                if state.digest() != at.digest {
                    mismatch = true;
                    break;
                }
            }
        }
        // Stops the reader at its next piece.
        drop(rx);
        let read = reader
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        // After a record that does not follow, what the reader found later does not matter.
        if mismatch {
            Ok(())
        } else {
            read
        }
    })?;
    // After a mismatch, `computed` differs from the cursor's digest: the caller repairs.
    Ok(cursor.map(|cursor| LoadedReplica {
        computed: state.digest(),
        state,
        cursor,
        cursor_error: None,
    }))
}

/// Changes a log replay applies at a time: a commit record (up to millions of changes) is
/// handed over in pieces, so little decoded data waits between the reader and the applier.
const REPLAY_PIECE: usize = 16 * 1024;

/// Consecutive changes of one commit record, hashed; the last piece carries the record's
/// position.
struct Piece {
    changes: HashedChanges,
    end: Option<Position>,
}

/// Reads the commit records of `logs` (in order) and sends their changes to the applier.
/// What ends a log — its end, a record cut short or damaged, an undecodable or unexpected
/// record — moves on to the next; a file that cannot be read, or a header that is unreadable
/// or names another pipeline, is an error. Returns early, without error, once the applier
/// stops listening.
fn read_logs(
    logs: &[(u64, PathBuf)],
    pipeline: Option<&str>,
    tx: &mpsc::SyncSender<Piece>,
) -> Result<(), LocalError> {
    for (g, path) in logs {
        let mut r = open_read(path)?;
        let mut records = 0u64;
        loop {
            match r.read().map_err(read_err(path))? {
                Ok(None) => break,
                Ok(Some((format::LOG_HEADER, payload))) if records == 0 => {
                    let h = format::read_header(format::LOG_HEADER, payload).map_err(|reason| {
                        LocalError::BadHeader {
                            path: path.clone(),
                            reason,
                        }
                    })?;
                    if let Some(p) = pipeline {
                        check_pipeline(path, &h.pipeline, p)?;
                    }
                }
                Ok(Some((format::COMMIT, payload))) if records > 0 => {
                    let (at, changes) = match format::read_commit(payload) {
                        Ok(c) => c,
                        Err(reason) => {
                            tracing::warn!(log = %path.display(), at = r.offset, %reason, "An undecodable record ends the log");
                            break;
                        }
                    };
                    if !send_pieces(tx, at, changes) {
                        return Ok(());
                    }
                }
                Ok(Some((kind, _))) => {
                    tracing::warn!(log = %path.display(), generation = g, kind, "An unexpected record ends the log");
                    break;
                }
                Err(bad) => {
                    // A crash mid-append leaves this at the end of the log being written.
                    tracing::warn!(log = %path.display(), generation = g, %bad, "The log ends in an incomplete record; it is ignored");
                    break;
                }
            }
            records += 1;
        }
    }
    Ok(())
}

/// Sends one record's `changes` in pieces, the last with `at`. False once nobody listens.
fn send_pieces(tx: &mpsc::SyncSender<Piece>, at: Position, changes: Vec<Change>) -> bool {
    let mut left = changes.len();
    let mut changes = changes.into_iter();
    loop {
        let piece: Vec<Change> = changes.by_ref().take(REPLAY_PIECE).collect();
        left -= piece.len();
        let end = (left == 0).then_some(at);
        if tx
            .send(Piece {
                changes: HashedChanges::new(piece),
                end,
            })
            .is_err()
        {
            return false;
        }
        if end.is_some() {
            return true;
        }
    }
}

/// Reads only the cursor of the replica in `dir` (no NATS; the files are read, not changed).
/// `None` when the directory holds no replica or the replica has no cursor yet.
pub fn read_cursor(dir: &Path) -> Result<Option<Position>, LocalError> {
    if !dir.exists() {
        return Ok(None);
    }
    Ok(read_replica(dir, None)?.map(|r| r.cursor))
}

/// Calls `each` with every entry of the replica in `dir`, in key byte order, and returns the
/// cursor. Reads the files only: no NATS, nothing is changed.
pub fn for_each_entry(
    dir: &Path,
    mut each: impl FnMut(&str, &[u8]) -> std::io::Result<()>,
) -> Result<Option<Position>, DumpError> {
    let files = if dir.exists() {
        Files::scan(dir)?
    } else {
        Files {
            snapshot: None,
            logs: Vec::new(),
        }
    };
    if files.snapshot.is_none() && files.logs.is_empty() {
        return Err(DumpError::NoReplica {
            path: dir.to_path_buf(),
        });
    }
    let Some(loaded) = read_replica(dir, None)? else {
        return Ok(None);
    };
    if let Some(reason) = &loaded.cursor_error {
        return Err(DumpError::Damaged {
            path: dir.to_path_buf(),
            reason: reason.clone(),
        });
    }
    for (k, v) in loaded.state.sorted_entries() {
        each(k, v).map_err(DumpError::Output)?;
    }
    Ok(Some(loaded.cursor))
}

/// Why `dump` failed.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("no replica at {path} (was the consumer run with this --data-dir?)")]
    NoReplica { path: PathBuf },
    #[error("the replica in {path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error(transparent)]
    Local(#[from] LocalError),
    #[error("writing the dump: {0}")]
    Output(std::io::Error),
}

#[cfg(test)]
mod tests;
