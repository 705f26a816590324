//! The replica's entries as NDJSON lines, shared by `dump`, `/v1/state` and `/v1/keys`. Not
//! the re-ingestible change line (`replay` writes that through `deltasync_core::ndjson`), but
//! built from its pieces: the key as a JSON string, bytes that are not JSON as `value_b64`.
//!
//! Talks to nothing; `dump` reads the data directory through `local`.
//!
//! ## Format
//!
//! ```text
//! {"key":"K","value":V}          V: the stored bytes verbatim, when they are one JSON value
//!                                 on one line with no whitespace around it
//! {"key":"K","value_b64":"..."}  any other bytes: standard base64 with padding
//! ```
//!
//! Lines are sorted by key in byte order. Every line gives back exactly the stored bytes to a
//! reader that keeps a value's text as written (`PUT /v1/state`, the Python client): a JSON
//! value on several lines, or with whitespace around it, is written as `value_b64` rather
//! than re-serialized or trimmed, which would change its bytes (and the digest of a state
//! copied through `PUT /v1/state`).

use crate::local::{self, DumpError};
use deltasync_core::ndjson;
use deltasync_core::Position;
use std::io::Write;
use std::path::Path;

/// Appends the line of one entry (with its newline) to `out`.
pub fn write_line(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    out.extend_from_slice(b"{\"key\":");
    ndjson::write_json_str(out, key);
    if embeds_verbatim(value) {
        out.extend_from_slice(b",\"value\":");
        out.extend_from_slice(value);
    } else {
        out.extend_from_slice(b",\"value_b64\":\"");
        base64(out, value);
        out.push(b'"');
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

/// Whether `value` can stand as the line's `value` and be read back byte for byte by an
/// entry-line reader (which keeps a value's text as written, `ndjson::parse_entry_line`):
/// one JSON value on one line, without whitespace around it.
fn embeds_verbatim(value: &[u8]) -> bool {
    !value.is_empty()
        && value.trim_ascii().len() == value.len()
        && !value.iter().any(|&b| b == b'\n' || b == b'\r')
        && serde_json::from_slice::<serde::de::IgnoredAny>(value).is_ok()
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
    fn compact_json_values_are_embedded_and_all_other_bytes_are_base64() {
        assert_eq!(
            line("k", br#"{"price": 1.5, "qty": [1,2]}"#),
            r#"{"key":"k","value":{"price": 1.5, "qty": [1,2]}}"#
        );
        assert_eq!(line("k", b"\"s\""), r#"{"key":"k","value":"s"}"#);
        assert_eq!(line("k", b"42"), r#"{"key":"k","value":42}"#);
        // JSON a line cannot hold verbatim (several lines, whitespace around it): base64, not
        // re-serialized or trimmed.
        assert_eq!(line("k", b" 42 "), r#"{"key":"k","value_b64":"IDQyIA=="}"#);
        assert_eq!(
            line("k", b"{\n \"a\": 1\n}"),
            r#"{"key":"k","value_b64":"ewogImEiOiAxCn0="}"#
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

    #[test]
    fn every_line_parses_back_to_the_stored_bytes() {
        for value in [
            &b"{\"a\":1}"[..],
            b"{\"a\": [1, 2]}",
            b" 42 ",
            b"{\n \"a\": 1\n}",
            b"[1, 2]",
            b"\"caf\\u00e9\"",
            b"1.0e5",
            b"\xff\x00",
            b"",
        ] {
            let l = line("k", value);
            let parsed =
                ndjson::parse_entry_line(l.as_bytes()).unwrap_or_else(|e| panic!("{l}: {e}"));
            let (key, got) = parsed.unwrap_or_else(|| panic!("{l}: an entry"));
            assert_eq!((&*key, &got[..]), ("k", value), "{l}");
        }
    }
}
