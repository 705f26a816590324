//! How both binaries end: one error format and exit codes that tell "found a problem" from
//! "could not run".
//!
//! Talks to stderr only (the error line); the code is returned to `main`.
//!
//! ```text
//! 0  done
//! 1  could not run: bad flags or settings, NATS unreachable or refusing, I/O, interrupted
//! 2  ran and found a problem (a Finding), e.g. `verify` found the history diverging
//! ```
//!
//! The error line is `deltasync-<bin>: error: <what> : <cause> : <cause>…`, the whole cause
//! chain on one line, so a log collector keeps it together and a script can match it.

use std::process::ExitCode;

/// The exit status of a command that ran and found a problem.
pub const FOUND_A_PROBLEM: u8 = 2;

/// The exit status of a command that could not run.
pub const COULD_NOT_RUN: u8 = 1;

/// An error meaning "the command ran and found a problem", which exits with
/// [`FOUND_A_PROBLEM`] instead of [`COULD_NOT_RUN`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Finding(pub String);

/// The exit code for `result`, printing an error as `bin: error: …` with its causes.
pub fn exit(bin: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{bin}: error: {}", line(&e));
            ExitCode::from(code_of(&e))
        }
    }
}

/// `e` and its causes joined with ": ", each cause left out when the text before it already
/// ends with it (an error whose message names its source, as many do, would print it twice).
pub fn line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.is_empty() {
            out = text;
        } else if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

/// [`FOUND_A_PROBLEM`] when a [`Finding`] is anywhere in the chain, else [`COULD_NOT_RUN`].
pub fn code_of(e: &anyhow::Error) -> u8 {
    if e.chain().any(|c| c.is::<Finding>()) {
        FOUND_A_PROBLEM
    } else {
        COULD_NOT_RUN
    }
}

/// Parses the command line like `clap::Parser::parse`, except that a usage error exits with
/// [`COULD_NOT_RUN`] (clap's own is 2, which here means "found a problem"); `--help` and
/// `--version` print and exit 0 as usual.
pub fn parse_args<P: clap::Parser>() -> P {
    match P::try_parse() {
        Ok(p) => p,
        Err(e) => {
            let _ = e.print();
            let code = if e.use_stderr() { COULD_NOT_RUN } else { 0 };
            std::process::exit(i32::from(code));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_line_names_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("writing replica /d/log.1: {source}")]
        struct Write {
            source: std::io::Error,
        }
        let io = || std::io::Error::other("File too large");
        let e = anyhow::Error::new(Write { source: io() });
        assert_eq!(line(&e), "writing replica /d/log.1: File too large");
        let e = anyhow::Error::new(io()).context("opening /d");
        assert_eq!(line(&e), "opening /d: File too large");
        let e = anyhow::Error::new(Write { source: io() }).context("running the consumer");
        assert_eq!(
            line(&e),
            "running the consumer: writing replica /d/log.1: File too large"
        );
    }

    #[test]
    fn a_finding_anywhere_in_the_chain_is_a_problem_found_else_could_not_run() {
        let found = anyhow::Error::new(Finding("diverges at 7".into())).context("verifying");
        assert_eq!(code_of(&found), FOUND_A_PROBLEM);
        assert_eq!(found.to_string(), "verifying");
        assert_eq!(format!("{found:#}"), "verifying: diverges at 7");
        let failed = anyhow::anyhow!("connection refused").context("connecting");
        assert_eq!(code_of(&failed), COULD_NOT_RUN);
    }
}
