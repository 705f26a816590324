//! Helpers shared by the producer's integration tests: settings for a test server, unique
//! pipeline names, reading a pipeline's stream back, replaying it through a fresh replica,
//! waiting on conditions with deadlines, spawning the binary.

use async_nats::jetstream::{self, stream::RawMessageErrorKind};
use deltasync_config::settings::{Settings, StorageKind};
use deltasync_core::envelope::Envelope;
use deltasync_core::recovery::{classify, Classified};
use deltasync_core::{names, Applied, Lineage, State};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A pipeline name no other test (or run) uses.
pub fn pipeline(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Default settings pointed at `url`, with a short linger.
pub fn settings(url: &str, pipeline: &str) -> Settings {
    // Logs only when asked for (RUST_LOG=info); idempotent.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = deltasync_config::telemetry::init(&Default::default());
    }
    let mut s = Settings {
        pipeline: pipeline.to_owned(),
        ..Settings::default()
    };
    s.nats.url = url.to_owned();
    s.stream.storage = StorageKind::File;
    s.producer.linger = Duration::from_millis(2);
    s
}

/// A JetStream context for reading what the producer wrote.
pub async fn js(url: &str) -> jetstream::Context {
    let addrs: Vec<async_nats::ServerAddr> = url
        .split(',')
        .map(|u| u.parse().expect("a server address"))
        .collect();
    let client = async_nats::connect(addrs)
        .await
        .expect("connect to the test server");
    jetstream::new(client)
}

/// Every message of the pipeline's stream, in order, classified.
pub async fn read_stream(js: &jetstream::Context, pipeline: &str) -> Vec<(u64, Classified)> {
    let stream = js
        .get_stream(names::stream_name(pipeline))
        .await
        .expect("the pipeline's stream exists");
    let info = stream.get_info().await.expect("stream info");
    let mut out = Vec::new();
    for s in info.state.first_sequence..=info.state.last_sequence {
        match stream.get_raw_message(s).await {
            Ok(m) => out.push((s, classify(&m.payload))),
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => {}
            Err(e) => panic!("reading stream sequence {s}: {e}"),
        }
    }
    out
}

/// What replaying a stream found.
#[derive(Debug)]
pub struct Replayed {
    /// The replica of the last lineage, after its last complete transaction.
    pub state: State,
    /// Envelopes per lineage, in stream order: (lineage, seq, part, parts).
    pub envelopes: Vec<Envelope>,
    /// Foreign messages.
    pub foreign: u64,
    /// Lineages in order of appearance.
    pub lineages: Vec<Lineage>,
}

/// Replays the stream through a fresh replica per lineage, asserting that every lineage's
/// envelopes run 1, 2, 3, ... with no gap and no duplicate and that every digest verifies.
pub fn replay(items: &[(u64, Classified)]) -> Replayed {
    let mut state: Option<State> = None;
    let mut out = Replayed {
        state: State::new(Lineage::default()),
        envelopes: Vec::new(),
        foreign: 0,
        lineages: Vec::new(),
    };
    for (stream_seq, item) in items {
        match item {
            Classified::Foreign { .. } => out.foreign += 1,
            Classified::Envelope(env) => {
                let s = match &mut state {
                    Some(s) if s.lineage() == env.lineage => s,
                    _ => {
                        assert_eq!(
                            (env.seq, env.part),
                            (1, 1),
                            "lineage {} starts at envelope {} (stream seq {stream_seq})",
                            env.lineage,
                            env.seq
                        );
                        assert!(
                            !out.lineages.contains(&env.lineage),
                            "lineage {} comes back at stream seq {stream_seq}",
                            env.lineage
                        );
                        out.lineages.push(env.lineage);
                        state.insert(State::new(env.lineage))
                    }
                };
                let last = out
                    .envelopes
                    .last()
                    .filter(|e| e.lineage == env.lineage)
                    .map_or(0, |e| e.seq);
                assert_eq!(
                    env.seq,
                    last + 1,
                    "envelope {} follows {last} at stream seq {stream_seq}: gap or duplicate",
                    env.seq
                );
                match s.apply(env) {
                    Ok(Applied::Committed { .. } | Applied::Buffered { .. }) => {}
                    Err(e) => panic!(
                        "envelope {} at stream seq {stream_seq} does not apply: {e}",
                        env.seq
                    ),
                }
                out.envelopes.push(env.clone());
            }
        }
    }
    if let Some(s) = state {
        out.state = s;
    }
    out
}

/// Polls `check` every 20 ms until it returns `Some`, or panics naming `what` after
/// `timeout`.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The last stream sequence of the pipeline's stream (0 when it does not exist yet).
pub async fn last_stream_seq(js: &jetstream::Context, pipeline: &str) -> u64 {
    match js.get_stream(names::stream_name(pipeline)).await {
        Ok(s) => s.get_info().await.map_or(0, |i| i.state.last_sequence),
        Err(_) => 0,
    }
}

/// A `deltasync-producer` command for `url` and `pipeline`, logging to a piped stderr.
pub fn producer_command(url: &str, pipeline: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_deltasync-producer"));
    cmd.arg("--nats-url")
        .arg(url)
        .arg("--pipeline")
        .arg(pipeline)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Writes NDJSON puts `prefix{i}` for `i` in `range` (value `{"i":i}`), every `txn_every`-th
/// line a two-change transaction instead.
pub fn write_ndjson(path: &Path, prefix: &str, range: std::ops::Range<u64>, txn_every: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create ndjson"));
    for i in range {
        if txn_every > 0 && i % txn_every == 0 {
            writeln!(
                f,
                r#"{{"txn":[{{"op":"put","key":"{prefix}{i}","value":{{"i":{i}}}}},{{"op":"put","key":"{prefix}{i}-t","value":true}}]}}"#
            )
        } else {
            writeln!(f, r#"{{"op":"put","key":"{prefix}{i}","value":{{"i":{i}}}}}"#)
        }
        .expect("write ndjson");
    }
    f.flush().expect("flush ndjson");
}

/// Publishes `envs` the way the producer does (message ids, expected last sequence) from
/// `expected_last` on, e.g. a producer that dies before any snapshot covers them; returns the
/// last stream sequence.
pub async fn publish_raw(
    js: &jetstream::Context,
    pipeline: &str,
    envs: &[Envelope],
    mut expected_last: u64,
) -> u64 {
    for e in envs {
        let payload = deltasync_core::codec::encode_envelope(e).expect("encode");
        let msg = deltasync_producer::publisher::envelope_message(
            payload.into(),
            e.lineage,
            e.seq,
            expected_last,
            false,
        );
        expected_last = js
            .send_publish(names::subject(pipeline), msg)
            .await
            .expect("publish")
            .await
            .expect("acknowledged")
            .sequence;
    }
    expected_last
}

/// Makes the pipeline's snapshot bucket refuse every value (its messages may hold 8 bytes), so
/// every snapshot fails; returns the bucket stream's config and its original message size, to
/// restore it with [`restore_bucket`].
pub async fn break_bucket(
    js: &jetstream::Context,
    pipeline: &str,
) -> (jetstream::stream::Config, i32) {
    let kv_stream = format!("KV_{}", names::bucket_name(pipeline));
    let mut config = js
        .get_stream(&kv_stream)
        .await
        .expect("bucket stream")
        .cached_info()
        .config
        .clone();
    let original = config.max_message_size;
    config.max_message_size = 8;
    js.update_stream(&config)
        .await
        .expect("shrink the bucket's messages");
    (config, original)
}

/// Undoes [`break_bucket`]: snapshots can be written again.
pub async fn restore_bucket(
    js: &jetstream::Context,
    mut config: jetstream::stream::Config,
    original: i32,
) {
    config.max_message_size = original;
    js.update_stream(&config).await.expect("restore the bucket");
}
