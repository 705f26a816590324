//! Single servers: start, restart, kill -9, config file, start failure.

use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

use deltasync_testkit::NatsServer;

use crate::{accepts_connections, info};

#[test]
fn a_server_starts_and_greets_with_an_info_line_announcing_jetstream() {
    let server = NatsServer::start();
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));
    let info = info(server.port());
    assert_eq!(info["jetstream"], true, "INFO: {info}");
    assert_eq!(info["port"], server.port());
    assert!(server.store_dir().join("jetstream").is_dir());
}

#[test]
fn a_restarted_server_keeps_its_port_and_store_and_accepts_connections_again() {
    let mut server = NatsServer::start();
    let port = server.port();
    let store = server.store_dir().to_path_buf();
    let first_pid = server.pid().expect("running");

    server.restart();

    assert!(
        server
            .log_tail(200)
            .contains("Trapped \"terminated\" signal"),
        "stop sends SIGTERM"
    );
    assert!(server.is_running());
    assert_ne!(server.pid(), Some(first_pid));
    assert_eq!(server.port(), port);
    assert_eq!(server.store_dir(), store);
    assert_eq!(info(port)["jetstream"], true);
}

#[test]
fn a_killed_server_leaves_no_process_and_starts_again_on_the_same_port() {
    let mut server = NatsServer::start();
    let port = server.port();
    let pid = server.pid().expect("running");

    server.kill9();

    assert!(!server.is_running());
    assert_eq!(server.pid(), None);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} still exists"
    );
    assert!(!accepts_connections(port));

    server.start_again();

    assert!(server.is_running());
    assert_eq!(server.port(), port);
    assert_eq!(info(port)["jetstream"], true);
}

#[test]
fn a_dropped_server_leaves_no_process_and_no_directory() {
    let server = NatsServer::start();
    let pid = server.pid().expect("running");
    let dir = server
        .store_dir()
        .parent()
        .expect("store in temp dir")
        .to_path_buf();

    drop(server);

    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} still exists"
    );
    assert!(!dir.exists(), "{} still exists", dir.display());
}

#[test]
fn a_config_with_port_and_store_dir_placeholders_starts_and_restarts() {
    let mut server = NatsServer::start_with_config(
        "server_name: from-config\n\
         listen: 127.0.0.1:{port}\n\
         jetstream { store_dir: \"{store_dir}\" }\n",
    );
    let info = info(server.port());
    assert_eq!(info["server_name"], "from-config");
    assert_eq!(info["jetstream"], true);
    assert!(server.store_dir().join("jetstream").is_dir());

    server.restart();

    assert_eq!(crate::info(server.port())["server_name"], "from-config");
}

#[test]
fn a_server_that_cannot_start_fails_the_test_with_its_log() {
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        NatsServer::start_with_config("listen: 127.0.0.1:{port}\nthis is { not a config\n")
    }));
    let payload = outcome.expect_err("a broken config must not start");
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(message.contains("before it was ready"), "{message}");
    assert!(message.contains("last lines of its log"), "{message}");
}
