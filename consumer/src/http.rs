//! The consumer's HTTP endpoint (axum): health, readiness, metrics, status and reads of the
//! replica.
//!
//! Talks to HTTP clients; reads only from the [`Replica`] handle, so everything it serves is
//! committed.
//!
//! ```text
//! GET /healthz        200 "ok" while the process runs
//! GET /readyz         200 when bootstrapped and lag <= consumer.max_ready_lag, else 503
//! GET /metrics        Prometheus text
//! GET /v1/status      JSON Status, with the replica's headroom before retention prunes its
//!                     position (judged every few seconds in the background, never per request)
//! GET /v1/keys/{key}  200 one NDJSON line {"key":K,"value":V} (or "value_b64"); 404 absent
//! GET /v1/state       the whole replica as NDJSON sorted by key, at one sequence named in
//!                     the headers Deltasync-Seq, Deltasync-Lineage, Deltasync-Digest
//! ```

use crate::ndjson;
use crate::replica::Replica;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Longest a read waits for a view at the committed position (the engine publishes one with
/// its next commit when asked).
const FRESH_VIEW_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Bytes of NDJSON per chunk of a `/v1/state` response.
const STATE_CHUNK: usize = 64 * 1024;

/// The routes, for serving or for tests.
pub fn router(replica: Replica) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/keys/{*key}", get(key))
        .route("/v1/state", get(state))
        .with_state(replica)
}

/// Binds `addr` (port 0 picks one) and returns the listener and its address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Serves until `stop` is cancelled.
pub async fn serve(listener: TcpListener, replica: Replica, stop: CancellationToken) {
    let app = router(replica);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "The HTTP endpoint failed");
    }
}

async fn readyz(State(r): State<Replica>) -> Response {
    let s = r.status();
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

async fn metrics(State(r): State<Replica>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        r.metrics_text(),
    )
        .into_response()
}

async fn status(State(r): State<Replica>) -> Response {
    axum::Json(r.status()).into_response()
}

async fn key(State(r): State<Replica>, Path(key): Path<String>) -> Response {
    let view = r.fresh_view(FRESH_VIEW_WAIT).await;
    match view.get(&key) {
        Some(v) => {
            let mut line = ndjson::line(&key, v);
            line.push('\n');
            let mut resp = ([(header::CONTENT_TYPE, "application/json")], line).into_response();
            add_position(&mut resp, &view);
            resp
        }
        None => (StatusCode::NOT_FOUND, format!("no key {key:?}\n")).into_response(),
    }
}

fn add_position(resp: &mut Response, view: &crate::replica::View) {
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&view.seq().to_string()) {
        h.insert("deltasync-seq", v);
    }
    if let Ok(v) = HeaderValue::from_str(&view.lineage().to_hex()) {
        h.insert("deltasync-lineage", v);
    }
    if let Ok(v) = HeaderValue::from_str(&view.digest().to_hex()) {
        h.insert("deltasync-digest", v);
    }
}

async fn state(State(r): State<Replica>) -> Response {
    let view = r.fresh_view(FRESH_VIEW_WAIT).await;
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
