//! Helpers shared by the integration tests: unique names, settings for a test server,
//! waiting on a condition with a deadline, and a producer-less pipeline to snapshot.
//!
//! Talks to nothing itself; the tests pass it a server URL from `deltasync-testkit`.

use async_nats::jetstream::{self, kv};
use deltasync_config::settings::{Settings, StorageKind};
use deltasync_core::codec::encode_envelope;
use deltasync_core::envelope::split_transaction;
use deltasync_core::snapshot::Manifest;
use deltasync_core::{names, Change, Lineage, State};
use deltasync_nats::store;
use deltasync_testkit::NatsServer;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A pipeline name no other test (in this or a concurrent run) uses.
pub fn unique_pipeline(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Validated default settings pointed at `url`, for pipeline `pipeline`, file storage.
pub fn settings(url: &str, pipeline: &str) -> Settings {
    let mut s = Settings::default();
    s.pipeline = pipeline.to_owned();
    s.nats.url = url.to_owned();
    s.nats.connect_timeout = Duration::from_secs(5);
    s.stream.storage = StorageKind::File;
    s.validate().expect("test settings are valid");
    s
}

/// Retries `attempt` until it returns `Ok`, or panics with the last error after `deadline`.
pub async fn eventually<T, E, F, Fut>(what: &str, deadline: Duration, mut attempt: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let start = Instant::now();
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(err) if start.elapsed() < deadline => {
                eprintln!("{what}: not yet ({err}); retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("{what}: still failing after {deadline:?}: {err}"),
        }
    }
}

/// A pipeline without a producer: a test server, its stream and bucket, and a state the test
/// publishes as a producer would and snapshots through `store`.
pub struct Pipeline {
    _server: NatsServer,
    pub settings: Settings,
    pub js: jetstream::Context,
    pub kv: kv::Store,
    /// The producer's state, and the stream sequence of its last envelope.
    pub state: State,
    pub stream_seq: u64,
}

impl Pipeline {
    /// Started with 64 KiB chunks.
    pub async fn start(prefix: &str) -> Pipeline {
        Pipeline::start_with(prefix, |_| {}).await
    }

    /// Started with 64 KiB chunks and what `tweak` changes.
    pub async fn start_with(prefix: &str, tweak: impl FnOnce(&mut Settings)) -> Pipeline {
        let server = NatsServer::start();
        let mut s = settings(&server.url(), &unique_pipeline(prefix));
        s.snapshot.chunk_target_bytes = 64 * 1024;
        tweak(&mut s);
        let client = deltasync_nats::connect(&s.nats).await.unwrap();
        let js = deltasync_nats::jetstream(client, &s.nats);
        deltasync_nats::ensure_stream(&js, &s).await.unwrap();
        let kv = deltasync_nats::ensure_bucket(&js, &s).await.unwrap();
        Pipeline {
            _server: server,
            settings: s,
            js,
            kv,
            state: State::new(Lineage::random()),
            stream_seq: 0,
        }
    }

    /// Commits a transaction as a producer would: apply, split, publish, await acks.
    pub async fn commit(&mut self, changes: Vec<Change>, max_bytes: usize) -> Vec<u64> {
        let digest = self.state.apply_changes(&changes);
        let envs = split_transaction(
            self.state.lineage(),
            self.state.seq() + 1,
            digest,
            0,
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

    pub async fn publish_raw(&mut self, payload: Vec<u8>) -> u64 {
        let subject = names::subject(&self.settings.pipeline);
        let ack = self.js.publish(subject, payload.into()).await.unwrap();
        let seq = ack.await.unwrap().sequence;
        self.stream_seq = seq;
        seq
    }

    /// Writes a snapshot of the state at the last published envelope.
    pub async fn snapshot(&self, prev: Option<(&Manifest, &State)>) -> Manifest {
        store::write_snapshot(&self.js, &self.settings, &self.state, self.stream_seq, prev)
            .await
            .unwrap()
    }
}

/// Puts of 100-byte values `tag` for keys `range`.
pub fn puts(range: std::ops::Range<usize>, tag: u8) -> Vec<Change> {
    range
        .map(|i| Change::put(format!("key-{i:07}"), vec![tag; 100]))
        .collect()
}
