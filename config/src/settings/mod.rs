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
//! NATS habits         a `nats` CLI context (--context NAME or NATS_CONTEXT), then NATS_URL,
//!                     NATS_CREDS, NATS_USER, ... over it (see `nats_env`)
//! TOML file           (--config / Settings::load's `config_file`)
//! environment         DELTASYNC_<SECTION>__<KEY>, e.g. DELTASYNC_STREAM__MAX_MESSAGES=5000
//!                     DELTASYNC_PIPELINE (top-level keys have no section)
//! CLI overrides       --nats-url, --pipeline (and --context, which picks the context)
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
//!
//! ## Files
//!
//! - `schema`: the settings structs, their defaults and one doc comment per field: what a
//!   setting is.
//! - `load`: the layering above (file, environment, flags), refusing unknown keys.
//! - `nats_env`: the NATS context and `NATS_*` variables, mapped to settings.
//! - `validate`: [`Settings::validate`], refusing settings that parse but cannot work.

mod load;
pub mod nats_env;
mod schema;
mod validate;

pub use load::{env_var_name, EnvVars, Overrides, Sources, CONFIG_FILE_ENV, ENV_PREFIX};
pub use schema::{
    ConsumerSettings, LogFormat, LogSettings, NatsSettings, OnLostHistory, ProducerSettings,
    Secret, Settings, SnapshotSettings, StorageKind, StreamSettings, TlsSettings,
    ENVELOPE_STREAM_OVERHEAD, MAX_CHANGE_BYTES, MESSAGE_OVERHEAD_MARGIN,
};

use config::ConfigError;

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

/// Loading helpers the tests of `load` and `validate` share.
#[cfg(test)]
mod testing {
    use super::*;

    pub(super) fn env(vars: &[(&str, &str)]) -> EnvVars {
        EnvVars::Map(
            vars.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    pub(super) fn load_env(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        Settings::load_from(Sources {
            env: env(vars),
            ..Sources::default()
        })
    }

    pub(super) fn load_toml(text: &str) -> Result<Settings, SettingsError> {
        Settings::load_from(Sources {
            toml: Some(text),
            env: env(&[]),
            ..Sources::default()
        })
    }
}
