//! The replica's entries as NDJSON lines, shared by `dump`, `/v1/state` and `/v1/keys`.
//!
//! Talks to nothing; `dump` reads the redb file through `local`.
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
use deltasync_core::Position;
use std::io::Write;
use std::path::Path;

/// Appends the line of one entry (with its newline) to `out`.
pub fn write_line(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    out.extend_from_slice(b"{\"key\":");
    // Serializing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, key);
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

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 (RFC 4648) with padding.
pub fn base64(out: &mut Vec<u8>, input: &[u8]) {
    let mut chunks = input.chunks_exact(3);
    for c in &mut chunks {
        let n = (u32::from(c[0]) << 16) | (u32::from(c[1]) << 8) | u32::from(c[2]);
        for shift in [18, 12, 6, 0] {
            out.push(ALPHABET[((n >> shift) & 63) as usize]);
        }
    }
    match *chunks.remainder() {
        [a] => {
            let n = u32::from(a) << 16;
            out.push(ALPHABET[((n >> 18) & 63) as usize]);
            out.push(ALPHABET[((n >> 12) & 63) as usize]);
            out.extend_from_slice(b"==");
        }
        [a, b] => {
            let n = (u32::from(a) << 16) | (u32::from(b) << 8);
            out.push(ALPHABET[((n >> 18) & 63) as usize]);
            out.push(ALPHABET[((n >> 12) & 63) as usize]);
            out.push(ALPHABET[((n >> 6) & 63) as usize]);
            out.push(b'=');
        }
        _ => {}
    }
}

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

    fn b64(s: &[u8]) -> String {
        let mut out = Vec::new();
        base64(&mut out, s);
        String::from_utf8(out).unwrap_or_default()
    }

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(b64(input.as_bytes()), want);
        }
        assert_eq!(b64(&[0xff, 0xfe, 0x00]), "//4A");
    }

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
