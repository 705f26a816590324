//! The settings schema: every setting's struct, type, default and doc comment, and the byte
//! budgets derived from them. What a setting means is written here once; `load` fills these
//! structs from the layers and `validate` refuses combinations that cannot work.
//!
//! Talks to nothing: serde derives (with `deny_unknown_fields`) and humantime durations.

use deltasync_core::change::{MAX_KEY_BYTES, MAX_VALUE_BYTES};
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Room an envelope or a snapshot chunk needs above its payload budget for its header and
/// encoding, so that a full batch still fits below `stream.max_message_bytes`.
pub const MESSAGE_OVERHEAD_MARGIN: usize = 64 * 1024;

/// Bytes a stream counts for one envelope on top of its changes' encoded size: the envelope's
/// own header, the NATS headers (message id, expected last sequence and message id), the
/// subject and the stream's per-message record. An upper bound, so that byte accounting errs
/// on the early side.
pub const ENVELOPE_STREAM_OVERHEAD: u64 = 1024;

/// The largest encoded size of one change (key and value at their limits): an envelope holds
/// at least one change, so it can be this large whatever `producer.batch_max_bytes` says.
pub const MAX_CHANGE_BYTES: u64 = (1 + 5 + MAX_KEY_BYTES + 5 + MAX_VALUE_BYTES) as u64;

pub(super) const KIB: usize = 1024;
pub(super) const MIB: usize = 1024 * 1024;

/// Everything a producer or consumer process needs to know at start-up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Names the stream, subject, bucket and consumers, so several pipelines can share one
    /// NATS account without seeing each other. `[A-Za-z0-9_-]{1,64}`.
    pub pipeline: String,
    /// How to reach and authenticate to NATS.
    pub nats: NatsSettings,
    /// Limits of the envelope stream: how much history survives for consumers to catch up.
    pub stream: StreamSettings,
    /// How often the producer stores a snapshot, so a consumer whose position was pruned can
    /// start over from one.
    pub snapshot: SnapshotSettings,
    /// Batching and flow control of the producer.
    pub producer: ProducerSettings,
    /// Identity, storage and pacing of a consumer replica.
    pub consumer: ConsumerSettings,
    /// Log output.
    pub log: LogSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            pipeline: "deltasync".to_owned(),
            nats: NatsSettings::default(),
            stream: StreamSettings::default(),
            snapshot: SnapshotSettings::default(),
            producer: ProducerSettings::default(),
            consumer: ConsumerSettings::default(),
            log: LogSettings::default(),
        }
    }
}

/// Connection to NATS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSettings {
    /// Server address, or a comma-separated list of a cluster's addresses so the client can
    /// fail over (`nats://` or `tls://`; a bare `host:port` means `nats://`).
    pub url: String,
    /// User name for user/password authentication; requires `password`.
    pub user: Option<String>,
    /// Password for `user`.
    pub password: Option<Secret>,
    /// Token authentication, the alternative to user/password.
    pub token: Option<Secret>,
    /// A `.creds` file (JWT + nkey seed) for decentralized (operator) authentication.
    pub creds_file: Option<PathBuf>,
    /// An nkey seed (`SU...`) for nkey authentication.
    pub nkey_seed: Option<Secret>,
    /// A file holding the nkey seed (what `NATS_NKEY` and a `nats` context's `nkey` name),
    /// the alternative to `nkey_seed`.
    pub nkey_file: Option<PathBuf>,
    /// TLS towards the server.
    pub tls: TlsSettings,
    /// Bound on reaching a server at start-up, per listed server, so an unreachable NATS fails
    /// fast instead of hanging.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Bound on each request and JetStream API call (and publish acknowledgement).
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// Connection name shown by the server's monitoring (`connz`); defaults to the binary's.
    pub client_name: Option<String>,
    /// Prefix of the subjects replies come back on (`_INBOX` when unset). Give each role its
    /// own, e.g. `_INBOX_orders_consumer`, and allow it only `<prefix>.>` to subscribe: then it
    /// cannot listen to the replies (stream reads, snapshot downloads) of other clients in the
    /// account. See `docs/permissions.md`.
    pub inbox_prefix: Option<String>,
    /// The JetStream domain of the stream and bucket (a leaf node's or a hub's
    /// `jetstream { domain: ... }`); the local one when unset.
    pub jetstream_domain: Option<String>,
    /// At start-up, keep trying to reach NATS (for up to `initial_connect_wait`) instead of
    /// failing at once: for a stack started before its NATS server is up. Refused
    /// credentials and bad TLS still fail at once.
    pub retry_on_initial_connect: bool,
    /// How long `retry_on_initial_connect` keeps trying.
    #[serde(with = "duration")]
    pub initial_connect_wait: Duration,
}

impl Default for NatsSettings {
    fn default() -> Self {
        NatsSettings {
            url: "nats://127.0.0.1:4222".to_owned(),
            user: None,
            password: None,
            token: None,
            creds_file: None,
            nkey_seed: None,
            tls: TlsSettings::default(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            client_name: None,
            inbox_prefix: None,
            nkey_file: None,
            jetstream_domain: None,
            retry_on_initial_connect: false,
            initial_connect_wait: Duration::from_secs(60),
        }
    }
}

impl NatsSettings {
    /// The server addresses in `url`, split on commas, trimmed, empty entries dropped.
    pub fn urls(&self) -> Vec<String> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

/// TLS towards the NATS server.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// PEM file of the CA that signed the server's certificate, when it is not a public one.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS; requires `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Refuse to talk to a server without TLS (also implied by a `tls://` URL).
    pub required: bool,
}

/// Where JetStream keeps the stream's and the bucket's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum StorageKind {
    /// On disk: survives server restarts. The only choice for production.
    #[default]
    File,
    /// In memory: faster, lost when the server stops. Tests and throwaway pipelines.
    Memory,
}

impl TryFrom<String> for StorageKind {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        match value.to_ascii_lowercase().as_str() {
            "file" => Ok(StorageKind::File),
            "memory" => Ok(StorageKind::Memory),
            _ => Err(format!(
                "{value:?} is not a storage kind, expected `file` or `memory`"
            )),
        }
    }
}

/// Limits of the envelope stream (limits retention, oldest discarded first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSettings {
    /// Most envelopes kept; -1 = unlimited. Must cover two snapshot intervals.
    pub max_messages: i64,
    /// Most bytes kept; -1 = unlimited.
    pub max_bytes: i64,
    /// Oldest envelope kept; 0 = unlimited. Must cover two snapshot intervals.
    #[serde(with = "duration")]
    pub max_age: Duration,
    /// Copies kept by a JetStream cluster (1..=5; 3 for production).
    pub replicas: usize,
    /// Disk or memory, for the stream and the snapshot bucket.
    pub storage: StorageKind,
    /// How long the server remembers message ids to drop a retried publish; must outlast the
    /// longest publish retry. Must be > 0 and not longer than `max_age`.
    #[serde(with = "duration")]
    pub duplicate_window: Duration,
    /// Largest message the stream (and the bucket) accepts; at most the server's
    /// `max_payload` (1 MiB by default). Envelopes and snapshot chunks are sized below it.
    pub max_message_bytes: i32,
}

impl StreamSettings {
    /// Envelopes the producer may publish past the newest durable snapshot before it holds
    /// back: `max_messages` less a tenth kept as margin (for foreign messages and estimates).
    /// `None` when the stream keeps any number of messages.
    pub fn envelope_room(&self) -> Option<u64> {
        (self.max_messages > 0).then(|| {
            let m = self.max_messages as u64;
            m - m / 10
        })
    }

    /// Bytes (changes plus [`ENVELOPE_STREAM_OVERHEAD`] per envelope) the producer may publish
    /// past the newest durable snapshot before it holds back: `max_bytes` less an eighth kept
    /// as margin. `None` when the stream keeps any number of bytes.
    pub fn byte_room(&self) -> Option<u64> {
        (self.max_bytes > 0).then(|| {
            let b = self.max_bytes as u64;
            b - b / 8
        })
    }
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            max_messages: 1_000_000,
            max_bytes: 1024 * 1024 * 1024,
            max_age: Duration::from_secs(24 * 3600),
            replicas: 1,
            storage: StorageKind::File,
            duplicate_window: Duration::from_secs(120),
            max_message_bytes: MIB as i32,
        }
    }
}

/// When the producer stores snapshots and how they are kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotSettings {
    /// Store a snapshot after this many envelopes; 0 = no count trigger.
    pub every_envelopes: u64,
    /// Store a snapshot after this much time with changes; 0 = no time trigger.
    #[serde(with = "duration")]
    pub every: Duration,
    /// Snapshot manifests retained; older ones (and their unshared chunks) are collected.
    pub keep: usize,
    /// Target size of one snapshot chunk (a KV value), below `stream.max_message_bytes`.
    pub chunk_target_bytes: usize,
    /// How long an unreferenced chunk survives, so a consumer still reading an older
    /// manifest can finish.
    #[serde(with = "duration")]
    pub gc_grace: Duration,
    /// Copies of the snapshot bucket kept by a JetStream cluster (1..=5).
    pub replicas: usize,
}

impl Default for SnapshotSettings {
    fn default() -> Self {
        SnapshotSettings {
            every_envelopes: 10_000,
            every: Duration::from_secs(5 * 60),
            keep: 3,
            chunk_target_bytes: 512 * KIB,
            gc_grace: Duration::from_secs(10 * 60),
            replicas: 1,
        }
    }
}

/// Producer batching and flow control.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProducerSettings {
    /// Most changes in one envelope.
    pub batch_max_changes: usize,
    /// Most encoded change bytes in one envelope; plus a 64 KiB margin it must fit in
    /// `stream.max_message_bytes`.
    pub batch_max_bytes: usize,
    /// How long a batch waits for more changes before it is published.
    #[serde(with = "duration")]
    pub linger: Duration,
    /// Publishes awaiting their acknowledgement at once (throughput vs. memory).
    pub ack_window: usize,
    /// Address of the producer's HTTP endpoint (health, status, metrics; with `serve`, the
    /// write API too, which needs it); off when unset.
    pub http: Option<SocketAddr>,
    /// What a starting producer does when envelopes after the newest snapshot are gone from
    /// the stream (aged out, pruned, purged, deleted, or the stream recreated): `refuse` stops
    /// with an error naming what was lost; `new_lineage` starts a new lineage from the newest
    /// snapshot's state and logs what was lost at ERROR (every consumer re-snapshots). Neither
    /// continues the old lineage, which would reuse its sequence numbers.
    pub on_lost_history: OnLostHistory,
    /// Largest request body the write API (`serve`: `POST /v1/txn`, `POST /v1/changes`,
    /// `PUT /v1/state`) accepts; a larger one is refused with 413 before anything of it is
    /// published. NATS requests are bounded by the server's `max_payload` instead.
    pub api_max_body_bytes: u64,
    /// Whether `serve` also offers the write API as a NATS service (`deltasync`, subjects
    /// `deltasync.<pipeline>.api.{txn,changes,state}`).
    pub api_nats: bool,
    /// How long the write API remembers an `Idempotency-Key` and the receipt of its first
    /// success; 0: `stream.duplicate_window` (2 min by default).
    #[serde(with = "duration")]
    pub api_idempotency_window: Duration,
    /// Most `Idempotency-Key`s remembered at once; the oldest are forgotten first.
    pub api_idempotency_max_keys: usize,
}

/// What a starting producer does when the history after its newest snapshot is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "String")]
pub enum OnLostHistory {
    /// Stop with an error naming the lost range; an operator decides.
    #[default]
    Refuse,
    /// Start a new lineage from the newest snapshot's state (the lost changes stay lost).
    NewLineage,
}

impl TryFrom<String> for OnLostHistory {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        match value.to_ascii_lowercase().replace('-', "_").as_str() {
            "refuse" => Ok(OnLostHistory::Refuse),
            "new_lineage" => Ok(OnLostHistory::NewLineage),
            _ => Err(format!(
                "{value:?} is not a lost-history policy, expected `refuse` or `new_lineage`"
            )),
        }
    }
}

impl Default for ProducerSettings {
    fn default() -> Self {
        ProducerSettings {
            batch_max_changes: 4096,
            batch_max_bytes: 768 * KIB,
            linger: Duration::from_millis(5),
            ack_window: 256,
            http: None,
            on_lost_history: OnLostHistory::Refuse,
            api_max_body_bytes: 64 * MIB as u64,
            api_nats: true,
            api_idempotency_window: Duration::ZERO,
            api_idempotency_max_keys: 100_000,
        }
    }
}

/// A consumer replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerSettings {
    /// Stable identity of this replica; names its durable consumer. Unset: the host name.
    pub id: Option<String>,
    /// Directory of the replica's local state and cursor. Unset: kept in memory only.
    pub data_dir: Option<PathBuf>,
    /// Address of the consumer's HTTP endpoint (health, readiness, status); off when unset.
    pub http: Option<SocketAddr>,
    /// Envelopes behind the stream's last one at which the replica still reports ready.
    pub max_ready_lag: u64,
    /// Commit the cursor after this many applied envelopes...
    pub commit_every_envelopes: usize,
    /// ...or after this long, whichever comes first.
    #[serde(with = "duration")]
    pub commit_interval: Duration,
    /// The server deletes the durable consumer after this long without the replica; 0 =
    /// never.
    #[serde(with = "duration")]
    pub inactive_threshold: Duration,
    /// Consecutive failed resynchronisations (snapshot restore) before the replica gives up.
    pub resync_max_attempts: u32,
    /// A durable replica writes a new local snapshot (and drops its log) once the log since
    /// the last one holds this many bytes and twice the replica's size (the last snapshot's,
    /// or an estimate from its keys when larger or when there is none).
    pub local_snapshot_log_bytes: u64,
    /// Bytes of recent committed change batches kept in memory for `/v1/changes`,
    /// `/v1/watch` and `Replica::watch` (keys and values plus a small overhead per change);
    /// readers further behind re-read the state. 0 = no feed.
    pub feed_max_bytes: u64,
    /// Interval of the heartbeat comments `/v1/watch` sends while there is nothing new, so
    /// proxies keep the connection open.
    #[serde(with = "duration")]
    pub watch_keepalive: Duration,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        ConsumerSettings {
            id: None,
            data_dir: None,
            http: None,
            max_ready_lag: 1000,
            commit_every_envelopes: 64,
            commit_interval: Duration::from_millis(100),
            inactive_threshold: Duration::from_secs(3600),
            resync_max_attempts: 5,
            local_snapshot_log_bytes: 64 * 1024 * 1024,
            feed_max_bytes: 64 * 1024 * 1024,
            watch_keepalive: Duration::from_secs(15),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl TryFrom<String> for LogFormat {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        match value.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!(
                "{value:?} is not a log format, expected `text` or `json`"
            )),
        }
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// Line format.
    pub format: LogFormat,
    /// `tracing` filter directives (`info`, `deltasync=debug,async_nats=warn`); `RUST_LOG`
    /// overrides it when set.
    pub filter: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Text,
            filter: "info".to_owned(),
        }
    }
}

/// A secret string (password, token, nkey seed) that never prints: `Debug`, `Display` and
/// `Serialize` all write `***`. Read it with [`Secret::expose`] where it is used.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("***")
    }
}

/// Durations as humantime strings, with humantime's own explanation when one does not parse.
mod duration {
    use serde::{de, Deserializer, Serializer};
    use std::fmt;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        humantime_serde::serialize(d, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_str(Visitor)
    }

    struct Visitor;

    impl de::Visitor<'_> for Visitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as \"30s\", \"5m\", \"2h\" or \"100ms\"")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            humantime_serde::re::humantime::parse_duration(v.trim()).map_err(|err| {
                E::custom(format!(
                    "invalid duration {v:?}: {err} (write e.g. \"30s\", \"5m\", \"2h\")"
                ))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::field_reassign_with_default)]

    use super::*;

    #[test]
    fn secrets_never_print() {
        let mut s = Settings::default();
        s.nats.user = Some("u".to_owned());
        s.nats.password = Some(Secret::new("hunter2"));
        s.nats.nkey_seed = Some(Secret::new("SUSEED"));
        let debug = format!("{s:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(!debug.contains("SUSEED"), "{debug}");
        assert!(debug.contains("***"), "{debug}");
        assert_eq!(Secret::new("x").to_string(), "***");
        assert_eq!(serde_json::to_string(&Secret::new("x")).unwrap(), "\"***\"");
        assert_eq!(Secret::new("hunter2").expose(), "hunter2");
        let json = serde_json::to_string(&s).unwrap();
        assert!(
            !json.contains("hunter2") && json.contains("\"password\":\"***\""),
            "{json}"
        );
    }
}
