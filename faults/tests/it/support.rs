//! Helpers shared by the fault tests: settings, unique names, the model of what was committed,
//! a seeded random source, a load generator driving the real producer, consumers in-process
//! and as child processes, stream replay, and waiting on conditions with deadlines.
//!
//! Talks to real nats-server processes (through `deltasync-testkit`), to the producer and
//! consumer libraries, to the real `deltasync-producer` / `deltasync-consumer` binaries (from
//! the workspace build, made up to date by `deltasync_testkit::workspace_bin`) and, for
//! inspection and damage, to JetStream directly through async-nats.
//!
//! ## Invariants
//!
//! - The model holds exactly the transactions `Producer::commit` acknowledged, in order; a
//!   replica is compared with it entry by entry, never with the producer's own state only.
//! - Every wait polls a condition until a deadline and then fails with what it last saw; no
//!   test sleeps to "let things happen".

use async_nats::jetstream::{self, stream::RawMessageErrorKind};
use bytes::Bytes;
use deltasync_config::settings::{Settings, StorageKind};
use deltasync_consumer::{Consumer, Options, Outcome, Replica, Status, Storage};
use deltasync_core::recovery::{classify, Classified};
use deltasync_core::{names, Applied, Digest, Envelope, Lineage, State};
use deltasync_producer::{Change, Position, Producer, ProducerError};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a test waits for a condition (convergence, progress) before it fails.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Interval between two checks of a polled condition.
pub const POLL: Duration = Duration::from_millis(25);

/// A pipeline name no other test (in this or a concurrent run) uses.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "fault-{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Validated settings for `pipeline` on `url` (comma-separated for a cluster): file storage,
/// small chunks, short linger and commit intervals, timeouts short enough for faults to be
/// noticed quickly.
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
    s.producer.linger = Duration::from_millis(2);
    s.producer.batch_max_changes = 500;
    s.consumer.commit_interval = Duration::from_millis(20);
    s.consumer.commit_every_envelopes = 16;
    tweak(&mut s);
    s.validate().expect("test settings are valid");
    s
}

/// Installs a log subscriber on stderr when RUST_LOG is set (for debugging a test).
pub fn logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = deltasync_config::telemetry::init(&Default::default());
    }
}

/// Log lines captured from the current thread (a `current_thread` test runtime runs the
/// consumer's engine there): lets a test check that a fault was logged with its reason.
#[derive(Clone, Default)]
pub struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// Starts capturing INFO and above on this thread until the guard is dropped.
    pub fn start() -> (CapturedLogs, tracing::subscriber::DefaultGuard) {
        let logs = CapturedLogs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The captured lines containing every one of `needles`.
    pub fn lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_owned)
            .collect()
    }
}

impl Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = std::io::stderr().write_all(buf);
        }
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ------------------------------------------------------------------------------ randomness

/// SplitMix64: small, seedable, good enough to pick faults and changes.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// True with probability `pct` percent.
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

// ------------------------------------------------------------------------------ the model

/// What the test committed: every transaction `commit` acknowledged, applied in order to a
/// plain map. Independent of `State` (only `digest` builds one, to compare digests).
#[derive(Debug, Default, Clone)]
pub struct Model {
    pub entries: BTreeMap<String, Bytes>,
    /// Transactions acknowledged.
    pub txns: u64,
    /// Changes in them.
    pub changes: u64,
}

impl Model {
    pub fn apply(&mut self, changes: &[Change]) {
        for c in changes {
            match c {
                Change::Put { key, value } => {
                    self.entries.insert(key.to_string(), value.clone());
                }
                Change::Delete { key } => {
                    self.entries.remove(&**key);
                }
            }
        }
        self.txns += 1;
        self.changes += changes.len() as u64;
    }

    /// The digest of the model's entries (digests do not depend on the lineage or position).
    pub fn digest(&self) -> Digest {
        let mut s = State::new(Lineage::default());
        for (k, v) in &self.entries {
            s.insert(Arc::from(k.as_str()), v.clone());
        }
        s.digest()
    }

    /// How `entries` differ from the model: (missing, extra, different values). A change lost
    /// shows as missing or different, a change applied twice or out of order as different or
    /// extra.
    pub fn differences<'a>(
        &self,
        entries: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Differences {
        let mut d = Differences::default();
        let mut seen = 0usize;
        for (k, v) in entries {
            seen += 1;
            match self.entries.get(k) {
                None => d.extra.push(k.to_owned()),
                Some(m) if m.as_ref() != v => d.different.push(k.to_owned()),
                Some(_) => {}
            }
        }
        let matched = seen - d.extra.len();
        if matched < self.entries.len() {
            // Only now pay for finding which ones are missing.
            d.missing_count = self.entries.len() - matched;
        }
        d.checked = self.entries.len().max(seen);
        d
    }
}

/// The result of comparing a replica with the model.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Differences {
    pub missing_count: usize,
    pub extra: Vec<String>,
    pub different: Vec<String>,
    /// Entries compared.
    pub checked: usize,
}

impl Differences {
    /// Entries that are not what was committed.
    pub fn lost(&self) -> usize {
        self.missing_count + self.extra.len() + self.different.len()
    }
}

/// Asserts that `state` holds exactly the model's entries; returns the entries checked.
pub fn assert_matches_model(what: &str, state: &State, model: &Model, context: &str) -> usize {
    let d = model.differences(state.iter());
    assert_eq!(
        d.lost(),
        0,
        "{context}: {what} differs from the model of what was committed: {} missing, extra {:?}, \
         different {:?} (of {} entries)",
        d.missing_count,
        first(&d.extra),
        first(&d.different),
        model.entries.len()
    );
    assert_eq!(
        state.digest(),
        model.digest(),
        "{context}: {what} digest differs from the model's"
    );
    d.checked
}

fn first(v: &[String]) -> &[String] {
    &v[..v.len().min(5)]
}

// ------------------------------------------------------------------------------ load

/// Key `i` of the test key space.
pub fn key(i: u64) -> String {
    format!("key-{i:06}")
}

/// A random transaction over `keys` keys: 1 to 12 changes, about 15% deletes, values of 8 to
/// 400 bytes (JSON strings, so `dump` and `/v1/state` show them as stored). With `big_pct`
/// percent probability, one large transaction of 40 values of ~2 KiB (several envelopes when
/// `producer.batch_max_bytes` is small).
pub fn random_txn(rng: &mut Rng, keys: u64, big_pct: u64) -> Vec<Change> {
    let big = rng.chance(big_pct);
    let n = if big { 40 } else { 1 + rng.below(12) };
    (0..n)
        .map(|_| {
            let k = key(rng.below(keys));
            if !big && rng.chance(15) {
                Change::delete(k)
            } else {
                let len = if big { 2000 } else { 8 + rng.below(392) } as usize;
                let tag = rng.next_u64();
                let mut v = format!("\"{tag:016x}").into_bytes();
                v.resize(len.max(v.len() + 1), b'x');
                v.push(b'"');
                Change::put(k, v)
            }
        })
        .collect()
}

/// What a load task did.
#[derive(Debug)]
pub struct LoadReport {
    pub producer: Producer,
    /// The first commit error, if any (the load stops at it), with the transaction whose
    /// outcome is therefore unknown.
    pub error: Option<(Vec<Change>, ProducerError)>,
}

/// A task committing random transactions through `producer` until `stop` (or the first
/// error), applying every acknowledged one to `model`.
pub struct Load {
    pub stop: CancellationToken,
    producer: Arc<Producer>,
    handle: JoinHandle<Option<(Vec<Change>, ProducerError)>>,
}

impl Load {
    pub fn start(producer: Producer, model: Arc<Mutex<Model>>, seed: u64, keys: u64) -> Load {
        Load::start_with(producer, model, seed, keys, 2)
    }

    /// Like `start`; `big_pct` percent of the transactions are large (see `random_txn`).
    pub fn start_with(
        producer: Producer,
        model: Arc<Mutex<Model>>,
        seed: u64,
        keys: u64,
        big_pct: u64,
    ) -> Load {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let producer = Arc::new(producer);
        let p = producer.clone();
        let handle = tokio::spawn(async move {
            let mut rng = Rng::new(seed);
            while !token.is_cancelled() {
                let txn = random_txn(&mut rng, keys, big_pct);
                match p.commit(txn.clone()).await {
                    Ok(_) => model.lock().unwrap().apply(&txn),
                    Err(e) => return Some((txn, e)),
                }
            }
            None
        });
        Load {
            stop,
            producer,
            handle,
        }
    }

    /// The producer, for calls beside the load (snapshots, status).
    pub fn producer(&self) -> &Producer {
        &self.producer
    }

    /// Stops the load and returns the producer.
    pub async fn finish(self) -> LoadReport {
        self.stop.cancel();
        let error = tokio::time::timeout(DEADLINE, self.handle)
            .await
            .expect("the load task stops")
            .expect("the load task does not panic");
        let producer = Arc::try_unwrap(self.producer)
            .unwrap_or_else(|_| panic!("the load task holds the only other handle"));
        LoadReport { producer, error }
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

/// Polls `check` until it returns `Some`, or panics naming `what` after `timeout`.
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
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until the model holds at least `txns` more transactions than now.
pub async fn wait_for_commits(model: &Arc<Mutex<Model>>, load: &Load, more: u64, what: &str) {
    let target = model.lock().unwrap().txns + more;
    eventually(what, DEADLINE, async || {
        assert!(
            !load.is_finished() || model.lock().unwrap().txns >= target,
            "the load stopped (commit failed) while waiting for {what}"
        );
        (model.lock().unwrap().txns >= target).then_some(())
    })
    .await;
}

// ------------------------------------------------------------------------------ consumers

/// A consumer running in-process (library), its replica handle, its way to stop.
pub struct InProcess {
    pub replica: Replica,
    pub cancel: CancellationToken,
    handle: JoinHandle<Result<Outcome, deltasync_consumer::ConsumerError>>,
}

impl InProcess {
    pub fn start(settings: Settings, options: Options) -> InProcess {
        let consumer = Consumer::new(settings, options).unwrap();
        let replica = consumer.replica();
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(consumer.run(cancel.clone()));
        InProcess {
            replica,
            cancel,
            handle,
        }
    }

    pub fn durable(settings: Settings, id: &str, dir: &Path) -> InProcess {
        InProcess::start(
            settings,
            Options {
                id: id.to_owned(),
                storage: Storage::Durable(dir.to_path_buf()),
                http: None,
                once: false,
            },
        )
    }

    pub fn memory(settings: Settings, id: &str) -> InProcess {
        InProcess::start(
            settings,
            Options {
                id: id.to_owned(),
                storage: Storage::Memory,
                http: None,
                once: false,
            },
        )
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Waits until the replica's committed position is `p` (failing early if the consumer
    /// stopped), and returns its status.
    pub async fn wait_for(&self, p: &Position, timeout: Duration, context: &str) -> Status {
        let (lineage, seq) = (p.lineage.to_hex(), p.seq);
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.replica.status();
            if s.lineage == lineage && s.seq == seq {
                return s;
            }
            assert!(
                !self.handle.is_finished(),
                "{context}: consumer {} stopped before reaching seq {seq}; status {s:#?}",
                s.id
            );
            assert!(
                Instant::now() < deadline,
                "{context}: consumer {} did not reach {lineage}:{seq} within {timeout:?}; \
                 status {s:#?}",
                s.id
            );
            let _ = self
                .replica
                .wait_until(POLL * 4, |s| s.lineage == lineage && s.seq == seq)
                .await;
        }
    }

    /// Waits until the replica holds a verified state at envelope `seq` or later.
    pub async fn wait_following(&self, seq: u64, context: &str) -> Status {
        self.replica
            .wait_until(DEADLINE, |st| st.bootstrapped && st.seq >= seq)
            .await
            .unwrap_or_else(|st| panic!("{context}: not following up to {seq}: {st:#?}"))
    }

    /// Checks the replica's view against the model and the producer's position: same
    /// sequence, digest and entries. Returns the entries checked.
    pub async fn check(&self, p: &Position, model: &Model, context: &str) -> usize {
        let s = self.wait_for(p, DEADLINE, context).await;
        assert_eq!(
            s.digest,
            p.digest.to_hex(),
            "{context}: replica {} digest differs from the producer's",
            s.id
        );
        let view = self.replica.fresh_view(DEADLINE).await;
        assert_eq!(
            view.seq(),
            p.seq,
            "{context}: replica {} view sequence",
            s.id
        );
        assert_matches_model(&format!("replica {}", s.id), view.state(), model, context)
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

    /// Cancels and returns how it ended.
    pub async fn stop_result(self) -> Result<Outcome, deltasync_consumer::ConsumerError> {
        self.cancel.cancel();
        self.join().await
    }

    /// Waits for the consumer to end by itself (an error).
    pub async fn join(self) -> Result<Outcome, deltasync_consumer::ConsumerError> {
        tokio::time::timeout(DEADLINE, self.handle)
            .await
            .expect("the consumer ends")
            .expect("the consumer task does not panic")
    }
}

/// The real `deltasync-consumer` binary, built from the current sources. The first call in a
/// test process builds both binaries if they are not up to date, which can take minutes:
/// tests call [`binaries`] before they start anything timed.
pub fn consumer_bin() -> PathBuf {
    deltasync_testkit::workspace_bin("deltasync-consumer")
}

/// The real `deltasync-producer` binary, built from the current sources (see [`consumer_bin`]).
pub fn producer_bin() -> PathBuf {
    deltasync_testkit::workspace_bin("deltasync-producer")
}

/// Makes sure both binaries are built from the current sources (at most one build per test
/// process); the later `consumer_bin` / `producer_bin` calls then return at once.
pub fn binaries() {
    producer_bin();
    consumer_bin();
}

/// Environment for child processes: the settings `settings` holds that flags do not carry.
fn settings_env(cmd: &mut Command, s: &Settings) {
    // The settings loader refuses unknown DELTASYNC_* variables: the suite's own stay here.
    cmd.env_remove("DELTASYNC_CONFIG")
        .env_remove("DELTASYNC_CHAOS_SEED")
        .env_remove("DELTASYNC_CHAOS_SECS")
        .env("NO_COLOR", "1")
        .env(
            "DELTASYNC_NATS__CONNECT_TIMEOUT",
            format!("{}ms", s.nats.connect_timeout.as_millis()),
        )
        .env(
            "DELTASYNC_NATS__REQUEST_TIMEOUT",
            format!("{}ms", s.nats.request_timeout.as_millis()),
        )
        .env(
            "DELTASYNC_STREAM__MAX_MESSAGES",
            s.stream.max_messages.to_string(),
        )
        .env("DELTASYNC_STREAM__REPLICAS", s.stream.replicas.to_string())
        .env(
            "DELTASYNC_SNAPSHOT__REPLICAS",
            s.snapshot.replicas.to_string(),
        )
        .env(
            "DELTASYNC_SNAPSHOT__EVERY_ENVELOPES",
            s.snapshot.every_envelopes.to_string(),
        )
        .env(
            "DELTASYNC_SNAPSHOT__CHUNK_TARGET_BYTES",
            s.snapshot.chunk_target_bytes.to_string(),
        )
        .env(
            "DELTASYNC_CONSUMER__COMMIT_EVERY_ENVELOPES",
            s.consumer.commit_every_envelopes.to_string(),
        )
        .env(
            "DELTASYNC_CONSUMER__COMMIT_INTERVAL",
            format!("{}ms", s.consumer.commit_interval.as_millis()),
        )
        .env(
            "DELTASYNC_CONSUMER__RESYNC_MAX_ATTEMPTS",
            s.consumer.resync_max_attempts.to_string(),
        )
        .env(
            "RUST_LOG",
            std::env::var("FAULTS_CHILD_LOG").unwrap_or_else(|_| "info".into()),
        );
}

/// A `deltasync-consumer run` child process with a data directory and an HTTP endpoint; its
/// log goes to a file (appended across runs).
pub struct ChildConsumer {
    pub id: String,
    pub dir: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    settings: Settings,
    child: Option<Child>,
    /// Runs started.
    pub runs: u32,
}

impl ChildConsumer {
    pub fn new(settings: &Settings, id: &str, dir: &Path, log_dir: &Path) -> ChildConsumer {
        ChildConsumer {
            id: id.to_owned(),
            dir: dir.to_path_buf(),
            port: deltasync_testkit::free_port(),
            log: log_dir.join(format!("{id}.log")),
            settings: settings.clone(),
            child: None,
            runs: 0,
        }
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "consumer {} already running", self.id);
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.runs += 1;
        writeln!(log, "--- run {} of consumer {}", self.runs, self.id).unwrap();
        let mut cmd = Command::new(consumer_bin());
        cmd.args(["--nats-url", &self.settings.nats.url])
            .args(["--pipeline", &self.settings.pipeline])
            .arg("run")
            .args(["--id", &self.id])
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--http", &format!("127.0.0.1:{}", self.port)])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        settings_env(&mut cmd, &self.settings);
        self.child = Some(cmd.spawn().expect("the consumer binary starts"));
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, wait for a clean exit (commits its position), and return the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let pid = rustix::process::Pid::from_child(&c);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!(
                    "consumer {} did not stop within {DEADLINE:?} of SIGTERM",
                    self.id
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The exit status, if the process ended by itself.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// `/v1/status`, when the process answers.
    pub async fn status(&self) -> Option<serde_json::Value> {
        let (code, body) = http_get(self.port, "/v1/status").await?;
        (code == 200).then(|| serde_json::from_slice(&body).ok())?
    }

    /// Waits until its status shows position `p`.
    pub async fn wait_for(&mut self, p: &Position, timeout: Duration, context: &str) {
        let (lineage, seq) = (p.lineage.to_hex(), p.seq);
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            if let Some(status) = self.exited() {
                panic!(
                    "{context}: consumer {} exited ({status}) before reaching seq {seq}; log tail:\n{}",
                    self.id,
                    self.log_tail(30)
                );
            }
            if let Some(s) = self.status().await {
                if s["lineage"] == lineage.as_str() && s["seq"] == seq {
                    return;
                }
                last = Some(s);
            }
            assert!(
                Instant::now() < deadline,
                "{context}: consumer {} did not reach {lineage}:{seq} within {timeout:?}; last \
                 status {last:#?}; log tail:\n{}",
                self.id,
                self.log_tail(30)
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// The replica on disk (read with the consumer's own reader; the process must be stopped).
    pub fn read_replica(&self) -> (State, deltasync_consumer::Position) {
        let mut entries = Vec::new();
        let cursor = deltasync_consumer::local::for_each_entry(&self.dir, |k, v| {
            entries.push((Arc::<str>::from(k), Bytes::copy_from_slice(v)));
            Ok(())
        })
        .unwrap()
        .expect("a committed cursor");
        let mut state = State::new(cursor.lineage);
        for (k, v) in entries {
            state.insert(k, v);
        }
        state.set_position(cursor.lineage, cursor.seq);
        (state, cursor)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ChildConsumer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A `deltasync-producer` command for `settings`, logging into `log`.
pub fn producer_command(settings: &Settings, log: &Path) -> Command {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut cmd = Command::new(producer_bin());
    cmd.args(["--nats-url", &settings.nats.url])
        .args(["--pipeline", &settings.pipeline])
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log));
    settings_env(&mut cmd, settings);
    cmd
}

/// A minimal HTTP/1.0 GET on 127.0.0.1:`port` (no client crate needed): status and body.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.ok()?;
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = std::str::from_utf8(&raw[..split]).ok()?;
        let code = head.split(' ').nth(1)?.parse().ok()?;
        Some((code, raw[split + 4..].to_vec()))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .ok()
        .flatten()
}

// ------------------------------------------------------------------------------ the stream

/// A JetStream context on `url` (comma-separated for a cluster), for inspecting and damaging
/// what the pipeline wrote.
pub async fn js(url: &str) -> jetstream::Context {
    let addrs: Vec<async_nats::ServerAddr> = url
        .split(',')
        .map(|u| u.parse().expect("a server address"))
        .collect();
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(addrs)
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
    /// The state after the last complete transaction of the (single) lineage.
    pub state: State,
    pub envelopes: u64,
    pub foreign: u64,
}

/// Replays a stream holding one lineage from its envelope 1 through a fresh `State::apply`,
/// asserting that envelopes run 1, 2, 3, ... with no gap and no duplicate and that every
/// digest verifies.
pub fn replay(items: &[(u64, Classified)], context: &str) -> Replayed {
    let mut state: Option<State> = None;
    let mut last = 0u64;
    let mut out = Replayed {
        state: State::new(Lineage::default()),
        envelopes: 0,
        foreign: 0,
    };
    for (stream_seq, item) in items {
        let env: &Envelope = match item {
            Classified::Foreign { .. } => {
                out.foreign += 1;
                continue;
            }
            Classified::Envelope(env) => env,
        };
        let s = state.get_or_insert_with(|| State::new(env.lineage));
        assert_eq!(
            s.lineage(),
            env.lineage,
            "{context}: one lineage (stream seq {stream_seq})"
        );
        assert_eq!(
            env.seq,
            last + 1,
            "{context}: envelope {} follows {last} at stream seq {stream_seq}: gap or duplicate",
            env.seq
        );
        match s.apply(env) {
            Ok(Applied::Committed { .. } | Applied::Buffered { .. }) => {}
            Err(e) => panic!(
                "{context}: envelope {} at stream seq {stream_seq} does not apply: {e}",
                env.seq
            ),
        }
        last = env.seq;
        out.envelopes += 1;
    }
    if let Some(s) = state {
        out.state = s;
    }
    out
}

/// The stream's (first, last) sequence.
pub async fn bounds(js: &jetstream::Context, pipeline: &str) -> (u64, u64) {
    let mut stream = js.get_stream(names::stream_name(pipeline)).await.unwrap();
    let info = stream.info().await.unwrap();
    (info.state.first_sequence, info.state.last_sequence)
}
