//! The publisher: the one module of the producer that calls async-nats itself (every other
//! NATS call goes through `deltasync_nats`), and the only one that publishes. It keeps a
//! bounded window of envelopes awaiting their acknowledgement, fences every publish with the
//! stream sequence it expects, and reconciles with the stream when a publish is refused.
//!
//! Talks to the pipeline's stream (pipelined publishes with headers, message reads by
//! sequence on the stream leader, stream info); reports to the producer's shared status
//! and metrics, and hands snapshot cuts to the snapshot task once they are durable.
//!
//! ## Invariants
//!
//! - The stream never holds an envelope of this producer that does not directly follow the
//!   previous one (no gap, no interleaving, no duplicate), whatever else writes to the stream.
//! - A caller's commit, flush or snapshot is answered only after the envelopes it stands for
//!   are acknowledged (stored) by the stream.
//!
//! ## Headers of envelope `n`
//!
//! ```text
//! Nats-Msg-Id                  <lineage hex>-<n>       a retried publish is deduplicated
//! Nats-Expected-Last-Sequence  S(n-1)                  the stream sequence predicted for n-1
//! Nats-Expected-Last-Msg-Id    <lineage hex>-<n-1>     only while n-1 is unacknowledged
//! ```
//!
//! The expected last sequence fences out any other writer: if anything lands in the stream
//! that this producer did not predict, the publish fails with `WrongLastSequence`. On its own
//! it would not chain pipelined publishes: with `j` foreign messages landing in front of
//! envelope `n`, `n` fails but `n + j` would find exactly the last sequence it expects and be
//! stored after a gap. The expected last message id closes that hole: `n + 1` is stored only
//! if the stream's last message is envelope `n` itself. It is sent only while `n` is in flight
//! (a message id older than the duplicate window may be forgotten by the server, and once `n`
//! is acknowledged at its predicted sequence the expected last sequence says it all).
//!
//! ## Reconciling
//!
//! When the envelope at the front of the window is refused (wrong last sequence or message
//! id) or its acknowledgement is lost (timeout, broken connection, no responders while a
//! server restarts), the publisher awaits every outstanding acknowledgement, then reads the
//! stream from the last message it knows. Its own envelopes found there, in order and byte for
//! byte, count as acknowledged; foreign messages (not decodable as envelopes) are logged at
//! error level, counted, and skipped; any other valid envelope means another producer writes
//! this pipeline, and this one stops, fenced. Then it publishes the envelopes still missing
//! again, with the same message ids, expecting the stream's new last sequence. A duplicate
//! acknowledgement (same message id seen before) is accepted only if the stored message is
//! byte-for-byte this one.

use crate::error::ProducerError;
use crate::handoff::{Acked, Notify, Outgoing, SnapshotJob};
use crate::metrics::Metrics;
use crate::shared::Shared;
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::jetstream::{self, publish::PublishAck};
use bytes::Bytes;
use deltasync_config::settings::Settings;
use deltasync_core::codec::encode_envelope;
use deltasync_core::envelope::{Envelope, Lineage};
use deltasync_core::recovery::{classify, Classified};
use deltasync_core::{names, Digest};
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Most publishes in flight: async-nats's context allows 5,000 outstanding acks and would
/// make `send_publish` wait for a permit that only polling the window's acks can free.
const MAX_WINDOW: usize = 4096;

type AckFuture = Pin<Box<dyn Future<Output = Result<PublishAck, PublishError>> + Send>>;
type PublishError = async_nats::jetstream::context::PublishError;

/// An envelope sent and not yet acknowledged.
#[derive(Debug)]
struct InFlight {
    seq: u64,
    is_last_part: bool,
    digest: Digest,
    changes: u64,
    payload: Bytes,
    /// The stream sequence it must land at.
    predicted: u64,
    sent_at: Instant,
    notify: Vec<Notify>,
}

/// The JetStream context the producer's parts hold (its calls are made here and in
/// `deltasync_nats`).
pub(crate) type JetStream = jetstream::Context;

/// The NATS connection the producer holds.
pub(crate) type NatsClient = async_nats::Client;

/// Publishes one message to `subject` and waits for its acknowledgement; returns its stream
/// sequence (the new lineage's first envelope, published before the window starts).
pub(crate) async fn publish_one(
    js: &JetStream,
    subject: String,
    msg: PublishMessage,
) -> Result<u64, async_nats::Error> {
    let ack = js.send_publish(subject, msg).await?.await?;
    Ok(ack.sequence)
}

/// Flushes what the connection buffers (at shutdown).
pub(crate) async fn flush_client(client: &NatsClient) -> Result<(), async_nats::Error> {
    Ok(client.flush().await?)
}

/// Builds the message for envelope `seq` of `lineage`: payload, message id, expected last
/// stream sequence and, when the previous envelope is still in flight, its message id as the
/// expected last message id. Public so tests can replay exactly what the producer sends.
pub fn envelope_message(
    payload: Bytes,
    lineage: Lineage,
    seq: u64,
    expected_last_stream_seq: u64,
    previous_in_flight: bool,
) -> PublishMessage {
    let hex = lineage.to_hex();
    let mut msg = PublishMessage::build()
        .payload(payload)
        .message_id(names::msg_id(&hex, seq))
        .expected_last_sequence(expected_last_stream_seq);
    if previous_in_flight && seq > 1 {
        msg = msg.expected_last_message_id(names::msg_id(&hex, seq - 1));
    }
    msg
}

/// Publishes envelopes of one lineage in order through a bounded window of acknowledgements.
pub struct Publisher {
    js: jetstream::Context,
    stream_name: String,
    subject: String,
    pipeline: String,
    lineage: Lineage,
    window: VecDeque<InFlight>,
    acks: FuturesOrdered<AckFuture>,
    window_size: usize,
    /// The stream sequence the next publish expects as the stream's last one.
    expected_last: u64,
    /// Every stream message up to here has been accounted for (ours or foreign).
    scanned_upto: u64,
    acked: Acked,
    /// How long reconciling retries while NATS does not answer.
    retry_for: Duration,
    shared: Arc<Shared>,
    snapshots: mpsc::UnboundedSender<(SnapshotJob, u64)>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("stream", &self.stream_name)
            .field("lineage", &self.lineage)
            .field("in_flight", &self.window.len())
            .field("expected_last", &self.expected_last)
            .field("acked", &self.acked)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher continuing after `acked`, the first publish expecting the stream's last
    /// sequence to be `expected_last` (everything up to it was read by recovery).
    pub(crate) fn new(
        js: jetstream::Context,
        settings: &Settings,
        lineage: Lineage,
        expected_last: u64,
        acked: Acked,
        shared: Arc<Shared>,
        snapshots: mpsc::UnboundedSender<(SnapshotJob, u64)>,
    ) -> Publisher {
        Publisher {
            js,
            stream_name: names::stream_name(&settings.pipeline),
            subject: names::subject(&settings.pipeline),
            pipeline: settings.pipeline.clone(),
            lineage,
            window: VecDeque::with_capacity(settings.producer.ack_window),
            acks: FuturesOrdered::new(),
            window_size: settings.producer.ack_window.min(MAX_WINDOW),
            expected_last,
            scanned_upto: expected_last,
            acked,
            retry_for: settings
                .stream
                .duplicate_window
                .max(Duration::from_secs(30)),
            shared,
            snapshots,
        }
    }

    fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Runs until the engine closes its side and every envelope is acknowledged, or until a
    /// failure that ends the producer (returned; every waiter gets it too).
    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Outgoing>,
    ) -> Result<Acked, ProducerError> {
        let result = self.run_inner(&mut rx).await;
        self.metrics().ack_window_in_use.set(0);
        if let Err(err) = result {
            let cause = self.shared.fail(err);
            for f in self.window.drain(..) {
                fail_all(f.notify, &cause);
            }
            rx.close();
            while let Some(out) = rx.recv().await {
                match out {
                    Outgoing::Envelope { notify, .. } => fail_all(notify, &cause),
                    Outgoing::Notify(n) => fail_all(Some(n), &cause),
                }
            }
            return Err(ProducerError::shared(&cause));
        }
        result
    }

    async fn run_inner(
        &mut self,
        rx: &mut mpsc::Receiver<Outgoing>,
    ) -> Result<Acked, ProducerError> {
        let mut open = true;
        loop {
            if !open && self.window.is_empty() {
                return Ok(self.acked);
            }
            tokio::select! {
                biased;
                res = self.acks.next(), if !self.window.is_empty() => {
                    // `window` and `acks` hold the same envelopes in the same order.
                    let Some(res) = res else { continue };
                    self.settle_front(res).await?;
                }
                out = rx.recv(), if open && self.window.len() < self.window_size => {
                    match out {
                        None => open = false,
                        Some(Outgoing::Envelope { env, notify }) => self.send(env, notify).await?,
                        Some(Outgoing::Notify(n)) => match self.window.back_mut() {
                            Some(last) => last.notify.push(n),
                            None => {
                                let acked = self.acked;
                                self.resolve(n, acked.stream_seq);
                            }
                        },
                    }
                }
            }
        }
    }

    /// Encodes and sends one envelope (the window has room).
    async fn send(&mut self, env: Envelope, notify: Option<Notify>) -> Result<(), ProducerError> {
        let payload =
            Bytes::from(
                encode_envelope(&env).map_err(|source| ProducerError::Encode {
                    seq: env.seq,
                    source,
                })?,
            );
        let flight = InFlight {
            seq: env.seq,
            is_last_part: env.is_last_part(),
            digest: env.digest,
            changes: env.changes.len() as u64,
            payload,
            predicted: self.expected_last + 1,
            sent_at: Instant::now(),
            notify: notify.into_iter().collect(),
        };
        drop(env);
        let ack = match self
            .publish(&flight, self.expected_last, !self.window.is_empty())
            .await
        {
            Ok(ack) => ack,
            Err(e) => {
                // Kept in the window so its waiters get the cause when the publisher stops.
                self.window.push_back(flight);
                return Err(e);
            }
        };
        self.expected_last += 1;
        self.acks.push_back(ack);
        self.window.push_back(flight);
        self.metrics()
            .ack_window_in_use
            .set(self.window.len() as i64);
        Ok(())
    }

    async fn publish(
        &mut self,
        f: &InFlight,
        expected_last: u64,
        previous_in_flight: bool,
    ) -> Result<AckFuture, ProducerError> {
        let msg = envelope_message(
            f.payload.clone(),
            self.lineage,
            f.seq,
            expected_last,
            previous_in_flight,
        );
        match self.js.send_publish(self.subject.clone(), msg).await {
            Ok(ack) => Ok(into_boxed(ack)),
            Err(e) => Err(ProducerError::Publish {
                stream: self.stream_name.clone(),
                seq: f.seq,
                source: e.into(),
            }),
        }
    }

    /// Handles the acknowledgement (or failure) of the front envelope.
    async fn settle_front(
        &mut self,
        res: Result<PublishAck, PublishError>,
    ) -> Result<(), ProducerError> {
        let front = self.window.front().map(|f| (f.seq, f.predicted));
        let Some((seq, predicted)) = front else {
            return Ok(());
        };
        match res {
            Ok(ack) if !ack.duplicate && ack.sequence == predicted => {
                self.confirm_front(ack.sequence);
                Ok(())
            }
            Ok(ack) if ack.duplicate => {
                // Same message id already stored: ours (a retry) only if byte-identical.
                let stored = self.read(ack.sequence).await?;
                let same = stored
                    .as_ref()
                    .is_some_and(|p| self.window.front().is_some_and(|f| f.payload == *p));
                if !same {
                    return Err(self.fenced(seq, ack.sequence, stored.as_deref()));
                }
                if ack.sequence == predicted {
                    self.confirm_front(ack.sequence);
                    Ok(())
                } else {
                    self.reconcile(seq, None).await
                }
            }
            Ok(ack) => Err(ProducerError::Broken {
                stream: self.stream_name.clone(),
                stream_seq: ack.sequence,
                reason: format!(
                    "envelope {seq} was stored at stream sequence {} although it expected to \
                     follow {}",
                    ack.sequence,
                    predicted - 1
                ),
            }),
            Err(e) => match e.kind() {
                // `StreamNotFound` is the server's "no responders": nothing took the message,
                // as while a nats-server shuts down or JetStream is not up yet after a restart.
                // Reconciling retries until the stream answers (or `retry_for` runs out).
                PublishErrorKind::WrongLastSequence
                | PublishErrorKind::WrongLastMessageId
                | PublishErrorKind::TimedOut
                | PublishErrorKind::BrokenPipe
                | PublishErrorKind::StreamNotFound => self.reconcile(seq, Some(e)).await,
                _ => Err(ProducerError::Publish {
                    stream: self.stream_name.clone(),
                    seq,
                    source: e.into(),
                }),
            },
        }
    }

    /// The front envelope is stored at `stream_seq`.
    fn confirm_front(&mut self, stream_seq: u64) {
        let Some(f) = self.window.pop_front() else {
            return;
        };
        let m = self.metrics();
        m.publish_latency.observe(f.sent_at.elapsed().as_secs_f64());
        m.envelopes.inc();
        m.changes.inc_by(f.changes);
        m.bytes.inc_by(f.payload.len() as u64);
        m.last_seq.set(f.seq);
        m.ack_window_in_use.set(self.window.len() as i64);
        self.acked.seq = f.seq;
        self.acked.stream_seq = stream_seq;
        if f.is_last_part {
            self.acked.txn_seq = f.seq;
            self.acked.digest = f.digest;
        }
        self.scanned_upto = self.scanned_upto.max(stream_seq);
        self.shared.acknowledged(self.acked);
        for n in f.notify {
            self.resolve(n, stream_seq);
        }
    }

    fn resolve(&self, n: Notify, stream_seq: u64) {
        match n {
            Notify::Commit { mut receipt, reply } => {
                receipt.stream_seq = stream_seq;
                if let Some(reply) = reply {
                    // The caller may have stopped waiting; the commit stands regardless.
                    let _ = reply.send(Ok(receipt));
                }
            }
            Notify::Flush(reply) => {
                let _ = reply.send(Ok(self.shared.position()));
            }
            Notify::Snapshot(job) => {
                let stream_seq = job.at.unwrap_or(stream_seq);
                if let Err(mpsc::error::SendError((job, _))) =
                    self.snapshots.send((*job, stream_seq))
                {
                    job.fail(ProducerError::ShutDown);
                }
            }
        }
    }

    /// Brings the window back in line with the stream after envelope `seq` (the front) was
    /// refused or its acknowledgement lost: see the module documentation.
    async fn reconcile(
        &mut self,
        seq: u64,
        cause: Option<PublishError>,
    ) -> Result<(), ProducerError> {
        match &cause {
            Some(e) => {
                tracing::warn!(seq, error = %e, "Publish not acknowledged; reconciling with the stream")
            }
            None => tracing::warn!(
                seq,
                "Duplicate acknowledgement out of place; reconciling with the stream"
            ),
        }
        // Let every outstanding publish settle, so nothing of ours lands after the read.
        while self.acks.next().await.is_some() {}
        let started = Instant::now();
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.reconcile_once().await {
                Ok(()) => return Ok(()),
                Err(Retry::Fatal(err)) => return Err(err),
                Err(Retry::Again(source)) => {
                    if started.elapsed() > self.retry_for {
                        return Err(ProducerError::Unavailable {
                            stream: self.stream_name.clone(),
                            seq,
                            waited: started.elapsed(),
                            source,
                        });
                    }
                    tracing::warn!(seq, error = %source, retry_in = ?backoff, "Cannot read the stream to reconcile; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn reconcile_once(&mut self) -> Result<(), Retry> {
        let stream = self
            .js
            .get_stream(&self.stream_name)
            .await
            .map_err(|e| Retry::Again(e.into()))?;
        let last = stream
            .get_info()
            .await
            .map_err(|e| Retry::Again(e.into()))?
            .state
            .last_sequence;
        if last < self.acked.stream_seq {
            // The stream is shorter than what it acknowledged to us (a server lost
            // acknowledged writes, or the stream was recreated): publishing on would leave a
            // gap in the history.
            return Err(Retry::Fatal(ProducerError::Broken {
                stream: self.stream_name.clone(),
                stream_seq: last,
                reason: format!(
                    "the stream's last sequence is {last} but it acknowledged envelope {} at \
                     stream sequence {}: acknowledged envelopes were lost; restart the producer \
                     to recover from what the stream holds",
                    self.acked.seq, self.acked.stream_seq
                ),
            }));
        }
        let mut foreign = 0u64;
        let mut s = self.scanned_upto + 1;
        while s <= last {
            let msg = match stream.get_raw_message(s).await {
                Ok(m) => Some(m.payload),
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => None,
                Err(e) => return Err(Retry::Again(e.into())),
            };
            if let Some(payload) = msg {
                let ours = self.window.front().is_some_and(|f| f.payload == payload);
                if ours {
                    self.confirm_front(s);
                } else {
                    match classify(&payload) {
                        Classified::Foreign { reason } => {
                            foreign += 1;
                            self.metrics().foreign_messages.inc();
                            self.shared.foreign_message();
                            tracing::error!(
                                stream_seq = s,
                                %reason,
                                pipeline = %self.pipeline,
                                "Foreign message in the pipeline's stream (not an envelope); skipped, publishing continues after it"
                            );
                        }
                        Classified::Envelope(_) => {
                            let expected =
                                self.window.front().map_or(self.acked.seq + 1, |f| f.seq);
                            return Err(Retry::Fatal(self.fenced(expected, s, Some(&payload))));
                        }
                    }
                }
            }
            self.scanned_upto = s;
            s += 1;
        }
        self.expected_last = last;
        // Publish again whatever the stream does not hold, in order, with the same ids.
        let mut previous_in_flight = false;
        let mut acks = Vec::with_capacity(self.window.len());
        for f in self.window.iter_mut() {
            f.predicted = self.expected_last + 1;
            f.sent_at = Instant::now();
            let msg = envelope_message(
                f.payload.clone(),
                self.lineage,
                f.seq,
                self.expected_last,
                previous_in_flight,
            );
            match self.js.send_publish(self.subject.clone(), msg).await {
                Ok(ack) => acks.push(into_boxed(ack)),
                Err(e) => {
                    return Err(Retry::Fatal(ProducerError::Publish {
                        stream: self.stream_name.clone(),
                        seq: f.seq,
                        source: e.into(),
                    }))
                }
            }
            self.expected_last += 1;
            previous_in_flight = true;
        }
        let n = acks.len() as u64;
        self.acks = acks.into_iter().collect();
        self.metrics().republished.inc_by(n);
        if n > 0 || foreign > 0 {
            tracing::info!(
                foreign,
                republished = n,
                expected_last = self.expected_last,
                "Reconciled with the stream"
            );
        }
        Ok(())
    }

    /// Reads the message at `stream_seq` from the stream leader.
    async fn read(&mut self, stream_seq: u64) -> Result<Option<Bytes>, ProducerError> {
        let err = |source: async_nats::Error| ProducerError::Publish {
            stream: self.stream_name.clone(),
            seq: self.window.front().map_or(0, |f| f.seq),
            source,
        };
        let stream = self
            .js
            .get_stream(&self.stream_name)
            .await
            .map_err(|e| err(e.into()))?;
        match stream.get_raw_message(stream_seq).await {
            Ok(m) => Ok(Some(m.payload)),
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(err(e.into())),
        }
    }

    fn fenced(&self, expected_seq: u64, stream_seq: u64, found: Option<&[u8]>) -> ProducerError {
        let found = match found.map(classify) {
            Some(Classified::Envelope(e)) => format!(
                "envelope {}:{} (part {}/{}, digest {}) of {}",
                e.lineage,
                e.seq,
                e.part,
                e.parts,
                e.digest,
                if e.lineage == self.lineage {
                    "this lineage, written by another producer"
                } else {
                    "another lineage"
                }
            ),
            Some(Classified::Foreign { reason }) => format!("a foreign message ({reason})"),
            None => "no message".to_owned(),
        };
        let err = ProducerError::Fenced {
            pipeline: self.pipeline.clone(),
            lineage: self.lineage.to_hex(),
            expected_seq,
            last_acknowledged_seq: self.acked.seq,
            found,
            stream_seq,
        };
        tracing::error!(error = %err, "Fenced by another producer; stopping");
        err
    }
}

/// How a reconciling attempt failed.
enum Retry {
    /// NATS did not answer: try again.
    Again(async_nats::Error),
    /// Retrying cannot help.
    Fatal(ProducerError),
}

fn into_boxed(ack: PublishAckFuture) -> AckFuture {
    Box::pin(ack.into_future())
}

fn fail_all(notify: impl IntoIterator<Item = Notify>, cause: &Arc<ProducerError>) {
    for n in notify {
        match n {
            Notify::Commit { reply, .. } => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(ProducerError::shared(cause)));
                }
            }
            Notify::Flush(reply) => {
                let _ = reply.send(Err(ProducerError::shared(cause)));
            }
            Notify::Snapshot(job) => (*job).fail(ProducerError::shared(cause)),
        }
    }
}
