//! Makes each replica's position visible on the server for operators: one durable JetStream
//! consumer per replica id (`names::consumer_name`) whose ack floor follows the replica's
//! committed stream sequence, and which the server removes after `inactive_threshold`
//! without the replica.
//!
//! Talks to JetStream: consumer create/update and consumer reset (nats-server 2.14, ADR-60).
//! Part of the crate's `nats` module, the only one that names async-nats; the stream and the
//! bucket are read through `deltasync_nats`.
//!
//! ## Invariants
//!
//! - The marker only ever moves to a position the engine has committed locally (the engine
//!   calls [`Marker::committed`] after the commit is durable). It is informational: the local
//!   cursor is authoritative, and a failure here is logged, never fatal.
//! - The marker consumer delivers nothing: its ack floor is set with a reset to
//!   `stream_seq + 1` (`DeliverPolicy::All` allows any reset), and since the server counts
//!   only pull requests as a pull consumer's activity, a running replica sends a no-wait pull
//!   of at most one byte every third of `inactive_threshold` to keep it.

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::ConsumerResetErrorKind;
use async_nats::jetstream::{self};
use deltasync_config::settings::Settings;
use deltasync_core::names;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Fewest time between two resets: a busy replica commits far more often than operators look.
const MIN_INTERVAL: Duration = Duration::from_millis(250);

/// The marker task's handle.
#[derive(Debug)]
pub struct Marker {
    tx: watch::Sender<Option<u64>>,
    /// Cancelled by [`Marker::finish`]: the task cuts its pause between resets short and
    /// sends the last position at once.
    finishing: CancellationToken,
    task: JoinHandle<()>,
}

impl Marker {
    /// Starts the marker of replica `id`.
    pub fn start(js: jetstream::Context, settings: &Settings, id: &str) -> Marker {
        let (tx, rx) = watch::channel(None);
        let name = names::consumer_name(&settings.pipeline, id);
        let stream = names::stream_name(&settings.pipeline);
        let threshold = settings.consumer.inactive_threshold;
        let finishing = CancellationToken::new();
        let task = tokio::spawn(run(
            js,
            stream,
            name,
            id.to_owned(),
            threshold,
            rx,
            finishing.clone(),
        ));
        Marker {
            tx,
            finishing,
            task,
        }
    }

    /// The replica committed up to `stream_seq`.
    pub fn committed(&self, stream_seq: u64) {
        self.tx.send_replace(Some(stream_seq));
    }

    /// Publishes the last position (bounded by `wait`) and stops.
    pub async fn finish(self, wait: Duration) {
        drop(self.tx);
        self.finishing.cancel();
        let mut task = self.task;
        if tokio::time::timeout(wait, &mut task).await.is_err() {
            task.abort();
        }
    }
}

async fn run(
    js: jetstream::Context,
    stream: String,
    name: String,
    id: String,
    threshold: Duration,
    mut rx: watch::Receiver<Option<u64>>,
    finishing: CancellationToken,
) {
    // Keep-alive well inside the threshold, so a live replica's consumer is never removed.
    let keepalive = if threshold.is_zero() {
        Duration::from_secs(60)
    } else {
        (threshold / 3).clamp(Duration::from_millis(200), Duration::from_secs(60))
    };
    let mut created = false;
    let mut last_sent: Option<u64> = None;
    let mut tick = tokio::time::interval(keepalive);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (closed, keepalive_due) = tokio::select! {
            r = rx.changed() => (r.is_err(), false),
            _ = tick.tick() => (false, true),
        };
        let wanted = *rx.borrow_and_update();
        if let Some(seq) = wanted {
            if keepalive_due || last_sent != Some(seq) {
                let r = publish(&js, &stream, &name, &id, threshold, seq, &mut created).await;
                if r.is_ok() && keepalive_due {
                    keep_alive(&js, &stream, &name).await;
                }
                match r {
                    Ok(()) => last_sent = Some(seq),
                    Err(e) => {
                        created = false;
                        tracing::warn!(consumer = %name, stream_seq = seq, error = %e, "Could not show the replica's position on the server; will retry");
                    }
                }
            }
        }
        if closed {
            return;
        }
        // A stopping replica does not wait out the pause (a `--once` bootstrap spent a
        // quarter second here): its last position goes out now.
        tokio::select! {
            _ = tokio::time::sleep(MIN_INTERVAL) => {}
            _ = finishing.cancelled() => {}
        }
    }
}

async fn publish(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
    id: &str,
    threshold: Duration,
    seq: u64,
    created: &mut bool,
) -> Result<(), async_nats::Error> {
    let s = js.get_stream(stream).await?;
    if !*created {
        let _: jetstream::consumer::Consumer<pull::Config> = s
            .create_consumer(pull::Config {
                durable_name: Some(name.to_owned()),
                description: Some(format!(
                    "deltasync replica {id}: position marker (delivers nothing)"
                )),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::All,
                inactive_threshold: threshold,
                ..Default::default()
            })
            .await?;
        *created = true;
    }
    match s.reset_consumer(name, Some(seq + 1)).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ConsumerResetErrorKind::NotFound => {
            // Removed meanwhile (inactivity while the replica was busy elsewhere): recreate.
            *created = false;
            Err(e.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// The server counts only pull requests as a pull consumer's activity (a reset is not one):
/// a no-wait pull of at most one byte shows the replica is alive without delivering anything.
async fn keep_alive(js: &jetstream::Context, stream: &str, name: &str) {
    let Ok(s) = js.get_stream(stream).await else {
        return;
    };
    let consumer: jetstream::consumer::Consumer<pull::Config> = match s.get_consumer(name).await {
        Ok(c) => c,
        Err(_) => return,
    };
    let batch = consumer
        .fetch()
        .max_messages(1)
        .max_bytes(1)
        .messages()
        .await;
    if let Ok(mut batch) = batch {
        let drain = async { while let Some(_m) = futures::StreamExt::next(&mut batch).await {} };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    }
}

/// A replica's position marker as the server holds it, for `forget`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MarkerInfo {
    /// The durable consumer's name.
    pub name: String,
    /// The replica's last committed stream sequence the marker shows.
    pub position: u64,
    /// Seconds since the marker last saw its replica (a keep-alive or a reset), when known.
    pub idle_secs: Option<f64>,
}

/// The marker named `name` on the pipeline's stream; `None` when the server has none by that
/// name. Also returns the names of every durable consumer of the stream (for the error that
/// lists them).
pub async fn lookup(
    js: &jetstream::Context,
    settings: &Settings,
    name: &str,
) -> Result<(Option<MarkerInfo>, Vec<String>), async_nats::Error> {
    use futures::TryStreamExt;
    let stream = js
        .get_stream(names::stream_name(&settings.pipeline))
        .await?;
    let infos: Vec<jetstream::consumer::Info> = stream.consumers().try_collect().await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let mut names: Vec<String> = Vec::new();
    let mut found = None;
    for info in infos {
        if info.config.durable_name.is_none() {
            continue;
        }
        if info.name == name {
            found = Some(MarkerInfo {
                name: info.name.clone(),
                position: info.ack_floor.stream_sequence,
                idle_secs: info
                    .delivered
                    .last_active
                    .map(|t| (now - t.unix_timestamp_nanos() as f64 / 1e9).max(0.0)),
            });
        }
        names.push(info.name);
    }
    names.sort();
    Ok((found, names))
}

/// Deletes the marker named `name`.
pub async fn delete(
    js: &jetstream::Context,
    settings: &Settings,
    name: &str,
) -> Result<(), async_nats::Error> {
    let stream = js
        .get_stream(names::stream_name(&settings.pipeline))
        .await?;
    stream.delete_consumer(name).await?;
    Ok(())
}
