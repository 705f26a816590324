//! The client side of the HTTP APIs, against the real binaries: the Python client
//! (clients/python) writes through `deltasync-producer serve` and follows
//! `deltasync-consumer run` across a consumer restart, and the OpenAPI documents
//! (docs/openapi) are checked route by route against both servers.
//!
//! Everything here runs real processes: nats-server, both binaries, python3 (which CI's machine
//! has; a machine without it fails the test saying so).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use deltasync_testkit::{free_port, workspace_bin, NatsServer};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// A child process killed when dropped, with its stderr in a file for failure messages.
pub(crate) struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("create a log file");
        cmd.stdout(Stdio::null()).stderr(file);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_owned(),
            child,
            log,
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGTERM, then waits for the exit (the consumer commits on the way out).
    fn terminate(mut self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{} did not stop within 30 s of SIGTERM", self.name);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP answer: status, headers (names lowercased), body.
pub(crate) type Answer = (u16, Vec<(String, String)>, Vec<u8>);

/// One HTTP/1.1 exchange on a fresh connection.
pub(crate) fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Answer> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"))
    {
        body = dechunk(&body);
    }
    Ok((status, headers, body))
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = std::str::from_utf8(&raw[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 || raw.len() < eol + 2 + size {
            return out;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[(eol + 2 + size + 2).min(raw.len())..];
    }
}

/// Waits until GET `path` answers 200, or panics naming the process and its log.
pub(crate) fn wait_ok(port: u16, path: &str, proc: &Proc, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        match http(port, "GET", path, &[], b"") {
            Ok((200, _, _)) => return,
            Ok((status, _, body)) => {
                last = format!("{status} {}", String::from_utf8_lossy(&body));
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{} did not answer 200 on {path} within {timeout:?} (last: {last}); its log:\n{}",
        proc.name,
        proc.log_tail()
    );
}

/// A pipeline of real processes: nats-server, `deltasync-producer serve`, one durable
/// `deltasync-consumer run`, each HTTP endpoint on its own port. Retention is tight (1,000
/// messages, a snapshot every 200 envelopes), so a consumer stopped for more than 1,000
/// transactions finds its position pruned and re-snapshots.
pub(crate) struct Stack {
    pub nats: NatsServer,
    pub dir: tempfile::TempDir,
    pub pipeline: String,
    pub producer: Option<Proc>,
    pub consumer: Option<Proc>,
    pub producer_port: u16,
    pub consumer_port: u16,
}

impl Stack {
    pub fn start(pipeline: &str) -> Stack {
        let producer_bin = workspace_bin("deltasync-producer");
        workspace_bin("deltasync-consumer");
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut stack = Stack {
            nats,
            dir,
            pipeline: pipeline.to_owned(),
            producer: None,
            consumer: None,
            producer_port: free_port(),
            consumer_port: free_port(),
        };
        let mut cmd = Command::new(producer_bin);
        settings(&mut cmd);
        cmd.args(["--nats-url", &stack.nats.url(), "--pipeline", pipeline])
            .args([
                "serve",
                "--http",
                &format!("127.0.0.1:{}", stack.producer_port),
            ]);
        let producer = Proc::spawn("producer", cmd, stack.dir.path());
        wait_ok(
            stack.producer_port,
            "/readyz",
            &producer,
            Duration::from_secs(60),
        );
        stack.producer = Some(producer);
        // No history yet: the consumer is healthy, and ready only after the first commit.
        stack.start_consumer("/healthz");
        stack
    }

    /// Starts the consumer and waits until `path` answers 200.
    pub fn start_consumer(&mut self, path: &str) {
        let mut cmd = Command::new(workspace_bin("deltasync-consumer"));
        settings(&mut cmd);
        let data = self.dir.path().join("replica");
        cmd.args(["--nats-url", &self.nats.url(), "--pipeline", &self.pipeline])
            .args(["run", "--id", "py-follower", "--data-dir"])
            .arg(&data)
            .args(["--http", &format!("127.0.0.1:{}", self.consumer_port)]);
        let consumer = Proc::spawn("consumer", cmd, self.dir.path());
        wait_ok(self.consumer_port, path, &consumer, Duration::from_secs(60));
        self.consumer = Some(consumer);
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for p in [&self.producer, &self.consumer].into_iter().flatten() {
            out.push_str(&format!("--- {}:\n{}\n", p.name, p.log_tail()));
        }
        out
    }
}

/// The retention both processes agree on (see [`Stack`]).
fn settings(cmd: &mut Command) {
    cmd.env("DELTASYNC_STREAM__MAX_MESSAGES", "1000")
        .env("DELTASYNC_SNAPSHOT__EVERY_ENVELOPES", "200")
        .env("DELTASYNC_LOG__FILTER", "info");
}

fn python3() -> PathBuf {
    for dir in std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
    {
        let candidate = dir.join("python3");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("python3 is not on PATH: install it (Debian: apt-get install python3) to run the Python client's tests");
}

/// Lines of the child's stdout, through a channel (so the test can wait with a deadline).
fn lines_of(stdout: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn answer(stdin: &mut ChildStdin, line: &str) {
    writeln!(stdin, "{line}").expect("write to the Python check's stdin");
    stdin.flush().expect("flush the Python check's stdin");
}

/// The Python client writes 10,000 transactions through the producer's HTTP API from four
/// threads and follows the replica meanwhile (list, then watch over SSE). Half-way the consumer
/// is stopped until 1,500 more transactions pruned its position, then started: it
/// re-snapshots, and the follower must be told to refetch, re-list, continue without a gap,
/// and end equal to both the replica's /v1/state and what the writers wrote.
#[test]
fn the_python_client_writes_and_follows_across_a_consumer_restart() {
    let mut stack = Stack::start("pyclient");
    let script = root().join("clients/python/tests/e2e.py");
    let mut child = Command::new(python3())
        .arg(&script)
        .args([
            "--producer",
            &format!("http://127.0.0.1:{}", stack.producer_port),
        ])
        .args([
            "--consumer",
            &format!("http://127.0.0.1:{}", stack.consumer_port),
        ])
        .args(["--txns", "10000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python3");
    let mut stdin = child.stdin.take().expect("stdin");
    let out = lines_of(child.stdout.take().expect("stdout"));
    let err = lines_of(child.stderr.take().expect("stderr"));
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut summary = None;
    while summary.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match out.recv_timeout(left) {
            Ok(line) if line == "stop" => {
                stack.consumer.take().expect("a consumer").terminate();
                answer(&mut stdin, "stopped");
            }
            Ok(line) if line == "start" => {
                stack.start_consumer("/readyz");
                answer(&mut stdin, "started");
            }
            Ok(line) => summary = Some(line),
            Err(_) => {
                let _ = child.kill();
                let stderr: Vec<String> = err.try_iter().collect();
                panic!(
                    "the Python check gave no verdict within 300 s; stderr:\n{}\n{}",
                    stderr.join("\n"),
                    stack.logs()
                );
            }
        }
    }
    let status = child.wait().expect("wait for python3");
    let stderr: Vec<String> = err.try_iter().collect();
    let line = summary.unwrap_or_default();
    let verdict: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| {
        panic!(
            "the Python check printed {line:?}, not JSON ({e}); stderr:\n{}",
            stderr.join("\n")
        )
    });
    assert!(
        status.success() && verdict["ok"] == true,
        "the Python check failed: {verdict}\nstderr:\n{}\n{}",
        stderr.join("\n"),
        stack.logs()
    );
    assert_eq!(verdict["txns"], 10_000, "{verdict}");
    // The first listing, then at least one reset after the re-snapshot.
    assert!(verdict["resets"].as_u64().unwrap_or(0) >= 2, "{verdict}");
    let (_, _, body) = http(stack.consumer_port, "GET", "/v1/status", &[], b"").expect("status");
    let status: serde_json::Value = serde_json::from_slice(&body).expect("status is JSON");
    assert_eq!(
        status["last_resync"]["reason"], "pruned",
        "the restarted consumer did not re-snapshot because its position was pruned: {status}"
    );
    assert!(verdict["batches"].as_u64().unwrap_or(0) > 0, "{verdict}");
}

// ---------------------------------------------------------------------------------------------
// The OpenAPI documents against the servers

use serde_norway::Value as Yaml;

fn openapi(name: &str) -> Yaml {
    let path = root().join("docs/openapi").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
}

/// `#/components/...` references resolved against `doc`.
fn resolve<'a>(doc: &'a Yaml, v: &'a Yaml) -> &'a Yaml {
    match v.get("$ref").and_then(Yaml::as_str) {
        Some(r) => {
            let mut at = doc;
            for part in r.trim_start_matches("#/").split('/') {
                at = at
                    .get(part)
                    .unwrap_or_else(|| panic!("unresolved reference {r}"));
            }
            resolve(doc, at)
        }
        None => v,
    }
}

/// Whether `value` conforms to `schema` (the subset of JSON Schema the documents use: type,
/// required, properties, items, enum, oneOf, $ref); the reason when not.
fn conforms(doc: &Yaml, schema: &Yaml, value: &serde_json::Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if let Some(alternatives) = schema.get("oneOf").and_then(Yaml::as_sequence) {
        let matching = alternatives
            .iter()
            .filter(|s| conforms(doc, s, value, at).is_ok())
            .count();
        if matching == 0 {
            return Err(format!("{at}: {value} matches none of oneOf"));
        }
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Yaml::String(s) => vec![s.as_str()],
            Yaml::Sequence(s) => s.iter().filter_map(Yaml::as_str).collect(),
            _ => vec![],
        };
        let ok = types.iter().any(|t| match *t {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_u64() || value.is_i64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            "null" => value.is_null(),
            _ => false,
        });
        if !ok {
            return Err(format!("{at}: {value} is not of type {types:?}"));
        }
    }
    if let Some(values) = schema.get("enum").and_then(Yaml::as_sequence) {
        let allowed: Vec<&str> = values.iter().filter_map(Yaml::as_str).collect();
        if !value.as_str().is_some_and(|s| allowed.contains(&s)) {
            return Err(format!("{at}: {value} is not one of {allowed:?}"));
        }
    }
    if let Some(obj) = value.as_object() {
        for name in schema
            .get("required")
            .and_then(Yaml::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(Yaml::as_str)
        {
            if !obj.contains_key(name) {
                return Err(format!(
                    "{at}: required property {name:?} missing in {value}"
                ));
            }
        }
        if let Some(props) = schema.get("properties").and_then(Yaml::as_mapping) {
            for (name, sub) in props {
                let name = name.as_str().unwrap_or_default();
                if let Some(v) = obj.get(name) {
                    conforms(doc, sub, v, &format!("{at}.{name}"))?;
                }
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array()) {
        for (i, v) in arr.iter().enumerate() {
            conforms(doc, items, v, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// GET `path` of an event stream and the name of its first event (within 10 s).
fn first_event(port: u16, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set a read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
    )
    .expect("send");
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let status: u16 = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let content_type = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                .map(|(_, v)| v.trim().to_owned())
                .unwrap_or_default();
            if status != 200 {
                return (status, content_type, String::new());
            }
            if let Some(name) = body
                .lines()
                .find_map(|l| l.strip_prefix("event:").map(|n| n.trim().to_owned()))
            {
                return (status, content_type, name);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no event from {path} within 10 s: {text}"
        );
        let n = stream.read(&mut buf).expect("read the event stream");
        assert!(
            n > 0,
            "the event stream {path} ended without an event: {text}"
        );
        raw.extend_from_slice(&buf[..n]);
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Sends every `x-checks` exchange of `doc` to 127.0.0.1:`port` and checks each answer against
/// the operation's documented response; every documented status must be checked here or
/// named in `x-unchecked` with where it is tested. Returns the number of exchanges.
fn check_document(doc: &Yaml, port: u16, vars: &[(&str, String)]) -> usize {
    let expand = |s: &str| {
        vars.iter()
            .fold(s.to_owned(), |s, (k, v)| s.replace(&format!("{{{k}}}"), v))
    };
    let mut exchanges = 0;
    let paths = doc["paths"].as_mapping().expect("paths");
    for (route, ops) in paths {
        let route = route.as_str().expect("a path");
        for (method, op) in ops.as_mapping().expect("operations") {
            let method = method.as_str().expect("a method").to_ascii_uppercase();
            let what = format!("{method} {route}");
            let responses = op["responses"].as_mapping().expect("responses");
            let checks = op["x-checks"]
                .as_sequence()
                .unwrap_or_else(|| panic!("{what}: no x-checks"));
            let mut covered: Vec<String> = op
                .get("x-unchecked")
                .and_then(Yaml::as_mapping)
                .map(|m| {
                    m.keys()
                        .filter_map(|k| k.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            for check in checks {
                let name = check["name"].as_str().unwrap_or("?");
                let path = expand(check.get("path").and_then(Yaml::as_str).unwrap_or(route));
                let status = check["status"].as_u64().expect("a status") as u16;
                let response = resolve(
                    doc,
                    responses.get(status.to_string()).unwrap_or_else(|| {
                        panic!("{what} ({name}): status {status} is not documented")
                    }),
                );
                covered.push(status.to_string());
                exchanges += 1;
                if let Some(event) = check.get("first_event").and_then(Yaml::as_str) {
                    let (got, content_type, first) = first_event(port, &path);
                    assert_eq!(got, status, "{what} ({name}): GET {path}");
                    assert!(
                        content_type.starts_with("text/event-stream"),
                        "{what}: {content_type}"
                    );
                    assert_eq!(first, event, "{what} ({name}): the first event of {path}");
                    continue;
                }
                let body: Vec<u8> = match (check.get("raw"), check.get("body")) {
                    (Some(raw), _) => expand(raw.as_str().expect("raw is a string")).into_bytes(),
                    (None, Some(b)) => serde_json::to_vec(b).expect("a JSON body"),
                    (None, None) => Vec::new(),
                };
                let content_type = check
                    .get("content_type")
                    .and_then(Yaml::as_str)
                    .unwrap_or("application/json");
                let mut headers: Vec<(String, String)> = check
                    .get("headers")
                    .and_then(Yaml::as_mapping)
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| {
                        (
                            k.as_str().unwrap_or("").to_owned(),
                            v.as_str().unwrap_or("").to_owned(),
                        )
                    })
                    .collect();
                if !body.is_empty() {
                    headers.push(("Content-Type".into(), content_type.into()));
                }
                let header_refs: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let (got, answer_headers, answer) = http(port, &method, &path, &header_refs, &body)
                    .unwrap_or_else(|e| panic!("{what} ({name}): {e}"));
                let text = String::from_utf8_lossy(&answer);
                assert_eq!(
                    got, status,
                    "{what} ({name}): {method} {path} answered {got}: {text}"
                );
                let Some(content) = response.get("content").and_then(Yaml::as_mapping) else {
                    continue;
                };
                let answered_type = header(&answer_headers, "content-type").unwrap_or("");
                let wanted = check
                    .get("content_type")
                    .filter(|_| check.get("raw").is_none() && check.get("body").is_none());
                let (media, spec) = content
                    .iter()
                    .find(|(m, _)| {
                        let m = m.as_str().unwrap_or("");
                        answered_type.starts_with(m)
                            && wanted.and_then(Yaml::as_str).is_none_or(|w| w == m)
                    })
                    .unwrap_or_else(|| {
                        panic!("{what} ({name}): content type {answered_type:?} is not documented for {status}")
                    });
                let media = media.as_str().unwrap_or("");
                if let Some(schema) = spec.get("schema") {
                    let values: Vec<serde_json::Value> = if media == "application/x-ndjson" {
                        text.lines()
                            .filter(|l| !l.trim().is_empty())
                            .map(|l| {
                                serde_json::from_str(l).unwrap_or_else(|e| {
                                    panic!("{what} ({name}): a line is not JSON ({e}): {l}")
                                })
                            })
                            .collect()
                    } else {
                        vec![serde_json::from_slice(&answer)
                            .unwrap_or_else(|e| panic!("{what} ({name}): not JSON ({e}): {text}"))]
                    };
                    for v in &values {
                        if let Err(why) = conforms(doc, schema, v, "body") {
                            panic!("{what} ({name}): {why}");
                        }
                    }
                    if let Some(n) = check.get("lines").and_then(Yaml::as_u64) {
                        assert_eq!(values.len() as u64, n, "{what} ({name}): lines of {text}");
                    }
                }
                if let Some(headers) = response.get("headers") {
                    for (h, _) in resolve(doc, headers).as_mapping().into_iter().flatten() {
                        let h = h.as_str().unwrap_or("").to_ascii_lowercase();
                        assert!(
                            header(&answer_headers, &h).is_some(),
                            "{what} ({name}): no {h} header in {answer_headers:?}"
                        );
                    }
                }
            }
            for status in responses.keys().filter_map(Yaml::as_str) {
                assert!(
                    covered.iter().any(|c| c == status),
                    "{what}: documented status {status} is neither checked nor in x-unchecked"
                );
            }
        }
    }
    exchanges
}

/// POSTs one transaction to the producer and returns its receipt.
fn commit(port: u16, txn: serde_json::Value) -> serde_json::Value {
    let body = serde_json::to_vec(&serde_json::json!({ "txn": txn })).expect("JSON");
    let (status, _, answer) = http(
        port,
        "POST",
        "/v1/txn",
        &[("Content-Type", "application/json")],
        &body,
    )
    .expect("POST /v1/txn");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    serde_json::from_slice(&answer).expect("a JSON receipt")
}

/// Both OpenAPI documents, route by route, against a real producer and consumer.
#[test]
fn every_documented_route_answers_as_documented() {
    let stack = Stack::start("openapi");
    let first = commit(
        stack.producer_port,
        serde_json::json!([{"op":"put","key":"doc/a","value":"1"}]),
    );
    commit(
        stack.producer_port,
        serde_json::json!([{"op":"put","key":"doc/b","value":"2"}]),
    );
    let last = commit(
        stack.producer_port,
        serde_json::json!([{"op":"put","key":"other/c","value":"3"}]),
    );
    let seq = last["seq"].as_u64().expect("seq");
    // The replica has applied all three (read-your-writes).
    let (status, _, body) = http(
        stack.consumer_port,
        "GET",
        &format!("/v1/state?min_seq={seq}&wait=30s"),
        &[],
        b"",
    )
    .expect("GET /v1/state");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let vars = [
        ("seq", seq.to_string()),
        ("seq1", first["seq"].to_string()),
        (
            "lineage",
            last["lineage"].as_str().expect("lineage").to_owned(),
        ),
    ];
    let consumer = check_document(&openapi("consumer.yaml"), stack.consumer_port, &vars);
    let producer = check_document(&openapi("producer.yaml"), stack.producer_port, &vars);
    assert!(
        consumer >= 20 && producer >= 10,
        "{consumer} consumer and {producer} producer exchanges"
    );
}
