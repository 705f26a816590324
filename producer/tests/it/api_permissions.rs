//! `docs/permissions.md` as written, for the write API: `serve` runs with the producer block,
//! an application writer with the writer block commits through the NATS service and cannot
//! publish envelopes or read the stream or the bucket.

use crate::api::Serve;
use crate::support::{self, eventually, read_stream, replay};
use deltasync_core::names;
use deltasync_testkit::NatsServer;
use serde_json::Value;
use std::time::Duration;

/// The permissions document; the test runs its blocks exactly as written.
const PERMISSIONS_DOC: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../docs/permissions.md"
));

/// The fenced block after the marker comment, `<pipeline>` replaced.
fn permission_blocks(pipeline: &str) -> String {
    let marker = "<!-- The test extracts the fenced block right below this line";
    let at = PERMISSIONS_DOC
        .find(marker)
        .expect("docs/permissions.md keeps its marker comment");
    let rest = &PERMISSIONS_DOC[at..];
    let open = rest.find("```text\n").expect("a ```text block follows") + "```text\n".len();
    let body = &rest[open..];
    let close = body.find("\n```").expect("the block is closed");
    body[..close].replace("<pipeline>", pipeline)
}

fn violations(server: &NatsServer) -> Vec<String> {
    std::fs::read_to_string(server.log_path())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Violation"))
        .map(str::to_owned)
        .collect()
}

/// Waits until the server logged a violation on `subject`.
async fn violation_on(server: &NatsServer, subject: &str) -> String {
    let quoted = format!("\"{subject}\"");
    eventually(
        &format!("the server logs a violation on {subject}"),
        Duration::from_secs(10),
        async || violations(server).into_iter().find(|l| l.contains(&quoted)),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_writer_commits_through_the_service_and_cannot_touch_stream_or_bucket() {
    let pipeline = support::pipeline("api-perm");
    let blocks = permission_blocks(&pipeline);
    assert!(blocks.contains("DELTASYNC_WRITER = {"), "{blocks}");
    let config = format!(
        r#"
listen: "127.0.0.1:{{port}}"
jetstream {{ store_dir: "{{store_dir}}" }}

{blocks}

authorization {{
  users: [
    {{ user: producer, password: "producer-pw", permissions: $DELTASYNC_PRODUCER }}
    {{ user: consumer, password: "consumer-pw", permissions: $DELTASYNC_CONSUMER }}
    {{ user: writer, password: "writer-pw", permissions: $DELTASYNC_WRITER }}
    {{ user: admin, password: "admin-pw" }}
  ]
}}
"#
    );
    let server = NatsServer::start_with_config(&config);
    let serve = Serve::start(
        &server,
        &pipeline,
        &[
            ("DELTASYNC_NATS__USER", "producer"),
            ("DELTASYNC_NATS__PASSWORD", "producer-pw"),
        ],
    )
    .await;
    let writer =
        async_nats::ConnectOptions::with_user_and_password("writer".into(), "writer-pw".into())
            .connect(server.url())
            .await
            .expect("the writer connects");

    // Commits through the service work.
    let reply = writer
        .request(
            format!("deltasync.{pipeline}.api.txn"),
            r#"{"txn":[{"op":"put","key":"a","value":1}]}"#.into(),
        )
        .await
        .expect("the service answers the writer");
    let receipt: Value = serde_json::from_slice(&reply.payload).expect("a receipt");
    assert_eq!(receipt["seq"], 1, "{receipt}");
    let reply = writer
        .request(
            format!("deltasync.{pipeline}.api.changes"),
            "{\"op\":\"put\",\"key\":\"b\",\"value\":2}\n".into(),
        )
        .await
        .expect("the service answers the writer");
    let receipt: Value = serde_json::from_slice(&reply.payload).expect("a receipt");
    assert_eq!(receipt["seq"], 2, "{receipt}");

    // Everything else is refused: an envelope past the producer, the stream, the bucket.
    let envelopes = names::subject(&pipeline);
    let bucket = names::bucket_name(&pipeline);
    let stream_info = format!("$JS.API.STREAM.INFO.{}", names::stream_name(&pipeline));
    let kv_get = format!("$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.latest");
    for subject in [&envelopes, &stream_info, &kv_get] {
        writer
            .publish(subject.clone(), "forged".into())
            .await
            .expect("queued");
    }
    let kv_watch = format!("$KV.{bucket}.>");
    let _sub = writer.subscribe(kv_watch.clone()).await.expect("queued");
    writer.flush().await.expect("flush");
    for subject in [&envelopes, &stream_info, &kv_get, &kv_watch] {
        let line = violation_on(&server, subject).await;
        assert!(line.contains("user:writer\""), "{line}");
    }

    // The stream holds the two commits only, and the producer needed nothing more.
    let admin =
        async_nats::ConnectOptions::with_user_and_password("admin".into(), "admin-pw".into())
            .connect(server.url())
            .await
            .expect("admin connects");
    let js = async_nats::jetstream::new(admin);
    let replayed = replay(&read_stream(&js, &pipeline).await);
    assert_eq!(replayed.envelopes.len(), 2);
    assert_eq!(replayed.foreign, 0);
    let mut serve = serve;
    let (ok, log) = serve.stop();
    assert!(ok, "{log}");
    let producer_violations: Vec<String> = violations(&server)
        .into_iter()
        .filter(|l| !l.contains("user:writer\""))
        .collect();
    assert!(
        producer_violations.is_empty(),
        "serve needed more than the producer block: {producer_violations:#?}"
    );
}
