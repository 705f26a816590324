//! The shutdown token both binaries' `main` owns: cancelled at the first Ctrl-C or SIGTERM
//! (`docker compose stop` sends SIGTERM), after logging which one and what happens next.
//! Every task of a binary watches this one token; the binary then finishes cleanly (the
//! producer awaits its outstanding acknowledgements, the consumer commits its replica).
//!
//! Talks to the operating system's signals (through tokio) and to the log.

use tokio_util::sync::CancellationToken;

/// A signal that asks the process to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT, from Ctrl-C in a terminal.
    Interrupt,
    /// SIGTERM, from `docker compose stop`, `kill` or a service manager.
    Terminate,
}

impl Signal {
    /// How the log names it.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Interrupt => "Ctrl-C",
            Signal::Terminate => "SIGTERM",
        }
    }
}

/// Resolves at the first Ctrl-C or SIGTERM. Where SIGTERM cannot be listened for (not Unix,
/// or the handler cannot be installed: logged as a warning), only Ctrl-C.
pub async fn signalled() -> Signal {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "Cannot listen for SIGTERM; only Ctrl-C stops cleanly");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => Signal::Interrupt,
        () = term => Signal::Terminate,
    }
}

/// The shutdown token: a task on the current tokio runtime cancels it at the first Ctrl-C or
/// SIGTERM, logging `<signal>: <then>` (e.g. `SIGTERM: stopping input, awaiting
/// acknowledgements`). Call it from inside the runtime, once, in `main`.
pub fn token(then: &'static str) -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let signal = signalled().await;
        tracing::info!(signal = signal.name(), "{}: {then}", signal.name());
        cancel.cancel();
    });
    token
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn signals_are_logged_by_the_names_operators_type() {
        assert_eq!(Signal::Interrupt.name(), "Ctrl-C");
        assert_eq!(Signal::Terminate.name(), "SIGTERM");
    }

    #[tokio::test]
    async fn the_token_stays_uncancelled_until_a_signal_arrives() {
        let token = token("stopping");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!token.is_cancelled());
    }
}
