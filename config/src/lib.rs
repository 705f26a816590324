//! What both deltasync binaries read and set up at start: `settings` (defaults, file,
//! environment and flags, validated into one [`settings::Settings`]), `telemetry` (logging)
//! and `shutdown` (the token Ctrl-C and SIGTERM cancel); what they show while working:
//! `progress` (bars on a terminal only) and `process_metrics` (the `process_*` metrics of
//! `/metrics`); and what they do at the end: `exit` (one error
//! format, exit codes).

pub mod exit;
pub mod process_metrics;
pub mod progress;
pub mod settings;
pub mod shutdown;
pub mod telemetry;
