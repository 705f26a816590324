//! Operator commands on a pipeline: `replay` (the history as re-ingestible NDJSON),
//! `rebuild` (a point-in-time replica), `verify` (digest-anchored replay of the whole
//! retained history) and `status` (stream bounds, snapshots, every consumer's position,
//! lag and headroom before retention prunes it).
//!
//! Talks to JetStream through `deltasync_nats` (`history`, `store`, and `status`: the stream's
//! bounds, its durable consumers and their headroom) and the crate's `nats` module
//! (connecting, the bounded stream reader), and to a local replica (`local`) for
//! `rebuild`.
//!
//! ## Invariants
//!
//! - `replay`, `verify` and `rebuild` read up to the stream's last sequence as it was when
//!   they started, or fail naming the sequence: a read that stalls is opened again where it
//!   stopped ([`READ_ATTEMPTS`](crate::nats::reader::READ_ATTEMPTS) times in a row, each wait
//!   bounded by `nats.request_timeout`), a missing envelope is an error, and a read ends early only when the server says nothing
//!   is stored up to the end.
//! - Only whole transactions are printed, applied or checked: `replay` from inside a
//!   multi-part transaction starts at the next whole one and says so on stderr.
//! - `status` judges headroom by the stream's own limits (its configuration on the server),
//!   the minimum over messages, bytes and age. A running consumer judges its own the same way
//!   (`deltasync_nats::position_headroom`) every [`HEADROOM_REFRESH`] for `/v1/status`: one
//!   stream info request per period whatever the HTTP traffic, and a status read never waits
//!   on NATS.

use crate::local::LocalStore;
use crate::nats::reader::{Reader, Stalled};
use crate::nats::{self, JetStream};
use deltasync_config::settings::Settings;
use deltasync_core::recovery::Classified;
pub use deltasync_core::retention::{headroom, Headroom, PositionHeadroom};
use deltasync_core::snapshot::Manifest;
use deltasync_core::Position;
use deltasync_core::{names, ApplyError, Change, Envelope, Lineage, State};
use deltasync_nats::history::HistoryError;
pub use deltasync_nats::status::StreamStatus;
use deltasync_nats::status::StreamView;
use deltasync_nats::store::{self, StoreError};
use serde::Serialize;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// Why an operator command failed; each names what to do next where it can.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Nats(#[from] deltasync_nats::NatsError),
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "envelope {wanted} is no longer retained: the first retained envelope is {first_seq} \
         (stream sequence {first_stream_seq}); the latest snapshot is at {snapshot}"
    )]
    NotRetained {
        wanted: u64,
        first_seq: u64,
        first_stream_seq: u64,
        snapshot: String,
    },
    #[error("the pipeline has no history yet")]
    Empty,
    #[error("no retained snapshot is at or before envelope {0}, and the stream no longer starts at envelope 1")]
    NoSnapshotBefore(u64),
    #[error("envelope {wanted} is not in the history (it ends at {last})")]
    BeyondHistory { wanted: u64, last: u64 },
    #[error("envelope {0} is inside a multi-part transaction; rebuild at its last part")]
    MidTransaction(u64),
    #[error("the history is broken at envelope {seq}: {source}")]
    Broken { seq: u64, source: ApplyError },
    #[error("{path}: {reason}")]
    DataDir { path: String, reason: String },
    #[error(transparent)]
    Local(#[from] crate::local::LocalError),
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
    #[error("listing the stream's consumers: {0}")]
    Consumers(String),
    #[error("nothing was stored in the last {0}")]
    NothingSince(String),
    #[error("no replica position marker {name} (replica id {id:?}) on the stream; the stream's markers: {known}")]
    NoMarker {
        id: String,
        name: String,
        known: String,
    },
    /// A read stopped delivering before the end it was asked for, and kept stopping.
    #[error(
        "reading the stream stalled at stream sequence {stream_seq} before its end \
         {end} ({attempts} attempts): {reason}; nothing after it was read"
    )]
    Stalled {
        stream_seq: u64,
        end: u64,
        attempts: u32,
        reason: String,
    },
    /// An envelope of the lineage is not in the stream (deleted, or never stored).
    #[error(
        "envelope {missing} is missing from the stream: envelope {found} follows envelope \
         {after} (at stream sequence {stream_seq})"
    )]
    Missing {
        missing: u64,
        after: u64,
        found: u64,
        stream_seq: u64,
    },
}

async fn connect(settings: &Settings) -> Result<JetStream, OpsError> {
    Ok(nats::connect(settings).await?.1)
}

impl From<Stalled> for OpsError {
    fn from(s: Stalled) -> OpsError {
        OpsError::Stalled {
            stream_seq: s.stream_seq,
            end: s.end,
            attempts: s.attempts,
            reason: s.reason,
        }
    }
}

/// The current lineage: the latest snapshot's, else the first envelope's.
async fn current_manifest(
    js: &JetStream,
    settings: &Settings,
) -> Result<Option<Manifest>, OpsError> {
    let kv = store::bucket(js, settings).await?;
    Ok(store::latest_manifest(&kv).await?)
}

/// Reads envelopes of `lineage` from stream sequence `from` up to the stream's head at the
/// time of the call, calling `f` for each (with its stream sequence) until it returns false.
/// Foreign messages and envelopes of other lineages are skipped. A read that stalls before
/// the head is read again (bounded) and then fails: this never ends early and quietly.
async fn scan(
    js: &JetStream,
    settings: &Settings,
    from: u64,
    lineage: Option<Lineage>,
    mut f: impl FnMut(u64, Envelope) -> Result<bool, OpsError>,
) -> Result<(), OpsError> {
    let bounds = deltasync_nats::stream_bounds(js, settings).await?;
    if bounds.messages == 0 || from > bounds.last_seq {
        return Ok(());
    }
    let start = from.max(bounds.first_seq);
    let mut reader = Reader::open(js, settings, start, bounds.last_seq).await?;
    // On a terminal only: a bar over the stream sequences to read.
    let bar = deltasync_config::progress::bar(
        "reading the stream",
        bounds.last_seq - start + 1,
        "messages",
    );
    while let Some((stream_seq, item)) = reader.next().await? {
        bar.set_position(stream_seq - start + 1);
        if let Classified::Envelope(e) = item {
            if lineage.is_none_or(|l| l == e.lineage) && !f(stream_seq, e)? {
                bar.finish_and_clear();
                return Ok(());
            }
        }
    }
    bar.finish_and_clear();
    Ok(())
}

/// What `replay` printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReplaySummary {
    pub transactions: u64,
    pub envelopes: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// `--from-seq` fell inside this transaction (its first and last envelope), which was
    /// not printed: the output starts at the next whole transaction.
    pub skipped_head: Option<(u64, u64)>,
    /// The transaction at the end (its first envelope and the envelopes it has) was not
    /// printed because it does not end at or before the requested end.
    pub skipped_tail: Option<(u64, u64)>,
}

/// Prints envelopes `from..=to` of the current lineage as NDJSON, one line per transaction
/// (a multi-part transaction is one line, named by its last part's sequence), in the ingest
/// format so `deltasync-producer ingest` accepts the output as it is. Empty transactions are
/// not printed (there is nothing to copy).
///
/// Only whole transactions are printed: when `from` is inside a multi-part transaction the
/// output starts at the first transaction that starts at or after `from`, and a transaction
/// that does not end at or before `to` (or the stream's head) is left out; both are said on
/// stderr and in the summary. A missing envelope, a history that ends before `to`, or a read
/// that stalls fail naming the sequence; what was printed before is then incomplete and the
/// command exits non-zero.
pub async fn replay(
    settings: &Settings,
    from: u64,
    to: Option<u64>,
    out: &mut dyn Write,
) -> Result<ReplaySummary, OpsError> {
    let js = connect(settings).await?;
    let manifest = current_manifest(&js, settings).await?;
    let bounds = deltasync_nats::stream_bounds(&js, settings).await?;
    // The first retained envelope of the current lineage tells whether `from` survives.
    let lineage = manifest.as_ref().map(|m| m.lineage);
    let mut first: Option<(u64, u64)> = None;
    let mut summary = ReplaySummary::default();
    let mut pending: Vec<Envelope> = Vec::new();
    // The last envelope of the lineage seen (continuity: the next must follow it).
    let mut last_seen: Option<u64> = None;
    // An envelope after `to` was seen: the history reaches the requested end.
    let mut reached_to = false;
    let mut err = None;
    scan(&js, settings, bounds.first_seq, lineage, |stream_seq, e| {
        if first.is_none() {
            first = Some((e.seq, stream_seq));
            // A transaction that started before the first retained message is cut too.
            let first_whole = if e.part == 1 {
                e.seq
            } else {
                e.seq + u64::from(e.parts - e.part) + 1
            };
            if from < first_whole {
                err = Some(OpsError::NotRetained {
                    wanted: from,
                    first_seq: first_whole,
                    first_stream_seq: stream_seq,
                    snapshot: manifest
                        .as_ref()
                        .map_or("none".into(), |m| m.seq.to_string()),
                });
                return Ok(false);
            }
        }
        if to.is_some_and(|t| e.seq > t) {
            reached_to = true;
            return Ok(false);
        }
        match last_seen {
            // A retried publish stored twice: already seen.
            Some(l) if e.seq <= l => return Ok(true),
            Some(l) if e.seq > l + 1 => {
                err = Some(OpsError::Missing {
                    missing: l + 1,
                    after: l,
                    found: e.seq,
                    stream_seq,
                });
                return Ok(false);
            }
            _ => last_seen = Some(e.seq),
        }
        if e.seq < from {
            return Ok(true);
        }
        if e.part == 1 {
            pending.clear();
        } else if pending.last().is_none_or(|p| p.part + 1 != e.part) {
            // Inside a transaction whose start is not in the output: at `from`, skip to the
            // next whole one; later, the parts before it are missing (an abandoned
            // transaction's remains); either way nothing of it is printed.
            pending.clear();
            if summary.envelopes == 0 && summary.skipped_head.is_none() {
                let tx_first = e.seq - u64::from(e.part - 1);
                let tx_last = e.seq + u64::from(e.parts - e.part);
                summary.skipped_head = Some((tx_first, tx_last));
                eprintln!(
                    "replay: envelope {from} is inside the multi-part transaction of envelopes \
                     {tx_first}..={tx_last}, which is not printed; the output starts at the next \
                     whole transaction (envelope {})",
                    tx_last + 1
                );
            }
            return Ok(true);
        }
        let last = e.is_last_part();
        let seq = e.seq;
        let lineage = e.lineage;
        pending.push(e);
        summary.envelopes += 1;
        if last {
            let changes: Vec<&Change> = pending.iter().flat_map(|p| p.changes.iter()).collect();
            if !changes.is_empty() {
                let mut line = Vec::new();
                deltasync_core::ndjson::write_txn(&mut line, seq, &lineage.to_hex(), changes);
                out.write_all(&line)?;
                summary.transactions += 1;
                if summary.first_seq == 0 {
                    summary.first_seq = seq;
                }
                summary.last_seq = seq;
            }
            pending.clear();
        }
        Ok(true)
    })
    .await?;
    if let Some(e) = err {
        return Err(e);
    }
    if first.is_none() && from > 0 {
        return Err(OpsError::Empty);
    }
    let last = last_seen.unwrap_or(0);
    if let Some(t) = to {
        if last < t && !reached_to {
            return Err(OpsError::BeyondHistory { wanted: t, last });
        }
    }
    if let Some(p) = pending.first() {
        let tx_first = p.seq - u64::from(p.part - 1);
        summary.skipped_tail = Some((tx_first, u64::from(p.parts)));
        eprintln!(
            "replay: the transaction starting at envelope {tx_first} ({} parts) does not end by \
             envelope {}; it is not printed",
            p.parts,
            to.unwrap_or(last)
        );
    }
    out.flush()?;
    Ok(summary)
}

/// A state at an exact position of the current lineage, built from the newest retained
/// snapshot at or before it plus the envelopes up to it.
async fn state_at(
    js: &JetStream,
    settings: &Settings,
    at: Option<u64>,
) -> Result<(State, u64, Option<Manifest>), OpsError> {
    let kv = store::bucket(js, settings).await?;
    let latest = store::latest_manifest(&kv).await?;
    let lineage = latest.as_ref().map(|m| m.lineage);
    let manifests: Vec<Manifest> = store::list_manifests(&kv)
        .await?
        .into_iter()
        .map(|(_, m)| m)
        .filter(|m| Some(m.lineage) == lineage && at.is_none_or(|a| m.seq <= a))
        .collect();
    let base = manifests.into_iter().max_by_key(|m| m.seq);
    let (mut state, from, base_stream_seq) = match &base {
        Some(m) => {
            let loaded = store::load(&kv, m.clone()).await?;
            (Some(loaded.state), m.stream_seq + 1, m.stream_seq)
        }
        None => (None, 1, 0),
    };
    let mut stream_seq = base_stream_seq;
    let target = at;
    let mut failure = None;
    scan(js, settings, from, lineage, |sseq, e| {
        let s = match &mut state {
            Some(s) => s,
            None if e.seq == 1 && e.part == 1 => state.insert(State::new(e.lineage)),
            None => {
                failure = Some(OpsError::NoSnapshotBefore(target.unwrap_or(e.seq)));
                return Ok(false);
            }
        };
        if target.is_some_and(|t| e.seq > t) {
            return Ok(false);
        }
        match s.apply(&e) {
            Ok(_) => {}
            Err(ApplyError::Duplicate { .. } | ApplyError::Stale { .. }) => return Ok(true),
            Err(source) => {
                failure = Some(OpsError::Broken { seq: e.seq, source });
                return Ok(false);
            }
        }
        stream_seq = sseq;
        Ok(true)
    })
    .await?;
    if let Some(f) = failure {
        return Err(f);
    }
    let state = state.ok_or(OpsError::Empty)?;
    if let Some(t) = at {
        if state.has_pending_parts() {
            return Err(OpsError::MidTransaction(t));
        }
        if state.seq() != t {
            return Err(OpsError::BeyondHistory {
                wanted: t,
                last: state.seq(),
            });
        }
    }
    Ok((state, stream_seq, base))
}

/// What `rebuild` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildSummary {
    pub seq: u64,
    pub lineage: String,
    pub digest: String,
    pub entries: usize,
    pub from_snapshot: Option<u64>,
}

/// Writes a replica of the state at envelope `at` into `data_dir` (which must not hold a
/// replica already): the newest retained snapshot at or before `at` plus the envelopes up to
/// it, every transaction's digest checked on the way (the last one is the digest envelope
/// `at` recorded). `deltasync-consumer run --data-dir` then follows from `at`.
pub async fn rebuild(
    settings: &Settings,
    at: u64,
    data_dir: &Path,
) -> Result<RebuildSummary, OpsError> {
    if crate::local::read_cursor(data_dir)?.is_some() {
        return Err(OpsError::DataDir {
            path: data_dir.display().to_string(),
            reason: "already holds a replica; rebuild into an empty directory".into(),
        });
    }
    let js = connect(settings).await?;
    let (state, stream_seq, base) = state_at(&js, settings, Some(at)).await?;
    let local = LocalStore::open_durable(data_dir, &settings.pipeline)?;
    local.replace(&state, &Position::of(&state, stream_seq))?;
    Ok(RebuildSummary {
        seq: state.seq(),
        lineage: state.lineage().to_hex(),
        digest: state.digest().to_hex(),
        entries: state.len(),
        from_snapshot: base.map(|m| m.seq),
    })
}

/// What `verify` found.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VerifyReport {
    /// The snapshot the check started from (`None`: the first envelope).
    pub from_snapshot: Option<u64>,
    pub first_seq: u64,
    pub last_seq: u64,
    pub envelopes_checked: u64,
    /// The first envelope whose recorded digest (or continuity) does not hold.
    pub divergence: Option<Divergence>,
}

/// Where the history stops being consistent.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Divergence {
    pub seq: u64,
    pub stream_seq: u64,
    pub reason: String,
}

/// The envelope sequence of the first envelope the server stored within the last `since`
/// (on the server's clock), for `replay --since`.
pub async fn envelope_seq_since(settings: &Settings, since: Duration) -> Result<u64, OpsError> {
    let js = connect(settings).await?;
    let bounds = deltasync_nats::stream_bounds(&js, settings).await?;
    let since_ms = deltasync_core::envelope::now_ms()
        .saturating_sub(u64::try_from(since.as_millis()).unwrap_or(u64::MAX));
    let nothing = || OpsError::NothingSince(humantime::format_duration(since).to_string());
    if bounds.last_seq < bounds.first_seq {
        return Err(nothing());
    }
    let stream_seq =
        nats::first_stored_since(&js, settings, bounds.first_seq, bounds.last_seq, since_ms)
            .await
            .map_err(OpsError::Consumers)?
            .ok_or_else(nothing)?;
    let payload = nats::message_at(&js, settings, stream_seq)
        .await
        .map_err(OpsError::Consumers)?
        .ok_or_else(nothing)?;
    match deltasync_core::codec::classify(&payload) {
        Classified::Envelope(e) => Ok(e.seq),
        Classified::Foreign { .. } => Err(OpsError::Consumers(format!(
            "stream sequence {stream_seq}, the first stored since then, is not an envelope"
        ))),
    }
}

/// What `forget` found and did.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ForgetReport {
    /// The marker: its name, position and idle time.
    #[serde(flatten)]
    pub marker: nats::marker::MarkerInfo,
    /// Whether it was deleted (`false` with `--dry-run`).
    pub deleted: bool,
}

/// Removes the position marker of retired replica `id` (or the marker named `id`, as `status`
/// lists it) from the server; with `dry_run`, only says what it would remove. A marker not
/// on the server is an error listing the markers that are.
pub async fn forget(
    settings: &Settings,
    id: &str,
    dry_run: bool,
) -> Result<ForgetReport, OpsError> {
    let js = connect(settings).await?;
    let by_id = names::consumer_name(&settings.pipeline, id);
    let failed = |e: nats::ClientError| OpsError::Consumers(e.to_string());
    let (mut found, all) = nats::marker::lookup(&js, settings, &by_id)
        .await
        .map_err(failed)?;
    if found.is_none() && all.iter().any(|n| n == id) {
        found = nats::marker::lookup(&js, settings, id)
            .await
            .map_err(failed)?
            .0;
    }
    let Some(marker) = found else {
        return Err(OpsError::NoMarker {
            id: id.to_owned(),
            name: by_id,
            known: if all.is_empty() {
                "none".to_owned()
            } else {
                all.join(", ")
            },
        });
    };
    if !dry_run {
        nats::marker::delete(&js, settings, &marker.name)
            .await
            .map_err(failed)?;
    }
    Ok(ForgetReport {
        marker,
        deleted: !dry_run,
    })
}

/// `verify`'s report as text.
pub fn render_verify(r: &VerifyReport) -> String {
    let from = match r.from_snapshot {
        Some(seq) => format!("from the snapshot at {seq}"),
        None => "from the first envelope".to_owned(),
    };
    match &r.divergence {
        None => format!(
            "consistent: {} envelopes checked ({}..{}) {from}\n",
            r.envelopes_checked, r.first_seq, r.last_seq
        ),
        Some(d) => format!(
            "DIVERGES at envelope {} (stream sequence {}): {}\n{} envelopes checked before it \
             ({}..) {from}\n",
            d.seq, d.stream_seq, d.reason, r.envelopes_checked, r.first_seq
        ),
    }
}

/// Digest-anchored replay: from the newest retained snapshot at or before `from` (the oldest
/// retained one when `from` is absent), apply every retained envelope and check each
/// transaction's recorded digest; report the first that does not match.
pub async fn verify(settings: &Settings, from: Option<u64>) -> Result<VerifyReport, OpsError> {
    let js = connect(settings).await?;
    let kv = store::bucket(&js, settings).await?;
    let latest = store::latest_manifest(&kv).await?;
    let lineage = latest.as_ref().map(|m| m.lineage);
    let manifests: Vec<Manifest> = store::list_manifests(&kv)
        .await?
        .into_iter()
        .map(|(_, m)| m)
        .filter(|m| Some(m.lineage) == lineage)
        .collect();
    let base = match from {
        Some(f) => manifests
            .into_iter()
            .filter(|m| m.seq <= f)
            .max_by_key(|m| m.seq),
        None => manifests.into_iter().min_by_key(|m| m.seq),
    };
    let (mut state, start) = match &base {
        Some(m) => (
            Some(store::load(&kv, m.clone()).await?.state),
            m.stream_seq + 1,
        ),
        None => (None, 1),
    };
    let mut report = VerifyReport {
        from_snapshot: base.as_ref().map(|m| m.seq),
        first_seq: 0,
        last_seq: base.as_ref().map_or(0, |m| m.seq),
        envelopes_checked: 0,
        divergence: None,
    };
    scan(&js, settings, start, lineage, |sseq, e| {
        let s = match &mut state {
            Some(s) => s,
            None if e.seq == 1 && e.part == 1 => state.insert(State::new(e.lineage)),
            None => {
                report.divergence = Some(Divergence {
                    seq: e.seq,
                    stream_seq: sseq,
                    reason: "no snapshot before the first retained envelope".into(),
                });
                return Ok(false);
            }
        };
        match s.apply(&e) {
            Ok(_) => {
                report.envelopes_checked += 1;
                if report.first_seq == 0 {
                    report.first_seq = e.seq;
                }
                report.last_seq = e.seq;
                Ok(true)
            }
            Err(ApplyError::Duplicate { .. } | ApplyError::Stale { .. }) => Ok(true),
            Err(source) => {
                report.divergence = Some(Divergence {
                    seq: e.seq,
                    stream_seq: sseq,
                    reason: source.to_string(),
                });
                Ok(false)
            }
        }
    })
    .await?;
    Ok(report)
}

/// The pipeline as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub pipeline: String,
    pub stream: StreamStatus,
    pub lineage: Option<String>,
    pub snapshots: Vec<SnapshotStatus>,
    pub consumers: Vec<ConsumerStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotStatus {
    pub seq: u64,
    pub stream_seq: u64,
    pub age_secs: f64,
    pub bytes: u64,
    pub chunks: usize,
    pub segments: usize,
    pub latest: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConsumerStatus {
    pub name: String,
    /// Stream sequence the consumer has committed (acknowledged) up to.
    pub position: u64,
    pub lag: u64,
    /// The lag in time: how long the oldest message it has not applied has been stored
    /// (0 when `lag` is 0; the server's clock). `None` when that message could not be read.
    pub lag_secs: Option<f64>,
    /// Messages that can still arrive before retention prunes the position: the minimum
    /// over the stream's message, byte and age limits (`None`: no limit applies).
    pub headroom_messages: Option<u64>,
    /// At the current rate, seconds until retention prunes the position.
    pub headroom_secs: Option<f64>,
    /// The limit that binds first: "messages", "bytes" or "age".
    pub headroom_limit: Option<&'static str>,
    /// The position is already pruned: the consumer will re-snapshot.
    pub pruned: bool,
    pub idle_secs: Option<f64>,
}

/// How often a running consumer judges its own headroom for `/v1/status`: one stream info
/// request (plus one direct get with an age limit) per period, whatever the HTTP traffic.
pub const HEADROOM_REFRESH: Duration = Duration::from_secs(5);

/// Judges the replica's own headroom now and every [`HEADROOM_REFRESH`] until `stop`, and
/// publishes it in the replica's status. Not judged before the replica is bootstrapped (its
/// position means nothing yet); a failed read keeps the last judgement, which carries its
/// time.
pub(crate) async fn refresh_headroom(
    js: JetStream,
    settings: Settings,
    replica: crate::replica::Replica,
    stop: tokio_util::sync::CancellationToken,
) {
    let subject = names::subject(&settings.pipeline);
    let mut stream = None;
    loop {
        if let Some(position) = replica.bootstrapped_position() {
            if stream.is_none() {
                stream = nats::stream(&js, &settings).await;
            }
            match (
                &stream,
                deltasync_nats::stream_bounds_and_limits(&js, &settings).await,
            ) {
                (Some(stream), Ok((b, limits))) => {
                    let now = std::time::SystemTime::now();
                    let h = deltasync_nats::position_headroom(
                        stream, &subject, &b, &limits, position, now,
                    )
                    .await;
                    replica.set_headroom(crate::replica::HeadroomStatus {
                        position,
                        lag: h.lag,
                        pruned: h.pruned,
                        messages: h.headroom.messages,
                        secs: h.headroom.secs,
                        limit: h.headroom.limit,
                        at_ms: deltasync_core::envelope::now_ms(),
                    });
                }
                (_, Err(e)) => {
                    tracing::debug!(error = %e, "Judging the replica's headroom failed; trying again later")
                }
                (None, _) => {}
            }
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(HEADROOM_REFRESH) => {}
        }
    }
}

/// Stream bounds, lineage, retained snapshots and every consumer's position and headroom.
/// The limits are the stream's own (its configuration on the server), not the caller's
/// settings.
pub async fn status(settings: &Settings) -> Result<Status, OpsError> {
    let js = connect(settings).await?;
    let view = StreamView::read(&js, settings).await?;
    let kv = store::bucket(&js, settings).await?;
    let latest = store::read_pointer(&kv).await?.map(|(p, _)| p.manifest);
    let now_ms = deltasync_core::envelope::now_ms();
    // Ages from when the server stored each manifest, not the writer's `created_at_ms`.
    let snapshots: Vec<SnapshotStatus> = store::list_manifests_with_stored_ms(&kv)
        .await?
        .into_iter()
        .map(|(key, m, stored_ms)| SnapshotStatus {
            seq: m.seq,
            stream_seq: m.stream_seq,
            age_secs: now_ms.saturating_sub(stored_ms) as f64 / 1000.0,
            bytes: m.total_bytes(),
            chunks: m.ranges.iter().map(|r| r.chunks.len()).sum(),
            segments: m.segments.len(),
            latest: latest.as_deref() == Some(key.as_str()),
        })
        .collect();
    let lineage = store::latest_manifest(&kv)
        .await?
        .map(|m| m.lineage.to_hex());

    let mut consumers = Vec::new();
    for c in view
        .durable_consumers()
        .await
        .map_err(|e| OpsError::Consumers(e.to_string()))?
    {
        let h = view.headroom(c.position).await;
        let lag_secs = if h.lag == 0 {
            Some(0.0)
        } else {
            nats::stored_ms_at_or_after(&js, settings, c.position + 1)
                .await
                .ok()
                .flatten()
                .map(|ms| now_ms.saturating_sub(ms) as f64 / 1000.0)
        };
        consumers.push(ConsumerStatus {
            name: c.name,
            position: c.position,
            lag: h.lag,
            lag_secs,
            headroom_messages: h.headroom.messages,
            headroom_secs: h.headroom.secs,
            headroom_limit: h.headroom.limit,
            pruned: h.pruned,
            idle_secs: c.idle_secs,
        });
    }
    Ok(Status {
        pipeline: settings.pipeline.clone(),
        stream: view.status,
        lineage,
        snapshots,
        consumers,
    })
}

/// The status as text for a terminal.
pub fn render_status(s: &Status) -> String {
    let mut out = String::new();
    let age = |x: Option<f64>| {
        x.map_or("-".into(), |s| {
            humantime::format_duration(Duration::from_secs(s as u64)).to_string()
        })
    };
    out += &format!(
        "pipeline {}  lineage {}\n",
        s.pipeline,
        s.lineage.as_deref().unwrap_or("-")
    );
    out += &format!(
        "stream {}: sequences {}..{} ({} messages, {} bytes), oldest {} ago, {:.1} msg/s; limits: {} messages, {} bytes, age {}\n",
        s.stream.name,
        s.stream.first_seq,
        s.stream.last_seq,
        s.stream.messages,
        s.stream.bytes,
        age(s.stream.oldest_age_secs),
        s.stream.rate_per_sec.unwrap_or(0.0),
        s.stream.max_messages,
        s.stream.max_bytes,
        age(Some(s.stream.max_age_secs)),
    );
    out += "snapshots:\n";
    for sn in &s.snapshots {
        out += &format!(
            "  seq {:>10}  stream {:>10}  age {:>10}  {:>12} bytes  {:>5} chunks  {:>3} segments{}\n",
            sn.seq,
            sn.stream_seq,
            age(Some(sn.age_secs)),
            sn.bytes,
            sn.chunks,
            sn.segments,
            if sn.latest { "  (latest)" } else { "" }
        );
    }
    out += "consumers:\n";
    for c in &s.consumers {
        out += &format!(
            "  {:<40} position {:>10}  lag {:>8} ({})  headroom {} messages / {}{}{}\n",
            c.name,
            c.position,
            c.lag,
            age(c.lag_secs),
            c.headroom_messages.map_or("∞".into(), |m| m.to_string()),
            age(c.headroom_secs),
            c.headroom_limit
                .map_or(String::new(), |l| format!(" (bound by {l})")),
            if c.pruned {
                "  PRUNED: will re-snapshot"
            } else {
                ""
            }
        );
    }
    out
}
