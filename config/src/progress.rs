//! Progress bars for the binaries' long commands (`replay`, `verify`, `rebuild`, `ingest`,
//! `snapshot`, `run --once`), drawn on stderr only when it is a terminal, so pipes, log files and
//! `docker compose logs` get none of their control codes.
//!
//! Talks to stderr through indicatif.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

/// A bar of `len` steps counting `unit`s, labelled `what`; hidden unless stderr is a terminal.
pub fn bar(what: &str, len: u64, unit: &str) -> ProgressBar {
    let template = format!(
        "{{msg}} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit} ({{per_sec}}, {{eta}} left)"
    );
    let style = ProgressStyle::with_template(&template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let bar = ProgressBar::with_draw_target(Some(len), target()).with_style(style);
    bar.set_message(what.to_owned());
    bar
}

/// A bar of `len` bytes (shown as KiB, MiB...), labelled `what`; hidden unless stderr is a
/// terminal. Without a length (a pipe), a counter of bytes.
pub fn bytes_bar(what: &str, len: Option<u64>) -> ProgressBar {
    let template = match len {
        Some(_) => "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, {eta} left)",
        None => "{spinner} {msg} {binary_bytes} ({binary_bytes_per_sec})",
    };
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let bar = ProgressBar::with_draw_target(len, target()).with_style(style);
    bar.set_message(what.to_owned());
    bar
}

/// A counter of `unit`s of unknown total, labelled `what`; hidden unless stderr is a terminal.
pub fn spinner(what: &str, unit: &str) -> ProgressBar {
    let template = format!("{{spinner}} {{msg}} {{human_pos}} {unit} ({{per_sec}})");
    let style = ProgressStyle::with_template(&template)
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let bar = ProgressBar::with_draw_target(None, target()).with_style(style);
    bar.set_message(what.to_owned());
    bar
}

/// A spinner for work with no measure, labelled `what`, ticking by itself, with the time
/// spent; hidden unless stderr is a terminal.
pub fn working(what: &str) -> ProgressBar {
    let style = ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let bar = ProgressBar::with_draw_target(None, target()).with_style(style);
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

fn target() -> ProgressDrawTarget {
    if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_hidden_when_stderr_is_not_a_terminal() {
        // The test harness captures stderr (a pipe), as CI and `docker compose logs` do.
        if !std::io::stderr().is_terminal() {
            assert!(bar("reading", 10, "messages").is_hidden());
            assert!(spinner("reading", "lines").is_hidden());
            assert!(bytes_bar("reading", Some(10)).is_hidden());
            assert!(bytes_bar("reading", None).is_hidden());
            assert!(working("reading").is_hidden());
        }
        let b = bar("reading", 10, "messages");
        b.inc(3);
        assert_eq!(b.position(), 3);
    }
}
