//! Process-wide logging set-up: installs the `tracing` subscriber the binaries log through.
//!
//! Talks to stderr only. The filter comes from `RUST_LOG` when that is set, else from
//! `log.filter` in the settings; the format is human-readable text or one JSON object per
//! line (`log.format`). Text is coloured only on a terminal, and never when `NO_COLOR` is set
//! (<https://no-color.org>): `docker compose logs` and log files get plain text.

use crate::settings::{LogFormat, LogSettings};
use tracing_subscriber::EnvFilter;

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The filter directives (from `RUST_LOG` or `log.filter`) do not parse.
    #[error("invalid log filter {filter:?} (from {origin})")]
    Filter {
        /// The directives as given.
        filter: String,
        /// `RUST_LOG` or `log.filter`.
        origin: &'static str,
        /// The parser's complaint.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
}

/// Installs the global subscriber. Returns `Ok` also when one is already installed (a second
/// call, or tests sharing a process), leaving the first in place.
pub fn init(log: &LogSettings) -> Result<(), TelemetryError> {
    let filter = filter(log, std::env::var("RUST_LOG").ok())?;
    let colour = use_colour(
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    // `try_init` fails only when a global subscriber already exists: not fatal.
    let _already_set = match log.format {
        LogFormat::Text => builder.try_init().is_err(),
        LogFormat::Json => builder.json().try_init().is_err(),
    };
    Ok(())
}

/// Whether text logs are coloured: on a terminal, unless `NO_COLOR` is set to anything but
/// the empty string.
fn use_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The filter to use: `rust_log` when set and non-empty, else `log.filter`.
fn filter(log: &LogSettings, rust_log: Option<String>) -> Result<EnvFilter, TelemetryError> {
    let (directives, origin) = match rust_log {
        Some(value) if !value.trim().is_empty() => (value, "RUST_LOG"),
        _ => (log.filter.clone(), "log.filter"),
    };
    EnvFilter::builder()
        .parse(&directives)
        .map_err(|source| TelemetryError::Filter {
            filter: directives,
            origin,
            source,
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn rust_log_overrides_the_configured_filter() {
        let log = LogSettings {
            filter: "warn".to_owned(),
            ..LogSettings::default()
        };
        let f = filter(&log, Some("debug".to_owned())).unwrap();
        assert_eq!(f.to_string(), "debug");
        let f = filter(&log, None).unwrap();
        assert_eq!(f.to_string(), "warn");
        let f = filter(&log, Some(String::new())).unwrap();
        assert_eq!(f.to_string(), "warn");
    }

    #[test]
    fn logs_are_coloured_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some(OsStr::new(""))));
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(false, None));
        assert!(!use_colour(false, Some(OsStr::new("1"))));
    }

    #[test]
    fn a_bad_filter_is_refused_naming_its_origin() {
        let log = LogSettings {
            filter: "info,[".to_owned(),
            ..LogSettings::default()
        };
        let err = filter(&log, None).unwrap_err();
        assert!(err.to_string().contains("log.filter"), "{err}");
        let err = filter(&LogSettings::default(), Some("info,[".to_owned())).unwrap_err();
        assert!(err.to_string().contains("RUST_LOG"), "{err}");
    }

    #[test]
    fn init_twice_is_not_fatal() {
        init(&LogSettings::default()).unwrap();
        init(&LogSettings {
            format: LogFormat::Json,
            ..LogSettings::default()
        })
        .unwrap();
    }
}
