//! The producer's write API, for programs in any language: commit a transaction, a stream of
//! NDJSON changes or a whole state, and get a receipt once it is durable. The operations and
//! their answers live here, once; [`http`] and [`nats`] carry them (same bodies, same JSON).
//!
//! Talks to one long-lived [`Producer`] (commits, ingest) and to its idempotency cache (`idempotency.rs`).
//! For users: `docs/write-api.md` (every route, body, status and header).
//!
//! ```text
//! op       request body                                   receipt (200 / service reply)
//! txn      {"txn":[op,...],"if_seq":N?}                   {"seq","first_seq","parts","lineage",
//!                                                          "digest","changes","stream_seq"}
//! changes  NDJSON ingest lines                            {"seq","first_seq","lineage","digest",
//!                                                          "changes","transactions","lines"}
//! state    NDJSON {"key":K,"value":V|"value_b64":B}       as txn (parts 0: nothing changed);
//!          no entries: 400 unless Deltasync-Allow-Empty: true
//!
//! errors   {"error":msg} + "index" (txn: the change), "seq" (409: the head),
//!          "line" and "committed" (changes, state: the 1-based line; what was committed)
//!          400 bad input · 409 if_seq · 413 too large · 422 Idempotency-Key reused for
//!          another body · 503 fenced / stopping · 500 bug
//! ```
//!
//! ## Invariants
//!
//! - A receipt is sent only after everything it names is acknowledged by the stream.
//! - A refused request publishes nothing (a `changes` body: nothing of the bad line or after).
//! - With an `Idempotency-Key`, one request per key (and operation) runs; within the window a
//!   retry (same body) gets the first success's receipt and commits nothing; another body
//!   under the same key is refused (422) and commits nothing either. The memory is this
//!   process's: a restarted producer runs the key again (put/del are absolute, so a replayed
//!   transaction leaves the same state, at a new sequence).
//! - An operation runs on its own task: a client that goes away does not cut it short
//!   between handing over its commit and recording its outcome.

mod body;
pub mod http;
mod idempotency;
pub mod nats;

use crate::error::ProducerError;
use crate::handoff::CommitReceipt;
use crate::ingest::{self, IngestError, IngestReport, Input};
use crate::producer::Producer;
pub use body::Body;
use body::Print;
use bytes::Bytes;
use deltasync_core::ndjson::{parse_entry_line, parse_line, Parsed};
use deltasync_core::{Change, State};
use idempotency::{Cache, Lookup};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::io::AsyncRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The header (HTTP and NATS) that lets `state` commit a state without entries.
pub const ALLOW_EMPTY: &str = "Deltasync-Allow-Empty";

/// The longest `Idempotency-Key` accepted.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;

/// The three operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// One atomic transaction.
    Txn,
    /// NDJSON ingest lines.
    Changes,
    /// A whole state.
    State,
}

impl Op {
    /// Its name (the NATS endpoint's, and the idempotency scope).
    pub fn name(self) -> &'static str {
        match self {
            Op::Txn => "txn",
            Op::Changes => "changes",
            Op::State => "state",
        }
    }
}

/// A refused request: its status and JSON body (`{"error": ..}` and details).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status / NATS service error code: 400, 409, 413, 500 or 503.
    pub status: u16,
    /// The JSON body.
    pub body: Value,
}

impl ApiError {
    fn new(status: u16, error: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: json!({ "error": error.into() }),
        }
    }

    fn with(mut self, field: &str, value: impl Serialize) -> ApiError {
        if let Value::Object(m) = &mut self.body {
            m.insert(field.to_owned(), json!(value));
        }
        self
    }

    /// A 400 for bad input.
    pub fn bad_request(error: impl Into<String>) -> ApiError {
        ApiError::new(400, error)
    }

    /// A 413 for a body over the limit.
    pub fn too_large(error: impl Into<String>) -> ApiError {
        ApiError::new(413, error)
    }

    /// The error message.
    pub fn message(&self) -> &str {
        self.body["error"].as_str().unwrap_or_default()
    }

    fn from_producer(err: &ProducerError) -> ApiError {
        match err {
            ProducerError::InvalidChange { index, .. } => {
                ApiError::new(400, err.to_string()).with("index", index)
            }
            ProducerError::TransactionTooLarge { .. }
            | ProducerError::TransactionBeyondRetention { .. } => {
                ApiError::new(400, err.to_string())
            }
            ProducerError::HeadMoved { head, .. } => {
                ApiError::new(409, err.to_string()).with("seq", head)
            }
            ProducerError::Internal(_) | ProducerError::Encode { .. } => {
                ApiError::new(500, err.to_string())
            }
            _ => ApiError::new(503, err.to_string()),
        }
    }
}

/// A successful answer: the receipt's JSON, and whether it is the replay of an earlier
/// request with the same `Idempotency-Key`.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The receipt as JSON text.
    pub body: Bytes,
    /// `Idempotent-Replayed: true`.
    pub replayed: bool,
}

/// The receipt of `txn` and `state`.
#[derive(Debug, Serialize, Deserialize)]
struct TxnReceipt {
    seq: u64,
    first_seq: u64,
    parts: u32,
    lineage: String,
    digest: String,
    changes: usize,
    stream_seq: u64,
}

/// The receipt of `changes`.
#[derive(Debug, Serialize, Deserialize)]
struct ChangesReceipt {
    seq: u64,
    first_seq: u64,
    lineage: String,
    digest: String,
    changes: u64,
    transactions: u64,
    lines: u64,
}

/// The body of `txn`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TxnBody<'a> {
    #[serde(borrow)]
    txn: Option<Vec<&'a RawValue>>,
    if_seq: Option<u64>,
}

/// A remembered success: the request body's fingerprint and the receipt.
#[derive(Debug, Clone)]
struct Stored {
    print: u64,
    receipt: Bytes,
}

/// The write API over one producer; cheap to clone.
#[derive(Debug, Clone)]
pub struct Api(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    producer: Arc<Producer>,
    lineage: String,
    /// Largest body accepted (HTTP; NATS is bounded by `max_payload`).
    max_body_bytes: u64,
    cache: Mutex<Cache<Stored>>,
    /// `changes` bodies are ingested one after another: each receipt's range then covers
    /// only its own plain lines (transactions of other requests may sit in between).
    changes: tokio::sync::Mutex<()>,
    /// The operations' tasks, awaited at shutdown.
    tasks: TaskTracker,
    /// Cancelled when the producer stops taking requests.
    closing: CancellationToken,
}

impl Api {
    /// The API over `producer`, with its settings' limits and idempotency window.
    pub fn new(producer: Arc<Producer>) -> Api {
        let s = producer.settings();
        let window = match s.producer.api_idempotency_window {
            w if w.is_zero() => s.stream.duplicate_window,
            w => w,
        };
        let cache = Cache::new(window, s.producer.api_idempotency_max_keys);
        Api(Arc::new(Inner {
            lineage: producer.lineage().to_hex(),
            max_body_bytes: s.producer.api_max_body_bytes,
            producer,
            cache: Mutex::new(cache),
            changes: tokio::sync::Mutex::new(()),
            tasks: TaskTracker::new(),
            closing: CancellationToken::new(),
        }))
    }

    /// The largest HTTP body accepted.
    pub fn max_body_bytes(&self) -> u64 {
        self.0.max_body_bytes
    }

    /// Refuses new requests (503) and waits until the running ones have answered.
    pub async fn close(&self) {
        self.0.closing.cancel();
        self.0.tasks.close();
        self.0.tasks.wait().await;
    }

    /// Commits one transaction, `{"txn":[...],"if_seq":N}`.
    pub async fn txn(&self, key: Option<&str>, body: Bytes) -> Result<Answer, ApiError> {
        let me = self.clone();
        self.run(Op::Txn, key, Body::Bytes(body), |body| async move {
            me.do_txn(&whole(body)).await
        })
        .await
    }

    /// Ingests NDJSON lines read from `body`.
    pub async fn changes(&self, key: Option<&str>, body: Body) -> Result<Answer, ApiError> {
        let me = self.clone();
        self.run(Op::Changes, key, body, |body| async move {
            me.do_changes(body.into_reader()).await
        })
        .await
    }

    /// Commits the difference to the state of NDJSON entry lines. A body without entries
    /// (which would delete every key) is refused unless `allow_empty`.
    pub async fn state(
        &self,
        key: Option<&str>,
        body: Bytes,
        allow_empty: bool,
    ) -> Result<Answer, ApiError> {
        let me = self.clone();
        self.run(Op::State, key, Body::Bytes(body), move |body| async move {
            me.do_state(&whole(body), allow_empty).await
        })
        .await
    }

    /// Runs `work` on its own task, once per idempotency key; a retry's body must be the
    /// first request's.
    async fn run<W, F>(
        &self,
        op: Op,
        key: Option<&str>,
        body: Body,
        work: W,
    ) -> Result<Answer, ApiError>
    where
        W: FnOnce(Body) -> F,
        F: Future<Output = Result<Bytes, ApiError>> + Send + 'static,
    {
        if self.0.closing.is_cancelled() {
            return Err(ApiError::new(503, "the producer is shutting down"));
        }
        let Some(key) = key else {
            return self.spawn(work(body), None).await.map(|body| Answer {
                body,
                replayed: false,
            });
        };
        check_key(key)?;
        let (body, print) = body.fingerprinted();
        let scoped = format!("{}\n{key}", op.name());
        loop {
            let found = self
                .0
                .cache
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .lookup(&scoped, Instant::now());
            match found {
                Lookup::Replay(stored) => {
                    let got = print.of_rest(body).await.map_err(|e| read_error(&e))?;
                    if got != stored.print {
                        return Err(ApiError::new(
                            422,
                            format!(
                                "Idempotency-Key {key:?} was used for a different {} request \
                                 body within the idempotency window: nothing was committed; \
                                 a new request needs a new key",
                                op.name()
                            ),
                        ));
                    }
                    return Ok(Answer {
                        body: stored.receipt,
                        replayed: true,
                    });
                }
                Lookup::Wait(mut rx) => {
                    // Wakes when the running request ends; then look again.
                    let _ = rx.changed().await;
                }
                Lookup::Busy => {
                    return Err(ApiError::new(
                        503,
                        "too many requests with an Idempotency-Key are running at once; retry",
                    ))
                }
                Lookup::Run(ticket) => {
                    let finish = Finish {
                        api: self.clone(),
                        key: scoped,
                        ticket,
                        print,
                        recorded: false,
                    };
                    return self
                        .spawn(work(body), Some(finish))
                        .await
                        .map(|body| Answer {
                            body,
                            replayed: false,
                        });
                }
            }
        }
    }

    async fn spawn<F>(&self, work: F, finish: Option<Finish>) -> Result<Bytes, ApiError>
    where
        F: Future<Output = Result<Bytes, ApiError>> + Send + 'static,
    {
        let task = self.0.tasks.spawn(async move {
            let result = work.await;
            if let Some(f) = finish {
                f.done(result.as_ref().ok().cloned());
            }
            result
        });
        task.await.unwrap_or_else(|e| {
            Err(ApiError::new(
                500,
                format!("the request's task failed: {e}"),
            ))
        })
    }

    async fn do_txn(&self, body: &[u8]) -> Result<Bytes, ApiError> {
        let (changes, if_seq) = parse_txn(body)?;
        let receipt = self
            .0
            .producer
            .commit_if(changes, if_seq)
            .await
            .map_err(|e| ApiError::from_producer(&e))?;
        Ok(self.txn_receipt(&receipt))
    }

    async fn do_state(&self, body: &[u8], allow_empty: bool) -> Result<Bytes, ApiError> {
        let mut state = State::new(self.0.producer.lineage());
        for (i, line) in body.split(|b| *b == b'\n').enumerate() {
            let n = i as u64 + 1;
            match parse_entry_line(line) {
                Ok(None) => {}
                Ok(Some((key, value))) => {
                    state.insert(key, value);
                }
                Err(reason) => {
                    return Err(ApiError::bad_request(format!("line {n}: {reason}"))
                        .with("line", n)
                        .with("committed", Value::Null))
                }
            }
        }
        if state.is_empty() && !allow_empty {
            return Err(ApiError::bad_request(format!(
                "the state has no entries: committing it would delete every key (an upstream \
                 read that failed sends an empty body too); send the header {ALLOW_EMPTY}: true \
                 to empty the state"
            )));
        }
        let receipt = self
            .0
            .producer
            .commit_state(state)
            .await
            .map_err(|e| ApiError::from_producer(&e))?;
        Ok(self.txn_receipt(&receipt))
    }

    async fn do_changes(&self, body: Box<dyn AsyncRead + Send + Unpin>) -> Result<Bytes, ApiError> {
        let _one_at_a_time = self.0.changes.lock().await;
        let producer = &self.0.producer;
        match ingest::ingest(producer, Input::Async(body), self.0.closing.child_token()).await {
            Ok(r) if r.cancelled => Err(ApiError::new(
                503,
                "the producer is shutting down: the body was not read to its end",
            )
            .with("committed", self.changes_receipt(&r))),
            Ok(r) => Ok(to_bytes(&self.changes_receipt(&r))),
            Err(IngestError::BadLine {
                line,
                reason,
                committed,
                ..
            }) => Err(ApiError::bad_request(format!("line {line}: {reason}"))
                .with("line", line)
                .with("committed", self.committed(&committed))),
            Err(IngestError::Read {
                source, committed, ..
            }) => {
                let status = if source.get_ref().is_some_and(|e| e.is::<BodyTooLarge>()) {
                    413
                } else {
                    400
                };
                Err(ApiError::new(status, format!("reading the body: {source}"))
                    .with("committed", self.committed(&committed)))
            }
            Err(IngestError::Producer(e)) => Err(ApiError::from_producer(&e)),
        }
    }

    fn txn_receipt(&self, r: &CommitReceipt) -> Bytes {
        to_bytes(&receipt_json(&self.0.lineage, r))
    }

    fn changes_receipt(&self, r: &IngestReport) -> Value {
        json!(ChangesReceipt {
            seq: r.position.seq,
            first_seq: r.first_seq.min(r.position.seq + 1),
            lineage: self.0.lineage.clone(),
            digest: r.position.digest.to_hex(),
            changes: r.changes,
            transactions: r.transactions,
            lines: r.lines,
        })
    }

    /// What a failed `changes` body committed before the failure; `null` when nothing.
    fn committed(&self, r: &IngestReport) -> Value {
        if r.changes == 0 {
            Value::Null
        } else {
            self.changes_receipt(r)
        }
    }
}

/// Records a run's outcome in the cache; a run dropped without an outcome (a panic) counts
/// as failed, so its key is not stuck.
struct Finish {
    api: Api,
    key: String,
    ticket: u64,
    /// The body's fingerprint, complete once the work read it to its end (a success did).
    print: Print,
    recorded: bool,
}

impl Finish {
    fn done(mut self, receipt: Option<Bytes>) {
        let value = receipt.map(|receipt| Stored {
            print: self.print.value(),
            receipt,
        });
        self.record(value);
    }

    fn record(&mut self, value: Option<Stored>) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        self.api
            .0
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .finish(&self.key, self.ticket, value, Instant::now());
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.record(None);
    }
}

/// A transaction's receipt as the API answers it: `{"seq","first_seq","parts","lineage",
/// "digest","changes","stream_seq"}` (`seq`: its last envelope).
pub fn receipt_json(lineage: &str, r: &CommitReceipt) -> Value {
    json!(TxnReceipt {
        seq: r.last_seq,
        first_seq: r.first_seq,
        parts: r.parts,
        lineage: lineage.to_owned(),
        digest: r.digest.to_hex(),
        changes: r.changes,
        stream_seq: r.stream_seq,
    })
}

/// A body that could not be read: 413 past the limit, else 400.
fn read_error(e: &std::io::Error) -> ApiError {
    let status = if e.get_ref().is_some_and(|e| e.is::<BodyTooLarge>()) {
        413
    } else {
        400
    };
    ApiError::new(status, format!("reading the body: {e}"))
}

/// A body read whole already (`txn`, `state`); a reader here is a bug, read as empty.
fn whole(body: Body) -> Bytes {
    match body {
        Body::Bytes(b) => b,
        Body::Reader(_) => Bytes::new(),
    }
}

/// The read error of a body longer than the limit (HTTP: 413).
#[derive(Debug, thiserror::Error)]
#[error("the body is longer than {limit} bytes (producer.api_max_body_bytes)")]
pub struct BodyTooLarge {
    /// The limit.
    pub limit: u64,
}

fn check_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(ApiError::bad_request(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes, got {}",
            key.len()
        )));
    }
    Ok(())
}

/// Parses a `txn` body: its changes (each an ingest line's put or del) and `if_seq`.
fn parse_txn(body: &[u8]) -> Result<(Vec<Change>, Option<u64>), ApiError> {
    let parsed: TxnBody<'_> = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body is not a transaction {{\"txn\":[...],\"if_seq\":N}}: {e}"
        ))
    })?;
    let items = parsed
        .txn
        .ok_or_else(|| ApiError::bad_request("missing `txn` (an array of changes)"))?;
    if items.is_empty() {
        return Err(ApiError::bad_request(
            "empty txn: a transaction needs at least one change",
        ));
    }
    let mut changes = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let bad = |reason: String| {
            ApiError::bad_request(format!("change {index}: {reason}")).with("index", index)
        };
        match parse_line(item.get().as_bytes()) {
            Ok(Parsed::Change(c)) => changes.push(c),
            Ok(Parsed::Txn(_)) => return Err(bad("transactions do not nest".into())),
            Ok(Parsed::Blank) => return Err(bad("expected a change object".into())),
            Err(reason) => return Err(bad(reason)),
        }
    }
    Ok((changes, parsed.if_seq))
}

fn to_bytes<T: Serialize>(v: &T) -> Bytes {
    // Serializing these plain structs cannot fail.
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

/// How long the API waits for its running requests at shutdown before the producer stops
/// (they then fail with 503).
pub const CLOSE_GRACE: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_txn_body_parses_into_changes_and_if_seq() {
        let (changes, if_seq) = parse_txn(
            br#"{"txn":[{"op":"put","key":"a","value":{"x": 1}},{"op":"del","key":"b"},
                {"op":"put","key":"c","value_b64":"AAE="}],"if_seq":7}"#,
        )
        .unwrap();
        assert_eq!(if_seq, Some(7));
        assert_eq!(
            changes,
            vec![
                Change::put("a", &br#"{"x":1}"#[..]),
                Change::delete("b"),
                Change::put("c", &[0u8, 1][..]),
            ]
        );
    }

    #[test]
    fn a_bad_txn_body_names_the_change_or_the_body() {
        let err = |body: &str| parse_txn(body.as_bytes()).unwrap_err();
        let e = err(r#"{"txn":[{"op":"put","key":"a","value":1},{"op":"pot","key":"b"}]}"#);
        assert_eq!((e.status, e.body["index"].as_u64()), (400, Some(1)));
        assert!(e.message().contains("unknown op \"pot\""), "{e:?}");
        let e = err(r#"{"txn":[{"txn":[]}]}"#);
        assert_eq!(e.body["index"], 0);
        for (body, want) in [
            ("{", "not a transaction"),
            (r#"{"txn":[],"if_seq":1}"#, "empty txn"),
            (r#"{"if_seq":1}"#, "missing `txn`"),
            (r#"{"txn":[],"iff_seq":1}"#, "unknown field `iff_seq`"),
            (r#"{"txn":[],"if_seq":-1}"#, "not a transaction"),
        ] {
            let e = err(body);
            assert_eq!(e.status, 400);
            assert!(e.body.get("index").is_none(), "{body}: {e:?}");
            assert!(e.message().contains(want), "{body}: {e:?}");
        }
    }

    #[test]
    fn producer_errors_map_to_statuses() {
        let moved = ApiError::from_producer(&ProducerError::HeadMoved {
            expected: 3,
            head: 5,
        });
        assert_eq!((moved.status, moved.body["seq"].as_u64()), (409, Some(5)));
        assert_eq!(
            ApiError::from_producer(&ProducerError::ShutDown).status,
            503
        );
        let too_big = ApiError::from_producer(&ProducerError::TransactionTooLarge {
            changes: 1,
            bytes: 1,
            parts: 9999,
        });
        assert_eq!(too_big.status, 400);
        assert!(check_key("").is_err() && check_key(&"k".repeat(256)).is_err());
        assert!(check_key("order-17").is_ok());
    }
}
