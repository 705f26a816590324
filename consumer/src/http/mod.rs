//! The consumer's HTTP endpoint (axum): health, readiness, metrics, status, reads of the
//! replica, and following its changes.
//!
//! Talks to HTTP clients; reads only from the [`Replica`] handle, so everything it serves is
//! committed. Reads live in [`reads`], following in [`feed`]; query parameters are parsed in
//! [`params`].
//!
//! ```text
//! GET /healthz           200 "ok" while the process runs
//! GET /readyz            200 when bootstrapped and lag <= consumer.max_ready_lag, else 503
//! GET /metrics           Prometheus text
//! GET /v1/status         JSON Status, with the replica's headroom before retention prunes its
//!                        position (judged every few seconds in the background, never per request)
//! GET /v1/keys/{key}     200 one NDJSON line {"key":K,"value":V} (or "value_b64"); 404 absent;
//!                        Accept: application/octet-stream -> the stored bytes
//! GET /v1/keys?prefix=P&after=K&limit=N
//!                        NDJSON lines of the keys with that prefix, after K, in key order
//! GET /v1/state          the whole replica as NDJSON sorted by key
//! GET /v1/checksum       {"seq","lineage","digest","stream_seq","entries"}
//! GET /v1/changes?after=S[&lineage=L][&wait=30s][&limit=N]
//!                        long-poll: NDJSON, one line per committed batch after S
//! GET /v1/watch[?after=S&lineage=L]
//!                        Server-Sent Events: `batch` events, then `must-refetch` if lost
//! ```
//!
//! Every read names the position it was taken at in the headers `Deltasync-Seq`,
//! `Deltasync-Lineage` (and `Deltasync-Digest` for reads of a view); the reads of a view take
//! `min_seq=S[&lineage=L][&wait=5s]` to wait until the replica has applied S (504 after it).
//! Errors are JSON `{"error": "..."}` naming the bad input (400), or the shapes documented
//! per route.

pub mod feed;
pub mod params;
pub mod reads;

use crate::replica::{Replica, View};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use deltasync_core::Lineage;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What every handler gets.
#[derive(Clone, Debug)]
pub struct Api {
    pub replica: Replica,
    /// Cancelled at shutdown: ends long-polls and watch streams, which would otherwise hold
    /// the graceful shutdown open.
    pub stop: CancellationToken,
    /// Heartbeat interval of `/v1/watch` (`consumer.watch_keepalive`).
    pub keepalive: Duration,
}

/// The routes, for serving or for tests.
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/keys", get(reads::list))
        .route("/v1/keys/{*key}", get(reads::key))
        .route("/v1/state", get(reads::state))
        .route("/v1/checksum", get(reads::checksum))
        .route("/v1/changes", get(feed::changes))
        .route("/v1/watch", get(feed::watch))
        .with_state(api)
}

/// Binds `addr` (port 0 picks one) and returns the listener and its address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Serves until `api.stop` is cancelled.
pub async fn serve(listener: TcpListener, api: Api) {
    let stop = api.stop.clone();
    let app = router(api);
    if let Err(e) = axum::serve(listener.tap_io(no_delay), app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "The HTTP endpoint failed");
    }
}

/// Turns Nagle's algorithm off on an accepted connection: a watcher's small SSE events
/// otherwise wait for the client's delayed ACK (~40 ms on Linux), which showed as the p99 of
/// one watcher's commit-to-delivery latency (BENCHMARKS.md, issue 14's feed row).
fn no_delay(tcp: &mut tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "Cannot set TCP_NODELAY on an HTTP connection");
    }
}

async fn readyz(axum::extract::State(api): axum::extract::State<Api>) -> Response {
    let s = api.replica.status();
    if s.ready {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let why = if s.bootstrapped {
            format!("not ready: lag {} exceeds the allowed lag\n", s.lag)
        } else {
            "not ready: not bootstrapped yet\n".to_owned()
        };
        (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
    }
}

async fn metrics(axum::extract::State(api): axum::extract::State<Api>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        api.replica.metrics_text(),
    )
        .into_response()
}

async fn status(axum::extract::State(api): axum::extract::State<Api>) -> Response {
    axum::Json(api.replica.status()).into_response()
}

/// Sets `Deltasync-Seq` and `Deltasync-Lineage`.
pub(crate) fn add_head(resp: &mut Response, lineage: Lineage, seq: u64) {
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&seq.to_string()) {
        h.insert("deltasync-seq", v);
    }
    if let Ok(v) = HeaderValue::from_str(&lineage.to_hex()) {
        h.insert("deltasync-lineage", v);
    }
}

/// Sets `Deltasync-Seq`, `Deltasync-Lineage` and `Deltasync-Digest` of `view`.
pub(crate) fn add_position(resp: &mut Response, view: &View) {
    add_head(resp, view.lineage(), view.seq());
    if let Ok(v) = HeaderValue::from_str(&view.digest().to_hex()) {
        resp.headers_mut().insert("deltasync-digest", v);
    }
}

/// A JSON response.
pub(crate) fn json(code: StatusCode, body: serde_json::Value) -> Response {
    (code, axum::Json(body)).into_response()
}

/// `400 {"error": message}`.
pub(crate) fn bad_request(message: String) -> Response {
    json(
        StatusCode::BAD_REQUEST,
        serde_json::json!({ "error": message }),
    )
}
