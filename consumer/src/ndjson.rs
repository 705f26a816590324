//! The replica's entries as NDJSON lines, shared by `dump`, `/v1/state` and `/v1/keys`. Not
//! the re-ingestible change line (`replay` writes that through `deltasync_core::ndjson`), but
//! built from its pieces: the key as a JSON string, bytes that are not JSON as `value_b64`.
//!
//! Talks to nothing; `dump` reads the data directory through `local`.
//!
//! ## Format
//!
//! ```text
//! {"key":"K","value":V}          V: the stored bytes when they are one JSON value (as
//!                                 `ingest` stores them), written on one line
//! {"key":"K","value_b64":"..."}  otherwise: standard base64 with padding
//! ```
//!
//! Lines are sorted by key in byte order. A JSON value is written as stored (surrounding
//! whitespace trimmed) when it is on one line, else re-serialized compactly, so every entry is
//! exactly one line.

use crate::local::{self, DumpError};
use deltasync_core::ndjson;
use deltasync_core::Position;
use std::io::Write;
use std::path::Path;

/// Appends the line of one entry (with its newline) to `out`.
pub fn write_line(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    out.extend_from_slice(b"{\"key\":");
    ndjson::write_json_str(out, key);
    match json_value(value) {
        Some(JsonValue::Raw(raw)) => {
            out.extend_from_slice(b",\"value\":");
            out.extend_from_slice(raw);
        }
        Some(JsonValue::Parsed(v)) => {
            out.extend_from_slice(b",\"value\":");
            let _ = serde_json::to_writer(&mut *out, &v);
        }
        None => {
            out.extend_from_slice(b",\"value_b64\":\"");
            base64(out, value);
            out.push(b'"');
        }
    }
    out.extend_from_slice(b"}\n");
}

/// The line of one entry, as a `String` without the newline (for `/v1/keys`).
pub fn line(key: &str, value: &[u8]) -> String {
    let mut out = Vec::with_capacity(key.len() + value.len() + 32);
    write_line(&mut out, key, value);
    out.pop();
    String::from_utf8(out).unwrap_or_default()
}

enum JsonValue<'a> {
    Raw(&'a [u8]),
    Parsed(serde_json::Value),
}

fn json_value(bytes: &[u8]) -> Option<JsonValue<'_>> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let trimmed = bytes.trim_ascii();
    if trimmed.contains(&b'\n') || trimmed.contains(&b'\r') {
        Some(JsonValue::Parsed(v))
    } else {
        Some(JsonValue::Raw(trimmed))
    }
}

/// Standard base64 (RFC 4648) with padding: the core's, as the re-ingestible line uses it.
pub use deltasync_core::ndjson::write_base64 as base64;

/// Writes the replica in `data_dir` as NDJSON to `out`, sorted by key, and returns its cursor.
/// Needs no NATS; opens the file read-only.
pub fn dump(data_dir: &Path, out: &mut impl Write) -> Result<Option<Position>, DumpError> {
    let mut buf = Vec::with_capacity(64 * 1024);
    let cursor = local::for_each_entry(data_dir, |k, v| {
        write_line(&mut buf, k, v);
        if buf.len() >= 60 * 1024 {
            out.write_all(&buf)?;
            buf.clear();
        }
        Ok(())
    })?;
    out.write_all(&buf).map_err(DumpError::Output)?;
    out.flush().map_err(DumpError::Output)?;
    Ok(cursor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_values_are_embedded_and_other_bytes_are_base64() {
        assert_eq!(
            line("k", br#"{"price": 1.5, "qty": [1,2]}"#),
            r#"{"key":"k","value":{"price": 1.5, "qty": [1,2]}}"#
        );
        assert_eq!(line("k", b" 42 "), r#"{"key":"k","value":42}"#);
        assert_eq!(line("k", b"\"s\""), r#"{"key":"k","value":"s"}"#);
        assert_eq!(
            line("k", b"{\n \"a\": 1\n}"),
            r#"{"key":"k","value":{"a":1}}"#
        );
        assert_eq!(
            line("k", b"not json"),
            r#"{"key":"k","value_b64":"bm90IGpzb24="}"#
        );
        assert_eq!(line("k", b""), r#"{"key":"k","value_b64":""}"#);
        assert_eq!(
            line("quote\"d\n", b"\xff"),
            r#"{"key":"quote\"d\n","value_b64":"/w=="}"#
        );
    }
}
