//! Connecting and creating a pipeline's stream and bucket, against real nats-servers.
//!
//! Talks to nats-server processes started by `deltasync-testkit` through
//! `deltasync_nats::connect`; reads what the server reports back with plain async-nats calls.

use crate::support::{eventually, settings, unique_pipeline};
use async_nats::jetstream::stream::{DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::ConnectErrorKind;
use deltasync_config::settings::{Secret, Settings, StorageKind};
use deltasync_core::names;
use deltasync_nats::NatsError;
use deltasync_testkit::{NatsCluster, NatsServer};
use std::time::{Duration, Instant};

async fn connect(settings: &Settings) -> async_nats::jetstream::Context {
    let client = deltasync_nats::connect(&settings.nats).await.unwrap();
    deltasync_nats::jetstream(client, &settings.nats)
}

/// The stream's configuration as the server reports it now (a fresh info request).
async fn server_stream_config(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> async_nats::jetstream::stream::Config {
    js.get_stream(name)
        .await
        .unwrap()
        .cached_info()
        .config
        .clone()
}

#[tokio::test]
async fn ensure_stream_creates_the_stream_with_exactly_the_configured_limits() {
    let server = NatsServer::start();
    let mut s = settings(&server.url(), &unique_pipeline("create"));
    s.stream.max_messages = 123_456;
    s.stream.max_bytes = 456_789_012;
    s.stream.max_age = Duration::from_secs(3 * 3600);
    s.stream.duplicate_window = Duration::from_secs(90);
    s.stream.max_message_bytes = 900 * 1024;
    s.producer.batch_max_bytes = 512 * 1024;
    s.snapshot.chunk_target_bytes = 256 * 1024;
    s.snapshot.every_envelopes = 1000;
    s.snapshot.every = Duration::from_secs(60);
    s.validate().unwrap();
    let js = connect(&s).await;

    let stream = deltasync_nats::ensure_stream(&js, &s).await.unwrap();
    assert_eq!(
        stream.cached_info().config.name,
        names::stream_name(&s.pipeline)
    );

    let c = server_stream_config(&js, &names::stream_name(&s.pipeline)).await;
    assert_eq!(c.subjects, [names::subject(&s.pipeline)]);
    assert_eq!(c.retention, RetentionPolicy::Limits);
    assert_eq!(c.max_messages, 123_456);
    assert_eq!(c.max_bytes, 456_789_012);
    assert_eq!(c.max_age, Duration::from_secs(3 * 3600));
    assert_eq!(c.num_replicas, 1);
    assert_eq!(c.storage, StorageType::File);
    assert_eq!(c.duplicate_window, Duration::from_secs(90));
    assert_eq!(c.discard, DiscardPolicy::Old);
    assert!(c.allow_direct);
    assert_eq!(c.max_message_size, 900 * 1024);
}

#[tokio::test]
async fn ensure_stream_a_second_time_updates_changed_limits_and_keeps_the_rest() {
    let server = NatsServer::start();
    let mut s = settings(&server.url(), &unique_pipeline("update"));
    let js = connect(&s).await;
    let name = names::stream_name(&s.pipeline);
    deltasync_nats::ensure_stream(&js, &s).await.unwrap();

    // An operator's own change to a field deltasync does not manage.
    let mut operator = server_stream_config(&js, &name).await;
    operator.max_consumers = 50;
    js.update_stream(&operator).await.unwrap();

    // Unchanged settings: nothing to do, still fine.
    deltasync_nats::ensure_stream(&js, &s).await.unwrap();

    s.stream.max_messages = 2_000_000;
    s.stream.max_bytes = -1;
    s.stream.max_age = Duration::from_secs(48 * 3600);
    s.stream.duplicate_window = Duration::from_secs(300);
    s.stream.max_message_bytes = 1024 * 1024 - 1;
    s.validate().unwrap();
    let stream = deltasync_nats::ensure_stream(&js, &s).await.unwrap();
    assert_eq!(
        stream.cached_info().config.max_messages,
        2_000_000,
        "fresh info returned"
    );

    let c = server_stream_config(&js, &name).await;
    assert_eq!(c.max_messages, 2_000_000);
    assert_eq!(c.max_bytes, -1);
    assert_eq!(c.max_age, Duration::from_secs(48 * 3600));
    assert_eq!(c.duplicate_window, Duration::from_secs(300));
    assert_eq!(c.max_message_size, 1024 * 1024 - 1);
    assert_eq!(
        c.max_consumers, 50,
        "fields deltasync does not manage are left alone"
    );
}

#[tokio::test]
async fn changing_the_storage_of_an_existing_stream_is_refused_with_the_change_named() {
    let server = NatsServer::start();
    let mut s = settings(&server.url(), &unique_pipeline("storage"));
    let js = connect(&s).await;
    deltasync_nats::ensure_stream(&js, &s).await.unwrap();

    s.stream.storage = StorageKind::Memory;
    let err = deltasync_nats::ensure_stream(&js, &s).await.unwrap_err();
    assert!(matches!(err, NatsError::UpdateStream { .. }), "{err}");
    assert!(err.to_string().contains("storage"), "{err}");
}

#[tokio::test]
async fn ensure_bucket_creates_the_bucket_with_the_configured_settings_and_updates_it() {
    let server = NatsServer::start();
    let mut s = settings(&server.url(), &unique_pipeline("bucket"));
    s.stream.storage = StorageKind::Memory;
    s.stream.max_message_bytes = 800 * 1024;
    s.producer.batch_max_bytes = 512 * 1024;
    s.snapshot.chunk_target_bytes = 512 * 1024;
    s.validate().unwrap();
    let js = connect(&s).await;

    let store = deltasync_nats::ensure_bucket(&js, &s).await.unwrap();
    let bucket = names::bucket_name(&s.pipeline);
    // The bucket works: a value round-trips.
    store.put("manifest.1", "hello".into()).await.unwrap();
    let got = store.get("manifest.1").await.unwrap().unwrap();
    assert_eq!(&got[..], b"hello");

    let c = server_stream_config(&js, &format!("KV_{bucket}")).await;
    assert_eq!(c.max_messages_per_subject, deltasync_nats::BUCKET_HISTORY);
    assert_eq!(c.max_message_size, 800 * 1024);
    assert_eq!(c.storage, StorageType::Memory);
    assert_eq!(c.num_replicas, 1);
    assert!(c.allow_direct);

    // Idempotent, then a changed value size is applied.
    deltasync_nats::ensure_bucket(&js, &s).await.unwrap();
    s.stream.max_message_bytes = 1024 * 1024;
    s.validate().unwrap();
    let store = deltasync_nats::ensure_bucket(&js, &s).await.unwrap();
    let c = server_stream_config(&js, &format!("KV_{bucket}")).await;
    assert_eq!(c.max_message_size, 1024 * 1024);
    // Data survived the update.
    let got = store.get("manifest.1").await.unwrap().unwrap();
    assert_eq!(&got[..], b"hello");
}

#[tokio::test]
async fn a_message_limit_above_the_servers_max_payload_is_refused() {
    let server = NatsServer::start();
    let mut s = settings(&server.url(), &unique_pipeline("payload"));
    s.stream.max_message_bytes = 2 * 1024 * 1024;
    s.validate().unwrap();
    let js = connect(&s).await;
    let err = deltasync_nats::ensure_stream(&js, &s).await.unwrap_err();
    assert!(
        matches!(
            err,
            NatsError::MaxPayload {
                max_message_bytes: 2_097_152,
                max_payload: 1_048_576
            }
        ),
        "{err}"
    );
    let err = deltasync_nats::ensure_bucket(&js, &s).await.unwrap_err();
    assert!(matches!(err, NatsError::MaxPayload { .. }), "{err}");
}

#[tokio::test]
async fn stream_bounds_follow_publishing_and_pruning() {
    let server = NatsServer::start();
    let mut s = settings(&server.url(), &unique_pipeline("bounds"));
    s.stream.max_messages = 10;
    s.snapshot.every_envelopes = 5;
    s.validate().unwrap();
    let js = connect(&s).await;

    let err = deltasync_nats::stream_bounds(&js, &s).await.unwrap_err();
    assert!(matches!(err, NatsError::StreamNotFound { .. }), "{err}");

    deltasync_nats::ensure_stream(&js, &s).await.unwrap();
    let empty = deltasync_nats::stream_bounds(&js, &s).await.unwrap();
    assert_eq!(
        (empty.messages, empty.last_seq, empty.first_ts),
        (0, 0, None)
    );

    let before = std::time::SystemTime::now() - Duration::from_secs(5);
    for i in 0..25u32 {
        js.send_publish(
            names::subject(&s.pipeline),
            async_nats::jetstream::message::PublishMessage::build()
                .payload(i.to_be_bytes().to_vec().into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let b = deltasync_nats::stream_bounds(&js, &s).await.unwrap();
    assert_eq!(b.last_seq, 25);
    assert_eq!(b.messages, 10);
    assert_eq!(b.first_seq, 16, "the oldest 15 were pruned by max_messages");
    assert!(b.bytes > 0);
    assert!(b.first_ts.unwrap() > before);
}

#[tokio::test]
async fn connecting_to_a_closed_port_fails_fast_naming_the_url() {
    let url = format!("nats://127.0.0.1:{}", deltasync_testkit::free_port());
    let mut s = Settings::default();
    s.nats.url = url.clone();
    s.nats.connect_timeout = Duration::from_secs(2);
    let start = Instant::now();
    let err = deltasync_nats::connect(&s.nats).await.unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    let NatsError::Connect {
        url: named, source, ..
    } = &err
    else {
        panic!("expected Connect, got {err:?}");
    };
    assert_eq!(named, &url);
    assert_eq!(source.kind(), ConnectErrorKind::Io, "{err}");
    assert!(err.to_string().contains(&url), "{err}");
}

#[tokio::test]
async fn connecting_to_a_server_that_never_answers_fails_within_the_connect_timeout() {
    // Accepts TCP connections (the kernel's backlog does) but never says INFO: the client
    // would wait forever without a bound.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("nats://{}", silent.local_addr().unwrap());
    let mut s = Settings::default();
    s.nats.url = url.clone();
    s.nats.connect_timeout = Duration::from_millis(500);
    let start = Instant::now();
    let err = deltasync_nats::connect(&s.nats).await.unwrap_err();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(400),
        "waited for the timeout: {took:?}"
    );
    assert!(
        took < Duration::from_secs(4),
        "bounded by the timeout: {took:?}"
    );
    let NatsError::Connect { source, .. } = &err else {
        panic!("expected Connect, got {err:?}");
    };
    assert_eq!(source.kind(), ConnectErrorKind::TimedOut, "{err}");
    assert!(err.to_string().contains(&url), "{err}");
    drop(silent);
}

#[tokio::test]
async fn user_and_password_authenticate_and_a_wrong_password_is_an_auth_error() {
    let server = NatsServer::start_with_config(
        r#"
listen: "127.0.0.1:{port}"
jetstream { store_dir: "{store_dir}" }
authorization { user: a, password: b }
"#,
    );
    let pipeline = unique_pipeline("auth");
    let mut s = settings(&server.url(), &pipeline);
    s.nats.user = Some("a".to_owned());
    s.nats.password = Some(Secret::new("b"));
    s.validate().unwrap();
    let js = connect(&s).await;
    deltasync_nats::ensure_stream(&js, &s).await.unwrap();

    s.nats.password = Some(Secret::new("wrong"));
    let err = deltasync_nats::connect(&s.nats).await.unwrap_err();
    let NatsError::Connect { source, .. } = &err else {
        panic!("expected Connect, got {err:?}");
    };
    assert_eq!(
        source.kind(),
        ConnectErrorKind::AuthorizationViolation,
        "{err}"
    );
    assert!(
        !format!("{err} {err:?}").contains("wrong"),
        "the password never prints: {err:?}"
    );

    s.nats.user = None;
    s.nats.password = None;
    let err = deltasync_nats::connect(&s.nats).await.unwrap_err();
    let NatsError::Connect { source, .. } = &err else {
        panic!("expected Connect, got {err:?}");
    };
    assert_eq!(
        source.kind(),
        ConnectErrorKind::AuthorizationViolation,
        "{err}"
    );
}

#[tokio::test]
async fn a_three_node_cluster_accepts_an_r3_stream_and_bucket() {
    let cluster = NatsCluster::start(3);
    let urls = cluster.urls();
    let mut s = settings(&urls.join(","), &unique_pipeline("r3"));
    s.stream.replicas = 3;
    s.snapshot.replicas = 3;
    s.validate().unwrap();
    assert_eq!(s.nats.urls().len(), 3);
    let js = connect(&s).await;

    let deadline = Duration::from_secs(30);
    eventually("ensure_stream on the cluster", deadline, || {
        deltasync_nats::ensure_stream(&js, &s)
    })
    .await;
    eventually("ensure_bucket on the cluster", deadline, || {
        deltasync_nats::ensure_bucket(&js, &s)
    })
    .await;

    let stream_name = names::stream_name(&s.pipeline);
    let kv_name = format!("KV_{}", names::bucket_name(&s.pipeline));
    for name in [&stream_name, &kv_name] {
        let info = eventually("three current peers", deadline, || async {
            let info = js
                .get_stream(name.as_str())
                .await
                .map_err(|e| e.to_string())?
                .cached_info()
                .clone();
            let cluster = info.cluster.clone().ok_or("no cluster info")?;
            let current = cluster.replicas.iter().filter(|p| p.current).count();
            if cluster.leader.is_some() && current == 2 {
                Ok(info)
            } else {
                Err(format!(
                    "leader {:?}, {current} current followers",
                    cluster.leader
                ))
            }
        })
        .await;
        assert_eq!(info.config.num_replicas, 3, "{name}");
    }

    // The R3 stream takes writes. Right after a cluster forms, the stream's leader may not
    // answer yet (no responders, reported as StreamNotFound): retry with a message id, so a
    // retried publish that did land is deduplicated rather than stored twice.
    let ack = eventually("a publish to the R3 stream", deadline, || async {
        js.send_publish(
            names::subject(&s.pipeline),
            async_nats::jetstream::message::PublishMessage::build()
                .payload("x".into())
                .message_id("only-once"),
        )
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())
    })
    .await;
    assert_eq!(ack.sequence, 1);
}
