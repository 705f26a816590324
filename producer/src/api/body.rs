//! A write request's body and its fingerprint: what tells a retry (the same body under the
//! same `Idempotency-Key`) from a different request reusing a key. A body read as a stream
//! is fingerprinted as it passes.
//!
//! Talks to nothing; wraps the caller's reader.

use bytes::Bytes;
use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// A request body.
pub enum Body {
    /// Read whole already (HTTP txn and state, every NATS request).
    Bytes(Bytes),
    /// Read as it arrives (HTTP changes).
    Reader(Box<dyn AsyncRead + Send + Unpin>),
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Bytes(b) => write!(f, "Body::Bytes({} bytes)", b.len()),
            Body::Reader(_) => f.write_str("Body::Reader"),
        }
    }
}

impl Body {
    /// The body, a reader wrapped to fingerprint what passes, and its fingerprint once read
    /// to its end (bytes are fingerprinted at once).
    pub(crate) fn fingerprinted(self) -> (Body, Print) {
        let print = Print::default();
        let body = match self {
            Body::Bytes(b) => {
                print.lock().write(&b);
                Body::Bytes(b)
            }
            Body::Reader(r) => Body::Reader(Box::new(Hashing {
                inner: r,
                hasher: print.0.clone(),
            })),
        };
        (body, print)
    }

    /// The body as a reader.
    pub(crate) fn into_reader(self) -> Box<dyn AsyncRead + Send + Unpin> {
        match self {
            Body::Bytes(b) => Box::new(std::io::Cursor::new(b)),
            Body::Reader(r) => r,
        }
    }
}

/// The fingerprint of the bytes of a body read so far (see [`Body::fingerprinted`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct Print(Arc<Mutex<DefaultHasher>>);

impl Print {
    fn lock(&self) -> std::sync::MutexGuard<'_, DefaultHasher> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The fingerprint of what was read.
    pub(crate) fn value(&self) -> u64 {
        self.lock().finish()
    }

    /// Reads `body` (the one it came with) to its end and returns the whole body's
    /// fingerprint.
    pub(crate) async fn of_rest(&self, body: Body) -> std::io::Result<u64> {
        if let Body::Reader(mut r) = body {
            let mut buf = vec![0u8; 64 * 1024];
            while r.read(&mut buf).await? > 0 {}
        }
        Ok(self.value())
    }
}

/// Hashes what passes through (chunk boundaries do not matter: the hasher is fed the bytes
/// in order).
struct Hashing {
    inner: Box<dyn AsyncRead + Send + Unpin>,
    hasher: Arc<Mutex<DefaultHasher>>,
}

impl AsyncRead for Hashing {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        self.hasher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write(&buf.filled()[before..]);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Hands out its data in pieces of `step` bytes.
    struct Trickle(Vec<u8>, usize);

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let n = self.1.min(self.0.len()).min(buf.remaining());
            let piece: Vec<u8> = self.0.drain(..n).collect();
            buf.put_slice(&piece);
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn the_same_bytes_give_the_same_print_however_they_arrive() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let (whole, p1) = Body::Bytes(Bytes::from(data.clone())).fingerprinted();
        let a = p1.of_rest(whole).await.unwrap();
        for step in [1, 7, 4096] {
            let (r, p) = Body::Reader(Box::new(Trickle(data.clone(), step))).fingerprinted();
            assert_eq!(p.of_rest(r).await.unwrap(), a, "step {step}");
        }
        let mut other = data.clone();
        other[50_000] ^= 1;
        let (b, p) = Body::Bytes(Bytes::from(other)).fingerprinted();
        assert_ne!(p.of_rest(b).await.unwrap(), a);
    }
}
