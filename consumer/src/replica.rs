//! The replica handle a Rust service reads from: consistent views of the state, the status,
//! and a stream of applied change batches — the way informer event handlers react to a
//! Kubernetes cache. The engine is its only writer.
//!
//! Talks to nothing: the engine publishes into it, readers (HTTP, library users) read from it.
//!
//! ## Invariants
//!
//! - Nothing here is ahead of the local commit: a view, the status position and every change
//!   batch are published only after the commit of the position they describe is durable
//!   (immediately in memory mode).
//! - A view is one `State` at one sequence: reading it never sees half a transaction, and it
//!   never changes (the engine publishes a new one instead; `State` clones share unchanged
//!   buckets, so a view costs a few pointer copies).
//! - Every change of what [`Replica::status`] shows wakes [`Replica::wait_until`]: the
//!   engine changes the status only through the replica's methods (`committed`, `set_lag`,
//!   `set_headroom`, `record`), each of which notifies; the counters the status shows can be
//!   changed only by [`Replica::record`] (it alone holds the [`Notifies`] that
//!   `Metrics::count` requires). The one exception, by design: an applied envelope's counts
//!   are announced by the commit that makes it durable (at most one commit interval later),
//!   not one by one.
//! - Change batches are delivered in sequence order. A subscriber that falls more than
//!   [`EVENT_CAPACITY`] batches behind gets `RecvError::Lagged` and should re-read a view.
//! - The feed ([`feed`]) holds the most recent committed batches, gapless, filled here and
//!   nowhere else, after the view and the position of the same commit: a reader that places a
//!   cursor after reading the view (and the feed's epoch before it) misses nothing.
//!
//! ## Following changes
//!
//! [`Replica::watch`] is the way to follow the replica without ever missing or repeating a
//! change, whatever happens to it (the pattern of kube-runtime's watcher):
//!
//! ```text
//! Init(view)           the state now; then
//! Batch(batch) ...     every committed batch after it, in order, gapless; and
//! Reset(view)          a fresh state whenever continuity is lost (a re-snapshot, a lineage
//!                      change, or the watcher fell behind the feed's floor); batches follow it
//! ```
//!
//! It reads the shared feed (bounded by `consumer.feed_max_bytes`): each watcher holds only a
//! cursor, so a slow one costs the others nothing; it is reset instead. With the feed off
//! every commit is a `Reset`. [`Replica::subscribe`] (a broadcast of every batch, including a
//! re-snapshot's diff) stays for reactions that need the diff.
//!
//! [`Replica::wait_for`] waits until the replica applied a sequence (read-your-writes with
//! a producer receipt's `last_seq`).

use crate::follower::{ChangeBatch, Reason};
use bytes::Bytes;
use deltasync_core::Position;
use deltasync_core::{Digest, Lineage, State};
use futures::Stream;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;
use tokio::sync::{broadcast, watch};

pub mod feed;
pub mod metrics;
use feed::{Cursor, Feed, FeedBatch, Step};
use metrics::Metrics;

/// Batches a watcher takes from the feed at once: one, so that a stalled watcher keeps no
/// batch alive that the ring has let go.
const WATCH_TAKE: usize = 1;

/// What [`Replica::watch`] yields.
#[derive(Clone, Debug)]
pub enum WatchEvent {
    /// The state the watch starts from; batches after it follow.
    Init(Arc<View>),
    /// The next committed batch (always of kind `Applied`), continuing the last one.
    Batch(Arc<ChangeBatch>),
    /// Continuity was lost (a re-snapshot, a lineage change, or the watcher fell behind the
    /// feed): the state now, to replace the watcher's; batches after it follow.
    Reset(Arc<View>),
}

/// The replica did not reach a sequence in time.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the replica is at sequence {seq} of lineage {lineage}, not yet at {wanted}{}",
    match want_lineage { Some(l) => format!(" of lineage {l}"), None => String::new() }
)]
pub struct WaitError {
    /// The sequence waited for.
    pub wanted: u64,
    /// The lineage waited for, when one was asked.
    pub want_lineage: Option<Lineage>,
    /// The committed position when the wait ended.
    pub seq: u64,
    pub lineage: Lineage,
}

/// Change batches a subscriber may fall behind before it is told it lagged.
pub const EVENT_CAPACITY: usize = 4096;

/// A change of the counters the status shows, for [`Replica::record`].
#[derive(Clone, Debug)]
pub(crate) enum StatusEvent {
    /// A transaction applied with that many changes (announced by its commit).
    Applied { changes: u64 },
    /// A stream message that is not an envelope, skipped.
    Foreign,
    /// The stream reader went silent while the stream held more, and was reopened.
    ReaderStall,
    /// A start-up or resync decision.
    Decision(Reason),
    /// A re-snapshot (or a lineage move) completed.
    Resync(ResyncRecord),
}

/// Proof that the caller wakes the status waiters after changing a counter the status shows:
/// only this module (and its `metrics` child, which only takes one) can make one.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Notifies(());

/// A consistent, immutable view of the replica at one committed sequence.
#[derive(Clone, Debug)]
pub struct View {
    state: State,
    stream_seq: u64,
}

/// The lag in time (see [`Status::lag_seconds`]): 0 when no message is behind, else the time
/// since `last_produced_ms`, never negative (clocks differ); `None` when that is unknown.
pub(crate) fn lag_seconds(lag: u64, last_produced_ms: Option<u64>, now_ms: u64) -> Option<f64> {
    if lag == 0 {
        return Some(0.0);
    }
    last_produced_ms.map(|p| now_ms.saturating_sub(p) as f64 / 1000.0)
}

fn now_ms() -> u64 {
    deltasync_core::envelope::now_ms()
}

/// Views of at least this many keys are freed on a background thread (see [`View`]'s `Drop`).
const FREE_IN_BACKGROUND: usize = 65_536;

/// The last view of a large state frees its entries on a background thread: a million keys
/// are a million frees (~0.1 s), which would otherwise stall the async thread that happened
/// to drop the view — or, in `run --once`, delay the exit by as much. A view that shares its
/// buckets with the engine's state only gives back its references there.
impl Drop for View {
    fn drop(&mut self) {
        if self.state.len() >= FREE_IN_BACKGROUND {
            let lineage = self.state.lineage();
            deltasync_core::state::free_in_background(std::mem::replace(
                &mut self.state,
                State::new(lineage),
            ));
        }
    }
}

impl View {
    pub(crate) fn new(state: State, stream_seq: u64) -> View {
        View { state, stream_seq }
    }

    /// The whole state (entries, digest, position).
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The lineage.
    pub fn lineage(&self) -> Lineage {
        self.state.lineage()
    }

    /// The envelope sequence of the view.
    pub fn seq(&self) -> u64 {
        self.state.seq()
    }

    /// The stream sequence of that envelope.
    pub fn stream_seq(&self) -> u64 {
        self.stream_seq
    }

    /// The state digest.
    pub fn digest(&self) -> Digest {
        self.state.digest()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.state.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.state.is_empty()
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.state.get(key)
    }
}

/// The last re-snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResyncRecord {
    pub reason: Reason,
    /// When it completed, ms since the Unix epoch.
    pub at_ms: u64,
    /// The position before (0 when there was none).
    pub from_seq: u64,
    /// The snapshot's position.
    pub seq: u64,
    pub bytes_fetched: u64,
    pub ranges_rebuilt: usize,
    pub segments_applied: usize,
    pub duration_ms: u64,
}

/// The replica's own headroom before retention prunes its position, judged as
/// `deltasync-consumer status` judges every consumer's (the stream's own limits, the minimum
/// over messages, bytes and age), every few seconds by the running consumer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HeadroomStatus {
    /// The stream position judged (the committed cursor's stream sequence then).
    pub position: u64,
    /// Stream messages after it then.
    pub lag: u64,
    /// Its next message was already pruned: a re-snapshot is due.
    pub pruned: bool,
    /// Messages that can still arrive before retention prunes the position (`None`: no
    /// limit applies).
    pub messages: Option<u64>,
    /// At the stream's recent rate, seconds until then.
    pub secs: Option<f64>,
    /// The limit that binds first: "messages", "bytes" or "age".
    pub limit: Option<&'static str>,
    /// When it was judged, ms since the Unix epoch.
    pub at_ms: u64,
}

/// What `/v1/status` shows.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub id: String,
    pub pipeline: String,
    /// Whether commits reach a disk (`--data-dir`).
    pub durable: bool,
    /// Whether the replica holds a verified state.
    pub bootstrapped: bool,
    /// Bootstrapped and within `consumer.max_ready_lag`.
    pub ready: bool,
    /// Lineage of the committed position (hex).
    pub lineage: String,
    /// Committed envelope sequence.
    pub seq: u64,
    /// Its stream sequence.
    pub stream_seq: u64,
    /// State digest at `seq` (hex).
    pub digest: String,
    /// Stream messages after the committed position.
    pub lag: u64,
    /// The lag in time: 0 when caught up (`lag` 0), else the time since the producer made
    /// the last applied envelope (an upper bound of how long the oldest unapplied one has
    /// waited; the producer's clock against this host's). `None` while unknown (no envelope
    /// applied since the bootstrap or the last re-snapshot).
    pub lag_seconds: Option<f64>,
    /// When the producer made the last applied envelope, ms since the Unix epoch.
    pub last_applied_at_ms: Option<u64>,
    /// Keys in the replica at `seq`.
    pub entries: usize,
    pub last_resync: Option<ResyncRecord>,
    /// Start-up and resync decisions taken, by reason.
    pub decisions: std::collections::BTreeMap<String, u64>,
    pub envelopes_applied: u64,
    pub changes_applied: u64,
    pub foreign_messages: u64,
    /// Times the stream reader was reopened because it went silent while the stream held more.
    pub reader_stalls: u64,
    pub snapshot_bytes_fetched: u64,
    /// The replica's headroom before retention prunes its position; `None` until first
    /// judged (after the bootstrap).
    pub headroom: Option<HeadroomStatus>,
    /// The change feed: how far back `/v1/changes` and `/v1/watch` can resume.
    pub feed: FeedStatus,
    /// The snapshot load or re-snapshot running now (`None` when none is).
    pub sync: Option<SyncStatus>,
}

/// A snapshot load or re-snapshot in progress, as the engine registers it.
#[derive(Clone, Debug)]
pub(crate) struct SyncRun {
    pub reason: Reason,
    /// The manifest's envelope sequence.
    pub seq: u64,
    pub started_at_ms: u64,
    pub progress: deltasync_nats::store::SyncProgress,
}

/// A snapshot load or re-snapshot in progress, in `/v1/status` (`sync`): what it fetched and
/// what is left (like Redis's `master_sync_left_bytes`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SyncStatus {
    pub reason: Reason,
    /// The snapshot's envelope sequence.
    pub seq: u64,
    pub started_at_ms: u64,
    /// Snapshot bytes fetched so far, and still to fetch (0 until the plan is known).
    pub fetched_bytes: u64,
    pub remaining_bytes: u64,
    /// Base entries fetched so far, and still to fetch.
    pub fetched_entries: u64,
    pub remaining_entries: u64,
}

impl SyncRun {
    fn status(&self) -> SyncStatus {
        let p = &self.progress;
        SyncStatus {
            reason: self.reason,
            seq: self.seq,
            started_at_ms: self.started_at_ms,
            fetched_bytes: p.fetched_bytes(),
            remaining_bytes: p.planned_bytes().saturating_sub(p.fetched_bytes()),
            fetched_entries: p.fetched_entries(),
            remaining_entries: p.planned_entries().saturating_sub(p.fetched_entries()),
        }
    }
}

/// The change feed's extent, in `/v1/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FeedStatus {
    /// `consumer.feed_max_bytes` (0: off).
    pub max_bytes: u64,
    /// The oldest position a follower can resume after; older ones must re-read the state.
    pub floor: u64,
    /// Batches held (those after `floor`, up to the committed position).
    pub batches: usize,
    /// Bytes they count against `max_bytes`.
    pub bytes: u64,
}

#[derive(Debug, Default)]
struct Progress {
    cursor: Position,
    entries: usize,
    bootstrapped: bool,
    last_resync: Option<ResyncRecord>,
    /// When the producer made the last applied envelope (ms since the epoch, its clock);
    /// `None` before one applied, and after a re-snapshot until the next one does.
    last_produced_ms: Option<u64>,
}

#[derive(Debug)]
struct Inner {
    id: String,
    pipeline: String,
    durable: bool,
    max_ready_lag: u64,
    view: RwLock<Arc<View>>,
    /// Set by a reader that found the view behind the committed position; the engine then
    /// publishes a fresh one at its next commit.
    view_wanted: AtomicBool,
    /// Wakes an idle engine when a view is wanted.
    view_request: tokio::sync::Notify,
    position: Mutex<Progress>,
    lag: AtomicU64,
    /// The last judgement of the replica's headroom (by `ops::refresh_headroom`).
    headroom: Mutex<Option<HeadroomStatus>>,
    /// The snapshot load or re-snapshot running now, if any.
    sync: Mutex<Option<SyncRun>>,
    /// Bumped at every change of the status, for [`Replica::wait_until`].
    changed: watch::Sender<u64>,
    events: broadcast::Sender<Arc<ChangeBatch>>,
    /// The most recent committed batches, for watchers and `/v1/changes`.
    feed: Mutex<Feed>,
    /// Bumped when the feed's head or epoch moves: wakes watchers, and only them.
    feed_changed: watch::Sender<u64>,
    metrics: Metrics,
    registry: prometheus_client::registry::Registry,
    http_addr: std::sync::OnceLock<std::net::SocketAddr>,
}

/// A handle on a replica: cheap to clone, safe to share across tasks and threads.
#[derive(Clone, Debug)]
pub struct Replica {
    inner: Arc<Inner>,
}

impl Replica {
    pub(crate) fn new(
        id: &str,
        pipeline: &str,
        durable: bool,
        max_ready_lag: u64,
        feed_max_bytes: u64,
    ) -> Replica {
        let (metrics, registry) = Metrics::new();
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let empty = View::new(State::new(Lineage::default()), 0);
        Replica {
            inner: Arc::new(Inner {
                id: id.to_owned(),
                pipeline: pipeline.to_owned(),
                durable,
                max_ready_lag,
                view: RwLock::new(Arc::new(empty)),
                view_wanted: AtomicBool::new(false),
                view_request: tokio::sync::Notify::new(),
                position: Mutex::new(Progress::default()),
                lag: AtomicU64::new(0),
                headroom: Mutex::new(None),
                sync: Mutex::new(None),
                changed: watch::channel(0).0,
                events,
                feed: Mutex::new(Feed::new(
                    usize::try_from(feed_max_bytes).unwrap_or(usize::MAX),
                )),
                feed_changed: watch::channel(0).0,
                metrics,
                registry,
                http_addr: std::sync::OnceLock::new(),
            }),
        }
    }

    /// The replica's id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The address the HTTP endpoint listens on, once it does.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.inner.http_addr.get().copied()
    }

    pub(crate) fn set_http_addr(&self, addr: std::net::SocketAddr) {
        let _ = self.inner.http_addr.set(addr);
    }

    /// The latest published view, at once. It is at the committed position when the replica
    /// is caught up; while it works through a backlog it may trail the committed position
    /// (publishing a view on every commit would copy every bucket the next transactions touch).
    /// Asking marks a view wanted, and the next commit publishes a fresh one; use
    /// [`Replica::fresh_view`] to wait for it.
    pub fn view(&self) -> Arc<View> {
        let view = self.read_view();
        let committed = self.position().cursor;
        if view.seq() != committed.seq || view.lineage() != committed.lineage {
            self.want_view();
        }
        view
    }

    /// A view at least as recent as the committed position at the time of the call: waits
    /// for the next commit to publish one when the latest view trails (at most `timeout`, then
    /// the latest view is returned).
    pub async fn fresh_view(&self, timeout: Duration) -> Arc<View> {
        let mut rx = self.inner.changed.subscribe();
        let target = self.position().cursor;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let view = self.read_view();
            let committed = self.position().cursor;
            let current = (view.lineage(), view.seq()) == (committed.lineage, committed.seq);
            let reached = view.lineage() == target.lineage && view.seq() >= target.seq;
            if current || reached {
                return view;
            }
            self.want_view();
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return self.read_view(),
            }
        }
    }

    fn want_view(&self) {
        if !self.inner.view_wanted.swap(true, Ordering::Relaxed) {
            self.inner.view_request.notify_one();
        }
    }

    fn read_view(&self) -> Arc<View> {
        match self.inner.view.read() {
            Ok(v) => v.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The value of `key` in the latest view.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.view().get(key).map(Bytes::copy_from_slice)
    }

    /// Waits until the replica's view is at sequence `seq` or later (in its current lineage),
    /// at most `timeout`; the error names where it is. Read-your-writes: pass the
    /// `last_seq` of a producer's commit receipt.
    pub async fn wait_for(&self, seq: u64, timeout: Duration) -> Result<Arc<View>, WaitError> {
        self.wait_for_in(None, seq, timeout).await
    }

    /// [`Replica::wait_for`] a sequence of a given lineage (`None`: the current one). A
    /// replica in another lineage may still move to it, so it waits for that too.
    pub async fn wait_for_in(
        &self,
        lineage: Option<Lineage>,
        seq: u64,
        timeout: Duration,
    ) -> Result<Arc<View>, WaitError> {
        let mut rx = self.inner.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        let reached = |l: Lineage, s: u64| lineage.is_none_or(|w| w == l) && s >= seq;
        loop {
            rx.borrow_and_update();
            let view = self.read_view();
            let bootstrapped = self.position().bootstrapped;
            if bootstrapped && reached(view.lineage(), view.seq()) {
                return Ok(view);
            }
            let committed = self.position().cursor;
            if reached(committed.lineage, committed.seq) {
                self.want_view();
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    let at = self.position().cursor;
                    return Err(WaitError {
                        wanted: seq,
                        want_lineage: lineage,
                        seq: at.seq,
                        lineage: at.lineage,
                    });
                }
            }
        }
    }

    /// Follows the replica: its state now, then every committed batch after it, and a fresh
    /// state whenever continuity is lost (see "Following changes" in the module header).
    /// Waits for the first commit before `Init`. Ends only when the replica is dropped.
    pub fn watch(&self) -> impl Stream<Item = WatchEvent> + Send + 'static {
        struct Watcher {
            replica: Replica,
            cursor: Option<Cursor>,
            started: bool,
            pending: VecDeque<Arc<FeedBatch>>,
            ticks: watch::Receiver<u64>,
            _counted: metrics::Following,
        }
        let w = Watcher {
            _counted: metrics::Following::new(&self.inner.metrics),
            replica: self.clone(),
            cursor: None,
            started: false,
            pending: VecDeque::new(),
            ticks: self.feed_ticks(),
        };
        futures::stream::unfold(w, |mut w| async move {
            loop {
                if let Some(b) = w.pending.pop_front() {
                    return Some((WatchEvent::Batch(b.batch().clone()), w));
                }
                w.ticks.borrow_and_update();
                let Some(cursor) = w.cursor.as_mut() else {
                    let epoch = w.replica.feed().epoch();
                    if epoch == 0 {
                        w.ticks.changed().await.ok()?;
                        continue;
                    }
                    // The epoch before the view: a reset in between is seen as lost.
                    let view = w.replica.fresh_view(Duration::from_secs(1)).await;
                    w.cursor = Some(Cursor {
                        after: view.seq(),
                        lineage: Some(view.lineage()),
                        epoch: Some(epoch),
                    });
                    let event = if w.started {
                        WatchEvent::Reset(view)
                    } else {
                        WatchEvent::Init(view)
                    };
                    w.started = true;
                    return Some((event, w));
                };
                let step = cursor.next(&w.replica.feed(), WATCH_TAKE);
                match step {
                    Step::Batches(b) => w.pending.extend(b),
                    Step::Lost => {
                        w.replica.inner.metrics.followers_lost.inc();
                        w.cursor = None;
                    }
                    Step::Wait => w.ticks.changed().await.ok()?,
                }
            }
        })
    }

    /// The feed, locked (for a few pointer copies).
    pub(crate) fn feed(&self) -> MutexGuard<'_, Feed> {
        match self.inner.feed.lock() {
            Ok(f) => f,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Changes whenever the feed's head or epoch moves.
    pub(crate) fn feed_ticks(&self) -> watch::Receiver<u64> {
        self.inner.feed_changed.subscribe()
    }

    /// Whether the feed keeps batches (`consumer.feed_max_bytes` > 0).
    pub fn feed_on(&self) -> bool {
        self.feed().is_on()
    }

    /// Subscribes to committed change batches, from now on, in order.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<ChangeBatch>> {
        self.inner.events.subscribe()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The metrics in Prometheus text format.
    pub fn metrics_text(&self) -> String {
        // The lag in time grows while nothing happens: set it as of now.
        let produced = self.position().last_produced_ms;
        let m = &self.inner.metrics;
        m.lag_seconds
            .set(lag_seconds(self.lag(), produced, now_ms()).unwrap_or(0.0));
        m.last_applied_timestamp
            .set(produced.map_or(0.0, |ms| ms as f64 / 1000.0));
        let sync = self.sync_status();
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        m.sync_fetched_bytes
            .set(gauge(sync.as_ref().map_or(0, |s| s.fetched_bytes)));
        m.sync_remaining_bytes
            .set(gauge(sync.as_ref().map_or(0, |s| s.remaining_bytes)));
        m.sync_remaining_entries
            .set(gauge(sync.as_ref().map_or(0, |s| s.remaining_entries)));
        metrics::encode(&self.inner.registry)
    }

    /// Registers the snapshot load running now (`None`: it ended).
    pub(crate) fn set_sync(&self, sync: Option<SyncRun>) {
        match self.inner.sync.lock() {
            Ok(mut g) => *g = sync,
            Err(poisoned) => *poisoned.into_inner() = sync,
        }
        self.bump();
    }

    fn sync_status(&self) -> Option<SyncStatus> {
        let g = match self.inner.sync.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        g.as_ref().map(SyncRun::status)
    }

    /// Records when the producer made the last transaction of a commit (`None`: unknown, as
    /// after a re-snapshot).
    pub(crate) fn set_last_produced(&self, produced_at_ms: Option<u64>) {
        self.position().last_produced_ms = produced_at_ms;
    }

    fn position(&self) -> std::sync::MutexGuard<'_, Progress> {
        match self.inner.position.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Whether the replica holds a verified state within the allowed lag.
    pub fn is_ready(&self) -> bool {
        self.position().bootstrapped && self.lag() <= self.inner.max_ready_lag
    }

    /// Stream messages after the committed position.
    pub fn lag(&self) -> u64 {
        self.inner.lag.load(Ordering::Relaxed)
    }

    /// The committed stream position, once the replica holds a verified state.
    pub(crate) fn bootstrapped_position(&self) -> Option<u64> {
        let p = self.position();
        p.bootstrapped.then_some(p.cursor.stream_seq)
    }

    pub(crate) fn set_headroom(&self, h: HeadroomStatus) {
        match self.inner.headroom.lock() {
            Ok(mut g) => *g = Some(h),
            Err(poisoned) => *poisoned.into_inner() = Some(h),
        }
        self.bump();
    }

    fn headroom(&self) -> Option<HeadroomStatus> {
        match self.inner.headroom.lock() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The current status.
    pub fn status(&self) -> Status {
        let (cursor, entries, bootstrapped, last_resync, last_produced_ms) = {
            let p = self.position();
            (
                p.cursor,
                p.entries,
                p.bootstrapped,
                p.last_resync.clone(),
                p.last_produced_ms,
            )
        };
        let lag = self.lag();
        let m = &self.inner.metrics;
        Status {
            id: self.inner.id.clone(),
            pipeline: self.inner.pipeline.clone(),
            durable: self.inner.durable,
            bootstrapped,
            ready: bootstrapped && lag <= self.inner.max_ready_lag,
            lineage: cursor.lineage.to_hex(),
            seq: cursor.seq,
            stream_seq: cursor.stream_seq,
            digest: cursor.digest.to_hex(),
            lag,
            lag_seconds: lag_seconds(lag, last_produced_ms, now_ms()),
            last_applied_at_ms: last_produced_ms,
            entries,
            last_resync,
            decisions: m.decisions(),
            envelopes_applied: m.envelopes_applied(),
            changes_applied: m.changes_applied(),
            foreign_messages: m.foreign_messages(),
            reader_stalls: m.reader_stalls(),
            snapshot_bytes_fetched: m.snapshot_bytes(),
            headroom: self.headroom(),
            sync: self.sync_status(),
            feed: {
                let f = self.feed();
                FeedStatus {
                    max_bytes: f.max_bytes() as u64,
                    floor: f.floor(),
                    batches: f.len(),
                    bytes: f.bytes() as u64,
                }
            },
        }
    }

    /// Waits until `done` holds for the status, re-checking at every change. Returns the
    /// last status seen as `Err` when `timeout` passes first.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&Status) -> bool,
    ) -> Result<Status, Box<Status>> {
        let mut rx = self.inner.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self.status();
            if done(&status) {
                return Ok(status);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Err(Box::new(self.status())),
            }
        }
    }

    // ---- engine side ----

    pub(crate) fn has_subscribers(&self) -> bool {
        self.inner.events.receiver_count() > 0
    }

    /// Resolves when a reader wants a fresher view.
    pub(crate) async fn view_requested(&self) {
        self.inner.view_request.notified().await;
    }

    pub(crate) fn take_view_wanted(&self) -> bool {
        self.inner.view_wanted.swap(false, Ordering::Relaxed)
    }

    fn bump(&self) {
        self.inner.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Records a durable commit at `cursor` holding `entries` keys, with the view of it when
    /// one was taken, and delivers its change batches.
    pub(crate) fn committed(
        &self,
        cursor: Position,
        entries: usize,
        view: Option<State>,
        batches: Vec<Arc<ChangeBatch>>,
        bootstrapped: bool,
    ) {
        if let Some(state) = view {
            let v = Arc::new(View::new(state, cursor.stream_seq));
            match self.inner.view.write() {
                Ok(mut g) => *g = v,
                Err(poisoned) => *poisoned.into_inner() = v,
            }
        }
        {
            let mut p = self.position();
            p.cursor = cursor;
            p.entries = entries;
            p.bootstrapped = bootstrapped;
        }
        let m = &self.inner.metrics;
        m.seq.set(i64::try_from(cursor.seq).unwrap_or(i64::MAX));
        m.entries.set(i64::try_from(entries).unwrap_or(i64::MAX));
        self.update_ready();
        let moved = {
            let mut f = self.feed();
            let before = (f.epoch(), f.head());
            f.commit(cursor.lineage, cursor.seq, &batches);
            m.feed_bytes
                .set(i64::try_from(f.bytes()).unwrap_or(i64::MAX));
            m.feed_batches
                .set(i64::try_from(f.len()).unwrap_or(i64::MAX));
            before != (f.epoch(), f.head())
        };
        if moved {
            self.inner
                .feed_changed
                .send_modify(|n| *n = n.wrapping_add(1));
        }
        for b in batches {
            // No receiver is not an error: nobody listens.
            let _ = self.inner.events.send(b);
        }
        self.bump();
    }

    /// Counts `event` in the status and wakes the status waiters — except for an applied
    /// transaction, which its commit ([`Replica::committed`]) announces: no wake-up per
    /// envelope on the hot path.
    pub(crate) fn record(&self, event: StatusEvent) {
        self.inner.metrics.count(&event, Notifies(()));
        match event {
            StatusEvent::Applied { .. } => return,
            StatusEvent::Resync(record) => self.position().last_resync = Some(record),
            StatusEvent::Foreign | StatusEvent::ReaderStall | StatusEvent::Decision(_) => {}
        }
        self.bump();
    }

    pub(crate) fn set_lag(&self, lag: u64) {
        let old = self.inner.lag.swap(lag, Ordering::Relaxed);
        if old != lag {
            self.inner
                .metrics
                .lag
                .set(i64::try_from(lag).unwrap_or(i64::MAX));
            self.update_ready();
            self.bump();
        }
    }

    fn update_ready(&self) {
        self.inner.metrics.ready.set(i64::from(self.is_ready()));
    }

    /// The view's position, for the engine's decision to publish a fresh one.
    pub(crate) fn view_seq(&self) -> (Lineage, u64) {
        let v = self.read_view();
        (v.lineage(), v.seq())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use deltasync_core::Change;

    #[test]
    fn a_sync_in_progress_shows_in_the_status_and_the_metrics_until_it_ends() {
        let r = Replica::new("r", "p", false, 10, 0);
        assert_eq!(r.status().sync, None);
        let progress = deltasync_nats::store::SyncProgress::default();
        r.set_sync(Some(SyncRun {
            reason: Reason::Bootstrap,
            seq: 7,
            started_at_ms: 1,
            progress: progress.clone(),
        }));
        let s = r.status().sync.expect("a sync in progress");
        assert_eq!((s.seq, s.fetched_bytes, s.remaining_bytes), (7, 0, 0));
        let text = r.metrics_text();
        assert!(
            text.contains("deltasync_consumer_sync_remaining_bytes 0"),
            "{text}"
        );
        r.set_sync(None);
        assert_eq!(r.status().sync, None);
    }

    #[test]
    fn the_lag_in_time_is_zero_when_caught_up_and_the_age_of_the_last_applied_otherwise() {
        assert_eq!(lag_seconds(0, None, 10_000), Some(0.0));
        assert_eq!(lag_seconds(0, Some(1_000), 10_000), Some(0.0));
        assert_eq!(lag_seconds(5, Some(1_000), 10_000), Some(9.0));
        assert_eq!(lag_seconds(5, None, 10_000), None);
        // A producer clock ahead of ours: no negative lag.
        assert_eq!(lag_seconds(5, Some(20_000), 10_000), Some(0.0));
    }

    #[test]
    fn a_large_view_dropped_in_the_background_leaves_the_state_it_shared_intact() {
        let mut s = State::new(Lineage([2; 16]));
        let changes: Vec<Change> = (0..FREE_IN_BACKGROUND + 10)
            .map(|i| Change::put(format!("key-{i}"), format!("value-{i}").into_bytes()))
            .collect();
        s.apply_changes(&changes);
        let digest = s.digest();
        let view = View::new(s.clone(), 1);
        let moved_out = View::new(s.clone(), 1);
        drop(view);
        drop(moved_out);
        assert_eq!(s.len(), FREE_IN_BACKGROUND + 10);
        assert_eq!(s.digest(), digest);
        assert_eq!(s.get("key-65540"), Some(&b"value-65540"[..]));
        // The state keeps working after the views that shared its buckets are gone.
        s.apply_changes(&[Change::put("key-0", &b"changed"[..])]);
        assert_eq!(s.get("key-0"), Some(&b"changed"[..]));
    }

    #[test]
    fn ready_means_bootstrapped_and_within_the_allowed_lag() {
        let r = Replica::new("r", "p", false, 10, 1 << 20);
        assert!(!r.is_ready(), "not bootstrapped");
        let mut s = State::new(Lineage([1; 16]));
        s.apply_changes(&[Change::put("k", &b"v"[..])]);
        s.set_position(Lineage([1; 16]), 3);
        let cursor = Position::of(&s, 7);
        r.committed(cursor, 1, Some(s.clone()), Vec::new(), true);
        assert!(r.is_ready());
        r.set_lag(11);
        assert!(!r.is_ready());
        assert!(r.metrics_text().contains("deltasync_consumer_ready 0"));
        r.set_lag(10);
        assert!(r.is_ready());
        let st = r.status();
        assert_eq!((st.seq, st.stream_seq, st.entries, st.lag), (3, 7, 1, 10));
        assert_eq!(r.get("k").unwrap().as_ref(), b"v");
    }

    #[tokio::test]
    async fn a_reader_asking_for_a_view_marks_it_wanted_and_gets_the_next_one() {
        let r = Replica::new("r", "p", false, 10, 1 << 20);
        let mut s = State::new(Lineage([1; 16]));
        s.set_position(Lineage([1; 16]), 1);
        r.committed(Position::of(&s, 1), 0, Some(s.clone()), Vec::new(), true);
        // Committed without a view: the published one trails.
        s.apply_changes(&[Change::put("k", &b"v"[..])]);
        s.set_position(Lineage([1; 16]), 2);
        r.committed(Position::of(&s, 2), 1, None, Vec::new(), true);
        assert_eq!(r.view().seq(), 1);
        assert!(r.take_view_wanted());
        let waiter = {
            let r = r.clone();
            tokio::spawn(async move { r.fresh_view(Duration::from_secs(10)).await })
        };
        tokio::task::yield_now().await;
        r.committed(Position::of(&s, 2), 1, Some(s.clone()), Vec::new(), true);
        assert_eq!(waiter.await.unwrap().seq(), 2);
    }

    #[tokio::test]
    async fn every_recorded_status_event_but_an_applied_transaction_wakes_the_waiters() {
        let r = Replica::new("r", "p", false, 10, 1 << 20);
        let mut rx = r.inner.changed.subscribe();
        r.record(StatusEvent::Applied { changes: 3 });
        assert!(!rx.has_changed().unwrap(), "its commit announces it");
        let record = ResyncRecord {
            reason: Reason::Fork,
            at_ms: 1,
            from_seq: 2,
            seq: 3,
            bytes_fetched: 40,
            ranges_rebuilt: 1,
            segments_applied: 1,
            duration_ms: 5,
        };
        for event in [
            StatusEvent::Foreign,
            StatusEvent::ReaderStall,
            StatusEvent::Decision(Reason::Fork),
            StatusEvent::Resync(record.clone()),
        ] {
            r.record(event.clone());
            assert!(rx.has_changed().unwrap(), "{event:?} wakes the waiters");
            rx.mark_unchanged();
        }
        let s = r.status();
        assert_eq!((s.envelopes_applied, s.changes_applied), (1, 3));
        assert_eq!((s.foreign_messages, s.reader_stalls), (1, 1));
        assert_eq!(s.decisions.get("fork"), Some(&1));
        assert_eq!(s.last_resync, Some(record));
        assert_eq!(s.snapshot_bytes_fetched, 40);
    }
}
