//! The producer's HTTP endpoint: liveness, readiness, Prometheus metrics and status.
//!
//! Talks to HTTP clients (axum on a Tokio listener) and reads the producer through an
//! [`Observer`]; it never changes anything.
//!
//! ```text
//! GET /healthz     200 "ok" unless the producer failed (503 with the reason)
//! GET /readyz      200 once recovered and publishing; 503 while starting, shutting down, failed
//! GET /metrics     Prometheus / OpenMetrics text
//! GET /v1/status   JSON: pipeline, lineage, seq, stream_seq, digest, last snapshot, phase
//! ```

use crate::shared::{Observer, Status};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::{Json, Router};
use std::net::SocketAddr;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The router, for embedding in another server.
pub fn router(observer: Observer) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .with_state(observer)
}

/// Binds `addr` and serves until `shutdown` is cancelled; returns the bound address (useful
/// with port 0) and the server task.
pub async fn spawn(
    addr: SocketAddr,
    observer: Observer,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, JoinHandle<std::io::Result<()>>)> {
    spawn_router(addr, router(observer), shutdown).await
}

/// Like [`spawn`], serving `router` ([`router`] merged with other routes, e.g. the write API
/// of `serve`).
pub async fn spawn_router(
    addr: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "HTTP endpoint listening");
    let task = tokio::spawn(async move {
        axum::serve(listener.tap_io(no_delay), router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    });
    Ok((local, task))
}

/// Turns Nagle's algorithm off on an accepted connection: a small response (a `POST /v1/txn`
/// receipt) otherwise can wait for the client's delayed ACK (~40 ms on Linux).
fn no_delay(tcp: &mut tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "Cannot set TCP_NODELAY on an HTTP connection");
    }
}

async fn healthz(State(o): State<Observer>) -> Response {
    if o.healthy() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        let reason = o.status().error.unwrap_or_default();
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("failed: {reason}\n"),
        )
            .into_response()
    }
}

async fn readyz(State(o): State<Observer>) -> Response {
    if o.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(o): State<Observer>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        o.metrics_text(),
    )
        .into_response()
}

async fn status(State(o): State<Observer>) -> Json<Status> {
    Json(o.status())
}
