//! Operator commands on a pipeline: `replay` (the history as re-ingestible NDJSON),
//! `rebuild` (a point-in-time replica), `verify` (digest-anchored replay of the whole
//! retained history) and `status` (stream bounds, snapshots, every consumer's position,
//! lag and headroom before retention prunes it).
//!
//! Talks to JetStream through the shared `history` and `store` modules, to the stream's
//! consumer list for positions, and to a local redb replica (`local`) for `rebuild`.

use crate::local::{Cursor, LocalStore};
use crate::replica::{BatchKind, ChangeBatch};
use async_nats::jetstream;
use deltasync_shared::history::{Classified, HistoryError, Tail};
use deltasync_shared::settings::Settings;
use deltasync_shared::snapshot::Manifest;
use deltasync_shared::store::{self, StoreError};
use deltasync_shared::{names, nats, ApplyError, Change, Envelope, Lineage, State};
use futures::TryStreamExt;
use serde::Serialize;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Why an operator command failed; each names what to do next where it can.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Nats(#[from] nats::NatsError),
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
}

async fn connect(settings: &Settings) -> Result<jetstream::Context, OpsError> {
    let client = nats::connect(&settings.nats).await?;
    Ok(nats::jetstream(client, &settings.nats))
}

/// The current lineage: the latest snapshot's, else the first envelope's.
async fn current_manifest(
    js: &jetstream::Context,
    settings: &Settings,
) -> Result<Option<Manifest>, OpsError> {
    let kv = store::bucket(js, settings).await?;
    Ok(store::latest_manifest(&kv).await?)
}

/// Reads envelopes of `lineage` from stream sequence `from` up to the stream's head at the
/// time of the call, calling `f` for each (with its stream sequence). Foreign messages and
/// envelopes of other lineages are skipped.
async fn scan(
    js: &jetstream::Context,
    settings: &Settings,
    from: u64,
    lineage: Option<Lineage>,
    mut f: impl FnMut(u64, Envelope) -> Result<bool, OpsError>,
) -> Result<(), OpsError> {
    let bounds = nats::stream_bounds(js, settings).await?;
    if bounds.messages == 0 || from > bounds.last_seq {
        return Ok(());
    }
    let mut tail = Tail::open(js, settings, from.max(bounds.first_seq)).await?;
    while let Some(item) = tail.next_within(settings.nats.request_timeout).await {
        let item = item?;
        let done = item.stream_seq >= bounds.last_seq || item.pending == 0;
        if let Classified::Envelope(e) = item.item {
            if lineage.is_none_or(|l| l == e.lineage) && !f(item.stream_seq, e)? {
                return Ok(());
            }
        }
        if done {
            break;
        }
    }
    Ok(())
}

/// One replayed transaction, in the ingest format.
#[derive(Serialize)]
struct ReplayLine<'a> {
    seq: u64,
    lineage: String,
    txn: Vec<IngestChange<'a>>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum IngestChange<'a> {
    Put {
        op: &'static str,
        key: &'a str,
        value: &'a serde_json::value::RawValue,
    },
    PutBinary {
        op: &'static str,
        key: &'a str,
        value_b64: String,
    },
    Del {
        op: &'static str,
        key: &'a str,
    },
}

fn ingest_change(c: &Change) -> IngestChange<'_> {
    match c {
        Change::Delete { key } => IngestChange::Del { op: "del", key },
        Change::Put { key, value } => {
            let raw = std::str::from_utf8(value)
                .ok()
                .and_then(|s| serde_json::from_str::<&serde_json::value::RawValue>(s).ok());
            match raw {
                Some(value) => IngestChange::Put {
                    op: "put",
                    key,
                    value,
                },
                None => {
                    let mut b64 = Vec::new();
                    crate::ndjson::base64(&mut b64, value);
                    IngestChange::PutBinary {
                        op: "put",
                        key,
                        value_b64: String::from_utf8_lossy(&b64).into_owned(),
                    }
                }
            }
        }
    }
}

/// What `replay` printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    pub transactions: u64,
    pub envelopes: u64,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// Prints envelopes `from..=to` of the current lineage as NDJSON, one line per transaction
/// (a multi-part transaction is one line, named by its last part's sequence), in the ingest
/// format so `deltasync-producer ingest` accepts the output as it is. Empty transactions are
/// not printed (there is nothing to copy).
pub async fn replay(
    settings: &Settings,
    from: u64,
    to: Option<u64>,
    out: &mut dyn Write,
    progress: bool,
) -> Result<ReplaySummary, OpsError> {
    let js = connect(settings).await?;
    let manifest = current_manifest(&js, settings).await?;
    let bounds = nats::stream_bounds(&js, settings).await?;
    // The first retained envelope of the current lineage tells whether `from` survives.
    let lineage = manifest.as_ref().map(|m| m.lineage);
    let mut first: Option<(u64, u64)> = None;
    let mut summary = ReplaySummary::default();
    let mut pending: Vec<Envelope> = Vec::new();
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
        if e.seq < from {
            return Ok(true);
        }
        if to.is_some_and(|t| e.seq > t) {
            return Ok(false);
        }
        if e.part == 1 {
            pending.clear();
        }
        let last = e.is_last_part();
        let seq = e.seq;
        let lineage = e.lineage;
        pending.push(e);
        summary.envelopes += 1;
        if last {
            let changes: Vec<&Change> = pending.iter().flat_map(|p| p.changes.iter()).collect();
            if !changes.is_empty() {
                let line = ReplayLine {
                    seq,
                    lineage: lineage.to_hex(),
                    txn: changes.into_iter().map(ingest_change).collect(),
                };
                serde_json::to_writer(&mut *out, &line).map_err(std::io::Error::from)?;
                out.write_all(b"\n")?;
                summary.transactions += 1;
                if summary.first_seq == 0 {
                    summary.first_seq = seq;
                }
                summary.last_seq = seq;
                if progress && summary.transactions % 10_000 == 0 {
                    eprint!(
                        "\rreplayed {} transactions (envelope {seq})",
                        summary.transactions
                    );
                }
            }
            pending.clear();
        }
        Ok(true)
    })
    .await?;
    if progress && summary.transactions >= 10_000 {
        eprintln!();
    }
    if let Some(e) = err {
        return Err(e);
    }
    if first.is_none() && from > 0 {
        return Err(OpsError::Empty);
    }
    out.flush()?;
    Ok(summary)
}

/// A state at an exact position of the current lineage, built from the newest retained
/// snapshot at or before it plus the envelopes up to it.
async fn state_at(
    js: &jetstream::Context,
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
    let batch = ChangeBatch {
        lineage: state.lineage(),
        prev_seq: 0,
        seq: state.seq(),
        kind: BatchKind::Applied,
        changes: state
            .iter()
            .map(|(k, v)| Change::Put {
                key: k.into(),
                value: bytes::Bytes::copy_from_slice(v),
            })
            .collect(),
    };
    local.commit(&[Arc::new(batch)], &Cursor::of(&state, stream_seq))?;
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
pub struct StreamStatus {
    pub name: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub messages: u64,
    pub bytes: u64,
    pub oldest_age_secs: Option<f64>,
    /// Messages per second over the retained window (the rate headroom is judged at).
    pub rate_per_sec: Option<f64>,
    pub max_messages: i64,
    pub max_bytes: i64,
    pub max_age_secs: f64,
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
    /// Messages that can still arrive before retention prunes the position.
    pub headroom_messages: Option<u64>,
    /// At the current rate, seconds until retention prunes the position.
    pub headroom_secs: Option<f64>,
    /// The position is already pruned: the consumer will re-snapshot.
    pub pruned: bool,
    pub idle_secs: Option<f64>,
}

/// Stream bounds, lineage, retained snapshots and every consumer's position and headroom.
pub async fn status(settings: &Settings) -> Result<Status, OpsError> {
    let js = connect(settings).await?;
    let b = nats::stream_bounds(&js, settings).await?;
    let now = std::time::SystemTime::now();
    let oldest_age = b
        .first_ts
        .and_then(|t| now.duration_since(t).ok())
        .map(|d| d.as_secs_f64());
    let rate = oldest_age
        .filter(|a| *a > 0.0 && b.messages > 1)
        .map(|a| b.messages as f64 / a);
    let kv = store::bucket(&js, settings).await?;
    let latest = store::read_pointer(&kv).await?.map(|(p, _)| p.manifest);
    let now_ms = deltasync_shared::envelope::now_ms();
    let snapshots: Vec<SnapshotStatus> = store::list_manifests(&kv)
        .await?
        .into_iter()
        .map(|(key, m)| SnapshotStatus {
            seq: m.seq,
            stream_seq: m.stream_seq,
            age_secs: now_ms.saturating_sub(m.created_at_ms) as f64 / 1000.0,
            bytes: m.total_bytes(),
            chunks: m.ranges.iter().map(|r| r.chunks.len()).sum(),
            segments: m.segments.len(),
            latest: latest.as_deref() == Some(key.as_str()),
        })
        .collect();
    let lineage = store::latest_manifest(&kv)
        .await?
        .map(|m| m.lineage.to_hex());

    let stream_name = names::stream_name(&settings.pipeline);
    let stream = js
        .get_stream(&stream_name)
        .await
        .map_err(|e| OpsError::Consumers(e.to_string()))?;
    let infos: Vec<jetstream::consumer::Info> = stream
        .consumers()
        .try_collect()
        .await
        .map_err(|e| OpsError::Consumers(e.to_string()))?;
    let s = &settings.stream;
    let mut consumers = Vec::new();
    for info in infos
        .into_iter()
        .filter(|i| i.config.durable_name.is_some())
    {
        let position = info.ack_floor.stream_sequence;
        let lag = b.last_seq.saturating_sub(position);
        let pruned = b.messages > 0 && position + 1 < b.first_seq;
        // Retention by count: the stream keeps max_messages; the position survives until
        // `max_messages - lag` more messages arrive. By age: until its next message ages out.
        let by_count = (s.max_messages > 0).then(|| (s.max_messages as u64).saturating_sub(lag));
        let by_age_secs = (!s.max_age.is_zero())
            .then(|| {
                let behind = lag as f64 / rate.unwrap_or(f64::INFINITY).max(f64::MIN_POSITIVE);
                let age_of_next = if rate.is_some() { behind } else { 0.0 };
                s.max_age.as_secs_f64() - age_of_next
            })
            .map(|x| x.max(0.0));
        let by_count_secs = by_count.and_then(|m| rate.map(|r| m as f64 / r));
        let headroom_secs = match (by_count_secs, by_age_secs) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let idle = info.delivered.last_active.map(|t| {
            let ts = t.unix_timestamp_nanos() as f64 / 1e9;
            let now = now_ms as f64 / 1000.0;
            (now - ts).max(0.0)
        });
        consumers.push(ConsumerStatus {
            name: info.name,
            position,
            lag,
            headroom_messages: by_count,
            headroom_secs: if pruned { Some(0.0) } else { headroom_secs },
            pruned,
            idle_secs: idle,
        });
    }
    Ok(Status {
        pipeline: settings.pipeline.clone(),
        stream: StreamStatus {
            name: stream_name,
            first_seq: b.first_seq,
            last_seq: b.last_seq,
            messages: b.messages,
            bytes: b.bytes,
            oldest_age_secs: oldest_age,
            rate_per_sec: rate,
            max_messages: s.max_messages,
            max_bytes: s.max_bytes,
            max_age_secs: s.max_age.as_secs_f64(),
        },
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
            "  {:<40} position {:>10}  lag {:>8}  headroom {} messages / {}{}\n",
            c.name,
            c.position,
            c.lag,
            c.headroom_messages.map_or("∞".into(), |m| m.to_string()),
            age(c.headroom_secs),
            if c.pruned {
                "  PRUNED: will re-snapshot"
            } else {
                ""
            }
        );
    }
    out
}
