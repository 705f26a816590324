//! Loading settings: built-in defaults, then an optional TOML file, then `DELTASYNC_...`
//! environment variables, then command-line overrides (see the layers in `settings`),
//! refusing keys no setting has, then [`Settings::validate`].
//!
//! Talks to the file system (the settings file) and the process environment, through the
//! `config` crate; to nothing on the network.

use super::{nats_env, Settings, SettingsError};
use config::{Config, ConfigError, Environment, File, FileFormat, Value, ValueKind};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// Prefix of every environment variable read as a setting (`DELTASYNC_...`).
pub const ENV_PREFIX: &str = "DELTASYNC";

/// Environment variable the binaries read the settings file path from; never a setting itself.
pub const CONFIG_FILE_ENV: &str = "DELTASYNC_CONFIG";

/// Command-line flags that override every other layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--nats-url`.
    pub nats_url: Option<String>,
    /// `--pipeline`.
    pub pipeline: Option<String>,
    /// `--context`: a `nats` CLI context to read (over `NATS_CONTEXT`).
    pub context: Option<String>,
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
    // The NATS habits, just above the built-in defaults (which are serde's, outside the
    // builder): a context, then NATS_* variables.
    let context = nats_env::read_context(sources.overrides.context.as_deref(), &vars)?;
    for entry in nats_env::layer(context.as_ref(), &vars)? {
        let value = Value::new(Some(&entry.origin), ValueKind::String(entry.value));
        builder = builder
            .set_default(entry.key, value)
            .map_err(|err| load_error(err, &Value::new(None, ValueKind::Nil)))?;
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::field_reassign_with_default)]

    use super::*;
    use crate::settings::testing::{env, load_env, load_toml};
    use crate::settings::*;
    use std::path::PathBuf;
    use std::time::Duration;

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
feed_max_bytes = 0
watch_keepalive = "5s"

[log]
format = "json"
filter = "info,deltasync=debug"
"#;

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
        assert_eq!(s.consumer.feed_max_bytes, 0, "0 turns the feed off");
        assert_eq!(s.consumer.watch_keepalive, Duration::from_secs(5));
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
                context: None,
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

    /// Writes a `nats` CLI context the way `nats context save` does (every field, unset
    /// ones empty) under `home`/.config/nats/context/`name`.json.
    fn write_context(home: &Path, name: &str, url: &str, creds: &Path) {
        let dir = home.join(".config/nats/context");
        std::fs::create_dir_all(&dir).unwrap();
        let json = serde_json::json!({
            "description": "", "url": url, "socks_proxy": "", "token": "", "user": "",
            "password": "", "creds": creds, "nkey": "", "cert": "", "key": "", "ca": "",
            "nsc": "", "jetstream_domain": "hub", "jetstream_api_prefix": "",
            "jetstream_event_prefix": "", "inbox_prefix": "", "user_jwt": "",
            "color_scheme": "", "tls_first": false, "windows_cert_store": "",
            "windows_cert_match_by": "", "windows_cert_match": "", "windows_ca_certs_match": []
        });
        std::fs::write(dir.join(format!("{name}.json")), json.to_string()).unwrap();
    }

    #[test]
    fn a_nats_context_and_nats_variables_sit_under_the_file_and_deltasync_variables() {
        let home = tempfile::tempdir().unwrap();
        let creds = home.path().join("user.creds");
        std::fs::write(&creds, "not checked until connecting").unwrap();
        write_context(home.path(), "orders", "nats://from-context:4222", &creds);
        let home_var = ("HOME", home.path().to_str().unwrap());

        // The context alone: its URL, creds and domain.
        let s = Settings::load_from(Sources {
            env: env(&[home_var, ("NATS_CONTEXT", "orders")]),
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(s.nats.url, "nats://from-context:4222");
        assert_eq!(s.nats.creds_file.as_deref(), Some(creds.as_path()));
        assert_eq!(s.nats.jetstream_domain.as_deref(), Some("hub"));

        // NATS_URL over the context; the file over NATS_URL; DELTASYNC_ over the file.
        let vars = [
            home_var,
            ("NATS_CONTEXT", "orders"),
            ("NATS_URL", "nats://from-nats-url:4222"),
        ];
        let s = Settings::load_from(Sources {
            env: env(&vars),
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(s.nats.url, "nats://from-nats-url:4222");
        let file = "[nats]\nurl = \"nats://from-file:4222\"\n";
        let s = Settings::load_from(Sources {
            toml: Some(file),
            env: env(&vars),
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(s.nats.url, "nats://from-file:4222");
        let mut with_ours = vars.to_vec();
        with_ours.push(("DELTASYNC_NATS__URL", "nats://from-deltasync:4222"));
        let s = Settings::load_from(Sources {
            toml: Some(file),
            env: env(&with_ours),
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(s.nats.url, "nats://from-deltasync:4222");
        assert_eq!(
            s.nats.creds_file.as_deref(),
            Some(creds.as_path()),
            "the rest stays"
        );

        // --context picks another context over NATS_CONTEXT.
        write_context(home.path(), "staging", "nats://staging:4222", &creds);
        let s = Settings::load_from(Sources {
            env: env(&[home_var, ("NATS_CONTEXT", "orders")]),
            overrides: Overrides {
                context: Some("staging".into()),
                ..Overrides::default()
            },
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(s.nats.url, "nats://staging:4222");
    }

    #[test]
    fn a_missing_context_or_a_bad_value_from_one_names_where_it_came_from() {
        let home = tempfile::tempdir().unwrap();
        let home_var = ("HOME", home.path().to_str().unwrap());
        let err = Settings::load_from(Sources {
            env: env(&[home_var, ("NATS_CONTEXT", "nope")]),
            ..Sources::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("NATS_CONTEXT names context \"nope\""), "{err}");
        assert!(err.contains("nope.json"), "{err}");

        // A creds file that does not exist, from NATS_CREDS: validation names the setting.
        let err = Settings::load_from(Sources {
            env: env(&[("NATS_CREDS", "/nonexistent/x.creds")]),
            ..Sources::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("nats.creds_file") && err.contains("/nonexistent/x.creds"),
            "{err}"
        );
    }
}
