//! The write API over HTTP (axum): the routes `serve` adds beside /healthz, /readyz,
//! /metrics and /v1/status.
//!
//! Talks to HTTP clients and to [`Api`]; reads bodies with the `producer.api_max_body_bytes`
//! limit (413 above it: upfront from `Content-Length`, else when the body grows past it).
//!
//! ```text
//! POST /v1/txn      {"txn":[op,...],"if_seq":N?}        200 receipt | 400 409 413 422 503
//! POST /v1/changes  NDJSON ingest lines (streamed)       200 receipt | 400 413 422 503
//! PUT  /v1/state    NDJSON {"key":K,"value":V} lines     200 receipt | 400 413 422 503
//!                   (no entries: 400 unless Deltasync-Allow-Empty: true)
//! request header    Idempotency-Key: <1..255 bytes>
//! response header   Idempotent-Replayed: true            (a retry answered from memory)
//! ```

use super::{Answer, Api, ApiError, Body as RequestBody, BodyTooLarge, ALLOW_EMPTY};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use axum::Router;
use futures::{StreamExt, TryStreamExt};
use tokio_util::io::StreamReader;

/// The request header naming a request for retries.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The response header of a replayed answer.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// The write routes, to merge with [`crate::http::router`].
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/v1/txn", post(txn))
        .route("/v1/changes", post(changes))
        .route("/v1/state", put(state))
        .with_state(api)
}

async fn txn(State(api): State<Api>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let key = idempotency_key(&headers)?;
        let body = read_all(&headers, body, api.max_body_bytes()).await?;
        api.txn(key.as_deref(), body).await
    };
    respond(result.await)
}

async fn state(State(api): State<Api>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let key = idempotency_key(&headers)?;
        let body = read_all(&headers, body, api.max_body_bytes()).await?;
        let allow_empty = headers
            .get(ALLOW_EMPTY)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        api.state(key.as_deref(), body, allow_empty).await
    };
    respond(result.await)
}

async fn changes(State(api): State<Api>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let key = idempotency_key(&headers)?;
        let limit = api.max_body_bytes();
        check_length(&headers, limit)?;
        let mut seen = 0u64;
        let stream = body
            .into_data_stream()
            .map_err(std::io::Error::other)
            .map(move |chunk| {
                let chunk = chunk?;
                seen += chunk.len() as u64;
                if seen > limit {
                    return Err(std::io::Error::other(BodyTooLarge { limit }));
                }
                Ok(chunk)
            });
        let reader = StreamReader::new(Box::pin(stream));
        api.changes(key.as_deref(), RequestBody::Reader(Box::new(reader)))
            .await
    };
    respond(result.await)
}

fn respond(result: Result<Answer, ApiError>) -> Response {
    let json = HeaderValue::from_static("application/json");
    match result {
        Ok(answer) => {
            let mut r =
                (StatusCode::OK, [(header::CONTENT_TYPE, json)], answer.body).into_response();
            if answer.replayed {
                r.headers_mut()
                    .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
            }
            r
        }
        Err(e) => {
            let status =
                StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let body = serde_json::to_vec(&e.body).unwrap_or_default();
            (status, [(header::CONTENT_TYPE, json)], body).into_response()
        }
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    headers
        .get(IDEMPOTENCY_KEY)
        .map(|v| {
            v.to_str().map(str::to_owned).map_err(|_| {
                ApiError::bad_request("Idempotency-Key must be visible ASCII characters")
            })
        })
        .transpose()
}

fn check_length(headers: &HeaderMap, limit: u64) -> Result<(), ApiError> {
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match length {
        Some(n) if n > limit => Err(ApiError::too_large(format!(
            "the body is {n} bytes, more than the {limit} bytes producer.api_max_body_bytes \
             allows: nothing was committed"
        ))),
        _ => Ok(()),
    }
}

/// The whole body, refused with 413 past `limit` bytes.
async fn read_all(headers: &HeaderMap, body: Body, limit: u64) -> Result<Bytes, ApiError> {
    check_length(headers, limit)?;
    let mut out = Vec::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
        if (out.len() + chunk.len()) as u64 > limit {
            return Err(ApiError::too_large(format!(
                "{}: nothing was committed",
                BodyTooLarge { limit }
            )));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(out))
}
