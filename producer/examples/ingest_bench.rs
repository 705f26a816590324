//! Ingest throughput: starts a private nats-server (file storage), parses N small NDJSON
//! puts from memory and publishes them through the producer, then reports changes/s from
//! the first line to the last acknowledgement.
//!
//! `cargo run --release -p deltasync-producer --example ingest_bench -- 1000000`

use deltasync_producer::ingest::{self, Input};
use deltasync_producer::Producer;
use deltasync_shared::settings::Settings;
use deltasync_testkit::NatsServer;
use std::io::Write;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let server = NatsServer::start();
    let mut input = Vec::with_capacity(n as usize * 48);
    for i in 0..n {
        writeln!(
            input,
            r#"{{"op":"put","key":"key-{i:08}","value":{{"n":{i},"p":"{:x}"}}}}"#,
            i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40
        )?;
    }
    let bytes = input.len();
    let mut settings = Settings::default();
    settings.pipeline = "bench".into();
    settings.nats.url = server.url();
    let producer = Producer::start(settings).await?;
    let report = ingest::ingest(
        &producer,
        Input::Reader(Box::new(std::io::Cursor::new(input))),
        CancellationToken::new(),
    )
    .await?;
    let status = producer.shutdown().await?;
    println!(
        "{} changes ({} MB of NDJSON) in {:.3} s = {:.0} changes/s; {} envelopes, digest {}",
        report.changes,
        bytes / 1_000_000,
        report.elapsed.as_secs_f64(),
        report.rate(),
        status.seq,
        status.digest
    );
    Ok(())
}
