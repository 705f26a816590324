//! Start-up settings for the producer and the consumer, layered and validated once.
//!
//! Talks to nothing on the network: it reads an optional TOML file, environment variables
//! and command-line overrides through the `config` crate and refuses settings that cannot
//! work before anything connects to NATS.
//!
//! ## Layers (later wins)
//!
//! ```text
//! built-in defaults   (serde(default) on every struct, see each Default impl)
//! TOML file           (--config / Settings::load's `config_file`)
//! environment         DELTASYNC_<SECTION>__<KEY>, e.g. DELTASYNC_STREAM__MAX_MESSAGES=5000
//!                     DELTASYNC_PIPELINE (top-level keys have no section)
//! CLI overrides       --nats-url, --pipeline
//! ```
//!
//! Environment names are the setting's path upper-cased, `.` written `__`; single underscores
//! belong to the key name (`max_messages`). Empty variables count as unset, so a compose file
//! may write `DELTASYNC_NATS__USER=${NATS_USER:-}`. [`CONFIG_FILE_ENV`] is reserved for the
//! path of the settings file and is not itself a setting.
//!
//! Durations are humantime strings (`"30s"`, `"2h"`, `"100ms"`). A bare `0` means zero
//! (`config` hands numbers to string fields as their text, and humantime accepts `"0"`); any
//! other bare number is refused with "time unit needed", so `max_age = 30` never silently
//! means 30 seconds.
//!
//! ## Invariants
//!
//! - Every key that reaches deserialization is known: an unknown key in the file or the
//!   environment is refused with its name and where it came from ([`SettingsError::UnknownKey`]).
//! - A [`Settings`] returned by [`Settings::load`] has passed [`Settings::validate`].
//! - Secrets ([`Secret`]) print as `***` in `Debug`, `Display` and `Serialize`.

use config::{Config, ConfigError, Environment, File, FileFormat, Value, ValueKind};
use deltasync_core::change::{MAX_KEY_BYTES, MAX_VALUE_BYTES};
use serde::{Deserialize, Serialize, Serializer};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Prefix of every environment variable read as a setting (`DELTASYNC_...`).
pub const ENV_PREFIX: &str = "DELTASYNC";

/// Environment variable the binaries read the settings file path from; never a setting itself.
pub const CONFIG_FILE_ENV: &str = "DELTASYNC_CONFIG";

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

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

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
    /// Address of the producer's HTTP endpoint (health, status, metrics); off when unset.
    pub http: Option<SocketAddr>,
    /// What a starting producer does when envelopes after the newest snapshot are gone from
    /// the stream (aged out, pruned, purged, deleted, or the stream recreated): `refuse` stops
    /// with an error naming what was lost; `new_lineage` starts a new lineage from the newest
    /// snapshot's state and logs what was lost at ERROR (every consumer re-snapshots). Neither
    /// continues the old lineage, which would reuse its sequence numbers.
    pub on_lost_history: OnLostHistory,
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

/// Command-line flags that override every other layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--nats-url`.
    pub nats_url: Option<String>,
    /// `--pipeline`.
    pub pipeline: Option<String>,
}

/// Where environment settings come from.
#[derive(Debug, Clone, Default)]
pub enum EnvVars {
    /// The process environment (what the binaries use).
    #[default]
    Process,
    /// An explicit map of variable names to values (tests), e.g.
    /// `DELTASYNC_STREAM__MAX_MESSAGES` => `5000`.
    Map(HashMap<String, String>),
}

/// The layers to load, for [`Settings::load_from`].
#[derive(Debug, Clone, Default)]
pub struct Sources<'a> {
    /// A TOML file; an error if given and missing.
    pub file: Option<&'a Path>,
    /// TOML text, layered after `file` (tests, embedded examples).
    pub toml: Option<&'a str>,
    /// Environment variables, layered after the TOML.
    pub env: EnvVars,
    /// Command-line overrides, layered last.
    pub overrides: Overrides,
}

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A layer could not be read or a value has the wrong type; the message names the key and,
    /// for the environment, the variable.
    #[error("cannot load settings: {message}")]
    Load {
        /// What is wrong, with key and origin.
        message: String,
        /// The key at fault, when known (`stream.max_messages`).
        key: Option<String>,
        /// The `config` crate's error (boxed: it is large).
        #[source]
        source: Box<ConfigError>,
    },
    /// A key that is not a setting (a typo, or a variable in the `DELTASYNC_` namespace that
    /// is not ours).
    #[error("unknown setting `{key}`{origin}; known keys{parent}: {known}")]
    UnknownKey {
        /// The full path of the unknown key (`stream.max_mesages`).
        key: String,
        /// Where it came from, e.g. ` in the environment (DELTASYNC_STREAM__MAX_MESAGES)`.
        origin: String,
        /// ` under `stream`` or empty at the top level.
        parent: String,
        /// The keys accepted at that level.
        known: String,
    },
    /// Settings that parse but cannot work.
    #[error("invalid setting `{key}`: {reason}")]
    Invalid {
        /// The key (or keys, `a` / `b`) at fault.
        key: String,
        /// What is wrong and what would work.
        reason: String,
    },
}

impl SettingsError {
    fn invalid(key: &str, reason: impl Into<String>) -> SettingsError {
        SettingsError::Invalid {
            key: key.to_owned(),
            reason: reason.into(),
        }
    }
}

impl Settings {
    /// Loads defaults, then `config_file` (TOML), then the process environment
    /// (`DELTASYNC_...`), then `overrides`, and validates the result.
    pub fn load(
        config_file: Option<&Path>,
        overrides: Overrides,
    ) -> Result<Settings, SettingsError> {
        Settings::load_from(Sources {
            file: config_file,
            toml: None,
            env: EnvVars::Process,
            overrides,
        })
    }

    /// Loads explicit layers (see [`Sources`]) and validates the result.
    pub fn load_from(sources: Sources<'_>) -> Result<Settings, SettingsError> {
        let config = build(&sources)?;
        check_known_keys(&config.cache)?;
        let settings: Settings = config
            .clone()
            .try_deserialize()
            .map_err(|err| load_error(err, &config.cache))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Refuses settings that cannot work, naming the key at fault.
    pub fn validate(&self) -> Result<(), SettingsError> {
        validate_pipeline(&self.pipeline)?;
        self.validate_nats()?;
        self.validate_stream()?;
        self.validate_snapshot()?;
        self.validate_retention()?;
        self.validate_producer()?;
        self.validate_consumer()?;
        if let Err(err) = tracing_subscriber::EnvFilter::builder().parse(&self.log.filter) {
            return Err(SettingsError::invalid(
                "log.filter",
                format!("{:?} is not a tracing filter: {err}", self.log.filter),
            ));
        }
        Ok(())
    }

    fn validate_nats(&self) -> Result<(), SettingsError> {
        let nats = &self.nats;
        let urls = nats.urls();
        if urls.is_empty() {
            return Err(SettingsError::invalid(
                "nats.url",
                "no server address given",
            ));
        }
        for url in &urls {
            let redacted = redact_url(url);
            if redacted != *url {
                return Err(SettingsError::invalid(
                    "nats.url",
                    format!(
                        "{redacted:?} carries credentials, which would end up in logs; set \
                         nats.user/nats.password or nats.token instead"
                    ),
                ));
            }
            match async_nats::ServerAddr::from_str(url) {
                Ok(addr) => {
                    let scheme = addr.into_inner().scheme().to_owned();
                    if scheme != "nats" && scheme != "tls" {
                        return Err(SettingsError::invalid(
                            "nats.url",
                            format!("{url:?}: scheme {scheme:?} is not supported, use nats:// or tls://"),
                        ));
                    }
                }
                Err(err) => {
                    return Err(SettingsError::invalid(
                        "nats.url",
                        format!("{url:?}: {err} (expected nats://host:port or tls://host:port)"),
                    ))
                }
            }
        }
        match (&nats.user, &nats.password) {
            (Some(user), _) if user.is_empty() => {
                return Err(SettingsError::invalid("nats.user", "is empty"))
            }
            (Some(_), None) => {
                return Err(SettingsError::invalid(
                    "nats.password",
                    "nats.user is set but nats.password is not",
                ))
            }
            (None, Some(_)) => {
                return Err(SettingsError::invalid(
                    "nats.user",
                    "nats.password is set but nats.user is not",
                ))
            }
            _ => {}
        }
        let methods: Vec<&str> = [
            ("nats.user", nats.user.is_some()),
            ("nats.token", nats.token.is_some()),
            ("nats.creds_file", nats.creds_file.is_some()),
            ("nats.nkey_seed", nats.nkey_seed.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect();
        if methods.len() > 1 {
            return Err(SettingsError::invalid(
                &methods.join(" / "),
                "choose one authentication method: user/password, token, creds_file or nkey_seed",
            ));
        }
        if let Some(token) = &nats.token {
            if token.expose().is_empty() {
                return Err(SettingsError::invalid("nats.token", "is empty"));
            }
        }
        if let Some(seed) = &nats.nkey_seed {
            // Never quote the seed itself in the error.
            match nkeys::KeyPair::from_seed(seed.expose()) {
                Err(err) => {
                    return Err(SettingsError::invalid(
                        "nats.nkey_seed",
                        format!(
                            "is not an nkey seed ({:?}); a user's seed starts with `SU`",
                            err.kind()
                        ),
                    ))
                }
                Ok(pair) if pair.key_pair_type() != nkeys::KeyPairType::User => {
                    return Err(SettingsError::invalid(
                        "nats.nkey_seed",
                        format!(
                            "is the seed of {:?} key; clients authenticate with a user's seed \
                             (`SU...`)",
                            pair.key_pair_type()
                        ),
                    ))
                }
                Ok(_) => {}
            }
        }
        require_file("nats.creds_file", nats.creds_file.as_deref())?;
        require_file("nats.tls.ca_file", nats.tls.ca_file.as_deref())?;
        require_file("nats.tls.cert_file", nats.tls.cert_file.as_deref())?;
        require_file("nats.tls.key_file", nats.tls.key_file.as_deref())?;
        match (&nats.tls.cert_file, &nats.tls.key_file) {
            (Some(_), None) => {
                return Err(SettingsError::invalid(
                    "nats.tls.key_file",
                    "nats.tls.cert_file is set but its key file is not",
                ))
            }
            (None, Some(_)) => {
                return Err(SettingsError::invalid(
                    "nats.tls.cert_file",
                    "nats.tls.key_file is set but its certificate file is not",
                ))
            }
            _ => {}
        }
        if nats.connect_timeout.is_zero() {
            return Err(SettingsError::invalid(
                "nats.connect_timeout",
                "must be > 0",
            ));
        }
        if nats.request_timeout.is_zero() {
            return Err(SettingsError::invalid(
                "nats.request_timeout",
                "must be > 0",
            ));
        }
        if let Some(name) = &nats.client_name {
            if name.trim().is_empty() {
                return Err(SettingsError::invalid("nats.client_name", "is empty"));
            }
        }
        if let Some(prefix) = &nats.inbox_prefix {
            let bad_token = prefix.split('.').any(|token| {
                token.is_empty()
                    || token == "*"
                    || token == ">"
                    || token.chars().any(|c| c.is_whitespace() || c.is_control())
            });
            if bad_token {
                return Err(SettingsError::invalid(
                    "nats.inbox_prefix",
                    format!(
                        "{prefix:?} is not a subject prefix: dot-separated non-empty tokens \
                         without `*`, `>` or whitespace, e.g. `_INBOX_orders_consumer`"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_stream(&self) -> Result<(), SettingsError> {
        let s = &self.stream;
        if s.max_messages != -1 && s.max_messages < 1 {
            return Err(SettingsError::invalid(
                "stream.max_messages",
                format!("{} must be -1 (unlimited) or at least 1", s.max_messages),
            ));
        }
        if s.max_bytes != -1 && s.max_bytes < 1 {
            return Err(SettingsError::invalid(
                "stream.max_bytes",
                format!("{} must be -1 (unlimited) or at least 1", s.max_bytes),
            ));
        }
        validate_replicas("stream.replicas", s.replicas)?;
        if s.duplicate_window.is_zero() {
            return Err(SettingsError::invalid(
                "stream.duplicate_window",
                "must be > 0 (retried publishes are deduplicated within it)",
            ));
        }
        if !s.max_age.is_zero() && s.duplicate_window > s.max_age {
            return Err(SettingsError::invalid(
                "stream.duplicate_window",
                format!(
                    "{} is longer than stream.max_age {}; the server refuses that",
                    fmt_duration(s.duplicate_window),
                    fmt_duration(s.max_age)
                ),
            ));
        }
        if s.max_message_bytes <= MESSAGE_OVERHEAD_MARGIN as i32 {
            return Err(SettingsError::invalid(
                "stream.max_message_bytes",
                format!(
                    "{} leaves no room for a payload above the {} byte overhead margin",
                    s.max_message_bytes, MESSAGE_OVERHEAD_MARGIN
                ),
            ));
        }
        Ok(())
    }

    fn validate_snapshot(&self) -> Result<(), SettingsError> {
        let s = &self.snapshot;
        if s.keep == 0 {
            return Err(SettingsError::invalid(
                "snapshot.keep",
                "must be at least 1 (the newest snapshot is what consumers restore)",
            ));
        }
        if s.chunk_target_bytes == 0 {
            return Err(SettingsError::invalid(
                "snapshot.chunk_target_bytes",
                "must be > 0",
            ));
        }
        let room = self.message_room();
        if s.chunk_target_bytes > room {
            return Err(SettingsError::invalid(
                "snapshot.chunk_target_bytes",
                format!(
                    "{} + {} byte margin exceeds stream.max_message_bytes {}; use at most {}",
                    s.chunk_target_bytes,
                    MESSAGE_OVERHEAD_MARGIN,
                    self.stream.max_message_bytes,
                    room
                ),
            ));
        }
        validate_replicas("snapshot.replicas", s.replicas)
    }

    fn validate_retention(&self) -> Result<(), SettingsError> {
        let (stream, snap) = (&self.stream, &self.snapshot);
        let limited =
            stream.max_messages != -1 || stream.max_bytes != -1 || !stream.max_age.is_zero();
        if snap.every_envelopes == 0 && snap.every.is_zero() && limited {
            return Err(SettingsError::invalid(
                "snapshot.every_envelopes / snapshot.every",
                "snapshots are off (both 0) while the stream's retention is limited \
                 (stream.max_messages, stream.max_bytes or stream.max_age): once history is \
                 pruned a new consumer could never catch up; enable snapshots or set all \
                 three limits to unlimited (-1, -1, 0)",
            ));
        }
        if stream.max_messages != -1
            && snap.every_envelopes > 0
            && (stream.max_messages as u64) < snap.every_envelopes.saturating_mul(2)
        {
            return Err(SettingsError::invalid(
                "stream.max_messages / snapshot.every_envelopes",
                format!(
                    "stream.max_messages {} is below 2 × snapshot.every_envelopes {} = {}: the \
                     stream must keep the envelopes between two snapshots, or a consumer \
                     restoring the older one finds its next envelopes pruned",
                    stream.max_messages,
                    snap.every_envelopes,
                    snap.every_envelopes.saturating_mul(2)
                ),
            ));
        }
        if !stream.max_age.is_zero() && snap.every.is_zero() {
            // Age cannot be held back like counts and bytes: only time-based snapshots keep
            // the envelopes after the newest snapshot younger than the stream's age limit.
            return Err(SettingsError::invalid(
                "snapshot.every / stream.max_age",
                format!(
                    "stream.max_age {} prunes envelopes by age, so snapshots must be time-based \
                     too: set snapshot.every to at most half of it (or stream.max_age = 0)",
                    fmt_duration(stream.max_age)
                ),
            ));
        }
        if let Some(room) = stream.byte_room() {
            let largest = (self.producer.batch_max_bytes as u64).max(MAX_CHANGE_BYTES)
                + ENVELOPE_STREAM_OVERHEAD;
            if room < largest {
                return Err(SettingsError::invalid(
                    "stream.max_bytes",
                    format!(
                        "{} cannot keep the largest envelope ({largest} bytes: a change of \
                         {MAX_CHANGE_BYTES} bytes at most, or producer.batch_max_bytes {}, plus \
                         {ENVELOPE_STREAM_OVERHEAD} overhead) within the {} bytes the producer \
                         may publish past its newest snapshot (max_bytes less an eighth); use \
                         at least {}",
                        stream.max_bytes,
                        self.producer.batch_max_bytes,
                        room,
                        largest + largest / 7 + 8
                    ),
                ));
            }
        }
        if !stream.max_age.is_zero() && !snap.every.is_zero() && stream.max_age < snap.every * 2 {
            return Err(SettingsError::invalid(
                "stream.max_age / snapshot.every",
                format!(
                    "stream.max_age {} is below 2 × snapshot.every {} = {}: the stream must \
                     keep the envelopes between two snapshots, or a consumer restoring the \
                     older one finds its next envelopes pruned",
                    fmt_duration(stream.max_age),
                    fmt_duration(snap.every),
                    fmt_duration(snap.every * 2)
                ),
            ));
        }
        Ok(())
    }

    fn validate_producer(&self) -> Result<(), SettingsError> {
        let p = &self.producer;
        if p.batch_max_changes == 0 {
            return Err(SettingsError::invalid(
                "producer.batch_max_changes",
                "must be > 0",
            ));
        }
        if p.batch_max_bytes == 0 {
            return Err(SettingsError::invalid(
                "producer.batch_max_bytes",
                "must be > 0",
            ));
        }
        let room = self.message_room();
        if p.batch_max_bytes > room {
            return Err(SettingsError::invalid(
                "producer.batch_max_bytes",
                format!(
                    "{} + {} byte margin exceeds stream.max_message_bytes {}; use at most {}",
                    p.batch_max_bytes, MESSAGE_OVERHEAD_MARGIN, self.stream.max_message_bytes, room
                ),
            ));
        }
        if p.ack_window == 0 {
            return Err(SettingsError::invalid(
                "producer.ack_window",
                "must be > 0 (publishes awaiting acknowledgement at once)",
            ));
        }
        Ok(())
    }

    fn validate_consumer(&self) -> Result<(), SettingsError> {
        let c = &self.consumer;
        if let Some(id) = &c.id {
            if id.trim().is_empty() {
                return Err(SettingsError::invalid("consumer.id", "is empty"));
            }
            if id.len() > 64 {
                return Err(SettingsError::invalid(
                    "consumer.id",
                    format!("{id:?} is longer than 64 bytes"),
                ));
            }
        }
        if c.commit_every_envelopes == 0 {
            return Err(SettingsError::invalid(
                "consumer.commit_every_envelopes",
                "must be > 0",
            ));
        }
        if c.commit_interval.is_zero() {
            return Err(SettingsError::invalid(
                "consumer.commit_interval",
                "must be > 0",
            ));
        }
        if c.resync_max_attempts == 0 {
            return Err(SettingsError::invalid(
                "consumer.resync_max_attempts",
                "must be > 0",
            ));
        }
        Ok(())
    }

    /// Payload bytes an envelope or chunk may use: `max_message_bytes` minus the margin.
    fn message_room(&self) -> usize {
        usize::try_from(self.stream.max_message_bytes)
            .unwrap_or(0)
            .saturating_sub(MESSAGE_OVERHEAD_MARGIN)
    }
}

/// `url` with any user information (`user:password@`, `token@`) replaced by `***@`, for
/// logs and error messages.
pub fn redact_url(url: &str) -> String {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let authority_end = url[after_scheme..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| after_scheme + i);
    match url[after_scheme..authority_end].rfind('@') {
        Some(at) => format!("{}***{}", &url[..after_scheme], &url[after_scheme + at..]),
        None => url.to_owned(),
    }
}

fn validate_pipeline(pipeline: &str) -> Result<(), SettingsError> {
    let ok = !pipeline.is_empty()
        && pipeline.len() <= 64
        && pipeline
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(SettingsError::invalid(
            "pipeline",
            format!("{pipeline:?} must be 1 to 64 characters of A-Z a-z 0-9 _ -"),
        ))
    }
}

fn validate_replicas(key: &str, replicas: usize) -> Result<(), SettingsError> {
    if (1..=5).contains(&replicas) {
        Ok(())
    } else {
        Err(SettingsError::invalid(
            key,
            format!("{replicas} is not in 1..=5 (JetStream's replica range)"),
        ))
    }
}

fn require_file(key: &str, path: Option<&Path>) -> Result<(), SettingsError> {
    match path {
        Some(path) if !path.is_file() => Err(SettingsError::invalid(
            key,
            format!("{} does not exist or is not a file", path.display()),
        )),
        _ => Ok(()),
    }
}

fn fmt_duration(d: Duration) -> String {
    humantime_serde::re::humantime::format_duration(d).to_string()
}

/// Stacks the layers. Every value keeps its origin (file path, "the environment").
fn build(sources: &Sources<'_>) -> Result<Config, SettingsError> {
    let mut builder = Config::builder();
    if let Some(path) = sources.file {
        builder = builder.add_source(File::from(path).format(FileFormat::Toml).required(true));
    }
    if let Some(text) = sources.toml {
        builder = builder.add_source(File::from_str(text, FileFormat::Toml));
    }
    // Values stay strings: config converts them to the field's type while deserializing, so
    // a password "0123" or a pipeline "007" is not mangled into a number on the way (which
    // `try_parsing(true)` would do). `prefix_separator` keeps the key's own underscores.
    let mut env = Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("_")
        .separator("__")
        .ignore_empty(true);
    let vars: HashMap<String, String> = match &sources.env {
        EnvVars::Process => std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect(),
        EnvVars::Map(map) => map.clone(),
    };
    let vars = vars
        .into_iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case(CONFIG_FILE_ENV))
        .collect();
    env = env.source(Some(vars));
    builder = builder.add_source(env);
    let overrides = &sources.overrides;
    let builder = builder
        .set_override_option("nats.url", overrides.nats_url.clone())
        .and_then(|b| b.set_override_option("pipeline", overrides.pipeline.clone()))
        .map_err(|err| load_error(err, &Value::new(None, ValueKind::Nil)))?;
    builder
        .build()
        .map_err(|err| load_error(err, &Value::new(None, ValueKind::Nil)))
}

/// Finds keys in the loaded tree that no setting has, and names them with their origin.
fn check_known_keys(loaded: &Value) -> Result<(), SettingsError> {
    let known = Config::try_from(&Settings::default()).map_err(|err| SettingsError::Load {
        message: format!("cannot list the known settings: {err}"),
        key: None,
        source: Box::new(err),
    })?;
    check_table(&known.cache, loaded, "")
}

fn check_table(known: &Value, loaded: &Value, path: &str) -> Result<(), SettingsError> {
    let (ValueKind::Table(known_table), ValueKind::Table(loaded_table)) =
        (&known.kind, &loaded.kind)
    else {
        // Not both tables: a type mismatch that deserialization reports with the key.
        return Ok(());
    };
    // Sorted, so the first unknown key reported does not depend on hash order.
    let loaded_keys: BTreeSet<&String> = loaded_table.keys().collect();
    for key in loaded_keys {
        let full = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        let value = &loaded_table[key];
        match known_table.get(key) {
            Some(known_value) => check_table(known_value, value, &full)?,
            None => {
                let known: BTreeSet<&str> = known_table.keys().map(String::as_str).collect();
                return Err(SettingsError::UnknownKey {
                    origin: describe_origin(&full, value.origin()),
                    parent: if path.is_empty() {
                        String::new()
                    } else {
                        format!(" under `{path}`")
                    },
                    known: known.into_iter().collect::<Vec<_>>().join(", "),
                    key: full,
                });
            }
        }
    }
    Ok(())
}

/// ` in the environment (DELTASYNC_A__B)` / ` in settings.toml` / empty when unknown.
fn describe_origin(key: &str, origin: Option<&str>) -> String {
    match origin {
        Some("the environment") => {
            format!(" in the environment ({})", env_var_name(key))
        }
        Some(o) => format!(" in {o}"),
        None => String::new(),
    }
}

/// The environment variable that sets `key` (`stream.max_messages` ->
/// `DELTASYNC_STREAM__MAX_MESSAGES`).
pub fn env_var_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}_{}",
        key.replace('.', "__").to_ascii_uppercase()
    )
}

/// Wraps a `config` error, naming the key and, for the environment, the variable to fix.
fn load_error(err: ConfigError, loaded: &Value) -> SettingsError {
    let key = match &err {
        ConfigError::Type { key, .. } | ConfigError::At { key, .. } => key.clone(),
        _ => None,
    };
    let mut message = err.to_string();
    if let Some(key) = &key {
        let origin = lookup(loaded, key).and_then(Value::origin);
        match origin {
            Some("the environment") => {
                // config already says "in the environment"; add which variable.
                if !message.contains("in the environment") {
                    message.push_str(" in the environment");
                }
                message.push_str(&format!(" ({})", env_var_name(key)));
            }
            Some(o) if !message.contains(o) => message.push_str(&format!(" in {o}")),
            _ => {}
        }
    }
    SettingsError::Load {
        message,
        key,
        source: Box::new(err),
    }
}

fn lookup<'a>(root: &'a Value, key: &str) -> Option<&'a Value> {
    key.split('.')
        .try_fold(root, |value, segment| match &value.kind {
            ValueKind::Table(table) => table.get(segment),
            _ => None,
        })
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

    fn env(vars: &[(&str, &str)]) -> EnvVars {
        EnvVars::Map(
            vars.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    fn load_env(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        Settings::load_from(Sources {
            env: env(vars),
            ..Sources::default()
        })
    }

    fn load_toml(text: &str) -> Result<Settings, SettingsError> {
        Settings::load_from(Sources {
            toml: Some(text),
            env: env(&[]),
            ..Sources::default()
        })
    }

    /// Defaults with one change, validated.
    fn invalid_key(change: impl FnOnce(&mut Settings)) -> String {
        let mut s = Settings::default();
        change(&mut s);
        match s.validate() {
            Err(SettingsError::Invalid { key, .. }) => key,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    const EXAMPLE: &str = r#"
pipeline = "orders"

[nats]
url = "nats://n1:4222, nats://n2:4222,nats://n3:4222"
user = "deltasync"
password = "s3cret"
connect_timeout = "3s"
request_timeout = "15s"
client_name = "orders-producer"

[nats.tls]
required = false

[stream]
max_messages = 5_000_000
max_bytes = 10_737_418_240
max_age = "72h"
replicas = 3
storage = "file"
duplicate_window = "5m"
max_message_bytes = 1_048_576

[snapshot]
every_envelopes = 100_000
every = "15m"
keep = 5
chunk_target_bytes = 262_144
gc_grace = "30m"
replicas = 3

[producer]
batch_max_changes = 1000
batch_max_bytes = 524_288
linger = "2ms"
ack_window = 512
http = "0.0.0.0:8080"
on_lost_history = "new_lineage"

[consumer]
id = "replica-a"
data_dir = "/var/lib/deltasync"
http = "0.0.0.0:8081"
max_ready_lag = 500
commit_every_envelopes = 32
commit_interval = "250ms"
inactive_threshold = "6h"
resync_max_attempts = 3

[log]
format = "json"
filter = "info,deltasync=debug"
"#;

    #[test]
    fn the_defaults_validate() {
        Settings::default().validate().unwrap();
        assert_eq!(load_env(&[]).unwrap(), Settings::default());
    }

    #[test]
    fn an_example_toml_loads_every_field() {
        let s = load_toml(EXAMPLE).unwrap();
        assert_eq!(s.pipeline, "orders");
        assert_eq!(
            s.nats.urls(),
            ["nats://n1:4222", "nats://n2:4222", "nats://n3:4222"]
        );
        assert_eq!(s.nats.password.as_ref().unwrap().expose(), "s3cret");
        assert_eq!(s.nats.connect_timeout, Duration::from_secs(3));
        assert_eq!(s.stream.max_messages, 5_000_000);
        assert_eq!(s.stream.max_bytes, 10_737_418_240);
        assert_eq!(s.stream.max_age, Duration::from_secs(72 * 3600));
        assert_eq!(s.stream.replicas, 3);
        assert_eq!(s.stream.duplicate_window, Duration::from_secs(300));
        assert_eq!(s.snapshot.every, Duration::from_secs(900));
        assert_eq!(s.snapshot.chunk_target_bytes, 262_144);
        assert_eq!(s.producer.linger, Duration::from_millis(2));
        assert_eq!(s.producer.http, Some("0.0.0.0:8080".parse().unwrap()));
        assert_eq!(s.producer.on_lost_history, OnLostHistory::NewLineage);
        assert_eq!(
            s.consumer.data_dir,
            Some(PathBuf::from("/var/lib/deltasync"))
        );
        assert_eq!(s.consumer.commit_interval, Duration::from_millis(250));
        assert_eq!(s.log.format, LogFormat::Json);
    }

    #[test]
    fn a_settings_file_on_disk_loads_and_a_missing_one_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deltasync.toml");
        std::fs::write(
            &path,
            "pipeline = \"from-file\"\n[stream]\nmax_age = \"48h\"\n",
        )
        .unwrap();
        let s = Settings::load_from(Sources {
            file: Some(&path),
            env: env(&[("DELTASYNC_PIPELINE", "from-env")]),
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(s.pipeline, "from-env", "the environment overrides the file");
        assert_eq!(s.stream.max_age, Duration::from_secs(48 * 3600));

        let missing = dir.path().join("nope.toml");
        let err = Settings::load_from(Sources {
            file: Some(&missing),
            env: env(&[]),
            ..Sources::default()
        })
        .unwrap_err();
        assert!(matches!(err, SettingsError::Load { .. }), "{err}");
        assert!(err.to_string().contains("nope.toml"), "{err}");
    }

    #[test]
    fn the_contract_environment_names_land_in_their_settings() {
        let s = load_env(&[
            ("DELTASYNC_NATS__URL", "nats://a:4222,nats://b:4222"),
            ("DELTASYNC_PIPELINE", "payments"),
            ("DELTASYNC_STREAM__MAX_MESSAGES", "200000"),
            ("DELTASYNC_STREAM__MAX_BYTES", "-1"),
            ("DELTASYNC_STREAM__MAX_AGE", "2h"),
            ("DELTASYNC_SNAPSHOT__EVERY_ENVELOPES", "50000"),
            ("DELTASYNC_SNAPSHOT__EVERY", "30m"),
        ])
        .unwrap();
        assert_eq!(s.nats.urls(), ["nats://a:4222", "nats://b:4222"]);
        assert_eq!(s.pipeline, "payments");
        assert_eq!(s.stream.max_messages, 200_000);
        assert_eq!(s.stream.max_bytes, -1);
        assert_eq!(s.stream.max_age, Duration::from_secs(7200));
        assert_eq!(s.snapshot.every_envelopes, 50_000);
        assert_eq!(s.snapshot.every, Duration::from_secs(1800));
    }

    #[test]
    fn environment_overrides_reach_nested_sections_and_beat_the_file() {
        let s = Settings::load_from(Sources {
            toml: Some("[stream]\nreplicas = 3\nstorage = \"file\"\n[nats.tls]\nrequired = false"),
            env: env(&[
                ("DELTASYNC_STREAM__STORAGE", "memory"),
                ("DELTASYNC_NATS__TLS__REQUIRED", "true"),
                ("DELTASYNC_NATS__CONNECT_TIMEOUT", "750ms"),
                ("DELTASYNC_PRODUCER__HTTP", "127.0.0.1:9000"),
                ("DELTASYNC_CONSUMER__COMMIT_EVERY_ENVELOPES", "8"),
                ("DELTASYNC_LOG__FORMAT", "json"),
                // Empty counts as unset; not a user named "".
                ("DELTASYNC_NATS__USER", ""),
                // Reserved for the file path, never read as a setting.
                ("DELTASYNC_CONFIG", "/etc/deltasync.toml"),
                // Other variables are not ours.
                ("PATH", "/usr/bin"),
            ]),
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(s.stream.replicas, 3);
        assert_eq!(s.stream.storage, StorageKind::Memory);
        assert!(s.nats.tls.required);
        assert_eq!(s.nats.connect_timeout, Duration::from_millis(750));
        assert_eq!(s.producer.http, Some("127.0.0.1:9000".parse().unwrap()));
        assert_eq!(s.consumer.commit_every_envelopes, 8);
        assert_eq!(s.log.format, LogFormat::Json);
        assert_eq!(s.nats.user, None);
    }

    #[test]
    fn string_values_that_look_like_numbers_are_not_mangled() {
        let s = load_env(&[
            ("DELTASYNC_PIPELINE", "007"),
            ("DELTASYNC_NATS__USER", "1e3"),
            ("DELTASYNC_NATS__PASSWORD", "0123"),
            ("DELTASYNC_CONSUMER__ID", "TRUE"),
        ])
        .unwrap();
        assert_eq!(s.pipeline, "007");
        assert_eq!(s.nats.user.as_deref(), Some("1e3"));
        assert_eq!(s.nats.password.unwrap().expose(), "0123");
        assert_eq!(s.consumer.id.as_deref(), Some("TRUE"));
    }

    #[test]
    fn a_bare_zero_duration_means_zero_and_other_bare_numbers_are_refused() {
        let s = load_env(&[
            ("DELTASYNC_STREAM__MAX_AGE", "0"),
            ("DELTASYNC_STREAM__MAX_MESSAGES", "-1"),
            ("DELTASYNC_STREAM__MAX_BYTES", "-1"),
        ])
        .unwrap();
        assert_eq!(s.stream.max_age, Duration::ZERO);
        let s = load_toml("[stream]\nmax_age = 0\nmax_messages = -1\nmax_bytes = -1").unwrap();
        assert_eq!(s.stream.max_age, Duration::ZERO);

        let err = load_toml("[stream]\nmax_age = 30").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("stream.max_age"), "{text}");
        assert!(text.contains("time unit needed"), "{text}");
    }

    #[test]
    fn cli_overrides_beat_the_environment() {
        let s = Settings::load_from(Sources {
            env: env(&[
                ("DELTASYNC_NATS__URL", "nats://env:4222"),
                ("DELTASYNC_PIPELINE", "from-env"),
            ]),
            overrides: Overrides {
                nats_url: Some("nats://cli:4222".to_owned()),
                pipeline: Some("from-cli".to_owned()),
            },
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(s.nats.url, "nats://cli:4222");
        assert_eq!(s.pipeline, "from-cli");
    }

    #[test]
    fn an_unknown_key_in_the_file_is_refused_naming_it_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[stream]\nmax_mesages = 5\n").unwrap();
        let err = Settings::load_from(Sources {
            file: Some(&path),
            env: env(&[]),
            ..Sources::default()
        })
        .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, SettingsError::UnknownKey { key, .. } if key == "stream.max_mesages"),
            "{text}"
        );
        assert!(text.contains("bad.toml"), "{text}");
        assert!(
            text.contains("max_messages"),
            "lists the known keys: {text}"
        );

        let err = load_toml("pipelin = \"x\"").unwrap_err();
        assert!(
            matches!(&err, SettingsError::UnknownKey { key, .. } if key == "pipelin"),
            "{err}"
        );
        let err = load_toml("[nats.tls]\nca = \"x\"").unwrap_err();
        assert!(
            matches!(&err, SettingsError::UnknownKey { key, .. } if key == "nats.tls.ca"),
            "{err}"
        );
    }

    #[test]
    fn an_unknown_key_in_the_environment_is_refused_naming_the_variable() {
        // A single underscore where the nesting needs two.
        let err = load_env(&[("DELTASYNC_STREAM_MAX_MESSAGES", "5")]).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, SettingsError::UnknownKey { key, .. } if key == "stream_max_messages"),
            "{text}"
        );
        assert!(text.contains("DELTASYNC_STREAM_MAX_MESSAGES"), "{text}");

        let err = load_env(&[("DELTASYNC_SNAPSHOT__EVERY_ENVELOPE", "5")]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("snapshot.every_envelope"), "{text}");
        assert!(
            text.contains("DELTASYNC_SNAPSHOT__EVERY_ENVELOPE"),
            "{text}"
        );
    }

    #[test]
    fn on_lost_history_defaults_to_refuse_loads_from_file_and_env_and_refuses_other_values() {
        assert_eq!(
            Settings::default().producer.on_lost_history,
            OnLostHistory::Refuse
        );
        let s = load_toml("[producer]\non_lost_history = \"new_lineage\"\n").unwrap();
        assert_eq!(s.producer.on_lost_history, OnLostHistory::NewLineage);
        let s = load_env(&[("DELTASYNC_PRODUCER__ON_LOST_HISTORY", "new-lineage")]).unwrap();
        assert_eq!(s.producer.on_lost_history, OnLostHistory::NewLineage);
        let err = load_env(&[("DELTASYNC_PRODUCER__ON_LOST_HISTORY", "continue")]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("producer.on_lost_history") && text.contains("\"continue\""),
            "{text}"
        );
    }

    #[test]
    fn a_wrong_type_is_refused_naming_the_key() {
        let err = load_env(&[("DELTASYNC_STREAM__MAX_MESSAGES", "lots")]).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, SettingsError::Load { key: Some(k), .. } if k == "stream.max_messages"),
            "{text}"
        );
        assert!(text.contains("DELTASYNC_STREAM__MAX_MESSAGES"), "{text}");
        assert!(text.contains("lots"), "{text}");

        let err = load_toml("[stream]\nreplicas = \"three\"").unwrap_err();
        assert!(err.to_string().contains("stream.replicas"), "{err}");
        let err = load_toml("[stream]\nstorage = \"disk\"").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("stream.storage"), "{text}");
        assert!(
            text.contains("\"disk\"") && text.contains("`memory`"),
            "{text}"
        );
        let err = load_env(&[("DELTASYNC_LOG__FORMAT", "yaml")]).unwrap_err();
        assert!(err.to_string().contains("log.format"), "{err}");
        let s = load_env(&[("DELTASYNC_STREAM__STORAGE", "Memory")]).unwrap();
        assert_eq!(s.stream.storage, StorageKind::Memory, "case-insensitive");
        let err = load_env(&[("DELTASYNC_SNAPSHOT__EVERY", "soon")]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("snapshot.every"), "{text}");
        assert!(text.contains("DELTASYNC_SNAPSHOT__EVERY"), "{text}");
        let err = load_env(&[("DELTASYNC_PRODUCER__HTTP", "localhost")]).unwrap_err();
        assert!(err.to_string().contains("producer.http"), "{err}");
        let err = load_toml("stream = 5").unwrap_err();
        assert!(err.to_string().contains("stream"), "{err}");
        let err = load_env(&[("DELTASYNC_SNAPSHOT__KEEP", "-3")]).unwrap_err();
        assert!(err.to_string().contains("snapshot.keep"), "{err}");
    }

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

    #[test]
    fn an_nkey_seed_must_be_a_user_seed_and_is_never_quoted() {
        let user = nkeys::KeyPair::new_user().seed().unwrap();
        let mut s = Settings::default();
        s.nats.nkey_seed = Some(Secret::new(user));
        s.validate().unwrap();
        let account = nkeys::KeyPair::new_account().seed().unwrap();
        for bad in ["SUNOTASEED", "not-a-seed", "", account.as_str()] {
            let mut s = Settings::default();
            s.nats.nkey_seed = Some(Secret::new(bad));
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains("`nats.nkey_seed`"), "{err}");
            if !bad.is_empty() {
                assert!(!err.contains(bad), "the seed is quoted: {err}");
            }
        }
    }

    #[test]
    fn an_inbox_prefix_must_be_a_literal_subject_prefix() {
        for good in ["_INBOX_orders_consumer", "_I.orders.c1", "x"] {
            let mut s = Settings::default();
            s.nats.inbox_prefix = Some(good.to_owned());
            s.validate().unwrap();
        }
        for bad in ["", "a..b", "a.*", "a.>", ">", "a b", ".a", "a."] {
            assert_eq!(
                invalid_key(|s| s.nats.inbox_prefix = Some(bad.to_owned())),
                "nats.inbox_prefix",
                "{bad:?}"
            );
        }
        let s = load_env(&[("DELTASYNC_NATS__INBOX_PREFIX", "_INBOX_p_c")]).unwrap();
        assert_eq!(s.nats.inbox_prefix.as_deref(), Some("_INBOX_p_c"));
    }

    #[test]
    fn a_pipeline_name_must_be_1_to_64_safe_characters() {
        for bad in ["", "a.b", "a b", "a*", "a>", "ä", &"x".repeat(65)] {
            assert_eq!(
                invalid_key(|s| s.pipeline = bad.to_owned()),
                "pipeline",
                "{bad:?}"
            );
        }
        let mut s = Settings::default();
        s.pipeline = "Orders_v2-eu".to_owned();
        s.validate().unwrap();
        let err = load_env(&[("DELTASYNC_PIPELINE", "a.b")]).unwrap_err();
        assert!(err.to_string().contains("`pipeline`"), "{err}");
    }

    #[test]
    fn nats_urls_need_a_nats_or_tls_scheme() {
        assert_eq!(
            invalid_key(|s| s.nats.url = "http://x:4222".into()),
            "nats.url"
        );
        assert_eq!(invalid_key(|s| s.nats.url = " , ".into()), "nats.url");
        assert_eq!(
            invalid_key(|s| s.nats.url = "nats://a:4222,ws://b:80".into()),
            "nats.url"
        );
        let mut s = Settings::default();
        s.nats.url = "tls://a:4222, b:4222".into();
        s.validate().unwrap();
    }

    #[test]
    fn credentials_in_the_url_are_refused_without_printing_them() {
        let mut s = Settings::default();
        s.nats.url = "nats://a:4222,nats://alice:hunter2@b:4222".into();
        let err = s.validate().unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("nats.url") && text.contains("***@b:4222"),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
        assert_eq!(redact_url("tls://tok@h:4222/x@y"), "tls://***@h:4222/x@y");
        assert_eq!(redact_url("u:p@h:4222"), "***@h:4222");
        assert_eq!(redact_url("nats://h:4222"), "nats://h:4222");
    }

    #[test]
    fn authentication_must_be_complete_and_single() {
        assert_eq!(
            invalid_key(|s| s.nats.user = Some("u".into())),
            "nats.password"
        );
        assert_eq!(
            invalid_key(|s| s.nats.password = Some(Secret::new("p"))),
            "nats.user"
        );
        let key = invalid_key(|s| {
            s.nats.user = Some("u".into());
            s.nats.password = Some(Secret::new("p"));
            s.nats.token = Some(Secret::new("t"));
        });
        assert!(
            key.contains("nats.user") && key.contains("nats.token"),
            "{key}"
        );
        assert_eq!(
            invalid_key(|s| s.nats.nkey_seed = Some(Secret::new("UABC"))),
            "nats.nkey_seed"
        );
    }

    #[test]
    fn tls_and_creds_files_must_exist() {
        let err = {
            let mut s = Settings::default();
            s.nats.tls.ca_file = Some(PathBuf::from("/nonexistent/ca.pem"));
            s.validate().unwrap_err()
        };
        let text = err.to_string();
        assert!(text.contains("nats.tls.ca_file"), "{text}");
        assert!(text.contains("/nonexistent/ca.pem"), "{text}");
        assert_eq!(
            invalid_key(|s| s.nats.tls.cert_file = Some("/nonexistent/c.pem".into())),
            "nats.tls.cert_file"
        );
        assert_eq!(
            invalid_key(|s| s.nats.creds_file = Some("/nonexistent/u.creds".into())),
            "nats.creds_file"
        );
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        std::fs::write(&cert, "x").unwrap();
        assert_eq!(
            invalid_key(|s| s.nats.tls.cert_file = Some(cert.clone())),
            "nats.tls.key_file"
        );
    }

    #[test]
    fn replicas_must_be_between_1_and_5() {
        assert_eq!(invalid_key(|s| s.stream.replicas = 0), "stream.replicas");
        assert_eq!(invalid_key(|s| s.stream.replicas = 6), "stream.replicas");
        assert_eq!(
            invalid_key(|s| s.snapshot.replicas = 0),
            "snapshot.replicas"
        );
        let mut s = Settings::default();
        s.stream.replicas = 5;
        s.snapshot.replicas = 3;
        s.validate().unwrap();
    }

    #[test]
    fn batches_and_chunks_must_fit_below_the_message_limit_with_a_margin() {
        let limit = MIB;
        assert_eq!(
            invalid_key(|s| s.producer.batch_max_bytes = limit),
            "producer.batch_max_bytes"
        );
        assert_eq!(
            invalid_key(|s| s.producer.batch_max_bytes = limit - MESSAGE_OVERHEAD_MARGIN + 1),
            "producer.batch_max_bytes"
        );
        let mut s = Settings::default();
        s.producer.batch_max_bytes = limit - MESSAGE_OVERHEAD_MARGIN;
        s.validate().unwrap();
        assert_eq!(
            invalid_key(|s| s.snapshot.chunk_target_bytes = limit),
            "snapshot.chunk_target_bytes"
        );
        assert_eq!(
            invalid_key(|s| s.snapshot.chunk_target_bytes = 0),
            "snapshot.chunk_target_bytes"
        );
        assert_eq!(
            invalid_key(|s| s.stream.max_message_bytes = 1000),
            "stream.max_message_bytes"
        );
    }

    #[test]
    fn zero_windows_and_counts_are_refused() {
        assert_eq!(
            invalid_key(|s| s.producer.ack_window = 0),
            "producer.ack_window"
        );
        assert_eq!(
            invalid_key(|s| s.producer.batch_max_changes = 0),
            "producer.batch_max_changes"
        );
        assert_eq!(invalid_key(|s| s.snapshot.keep = 0), "snapshot.keep");
        assert_eq!(
            invalid_key(|s| s.consumer.commit_every_envelopes = 0),
            "consumer.commit_every_envelopes"
        );
        assert_eq!(
            invalid_key(|s| s.nats.connect_timeout = Duration::ZERO),
            "nats.connect_timeout"
        );
        assert_eq!(
            invalid_key(|s| s.stream.max_messages = 0),
            "stream.max_messages"
        );
        assert_eq!(invalid_key(|s| s.stream.max_bytes = -2), "stream.max_bytes");
        assert_eq!(
            invalid_key(|s| s.stream.duplicate_window = Duration::ZERO),
            "stream.duplicate_window"
        );
        assert_eq!(
            invalid_key(|s| s.stream.duplicate_window = Duration::from_secs(25 * 3600)),
            "stream.duplicate_window"
        );
        assert_eq!(
            invalid_key(|s| s.log.filter = "info,[".into()),
            "log.filter"
        );
    }

    #[test]
    fn retention_by_count_must_cover_two_snapshot_intervals() {
        let mut s = Settings::default();
        s.stream.max_messages = 19_999;
        s.snapshot.every_envelopes = 10_000;
        let err = s.validate().unwrap_err();
        let text = err.to_string();
        assert!(text.contains("stream.max_messages"), "{text}");
        assert!(text.contains("snapshot.every_envelopes"), "{text}");
        assert!(
            text.contains("19999") && text.contains("10000") && text.contains("20000"),
            "{text}"
        );
        s.stream.max_messages = 20_000;
        s.validate().unwrap();
        // Unlimited retention or no count trigger: nothing to cover.
        s.stream.max_messages = -1;
        s.snapshot.every_envelopes = 1 << 40;
        s.validate().unwrap();
        s.stream.max_messages = 10;
        s.snapshot.every_envelopes = 0;
        s.validate().unwrap();
    }

    #[test]
    fn retention_by_age_must_cover_two_snapshot_intervals() {
        let mut s = Settings::default();
        s.stream.max_age = Duration::from_secs(3600);
        s.snapshot.every = Duration::from_secs(1801);
        let err = s.validate().unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("stream.max_age") && text.contains("snapshot.every"),
            "{text}"
        );
        assert!(text.contains("1h") && text.contains("30m 1s"), "{text}");
        s.snapshot.every = Duration::from_secs(1800);
        s.validate().unwrap();
        s.stream.max_age = Duration::ZERO;
        s.snapshot.every = Duration::from_secs(365 * 24 * 3600);
        s.validate().unwrap();
    }

    #[test]
    fn snapshots_off_with_limited_retention_is_refused() {
        let mut s = Settings::default();
        s.snapshot.every_envelopes = 0;
        s.snapshot.every = Duration::ZERO;
        let err = s.validate().unwrap_err();
        assert!(
            err.to_string().contains("snapshot.every_envelopes"),
            "{err}"
        );
        s.stream.max_messages = -1;
        s.stream.max_bytes = -1;
        s.stream.max_age = Duration::ZERO;
        s.validate().unwrap();
        s.stream.max_bytes = 1 << 30;
        assert!(s.validate().is_err(), "max_bytes alone limits retention");
    }

    #[test]
    fn retention_that_cannot_hold_the_snapshot_guarantee_is_refused() {
        // Age is not held back: snapshots must be time-based.
        let mut s = Settings::default();
        s.snapshot.every = Duration::ZERO;
        let err = s.validate().unwrap_err();
        assert!(err.to_string().contains("snapshot.every"), "{err}");
        s.stream.max_age = Duration::ZERO;
        s.validate().unwrap();
        // Bytes must keep the largest envelope (one change at its limits) within the room.
        let mut s = Settings::default();
        s.producer.batch_max_bytes = 1024;
        s.stream.max_bytes = 300_000;
        let err = s.validate().unwrap_err();
        assert!(err.to_string().contains("stream.max_bytes"), "{err}");
        s.stream.max_bytes = 700_000;
        s.validate().unwrap();
        let room = s.stream.byte_room().unwrap();
        assert!(
            room >= MAX_CHANGE_BYTES + ENVELOPE_STREAM_OVERHEAD,
            "{room}"
        );
        assert_eq!(s.stream.envelope_room(), Some(900_000));
        s.stream.max_messages = 50;
        assert_eq!(s.stream.envelope_room(), Some(45));
        s.stream.max_messages = -1;
        assert_eq!(s.stream.envelope_room(), None);
    }

    #[test]
    fn env_var_names_follow_the_key_path() {
        assert_eq!(
            env_var_name("stream.max_messages"),
            "DELTASYNC_STREAM__MAX_MESSAGES"
        );
        assert_eq!(env_var_name("pipeline"), "DELTASYNC_PIPELINE");
        assert_eq!(
            env_var_name("nats.tls.ca_file"),
            "DELTASYNC_NATS__TLS__CA_FILE"
        );
    }
}
