//! The deployment files against the code that reads them: docker-compose.yml, the Dockerfile,
//! the NATS cluster configs under deploy/nats/cluster, and deltasync.example.toml.
//!
//! No Docker engine runs here, so Docker builds and starts nothing; each part is checked by
//! what will consume it instead:
//!
//! ```text
//! DELTASYNC_* environment      Settings::load_from (refuses unknown keys, validates)
//! producer command line        deltasync_producer::cli::Cli::try_parse_from
//! consumer command line        /bin/sh evaluates the `sh -c` script (fake binaries on PATH
//!                              record the argv), then the consumer's parser judges it (see
//!                              `consumer_cli` below)
//! nats command line            nats-server started with it (store and ports moved to temp
//!                              ones), its /healthz answering on the `-m` port
//! cluster node configs         nats-server -t, plus names, routes, store, sync_interval
//! healthchecks                 their URL's port is the one the command listens on
//! deltasync.example.toml       loads to exactly the defaults, names every key
//! the whole file               read into the Compose Specification's types
//!                              (docker-compose-types): known attributes, right shapes
//! ```
//!
//! Compose's YAML merge keys (`<<:`) are applied and its `${NAME:-default}` interpolation is
//! resolved to the defaults, as `docker compose up` does in an environment that sets none.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use clap::Parser;
use deltasync_config::settings::{EnvVars, Overrides, Settings, SettingsError, Sources};
use deltasync_testkit::{free_port, nats_server_bin};
use serde_norway::Value;

/// The services the compose file must define: (name, profile).
const SERVICES: [(&str, Option<&str>); 12] = [
    ("nats", None),
    ("producer", None),
    ("consumer", None),
    ("api-producer", None),
    ("api-consumer", None),
    ("example-writer", None),
    ("example-follower", None),
    ("nats-1", Some("cluster")),
    ("nats-2", Some("cluster")),
    ("nats-3", Some("cluster")),
    ("producer-cluster", Some("cluster")),
    ("consumer-cluster", Some("cluster")),
];

/// Host names the consumer's shell command is evaluated with, standing for two containers.
const HOSTNAMES: [&str; 2] = ["3f2a9c1d7b6e", "81c0d4e5f6a7"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// The compose file, as compose sees it

/// docker-compose.yml with merge keys applied, before interpolation.
static RAW: LazyLock<Value> = LazyLock::new(|| {
    let mut doc: Value = serde_norway::from_str(&read("docker-compose.yml"))
        .unwrap_or_else(|e| panic!("docker-compose.yml is not YAML: {e}"));
    // Merged fragments may merge others; apply until none is left.
    for _ in 0..8 {
        doc.apply_merge()
            .unwrap_or_else(|e| panic!("docker-compose.yml: bad merge key: {e}"));
    }
    assert!(
        !has_merge_key(&doc),
        "merge keys nested deeper than 8 levels"
    );
    doc
});

/// docker-compose.yml with merge keys applied and every `${NAME:-default}` resolved.
static COMPOSE: LazyLock<Value> = LazyLock::new(|| {
    let mut doc = RAW.clone();
    interpolate_tree(&mut doc, "").unwrap_or_else(|e| panic!("docker-compose.yml: {e}"));
    doc
});

fn has_merge_key(v: &Value) -> bool {
    match v {
        Value::Mapping(m) => m
            .iter()
            .any(|(k, v)| k.as_str() == Some("<<") || has_merge_key(v)),
        Value::Sequence(s) => s.iter().any(has_merge_key),
        Value::Tagged(t) => has_merge_key(&t.value),
        _ => false,
    }
}

/// Compose interpolation in every string of `v` (not keys, as compose does).
fn interpolate_tree(v: &mut Value, at: &str) -> Result<(), String> {
    match v {
        Value::String(s) => *s = interpolate(s).map_err(|e| format!("{at}: {e}"))?,
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate_tree(item, &format!("{at}[{i}]"))?;
            }
        }
        Value::Mapping(m) => {
            for (k, item) in m.iter_mut() {
                let key = k.as_str().unwrap_or("?");
                interpolate_tree(item, &format!("{at}.{key}"))?;
            }
        }
        Value::Tagged(t) => interpolate_tree(&mut t.value, at)?,
        _ => {}
    }
    Ok(())
}

/// Resolves `$$` to `$` and `${NAME:-default}` / `${NAME-default}` to the default. A variable
/// without a default (`$NAME`, `${NAME}`, `${NAME:?error}`) is refused: the file must work in
/// an empty environment.
fn interpolate(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in {s:?}"))?;
            let expr = &body[..end];
            let (name, default) = expr
                .split_once(":-")
                .or_else(|| expr.split_once('-'))
                .ok_or_else(|| format!("${{{expr}}} in {s:?} has no default"))?;
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!("${{{expr}}} in {s:?} is not ${{NAME:-default}}"));
            }
            if default.contains('$') {
                return Err(format!("nested interpolation in {s:?}"));
            }
            out.push_str(default);
            rest = &body[end + 1..];
        } else if after.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
            return Err(format!(
                "${after} in {s:?} has no default (write ${{NAME:-default}})"
            ));
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// One service of the interpolated compose file.
#[derive(Debug, Clone, Copy)]
struct Service {
    name: &'static str,
    v: &'static Value,
}

fn service(name: &str) -> Service {
    let (name, _) = SERVICES
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("{name} is not an expected service"));
    let v = COMPOSE["services"]
        .get(*name)
        .unwrap_or_else(|| panic!("docker-compose.yml has no service {name}"));
    Service { name, v }
}

fn services() -> impl Iterator<Item = Service> {
    SERVICES.iter().map(|(name, _)| service(name))
}

fn strings(v: &Value, what: &str) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("{what} is not a list: {v:?}"))
        .iter()
        .map(|s| scalar(s).unwrap_or_else(|| panic!("{what}: {s:?} is not a scalar")))
        .collect()
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl Service {
    fn profiles(&self) -> Vec<String> {
        self.v
            .get("profiles")
            .map(|p| strings(p, &format!("{}.profiles", self.name)))
            .unwrap_or_default()
    }

    /// The command as a list (compose would shell-split a string; we write lists).
    fn command(&self) -> Vec<String> {
        let v = self
            .v
            .get("command")
            .unwrap_or_else(|| panic!("{} has no command", self.name));
        strings(v, &format!("{}.command (write it as a list)", self.name))
    }

    fn environment(&self) -> BTreeMap<String, String> {
        environment_of(self.v, self.name)
    }

    /// `source:target` volume entries: (source, target).
    fn volumes(&self) -> Vec<(String, String)> {
        self.v
            .get("volumes")
            .map(|v| strings(v, &format!("{}.volumes", self.name)))
            .unwrap_or_default()
            .iter()
            .map(|entry| {
                let mut parts = entry.split(':');
                match (parts.next(), parts.next()) {
                    (Some(source), Some(target)) => (source.to_owned(), target.to_owned()),
                    _ => panic!("{}: volume {entry:?} is not source:target", self.name),
                }
            })
            .collect()
    }

    /// depends_on as (service, condition).
    fn depends_on(&self) -> BTreeMap<String, String> {
        let Some(deps) = self.v.get("depends_on") else {
            return BTreeMap::new();
        };
        let deps = deps
            .as_mapping()
            .unwrap_or_else(|| panic!("{}.depends_on: use the long form", self.name));
        deps.iter()
            .map(|(k, v)| {
                let dep = k.as_str().expect("a service name").to_owned();
                let condition = v
                    .get("condition")
                    .and_then(Value::as_str)
                    .unwrap_or("service_started")
                    .to_owned();
                (dep, condition)
            })
            .collect()
    }

    /// The healthcheck's URL: (host, port, path).
    fn healthcheck(&self) -> (String, u16, String) {
        let test = self
            .v
            .get("healthcheck")
            .and_then(|h| h.get("test"))
            .unwrap_or_else(|| panic!("{} has no healthcheck", self.name));
        let test = strings(test, &format!("{}.healthcheck.test", self.name));
        assert_eq!(
            test[0], "CMD",
            "{}: healthcheck runs without a shell",
            self.name
        );
        let url = test
            .iter()
            .find_map(|a| a.strip_prefix("http://"))
            .unwrap_or_else(|| panic!("{}: no http:// URL in {test:?}", self.name));
        let (authority, path) = url.split_at(url.find('/').unwrap_or(url.len()));
        let (host, port) = authority
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{}: {url} names no port", self.name));
        let port = port
            .parse()
            .unwrap_or_else(|e| panic!("{}: port of {url}: {e}", self.name));
        (host.to_owned(), port, path.to_owned())
    }

    fn host_ports(&self) -> Vec<(Option<u16>, u16)> {
        self.v
            .get("ports")
            .map(|p| strings(p, &format!("{}.ports", self.name)))
            .unwrap_or_default()
            .iter()
            .map(|p| {
                let parse = |s: &str| {
                    s.parse::<u16>()
                        .unwrap_or_else(|e| panic!("{}: port {p:?}: {e}", self.name))
                };
                match p.split_once(':') {
                    Some((host, container)) => (Some(parse(host)), parse(container)),
                    None => (None, parse(p)),
                }
            })
            .collect()
    }

    fn image(&self) -> String {
        self.v
            .get("image")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{} has no image", self.name))
            .to_owned()
    }

    fn is_deltasync(&self) -> bool {
        self.v.get("build").is_some()
    }

    /// Runs `deltasync-consumer` (directly, or through the scalable replicas' shell script).
    fn is_consumer(&self) -> bool {
        self.is_deltasync()
            && self
                .command()
                .iter()
                .any(|a| a.contains("deltasync-consumer"))
    }

    /// A consumer meant to be scaled (`--scale`): the shell command that gives each container
    /// its own id and directory.
    fn is_scalable(&self) -> bool {
        self.is_consumer() && self.command()[0] == "sh"
    }

    /// One of the Python example services (clients/python/examples).
    fn is_example(&self) -> bool {
        self.name.starts_with("example-")
    }
}

fn environment_of(v: &Value, name: &str) -> BTreeMap<String, String> {
    match v.get("environment") {
        None => BTreeMap::new(),
        Some(Value::Mapping(m)) => m
            .iter()
            .map(|(k, v)| {
                let key = k.as_str().expect("a variable name").to_owned();
                let value = scalar(v).unwrap_or_else(|| panic!("{name}: {key} is not a scalar"));
                (key, value)
            })
            .collect(),
        Some(list) => strings(list, &format!("{name}.environment"))
            .iter()
            .map(|kv| {
                let (k, v) = kv
                    .split_once('=')
                    .unwrap_or_else(|| panic!("{name}: {kv:?} is not NAME=value"));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// Command lines

/// A directory of fake `deltasync-producer`, `deltasync-consumer` and `uname` commands: the
/// first two write their argv, NUL-separated, to stdout; `uname -n` prints `$FAKE_HOSTNAME`.
static FAKE_BIN: LazyLock<tempfile::TempDir> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("a temp dir");
    let write = |name: &str, body: &str| {
        let path = dir.path().join(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write a fake command");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
    };
    for bin in ["deltasync-producer", "deltasync-consumer"] {
        write(bin, &format!("printf '%s\\0' {bin} \"$@\""));
    }
    write(
        "uname",
        "[ \"$1\" = -n ] && [ $# -eq 1 ] && printf '%s\\n' \"$FAKE_HOSTNAME\" || exit 64",
    );
    dir
});

/// The argv a service's container would exec, for a container named `hostname`: the command
/// itself, or, for `sh -c SCRIPT`, what /bin/sh (dash, as in the Debian runtime image) makes
/// of the script with the fake binaries on PATH.
fn argv(s: Service, hostname: &str) -> Vec<String> {
    let command = s.command();
    if command[0] != "sh" {
        return command;
    }
    assert_eq!(command.len(), 3, "{}: sh -c SCRIPT", s.name);
    assert_eq!(command[1], "-c", "{}: sh -c SCRIPT", s.name);
    let script = &command[2];
    assert!(
        script.starts_with("exec "),
        "{}: the script must `exec` the binary so that it receives SIGTERM itself: {script:?}",
        s.name
    );
    let out = Command::new("/bin/sh")
        .args(["-c", script])
        .env_clear()
        .env(
            "PATH",
            format!("{}:/usr/bin:/bin", FAKE_BIN.path().display()),
        )
        .env("HOSTNAME", hostname)
        .env("FAKE_HOSTNAME", hostname)
        .output()
        .expect("run /bin/sh");
    assert!(
        out.status.success(),
        "{}: /bin/sh -c {script:?} failed ({}): {}",
        s.name,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 argv");
    let argv: Vec<String> = text
        .strip_suffix('\0')
        .unwrap_or_else(|| panic!("{}: the script ran no deltasync binary: {text:?}", s.name))
        .split('\0')
        .map(str::to_owned)
        .collect();
    argv
}

/// The value of `--flag VALUE` or `--flag=VALUE` in `argv`.
fn flag(argv: &[String], name: &str) -> Option<String> {
    argv.iter().enumerate().find_map(|(i, a)| {
        if a == name {
            argv.get(i + 1).cloned()
        } else {
            a.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('='))
                .map(str::to_owned)
        }
    })
}

/// The settings a deltasync service runs with: its environment, then its --nats-url and
/// --pipeline flags.
fn settings_of(s: Service, argv: &[String]) -> Result<Settings, SettingsError> {
    Settings::load_from(Sources {
        env: EnvVars::Map(s.environment().into_iter().collect()),
        overrides: Overrides {
            nats_url: flag(argv, "--nats-url"),
            pipeline: flag(argv, "--pipeline"),
            context: flag(argv, "--context"),
        },
        ..Sources::default()
    })
}

/// The address a deltasync service's HTTP endpoint listens on: `--http`, else the setting.
fn http_address(s: Service, argv: &[String], settings: &Settings) -> SocketAddr {
    let setting = if s.is_consumer() {
        settings.consumer.http
    } else {
        settings.producer.http
    };
    flag(argv, "--http")
        .map(|a| {
            a.parse()
                .unwrap_or_else(|e| panic!("{}: --http {a}: {e}", s.name))
        })
        .or(setting)
        .unwrap_or_else(|| panic!("{}: no HTTP endpoint, nothing for the healthcheck", s.name))
}

// ---------------------------------------------------------------------------------------------
// Tests: structure

#[test]
fn the_compose_file_declares_the_services_profiles_and_volumes() {
    let declared: BTreeSet<&str> = COMPOSE["services"]
        .as_mapping()
        .expect("services")
        .keys()
        .map(|k| k.as_str().expect("a service name"))
        .collect();
    let expected: BTreeSet<&str> = SERVICES.iter().map(|(n, _)| *n).collect();
    assert_eq!(declared, expected);

    let volumes: BTreeSet<String> = COMPOSE["volumes"]
        .as_mapping()
        .expect("top-level volumes")
        .keys()
        .map(|k| k.as_str().expect("a volume name").to_owned())
        .collect();
    let mut used = BTreeSet::new();
    for (name, profile) in SERVICES {
        let s = service(name);
        let profiles = s.profiles();
        assert_eq!(
            profiles,
            Vec::from_iter(profile.map(str::to_owned)),
            "{name}.profiles"
        );
        for (source, target) in s.volumes() {
            if source.starts_with("./") || source.starts_with('/') {
                assert!(
                    root().join(&source).is_file(),
                    "{name}: bind source {source} is missing"
                );
            } else {
                assert!(
                    volumes.contains(&source),
                    "{name}: volume {source} is not declared"
                );
                assert_eq!(target, "/data", "{name}: {source} is the data volume");
                used.insert(source);
            }
        }
        // Started with its dependencies: each one exists, is in the same profile (compose
        // refuses a dependency whose profile is not active), has a healthcheck to wait for.
        for (dep, condition) in s.depends_on() {
            let d = service(&dep);
            assert_eq!(
                d.profiles(),
                profiles,
                "{name} depends on {dep} of another profile"
            );
            assert_eq!(
                condition, "service_healthy",
                "{name} waits for {dep} to be healthy"
            );
            d.healthcheck();
        }
    }
    assert_eq!(
        used, volumes,
        "every declared volume is used, every used one declared"
    );

    // Every service gets a data volume of its own, so stacks and nodes never share a store.
    let mut owners = BTreeMap::new();
    for s in services() {
        for (source, _) in s.volumes().into_iter().filter(|(v, _)| !v.starts_with('.')) {
            if let Some(other) = owners.insert(source.clone(), s.name) {
                panic!("{other} and {} share volume {source}", s.name);
            }
        }
    }

    // Host ports: unique across the file (both stacks may run at once); none fixed for the
    // scalable consumers, whose replicas would collide.
    let mut host_ports = BTreeMap::new();
    for s in services() {
        for port in s.host_ports().into_iter().filter_map(|(host, _)| host) {
            assert!(!s.is_scalable(), "{}: fixed host port {port}", s.name);
            if let Some(other) = host_ports.insert(port, s.name) {
                panic!("{other} and {} both publish host port {port}", s.name);
            }
        }
    }

    for s in services() {
        if s.is_deltasync() {
            assert_eq!(
                s.v["build"].as_str(),
                Some("."),
                "{}: built from the Dockerfile",
                s.name
            );
        } else if s.is_example() {
            assert!(
                s.image().starts_with("python:3"),
                "{}: {}",
                s.name,
                s.image()
            );
        } else {
            assert!(
                s.image().starts_with("nats:2.14"),
                "{}: {}",
                s.name,
                s.image()
            );
        }
    }
}

#[test]
fn every_deltasync_variable_is_a_setting_and_each_service_environment_loads() {
    for s in services().filter(Service::is_deltasync) {
        let env = s.environment();
        for name in env.keys() {
            assert!(
                name.starts_with("DELTASYNC_"),
                "{}: {name} is not a deltasync setting",
                s.name
            );
        }
        // Interpolated from a variable of the same name, so that
        // `DELTASYNC_X=... docker compose up` sets exactly the setting X.
        let raw = environment_of(&RAW["services"][s.name], s.name);
        for (key, value) in &raw {
            if let Some(start) = value.find("${") {
                let name: String = value[start + 2..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert_eq!(&name, key, "{}: {key} is set from ${{{name}}}", s.name);
            }
        }
        let argv = argv(s, HOSTNAMES[0]);
        let settings = settings_of(s, &argv).unwrap_or_else(|e| {
            panic!(
                "{}: the settings loader refuses its environment: {e}",
                s.name
            )
        });

        // NATS: the servers the service waits for, on their client port.
        let cluster = s.profiles().contains(&"cluster".to_owned());
        let expected_nats: Vec<&str> = if cluster {
            vec!["nats-1", "nats-2", "nats-3"]
        } else {
            vec!["nats"]
        };
        let urls = settings.nats.urls();
        let hosts: Vec<&str> = urls
            .iter()
            .map(|u| {
                u.strip_prefix("nats://")
                    .and_then(|hp| hp.strip_suffix(":4222"))
                    .unwrap_or_else(|| panic!("{}: {u} is not nats://SERVICE:4222", s.name))
            })
            .collect();
        assert_eq!(hosts, expected_nats, "{}: nats.url", s.name);
        let deps = s.depends_on();
        for host in hosts {
            assert!(
                deps.contains_key(host),
                "{}: does not wait for {host}",
                s.name
            );
        }
        let replicas = if cluster { 3 } else { 1 };
        assert_eq!(settings.stream.replicas, replicas, "{}", s.name);
        assert_eq!(settings.snapshot.replicas, replicas, "{}", s.name);
    }

    // Producers and consumers of one stack agree on everything but their own sections.
    for (producer, consumer) in [
        ("producer", "consumer"),
        ("producer-cluster", "consumer-cluster"),
    ] {
        let (p, c) = (service(producer), service(consumer));
        let mut ps = settings_of(p, &argv(p, HOSTNAMES[0])).expect("producer settings");
        let mut cs = settings_of(c, &argv(c, HOSTNAMES[0])).expect("consumer settings");
        ps.producer = Settings::default().producer;
        cs.producer = Settings::default().producer;
        ps.consumer = Settings::default().consumer;
        cs.consumer = Settings::default().consumer;
        assert_eq!(ps, cs, "{producer} and {consumer} disagree");
    }
}

#[test]
fn an_unknown_deltasync_variable_would_be_refused() {
    // The check above is only as good as the loader's refusal of unknown keys.
    let s = service("producer");
    let mut env: BTreeMap<String, String> = s.environment();
    env.insert("DELTASYNC_STREAM__MAX_MESAGES".into(), "5".into());
    let err = Settings::load_from(Sources {
        env: EnvVars::Map(env.into_iter().collect()),
        ..Sources::default()
    })
    .expect_err("a misspelt variable is refused");
    assert!(matches!(err, SettingsError::UnknownKey { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Tests: command lines and healthchecks

#[test]
fn the_producer_command_lines_parse_with_the_producer_cli() {
    for name in ["producer", "producer-cluster"] {
        let s = service(name);
        let argv = argv(s, HOSTNAMES[0]);
        assert_eq!(argv[0], "deltasync-producer", "{name}");
        let cli = deltasync_producer::cli::Cli::try_parse_from(&argv)
            .unwrap_or_else(|e| panic!("{name}: {argv:?} is refused:\n{e}"));
        match cli.command {
            deltasync_producer::cli::Command::Run { http, .. } => {
                assert!(http.is_some(), "{name}: run --http serves the healthcheck")
            }
            other => panic!("{name}: runs {other:?}, not `run`"),
        }
    }
}

#[test]
fn the_api_services_command_lines_parse_with_their_clis() {
    let s = service("api-producer");
    let producer_argv = argv_of(s);
    let cli = deltasync_producer::cli::Cli::try_parse_from(&producer_argv)
        .unwrap_or_else(|e| panic!("api-producer: {producer_argv:?} is refused:\n{e}"));
    match cli.command {
        deltasync_producer::cli::Command::Serve { http, .. } => {
            assert!(http.is_some(), "api-producer: serve --http serves the API")
        }
        other => panic!("api-producer: runs {other:?}, not `serve`"),
    }
    let s = service("api-consumer");
    let consumer_argv = argv_of(s);
    let cli = deltasync_consumer::cli::Cli::try_parse_from(&consumer_argv)
        .unwrap_or_else(|e| panic!("api-consumer: {consumer_argv:?} is refused:\n{e}"));
    assert!(
        matches!(cli.command, deltasync_consumer::cli::Command::Run(_)),
        "api-consumer: {consumer_argv:?}"
    );
    // Both on the `app` pipeline, apart from the order book's.
    for name in ["api-producer", "api-consumer"] {
        let s = service(name);
        let settings = settings_of(s, &argv_of(s)).expect("settings");
        assert_eq!(settings.pipeline, "app", "{name}");
    }
}

fn argv_of(s: Service) -> Vec<String> {
    argv(s, HOSTNAMES[0])
}

/// The example services' command lines, run by python3 against the files they mount (in
/// the mode that only parses the arguments), must parse; the URLs they use must name a
/// service of the file on the port its HTTP endpoint listens on.
#[test]
fn the_python_examples_parse_their_command_lines_and_reach_the_api_services() {
    for name in ["example-writer", "example-follower"] {
        let s = service(name);
        let mut command = s.command();
        assert_eq!(command[0], "python3", "{name}");
        // Map each mounted container path back to the file in the repository.
        let mounts = s.volumes();
        for arg in command.iter_mut() {
            if let Some((source, _)) = mounts.iter().find(|(_, target)| target == arg) {
                *arg = root().join(source).display().to_string();
            }
        }
        let out = Command::new("python3")
            .args(&command[1..])
            .env("DELTASYNC_EXAMPLE_CHECK_ARGS", "1")
            .output()
            .unwrap_or_else(|e| panic!("{name}: cannot run python3 (install it): {e}"));
        assert!(
            out.status.success(),
            "{name}: {command:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let parsed: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("the parsed arguments as JSON");
        for key in ["producer", "replica"] {
            let Some(url) = parsed.get(key).and_then(|v| v.as_str()) else {
                continue;
            };
            let authority = url.trim_start_matches("http://");
            let (host, port) = authority.split_once(':').expect("host:port");
            let target = service(host);
            let argv = argv(target, HOSTNAMES[0]);
            let settings = settings_of(target, &argv).expect("settings");
            let listens = http_address(target, &argv, &settings).port();
            assert_eq!(port.parse::<u16>().ok(), Some(listens), "{name}: {url}");
            assert!(
                s.depends_on().contains_key(host),
                "{name} starts before {host}, which it talks to"
            );
        }
    }
}

#[test]
fn the_consumer_shell_command_gives_each_container_its_own_id_and_data_dir() {
    for name in ["consumer", "consumer-cluster"] {
        let s = service(name);
        let (_, mount) = s
            .volumes()
            .into_iter()
            .find(|(source, _)| !source.starts_with('.'))
            .unwrap_or_else(|| panic!("{name} has no data volume"));
        let mut dirs = Vec::new();
        for host in HOSTNAMES {
            let argv = argv(s, host);
            assert_eq!(argv[..2], ["deltasync-consumer", "run"], "{name}: {argv:?}");
            // The id is the host name unless set: neither the flag nor the setting may pin it,
            // or every replica would share one durable consumer.
            assert_eq!(
                flag(&argv, "--id"),
                None,
                "{name}: --id would be shared by replicas"
            );
            let settings = settings_of(s, &argv).expect("consumer settings");
            assert_eq!(
                settings.consumer.id, None,
                "{name}: consumer.id would be shared"
            );
            let dir = flag(&argv, "--data-dir")
                .unwrap_or_else(|| panic!("{name}: no --data-dir in {argv:?}"));
            assert_eq!(
                dir,
                format!("{mount}/{host}"),
                "{name}: a directory per container"
            );
            assert!(!argv.contains(&"--ephemeral".to_owned()), "{name}");
            dirs.push(dir);
        }
        assert_ne!(dirs[0], dirs[1]);
    }
}

#[test]
fn every_healthcheck_targets_the_port_its_command_listens_on() {
    // The examples serve nothing; what waits for them is nothing.
    for s in services().filter(|s| !s.is_example()) {
        let (host, port, path) = s.healthcheck();
        assert!(
            host == "127.0.0.1" || host == "localhost",
            "{}: {host}",
            s.name
        );
        // A consumer is healthy once ready (bootstrapped, within its allowed lag), so
        // `docker compose up --wait` returns with replicas that can be read.
        let wanted = if s.is_consumer() {
            "/readyz"
        } else {
            "/healthz"
        };
        assert_eq!(path, wanted, "{}", s.name);
        let listens = if s.is_deltasync() {
            let argv = argv(s, HOSTNAMES[0]);
            let settings = settings_of(s, &argv).expect("settings");
            let addr = http_address(s, &argv, &settings);
            assert!(
                addr.ip().is_unspecified(),
                "{}: {addr} is unreachable from the host",
                s.name
            );
            addr.port()
        } else if s.name == "nats" {
            let port = flag(&s.command(), "-m").expect("nats -m <monitoring port>");
            port.parse().expect("a port")
        } else {
            let conf = cluster_conf(s);
            let http = conf_value(&conf.text, "http").expect("http: in the node config");
            let (_, port) = http.rsplit_once(':').expect("http: HOST:PORT");
            port.parse().expect("a port")
        };
        assert_eq!(port, listens, "{}: healthcheck port", s.name);
        // What runs the check must exist in the image.
        let tool = strings(&s.v["healthcheck"]["test"], "test")[1].clone();
        if s.is_deltasync() {
            assert!(dockerfile_installs(&tool), "the runtime image lacks {tool}");
        } else {
            assert_eq!(tool, "wget", "{}", s.name);
            assert!(
                s.image().ends_with("-alpine"),
                "{}: busybox wget needs -alpine",
                s.name
            );
        }
        // The published container ports include the one checked.
        for (_, container) in s.host_ports() {
            assert!(
                container == port || !s.is_deltasync(),
                "{}: publishes {container}",
                s.name
            );
        }
    }
}

#[test]
fn the_nats_command_starts_a_jetstream_server_whose_healthz_answers_on_its_monitoring_port() {
    let s = service("nats");
    let mut args = s.command();
    let (_, store) = s.volumes().into_iter().next().expect("the nats volume");
    let store_dir = tempfile::tempdir().expect("a temp dir");
    let monitor = free_port();
    let client = free_port();
    // Only what is host-specific moves: the store directory and the ports.
    for (flag_name, value) in [
        ("-sd", store_dir.path().display().to_string()),
        ("-m", monitor.to_string()),
    ] {
        let i = args
            .iter()
            .position(|a| a == flag_name)
            .unwrap_or_else(|| panic!("nats: no {flag_name} in {args:?}"));
        if flag_name == "-sd" {
            assert_eq!(args[i + 1], store, "nats: -sd is the volume's mount point");
        }
        args[i + 1] = value;
    }
    assert!(args.contains(&"-js".to_owned()), "nats: JetStream on");
    args.extend([
        "-a".into(),
        "127.0.0.1".into(),
        "-p".into(),
        client.to_string(),
    ]);
    let server = Spawned::new(Command::new(nats_server_bin()).args(&args));
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        match http_get(monitor, "/healthz") {
            Ok((200, _)) => break 200,
            other if Instant::now() > deadline => {
                panic!("nats {args:?}: no healthy /healthz on {monitor}: {other:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    assert_eq!(status, 200);
    let (_, jsz) = http_get(monitor, "/jsz").expect("/jsz");
    let jsz: serde_json::Value = serde_json::from_str(&jsz).expect("/jsz is JSON");
    let dir = jsz["config"]["store_dir"].as_str().unwrap_or_default();
    assert!(
        dir.starts_with(&store_dir.path().display().to_string()),
        "JetStream stores in {dir}"
    );
    drop(server);
}

/// A child process killed and reaped on drop.
struct Spawned(Child);

impl Spawned {
    fn new(command: &mut Command) -> Spawned {
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        Spawned(child)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET `path` from 127.0.0.1:`port`: (status, body).
fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned());
    Ok((status, body))
}

// ---------------------------------------------------------------------------------------------
// Tests: the cluster profile

/// A cluster node's config file: where the service mounts it and its text.
struct ClusterConf {
    path: PathBuf,
    text: String,
}

fn cluster_conf(s: Service) -> ClusterConf {
    let command = s.command();
    assert_eq!(command[0], "-c", "{}: runs from a config file", s.name);
    let (source, _) = s
        .volumes()
        .into_iter()
        .find(|(_, target)| *target == command[1])
        .unwrap_or_else(|| panic!("{}: {} is not mounted", s.name, command[1]));
    let path = root().join(&source);
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {}: {e}", s.name, path.display()));
    ClusterConf { path, text }
}

/// The value of a top-level or block `key: value` line of a NATS config (comments skipped).
fn conf_value(text: &str, key: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(key)?.trim_start().strip_prefix(':'))
        .map(|v| v.trim().trim_matches('"').to_owned())
}

#[test]
fn the_cluster_nodes_form_one_jetstream_cluster_with_fsync_always() {
    let nodes = ["nats-1", "nats-2", "nats-3"];
    for name in nodes {
        let s = service(name);
        let conf = cluster_conf(s);
        let out = Command::new(nats_server_bin())
            .arg("-t")
            .arg("-c")
            .arg(&conf.path)
            .output()
            .expect("run nats-server -t");
        assert!(
            out.status.success(),
            "{name}: nats-server -t -c {}: {}{}",
            conf.path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let value = |key: &str| {
            conf_value(&conf.text, key).unwrap_or_else(|| panic!("{name}: no {key} in its config"))
        };
        assert_eq!(value("server_name"), name);
        assert_eq!(value("sync_interval"), "always", "{name}");
        let (_, data) = s
            .volumes()
            .into_iter()
            .find(|(source, _)| !source.starts_with('.'))
            .expect("a data volume");
        assert_eq!(value("store_dir"), data, "{name}: store_dir is the volume");
        assert!(
            value("listen").ends_with(":4222"),
            "{name}: clients on 4222"
        );
        assert_eq!(value("name"), "deltasync", "{name}: one cluster name");
        let routes: BTreeSet<&str> = conf
            .text
            .lines()
            .map(str::trim)
            .filter_map(|l| l.strip_prefix("nats://"))
            .collect();
        let expected: BTreeSet<String> = nodes.iter().map(|n| format!("{n}:6222")).collect();
        let expected: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
        assert_eq!(routes, expected, "{name}: routes to every node");
    }
}

// ---------------------------------------------------------------------------------------------
// Tests: the image

fn dockerfile_installs(tool: &str) -> bool {
    read("Dockerfile")
        .lines()
        .filter(|l| l.contains("apt-get install"))
        .any(|l| l.split_whitespace().any(|w| w == tool))
}

#[test]
fn the_dockerfile_builds_the_binaries_the_compose_file_runs_as_a_non_root_user() {
    let dockerfile = read("Dockerfile");
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(stages.len(), 2, "builder and runtime: {stages:?}");
    assert!(
        stages[0].contains("rust:${RUST_VERSION}") && stages[0].contains("AS builder"),
        "{stages:?}"
    );
    // The builder's Rust is pinned to a minor release (1.N), not a moving `1` or `latest`.
    let pinned = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUST_VERSION="))
        .expect("ARG RUST_VERSION=…");
    let minor = pinned
        .strip_prefix("1.")
        .and_then(|m| m.parse::<u32>().ok());
    assert!(
        minor.is_some(),
        "RUST_VERSION={pinned} is not a 1.N release"
    );
    assert!(
        stages[1].contains("debian:") && stages[1].contains("-slim"),
        "{stages:?}"
    );
    let build = dockerfile
        .lines()
        .find(|l| l.contains("cargo build"))
        .expect("a cargo build line");
    assert!(
        build.contains("--release") && build.contains("--locked"),
        "{build}"
    );
    for (package, manifest) in [
        ("deltasync-producer", "producer/Cargo.toml"),
        ("deltasync-consumer", "consumer/Cargo.toml"),
    ] {
        assert!(build.contains(&format!("-p {package}")), "{build}");
        // The package's binary has the name the compose commands run.
        assert!(
            read(manifest).contains(&format!("[[bin]]\nname = \"{package}\"")),
            "{manifest} declares no binary {package}"
        );
        assert!(
            dockerfile.contains(&format!("target/release/{package}")),
            "{package} is not copied out of the builder"
        );
    }
    let runtime = &dockerfile[dockerfile.rfind("\nFROM ").expect("a runtime stage")..];
    assert!(
        runtime.contains("COPY --from=builder /out/ /usr/local/bin/"),
        "{runtime}"
    );
    let user = runtime
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the runtime stage sets a USER");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "USER {user}"
    );
    assert!(runtime.contains("VOLUME [\"/data\"]"), "a /data volume");
    assert!(
        dockerfile_installs("ca-certificates"),
        "tls:// needs CA certificates"
    );
    // Commands name the binaries by their installed name.
    for s in services().filter(Service::is_deltasync) {
        let argv0 = &argv(s, HOSTNAMES[0])[0];
        assert!(
            argv0 == "deltasync-producer" || argv0 == "deltasync-consumer",
            "{argv0}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Tests: the example settings file

/// Every key path of the settings (`stream.max_messages`), from the defaults' serialization.
fn known_keys() -> BTreeSet<String> {
    fn walk(v: &serde_json::Value, at: &str, out: &mut BTreeSet<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let path = if at.is_empty() {
                        k.clone()
                    } else {
                        format!("{at}.{k}")
                    };
                    walk(v, &path, out);
                }
            }
            _ => {
                out.insert(at.to_owned());
            }
        }
    }
    let mut out = BTreeSet::new();
    let defaults = serde_json::to_value(Settings::default()).expect("serialize the defaults");
    walk(&defaults, "", &mut out);
    out
}

/// The keys the example names: (path, line index, commented out).
fn example_keys(text: &str) -> Vec<(String, usize, bool)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (body, commented) = match line.strip_prefix("# ") {
            Some(rest) => (rest, true),
            None => (line, false),
        };
        let Some((key, _)) = body.split_once(" = ") else {
            continue;
        };
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            continue;
        }
        let path = if section.is_empty() {
            key.to_owned()
        } else {
            format!("{section}.{key}")
        };
        out.push((path, i, commented));
    }
    out
}

fn load_toml(text: &str) -> Result<Settings, SettingsError> {
    Settings::load_from(Sources {
        toml: Some(text),
        env: EnvVars::Map(Default::default()),
        ..Sources::default()
    })
}

#[test]
fn the_example_settings_file_loads_to_the_defaults_and_names_every_key() {
    let text = read("deltasync.example.toml");
    let loaded = load_toml(&text).unwrap_or_else(|e| panic!("deltasync.example.toml: {e}"));
    assert_eq!(
        loaded,
        Settings::default(),
        "the example's values are the defaults"
    );

    let keys = example_keys(&text);
    let named: BTreeSet<String> = keys.iter().map(|(k, _, _)| k.clone()).collect();
    let known = known_keys();
    let missing: Vec<&String> = known.difference(&named).collect();
    let unknown: Vec<&String> = named.difference(&known).collect();
    assert!(missing.is_empty(), "the example lacks {missing:?}");
    assert!(
        unknown.is_empty(),
        "the example names unknown keys {unknown:?}"
    );
    assert_eq!(named.len(), keys.len(), "a key named twice");

    // Every commented-out example has the right name and type: uncommented alone, it loads or
    // fails validation only (a missing file, user without password), never as unknown or
    // mistyped.
    let lines: Vec<&str> = text.lines().collect();
    for (key, i, _) in keys.iter().filter(|(_, _, commented)| *commented) {
        let mut edited = lines.clone();
        edited[*i] = &lines[*i][2..];
        match load_toml(&edited.join("\n")) {
            Ok(_) | Err(SettingsError::Invalid { .. }) => {}
            Err(e) => panic!("uncommenting {key} gives: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests: the consumer's command line against the consumer's own parser

/// Enable when the consumer exports its clap type as `deltasync_consumer::cli::Cli` (as the
/// producer does): delete the `cfg` line below and add `deltasync-consumer.workspace = true`
/// to testkit's `[dev-dependencies]`. Then the interim binary check above can go.
mod consumer_cli {
    use super::*;

    #[test]
    fn the_consumer_command_lines_parse_with_the_consumer_cli() {
        for name in ["consumer", "consumer-cluster"] {
            for host in HOSTNAMES {
                let argv = argv(service(name), host);
                if let Err(e) = deltasync_consumer::cli::Cli::try_parse_from(&argv) {
                    panic!("{name}: {argv:?} is refused:\n{e}");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests: docker compose itself

/// The file, merged and interpolated as compose would, read into the Compose Specification's
/// types (docker-compose-types): every service attribute must be one compose knows (anything
/// else must be an `x-` extension), with the shape it expects. This replaces
/// `docker compose config -q`, which needs a compose plugin this machine does not have (the
/// test that ran it passed by skipping); a misspelt attribute is refused (checked below), so
/// this check can fail.
#[test]
fn the_compose_file_reads_as_the_compose_specification_says() {
    let parsed: Result<docker_compose_types::Compose, _> =
        serde_norway::from_value(COMPOSE.clone());
    let compose =
        parsed.unwrap_or_else(|e| panic!("docker-compose.yml does not read as Compose: {e}"));
    let names: BTreeSet<&str> = compose.services.0.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = SERVICES.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, expected);

    // The check refuses what compose would: a misspelt service attribute.
    let mut broken = COMPOSE.clone();
    let consumer = broken["services"]["consumer"]
        .as_mapping_mut()
        .expect("the consumer service");
    let check = consumer
        .remove("healthcheck")
        .expect("the consumer's healthcheck");
    consumer.insert(Value::from("helthcheck"), check);
    let refused: Result<docker_compose_types::Compose, _> = serde_norway::from_value(broken);
    let err = refused
        .expect_err("a misspelt attribute is refused")
        .to_string();
    assert!(err.contains("helthcheck"), "{err}");
}

#[test]
fn interpolation_resolves_defaults_and_escapes_and_refuses_what_has_no_default() {
    assert_eq!(
        interpolate("${A:-x}/${B-y}/$$(uname -n)/$1"),
        Ok("x/y/$(uname -n)/$1".into())
    );
    assert!(interpolate("${A}").is_err());
    assert!(interpolate("$HOSTNAME").is_err());
    assert!(interpolate("${A:?required}").is_err());
}
