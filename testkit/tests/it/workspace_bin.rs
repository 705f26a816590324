//! Where the workspace binaries are, from the test executable's path (pure), and the build
//! command; then the real thing: the binaries this test process gets are built from the
//! current sources.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use deltasync_testkit::{build_args, set_for_the_test, workspace_bin, Layout};

/// A layout reader whose target roots are `roots`.
fn layout(exe: &str, roots: &[&str]) -> Result<Layout, String> {
    Layout::from_test_exe(Path::new(exe), |dir| {
        roots.iter().any(|r| Path::new(r) == dir)
    })
}

#[test]
fn the_default_layout_is_target_profile_deps() {
    let l = layout("/ws/target/debug/deps/it-0123abcd", &["/ws/target"]).expect("known layout");
    assert_eq!(
        l,
        Layout {
            target_dir: PathBuf::from("/ws/target"),
            triple: None,
            profile_dir: "debug".into(),
        }
    );
    assert_eq!(l.profile(), "test");
    assert_eq!(
        l.bin_path("deltasync-producer"),
        Path::new("/ws/target/debug/deltasync-producer")
    );
}

#[test]
fn a_target_dir_elsewhere_and_other_profiles_are_honoured() {
    let l = layout("/tmp/ct/release/deps/it-1", &["/tmp/ct"]).expect("known layout");
    assert_eq!(l.target_dir, Path::new("/tmp/ct"));
    assert_eq!(l.profile(), "release");
    assert_eq!(l.bin_path("x"), Path::new("/tmp/ct/release/x"));

    // A custom profile writes to a directory of its own name; no CACHEDIR.TAG is needed.
    let l = layout("/elsewhere/profiling/deps/it-2", &[]).expect("known layout");
    assert_eq!(l.target_dir, Path::new("/elsewhere"));
    assert_eq!(l.profile(), "profiling");
}

#[test]
fn a_cross_target_layout_names_its_triple() {
    let l = layout(
        "/ws/target/x86_64-unknown-linux-gnu/debug/deps/it-3",
        &["/ws/target", "/ws/target/x86_64-unknown-linux-gnu"],
    )
    .expect("known layout");
    assert_eq!(l.target_dir, Path::new("/ws/target"));
    assert_eq!(l.triple.as_deref(), Some("x86_64-unknown-linux-gnu"));
    assert_eq!(
        l.bin_path("deltasync-consumer"),
        Path::new("/ws/target/x86_64-unknown-linux-gnu/debug/deltasync-consumer")
    );
    let args: Vec<String> = build_args(&l, &["deltasync-consumer"])
        .into_iter()
        .map(|a| a.into_string().expect("UTF-8"))
        .collect();
    assert_eq!(
        args,
        [
            "build",
            "--workspace",
            "--examples",
            "--bin",
            "deltasync-consumer",
            "--profile",
            "test",
            "--target-dir",
            "/ws/target",
            "--target",
            "x86_64-unknown-linux-gnu"
        ]
    );
}

#[test]
fn the_nested_build_drops_the_variables_cargo_sets_for_the_test_only() {
    for name in [
        "CARGO_MANIFEST_DIR",
        "CARGO_PKG_NAME",
        "CARGO_PKG_VERSION_MAJOR",
        "CARGO_BIN_EXE_deltasync-consumer",
        "CARGO_TARGET_TMPDIR",
        "OUT_DIR",
    ] {
        assert!(set_for_the_test(name), "{name} is dropped");
    }
    // The user's and the runner's settings stay: they decide where and how cargo builds.
    for name in [
        "CARGO",
        "CARGO_HOME",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_JOBS",
        "CARGO_PROFILE_DEV_DEBUG",
        "RUSTFLAGS",
        "PATH",
    ] {
        assert!(!set_for_the_test(name), "{name} is kept");
    }
}

#[test]
fn an_executable_outside_deps_is_an_error_naming_it() {
    let err = layout("/usr/local/bin/it", &[]).expect_err("not a cargo layout");
    assert!(err.contains("/usr/local/bin/it"), "{err}");
    assert!(err.contains("<target-dir>/<profile>/deps/<test>"), "{err}");
}

/// Newest modification time of the `.rs` files below `dir`.
fn newest_source(dir: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    for entry in std::fs::read_dir(dir).expect("read a source dir") {
        let path = entry.expect("a dir entry").path();
        let time = if path.is_dir() {
            newest_source(&path)
        } else if path.extension().is_some_and(|e| e == "rs") {
            path.metadata().and_then(|m| m.modified()).expect("mtime")
        } else {
            continue;
        };
        newest = newest.max(time);
    }
    newest
}

#[test]
fn the_workspace_binaries_are_newer_than_every_source_they_are_built_from() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root");
    // Each binary against the crates it links: cargo relinks a binary only when one of
    // those changed (the consumer's newer source says nothing about the producer's binary).
    for (name, crates) in [
        ("deltasync-producer", ["core", "config", "nats", "producer"]),
        ("deltasync-consumer", ["core", "config", "nats", "consumer"]),
    ] {
        let sources = crates
            .iter()
            .map(|c| newest_source(&root.join(c).join("src")))
            .max()
            .expect("sources");
        let bin = workspace_bin(name);
        let built = bin.metadata().and_then(|m| m.modified()).expect("mtime");
        assert!(
            built >= sources,
            "{} is older than the newest source of the crates it is built from",
            bin.display()
        );
        let out = std::process::Command::new(&bin)
            .arg("--help")
            .output()
            .expect("the binary runs");
        assert!(out.status.success(), "{name} --help: {out:?}");
    }
}
