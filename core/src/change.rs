//! One change to the keyed state — put or delete — with the protocol's size limits.
//!
//! Keys are UTF-8 strings of at most [`MAX_KEY_BYTES`] bytes; values are opaque bytes of at
//! most [`MAX_VALUE_BYTES`]. A single change must fit in one NATS message, which is why values
//! are capped well below the server's default 1 MiB `max_payload`; a transaction of many
//! changes may still exceed one message and is then split into parts (see `envelope`).

use bytes::Bytes;
use std::sync::Arc;

/// Longest key accepted, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 1024;

/// Largest value accepted, in bytes.
pub const MAX_VALUE_BYTES: usize = 512 * 1024;

/// A key: shared, immutable UTF-8 so that replicas and snapshots clone it for the price of a
/// reference count.
pub type Key = Arc<str>;

/// One change to the state.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Change {
    /// Set `key` to `value`, inserting it when absent.
    Put { key: Key, value: Bytes },
    /// Remove `key`; removing an absent key is a no-op.
    Delete { key: Key },
}

/// A change that breaks the size limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error("key is {len} bytes, the limit is {MAX_KEY_BYTES}")]
    KeyTooLong { len: usize },
    #[error("key {key:?} has a value of {len} bytes, the limit is {MAX_VALUE_BYTES}")]
    ValueTooLarge { key: String, len: usize },
}

/// Checks a key against the size limit.
pub fn check_key(key: &str) -> Result<(), ChangeError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(ChangeError::KeyTooLong { len: key.len() });
    }
    Ok(())
}

/// Checks a put's key and value against the size limits ([`Change::validate`] of a put).
pub fn check_put(key: &str, value: &[u8]) -> Result<(), ChangeError> {
    check_key(key)?;
    if value.len() > MAX_VALUE_BYTES {
        let shown: String = key.chars().take(64).collect();
        return Err(ChangeError::ValueTooLarge {
            key: shown,
            len: value.len(),
        });
    }
    Ok(())
}

impl Change {
    /// A put, from anything that converts into a key and bytes.
    pub fn put(key: impl Into<Key>, value: impl Into<Bytes>) -> Change {
        Change::Put {
            key: key.into(),
            value: value.into(),
        }
    }

    /// A delete.
    pub fn delete(key: impl Into<Key>) -> Change {
        Change::Delete { key: key.into() }
    }

    /// The key this change touches.
    pub fn key(&self) -> &str {
        match self {
            Change::Put { key, .. } | Change::Delete { key } => key,
        }
    }

    /// The value put, `None` for a delete.
    pub fn value(&self) -> Option<&Bytes> {
        match self {
            Change::Put { value, .. } => Some(value),
            Change::Delete { .. } => None,
        }
    }

    /// Checks the size limits.
    pub fn validate(&self) -> Result<(), ChangeError> {
        match self {
            Change::Put { key, value } => check_put(key, value),
            Change::Delete { key } => check_key(key),
        }
    }

    /// Bytes this change occupies on the wire, an upper bound of its msgpack encoding.
    pub fn encoded_len_bound(&self) -> usize {
        // array header (1) + str header (≤5) + key + bin header (≤5) + value, or nil (1).
        1 + 5 + self.key().len() + self.value().map_or(1, |v| 5 + v.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_enforced_with_the_sizes_named() {
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        assert_eq!(
            Change::delete(long.as_str()).validate(),
            Err(ChangeError::KeyTooLong {
                len: MAX_KEY_BYTES + 1
            })
        );
        let big = Change::put("k", vec![0u8; MAX_VALUE_BYTES + 1]);
        let err = big
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("524289"), "{err}");
        assert!(
            Change::put("k".repeat(MAX_KEY_BYTES), vec![0; MAX_VALUE_BYTES])
                .validate()
                .is_ok()
        );
    }
}
