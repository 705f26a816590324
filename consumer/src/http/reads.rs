//! Reads of one view of the replica: one key, a prefix listing, the whole state, the
//! checksum; each optionally waits until the replica has applied a sequence (`min_seq`).
//!
//! Talks to HTTP clients and the [`Replica`](crate::Replica)'s views.
//!
//! ```text
//! GET /v1/keys/{key}[?min_seq=S&lineage=L&wait=5s]
//!     200 {"key":K,"value":V} | {"key":K,"value_b64":B}  (application/json, one line)
//!     200 the stored bytes with Accept: application/octet-stream
//!     404 {"error":"no key ...","key":K}
//! GET /v1/keys?prefix=P&after=K&limit=N[&min_seq=...]
//!     200 NDJSON {"key","value"|"value_b64"} of the keys starting with P and > K (byte
//!     order), in key order, at most N (default 1000, capped at 100000); when more remain,
//!     header Deltasync-Next-After: the last key returned, percent-encoded (pass it as `after`)
//! GET /v1/state[?min_seq=...]           200 NDJSON of every entry in key order
//! GET /v1/checksum[?min_seq=...]        200 {"seq","lineage","digest","stream_seq","entries"}
//!
//! headers of each: Deltasync-Seq, Deltasync-Lineage, Deltasync-Digest (the view read)
//! min_seq not reached within `wait` (default 5s, capped at 5m):
//!     504 {"error":"...","seq":<committed seq>,"lineage":"<hex>"}
//! ```
//!
//! The state is a hash map: a prefix listing scans every entry of the view (on a blocking
//! thread) and sorts only the matches, O(state) per request. A service that lists a large
//! replica often should follow `/v1/watch` and keep its own index.

use super::params::Params;
use super::{add_position, bad_request, json, Api};
use crate::ndjson;
use crate::replica::{View, WaitError};
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use std::time::Duration;

/// Longest a read waits for a view at the committed position (the engine publishes one with
/// its next commit when asked).
const FRESH_VIEW_WAIT: Duration = Duration::from_secs(1);

/// Default and longest `wait` of a `min_seq` read.
const MIN_SEQ_WAIT: Duration = Duration::from_secs(5);
const MIN_SEQ_WAIT_MAX: Duration = Duration::from_secs(300);

/// Default and largest `limit` of a prefix listing.
const LIST_LIMIT: usize = 1000;
const LIST_LIMIT_MAX: usize = 100_000;

/// Bytes of NDJSON per chunk of a `/v1/state` response.
const STATE_CHUNK: usize = 64 * 1024;

/// The parameters of a wait for a sequence.
const MIN_SEQ_PARAMS: [&str; 3] = ["min_seq", "lineage", "wait"];

type Pairs = Query<Vec<(String, String)>>;

/// Why a read of a view is not answered with it.
#[derive(Debug)]
enum Refusal {
    /// A bad query parameter: 400 naming it.
    Bad(String),
    /// `min_seq` not reached within `wait`: 504.
    NotReached(WaitError, Duration),
    /// The endpoint is stopping: 503.
    Stopping,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Bad(message) => bad_request(message),
            Refusal::NotReached(e, wait) => json(
                StatusCode::GATEWAY_TIMEOUT,
                serde_json::json!({
                    "error": format!("{e} after waiting {}", humantime::format_duration(wait)),
                    "seq": e.seq,
                    "lineage": e.lineage.to_hex(),
                }),
            ),
            Refusal::Stopping => json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({ "error": "the consumer is shutting down" }),
            ),
        }
    }
}

/// The parameters `allowed` (and those of `min_seq`).
fn parse(Query(pairs): Pairs, allowed: &[&str]) -> Result<Params, Refusal> {
    let all: Vec<&str> = allowed.iter().chain(&MIN_SEQ_PARAMS).copied().collect();
    Params::new(pairs, &all).map_err(Refusal::Bad)
}

/// The view to read: at `min_seq` or later when asked (504 after `wait`), else a fresh one.
async fn view_for(api: &Api, p: &Params) -> Result<Arc<View>, Refusal> {
    let min_seq = p.u64("min_seq").map_err(Refusal::Bad)?;
    let lineage = p.lineage("lineage").map_err(Refusal::Bad)?;
    let wait = p
        .duration("wait", MIN_SEQ_WAIT, MIN_SEQ_WAIT_MAX)
        .map_err(Refusal::Bad)?;
    let Some(seq) = min_seq else {
        if lineage.is_some() || p.str("wait").is_some() {
            return Err(Refusal::Bad(
                "query parameters lineage and wait need min_seq".to_owned(),
            ));
        }
        return Ok(api.replica.fresh_view(FRESH_VIEW_WAIT).await);
    };
    tokio::select! {
        biased;
        _ = api.stop.cancelled() => Err(Refusal::Stopping),
        r = api.replica.wait_for_in(lineage, seq, wait) => r.map_err(|e| Refusal::NotReached(e, wait)),
    }
}

/// Parses `q` and reads the view it asks for.
async fn view_of(api: &Api, q: Pairs, allowed: &[&str]) -> Result<(Params, Arc<View>), Refusal> {
    let p = parse(q, allowed)?;
    let view = view_for(api, &p).await?;
    Ok((p, view))
}

/// `GET /v1/keys/{key}`.
pub async fn key(
    State(api): State<Api>,
    Path(key): Path<String>,
    headers: HeaderMap,
    q: Pairs,
) -> Response {
    let view = match view_of(&api, q, &[]).await {
        Ok((_, v)) => v,
        Err(refusal) => return refusal.into_response(),
    };
    let raw = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/octet-stream"));
    let mut resp = match view.get(&key) {
        Some(v) if raw => (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            Bytes::copy_from_slice(v),
        )
            .into_response(),
        Some(v) => {
            let mut line = ndjson::line(&key, v);
            line.push('\n');
            ([(header::CONTENT_TYPE, "application/json")], line).into_response()
        }
        None => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": format!("no key {key:?}"), "key": key }),
        ),
    };
    add_position(&mut resp, &view);
    resp
}

/// `GET /v1/keys?prefix=P&after=K&limit=N`.
pub async fn list(State(api): State<Api>, q: Pairs) -> Response {
    let p = match parse(q, &["prefix", "after", "limit"]) {
        Ok(p) => p,
        Err(refusal) => return refusal.into_response(),
    };
    let limit = match p.limit("limit", LIST_LIMIT, LIST_LIMIT_MAX) {
        Ok(l) => l,
        Err(e) => return bad_request(e),
    };
    let view = match view_for(&api, &p).await {
        Ok(v) => v,
        Err(refusal) => return refusal.into_response(),
    };
    let prefix = p.str("prefix").unwrap_or("").to_owned();
    let after = p.str("after").map(str::to_owned);
    let v = view.clone();
    let listed = tokio::task::spawn_blocking(move || {
        let (entries, more) = list_entries(&v, &prefix, after.as_deref(), limit);
        let mut body = Vec::new();
        for (k, val) in &entries {
            ndjson::write_line(&mut body, k, val);
        }
        let next = more.then(|| entries.last().map(|(k, _)| percent_encode(k)));
        (body, next.flatten())
    })
    .await;
    let Ok((body, next)) = listed else {
        return json(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({ "error": "listing the keys failed" }),
        );
    };
    let mut resp = ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response();
    add_position(&mut resp, &view);
    if let Some(next) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
        resp.headers_mut().insert("deltasync-next-after", next);
    }
    resp
}

/// The entries of `view` whose key starts with `prefix` and sorts after `after`, in key
/// (byte) order, at most `limit`; and whether more matched.
pub fn list_entries<'a>(
    view: &'a View,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
) -> (Vec<(&'a str, &'a [u8])>, bool) {
    let mut hits: Vec<(&str, &[u8])> = view
        .state()
        .iter()
        .filter(|(k, _)| k.starts_with(prefix) && after.is_none_or(|a| k.as_bytes() > a.as_bytes()))
        .collect();
    let more = hits.len() > limit;
    if more {
        hits.select_nth_unstable_by(limit, |a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        hits.truncate(limit);
    }
    hits.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    (hits, more)
}

/// `s` percent-encoded except for RFC 3986's unreserved characters: a header value and a
/// query value at once.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `GET /v1/state`.
pub async fn state(State(api): State<Api>, q: Pairs) -> Response {
    let view = match view_of(&api, q, &[]).await {
        Ok((_, v)) => v,
        Err(refusal) => return refusal.into_response(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let v = view.clone();
    tokio::task::spawn_blocking(move || {
        let mut buf = Vec::with_capacity(STATE_CHUNK + 4096);
        for (k, val) in v.state().sorted_entries() {
            ndjson::write_line(&mut buf, k, val);
            if buf.len() >= STATE_CHUNK {
                let chunk = Bytes::from(std::mem::replace(
                    &mut buf,
                    Vec::with_capacity(STATE_CHUNK + 4096),
                ));
                if tx.blocking_send(Ok(chunk)).is_err() {
                    return; // the client went away
                }
            }
        }
        if !buf.is_empty() {
            let _ = tx.blocking_send(Ok(Bytes::from(buf)));
        }
    });
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    }));
    let mut resp = ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response();
    add_position(&mut resp, &view);
    resp
}

/// `GET /v1/checksum`.
pub async fn checksum(State(api): State<Api>, q: Pairs) -> Response {
    let view = match view_of(&api, q, &[]).await {
        Ok((_, v)) => v,
        Err(refusal) => return refusal.into_response(),
    };
    let mut resp = json(
        StatusCode::OK,
        serde_json::json!({
            "seq": view.seq(),
            "lineage": view.lineage().to_hex(),
            "digest": view.digest().to_hex(),
            "stream_seq": view.stream_seq(),
            "entries": view.len(),
        }),
    );
    add_position(&mut resp, &view);
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use deltasync_core::{Change, Lineage, State as Entries};

    #[test]
    fn a_listing_pages_through_the_prefix_in_key_order() {
        let mut s = Entries::new(Lineage([1; 16]));
        let changes: Vec<Change> = ["b/2", "a/1", "b/1", "b/3", "c", "b", "b/\u{e9}"]
            .iter()
            .map(|k| Change::put(*k, &b"1"[..]))
            .collect();
        s.apply_changes(&changes);
        let view = View::new(s, 1);
        let keys = |(e, more): (Vec<(&str, &[u8])>, bool)| {
            (
                e.iter().map(|(k, _)| (*k).to_owned()).collect::<Vec<_>>(),
                more,
            )
        };
        assert_eq!(
            keys(list_entries(&view, "b/", None, 2)),
            (vec!["b/1".to_owned(), "b/2".to_owned()], true)
        );
        assert_eq!(
            keys(list_entries(&view, "b/", Some("b/2"), 2)),
            (vec!["b/3".to_owned(), "b/\u{e9}".to_owned()], false)
        );
        assert_eq!(keys(list_entries(&view, "", None, 100)).0.len(), 7);
        assert_eq!(keys(list_entries(&view, "zz", None, 100)), (vec![], false));
        assert_eq!(percent_encode("b/\u{e9} x"), "b%2F%C3%A9%20x");
    }
}
