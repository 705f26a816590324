//! Validating settings once at start-up: [`Settings::validate`] refuses settings that parse
//! but cannot work (a batch or chunk that does not fit a message, retention shorter than two
//! snapshot intervals, incomplete authentication, missing files), naming the key at fault
//! and what would work, before anything connects to NATS.
//!
//! Talks to the file system only to check that configured files exist.

use super::{
    redact_url, Settings, SettingsError, ENVELOPE_STREAM_OVERHEAD, MAX_CHANGE_BYTES,
    MESSAGE_OVERHEAD_MARGIN,
};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

impl Settings {
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
            ("nats.nkey_file", nats.nkey_file.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect();
        if methods.len() > 1 {
            return Err(SettingsError::invalid(
                &methods.join(" / "),
                "choose one authentication method: user/password, token, creds_file, nkey_seed \
                 or nkey_file",
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
        require_file("nats.nkey_file", nats.nkey_file.as_deref())?;
        if let Some(domain) = &nats.jetstream_domain {
            if domain.is_empty()
                || !domain
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(SettingsError::invalid(
                    "nats.jetstream_domain",
                    format!("{domain:?} is not a JetStream domain (A-Z a-z 0-9 _ -)"),
                ));
            }
        }
        if nats.retry_on_initial_connect && nats.initial_connect_wait.is_zero() {
            return Err(SettingsError::invalid(
                "nats.initial_connect_wait",
                "is 0 while nats.retry_on_initial_connect is on: give the retrying a bound",
            ));
        }
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
        if p.api_max_body_bytes == 0 {
            return Err(SettingsError::invalid(
                "producer.api_max_body_bytes",
                "must be > 0 (the largest request body the write API accepts)",
            ));
        }
        if p.api_idempotency_max_keys == 0 {
            return Err(SettingsError::invalid(
                "producer.api_idempotency_max_keys",
                "must be > 0 (Idempotency-Keys remembered at once)",
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
        if c.local_snapshot_log_bytes == 0 {
            return Err(SettingsError::invalid(
                "consumer.local_snapshot_log_bytes",
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
        if c.watch_keepalive.is_zero() {
            return Err(SettingsError::invalid(
                "consumer.watch_keepalive",
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::field_reassign_with_default)]

    use super::*;
    use crate::settings::schema::MIB;
    use crate::settings::testing::load_env;
    use crate::settings::*;
    use std::path::PathBuf;

    /// Defaults with one change, validated.
    fn invalid_key(change: impl FnOnce(&mut Settings)) -> String {
        let mut s = Settings::default();
        change(&mut s);
        match s.validate() {
            Err(SettingsError::Invalid { key, .. }) => key,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn a_watch_keepalive_of_zero_is_refused() {
        assert_eq!(
            invalid_key(|s| s.consumer.watch_keepalive = std::time::Duration::ZERO),
            "consumer.watch_keepalive"
        );
    }

    #[test]
    fn the_defaults_validate() {
        Settings::default().validate().unwrap();
        assert_eq!(load_env(&[]).unwrap(), Settings::default());
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
            invalid_key(|s| s.producer.api_max_body_bytes = 0),
            "producer.api_max_body_bytes"
        );
        assert_eq!(
            invalid_key(|s| s.producer.api_idempotency_max_keys = 0),
            "producer.api_idempotency_max_keys"
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
}
