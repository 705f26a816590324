//! The operator commands' stream reader: every message of the envelope stream from one
//! stream sequence through another (the stream's head when the command started), whatever
//! happens on the way, or an error naming where it stalled.
//!
//! Talks to JetStream (an ordered pull consumer, direct gets to ask what is stored).
//! Belongs in `deltasync_nats::history` beside the engine's `Tail`; written here while
//! that crate's layout was being moved.

use async_nats::jetstream;
use async_nats::jetstream::stream::DirectGetErrorKind;
use deltasync_config::settings::Settings;
use deltasync_core::names;
use deltasync_core::recovery::{classify, Classified};
use futures::StreamExt;

/// A read that stopped delivering before the end it was asked for, and kept stopping.
#[derive(Debug)]
pub struct Stalled {
    /// The stream sequence it waited for.
    pub stream_seq: u64,
    /// The end it was asked for.
    pub end: u64,
    pub attempts: u32,
    /// What happened at the last attempt.
    pub reason: String,
}

/// How many times a read that stops delivering before the end it was asked for is opened
/// again (each wait bounded by `nats.request_timeout`) before the command fails.
pub const READ_ATTEMPTS: u32 = 3;

/// Reads the envelope stream in order from one stream sequence through another, whatever
/// happens on the way: a read that stops delivering (a timeout, a consumer that ended, a
/// server that does not answer) is opened again where it stopped, at most [`READ_ATTEMPTS`]
/// times in a row, then fails naming the stream sequence it waited for. It ends early only
/// when the server says that nothing is stored between where it is and the end (the tail was
/// deleted), never because a wait ran out.
pub struct Reader {
    stream: jetstream::stream::Stream,
    subject: String,
    settings: Settings,
    messages: Option<jetstream::consumer::pull::Ordered>,
    /// The next stream sequence wanted.
    next: u64,
    /// The last stream sequence wanted (the stream's head when the command started).
    end: u64,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("subject", &self.subject)
            .field("next", &self.next)
            .field("end", &self.end)
            .finish_non_exhaustive()
    }
}

impl Reader {
    pub async fn open(
        js: &jetstream::Context,
        settings: &Settings,
        from: u64,
        end: u64,
    ) -> Result<Reader, Stalled> {
        let name = names::stream_name(&settings.pipeline);
        let mut last_error = String::new();
        for _ in 0..READ_ATTEMPTS {
            match tokio::time::timeout(settings.nats.request_timeout, js.get_stream(&name)).await {
                Ok(Ok(stream)) => {
                    return Ok(Reader {
                        stream,
                        subject: names::subject(&settings.pipeline),
                        settings: settings.clone(),
                        messages: None,
                        next: from.max(1),
                        end,
                    })
                }
                Ok(Err(e)) => last_error = e.to_string(),
                Err(_) => last_error = "timed out".into(),
            }
        }
        Err(Stalled {
            stream_seq: from,
            end,
            attempts: READ_ATTEMPTS,
            reason: last_error,
        })
    }

    /// The next stored message at or before the end: its stream sequence and what it holds.
    /// `None` once the end is reached.
    pub async fn next(&mut self) -> Result<Option<(u64, Classified)>, Stalled> {
        let wait = self.settings.nats.request_timeout;
        let mut failures = 0u32;
        let mut reason = String::new();
        loop {
            if self.next > self.end {
                return Ok(None);
            }
            if self.messages.is_none() {
                match tokio::time::timeout(wait, self.subscribe()).await {
                    Ok(Ok(m)) => self.messages = Some(m),
                    Ok(Err(e)) => reason = format!("opening a reader: {e}"),
                    Err(_) => reason = "opening a reader timed out".into(),
                }
            }
            if let Some(messages) = &mut self.messages {
                match tokio::time::timeout(wait, messages.next()).await {
                    Ok(Some(Ok(msg))) => match msg.info() {
                        Ok(info) => {
                            let seq = info.stream_sequence;
                            if seq < self.next {
                                continue; // redelivered after a re-open
                            }
                            self.next = seq + 1;
                            if seq > self.end {
                                return Ok(None);
                            }
                            return Ok(Some((seq, classify(&msg.payload))));
                        }
                        Err(e) => reason = format!("reading a message's metadata: {e}"),
                    },
                    Ok(Some(Err(e))) => reason = format!("reading: {e}"),
                    Ok(None) => reason = "the reader ended".into(),
                    Err(_) => reason = format!("nothing arrived within {wait:?}"),
                }
            }
            // Nothing came. Either nothing is stored up to the end any more (deleted or
            // pruned meanwhile), or the read stalled: ask the server which.
            self.messages = None;
            match tokio::time::timeout(
                wait,
                self.stream
                    .direct_get_next_for_subject(self.subject.clone(), Some(self.next)),
            )
            .await
            {
                Ok(Ok(m)) if m.sequence > self.end => return Ok(None),
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.kind() == DirectGetErrorKind::NotFound => return Ok(None),
                Ok(Err(e)) => reason = format!("{reason}; asking what is stored: {e}"),
                Err(_) => reason = format!("{reason}; asking what is stored timed out"),
            }
            failures += 1;
            if failures >= READ_ATTEMPTS {
                return Err(Stalled {
                    stream_seq: self.next,
                    end: self.end,
                    attempts: failures,
                    reason,
                });
            }
            tracing::warn!(
                stream_seq = self.next,
                end = self.end,
                attempt = failures,
                %reason,
                "The read stalled before the end; reading again from where it stopped"
            );
        }
    }

    async fn subscribe(&self) -> Result<jetstream::consumer::pull::Ordered, async_nats::Error> {
        let consumer = self
            .stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: self.next,
                },
                max_batch: read_batch(&self.settings),
                ..Default::default()
            })
            .await?;
        Ok(consumer.messages().await?)
    }
}

/// Messages one pull asks for: about 16 MiB of the largest envelopes in flight (the server
/// cuts a connection with much more pending as a slow consumer).
fn read_batch(settings: &Settings) -> i64 {
    let max_message = i64::from(settings.stream.max_message_bytes).max(64 * 1024);
    (16 * 1024 * 1024 / max_message).clamp(8, 200)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pull_asks_for_about_16_mib_of_the_largest_envelopes_within_bounds() {
        let mut s = Settings::default();
        s.stream.max_message_bytes = 1024 * 1024;
        assert_eq!(read_batch(&s), 16);
        s.stream.max_message_bytes = 1024;
        assert_eq!(read_batch(&s), 200, "small messages: at most 200");
        s.stream.max_message_bytes = 8 * 1024 * 1024;
        assert_eq!(read_batch(&s), 8, "huge messages: at least 8");
    }
}
