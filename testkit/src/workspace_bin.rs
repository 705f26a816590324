//! The workspace's own binaries (`deltasync-producer`, `deltasync-consumer`) for tests that run
//! them as child processes from another package, built from the current sources.
//!
//! Talks to cargo (`$CARGO`, else `cargo` on `PATH`), run once per test process, and to the
//! target directory the running test executable was built in. Cargo hands an integration test
//! only its own package's binaries (`CARGO_BIN_EXE_<name>`); this is the way for the others.
//!
//! ## Invariants
//! - Never a stale binary: before the first path is handed out, `cargo build` has run for the
//!   test's own target directory and profile and succeeded, so cargo's fingerprints decide
//!   what is up to date. A failed or impossible build panics (the test fails) with the command
//!   to run by hand.
//! - One build per process, under a lock: concurrent tests of one process wait for the first;
//!   concurrent processes (nextest runs each test in its own) are serialised by cargo's lock on
//!   the build directory.
//! - The build resolves features as `cargo test --workspace` and `cargo nextest run
//!   --workspace` do (see [`build_args`]), so after those runs it finds everything up to date
//!   and re-links nothing under tests that are running the binaries.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

/// The binaries [`workspace_bin`] provides; one build makes all of them.
pub const WORKSPACE_BINS: &[&str] = &["deltasync-producer", "deltasync-consumer"];

/// Where a test executable was built: `<target_dir>[/<triple>]/<profile_dir>/deps/<test>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The target directory (the default `target/`, or `CARGO_TARGET_DIR` / `--target-dir`).
    pub target_dir: PathBuf,
    /// The `--target` triple when the tests were built with one.
    pub triple: Option<String>,
    /// `debug` (the dev and test profiles), `release` (release, bench) or a custom profile.
    pub profile_dir: String,
}

impl Layout {
    /// The layout of the test executable `exe`. `is_target_root(dir)` says whether `dir` is
    /// the root of a target directory (cargo writes `CACHEDIR.TAG` there, and also in
    /// `<target-dir>/<triple>/`; so a profile directory below a root that itself sits below a
    /// root is the cross-compilation layout).
    pub fn from_test_exe(
        exe: &Path,
        is_target_root: impl Fn(&Path) -> bool,
    ) -> Result<Layout, String> {
        let unknown = || {
            format!(
                "cannot tell the target directory from the test executable {}: expected \
                 <target-dir>/<profile>/deps/<test>",
                exe.display()
            )
        };
        let deps = exe.parent().ok_or_else(unknown)?;
        if deps.file_name().is_none_or(|n| n != "deps") {
            return Err(unknown());
        }
        let profile = deps.parent().ok_or_else(unknown)?;
        let profile_dir = profile
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(unknown)?
            .to_owned();
        let above = profile.parent().ok_or_else(unknown)?;
        let cross = above
            .parent()
            .filter(|root| is_target_root(root) && is_target_root(above))
            .zip(above.file_name().and_then(|n| n.to_str()));
        Ok(match cross {
            Some((root, triple)) => Layout {
                target_dir: root.to_path_buf(),
                triple: Some(triple.to_owned()),
                profile_dir,
            },
            None => Layout {
                target_dir: above.to_path_buf(),
                triple: None,
                profile_dir,
            },
        })
    }

    /// The cargo profile the tests in `profile_dir` were built with: `debug` is `test` (what
    /// `cargo test` and nextest build with; `dev` writes to the same directory but would build
    /// and re-link a copy of its own), any other directory is named after its profile
    /// (`cargo test --release` builds with `release`).
    pub fn profile(&self) -> &str {
        match self.profile_dir.as_str() {
            "debug" => "test",
            other => other,
        }
    }

    /// Where cargo puts binary `name` in this layout.
    pub fn bin_path(&self, name: &str) -> PathBuf {
        let mut path = self.target_dir.clone();
        if let Some(triple) = &self.triple {
            path.push(triple);
        }
        path.push(&self.profile_dir);
        path.push(name);
        path
    }
}

/// The arguments of the `cargo` command that builds `bins` into `layout`.
///
/// `--workspace --examples` is there for the feature resolution, not for the examples: with
/// any example or test selected, cargo resolves features with the dev-dependencies of every
/// selected package, exactly as `cargo test --workspace` and `cargo nextest run --workspace`
/// do, so the binaries those runs just built are up to date (the examples too: they build
/// them). Without it (`-p deltasync-producer -p deltasync-consumer --bins`), dev-dependencies
/// elsewhere in the workspace (nats-jwt-rs in nats/, criterion in core/) turn on other features
/// of shared crates, and cargo builds a second copy of every workspace library and re-links
/// `target/<profile>/deltasync-*` under the other crates' tests that are running them.
pub fn build_args(layout: &Layout, bins: &[&str]) -> Vec<OsString> {
    let mut args: Vec<OsString> = ["build", "--workspace", "--examples"]
        .into_iter()
        .map(OsString::from)
        .collect();
    for bin in bins {
        args.push("--bin".into());
        args.push((*bin).into());
    }
    args.push("--profile".into());
    args.push(layout.profile().into());
    args.push("--target-dir".into());
    args.push(layout.target_dir.clone().into_os_string());
    if let Some(triple) = &layout.triple {
        args.push("--target".into());
        args.push(triple.into());
    }
    args
}

/// Path of the workspace binary `name` (one of [`WORKSPACE_BINS`]) in the target directory and
/// profile of the running test executable, built from the current sources.
///
/// The first call in a process runs `$CARGO build` (see [`build_args`]) at the workspace root
/// and blocks until it ends: call it before anything timed starts. Up to date, that takes
/// about a second. Panics, so that the test fails rather than runs something else, when the
/// layout is unknown, cargo cannot be run, the build fails or the binary is not where cargo
/// puts it; the message has the command to build by hand.
pub fn workspace_bin(name: &str) -> PathBuf {
    assert!(
        WORKSPACE_BINS.contains(&name),
        "workspace_bin({name:?}): not one of {WORKSPACE_BINS:?}; add it to WORKSPACE_BINS"
    );
    static BUILT: OnceLock<Result<Layout, String>> = OnceLock::new();
    let layout = match BUILT.get_or_init(build_workspace_bins) {
        Ok(layout) => layout,
        Err(message) => panic!("{message}"),
    };
    let path = layout.bin_path(name);
    assert!(
        crate::is_executable_file(&path),
        "cargo built {name}, but there is no executable at {}; build it with `cargo build \
         --profile {} -p {name}` and look where cargo puts it",
        path.display(),
        layout.profile()
    );
    path
}

/// Whether `name` is one of the variables cargo sets for the test process itself (its
/// package's `CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...). The nested build runs without them:
/// build scripts read some of them (ring's declares `rerun-if-env-changed=CARGO_MANIFEST_DIR`),
/// and a value that differs from the outer build's makes cargo rebuild from there up.
pub fn set_for_the_test(name: &str) -> bool {
    matches!(
        name,
        "CARGO_MANIFEST_DIR"
            | "CARGO_MANIFEST_PATH"
            | "CARGO_CRATE_NAME"
            | "CARGO_BIN_NAME"
            | "CARGO_PRIMARY_PACKAGE"
            | "CARGO_TARGET_TMPDIR"
            | "OUT_DIR"
    ) || name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_BIN_EXE_")
}

fn build_workspace_bins() -> Result<Layout, String> {
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find the running test executable: {e}"))?;
    let layout = Layout::from_test_exe(&exe, |dir| dir.join("CACHEDIR.TAG").is_file())?;
    let args = build_args(&layout, WORKSPACE_BINS);
    let (cargo, from) = match std::env::var_os("CARGO") {
        Some(cargo) => (cargo, "$CARGO"),
        None => (OsString::from("cargo"), "cargo on PATH ($CARGO is unset)"),
    };
    let shown = args.iter().fold(String::from("cargo"), |mut s, a| {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
        s
    });
    let hint = format!(
        "build the binaries at the workspace root with `{shown}`, then run the tests through \
         `cargo nextest run --workspace` or `cargo test` (which set $CARGO)"
    );
    let started = Instant::now();
    let mut command = Command::new(&cargo);
    command.args(&args).current_dir(crate::workspace_root());
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(set_for_the_test) {
            command.env_remove(name);
        }
    }
    let out = command.output().map_err(|e| {
        format!(
            "cannot run {from} ({}): {e}; {hint}",
            cargo.to_string_lossy()
        )
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "building {WORKSPACE_BINS:?} for this test failed ({}): {hint}\n{}",
            out.status,
            tail.join("\n")
        ));
    }
    eprintln!(
        "deltasync-testkit: {WORKSPACE_BINS:?} up to date in {} after `{shown}` ({:.1} s)",
        layout.bin_path("").display(),
        started.elapsed().as_secs_f64()
    );
    Ok(layout)
}
