//! Writes N small NDJSON put lines to stdout (the ingest benchmark's input):
//! `cargo run --release -p deltasync-producer --example gen_ndjson -- 1000000 > /tmp/1m.ndjson`

use std::io::Write;

fn main() -> std::io::Result<()> {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    for i in 0..n {
        writeln!(
            out,
            r#"{{"op":"put","key":"key-{i:08}","value":{{"n":{i},"p":"{:x}"}}}}"#,
            i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40
        )?;
    }
    out.flush()
}
