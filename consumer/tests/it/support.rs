//! Helpers shared by the consumer's integration tests: a test producer built from the shared
//! protocol pieces (so faults can be injected precisely), consumers run in-process, unique
//! names, and waiting on conditions with deadlines.
//!
//! Talks to a real nats-server started by `deltasync-testkit` (random port, temporary store,
//! killed on Drop), through `deltasync_nats` and plain async-nats calls.

use async_nats::jetstream::{self, kv};
use deltasync_config::settings::{Settings, StorageKind};
use deltasync_consumer::{Consumer, Options, Outcome, Replica, Status, Storage};
use deltasync_core::codec::encode_envelope;
use deltasync_core::envelope::split_transaction;
use deltasync_core::snapshot::Manifest;
use deltasync_core::{names, Change, Lineage, State};
use deltasync_nats::store;
use deltasync_testkit::NatsServer;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a test waits for a condition before it fails.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A pipeline name no other test (in this or a concurrent run) uses.
pub fn unique_pipeline(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Validated settings for pipeline `pipeline` on `url`, file storage, small chunks so that
/// snapshots have many of them, short commit interval.
pub fn settings(url: &str, pipeline: &str, tweak: impl FnOnce(&mut Settings)) -> Settings {
    let mut s = Settings {
        pipeline: pipeline.to_owned(),
        ..Settings::default()
    };
    s.nats.url = url.to_owned();
    s.nats.connect_timeout = Duration::from_secs(5);
    s.nats.request_timeout = Duration::from_secs(5);
    s.stream.storage = StorageKind::File;
    s.snapshot.chunk_target_bytes = 16 * 1024;
    s.consumer.commit_interval = Duration::from_millis(20);
    s.consumer.commit_every_envelopes = 16;
    tweak(&mut s);
    s.validate().expect("test settings are valid");
    s
}

/// A test producer: the producer's state, its envelopes published one by one, and snapshots
/// written with `store::write_snapshot`.
pub struct Pipeline {
    pub _server: NatsServer,
    pub settings: Settings,
    pub js: jetstream::Context,
    pub _kv: kv::Store,
    /// The producer's state.
    pub state: State,
    /// Stream sequence of the last envelope published.
    pub stream_seq: u64,
    /// The last snapshot written and the state it describes (for incremental snapshots).
    prev: Option<(Manifest, State)>,
}

impl Pipeline {
    pub async fn start(prefix: &str, tweak: impl FnOnce(&mut Settings)) -> Pipeline {
        let server = NatsServer::start();
        let settings = settings(&server.url(), &unique_pipeline(prefix), tweak);
        let client = deltasync_nats::connect(&settings.nats).await.unwrap();
        let js = deltasync_nats::jetstream(client, &settings.nats);
        deltasync_nats::ensure_stream(&js, &settings).await.unwrap();
        let kv = deltasync_nats::ensure_bucket(&js, &settings).await.unwrap();
        Pipeline {
            _server: server,
            settings,
            js,
            _kv: kv,
            state: State::new(Lineage::random()),
            stream_seq: 0,
            prev: None,
        }
    }

    /// Commits one transaction as a producer would: apply, split (parts of at most
    /// `max_bytes`), publish each envelope and await its ack. Returns the stream sequences.
    pub async fn commit_split(&mut self, changes: Vec<Change>, max_bytes: usize) -> Vec<u64> {
        let digest = self.state.apply_changes(&changes);
        let envs = split_transaction(
            self.state.lineage(),
            self.state.seq() + 1,
            digest,
            deltasync_core::envelope::now_ms(),
            changes,
            max_bytes,
        );
        let mut seqs = Vec::new();
        for e in &envs {
            seqs.push(self.publish_raw(encode_envelope(e).unwrap()).await);
        }
        let last = envs.last().unwrap().seq;
        let lineage = self.state.lineage();
        self.state.set_position(lineage, last);
        seqs
    }

    /// Commits one transaction that fits one envelope.
    pub async fn commit(&mut self, changes: Vec<Change>) -> u64 {
        let seqs = self.commit_split(changes, 900 * 1024).await;
        *seqs.last().unwrap()
    }

    /// Commits `txns` transactions of `per_txn` puts each, keys drawn from `0..keys`.
    pub async fn churn(&mut self, txns: usize, per_txn: usize, keys: usize, tag: u8) {
        let mut n = self.state.seq() as usize * 7919;
        for _ in 0..txns {
            let changes = (0..per_txn)
                .map(|_| {
                    n = n
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    Change::put(key((n >> 17) % keys), value(tag, n))
                })
                .collect();
            self.commit(changes).await;
        }
    }

    /// Publishes raw bytes on the pipeline's subject; returns the stream sequence.
    pub async fn publish_raw(&mut self, payload: Vec<u8>) -> u64 {
        let subject = names::subject(&self.settings.pipeline);
        let ack = self.js.publish(subject, payload.into()).await.unwrap();
        let seq = ack.await.unwrap().sequence;
        self.stream_seq = seq;
        seq
    }

    /// Writes a snapshot of the producer's state (incremental on the previous one).
    pub async fn snapshot(&mut self) -> Manifest {
        let prev = self.prev.as_ref().map(|(m, s)| (m, s));
        let m = store::write_snapshot(&self.js, &self.settings, &self.state, self.stream_seq, prev)
            .await
            .unwrap();
        self.prev = Some((m.clone(), self.state.clone()));
        m
    }

    /// Starts a new lineage: the producer forgets its history and starts from the empty state.
    pub fn new_lineage(&mut self) {
        self.state = State::new(Lineage::random());
        self.prev = None;
    }

    /// Starts a new lineage from the producer's current state, as `producer new-lineage`
    /// keeping the state does (its marker is the next `commit(vec![])`).
    pub fn new_lineage_keeping_state(&mut self) {
        self.state.set_position(Lineage::random(), 0);
        self.prev = None;
    }

    /// Deletes one message from the stream.
    pub async fn delete_message(&self, stream_seq: u64) {
        let stream = self
            .js
            .get_stream(names::stream_name(&self.settings.pipeline))
            .await
            .unwrap();
        assert!(stream.delete_message(stream_seq).await.unwrap());
    }

    /// Purges every message of the stream (its sequence numbers go on after the last one).
    pub async fn purge(&self) {
        let stream = self
            .js
            .get_stream(names::stream_name(&self.settings.pipeline))
            .await
            .unwrap();
        stream.purge().await.unwrap();
    }

    /// Deletes the stream and creates it again, empty (sequences from 1); the bucket stays.
    pub async fn recreate_stream(&mut self) {
        self.js
            .delete_stream(names::stream_name(&self.settings.pipeline))
            .await
            .unwrap();
        deltasync_nats::ensure_stream(&self.js, &self.settings)
            .await
            .unwrap();
        self.stream_seq = 0;
    }

    /// The stream's first and last sequence.
    pub async fn bounds(&self) -> (u64, u64) {
        let b = deltasync_nats::history::bounds(&self.js, &self.settings)
            .await
            .unwrap();
        (b.first_seq, b.last_seq)
    }

    /// Settings for a consumer of this pipeline.
    pub fn consumer_settings(&self) -> Settings {
        self.settings.clone()
    }
}

/// Key `i`.
pub fn key(i: usize) -> String {
    format!("key-{i:07}")
}

/// A JSON value as `ingest` would store, different per `tag` and `n`.
pub fn value(tag: u8, n: usize) -> Vec<u8> {
    format!(r#"{{"tag":{tag},"n":{n},"pad":"{}"}}"#, "x".repeat(40)).into_bytes()
}

/// `count` puts of keys `from..from + count`.
pub fn puts(from: usize, count: usize, tag: u8) -> Vec<Change> {
    (from..from + count)
        .map(|i| Change::put(key(i), value(tag, i)))
        .collect()
}

/// A consumer running in-process.
pub struct Running {
    pub replica: Replica,
    pub cancel: CancellationToken,
    handle: JoinHandle<Result<Outcome, deltasync_consumer::ConsumerError>>,
}

impl Running {
    pub fn start(settings: Settings, options: Options) -> Running {
        let consumer = Consumer::new(settings, options).unwrap();
        let replica = consumer.replica();
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(consumer.run(cancel.clone()));
        Running {
            replica,
            cancel,
            handle,
        }
    }

    /// Waits until the replica's committed position is the producer's, and returns the
    /// status.
    pub async fn wait_for(&self, p: &Pipeline) -> Status {
        let (lineage, seq) = (p.state.lineage().to_hex(), p.state.seq());
        self.wait_until(|s| s.lineage == lineage && s.seq == seq)
            .await
    }

    pub async fn wait_until(&self, done: impl FnMut(&Status) -> bool) -> Status {
        match self.replica.wait_until(DEADLINE, done).await {
            Ok(s) => s,
            Err(s) => panic!("condition not met within {DEADLINE:?}; status: {s:#?}"),
        }
    }

    /// Cancels and waits for a clean exit.
    pub async fn stop(self) -> Outcome {
        self.cancel.cancel();
        tokio::time::timeout(DEADLINE, self.handle)
            .await
            .expect("the consumer stops")
            .expect("the consumer task does not panic")
            .expect("the consumer stops without error")
    }

    /// Waits for the consumer to end by itself (`once`, or an error).
    pub async fn join(self) -> Result<Outcome, deltasync_consumer::ConsumerError> {
        tokio::time::timeout(DEADLINE, self.handle)
            .await
            .expect("the consumer ends")
            .expect("the consumer task does not panic")
    }
}

/// Options of a durable replica in `dir`.
pub fn durable(id: &str, dir: &std::path::Path) -> Options {
    Options {
        id: id.to_owned(),
        storage: Storage::Durable(dir.to_path_buf()),
        http: None,
        once: false,
    }
}

/// Options of an in-memory replica.
pub fn ephemeral(id: &str) -> Options {
    Options {
        id: id.to_owned(),
        storage: Storage::Memory,
        http: None,
        once: false,
    }
}

/// Asserts that the replica's latest view holds exactly the producer's state.
pub fn assert_same_state(replica: &Replica, p: &Pipeline) {
    let view = replica.view();
    assert_eq!(view.seq(), p.state.seq(), "view sequence");
    assert_eq!(view.digest(), p.state.digest(), "view digest");
    assert!(
        view.state() == &p.state,
        "view entries equal the producer's"
    );
}

/// Installs a log subscriber when RUST_LOG is set (to stderr, for debugging a test).
pub fn logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let s = deltasync_config::settings::LogSettings::default();
        let _ = deltasync_config::telemetry::init(&s);
    }
}

/// A minimal HTTP/1.1 GET (the tests need no HTTP client crate): status, headers (names
/// lower-cased) and the body, chunked transfer decoded.
pub async fn http_get(
    addr: std::net::SocketAddr,
    path: &str,
) -> (u16, std::collections::HashMap<String, String>, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: std::collections::HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    if headers.get("transfer-encoding").map(String::as_str) == Some("chunked") {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size_text = std::str::from_utf8(&rest[..eol]).unwrap();
            let size =
                usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
            rest = &rest[eol + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body = out;
    }
    (status, headers, body)
}

/// A bootstrap fetched the whole snapshot: every chunk except those of empty ranges (whose
/// digest an empty replica already matches).
pub fn assert_whole_snapshot(fetched: u64, m: &Manifest) {
    let empty: u64 = m
        .ranges
        .iter()
        .filter(|r| r.digest == deltasync_core::Digest::ZERO)
        .flat_map(|r| &r.chunks)
        .map(|c| c.bytes)
        .sum();
    assert_eq!(
        fetched,
        m.total_bytes() - empty,
        "bytes fetched by the bootstrap"
    );
}

/// One Server-Sent Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// A minimal Server-Sent Events client over HTTP/1.0 (the body is the rest of the
/// connection, no chunked encoding to undo).
pub struct SseClient {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for the end of an event.
    scanned: usize,
    /// Comment-only blocks (heartbeats) seen.
    pub comments: usize,
    pub status: u16,
    pub headers: std::collections::HashMap<String, String>,
}

impl SseClient {
    /// Sends `GET path` with `headers`, reads the response head.
    pub async fn connect(
        addr: std::net::SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> SseClient {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut req = format!("GET {path} HTTP/1.0\r\nHost: test\r\nAccept: text/event-stream\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let split = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the connection closed before the response head");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..split].to_vec()).unwrap();
        let rest = buf[split + 4..].to_vec();
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        SseClient {
            stream,
            buf: rest,
            scanned: 0,
            comments: 0,
            status,
            headers,
        }
    }

    /// The rest of the body, until the server closes the connection.
    pub async fn rest(&mut self) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut out = std::mem::take(&mut self.buf);
        self.stream.read_to_end(&mut out).await.unwrap();
        out
    }

    /// The next event (comments skipped); `None` when the server ended the stream.
    pub async fn next(&mut self) -> Option<SseEvent> {
        use tokio::io::AsyncReadExt;
        loop {
            let from = self.scanned.saturating_sub(1);
            let end = self.buf[from..]
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|i| i + from);
            self.scanned = self.buf.len();
            if let Some(i) = end {
                let block = String::from_utf8(self.buf[..i].to_vec()).unwrap();
                self.buf.drain(..i + 2);
                self.scanned = 0;
                let mut event = SseEvent {
                    event: "message".to_owned(),
                    id: None,
                    data: String::new(),
                };
                let mut any = false;
                for line in block.lines() {
                    if line.starts_with(':') {
                        continue;
                    }
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    any = true;
                    match field {
                        "event" => event.event = value.to_owned(),
                        "id" => event.id = Some(value.to_owned()),
                        "data" => {
                            if !event.data.is_empty() {
                                event.data.push('\n');
                            }
                            event.data.push_str(value);
                        }
                        _ => {}
                    }
                }
                if any {
                    return Some(event);
                }
                self.comments += 1;
                continue;
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let n = self.stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// A `deltasync-consumer` child process, killed (SIGKILL) and reaped on Drop.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `deltasync-consumer run` of pipeline `p` as replica `id`, durable in `dir`, serving HTTP on
/// `port`, with `env` set, logging warnings, stdout discarded; the caller sets stderr.
pub fn consumer_process(
    p: &Pipeline,
    id: &str,
    dir: &std::path::Path,
    port: u16,
    env: &[(&str, &str)],
) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_deltasync-consumer"));
    c.args(["--nats-url", &p.settings.nats.url])
        .args(["--pipeline", &p.settings.pipeline])
        .arg("run")
        .args(["--id", id])
        .arg("--data-dir")
        .arg(dir)
        .args(["--http", &format!("127.0.0.1:{port}")])
        .env_remove("DELTASYNC_CONFIG")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null());
    c
}

/// `/v1/status` of a consumer process serving HTTP on `port`; None until it answers.
pub async fn status_of(port: u16) -> Option<serde_json::Value> {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().ok()?;
    tokio::net::TcpStream::connect(addr).await.ok()?;
    let (code, _, body) = http_get(addr, "/v1/status").await;
    (code == 200).then(|| serde_json::from_slice(&body).ok())?
}
