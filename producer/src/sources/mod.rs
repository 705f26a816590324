//! Producer sources: what `deltasync-producer run --source <NAME>` drives. One folder per
//! source (`orderbook/`), each implementing [`Source`]: its name, its flags (a `clap::Args`
//! struct) and how it runs a producer. The CLI dispatches by name through [`SOURCES`].
//!
//! Talks to a [`crate::Producer`] only.
//!
//! ## Adding a source
//!
//! A folder `sources/<name>/` whose `mod.rs` defines a `clap::Args` struct implementing
//! [`Source`], and its line in the `sources!` list below. Every source's flags are accepted
//! by `run` (each under its own help heading): a source names its flags so that they cannot
//! clash with another's (clap refuses two flags of one name when the CLI is built, which the
//! CLI's tests do).

use crate::producer::Producer;
use clap::builder::{PossibleValue, PossibleValuesParser};
use clap::{ArgMatches, FromArgMatches};
use std::future::Future;
use std::pin::Pin;
use tokio_util::sync::CancellationToken;

/// A source of changes for a producer.
pub trait Source: clap::Args + Sized + 'static {
    /// Its name on the command line (`run --source <NAME>`).
    const NAME: &'static str;
    /// One line for `--help`.
    const ABOUT: &'static str;
    /// Hands changes to `producer` until the source is done or `cancel` fires. The caller
    /// shuts the producer down afterwards (awaiting every acknowledgement), also when this
    /// fails.
    fn run(
        self,
        producer: &Producer,
        cancel: CancellationToken,
    ) -> impl Future<Output = anyhow::Result<()>>;
}

/// The registered sources, in `--help` order. A new source is one line here (and its folder).
macro_rules! sources {
    ($($module:ident :: $source:ident),* $(,)?) => {
        $(pub mod $module;)*

        /// Every source `run --source` knows.
        pub static SOURCES: &[Registered] = &[$(Registered::of::<$module::$source>()),*];
    };
}

sources! {
    orderbook::OrderbookSource,
}

/// What runs a source: its flags parsed from `run`'s matches, then [`Source::run`].
type RunFn = for<'a> fn(
    &'a ArgMatches,
    &'a Producer,
    CancellationToken,
) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + 'a>>;

/// A source as the CLI sees it: a name, help, flags and a way to run it.
#[derive(Debug)]
pub struct Registered {
    /// `--source` value.
    pub name: &'static str,
    /// One line for `--help`.
    pub about: &'static str,
    /// Adds the source's flags to `run`.
    args: fn(clap::Command) -> clap::Command,
    run: RunFn,
}

impl Registered {
    const fn of<S: Source>() -> Registered {
        Registered {
            name: S::NAME,
            about: S::ABOUT,
            args: S::augment_args,
            run: run_source::<S>,
        }
    }
}

fn run_source<'a, S: Source>(
    matches: &'a ArgMatches,
    producer: &'a Producer,
    cancel: CancellationToken,
) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + 'a>> {
    Box::pin(async move {
        let source = S::from_arg_matches(matches)?;
        source.run(producer, cancel).await
    })
}

/// The registered source called `name`.
pub fn find(name: &str) -> Option<&'static Registered> {
    SOURCES.iter().find(|s| s.name == name)
}

/// The `--source` values, with their help.
pub fn names() -> PossibleValuesParser {
    PossibleValuesParser::new(
        SOURCES
            .iter()
            .map(|s| PossibleValue::new(s.name).help(s.about)),
    )
}

/// Every registered source's flags, parsed as `run` was given them; [`run`] hands them to the
/// source chosen.
#[derive(Debug, Clone, Default)]
pub struct SourceFlags(ArgMatches);

impl SourceFlags {
    /// The flags of source `S`.
    pub fn parse<S: Source>(&self) -> Result<S, clap::Error> {
        S::from_arg_matches(&self.0)
    }
}

impl FromArgMatches for SourceFlags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(SourceFlags(matches.clone()))
    }
    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        self.0 = matches.clone();
        Ok(())
    }
}

impl clap::Args for SourceFlags {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        SOURCES.iter().fold(cmd, |cmd, s| (s.args)(cmd))
    }
    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// Runs the source called `name` with its flags from `flags`.
pub async fn run(
    name: &str,
    flags: &SourceFlags,
    producer: &Producer,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let Some(source) = find(name) else {
        anyhow::bail!("no source named {name:?}");
    };
    (source.run)(&flags.0, producer, cancel).await
}
