//! Connecting to NATS, and creating or updating a pipeline's envelope stream and snapshot
//! bucket from the settings; reading the stream's bounds and its own retention limits.
//!
//! Resource names come from [`deltasync_core::names`], limits from
//! [`deltasync_config::settings`]; what the bounds and limits mean for a position is the pure
//! [`deltasync_core::retention`].
//!
//! ## Invariants
//!
//! - [`connect`] retries the initial connection only with `nats.retry_on_initial_connect`,
//!   and then only while the failure can pass (refused, unreachable, timed out) and for at
//!   most `nats.initial_connect_wait`; otherwise an unreachable NATS fails within
//!   `nats.connect_timeout` per listed server with an error naming the URL. Refused
//!   credentials and TLS failures are never retried. Once connected, the client reconnects on
//!   its own; disconnects are logged at WARN, reconnects at INFO.
//! - Every JetStream call goes through [`jetstream`], which applies `nats.jetstream_domain`.
//! - [`ensure_stream`] and [`ensure_bucket`] are idempotent: they create what is missing and
//!   bring the limits deltasync manages to the settings, leaving every other field of an
//!   existing stream as the operator set it.
//! - The envelope stream is the only writer-visible history: limits retention, discard old,
//!   one subject ([`names::subject`]), direct get allowed (consumers fetch by sequence).

use async_nats::jetstream::context::{
    CreateKeyValueError, CreateStreamError, GetStreamError, GetStreamErrorKind, KeyValueError,
    UpdateKeyValueError,
};
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, kv, ErrorCode};
use async_nats::{Client, ConnectError, ConnectErrorKind, ConnectOptions, Event, ServerAddr};
use deltasync_config::settings::{redact_url, NatsSettings, Settings, StorageKind};
use deltasync_core::names;
use deltasync_core::retention::{self, Headroom, PositionHeadroom, StreamBounds, StreamLimits};
use std::fmt::Debug;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// KV history kept per key in the snapshot bucket. Manifests and chunks are content-addressed
/// (a key's value never changes once written) and pointers are updated by compare-and-set,
/// which needs only the latest revision; older revisions would only cost space.
pub const BUCKET_HISTORY: i64 = 1;

/// Why a NATS step failed. Each variant is one step and wraps async-nats's error, whose
/// `kind()` callers can branch on.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The initial connection failed (unreachable, refused, timed out, TLS, authentication).
    #[error("cannot connect to NATS at {url} (connect timeout {timeout:?}): {source}{hint}")]
    Connect {
        /// The server address(es) tried, comma-separated.
        url: String,
        /// `nats.connect_timeout`.
        timeout: Duration,
        /// async-nats's error; `kind()` tells refused/timed out (`Io`, `TimedOut`) from
        /// `AuthorizationViolation`, `Tls`, `ServerParse`, ... (a certificate the client does
        /// not trust is reported as `Io`).
        #[source]
        source: ConnectError,
        /// Which settings to look at, when the failure says (`; ...`), else empty.
        hint: &'static str,
    },
    /// Nothing answers JetStream API requests in `nats.jetstream_domain`.
    #[error(
        "no JetStream answers in domain {domain:?} at {url}: {source}; check \
         nats.jetstream_domain (or the context's jetstream_domain) against the server's \
         `jetstream {{ domain: ... }}`"
    )]
    JetStreamDomain {
        /// The domain asked.
        domain: String,
        /// The server address(es).
        url: String,
        /// async-nats's error.
        #[source]
        source: async_nats::jetstream::context::AccountError,
    },
    /// `nats.creds_file` could not be read or parsed.
    #[error("cannot read NATS credentials file {path}: {source}")]
    Credentials {
        /// The file.
        path: String,
        /// The read or parse error.
        #[source]
        source: std::io::Error,
    },
    /// `stream.max_message_bytes` is above the server's `max_payload`: full envelopes would be
    /// refused by the client before they are sent.
    #[error(
        "stream.max_message_bytes {max_message_bytes} exceeds the NATS server's max_payload \
         {max_payload}; lower it (and producer.batch_max_bytes, snapshot.chunk_target_bytes) \
         or raise max_payload on the server"
    )]
    MaxPayload {
        /// The setting.
        max_message_bytes: i32,
        /// What the server announced.
        max_payload: usize,
    },
    /// The stream does not exist (the producer has not created it yet, or it was deleted).
    #[error("stream {stream} does not exist")]
    StreamNotFound {
        /// The stream's name.
        stream: String,
    },
    /// Reading a stream's info failed.
    #[error("cannot read info of stream {stream}: {source}")]
    StreamInfo {
        /// The stream's name.
        stream: String,
        /// async-nats's error.
        #[source]
        source: GetStreamError,
    },
    /// Creating the envelope stream failed.
    #[error("cannot create stream {stream}: {source}")]
    CreateStream {
        /// The stream's name.
        stream: String,
        /// async-nats's error (`kind()`: `JetStream(err)` carries the server's error code).
        #[source]
        source: CreateStreamError,
    },
    /// Updating the envelope stream's limits failed (e.g. a storage type change, which
    /// JetStream refuses).
    #[error("cannot update stream {stream} ({changes}): {source}")]
    UpdateStream {
        /// The stream's name.
        stream: String,
        /// The changes attempted, `field: old -> new, ...`.
        changes: String,
        /// async-nats's error.
        #[source]
        source: CreateStreamError,
    },
    /// Creating the snapshot bucket failed.
    #[error("cannot create KV bucket {bucket}: {source}")]
    CreateBucket {
        /// The bucket's name.
        bucket: String,
        /// async-nats's error.
        #[source]
        source: CreateKeyValueError,
    },
    /// Updating the snapshot bucket's settings failed.
    #[error("cannot update KV bucket {bucket} ({changes}): {source}")]
    UpdateBucket {
        /// The bucket's name.
        bucket: String,
        /// The changes attempted.
        changes: String,
        /// async-nats's error.
        #[source]
        source: UpdateKeyValueError,
    },
    /// A bucket just created did not answer a read in time.
    #[error(
        "KV bucket {bucket} was created but did not answer a read within {within:?}: {source}"
    )]
    BucketNotReady {
        /// The bucket's name.
        bucket: String,
        /// How long it was given.
        within: Duration,
        /// The last read's error.
        #[source]
        source: kv::EntryError,
    },
    /// Binding to the existing snapshot bucket failed.
    #[error("cannot open KV bucket {bucket}: {source}")]
    OpenBucket {
        /// The bucket's name.
        bucket: String,
        /// async-nats's error.
        #[source]
        source: KeyValueError,
    },
}

/// Connects to the servers in `settings.url` with the configured authentication and TLS.
///
/// Fails (never hangs) when no server answers: each address gets `connect_timeout`, and the
/// whole attempt is bounded by `connect_timeout` × the number of addresses (plus name
/// resolution slack). With `retry_on_initial_connect`, a failure that can pass (nothing
/// listening yet, unreachable, timed out) is retried with a growing pause (0.1 s to 2 s) until
/// `initial_connect_wait` has passed. With `jetstream_domain`, checks that JetStream answers
/// in that domain. The returned client reconnects by itself after later disconnects.
pub async fn connect(settings: &NatsSettings) -> Result<Client, NatsError> {
    let client = connect_retrying(settings).await?;
    if let Some(domain) = &settings.jetstream_domain {
        // A wrong domain would otherwise surface as "resource does not exist" on the first
        // stream or bucket call.
        if let Err(source) = jetstream(client.clone(), settings).query_account().await {
            return Err(NatsError::JetStreamDomain {
                domain: domain.clone(),
                url: settings
                    .urls()
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>()
                    .join(","),
                source,
            });
        }
    }
    Ok(client)
}

async fn connect_retrying(settings: &NatsSettings) -> Result<Client, NatsError> {
    use backon::{ExponentialBuilder, Retryable};
    if !settings.retry_on_initial_connect {
        return connect_once(settings).await;
    }
    // Pauses 0.1 s, 0.2 s, ... up to 2 s, for at most initial_connect_wait in all.
    let backoff = ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .without_max_times()
        .with_total_delay(Some(settings.initial_connect_wait));
    let mut attempts = 0u32;
    (|| connect_once(settings))
        .retry(backoff)
        .when(may_pass)
        .notify(|err, _pause| {
            attempts += 1;
            if attempts == 1 || attempts.is_power_of_two() {
                tracing::warn!(
                    error = %err,
                    attempts,
                    "NATS is not reachable yet; retrying (nats.retry_on_initial_connect)"
                );
            }
        })
        .await
}

/// Whether a failed initial connection may succeed later by itself: nothing listens yet, the
/// host is unreachable or slow — not refused credentials, bad TLS or a bad address.
fn may_pass(err: &NatsError) -> bool {
    match err {
        NatsError::Connect { source, hint, .. } => {
            hint.is_empty()
                && matches!(
                    source.kind(),
                    ConnectErrorKind::Io | ConnectErrorKind::TimedOut | ConnectErrorKind::Dns
                )
        }
        _ => false,
    }
}

async fn connect_once(settings: &NatsSettings) -> Result<Client, NatsError> {
    let urls = settings.urls();
    // Never log credentials a URL may carry (validated settings carry none).
    let url_list = urls
        .iter()
        .map(|u| redact_url(u))
        .collect::<Vec<_>>()
        .join(",");
    let connect_error = |source: ConnectError| NatsError::Connect {
        url: url_list.clone(),
        timeout: settings.connect_timeout,
        hint: connect_hint(&source),
        source,
    };
    let mut addrs = Vec::with_capacity(urls.len());
    for url in &urls {
        let addr = ServerAddr::from_str(url).map_err(|err| NatsError::Connect {
            url: redact_url(url),
            timeout: settings.connect_timeout,
            source: ConnectError::with_source(ConnectErrorKind::ServerParse, err),
            hint: "",
        })?;
        addrs.push(addr);
    }
    if addrs.is_empty() {
        return Err(connect_error(ConnectError::new(
            ConnectErrorKind::ServerParse,
        )));
    }

    let options = options(settings).await?;
    // async-nats bounds each TCP + handshake attempt by `connection_timeout`, but not name
    // resolution; this outer bound covers everything.
    let servers = u32::try_from(addrs.len()).unwrap_or(u32::MAX);
    let bound = settings.connect_timeout.saturating_mul(servers) + Duration::from_secs(1);
    match tokio::time::timeout(bound, options.connect(addrs)).await {
        Ok(Ok(client)) => {
            let info = client.server_info();
            tracing::info!(
                url = %url_list,
                server = %info.server_name,
                version = %info.version,
                max_payload = info.max_payload,
                "Connected to NATS"
            );
            Ok(client)
        }
        Ok(Err(source)) => Err(connect_error(source)),
        Err(_elapsed) => Err(connect_error(ConnectError::new(ConnectErrorKind::TimedOut))),
    }
}

/// The settings to check after a failed connect, when the failure tells (authentication and
/// TLS failures); async-nats reports certificate problems as I/O errors carrying rustls's text.
fn connect_hint(source: &ConnectError) -> &'static str {
    let text = source.to_string();
    if source.kind() == ConnectErrorKind::AuthorizationViolation {
        "; the server refused the credentials: check nats.user/nats.password, nats.token, \
         nats.nkey_seed or nats.creds_file"
    } else if text.contains("UnknownIssuer") || text.contains("BadSignature") {
        "; the server's TLS certificate is not signed by a trusted CA: set nats.tls.ca_file \
         to the CA that signed it"
    } else if text.contains("NotValidForName") {
        "; the server's TLS certificate does not name the host in nats.url: connect by a name \
         (or IP address) the certificate holds"
    } else if text.contains("CertificateRequired") {
        "; the server requires a client certificate: set nats.tls.cert_file and \
         nats.tls.key_file"
    } else if source.kind() == ConnectErrorKind::Tls || text.contains("certificate") {
        "; TLS failed: check nats.tls and whether the server expects tls:// or nats://"
    } else {
        ""
    }
}

async fn options(settings: &NatsSettings) -> Result<ConnectOptions, NatsError> {
    let mut options = ConnectOptions::new()
        .connection_timeout(settings.connect_timeout)
        .request_timeout(Some(settings.request_timeout))
        .event_callback({
            // The first `Connected` is the initial connection, logged by `connect`; later
            // ones are reconnections.
            let connected_once = Arc::new(AtomicBool::new(false));
            move |event| {
                let connected_once = Arc::clone(&connected_once);
                async move { log_event(event, &connected_once) }
            }
        });
    if let Some(name) = &settings.client_name {
        options = options.name(name);
    }
    if let (Some(user), Some(password)) = (&settings.user, &settings.password) {
        options = options.user_and_password(user.clone(), password.expose().to_owned());
    }
    if let Some(token) = &settings.token {
        options = options.token(token.expose().to_owned());
    }
    if let Some(seed) = &settings.nkey_seed {
        options = options.nkey(seed.expose().to_owned());
    }
    if let Some(path) = &settings.nkey_file {
        options = options.nkey(read_nkey_file(path)?);
    }
    if let Some(path) = &settings.creds_file {
        options =
            options
                .credentials_file(path)
                .await
                .map_err(|source| NatsError::Credentials {
                    path: path.display().to_string(),
                    source,
                })?;
    }
    let tls = &settings.tls;
    if let Some(ca) = &tls.ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if tls.required {
        options = options.require_tls(true);
    }
    if let Some(prefix) = &settings.inbox_prefix {
        options = options.custom_inbox_prefix(prefix);
    }
    Ok(options)
}

/// The user seed (`SU...`) in an nkey file: the first line that is one (the `nk` tool and
/// `nsc` write the seed alone, or with comment lines around it).
fn read_nkey_file(path: &std::path::Path) -> Result<String, NatsError> {
    let text = std::fs::read_to_string(path).map_err(|source| NatsError::Credentials {
        path: path.display().to_string(),
        source,
    })?;
    text.lines()
        .map(str::trim)
        .find(|l| l.starts_with("SU"))
        .map(str::to_owned)
        .ok_or_else(|| NatsError::Credentials {
            path: path.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "holds no user nkey seed (a line starting with SU)",
            ),
        })
}

fn log_event(event: Event, connected_once: &AtomicBool) {
    match event {
        Event::Connected => {
            if connected_once.swap(true, Ordering::Relaxed) {
                tracing::info!("NATS connection re-established")
            }
        }
        Event::Disconnected => tracing::warn!("NATS connection lost; reconnecting"),
        Event::LameDuckMode => {
            tracing::warn!("NATS server entering lame duck mode; it will close the connection")
        }
        Event::SlowConsumer(sid) => tracing::warn!(sid, "NATS slow consumer; messages dropped"),
        Event::ServerError(err) => tracing::warn!(error = %err, "NATS server error"),
        Event::ClientError(err) => tracing::warn!(error = %err, "NATS client error"),
        Event::Draining => tracing::info!("NATS connection draining"),
        Event::Closed => tracing::info!("NATS connection closed"),
    }
}

/// The JetStream context every deltasync component uses: API requests and awaited publish
/// acks bounded by `nats.request_timeout`, publishing that waits (instead of failing) when
/// 5,000 acks are outstanding, and the API of `nats.jetstream_domain` when set.
pub fn jetstream(client: Client, settings: &NatsSettings) -> jetstream::Context {
    let builder = jetstream::context::ContextBuilder::new();
    let builder = match &settings.jetstream_domain {
        Some(domain) => builder
            .domain(domain.clone())
            .timeout(settings.request_timeout),
        None => builder.timeout(settings.request_timeout),
    };
    builder
        // Acks whose future was dropped are still reaped; give them the same bound.
        .ack_timeout(settings.request_timeout)
        .backpressure_on_inflight(true)
        .build(client)
}

/// The envelope stream's configuration as deltasync wants it.
pub fn stream_config(settings: &Settings) -> stream::Config {
    let s = &settings.stream;
    stream::Config {
        name: names::stream_name(&settings.pipeline),
        description: Some(format!(
            "deltasync pipeline {} envelopes",
            settings.pipeline
        )),
        subjects: vec![names::subject(&settings.pipeline)],
        retention: RetentionPolicy::Limits,
        max_messages: s.max_messages,
        max_bytes: s.max_bytes,
        max_age: s.max_age,
        num_replicas: s.replicas,
        storage: storage_type(s.storage),
        duplicate_window: s.duplicate_window,
        discard: DiscardPolicy::Old,
        allow_direct: true,
        max_message_size: s.max_message_bytes,
        ..Default::default()
    }
}

/// The snapshot bucket's configuration as deltasync wants it.
pub fn bucket_config(settings: &Settings) -> kv::Config {
    kv::Config {
        bucket: names::bucket_name(&settings.pipeline),
        description: format!("deltasync pipeline {} snapshots", settings.pipeline),
        history: BUCKET_HISTORY,
        max_value_size: settings.stream.max_message_bytes,
        storage: storage_type(settings.stream.storage),
        num_replicas: settings.snapshot.replicas,
        ..Default::default()
    }
}

fn storage_type(kind: StorageKind) -> StorageType {
    match kind {
        StorageKind::File => StorageType::File,
        StorageKind::Memory => StorageType::Memory,
    }
}

/// Creates the pipeline's envelope stream, or brings an existing one's limits to the
/// settings (logging each change). Returns a handle with fresh info.
pub async fn ensure_stream(
    js: &jetstream::Context,
    settings: &Settings,
) -> Result<jetstream::stream::Stream, NatsError> {
    check_max_payload(js, settings)?;
    let wanted = stream_config(settings);
    let name = wanted.name.clone();
    // Two passes at most: if another process creates the stream between our lookup and our
    // create, the second pass updates it.
    for _ in 0..2 {
        let existing = match js.get_stream(&name).await {
            Ok(stream) => stream,
            Err(err) if is_stream_not_found(&err) => match js.create_stream(wanted.clone()).await {
                Ok(stream) => {
                    tracing::info!(
                        stream = %name,
                        subject = %wanted.subjects.join(","),
                        max_messages = wanted.max_messages,
                        max_bytes = wanted.max_bytes,
                        max_age = ?wanted.max_age,
                        replicas = wanted.num_replicas,
                        "Stream created"
                    );
                    return Ok(stream);
                }
                Err(err) if jetstream_code(&err.kind()) == Some(ErrorCode::STREAM_NAME_EXIST) => {
                    continue
                }
                Err(source) => {
                    return Err(NatsError::CreateStream {
                        stream: name,
                        source,
                    })
                }
            },
            Err(source) => {
                return Err(NatsError::StreamInfo {
                    stream: name,
                    source,
                })
            }
        };
        let current = existing.cached_info().config.clone();
        let (updated, changes) = merge_stream_config(current, &wanted);
        if changes.is_empty() {
            tracing::debug!(stream = %name, "Stream already up to date");
            return Ok(existing);
        }
        let changes = changes.join(", ");
        js.update_stream(&updated)
            .await
            .map_err(|source| NatsError::UpdateStream {
                stream: name.clone(),
                changes: changes.clone(),
                source,
            })?;
        tracing::info!(stream = %name, %changes, "Stream limits updated");
        return js
            .get_stream(&name)
            .await
            .map_err(|source| NatsError::StreamInfo {
                stream: name,
                source,
            });
    }
    // Only reached if the stream vanished again after "already exists": report as missing.
    Err(NatsError::StreamNotFound { stream: name })
}

/// `current` with deltasync's managed fields set as in `wanted`, and the list of changes.
fn merge_stream_config(
    mut current: stream::Config,
    wanted: &stream::Config,
) -> (stream::Config, Vec<String>) {
    let mut changes = Vec::new();
    macro_rules! manage {
        ($($field:ident),* $(,)?) => {$(
            if current.$field != wanted.$field {
                changes.push(format!(
                    "{}: {:?} -> {:?}",
                    stringify!($field),
                    current.$field,
                    wanted.$field
                ));
                current.$field = wanted.$field.clone();
            }
        )*};
    }
    manage!(
        subjects,
        retention,
        max_messages,
        max_bytes,
        max_age,
        num_replicas,
        storage,
        duplicate_window,
        discard,
        allow_direct,
        max_message_size,
    );
    (current, changes)
}

/// Creates the pipeline's snapshot bucket, or brings an existing one's settings (history,
/// value size, storage, replicas) to the settings. Returns the bucket handle.
pub async fn ensure_bucket(
    js: &jetstream::Context,
    settings: &Settings,
) -> Result<kv::Store, NatsError> {
    check_max_payload(js, settings)?;
    let wanted = bucket_config(settings);
    let bucket = wanted.bucket.clone();
    let stream_name = format!("KV_{bucket}");
    let current = match js.get_stream(&stream_name).await {
        Ok(stream) => stream.cached_info().config.clone(),
        Err(err) if is_stream_not_found(&err) => {
            return match js.create_key_value(wanted.clone()).await {
                Ok(store) => {
                    tracing::info!(
                        %bucket,
                        history = wanted.history,
                        max_value_size = wanted.max_value_size,
                        replicas = wanted.num_replicas,
                        "KV bucket created"
                    );
                    wait_readable(&store, &bucket, settings.nats.request_timeout).await?;
                    Ok(store)
                }
                Err(source) => Err(NatsError::CreateBucket { bucket, source }),
            };
        }
        Err(source) => {
            return Err(NatsError::StreamInfo {
                stream: stream_name,
                source,
            })
        }
    };
    let mut changes = Vec::new();
    let mut note = |field: &str, old: &dyn Debug, new: &dyn Debug, differs: bool| {
        if differs {
            changes.push(format!("{field}: {old:?} -> {new:?}"));
        }
    };
    let history = current.max_messages_per_subject;
    note(
        "history",
        &history,
        &wanted.history,
        history != wanted.history,
    );
    let size = current.max_message_size;
    note(
        "max_value_size",
        &size,
        &wanted.max_value_size,
        size != wanted.max_value_size,
    );
    note(
        "storage",
        &current.storage,
        &wanted.storage,
        current.storage != wanted.storage,
    );
    let replicas = current.num_replicas;
    note(
        "replicas",
        &replicas,
        &wanted.num_replicas,
        replicas != wanted.num_replicas,
    );
    if changes.is_empty() {
        tracing::debug!(%bucket, "KV bucket already up to date");
        return js
            .get_key_value(&bucket)
            .await
            .map_err(|source| NatsError::OpenBucket { bucket, source });
    }
    let changes = changes.join(", ");
    let store = js
        .update_key_value(wanted)
        .await
        .map_err(|source| NatsError::UpdateBucket {
            bucket: bucket.clone(),
            changes: changes.clone(),
            source,
        })?;
    tracing::info!(%bucket, %changes, "KV bucket updated");
    Ok(store)
}

/// A bucket just created answers reads only once its stream has a leader and, in a cluster,
/// its replicas serve direct gets; until then a read fails with 503 "no responders" (seen on
/// a fresh 3-node cluster). Polls one read of an absent key until it succeeds, within
/// `within`, so the first real read does not fail spuriously.
async fn wait_readable(store: &kv::Store, bucket: &str, within: Duration) -> Result<(), NatsError> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match store.entry("deltasync-ready-probe").await {
            Ok(_) => return Ok(()),
            Err(source) if tokio::time::Instant::now() >= deadline => {
                return Err(NatsError::BucketNotReady {
                    bucket: bucket.to_owned(),
                    within,
                    source,
                })
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Reads the envelope stream's bounds from the server (a fresh stream info request).
pub async fn stream_bounds(
    js: &jetstream::Context,
    settings: &Settings,
) -> Result<StreamBounds, NatsError> {
    let name = names::stream_name(&settings.pipeline);
    let stream = js.get_stream(&name).await.map_err(|err| {
        if is_stream_not_found(&err) {
            NatsError::StreamNotFound {
                stream: name.clone(),
            }
        } else {
            NatsError::StreamInfo {
                stream: name.clone(),
                source: err,
            }
        }
    })?;
    let state = &stream.cached_info().state;
    Ok(StreamBounds {
        first_seq: state.first_sequence,
        last_seq: state.last_sequence,
        messages: state.messages,
        bytes: state.bytes,
        first_ts: (state.messages > 0).then(|| SystemTime::from(state.first_timestamp)),
    })
}

/// The retention limits of a stream configuration.
pub fn stream_limits(config: &stream::Config) -> StreamLimits {
    let positive = |v: i64| u64::try_from(v).ok().filter(|v| *v > 0);
    let max_messages = match (
        positive(config.max_messages),
        positive(config.max_messages_per_subject),
    ) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    StreamLimits {
        max_messages,
        max_bytes: positive(config.max_bytes),
        max_age: (!config.max_age.is_zero()).then_some(config.max_age),
        discard_old: config.discard == DiscardPolicy::Old,
    }
}

/// Reads the envelope stream's bounds and its own retention limits in one stream info request.
pub async fn stream_bounds_and_limits(
    js: &jetstream::Context,
    settings: &Settings,
) -> Result<(StreamBounds, StreamLimits), NatsError> {
    let name = names::stream_name(&settings.pipeline);
    let stream = js.get_stream(&name).await.map_err(|err| {
        if is_stream_not_found(&err) {
            NatsError::StreamNotFound {
                stream: name.clone(),
            }
        } else {
            NatsError::StreamInfo {
                stream: name.clone(),
                source: err,
            }
        }
    })?;
    let info = stream.cached_info();
    let state = &info.state;
    let bounds = StreamBounds {
        first_seq: state.first_sequence,
        last_seq: state.last_sequence,
        messages: state.messages,
        bytes: state.bytes,
        first_ts: (state.messages > 0).then(|| SystemTime::from(state.first_timestamp)),
    };
    Ok((bounds, stream_limits(&info.config)))
}

/// The headroom of stream position `position` (the last stream sequence applied) in a stream
/// with bounds `b` and its own `limits`. With an age limit and messages after the position,
/// asks the server when the next one was stored (one direct get).
pub async fn position_headroom<I>(
    stream: &jetstream::stream::Stream<I>,
    subject: &str,
    b: &StreamBounds,
    limits: &StreamLimits,
    position: u64,
    now: std::time::SystemTime,
) -> PositionHeadroom {
    let (rate, oldest_age) = retention::rate_and_oldest_age(b, now);
    let lag = b.last_seq.saturating_sub(position);
    let pruned = b.messages > 0 && position + 1 < b.first_seq;
    // The age of the first message after the position decides when age retention prunes it
    // (stored time on the server).
    let next_age = if lag > 0 && limits.max_age.is_some() {
        match stream
            .direct_get_next_for_subject(subject.to_owned(), Some(position + 1))
            .await
        {
            Ok(m) => {
                let stored = std::time::SystemTime::from(m.time);
                Some(now.duration_since(stored).map_or(0.0, |d| d.as_secs_f64()))
            }
            Err(_) => oldest_age,
        }
    } else {
        None
    };
    let h = retention::headroom(limits, b.messages, b.bytes, lag, rate, next_age);
    PositionHeadroom {
        lag,
        pruned,
        headroom: if pruned {
            Headroom {
                messages: Some(0),
                secs: Some(0.0),
                limit: h.limit,
            }
        } else {
            h
        },
    }
}

/// Refuses a `max_message_bytes` the connected server would never carry.
fn check_max_payload(js: &jetstream::Context, settings: &Settings) -> Result<(), NatsError> {
    let max_payload = js.client().server_info().max_payload;
    let wanted = settings.stream.max_message_bytes;
    if usize::try_from(wanted).map_or(true, |w| w > max_payload) {
        return Err(NatsError::MaxPayload {
            max_message_bytes: wanted,
            max_payload,
        });
    }
    Ok(())
}

fn is_stream_not_found(err: &GetStreamError) -> bool {
    matches!(err.kind(), GetStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

fn jetstream_code(
    kind: &async_nats::jetstream::context::CreateStreamErrorKind,
) -> Option<ErrorCode> {
    match kind {
        async_nats::jetstream::context::CreateStreamErrorKind::JetStream(e) => Some(e.error_code()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::field_reassign_with_default)]

    use super::*;

    #[test]
    fn the_stream_config_carries_every_managed_setting() {
        let mut settings = Settings::default();
        settings.pipeline = "p1".to_owned();
        settings.stream.storage = StorageKind::Memory;
        let c = stream_config(&settings);
        assert_eq!(c.name, "DELTASYNC_p1");
        assert_eq!(c.subjects, ["deltasync.p1.envelopes"]);
        assert_eq!(c.max_messages, settings.stream.max_messages);
        assert_eq!(c.max_bytes, settings.stream.max_bytes);
        assert_eq!(c.max_age, settings.stream.max_age);
        assert_eq!(c.duplicate_window, settings.stream.duplicate_window);
        assert_eq!(c.storage, StorageType::Memory);
        assert_eq!(c.discard, DiscardPolicy::Old);
        assert_eq!(c.retention, RetentionPolicy::Limits);
        assert!(c.allow_direct);
        assert_eq!(c.max_message_size, settings.stream.max_message_bytes);
    }

    #[test]
    fn merging_keeps_unmanaged_fields_and_lists_the_changes() {
        let settings = Settings::default();
        let wanted = stream_config(&settings);
        let mut current = wanted.clone();
        current.max_messages = 5;
        current.max_consumers = 7;
        current.deny_delete = true;
        let (merged, changes) = merge_stream_config(current, &wanted);
        assert_eq!(merged.max_messages, wanted.max_messages);
        assert_eq!(merged.max_consumers, 7);
        assert!(merged.deny_delete);
        assert_eq!(
            changes,
            [format!("max_messages: 5 -> {}", wanted.max_messages)]
        );
        let (_, none) = merge_stream_config(wanted.clone(), &wanted);
        assert!(none.is_empty());
    }

    #[test]
    fn stream_limits_come_from_the_stream_config_and_take_the_tighter_count() {
        let mut c = stream_config(&Settings::default());
        c.max_messages = 1000;
        c.max_messages_per_subject = 400;
        c.max_bytes = -1;
        c.max_age = Duration::ZERO;
        let l = stream_limits(&c);
        assert_eq!(l.max_messages, Some(400));
        assert_eq!((l.max_bytes, l.max_age), (None, None));
        assert!(l.discard_old);
        c.max_messages = -1;
        c.max_messages_per_subject = 0;
        c.max_bytes = 4 << 20;
        c.max_age = Duration::from_secs(10);
        c.discard = DiscardPolicy::New;
        let l = stream_limits(&c);
        assert_eq!(l.max_messages, None);
        assert_eq!(l.max_bytes, Some(4 << 20));
        assert_eq!(l.max_age, Some(Duration::from_secs(10)));
        assert!(!l.discard_old);
    }
}
