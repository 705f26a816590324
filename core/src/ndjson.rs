//! The re-ingestible NDJSON line, read and written: what `deltasync-producer ingest` reads and
//! what `deltasync-consumer replay` prints. One place for the format, its reader (a fast
//! scanner for the common lines beside a general serde path) and its writer, tested against
//! each other.
//!
//! Talks to nothing. Uses serde_json (a pure crate) for the general path: its error messages
//! name what is wrong with a line, and the writer escapes keys and checks values with it.
//!
//! ## Format
//!
//! ```text
//! {"op":"put","key":"k1","value":{"any":"json"}}    value stored as its compact JSON bytes
//! {"op":"del","key":"k1"}
//! {"txn":[{"op":"put","key":"a","value":1},{"op":"del","key":"b"}]}   atomic
//! {"op":"put","key":"k2","value_b64":"AJ+Slg=="}     bytes that are not JSON (as replay prints them)
//! ```
//!
//! Lines may also carry `seq` and `lineage` (what replay prints); they are ignored. Blank
//! lines are skipped. Any other field is refused (a misspelt `vlaue` must not store nothing).
//!
//! ## Invariants
//!
//! - Whatever [`write_change`] or [`write_txn`] writes, [`parse_line`] reads back as exactly
//!   the same changes (keys and value bytes): a value is written as `value` only when it is
//!   compact JSON (which the reader keeps byte for byte), else as `value_b64`.
//! - Whatever the fast scanner ([`parse_plain`]) accepts, the general path accepts too and
//!   turns into the same change.

use crate::change::{MAX_KEY_BYTES, MAX_VALUE_BYTES};
use crate::{Change, Key};
use base64::Engine as _;
use bytes::Bytes;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// One parsed line.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    /// Nothing but whitespace.
    Blank,
    /// A put or delete.
    Change(Change),
    /// An atomic transaction.
    Txn(Vec<Change>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineFields<'a> {
    #[serde(borrow)]
    op: Option<&'a RawValue>,
    #[serde(borrow)]
    key: Option<&'a RawValue>,
    /// Present-but-null is a value (`null`), not a missing one: hence `present`.
    #[serde(borrow, default, deserialize_with = "present")]
    value: Option<&'a RawValue>,
    /// Bytes that are not JSON, base64 (RFC 4648, padded), as `replay` prints them.
    #[serde(borrow, default, deserialize_with = "present")]
    value_b64: Option<&'a RawValue>,
    #[serde(borrow)]
    txn: Option<&'a RawValue>,
    #[allow(dead_code)]
    seq: Option<IgnoredAny>,
    #[allow(dead_code)]
    lineage: Option<IgnoredAny>,
}

/// A field that is present, whatever its JSON value (serde maps a JSON `null` to `None` for a
/// plain `Option`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue as Deserialize<'de>>::deserialize(d).map(Some)
}

/// Parses one NDJSON line (without or with its line break); the error says what is wrong.
pub fn parse_line(line: &[u8]) -> Result<Parsed, String> {
    let trimmed = line.trim_ascii();
    if trimmed.is_empty() {
        return Ok(Parsed::Blank);
    }
    if let Some(plain) = parse_plain(trimmed) {
        return Ok(Parsed::Change(plain.into_change()));
    }
    parse_general(trimmed)
}

/// Any line, through serde (`trimmed` is not blank).
fn parse_general(trimmed: &[u8]) -> Result<Parsed, String> {
    if trimmed[0] != b'{' {
        return Err(match serde_json::from_slice::<IgnoredAny>(trimmed) {
            Ok(_) => format!("expected a JSON object, got {}", kind_of_bytes(trimmed)),
            Err(e) => invalid_json(&e),
        });
    }
    let fields: LineFields<'_> = serde_json::from_slice(trimmed).map_err(|e| {
        if e.is_data() {
            json_message(&e)
        } else {
            invalid_json(&e)
        }
    })?;
    match fields.txn {
        Some(txn) => {
            if fields.op.is_some()
                || fields.key.is_some()
                || fields.value.is_some()
                || fields.value_b64.is_some()
            {
                return Err("a `txn` line carries no `op`, `key` or `value` of its own".into());
            }
            let items: Vec<&RawValue> = serde_json::from_str(txn.get())
                .map_err(|_| format!("`txn` must be an array, got {}", kind_of(txn)))?;
            if items.is_empty() {
                return Err("empty txn: a transaction needs at least one change".into());
            }
            let mut changes = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let at = |reason: String| format!("txn item {}: {reason}", i + 1);
                if !item.get().starts_with('{') {
                    return Err(at(format!("expected a JSON object, got {}", kind_of(item))));
                }
                let f: LineFields<'_> =
                    serde_json::from_str(item.get()).map_err(|e| at(json_message(&e)))?;
                if f.txn.is_some() {
                    return Err(at("transactions do not nest".into()));
                }
                changes.push(change_of(&f).map_err(at)?);
            }
            Ok(Parsed::Txn(changes))
        }
        None => change_of(&fields).map(Parsed::Change),
    }
}

/// The fast path for the common lines, `{"op":"put","key":K,"value":V}` and
/// `{"op":"del","key":K}` written compactly (no whitespace outside strings) with a key free
/// of escapes: parsed in one pass without serde. `None` for anything else, valid or not —
/// [`parse_line`]'s general path then decides, with its error messages. Whatever it accepts,
/// the general path accepts too and turns into the same change.
pub fn parse_plain(line: &[u8]) -> Option<Plain<'_>> {
    // Valid UTF-8 as a whole, so every piece cut at an ASCII byte is valid too.
    std::str::from_utf8(line).ok()?;
    let rest = line.strip_prefix(br#"{"op":""#)?;
    let (put, rest) = match rest.strip_prefix(br#"put","key":""#) {
        Some(r) => (true, r),
        None => (false, rest.strip_prefix(br#"del","key":""#)?),
    };
    // The key ends at its closing quote; an escape or a control character (which JSON
    // refuses in strings) sends the line to the general path.
    let end = string_stop(rest, 0);
    if rest.get(end) != Some(&b'"') || end > MAX_KEY_BYTES {
        return None;
    }
    let key = std::str::from_utf8(&rest[..end]).ok()?;
    let rest = &rest[end + 1..];
    if put {
        let value = rest.strip_prefix(br#","value":"#)?.strip_suffix(b"}")?;
        if value.len() > MAX_VALUE_BYTES || json_value_end(value)? != value.len() {
            return None;
        }
        Some(Plain {
            key,
            value: Some(value),
        })
    } else {
        (rest == b"}").then_some(Plain { key, value: None })
    }
}

/// A line [`parse_plain`] took, borrowed from it.
#[derive(Debug)]
pub struct Plain<'a> {
    /// The key.
    pub key: &'a str,
    /// The value's compact JSON; `None` for a delete.
    pub value: Option<&'a [u8]>,
}

impl Plain<'_> {
    /// The change it stands for (the value copied).
    pub fn into_change(self) -> Change {
        let key = Key::from(self.key);
        match self.value {
            Some(v) => Change::Put {
                key,
                value: Bytes::copy_from_slice(v),
            },
            None => Change::Delete { key },
        }
    }
}

/// Where the JSON value starting at `v[0]` ends, when it is valid JSON (RFC 8259, as
/// serde_json reads it) with no whitespace outside its strings and at most 64 levels of
/// nesting; `None` otherwise (not necessarily invalid: the general path decides).
fn json_value_end(v: &[u8]) -> Option<usize> {
    const MAX_DEPTH: usize = 64;
    // Open containers: `true` for an object.
    let mut stack = [false; MAX_DEPTH];
    let mut depth = 0;
    let mut i = 0;
    'value: loop {
        match *v.get(i)? {
            open @ (b'{' | b'[') => {
                let object = open == b'{';
                i += 1;
                if v.get(i) == Some(if object { &b'}' } else { &b']' }) {
                    i += 1;
                } else {
                    if depth == MAX_DEPTH {
                        return None;
                    }
                    stack[depth] = object;
                    depth += 1;
                    if object {
                        i = member_name_end(v, i)?;
                    }
                    continue 'value;
                }
            }
            b'"' => i = json_string_end(v, i)?,
            b't' => i = literal_end(v, i, b"true")?,
            b'f' => i = literal_end(v, i, b"false")?,
            b'n' => i = literal_end(v, i, b"null")?,
            b'-' | b'0'..=b'9' => i = json_number_end(v, i)?,
            _ => return None,
        }
        // A value ended: close containers, or go on after a comma.
        loop {
            if depth == 0 {
                return Some(i);
            }
            let object = stack[depth - 1];
            match *v.get(i)? {
                b',' => {
                    i += 1;
                    if object {
                        i = member_name_end(v, i)?;
                    }
                    continue 'value;
                }
                b'}' if object => {}
                b']' if !object => {}
                _ => return None,
            }
            i += 1;
            depth -= 1;
        }
    }
}

/// After `"name":` starting at `v[i]`.
fn member_name_end(v: &[u8], i: usize) -> Option<usize> {
    let i = json_string_end(v, i)?;
    (*v.get(i)? == b':').then_some(i + 1)
}

/// After the string starting at `v[i]` (its opening quote).
fn json_string_end(v: &[u8], mut i: usize) -> Option<usize> {
    if *v.get(i)? != b'"' {
        return None;
    }
    i += 1;
    loop {
        i = string_stop(v, i);
        match *v.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => match *v.get(i + 1)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                b'u' => {
                    if !v.get(i + 2..i + 6)?.iter().all(u8::is_ascii_hexdigit) {
                        return None;
                    }
                    i += 6;
                }
                _ => return None,
            },
            _ => return None,
        }
    }
}

/// The first index from `i` holding a byte that stops a JSON string scan — `"`, `\` or a
/// control character — or `v.len()`; eight bytes at a time.
fn string_stop(v: &[u8], mut i: usize) -> usize {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    /// High bit set in the bytes of `x` below `n` (n ≤ 128); exact for the lowest such byte.
    fn below(x: u64, n: u8) -> u64 {
        x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH
    }
    while let Some(word) = v.get(i..i + 8) {
        let mut w = [0; 8];
        w.copy_from_slice(word);
        let x = u64::from_le_bytes(w);
        let hits = below(x ^ (ONES * u64::from(b'"')), 1)
            | below(x ^ (ONES * u64::from(b'\\')), 1)
            | below(x, 0x20);
        if hits != 0 {
            return i + (hits.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < v.len() && !matches!(v[i], b'"' | b'\\' | 0..=0x1f) {
        i += 1;
    }
    i
}

/// After the number starting at `v[i]`: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
fn json_number_end(v: &[u8], mut i: usize) -> Option<usize> {
    let digits = |v: &[u8], i: usize| {
        v.get(i..)
            .map_or(0, |r| r.iter().take_while(|b| b.is_ascii_digit()).count())
    };
    if v.get(i) == Some(&b'-') {
        i += 1;
    }
    match *v.get(i)? {
        b'0' => i += 1,
        b'1'..=b'9' => i += digits(v, i),
        _ => return None,
    }
    if v.get(i) == Some(&b'.') {
        let n = digits(v, i + 1);
        if n == 0 {
            return None;
        }
        i += 1 + n;
    }
    if matches!(v.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(v.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let n = digits(v, i);
        if n == 0 {
            return None;
        }
        i += n;
    }
    // A digit right after a leading zero ("01") is not JSON.
    (!v.get(i).is_some_and(u8::is_ascii_digit)).then_some(i)
}

fn literal_end(v: &[u8], i: usize, word: &[u8]) -> Option<usize> {
    let end = i + word.len();
    (v.get(i..end)? == word).then_some(end)
}

fn change_of(f: &LineFields<'_>) -> Result<Change, String> {
    let op = f.op.ok_or("missing `op` (\"put\" or \"del\") or `txn`")?;
    let op_str =
        json_str(op).ok_or_else(|| format!("`op` must be a string, got {}", kind_of(op)))?;
    let key = |raw: Option<&RawValue>| -> Result<Key, String> {
        let raw = raw.ok_or("missing `key`")?;
        json_str(raw)
            .map(|k| Key::from(&*k))
            .ok_or_else(|| format!("`key` must be a string, got {}", kind_of(raw)))
    };
    let change = match &*op_str {
        "put" => {
            let k = key(f.key)?;
            let value = match (f.value, f.value_b64) {
                (Some(v), None) => compact(v.get()),
                (None, Some(b64)) => {
                    let text = json_str(b64).ok_or_else(|| {
                        format!("`value_b64` must be a string, got {}", kind_of(b64))
                    })?;
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(text.as_bytes())
                        .map_err(|e| format!("`value_b64` is not base64: {e}"))?;
                    Bytes::from(bytes)
                }
                (Some(_), Some(_)) => {
                    return Err("op \"put\" takes `value` or `value_b64`, not both".into())
                }
                (None, None) => {
                    return Err(
                        "missing `value` (any JSON value) or `value_b64` for op \"put\"".into(),
                    )
                }
            };
            Change::Put { key: k, value }
        }
        "del" => {
            if f.value.is_some() || f.value_b64.is_some() {
                return Err("op \"del\" takes no `value`".into());
            }
            Change::Delete { key: key(f.key)? }
        }
        other => {
            return Err(format!(
                "unknown op {other:?} (expected \"put\" or \"del\")"
            ))
        }
    };
    change.validate().map_err(|e| e.to_string())?;
    Ok(change)
}

/// The string a JSON value holds, borrowed when it has no escapes; `None` when the value is
/// not a string.
fn json_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    let s = raw.get();
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    if !inner.contains('\\') {
        // A valid JSON string without escapes is its own content.
        return Some(Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(s).ok().map(Cow::Owned)
}

/// The compact JSON bytes of a valid JSON text: whitespace outside strings removed, object
/// key order kept.
fn compact(json: &str) -> Bytes {
    if !json
        .bytes()
        .any(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        return Bytes::copy_from_slice(json.as_bytes());
    }
    let mut out = Vec::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in json.as_bytes() {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            if b == b'"' {
                in_string = true;
            }
            out.push(b);
        }
    }
    Bytes::from(out)
}

fn kind_of(raw: &RawValue) -> &'static str {
    kind_of_bytes(raw.get().as_bytes())
}

fn kind_of_bytes(b: &[u8]) -> &'static str {
    match b.first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

fn invalid_json(e: &serde_json::Error) -> String {
    format!("invalid JSON at column {}: {}", e.column(), json_message(e))
}

/// serde_json's message without its "at line 1 column N" suffix (the line is ours to name).
fn json_message(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    full.strip_suffix(&suffix).unwrap_or(&full).to_owned()
}

/// Appends one change as a line of its own (`{"op":"put",..}` or `{"op":"del",..}`, with the
/// newline) to `out`.
pub fn write_change_line(out: &mut Vec<u8>, change: &Change) {
    write_change(out, change);
    out.push(b'\n');
}

/// Appends one transaction as replay prints it, `{"seq":S,"lineage":"L","txn":[..]}` with the
/// newline, to `out`; `ingest` reads it back as one atomic transaction of the same changes.
pub fn write_txn<'a>(
    out: &mut Vec<u8>,
    seq: u64,
    lineage: &str,
    changes: impl IntoIterator<Item = &'a Change>,
) {
    out.extend_from_slice(b"{\"seq\":");
    out.extend_from_slice(seq.to_string().as_bytes());
    out.extend_from_slice(b",\"lineage\":");
    write_json_str(out, lineage);
    out.extend_from_slice(b",\"txn\":[");
    for (i, c) in changes.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_change(out, c);
    }
    out.extend_from_slice(b"]}\n");
}

/// Appends one change's object (no newline) to `out`.
pub fn write_change(out: &mut Vec<u8>, change: &Change) {
    match change {
        Change::Delete { key } => {
            out.extend_from_slice(b"{\"op\":\"del\",\"key\":");
            write_json_str(out, key);
            out.push(b'}');
        }
        Change::Put { key, value } => {
            out.extend_from_slice(b"{\"op\":\"put\",\"key\":");
            write_json_str(out, key);
            if reads_back_as_itself(value) {
                out.extend_from_slice(b",\"value\":");
                out.extend_from_slice(value);
            } else {
                out.extend_from_slice(b",\"value_b64\":\"");
                write_base64(out, value);
                out.push(b'"');
            }
            out.push(b'}');
        }
    }
}

/// Whether `value`, written as a line's `value`, is read back as the same bytes: one valid
/// JSON value, compact (the reader drops whitespace outside strings). Bytes that are not are
/// written as `value_b64`, so that every line this crate's writers make is byte-exact.
fn reads_back_as_itself(value: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(value) else {
        return false;
    };
    serde_json::from_str::<IgnoredAny>(text).is_ok() && compact(text).as_ref() == value
}

/// Appends `s` as a JSON string.
pub fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // Serializing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Appends `input` as standard base64 (RFC 4648) with padding, as `value_b64` carries it.
pub fn write_base64(out: &mut Vec<u8>, input: &[u8]) {
    let start = out.len();
    out.resize(start + input.len().div_ceil(3) * 4, 0);
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(input, &mut out[start..])
        .unwrap_or(0);
    out.truncate(start + written);
}

/// The fields of an entry line, `{"key":K,"value":V}` or `{"key":K,"value_b64":B}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryFields<'a> {
    #[serde(borrow)]
    key: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    value: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    value_b64: Option<&'a RawValue>,
}

/// Parses one entry line of a whole state, as a consumer's `GET /v1/state` and `dump` print
/// it: `{"key":K,"value":V}` (V stored as its JSON text exactly as written, so a state
/// copied line by line keeps every value's bytes) or `{"key":K,"value_b64":B}`. `None` for
/// a blank line; the error says what is wrong.
pub fn parse_entry_line(line: &[u8]) -> Result<Option<(Key, Bytes)>, String> {
    let trimmed = line.trim_ascii();
    if trimmed.is_empty() {
        return Ok(None);
    }
    if trimmed[0] != b'{' {
        return Err(match serde_json::from_slice::<IgnoredAny>(trimmed) {
            Ok(_) => format!("expected a JSON object, got {}", kind_of_bytes(trimmed)),
            Err(e) => invalid_json(&e),
        });
    }
    let f: EntryFields<'_> = serde_json::from_slice(trimmed).map_err(|e| {
        if e.is_data() {
            json_message(&e)
        } else {
            invalid_json(&e)
        }
    })?;
    let raw = f.key.ok_or("missing `key`")?;
    let key = json_str(raw)
        .map(|k| Key::from(&*k))
        .ok_or_else(|| format!("`key` must be a string, got {}", kind_of(raw)))?;
    let value = match (f.value, f.value_b64) {
        (Some(v), None) => Bytes::copy_from_slice(v.get().as_bytes()),
        (None, Some(b64)) => {
            let text = json_str(b64)
                .ok_or_else(|| format!("`value_b64` must be a string, got {}", kind_of(b64)))?;
            Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(text.as_bytes())
                    .map_err(|e| format!("`value_b64` is not base64: {e}"))?,
            )
        }
        (Some(_), Some(_)) => return Err("an entry takes `value` or `value_b64`, not both".into()),
        (None, None) => {
            return Err("missing `value` (any JSON value) or `value_b64`".into());
        }
    };
    let change = Change::Put { key, value };
    change.validate().map_err(|e| e.to_string())?;
    match change {
        Change::Put { key, value } => Ok(Some((key, value))),
        Change::Delete { .. } => Err("not an entry".into()),
    }
}

#[cfg(test)]
mod tests {

    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn entry_lines_read_as_key_and_value_bytes_exactly_as_written() {
        let (k, v) = parse_entry_line(br#"{"key":"a","value":{"x": 1}}"#)
            .unwrap()
            .unwrap();
        assert_eq!((&*k, &v[..]), ("a", &br#"{"x": 1}"#[..]));
        let (k, v) = parse_entry_line(b"{\"key\":\"b\\u00e9\",\"value_b64\":\"AJ+Slg==\"}\n")
            .unwrap()
            .unwrap();
        assert_eq!((&*k, &v[..]), ("b\u{e9}", &[0x00, 0x9f, 0x92, 0x96][..]));
        assert_eq!(parse_entry_line(b"  \n").unwrap(), None);
        for (line, want) in [
            (&br#"{"key":"a"}"#[..], "missing `value`"),
            (br#"{"value":1}"#, "missing `key`"),
            (br#"{"key":1,"value":1}"#, "`key` must be a string"),
            (br#"{"key":"a","value":1,"value_b64":"AA=="}"#, "not both"),
            (br#"{"key":"a","vlaue":1}"#, "unknown field `vlaue`"),
            (br#"{"key":"a","value_b64":"!"}"#, "not base64"),
            (br#"[1]"#, "expected a JSON object"),
            (br#"{"key":"a","value":"#, "invalid JSON"),
        ] {
            let err = parse_entry_line(line).unwrap_err();
            assert!(
                err.contains(want),
                "{}: {err}",
                String::from_utf8_lossy(line)
            );
        }
    }

    fn change(line: &str) -> Change {
        match parse_line(line.as_bytes()) {
            Ok(Parsed::Change(c)) => c,
            other => panic!("{line}: {other:?}"),
        }
    }

    fn error(line: &str) -> String {
        match parse_line(line.as_bytes()) {
            Err(e) => e,
            other => panic!("{line} parsed: {other:?}"),
        }
    }

    #[test]
    fn a_null_value_is_stored_as_null_not_refused_as_missing() {
        assert_eq!(
            change(r#"{"op":"put","key":"a","value":null}"#),
            Change::put("a", &b"null"[..])
        );
    }

    #[test]
    fn value_b64_carries_bytes_that_are_not_json() {
        assert_eq!(
            change(r#"{"op":"put","key":"bin","value_b64":"AJ+Slg=="}"#),
            Change::put("bin", &[0u8, 159, 146, 150][..])
        );
        assert!(error(r#"{"op":"put","key":"k","value_b64":"***"}"#).contains("not base64"));
        assert!(
            error(r#"{"op":"put","key":"k","value":1,"value_b64":"AA=="}"#).contains("not both")
        );
        assert!(error(r#"{"op":"del","key":"k","value_b64":"AA=="}"#).contains("takes no `value`"));
    }

    #[test]
    fn puts_store_the_compact_json_of_any_value() {
        assert_eq!(
            change(r#"{"op":"put","key":"a","value":{"x": [1, 2], "s": "a b"}}"#),
            Change::put("a", &br#"{"x":[1,2],"s":"a b"}"#[..])
        );
        assert_eq!(
            change(r#"{"op":"put","key":"a","value":5}"#),
            Change::put("a", &b"5"[..])
        );
        assert_eq!(
            change(r#"{"op":"put","key":"a\"b","value":"v"}"#),
            Change::put("a\"b", &br#""v""#[..])
        );
        assert_eq!(change(r#"{"op":"del","key":"a"}"#), Change::delete("a"));
    }

    #[test]
    fn replay_fields_are_ignored_and_blank_lines_skipped() {
        assert_eq!(
            change(r#"{"seq":4,"lineage":"00ff","op":"del","key":"a"}"#),
            Change::delete("a")
        );
        assert_eq!(parse_line(b"  \r\n"), Ok(Parsed::Blank));
    }

    #[test]
    fn a_txn_is_parsed_whole() {
        let parsed =
            parse_line(br#"{"txn":[{"op":"put","key":"a","value":1},{"op":"del","key":"b"}]}"#);
        assert_eq!(
            parsed,
            Ok(Parsed::Txn(vec![
                Change::put("a", &b"1"[..]),
                Change::delete("b")
            ]))
        );
    }

    /// Lines the fast path may take: whenever it does, the general path gives the same.
    const TRICKY: &[&str] = &[
        r#"{"op":"put","key":"k","value":{"n":1,"p":"9e3779...."}}"#,
        r#"{"op":"put","key":"k","value":[1,-2.5e+3,0,-0,0.0,1E9,true,false,null,"",{},[]]}"#,
        r#"{"op":"put","key":"k","value":{"a":{"b":[{"c":"\"\\\/\b\f\n\r\t\u00e9"}]}}}"#,
        r#"{"op":"put","key":"k","value":"a b\u12"}"#,
        r#"{"op":"put","key":"k","value":"\x"}"#,
        r#"{"op":"put","key":"k","value":01}"#,
        r#"{"op":"put","key":"k","value":1.}"#,
        r#"{"op":"put","key":"k","value":1e}"#,
        r#"{"op":"put","key":"k","value":-}"#,
        r#"{"op":"put","key":"k","value":.5}"#,
        r#"{"op":"put","key":"k","value":tru}"#,
        r#"{"op":"put","key":"k","value":nulll}"#,
        r#"{"op":"put","key":"k","value":{"a"}}"#,
        r#"{"op":"put","key":"k","value":{"a":}}"#,
        r#"{"op":"put","key":"k","value":{"a":1,}}"#,
        r#"{"op":"put","key":"k","value":[1,]}"#,
        r#"{"op":"put","key":"k","value":[1}}"#,
        r#"{"op":"put","key":"k","value":{1:2}}"#,
        r#"{"op":"put","key":"k","value":1}}"#,
        r#"{"op":"put","key":"k","value":1 }"#,
        r#"{"op":"put","key":"k","value":"é ü"}"#,
        r#"{"op":"put","key":"ké","value":{ "a": 1 }}"#,
        r#"{"op":"put","key":"k\"","value":1}"#,
        r#"{"op":"put","key":"k","value":1,"seq":3}"#,
        r#"{"op":"put","key":"k"}"#,
        r#"{"op":"put","key":"k","value":"x","value":"y"}"#,
        r#"{"op":"del","key":"k"}"#,
        r#"{"op":"del","key":"k","value":1}"#,
        r#"{"op":"del","key":"k"}}"#,
        r#"{"op":"del","key":""}"#,
        "{\"op\":\"put\",\"key\":\"k\",\"value\":\"a\tb\"}",
        "{\"op\":\"put\",\"key\":\"k\x01\",\"value\":1}",
    ];

    fn agrees(line: &[u8]) {
        if let Some(fast) = parse_plain(line) {
            assert_eq!(
                parse_general(line),
                Ok(Parsed::Change(fast.into_change())),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn the_fast_path_agrees_with_the_general_one() {
        for line in TRICKY {
            agrees(line.as_bytes());
        }
        // Random mutations of valid lines: every byte changed, removed or repeated.
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let alphabet = b"{}[]\",:.-+eE019tfnulsr\\u a\x01\xc3\xa9";
        for line in TRICKY {
            let line = line.as_bytes();
            for _ in 0..2000 {
                let mut m = line.to_vec();
                for _ in 0..1 + (rng % 3) {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let at = (rng % m.len() as u64) as usize;
                    let b = alphabet[((rng >> 32) % alphabet.len() as u64) as usize];
                    match (rng >> 8) % 3 {
                        0 => m[at] = b,
                        1 => {
                            m.remove(at);
                        }
                        _ => m.insert(at, b),
                    }
                }
                agrees(&m);
            }
        }
    }

    #[test]
    fn string_stop_finds_the_first_quote_backslash_or_control_byte() {
        for len in 0..20 {
            for at in 0..=len {
                for stop in [b'"', b'\\', 0, 0x1f] {
                    // Bytes around the stops that must not stop the scan.
                    let mut v: Vec<u8> = (0..len)
                        .map(|i| [b'a', 0x20, 0x7f, 0xc3, 0xff][i % 5])
                        .collect();
                    if at < len {
                        v[at] = stop;
                        v.extend_from_slice(b"\"\\\x01");
                    }
                    for from in 0..=at.min(v.len()) {
                        assert_eq!(string_stop(&v, from), at, "{v:?} from {from}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_fast_path_takes_the_common_lines() {
        for line in [
            r#"{"op":"put","key":"key-00000001","value":{"n":1,"p":"9e3779.."}}"#,
            r#"{"op":"put","key":"k","value":{"x":[1,2],"s":"a b","e":"\"q\""}}"#,
            r#"{"op":"put","key":"k","value":-12.5e-3}"#,
            r#"{"op":"del","key":"k"}"#,
        ] {
            assert!(parse_plain(line.as_bytes()).is_some(), "{line}");
        }
    }

    #[test]
    fn every_bad_line_kind_is_named() {
        assert!(
            error("{\"op\":").starts_with("invalid JSON"),
            "{}",
            error("{\"op\":")
        );
        assert!(error("not json").starts_with("invalid JSON"));
        assert_eq!(error("[1]"), "expected a JSON object, got an array");
        assert!(error(r#"{"op":"upsert","key":"a"}"#).contains("unknown op \"upsert\""));
        assert_eq!(error(r#"{"op":"put","value":1}"#), "missing `key`");
        assert_eq!(
            error(r#"{"op":"put","key":1,"value":1}"#),
            "`key` must be a string, got a number"
        );
        assert_eq!(
            error(r#"{"op":5,"key":"a"}"#),
            "`op` must be a string, got a number"
        );
        assert!(error(r#"{"op":"put","key":"a"}"#).contains("missing `value`"));
        assert!(error(r#"{"key":"a"}"#).contains("missing `op`"));
        assert!(
            error(&format!(r#"{{"op":"del","key":"{}"}}"#, "k".repeat(1025)))
                .contains("key is 1025 bytes")
        );
        let big = format!(
            r#"{{"op":"put","key":"a","value":"{}"}}"#,
            "v".repeat(512 * 1024)
        );
        assert!(
            error(&big).contains("value of 524290 bytes"),
            "{}",
            error(&big)
        );
        assert_eq!(
            error(r#"{"txn":[]}"#),
            "empty txn: a transaction needs at least one change"
        );
        assert_eq!(
            error(r#"{"txn":{}}"#),
            "`txn` must be an array, got an object"
        );
        assert!(error(
            r#"{"txn":[{"op":"put","key":"a","value":1},{"op":"put","key":2,"value":1}]}"#
        )
        .starts_with("txn item 2: `key` must be a string"));
        assert!(error(r#"{"op":"put","key":"a","vlaue":1}"#).contains("unknown field `vlaue`"));
    }

    fn b64(s: &[u8]) -> String {
        let mut out = Vec::new();
        write_base64(&mut out, s);
        String::from_utf8(out).unwrap()
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

    fn written(c: &Change) -> String {
        let mut out = Vec::new();
        write_change(&mut out, c);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn compact_json_values_are_written_as_json_and_everything_else_as_base64() {
        assert_eq!(
            written(&Change::put("a", &br#"{"px":1.5,"qty":[1,2]}"#[..])),
            r#"{"op":"put","key":"a","value":{"px":1.5,"qty":[1,2]}}"#
        );
        assert_eq!(
            written(&Change::put("bin", &[0u8, 159, 146, 150][..])),
            r#"{"op":"put","key":"bin","value_b64":"AJ+Slg=="}"#
        );
        // Read back compacted, these would not be the same bytes.
        assert_eq!(
            written(&Change::put("k", &b" 42"[..])),
            r#"{"op":"put","key":"k","value_b64":"IDQy"}"#
        );
        assert_eq!(
            written(&Change::put("k", &b""[..])),
            r#"{"op":"put","key":"k","value_b64":""}"#
        );
        assert_eq!(
            written(&Change::delete("q\"\n")),
            r#"{"op":"del","key":"q\"\n"}"#
        );
        let mut out = Vec::new();
        write_txn(
            &mut out,
            7,
            "00ff",
            &[Change::put("a", &b"1"[..]), Change::delete("b")],
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"seq\":7,\"lineage\":\"00ff\",\"txn\":[{\"op\":\"put\",\"key\":\"a\",\"value\":1},{\"op\":\"del\",\"key\":\"b\"}]}\n"
        );
    }

    mod model {
        use super::super::*;
        use proptest::prelude::*;

        fn key() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-z0-9/_-]{0,12}",
                // Quotes, backslashes, control characters, non-ASCII.
                proptest::collection::vec(
                    prop_oneof![
                        Just('"'),
                        Just('\\'),
                        Just('\n'),
                        Just('\u{1}'),
                        Just('é'),
                        Just('/'),
                        any::<char>()
                    ],
                    0..12
                )
                .prop_map(|c| c.into_iter().collect()),
            ]
        }

        fn value() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                // Any bytes (not UTF-8, empty).
                proptest::collection::vec(any::<u8>(), 0..24),
                // JSON, compact or not, with escapes inside strings.
                (any::<i64>(), "[a-z \"\\\\]{0,8}", any::<bool>()).prop_map(|(n, s, spaced)| {
                    let j = serde_json::json!({"n": n, "s": s, "a": [1, null, true]});
                    if spaced {
                        serde_json::to_vec_pretty(&j).unwrap()
                    } else {
                        serde_json::to_vec(&j).unwrap()
                    }
                }),
                "[a-z]{0,6}".prop_map(|s| format!("\"{s}\"").into_bytes()),
                Just(b"null".to_vec()),
                Just(b"-0.5e3".to_vec()),
            ]
        }

        fn change() -> impl Strategy<Value = Change> {
            (key(), proptest::option::of(value())).prop_map(|(k, v)| match v {
                Some(v) => Change::put(k, v),
                None => Change::delete(k),
            })
        }

        proptest! {
            #[test]
            fn what_the_writer_writes_the_reader_reads_back_exactly(c in change()) {
                let mut line = Vec::new();
                write_change_line(&mut line, &c);
                prop_assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
                prop_assert_eq!(parse_line(&line), Ok(Parsed::Change(c.clone())));
                // The fast scanner, when it takes the line, reads the same change.
                if let Some(plain) = parse_plain(line.trim_ascii()) {
                    prop_assert_eq!(plain.into_change(), c);
                }
            }

            #[test]
            fn a_written_transaction_reads_back_as_the_same_transaction(
                changes in proptest::collection::vec(change(), 1..8),
                seq in any::<u64>(),
            ) {
                let mut line = Vec::new();
                write_txn(&mut line, seq, "00ff", &changes);
                prop_assert_eq!(parse_line(&line), Ok(Parsed::Txn(changes)));
            }
        }
    }
}
