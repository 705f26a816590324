//! Ingest throughput: starts a private nats-server (file storage), parses N small NDJSON
//! puts from memory and publishes them through the producer, then reports changes/s from
//! the first line to the last acknowledgement.
//!
//! `cargo run --release -p deltasync-producer --example ingest_bench -- 1000000`

use deltasync_config::settings::Settings;
use deltasync_producer::ingest::{self, Input};
use deltasync_producer::Producer;
use deltasync_testkit::NatsServer;
use std::io::Write;
use tokio_util::sync::CancellationToken;

/// Publishes N NDJSON puts through the producer on a private nats-server.
#[derive(clap::Parser)]
struct Args {
    /// Puts to publish.
    #[arg(default_value_t = 1_000_000)]
    n: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args { n } = <Args as clap::Parser>::parse();
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
    if std::env::var_os("PHASES").is_some() {
        phases(&input);
    }
    let mut settings = Settings {
        pipeline: "bench".into(),
        ..Settings::default()
    };
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

#[allow(dead_code)]
fn phases(input: &[u8]) {
    use deltasync_producer::ingest::{parse_line, Parsed};
    let t = std::time::Instant::now();
    let mut changes = Vec::with_capacity(1_000_000);
    for line in input.split(|b| *b == b'\n') {
        if let Ok(Parsed::Change(c)) = parse_line(line) {
            changes.push(c);
        }
    }
    let parse = t.elapsed();
    let t = std::time::Instant::now();
    let mut state = deltasync_core::State::new(Default::default());
    for chunk in changes.chunks(4096) {
        state.apply_changes(chunk);
    }
    let apply = t.elapsed();
    let t = std::time::Instant::now();
    let mut bytes = 0;
    for chunk in changes.chunks(4096) {
        let env = deltasync_core::envelope::split_transaction(
            Default::default(),
            1,
            state.digest(),
            0,
            chunk.to_vec(),
            1 << 30,
        );
        bytes += deltasync_core::codec::encode_envelope(&env[0]).map_or(0, |b| b.len());
    }
    let encode = t.elapsed();
    eprintln!("phases for {} changes: parse {parse:?}, apply {apply:?}, encode {encode:?} ({bytes} bytes)", changes.len());
}
