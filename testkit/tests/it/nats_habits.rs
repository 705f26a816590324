//! The NATS habits an operator brings, through the real binaries: a `nats` CLI context file
//! (`--context`, `NATS_CONTEXT`) naming a server whose JetStream has a domain,
//! `nats.jetstream_domain`, and `nats.retry_on_initial_connect` for a stack started before
//! its NATS server.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use deltasync_testkit::{free_port, workspace_bin, NatsServer};

/// A server whose JetStream is in domain `hub`.
fn domain_server() -> NatsServer {
    NatsServer::start_with_config(
        "listen: 127.0.0.1:{port}\njetstream { store_dir: \"{store_dir}\", domain: hub }\n",
    )
}

/// A context file as `nats context save` writes it: every field, unset ones empty.
fn write_context(path: &Path, url: &str, domain: &str) {
    let json = serde_json::json!({
        "description": "test", "url": url, "socks_proxy": "", "token": "", "user": "",
        "password": "", "creds": "", "nkey": "", "cert": "", "key": "", "ca": "", "nsc": "",
        "jetstream_domain": domain, "jetstream_api_prefix": "", "jetstream_event_prefix": "",
        "inbox_prefix": "", "user_jwt": "", "color_scheme": "", "tls_first": false
    });
    std::fs::write(path, json.to_string()).expect("write the context");
}

fn run(bin: &str, args: &[&str], envs: &[(&str, &str)], stdin: Option<&Path>) -> Output {
    let mut cmd = Command::new(workspace_bin(bin));
    cmd.args(args)
        .env_remove("NATS_URL")
        .env_remove("NATS_CONTEXT")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    match stdin {
        Some(p) => cmd.stdin(std::fs::File::open(p).expect("open the input")),
        None => cmd.stdin(Stdio::null()),
    };
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_context_naming_a_jetstream_domain_carries_both_binaries_to_it() {
    let server = domain_server();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let context = dir.path().join("hub.json");
    write_context(&context, &server.url(), "hub");
    let input = dir.path().join("changes.ndjson");
    std::fs::write(
        &input,
        "{\"op\":\"put\",\"key\":\"via/context\",\"value\":\"1\"}\n\
         {\"op\":\"put\",\"key\":\"via/domain\",\"value\":\"2\"}\n",
    )
    .expect("write the input");
    let ctx = context.to_str().expect("a UTF-8 path");

    // The producer through --context; the consumer through NATS_CONTEXT.
    let out = run(
        "deltasync-producer",
        &["--context", ctx, "--pipeline", "habits", "ingest", "-"],
        &[],
        Some(&input),
    );
    assert!(
        out.status.success(),
        "ingest through the context: {}",
        text(&out)
    );
    let out = run(
        "deltasync-consumer",
        &["--pipeline", "habits", "replay"],
        &[("NATS_CONTEXT", ctx)],
        None,
    );
    assert!(
        out.status.success(),
        "replay through NATS_CONTEXT: {}",
        text(&out)
    );
    let history = String::from_utf8_lossy(&out.stdout);
    assert!(
        history.contains("via/context") && history.contains("via/domain"),
        "{}",
        text(&out)
    );

    // The same server through another domain: nothing answers there, and the error says
    // which domain was asked.
    let wrong = dir.path().join("leaf.json");
    write_context(&wrong, &server.url(), "leaf");
    let out = run(
        "deltasync-consumer",
        &[
            "--context",
            wrong.to_str().expect("UTF-8"),
            "--pipeline",
            "habits",
            "replay",
        ],
        &[("DELTASYNC_NATS__REQUEST_TIMEOUT", "2s")],
        None,
    );
    assert!(
        !out.status.success(),
        "a wrong domain must fail: {}",
        text(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no JetStream answers in domain \"leaf\"")
            && stderr.contains("nats.jetstream_domain"),
        "{}",
        text(&out)
    );
}

#[test]
fn with_retry_on_initial_connect_a_producer_started_before_nats_waits_for_it() {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let mut child = Command::new(workspace_bin("deltasync-producer"))
        .args([
            "--nats-url",
            &url,
            "--pipeline",
            "early",
            "status",
            "--json",
        ])
        .env("DELTASYNC_NATS__RETRY_ON_INITIAL_CONNECT", "true")
        .env("DELTASYNC_NATS__INITIAL_CONNECT_WAIT", "2m")
        .env("DELTASYNC_NATS__CONNECT_TIMEOUT", "1s")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the producer");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // It says it waits, and keeps running.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no \"not reachable yet\" line within 60 s: {seen:?}"));
        let waiting = line.contains("NATS is not reachable yet");
        seen.push(line);
        if waiting {
            break;
        }
    }
    assert!(
        child.try_wait().expect("poll").is_none(),
        "the producer gave up: {seen:?}"
    );

    // NATS comes up on that port: the command connects and completes.
    let _server = NatsServer::start_with_config(&format!(
        "listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{{store_dir}}\" }}\n"
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the producer did not finish within 60 s of NATS starting"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("read stdout");
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(
        status.success(),
        "{status:?}\nstdout: {stdout}\nstderr: {seen:?} {rest:?}"
    );
    let json: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("status --json printed no JSON ({e}): {stdout}"));
    assert!(json.is_object(), "{json}");
}

#[test]
fn without_retry_on_initial_connect_an_absent_nats_fails_at_once() {
    let port = free_port();
    let started = Instant::now();
    let out = run(
        "deltasync-producer",
        &["--nats-url", &format!("nats://127.0.0.1:{port}"), "status"],
        &[("DELTASYNC_NATS__CONNECT_TIMEOUT", "1s")],
        None,
    );
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("127.0.0.1:{port}")),
        "{}",
        text(&out)
    );
    assert!(!stderr.contains("not reachable yet"), "{}", text(&out));
    // Not a timing assertion on speed: only that it did not wait out a retry window.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}
