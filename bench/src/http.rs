//! A minimal HTTP/1.1 client for the API scenarios, on raw Tokio sockets (as the workspace's
//! tests drive HTTP): keep-alive requests with a `Content-Length` or chunked answer, and a
//! Server-Sent Events reader. Only what talking to our own servers needs; errors, not panics.
//!
//! Talks to `deltasync-producer serve` and `deltasync-consumer run --http` on loopback.

use anyhow::{bail, ensure, Context as _, Result};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An answer: the status and the whole body.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub body: Vec<u8>,
}

/// One keep-alive HTTP/1.1 connection; requests on it run one after another.
pub struct Conn {
    stream: TcpStream,
    /// Bytes read past the previous answer.
    buf: Vec<u8>,
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> Result<Conn> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends `method path` with `body` and reads the whole answer. The body is written before
    /// the answer is read; a server that answers early (a refused body) and closes still has
    /// its answer read.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> Result<Resp> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: {content_type}\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        let written = async {
            self.stream.write_all(head.as_bytes()).await?;
            self.stream.write_all(body).await
        }
        .await;
        match self.answer().await {
            Ok(r) => Ok(r),
            Err(e) => {
                written.with_context(|| format!("sending {method} {path}"))?;
                Err(e).with_context(|| format!("reading the answer to {method} {path}"))
            }
        }
    }

    /// Reads more bytes into the buffer; fails at the end of the connection.
    async fn fill(&mut self) -> Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        ensure!(n > 0, "the server closed the connection");
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    async fn answer(&mut self) -> Result<Resp> {
        let split = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..split]).into_owned();
        self.buf.drain(..split + 4);
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("not an HTTP answer: {head:?}"))?;
        let mut length = None;
        let mut chunked = false;
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim(), v.trim());
                if k.eq_ignore_ascii_case("content-length") {
                    length = Some(v.parse::<usize>().context("content-length")?);
                } else if k.eq_ignore_ascii_case("transfer-encoding")
                    && v.eq_ignore_ascii_case("chunked")
                {
                    chunked = true;
                }
            }
        }
        let body = if chunked {
            let mut out = Vec::new();
            loop {
                let eol = loop {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        break i;
                    }
                    self.fill().await?;
                };
                let size_text = String::from_utf8_lossy(&self.buf[..eol]).into_owned();
                let size =
                    usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                        .with_context(|| format!("a chunk size: {size_text:?}"))?;
                self.buf.drain(..eol + 2);
                while self.buf.len() < size + 2 {
                    self.fill().await?;
                }
                out.extend_from_slice(&self.buf[..size]);
                self.buf.drain(..size + 2);
                if size == 0 {
                    break out;
                }
            }
        } else {
            let Some(n) = length else {
                bail!("an answer with neither a length nor chunks: {head:?}");
            };
            while self.buf.len() < n {
                self.fill().await?;
            }
            self.buf.drain(..n).collect()
        };
        Ok(Resp { status, body })
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Polls `GET path` on `addr` until it answers 200 and `ok` accepts the body, for at most
/// `deadline`; `alive` is asked between polls (an exited server process fails at once).
pub async fn wait_for(
    addr: SocketAddr,
    path: &str,
    deadline: Duration,
    mut alive: impl FnMut() -> Result<()>,
    ok: impl Fn(&[u8]) -> bool,
) -> Result<()> {
    let start = Instant::now();
    loop {
        alive()?;
        if let Ok(mut c) = Conn::connect(addr).await {
            if let Ok(r) = c.request("GET", path, "text/plain", b"").await {
                if r.status == 200 && ok(&r.body) {
                    return Ok(());
                }
            }
        }
        ensure!(
            start.elapsed() < deadline,
            "{addr}{path} did not answer as expected within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One Server-Sent Event.
#[derive(Debug)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// A Server-Sent Events reader over HTTP/1.0 (the body is the rest of the connection: no
/// chunked encoding to undo), as `consumer/tests/it/support.rs` drives `/v1/watch`.
pub struct SseClient {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for the end of an event.
    scanned: usize,
}

impl SseClient {
    /// Sends `GET path` and reads the answer's head; fails unless it is a 200.
    pub async fn connect(addr: SocketAddr, path: &str) -> Result<SseClient> {
        let mut stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let req =
            format!("GET {path} HTTP/1.0\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n");
        stream.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        let split = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            ensure!(
                n > 0,
                "{path}: the connection closed before the answer's head"
            );
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..split]).into_owned();
        ensure!(
            head.split(' ').nth(1) == Some("200"),
            "{path} answered {head:?}"
        );
        let rest = buf[split + 4..].to_vec();
        Ok(SseClient {
            stream,
            buf: rest,
            scanned: 0,
        })
    }

    /// The next event (comments skipped); `None` when the server ended the stream. Cancel
    /// safe: bytes join the buffer only once a read returned them.
    pub async fn next(&mut self) -> Result<Option<SseEvent>> {
        loop {
            let from = self.scanned.saturating_sub(1);
            let end = find(&self.buf[from..], b"\n\n").map(|i| i + from);
            self.scanned = self.buf.len();
            if let Some(i) = end {
                let block = String::from_utf8(self.buf[..i].to_vec()).context("an SSE event")?;
                self.buf.drain(..i + 2);
                self.scanned = 0;
                let mut event = SseEvent {
                    event: "message".to_owned(),
                    id: None,
                    data: String::new(),
                };
                let mut any = false;
                for line in block.lines() {
                    if line.starts_with(':') {
                        continue;
                    }
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    any = true;
                    match field {
                        "event" => event.event = value.to_owned(),
                        "id" => event.id = Some(value.to_owned()),
                        "data" => {
                            if !event.data.is_empty() {
                                event.data.push('\n');
                            }
                            event.data.push_str(value);
                        }
                        _ => {}
                    }
                }
                if any {
                    return Ok(Some(event));
                }
                continue;
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `answers` (raw bytes) one per request read on one connection.
    async fn serve(answers: Vec<&'static [u8]>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("loopback I/O in a test");
        let addr = listener.local_addr().expect("loopback I/O in a test");
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("loopback I/O in a test");
            for a in answers {
                let mut req = Vec::new();
                while find(&req, b"\r\n\r\n").is_none() {
                    let mut c = [0u8; 1024];
                    let n = s.read(&mut c).await.expect("loopback I/O in a test");
                    req.extend_from_slice(&c[..n]);
                }
                s.write_all(a).await.expect("loopback I/O in a test");
            }
        });
        addr
    }

    #[tokio::test]
    async fn keep_alive_answers_with_a_length_or_chunks_are_read_whole() {
        let addr = serve(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            b"HTTP/1.1 400 Bad\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        ])
        .await;
        let mut c = Conn::connect(addr).await.expect("loopback I/O in a test");
        let r = c
            .request("GET", "/", "text/plain", b"")
            .await
            .expect("loopback I/O in a test");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
        let r = c
            .request("POST", "/", "text/plain", b"x")
            .await
            .expect("loopback I/O in a test");
        assert_eq!((r.status, r.body.as_slice()), (400, &b"abcde"[..]));
    }

    #[tokio::test]
    async fn sse_events_are_split_and_comments_skipped() {
        let addr = serve(vec![
            b"HTTP/1.0 200 OK\r\n\r\n: keep-alive\n\nevent: batch\nid: 3\ndata: {\"a\":1}\n\n",
        ])
        .await;
        let mut c = SseClient::connect(addr, "/v1/watch")
            .await
            .expect("loopback I/O in a test");
        let e = c
            .next()
            .await
            .expect("loopback I/O in a test")
            .expect("loopback I/O in a test");
        assert_eq!(
            (e.event.as_str(), e.id.as_deref(), e.data.as_str()),
            ("batch", Some("3"), "{\"a\":1}")
        );
        assert!(c.next().await.expect("loopback I/O in a test").is_none());
    }
}
