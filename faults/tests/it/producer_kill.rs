//! kill -9 of the producer binary (`deltasync-producer ingest` of a large NDJSON file) with
//! publishes in flight, while two consumers follow; a restart ingests the rest of the file.
//! The stream, replayed from envelope 1 through a fresh `State::apply`, is one gapless chain
//! with no duplicate; what the killed run got into it is exactly a prefix of the file; the
//! consumers converge to the whole file.
//!
//! Talks to one nats-server through the consumer library, the producer binary (child
//! process, its HTTP status polled) and plain stream reads.

use crate::support::*;
use bytes::Bytes;
use deltasync_producer::Position;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// Lines in the file; every `TXN_EVERY`-th is a two-change transaction.
const LINES: u64 = 40_000;
const TXN_EVERY: u64 = 97;

fn line(i: u64) -> String {
    if i.is_multiple_of(TXN_EVERY) {
        format!(
            r#"{{"txn":[{{"op":"put","key":"big{i}","value":{{"i":{i}}}}},{{"op":"put","key":"big{i}-t","value":true}}]}}"#
        )
    } else {
        format!(r#"{{"op":"put","key":"big{i}","value":{{"i":{i}}}}}"#)
    }
}

fn write_lines(path: &Path, range: std::ops::Range<u64>) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in range {
        writeln!(f, "{}", line(i)).unwrap();
    }
    f.flush().unwrap();
}

/// The model of lines `0..n`.
fn model_of(n: u64) -> Model {
    let mut m = Model::default();
    for i in 0..n {
        m.entries
            .insert(format!("big{i}"), Bytes::from(format!(r#"{{"i":{i}}}"#)));
        if i.is_multiple_of(TXN_EVERY) {
            m.entries
                .insert(format!("big{i}-t"), Bytes::from_static(b"true"));
        }
    }
    m.txns = n;
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_ingesting_producer_binary_loses_and_duplicates_nothing() {
    logs();
    binaries(); // may build them: before anything timed starts
    let started = Instant::now();
    // Acknowledged only once on disk: slower acks, so more publishes are in flight at the kill.
    let server = deltasync_testkit::NatsServer::start_with_config(
        "listen: 127.0.0.1:{port}\njetstream { store_dir: \"{store_dir}\", sync_interval: always }\n",
    );
    let s = settings(&server.url(), &unique("kill9"), |s| {
        s.producer.batch_max_changes = 200;
        s.producer.ack_window = 512;
        s.snapshot.every_envelopes = 250;
    });
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.ndjson");
    write_lines(&big, 0..LINES);
    let log = dir.path().join("producer.log");

    let port = deltasync_testkit::free_port();
    let mut child = producer_command(&s, &log)
        .env("DELTASYNC_PRODUCER__BATCH_MAX_CHANGES", "200")
        .env("DELTASYNC_PRODUCER__ACK_WINDOW", "512")
        .arg("ingest")
        .arg(&big)
        .args(["--http", &format!("127.0.0.1:{port}")])
        .spawn()
        .unwrap();
    let consumers_dir = tempfile::tempdir().unwrap();
    let durable = InProcess::durable(s.clone(), "kill9-durable", consumers_dir.path());
    let memory = InProcess::memory(s.clone(), "kill9-memory");

    // Kill it once it has 150 envelopes acknowledged and more produced than acknowledged.
    let (acked, in_flight) = eventually(
        "the producer to publish with acknowledgements outstanding",
        DEADLINE,
        async || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "the producer exited ({status}) before the kill: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let (code, body) = http_get(port, "/v1/status").await?;
            let st: serde_json::Value =
                serde_json::from_slice(&body).ok().filter(|_| code == 200)?;
            let seq = st["seq"].as_u64()?;
            let produced = st["produced_seq"].as_u64()?;
            (seq >= 100 && produced >= seq + 4).then_some((seq, produced - seq))
        },
    )
    .await;
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success());
    eprintln!(
        "killed with {acked} envelopes acknowledged and {in_flight} more produced ({:.1?})",
        started.elapsed()
    );

    // What the killed run got into the stream: a gapless chain, exactly a prefix of the file.
    let js = js(&server.url()).await;
    let first = replay(&read_stream(&js, &s.pipeline).await, "after the kill");
    let k = first
        .state
        .iter()
        .filter(|(key, _)| !key.ends_with("-t"))
        .count() as u64;
    assert!(
        first.envelopes >= acked,
        "every acknowledged envelope is in the stream"
    );
    assert!(k < LINES, "the kill landed before the end of the file");
    assert_matches_model(
        "the stream after the kill",
        &first.state,
        &model_of(k),
        &format!("the killed run's prefix of {k} lines"),
    );

    // Restart: continue with the rest of the file; it runs to completion.
    let rest = dir.path().join("rest.ndjson");
    write_lines(&rest, k..LINES);
    let out = producer_command(&s, &log)
        .arg("ingest")
        .arg(&rest)
        .status()
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(out.success(), "the restarted producer failed:\n{text}");
    assert!(text.contains("continuing its lineage"), "{text}");

    eprintln!("restarted run done ({:.1?})", started.elapsed());
    let all = replay(&read_stream(&js, &s.pipeline).await, "after the restart");
    let model = model_of(LINES);
    let mut checked = assert_matches_model("the stream", &all.state, &model, "the whole file");
    let last = read_stream(&js, &s.pipeline).await;
    let stream_seq = last.last().map_or(0, |(seq, _)| *seq);
    let p = Position {
        lineage: all.state.lineage(),
        seq: all.state.seq(),
        stream_seq,
        digest: all.state.digest(),
    };
    for c in [&durable, &memory] {
        c.wait_for(
            &p,
            Duration::from_secs(120),
            "after the producer's kill and restart",
        )
        .await;
        checked += c
            .check(&p, &model, "after the producer's kill and restart")
            .await;
    }
    eprintln!("consumers converged ({:.1?})", started.elapsed());
    let st = durable.replica.status();
    durable.stop().await;
    memory.stop().await;
    eprintln!(
        "producer kill -9: prefix of {k} lines survived, {} envelopes chained, durable replica \
         decisions {:?}, {checked} entries checked, 0 lost, {:.1?}",
        all.envelopes,
        st.decisions,
        started.elapsed()
    );
}
