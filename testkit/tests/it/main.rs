//! Integration tests of the testkit itself: real nats-server processes, checked with plain std
//! TCP (the INFO line a server sends on connect), the pure nats-server lookup and the
//! workspace binaries (`workspace_bin`: layout, build command, built from current sources); and of the
//! deployment files (`deploy`): docker-compose.yml, the Dockerfile, the NATS cluster configs
//! and deltasync.example.toml, against the settings loader and the binaries' parsers; and of
//! the HTTP APIs from outside (`clients`): the Python client and the OpenAPI documents against
//! the real binaries.

mod bin;
mod clients;
mod cluster;
mod deploy;
mod nats_habits;
mod server;
mod workspace_bin;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::time::Duration;

/// Connects to 127.0.0.1:`port`, reads the first protocol line, checks that it is
/// `INFO {...}` and returns the JSON.
fn info(port: u16) -> serde_json::Value {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("cannot connect to 127.0.0.1:{port}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set a read timeout");
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("no INFO line from 127.0.0.1:{port}: {e}"));
    assert!(
        line.starts_with("INFO {"),
        "first line is not INFO: {line:?}"
    );
    let json = line["INFO ".len()..].trim_end();
    serde_json::from_str(json).unwrap_or_else(|e| panic!("INFO is not JSON ({e}): {json}"))
}

/// Whether anything accepts TCP connections on 127.0.0.1:`port`.
fn accepts_connections(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}
