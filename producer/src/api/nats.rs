//! The write API as a NATS service (the async-nats `service` API, so `nats micro ls` lists
//! it): the same three operations and bodies as over HTTP, the receipt JSON as the reply.
//!
//! Talks to NATS on the producer's own connection (subscriptions to its endpoint subjects and
//! the `$SRV` discovery subjects, replies to requesters' inboxes) and to [`Api`].
//!
//! ```text
//! service   deltasync (metadata: pipeline)
//! subjects  deltasync.<pipeline>.api.txn       body {"txn":[...],"if_seq":N?}
//!           deltasync.<pipeline>.api.changes   body NDJSON ingest lines
//!           deltasync.<pipeline>.api.state     body NDJSON entry lines
//! header    Idempotency-Key (request), Idempotent-Replayed: true (reply, when replayed),
//!           Deltasync-Allow-Empty: true (state: a body without entries empties the state)
//! reply     the receipt JSON; on error the headers Nats-Service-Error (the message) and
//!           Nats-Service-Error-Code (400, 409, 413, 422, 500, 503) and the error JSON as body
//! ```
//!
//! Each request runs on its own task (a slow one does not hold back the others); commits
//! are still ordered by the producer's engine.

use super::{Answer, Api, ApiError, Body, Op, ALLOW_EMPTY};
use crate::publisher::NatsClient;
use async_nats::service::ServiceExt;
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use std::collections::HashMap;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The service's name (`nats micro ls`).
pub const SERVICE_NAME: &str = "deltasync";

/// The subject of `op` for `pipeline`: `deltasync.<pipeline>.api.<op>`.
pub fn subject(pipeline: &str, op: Op) -> String {
    format!("{}.{}", group(pipeline), op.name())
}

fn group(pipeline: &str) -> String {
    format!("deltasync.{pipeline}.api")
}

/// Why the service could not start.
pub type ServiceError = async_nats::Error;

/// Starts the service on `client` and serves until `shutdown`; the task ends after the
/// service is stopped and every request it took has been answered.
pub(crate) async fn spawn(
    api: Api,
    client: NatsClient,
    pipeline: &str,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, ServiceError> {
    let service = client
        .service_builder()
        .description("deltasync producer write API: txn, changes, state")
        .metadata(HashMap::from([(
            "pipeline".to_owned(),
            pipeline.to_owned(),
        )]))
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await?;
    let group = service.group(group(pipeline));
    let mut endpoints = Vec::new();
    for op in [Op::Txn, Op::Changes, Op::State] {
        let endpoint = group
            .endpoint_builder()
            .name(op.name())
            .add(op.name())
            .await?;
        endpoints.push((op, endpoint));
    }
    // The subscriptions are at the server before anyone is told the API is up.
    client.flush().await?;
    tracing::info!(
        service = SERVICE_NAME,
        subjects = %format!("{}.{{txn,changes,state}}", self::group(pipeline)),
        "NATS write API listening"
    );
    let requests = TaskTracker::new();
    let mut loops = Vec::new();
    for (op, mut endpoint) in endpoints {
        let (api, client, requests, shutdown) = (
            api.clone(),
            client.clone(),
            requests.clone(),
            shutdown.clone(),
        );
        loops.push(tokio::spawn(async move {
            loop {
                let request = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    r = endpoint.next() => match r {
                        Some(r) => r,
                        None => break,
                    },
                };
                let (api, client) = (api.clone(), client.clone());
                requests.spawn(async move { serve(&api, &client, op, request).await });
            }
        }));
    }
    Ok(tokio::spawn(async move {
        for l in loops {
            let _ = l.await;
        }
        if let Err(e) = service.stop().await {
            tracing::warn!(error = %e, "Stopping the NATS write API failed");
        }
        requests.close();
        requests.wait().await;
    }))
}

async fn serve(api: &Api, client: &NatsClient, op: Op, request: async_nats::service::Request) {
    let msg = &request.message;
    let key = msg
        .headers
        .as_ref()
        .and_then(|h| h.get("Idempotency-Key"))
        .map(|v| v.as_str().to_owned());
    let body = msg.payload.clone();
    let result = if body.len() as u64 > api.max_body_bytes() {
        Err(ApiError::too_large(format!(
            "the body is {} bytes, more than the {} bytes producer.api_max_body_bytes allows: \
             nothing was committed",
            body.len(),
            api.max_body_bytes()
        )))
    } else {
        match op {
            Op::Txn => api.txn(key.as_deref(), body).await,
            Op::State => {
                let allow_empty = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(ALLOW_EMPTY))
                    .is_some_and(|v| v.as_str().eq_ignore_ascii_case("true"));
                api.state(key.as_deref(), body, allow_empty).await
            }
            Op::Changes => api.changes(key.as_deref(), Body::Bytes(body)).await,
        }
    };
    if let Err(e) = reply(client, &request, result).await {
        tracing::warn!(endpoint = op.name(), error = %e, "Answering a NATS write API request failed");
    }
}

async fn reply(
    client: &NatsClient,
    request: &async_nats::service::Request,
    result: Result<Answer, ApiError>,
) -> Result<(), async_nats::Error> {
    match result {
        Ok(answer) => {
            let mut headers = HeaderMap::new();
            if answer.replayed {
                headers.insert("Idempotent-Replayed", "true");
            }
            request
                .respond_with_headers(Ok(answer.body), headers)
                .await?;
        }
        Err(e) => {
            // The service API sends an error without a body; the JSON body is the same as
            // over HTTP, so the reply is published here with the service error headers.
            let Some(reply) = request.message.reply.clone() else {
                return Ok(());
            };
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Service-Error", one_line(e.message()).as_str());
            headers.insert("Nats-Service-Error-Code", e.status.to_string().as_str());
            let body = Bytes::from(serde_json::to_vec(&e.body).unwrap_or_default());
            client.publish_with_headers(reply, headers, body).await?;
        }
    }
    Ok(())
}

/// A header value holds no line break.
fn one_line(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
}
