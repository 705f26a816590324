//! Shutdown: the library's `shutdown` and the binary's SIGTERM both await every outstanding
//! acknowledgement.

use crate::support::{self, eventually, last_stream_seq, read_stream, replay};
use deltasync_producer::{Change, Producer};
use deltasync_testkit::NatsServer;
use rustix::process::{kill_process, Pid, Signal};
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_awaits_every_outstanding_acknowledgement() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("shutdown");
    let mut settings = support::settings(&server.url(), &pipeline);
    settings.producer.batch_max_changes = 100;
    settings.producer.linger = Duration::from_secs(3600);
    let p = Producer::start(settings).await.expect("start");
    for i in 0..50_000 {
        p.submit(Change::put(format!("k{i}"), "v"))
            .await
            .expect("submit");
    }
    let status = p.shutdown().await.expect("shutdown");
    assert_eq!(status.seq, status.produced_seq);
    assert_eq!(status.seq, 500);
    let js = support::js(&server.url()).await;
    let replayed = replay(&read_stream(&js, &pipeline).await);
    assert_eq!(replayed.state.len(), 50_000);
    assert_eq!(replayed.state.digest().to_hex(), status.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_ingest_and_exits_zero_after_every_acknowledgement() {
    let server = NatsServer::start();
    let pipeline = support::pipeline("sigterm");
    let js = support::js(&server.url()).await;
    let mut child = support::producer_command(&server.url(), &pipeline)
        .arg("ingest")
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    for i in 0..5_000 {
        writeln!(stdin, r#"{{"op":"put","key":"k{i}","value":{i}}}"#).expect("write");
    }
    stdin.flush().expect("flush");
    let replica_len = async || replay(&read_stream(&js, &pipeline).await).state.len();
    eventually(
        "the first lines to be published",
        Duration::from_secs(30),
        async || {
            (last_stream_seq(&js, &pipeline).await > 0 && replica_len().await == 5_000)
                .then_some(())
        },
    )
    .await;
    // More input arriving while SIGTERM lands: whatever was taken is published, the rest not.
    for i in 5_000..20_000 {
        writeln!(stdin, r#"{{"op":"put","key":"k{i}","value":{i}}}"#).expect("write");
    }
    kill_process(Pid::from_child(&child), Signal::TERM).expect("SIGTERM");
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit after SIGTERM: {:?}\n{stderr}",
        out.status
    );
    assert!(stderr.contains("SIGTERM"), "{stderr}");
    drop(stdin);
    let replayed = replay(&read_stream(&js, &pipeline).await);
    assert!(replayed.state.len() >= 5_000);
}
