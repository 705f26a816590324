//! The write API as users run it: the `deltasync-producer serve` binary, over real HTTP and
//! real NATS requests, against a nats-server the test starts; and `ingest --receipts`.

use crate::support::{self, eventually, last_stream_seq, read_stream, replay};
use async_nats::HeaderMap;
use deltasync_testkit::{free_port, NatsServer};
use rustix::process::{kill_process, Pid, Signal};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEADLINE: Duration = Duration::from_secs(30);

/// A running `serve`: SIGTERM and wait on drop; its log in a file (a pipe could fill up).
pub struct Serve {
    child: Option<Child>,
    pub addr: SocketAddr,
    log: tempfile::NamedTempFile,
}

impl Serve {
    /// Starts `serve --http 127.0.0.1:<free port>` with `env` settings and waits until it is
    /// ready.
    pub async fn start(server: &NatsServer, pipeline: &str, env: &[(&str, &str)]) -> Serve {
        Serve::start_with(server, pipeline, env, &[]).await
    }

    /// [`Serve::start`] with more `serve` flags.
    pub async fn start_with(
        server: &NatsServer,
        pipeline: &str,
        env: &[(&str, &str)],
        flags: &[&str],
    ) -> Serve {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let log = tempfile::NamedTempFile::new().expect("log file");
        let child = support::producer_command(&server.url(), pipeline)
            .envs(env.iter().copied())
            .args(["serve", "--http", &addr.to_string()])
            .args(flags)
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("log file"))
            .spawn()
            .expect("spawn serve");
        let mut s = Serve {
            child: Some(child),
            addr,
            log,
        };
        let ready = eventually("serve is ready", DEADLINE, async || {
            if let Some(Ok(Some(status))) = s.child.as_mut().map(Child::try_wait) {
                panic!("serve exited with {status}: {}", s.log());
            }
            match request(addr, "GET", "/readyz", &[], b"").await {
                Some(r) if r.status == 200 => Some(()),
                _ => None,
            }
        })
        .await;
        let () = ready;
        s
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// SIGTERM, then the exit status and the log.
    pub fn stop(&mut self) -> (bool, String) {
        let mut child = self.child.take().expect("running");
        kill_process(Pid::from_child(&child), Signal::TERM).expect("SIGTERM");
        let status = child.wait().expect("wait for serve");
        (status.success(), self.log())
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill_process(Pid::from_child(&c), Signal::TERM);
            let _ = c.wait();
        }
    }
}

/// An HTTP response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    /// Header lines, lower-cased.
    pub headers: String,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }

    pub fn replayed(&self) -> bool {
        self.headers.contains("idempotent-replayed: true")
    }
}

/// One HTTP/1.1 request on its own connection (`None` when it cannot connect).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<Resp> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.ok()?;
    // A refused body may be answered before it is read whole.
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Some(Resp {
        status,
        headers: head.to_ascii_lowercase(),
        body,
    })
}

/// A POST whose body is sent in chunks (`Transfer-Encoding: chunked`, no length upfront).
async fn post_chunked(addr: SocketAddr, path: &str, key: Option<&str>, chunks: &[String]) -> Resp {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let key = key
        .map(|k| format!("Idempotency-Key: {k}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n{key}\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("write");
    for c in chunks {
        // The server may answer and stop reading before the end.
        if s.write_all(format!("{:x}\r\n{c}\r\n", c.len()).as_bytes())
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Resp {
        status: head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status"),
        headers: head.to_ascii_lowercase(),
        body: if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        },
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

async fn post(addr: SocketAddr, path: &str, key: Option<&str>, body: &str) -> Resp {
    let headers: Vec<(&str, &str)> = key.map(|k| ("Idempotency-Key", k)).into_iter().collect();
    let method = if path == "/v1/state" { "PUT" } else { "POST" };
    request(addr, method, path, &headers, body.as_bytes())
        .await
        .expect("the producer answers")
}

/// Envelopes in the pipeline's stream.
async fn envelopes(js: &async_nats::jetstream::Context, pipeline: &str) -> usize {
    replay(&read_stream(js, pipeline).await).envelopes.len()
}

fn value_of(state: &deltasync_core::State, key: &str) -> Option<String> {
    state
        .get(key)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_commits_transactions_over_http_with_receipts_conflicts_and_idempotent_retries() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("api-txn");
    let js = support::js(&server.url()).await;
    let serve = Serve::start(
        &server,
        &pipeline,
        &[("DELTASYNC_PRODUCER__API_MAX_BODY_BYTES", "4096")],
    )
    .await;
    let addr = serve.addr;

    // A transaction: the receipt names what is in the stream.
    let r = post(
        addr,
        "/v1/txn",
        None,
        r#"{"txn":[{"op":"put","key":"a","value":{"n": 1}},{"op":"put","key":"b","value_b64":"AAE="},{"op":"del","key":"zz"}]}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.headers.contains("content-type: application/json"),
        "{r:?}"
    );
    assert!(!r.replayed());
    let receipt = r.json();
    let replayed = replay(&read_stream(&js, &pipeline).await);
    let env = replayed.envelopes.last().expect("an envelope");
    assert_eq!(receipt["seq"], env.seq);
    assert_eq!(receipt["first_seq"], env.seq);
    assert_eq!(receipt["parts"], 1);
    assert_eq!(receipt["changes"], 3);
    assert_eq!(receipt["lineage"], env.lineage.to_hex());
    assert_eq!(receipt["digest"], env.digest.to_hex());
    assert_eq!(receipt["stream_seq"], last_stream_seq(&js, &pipeline).await);
    assert_eq!(
        value_of(&replayed.state, "a").as_deref(),
        Some(r#"{"n":1}"#)
    );
    assert_eq!(
        replayed.state.get("b").map(|v| v.to_vec()),
        Some(vec![0, 1])
    );
    let head = receipt["seq"].as_u64().expect("seq");
    let count = envelopes(&js, &pipeline).await;

    // A bad change: 400 naming it, nothing published, still serving.
    let r = post(
        addr,
        "/v1/txn",
        None,
        r#"{"txn":[{"op":"put","key":"c","value":1},{"op":"put","key":"d"}]}"#,
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.json()["index"], 1, "{r:?}");
    assert!(
        r.json()["error"]
            .as_str()
            .expect("error")
            .contains("missing `value`"),
        "{r:?}"
    );
    let r = post(addr, "/v1/txn", None, "{not json").await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.json().get("index").is_none(), "{r:?}");
    assert_eq!(envelopes(&js, &pipeline).await, count);

    // if_seq: the wrong head is a 409 naming the head; the right one commits.
    let r = post(
        addr,
        "/v1/txn",
        None,
        &format!(
            r#"{{"txn":[{{"op":"put","key":"c","value":2}}],"if_seq":{}}}"#,
            head - 1
        ),
    )
    .await;
    assert_eq!(r.status, 409, "{r:?}");
    assert_eq!(r.json()["seq"], head, "{r:?}");
    assert_eq!(envelopes(&js, &pipeline).await, count);
    let r = post(
        addr,
        "/v1/txn",
        None,
        &format!(r#"{{"txn":[{{"op":"put","key":"c","value":2}}],"if_seq":{head}}}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["seq"], head + 1);

    // Idempotency-Key: concurrent and later retries get the first receipt; one commit.
    let body = r#"{"txn":[{"op":"put","key":"once","value":true}]}"#;
    let tries = (0..4).map(|_| post(addr, "/v1/txn", Some("order-1"), body));
    let answers = futures::future::join_all(tries).await;
    let before_retry = envelopes(&js, &pipeline).await;
    assert_eq!(before_retry, count + 2, "one commit for four requests");
    let first = answers[0].json();
    for a in &answers {
        assert_eq!((a.status, a.json()), (200, first.clone()), "{a:?}");
    }
    assert_eq!(answers.iter().filter(|a| !a.replayed()).count(), 1);
    let again = post(addr, "/v1/txn", Some("order-1"), body).await;
    assert!(again.replayed(), "{again:?}");
    assert_eq!(again.json(), first);
    assert_eq!(envelopes(&js, &pipeline).await, before_retry);
    // The same key for another body is not a retry: 422, nothing committed.
    let reused = post(
        addr,
        "/v1/txn",
        Some("order-1"),
        r#"{"txn":[{"op":"put","key":"twice","value":true}]}"#,
    )
    .await;
    assert_eq!(reused.status, 422, "{reused:?}");
    assert!(reused.json()["error"]
        .as_str()
        .expect("error")
        .contains("different"));
    assert_eq!(envelopes(&js, &pipeline).await, before_retry);
    // The key is per operation and a different key commits anew.
    let other = post(addr, "/v1/txn", Some("order-2"), body).await;
    assert_eq!(other.json()["seq"], first["seq"].as_u64().expect("seq") + 1);

    // Over the body limit: 413, nothing published.
    let big = format!(
        r#"{{"txn":[{{"op":"put","key":"big","value":"{}"}}]}}"#,
        "x".repeat(5000)
    );
    let r = post(addr, "/v1/txn", None, &big).await;
    assert_eq!(r.status, 413, "{r:?}");
    assert!(r.json()["error"]
        .as_str()
        .expect("error")
        .contains("api_max_body_bytes"));
    assert_eq!(envelopes(&js, &pipeline).await, before_retry + 1);

    // A streamed body that grows past the limit: 413, the lines before the cut committed.
    let count = envelopes(&js, &pipeline).await;
    let chunks: Vec<String> = (0..40)
        .map(|i| {
            format!(
                "{{\"op\":\"put\",\"key\":\"s{i}\",\"value\":\"{}\"}}\n",
                "v".repeat(200)
            )
        })
        .collect();
    let r = post_chunked(addr, "/v1/changes", None, &chunks).await;
    assert_eq!(r.status, 413, "{r:?}");
    let err = r.json();
    assert!(
        err["error"]
            .as_str()
            .expect("error")
            .contains("api_max_body_bytes"),
        "{err}"
    );
    let replayed = replay(&read_stream(&js, &pipeline).await);
    let streamed = replayed
        .state
        .iter()
        .filter(|(k, _)| k.starts_with('s'))
        .count();
    assert!(streamed < 40, "{streamed}");
    match err["committed"]["changes"].as_u64() {
        Some(n) => {
            assert_eq!(n as usize, streamed, "{err}");
            assert_eq!(
                err["committed"]["seq"],
                replayed.envelopes.last().expect("env").seq
            );
        }
        None => assert_eq!((streamed, replayed.envelopes.len()), (0, count), "{err}"),
    }
    let head_now = replayed.envelopes.last().expect("env").seq;

    // Still serving, and the status agrees with the last receipt.
    let status = request(addr, "GET", "/v1/status", &[], b"")
        .await
        .expect("status");
    assert_eq!(status.json()["seq"], head_now);
    assert!(head_now >= other.json()["seq"].as_u64().expect("seq"));
    let mut serve = serve;
    let (ok, log) = serve.stop();
    assert!(ok, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_ingests_change_bodies_and_commits_whole_states_as_their_difference() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("api-changes");
    let js = support::js(&server.url()).await;
    let serve = Serve::start(&server, &pipeline, &[]).await;
    let addr = serve.addr;

    let body = "{\"op\":\"put\",\"key\":\"k1\",\"value\":1}\n\
                {\"op\":\"put\",\"key\":\"k2\",\"value\":2}\n\
                \n\
                {\"txn\":[{\"op\":\"put\",\"key\":\"k3\",\"value\":3},{\"op\":\"del\",\"key\":\"k1\"}]}\n";
    let r = post(addr, "/v1/changes", None, body).await;
    assert_eq!(r.status, 200, "{r:?}");
    let receipt = r.json();
    assert_eq!(
        (
            &receipt["changes"],
            &receipt["transactions"],
            &receipt["lines"]
        ),
        (&json!(4), &json!(1), &json!(4)),
        "{receipt}"
    );
    let replayed = replay(&read_stream(&js, &pipeline).await);
    let last = replayed.envelopes.last().expect("envelopes");
    assert_eq!(receipt["seq"], last.seq);
    assert_eq!(receipt["digest"], last.digest.to_hex());
    assert_eq!(receipt["first_seq"], 1);
    assert_eq!(value_of(&replayed.state, "k1"), None);
    assert_eq!(value_of(&replayed.state, "k3").as_deref(), Some("3"));
    // A streamed body under an Idempotency-Key: the retry is answered from memory after its
    // body is read (and compared); another body under the key is refused.
    let lines: Vec<String> = (0..50)
        .map(|i| format!("{{\"op\":\"put\",\"key\":\"i{i}\",\"value\":{i}}}\n"))
        .collect();
    let first = post_chunked(addr, "/v1/changes", Some("batch-7"), &lines).await;
    assert_eq!((first.status, first.replayed()), (200, false), "{first:?}");
    assert_eq!(first.json()["changes"], 50);
    // Plain lines arriving in pieces may be batched into more than one envelope.
    let count = envelopes(&js, &pipeline).await;
    assert_eq!(first.json()["seq"], count);
    let again = post_chunked(addr, "/v1/changes", Some("batch-7"), &lines).await;
    assert_eq!((again.status, again.replayed()), (200, true), "{again:?}");
    assert_eq!(again.json(), first.json());
    let other = post_chunked(addr, "/v1/changes", Some("batch-7"), &lines[..49]).await;
    assert_eq!(other.status, 422, "{other:?}");
    assert_eq!(envelopes(&js, &pipeline).await, count);

    // A bad line mid-body: the lines before it are committed, nothing of it or after.
    let body = "{\"op\":\"put\",\"key\":\"m1\",\"value\":1}\n\
                {\"op\":\"put\",\"key\":\"m2\",\"vlaue\":2}\n\
                {\"op\":\"put\",\"key\":\"m3\",\"value\":3}\n";
    let r = post(addr, "/v1/changes", None, body).await;
    assert_eq!(r.status, 400, "{r:?}");
    let err = r.json();
    assert_eq!(err["line"], 2, "{err}");
    assert!(
        err["error"].as_str().expect("error").contains("vlaue"),
        "{err}"
    );
    assert_eq!(err["committed"]["changes"], 1, "{err}");
    assert_eq!(err["committed"]["lines"], 1, "{err}");
    let replayed = replay(&read_stream(&js, &pipeline).await);
    assert_eq!(
        err["committed"]["seq"],
        replayed.envelopes.last().expect("envelopes").seq
    );
    assert!(replayed.state.get("m1").is_some());
    assert!(replayed.state.get("m2").is_none() && replayed.state.get("m3").is_none());
    let r = post(addr, "/v1/changes", None, "nope\n").await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(
        (&r.json()["line"], &r.json()["committed"]),
        (&json!(1), &Value::Null)
    );

    // A whole state, as a consumer's GET /v1/state prints it: the difference is committed.
    let state = "{\"key\":\"k2\",\"value\":2}\n\
                 {\"key\":\"k3\",\"value\":{\"x\": [1, 2]}}\n\
                 {\"key\":\"raw\",\"value_b64\":\"AJ+Slg==\"}\n";
    let r = post(addr, "/v1/state", None, state).await;
    assert_eq!(r.status, 200, "{r:?}");
    let receipt = r.json();
    assert_eq!(receipt["parts"], 1, "{receipt}");
    // k3 changed, raw added, m1 and the 50 i<n> keys deleted.
    assert_eq!(receipt["changes"], 53, "{receipt}");
    let replayed = replay(&read_stream(&js, &pipeline).await);
    let keys: Vec<String> = replayed.state.iter().map(|(k, _)| k.to_string()).collect();
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert_eq!(
        value_of(&replayed.state, "k3").as_deref(),
        Some("{\"x\": [1, 2]}"),
        "values are kept as written"
    );
    assert_eq!(receipt["digest"], replayed.state.digest().to_hex());
    let count = replayed.envelopes.len();
    // The same state again: nothing changes, nothing is published.
    let r = post(addr, "/v1/state", None, state).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["parts"], 0, "{r:?}");
    assert_eq!(r.json()["seq"], receipt["seq"]);
    assert_eq!(r.json()["digest"], receipt["digest"]);
    assert_eq!(envelopes(&js, &pipeline).await, count);
    // A bad line: 400 naming it, nothing published.
    let r = post(
        addr,
        "/v1/state",
        None,
        "{\"key\":\"a\",\"value\":1}\n{\"key\":\"b\"}\n",
    )
    .await;
    assert_eq!((r.status, &r.json()["line"]), (400, &json!(2)), "{r:?}");
    assert_eq!(envelopes(&js, &pipeline).await, count);
    // An empty body would delete every key: refused unless asked for.
    let r = post(addr, "/v1/state", None, "\n").await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.json()["error"]
        .as_str()
        .expect("error")
        .contains("Deltasync-Allow-Empty"));
    assert_eq!(envelopes(&js, &pipeline).await, count);
    let r = request(
        addr,
        "PUT",
        "/v1/state",
        &[("Deltasync-Allow-Empty", "true")],
        b"",
    )
    .await
    .expect("answer");
    assert_eq!((r.status, &r.json()["changes"]), (200, &json!(3)), "{r:?}");
    assert!(replay(&read_stream(&js, &pipeline).await).state.is_empty());
    drop(serve);
}

/// A NATS request with headers; the reply's headers and JSON body.
async fn nats_request(
    client: &async_nats::Client,
    subject: &str,
    key: Option<&str>,
    body: &str,
) -> (Option<HeaderMap>, Value) {
    let mut headers = HeaderMap::new();
    if let Some(k) = key {
        headers.insert("Idempotency-Key", k);
    }
    let reply = client
        .request_with_headers(subject.to_owned(), headers, body.to_owned().into())
        .await
        .expect("the service answers");
    let body = serde_json::from_slice(&reply.payload)
        .unwrap_or_else(|e| panic!("{e}: {:?}", reply.payload));
    (reply.headers, body)
}

fn service_error(headers: &Option<HeaderMap>) -> Option<(String, String)> {
    let h = headers.as_ref()?;
    Some((
        h.get("Nats-Service-Error-Code")?.as_str().to_owned(),
        h.get("Nats-Service-Error")?.as_str().to_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_offers_the_same_operations_as_a_nats_service() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("api-nats");
    let js = support::js(&server.url()).await;
    let serve = Serve::start(&server, &pipeline, &[]).await;
    let client = &js.client();
    let subject = |op: &str| format!("deltasync.{pipeline}.api.{op}");

    // Discoverable as a NATS service (what `nats micro ls` asks).
    let info = client
        .request("$SRV.INFO.deltasync", "".into())
        .await
        .expect("service info");
    let info: Value = serde_json::from_slice(&info.payload).expect("info JSON");
    assert_eq!(info["name"], "deltasync", "{info}");
    assert_eq!(info["metadata"]["pipeline"], pipeline.as_str(), "{info}");
    let subjects: Vec<&str> = info["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter_map(|e| e["subject"].as_str())
        .collect();
    for op in ["txn", "changes", "state"] {
        assert!(subjects.contains(&subject(op).as_str()), "{info}");
    }

    let body = r#"{"txn":[{"op":"put","key":"a","value":1}]}"#;
    let (headers, receipt) = nats_request(client, &subject("txn"), Some("k-1"), body).await;
    assert_eq!(service_error(&headers), None, "{receipt}");
    let replayed = replay(&read_stream(&js, &pipeline).await);
    let env = replayed.envelopes.last().expect("an envelope");
    assert_eq!(
        (&receipt["seq"], &receipt["digest"], &receipt["lineage"]),
        (
            &json!(env.seq),
            &json!(env.digest.to_hex()),
            &json!(env.lineage.to_hex())
        )
    );
    // The retry: the same receipt, marked, nothing new in the stream.
    let (headers, again) = nats_request(client, &subject("txn"), Some("k-1"), body).await;
    assert_eq!(again, receipt);
    assert_eq!(
        headers
            .as_ref()
            .and_then(|h| h.get("Idempotent-Replayed"))
            .map(|v| v.as_str()),
        Some("true")
    );
    assert_eq!(envelopes(&js, &pipeline).await, replayed.envelopes.len());
    // The same key over HTTP is the same request.
    let r = post(serve.addr, "/v1/txn", Some("k-1"), body).await;
    assert!(r.replayed() && r.json() == receipt, "{r:?}");

    // Errors: service error headers and the same JSON body as over HTTP.
    let (headers, err) = nats_request(
        client,
        &subject("txn"),
        None,
        r#"{"txn":[{"op":"put","key":"b","value":1},{"op":"put","key":"c","value":1,"value_b64":"AA=="}]}"#,
    )
    .await;
    let (code, description) = service_error(&headers).expect("a service error");
    assert_eq!(code, "400");
    assert_eq!(err["index"], 1, "{err}");
    assert_eq!(description, err["error"].as_str().expect("error"));
    let (headers, err) = nats_request(
        client,
        &subject("txn"),
        None,
        r#"{"txn":[{"op":"put","key":"b","value":1}],"if_seq":99}"#,
    )
    .await;
    assert_eq!(service_error(&headers).map(|e| e.0).as_deref(), Some("409"));
    assert_eq!(err["seq"], receipt["seq"]);

    let (headers, r) = nats_request(
        client,
        &subject("changes"),
        None,
        "{\"op\":\"put\",\"key\":\"n1\",\"value\":1}\n{\"op\":\"del\",\"key\":\"a\"}\n",
    )
    .await;
    assert_eq!(service_error(&headers), None, "{r}");
    assert_eq!((&r["changes"], &r["lines"]), (&json!(2), &json!(2)), "{r}");
    let (headers, r) = nats_request(client, &subject("changes"), None, "{\"op\":\"put\"}\n").await;
    assert_eq!(service_error(&headers).map(|e| e.0).as_deref(), Some("400"));
    assert_eq!(r["line"], 1, "{r}");

    let (headers, r) = nats_request(
        client,
        &subject("state"),
        None,
        "{\"key\":\"only\",\"value\":1}\n",
    )
    .await;
    assert_eq!(service_error(&headers), None, "{r}");
    let replayed = replay(&read_stream(&js, &pipeline).await);
    assert_eq!(r["seq"], replayed.envelopes.last().expect("envelopes").seq);
    assert_eq!(replayed.state.len(), 1);
    drop(serve);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_serve_answers_503_and_publishes_nothing_more() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("api-fenced");
    let js = support::js(&server.url()).await;
    let serve = Serve::start(&server, &pipeline, &[]).await;
    let body = r#"{"txn":[{"op":"put","key":"a","value":1}]}"#;
    assert_eq!(post(serve.addr, "/v1/txn", None, body).await.status, 200);
    // Another producer takes over the pipeline (a new lineage fences the running one).
    let out = support::producer_command(&server.url(), &pipeline)
        .args(["new-lineage", "--yes", "--keep-state"])
        .output()
        .expect("run new-lineage");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = support::last_stream_seq(&js, &pipeline).await;
    for _ in 0..2 {
        let r = post(serve.addr, "/v1/txn", None, body).await;
        assert_eq!(r.status, 503, "{r:?}");
        assert!(
            r.json()["error"]
                .as_str()
                .expect("error")
                .contains("fenced"),
            "{r:?}"
        );
    }
    assert_eq!(support::last_stream_seq(&js, &pipeline).await, last);
    let health = request(serve.addr, "GET", "/healthz", &[], b"")
        .await
        .expect("healthz");
    assert_eq!(health.status, 503, "{health:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_no_nats_takes_writes_over_http_only() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("api-nonats");
    let js = support::js(&server.url()).await;
    let serve = Serve::start_with(&server, &pipeline, &[], &["--no-nats"]).await;
    let body = r#"{"txn":[{"op":"put","key":"a","value":1}]}"#;
    assert_eq!(post(serve.addr, "/v1/txn", None, body).await.status, 200);
    let asked = js
        .client()
        .request(format!("deltasync.{pipeline}.api.txn"), body.into())
        .await;
    assert_eq!(
        asked.map(drop).map_err(|e| e.kind()),
        Err(async_nats::client::RequestErrorKind::NoResponders)
    );
}

#[test]
fn serve_without_an_http_address_is_refused_naming_the_flag_and_the_setting() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("api-noaddr");
    let out = support::producer_command(&server.url(), &pipeline)
        .arg("serve")
        .output()
        .expect("run serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--http") && err.contains("producer.http"),
        "{err}"
    );
}

#[test]
fn ingest_receipts_print_one_line_per_committed_transaction() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("api-receipts");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("in.ndjson");
    support::write_ndjson(&path, "r", 0..10, 5);
    let out = support::producer_command(&server.url(), &pipeline)
        .args(["ingest", "--receipts"])
        .arg(&path)
        .output()
        .expect("run ingest");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let receipts: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    // Lines 1 and 6 are transactions; the plain lines between are committed per chunk.
    let mut next_line = 1;
    let mut next_seq = 1;
    let mut changes = 0;
    for r in &receipts {
        assert_eq!(r["first_line"], next_line, "{receipts:?}");
        assert_eq!(r["first_seq"], next_seq, "{receipts:?}");
        assert_eq!(r["parts"], 1, "{r}");
        next_line = r["last_line"].as_u64().expect("last_line") + 1;
        next_seq = r["seq"].as_u64().expect("seq") + 1;
        changes += r["changes"].as_u64().expect("changes");
    }
    assert_eq!(next_line, 11, "{receipts:?}");
    assert_eq!(changes, 12, "{receipts:?}");
    let txns = receipts.iter().filter(|r| r["changes"] == 2).count();
    assert!(txns >= 2, "{receipts:?}");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (digest, seq) = rt.block_on(async {
        let js = support::js(&server.url()).await;
        let replayed = replay(&read_stream(&js, &pipeline).await);
        let last = replayed.envelopes.last().expect("envelopes").clone();
        (last.digest.to_hex(), last.seq)
    });
    let last = receipts.last().expect("receipts");
    assert_eq!(
        (&last["seq"], &last["digest"]),
        (&json!(seq), &json!(digest))
    );
}

/// A child process killed (SIGTERM, then waited for) on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = kill_process(Pid::from_child(&self.0), Signal::TERM);
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicas_state_put_to_another_producer_copies_it_byte_for_byte() {
    // The real consumer binary; built before anything timed starts.
    let consumer_bin = deltasync_testkit::workspace_bin("deltasync-consumer");
    let server = NatsServer::start();
    let (from, to) = (
        support::pipeline("api-copy-a"),
        support::pipeline("api-copy-b"),
    );
    let js = support::js(&server.url()).await;
    let a = Serve::start(&server, &from, &[]).await;
    let b = Serve::start(&server, &to, &[]).await;
    let r = post(
        a.addr,
        "/v1/txn",
        None,
        r#"{"txn":[{"op":"put","key":"j","value":{"a":[1,2]}},{"op":"put","key":"bin","value_b64":"AJ+Slg=="},{"op":"put","key":"s","value":"x y"}]}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    // A value stored with spaces (a state line keeps it as written).
    let r = post(
        a.addr,
        "/v1/state",
        None,
        "{\"key\":\"j\",\"value\":{\"a\":[1,2]}}\n{\"key\":\"bin\",\"value_b64\":\"AJ+Slg==\"}\n\
         {\"key\":\"s\",\"value\":\"x y\"}\n{\"key\":\"spaced\",\"value\":{\"b\": 2}}\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let head = r.json()["seq"].as_u64().expect("seq");

    let replica_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let _replica = Killed(
        std::process::Command::new(consumer_bin)
            .args([
                "--nats-url",
                &server.url(),
                "--pipeline",
                &from,
                "run",
                "--ephemeral",
            ])
            .args(["--id", "copier", "--http", &replica_addr.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the consumer"),
    );
    let state = eventually(
        "the replica serves the head's state",
        DEADLINE,
        async || {
            let r = request(replica_addr, "GET", "/v1/state", &[], b"").await?;
            (r.status == 200 && r.headers.contains(&format!("deltasync-seq: {head}"))).then_some(r)
        },
    )
    .await;
    let r = post(b.addr, "/v1/state", None, &state.body).await;
    assert_eq!(r.status, 200, "{r:?}");
    let entries = |s: &deltasync_core::State| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = s.iter().map(|(k, v)| (k.to_owned(), v.to_vec())).collect();
        v.sort();
        v
    };
    let original = replay(&read_stream(&js, &from).await).state;
    let copy = replay(&read_stream(&js, &to).await).state;
    assert_eq!(original.len(), 4);
    assert_eq!(entries(&copy), entries(&original));
    assert_eq!(copy.get("spaced"), Some(&b"{\"b\": 2}"[..]));
}
