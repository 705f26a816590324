//! What both deltasync binaries read and set up at start: `settings` (defaults, file,
//! environment and flags, validated into one [`settings::Settings`]) and `telemetry` (logging).

pub mod settings;
pub mod telemetry;
