//! Writes N NDJSON put lines to stdout (the ingest benchmark's input), each value a JSON
//! object of `--value-bytes` bytes (default 100, the benchmark target's value size):
//! `cargo run --release -p deltasync-producer --example gen_ndjson -- 1000000 > /tmp/1m.ndjson`
//! (`-- 1000000 --value-bytes 24` for small values).

use std::io::Write;

/// Writes N NDJSON put lines to stdout.
#[derive(clap::Parser)]
struct Args {
    /// Lines to write.
    #[arg(default_value_t = 1_000_000)]
    n: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
}

fn main() -> std::io::Result<()> {
    let Args { n, value_bytes } = <Args as clap::Parser>::parse();
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    let mut value = Vec::with_capacity(value_bytes + 64);
    for i in 0..n {
        // `{"n":<i>,"p":"<hex, padded with '.' to value_bytes>"}`
        value.clear();
        write!(
            value,
            r#"{{"n":{i},"p":"{:x}"#,
            i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40
        )?;
        let fill = value_bytes.saturating_sub(value.len() + 2);
        value.resize(value.len() + fill, b'.');
        value.extend_from_slice(br#""}"#);
        out.write_all(br#"{"op":"put","key":"key-"#)?;
        write!(out, "{i:08}")?;
        out.write_all(br#"","value":"#)?;
        out.write_all(&value)?;
        out.write_all(b"}\n")?;
    }
    out.flush()
}
