//! Following the replica over HTTP: a long-poll (`/v1/changes`) and Server-Sent Events
//! (`/v1/watch`), both reading the replica's shared feed through a cursor each, so a
//! thousand followers cost a thousand cursors, not a thousand copies.
//!
//! Talks to HTTP clients and the [`Replica`](crate::Replica)'s feed
//! ([`crate::replica::feed`], where the decisions are made and tested).
//!
//! ```text
//! GET /v1/changes?after=S[&lineage=L][&wait=30s][&limit=N]
//!   after    required: the sequence the client has (from /v1/state's Deltasync-Seq, or the
//!            last line's "seq")
//!   lineage  optional: the lineage of `after` (32 hex); another one is a 409
//!   wait     default 30s, capped at 5m
//!   limit    batches per answer, default 1000, capped at 10000
//!   200 application/x-ndjson, one line per committed batch after S, in order, as soon as
//!       there is one; empty when `wait` passed first
//!       {"seq":S,"prev_seq":P,"lineage":"<hex>","changes":[{"op":"put","key":K,"value":V} |
//!        {"op":"put","key":K,"value_b64":B} | {"op":"del","key":K}]}
//!   409 {"must_refetch":true,"seq":<head>,"lineage":"<hex>"}: S is below the feed's floor, of
//!       another lineage, inside a transaction, or a re-snapshot happened while waiting;
//!       re-read /v1/state and continue after its Deltasync-Seq
//!   404 {"error":...} the feed is off (consumer.feed_max_bytes = 0)
//!   headers Deltasync-Seq, Deltasync-Lineage: the replica's committed head
//!   S ahead of the head (a faster replica's position) waits for it.
//!
//! GET /v1/watch[?after=S&lineage=L]       text/event-stream
//!   from after=S, else the Last-Event-ID header, else the head now (the larger of the query's
//!   and the header's when both are given: a reconnecting EventSource sends both); `lineage`
//!   other than the replica's: must-refetch at once
//!   event: batch          id: <seq>   data: <the same JSON line>
//!   event: must-refetch               data: {"must_refetch":true,"seq":<head>,"lineage":"<hex>"}
//!                                     then the stream ends
//!   ": keep-alive" comments every consumer.watch_keepalive (15s)
//! ```

use super::params::Params;
use super::{add_head, bad_request, json, Api};
use crate::replica::feed::{Cursor, FeedBatch, Step};
use crate::replica::metrics::Following;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use deltasync_core::Lineage;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

/// Default and longest `wait` of a long-poll.
const CHANGES_WAIT: Duration = Duration::from_secs(30);
const CHANGES_WAIT_MAX: Duration = Duration::from_secs(300);

/// Default and largest `limit` of a long-poll.
const CHANGES_LIMIT: usize = 1000;
const CHANGES_LIMIT_MAX: usize = 10_000;

/// Batches a watch stream takes from the feed at once: one, so that a stalled client holds
/// no more than the batch it is being sent (and what the socket buffers), never a share of
/// the ring the ring has already let go.
const WATCH_TAKE: usize = 1;

type Pairs = Query<Vec<(String, String)>>;

fn feed_off() -> Response {
    json(
        StatusCode::NOT_FOUND,
        serde_json::json!({
            "error": "the change feed is off (consumer.feed_max_bytes = 0)"
        }),
    )
}

fn must_refetch_body(lineage: Lineage, seq: u64) -> serde_json::Value {
    serde_json::json!({ "must_refetch": true, "seq": seq, "lineage": lineage.to_hex() })
}

/// `GET /v1/changes`.
pub async fn changes(State(api): State<Api>, Query(pairs): Pairs) -> Response {
    let p = match Params::new(pairs, &["after", "lineage", "wait", "limit"]) {
        Ok(p) => p,
        Err(e) => return bad_request(e),
    };
    let parsed = (|| {
        let after = p.u64("after")?.ok_or_else(|| {
            "query parameter after is required: the sequence the client has (Deltasync-Seq of /v1/state)"
                .to_owned()
        })?;
        Ok::<_, String>((
            after,
            p.lineage("lineage")?,
            p.duration("wait", CHANGES_WAIT, CHANGES_WAIT_MAX)?,
            p.limit("limit", CHANGES_LIMIT, CHANGES_LIMIT_MAX)?,
        ))
    })();
    let (after, lineage, wait, limit) = match parsed {
        Ok(v) => v,
        Err(e) => return bad_request(e),
    };
    if !api.replica.feed_on() {
        return feed_off();
    }
    let mut cursor = Cursor::after(after, lineage);
    let mut ticks = api.replica.feed_ticks();
    let _counted = Following::new(api.replica.metrics());
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        ticks.borrow_and_update();
        let (step, lineage_now, head) = {
            let f = api.replica.feed();
            (cursor.next(&f, limit), f.lineage(), f.head())
        };
        let mut resp = match step {
            Step::Batches(batches) => ndjson_body(batches),
            Step::Lost => {
                api.replica.metrics().followers_lost.inc();
                json(StatusCode::CONFLICT, must_refetch_body(lineage_now, head))
            }
            Step::Wait => {
                let more = tokio::select! {
                    biased;
                    _ = api.stop.cancelled() => false,
                    _ = tokio::time::sleep_until(deadline) => false,
                    r = ticks.changed() => r.is_ok(),
                };
                if more {
                    continue;
                }
                ndjson_body(Vec::new())
            }
        };
        add_head(&mut resp, lineage_now, head);
        return resp;
    }
}

fn ndjson_body(batches: Vec<Arc<FeedBatch>>) -> Response {
    let chunks = batches
        .into_iter()
        .map(|b| Ok::<Bytes, Infallible>(b.line().clone()));
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(futures::stream::iter(chunks)),
    )
        .into_response()
}

/// `GET /v1/watch`.
pub async fn watch(State(api): State<Api>, headers: HeaderMap, Query(pairs): Pairs) -> Response {
    let p = match Params::new(pairs, &["after", "lineage"]) {
        Ok(p) => p,
        Err(e) => return bad_request(e),
    };
    let last_event_id = match headers.get("last-event-id").map(|v| v.to_str()) {
        None => None,
        Some(Ok(v)) => match v.trim().parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                return bad_request(format!(
                    "header Last-Event-ID {v:?} is not a sequence (a whole number)"
                ))
            }
        },
        Some(Err(_)) => {
            return bad_request("header Last-Event-ID is not visible ASCII".to_owned());
        }
    };
    let (after, lineage) = match (p.u64("after"), p.lineage("lineage")) {
        (Ok(a), Ok(l)) => (a, l),
        (Err(e), _) | (_, Err(e)) => return bad_request(e),
    };
    if !api.replica.feed_on() {
        return feed_off();
    }
    let after = match (after, last_event_id) {
        (Some(a), Some(h)) => Some(a.max(h)),
        (a, h) => a.or(h),
    };
    let (head_lineage, head) = {
        let f = api.replica.feed();
        (f.lineage(), f.head())
    };
    let keepalive = KeepAlive::new().interval(api.keepalive).text("keep-alive");
    let stream = watch_stream(api, after.map(|a| Cursor::after(a, lineage)), lineage);
    let mut resp = Sse::new(stream).keep_alive(keepalive).into_response();
    add_head(&mut resp, head_lineage, head);
    resp
}

/// The events of one watcher. `cursor` `None`: from the head at the first commit seen, which
/// must be of `lineage` when one is given (else must-refetch at once).
fn watch_stream(
    api: Api,
    cursor: Option<Cursor>,
    lineage: Option<Lineage>,
) -> impl futures::Stream<Item = Result<Event, Infallible>> + Send + 'static {
    struct Watcher {
        api: Api,
        cursor: Option<Cursor>,
        pending: VecDeque<Arc<FeedBatch>>,
        ticks: tokio::sync::watch::Receiver<u64>,
        ended: bool,
        /// The lineage a watcher from the head expects.
        lineage: Option<Lineage>,
        _counted: Following,
    }
    let w = Watcher {
        lineage,
        _counted: Following::new(api.replica.metrics()),
        ticks: api.replica.feed_ticks(),
        api,
        cursor,
        pending: VecDeque::new(),
        ended: false,
    };
    futures::stream::unfold(w, |mut w| async move {
        loop {
            if w.ended {
                return None;
            }
            if let Some(b) = w.pending.pop_front() {
                return Some((Ok(batch_event(&b)), w));
            }
            w.ticks.borrow_and_update();
            let step = {
                let f = w.api.replica.feed();
                match w.cursor.as_mut() {
                    Some(c) => Ok(c.next(&f, WATCH_TAKE)),
                    None if f.epoch() == 0 => Ok(Step::Wait),
                    None => Err(Cursor::at_head(&f)),
                }
                .map(|step| (step, f.lineage(), f.head()))
            };
            match step {
                Err(mut at_head) => {
                    at_head.lineage = w.lineage.or(at_head.lineage);
                    w.cursor = Some(at_head);
                }
                Ok((Step::Batches(b), _, _)) => w.pending.extend(b),
                Ok((Step::Lost, lineage, head)) => {
                    w.ended = true;
                    w.api.replica.metrics().followers_lost.inc();
                    let event = Event::default()
                        .event("must-refetch")
                        .data(must_refetch_body(lineage, head).to_string());
                    return Some((Ok(event), w));
                }
                Ok((Step::Wait, _, _)) => {
                    let more = tokio::select! {
                        biased;
                        _ = w.api.stop.cancelled() => false,
                        r = w.ticks.changed() => r.is_ok(),
                    };
                    if !more {
                        return None;
                    }
                }
            }
        }
    })
}

fn batch_event(b: &FeedBatch) -> Event {
    let line = b.line();
    let text = line.strip_suffix(b"\n").unwrap_or(line);
    Event::default()
        .event("batch")
        .id(b.batch().seq.to_string())
        .data(String::from_utf8_lossy(text))
}
