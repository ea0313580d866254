//! A lean HTTP/1.1 client: one keep-alive connection per worker (hyper's connection API, no pool),
//! so the load generator spends as little CPU per request as it can; and an SSE event reader.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::rxstamp::{LastRx, StampedStream};

/// One keep-alive connection to a server on 127.0.0.1, reopened after an error.
pub struct Client {
    addr: SocketAddr,
    sender: Option<SendRequest<Full<Bytes>>>,
    /// With [`Client::stamped`]: the kernel's receive timestamp of the last bytes read.
    last_rx: Option<LastRx>,
}

impl Client {
    /// A client for `addr`; connects on first use.
    pub fn new(addr: SocketAddr) -> Self {
        assert!(addr.ip().is_loopback(), "the bench only sends load to the loopback interface");
        Client { addr, sender: None, last_rx: None }
    }

    /// A client whose connections note when their bytes reached the socket (see
    /// [`crate::rxstamp`]); [`Client::last_rx_ns`] reads the latest.
    pub fn stamped(addr: SocketAddr) -> Self {
        Client { last_rx: Some(LastRx::default()), ..Client::new(addr) }
    }

    /// The receive timestamp (ns since the Unix epoch) of the last bytes read, for a
    /// [`Client::stamped`] client that has read something.
    pub fn last_rx_ns(&self) -> Option<u64> {
        let ns = self.last_rx.as_ref()?.load(std::sync::atomic::Ordering::Acquire);
        (ns != 0).then_some(ns)
    }

    async fn connect(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let stream = TcpStream::connect(self.addr).await.with_context(|| format!("connect {}", self.addr))?;
        stream.set_nodelay(true)?;
        match &self.last_rx {
            Some(last_rx) => handshake(StampedStream::new(stream, std::sync::Arc::clone(last_rx))?).await,
            None => handshake(stream).await,
        }
    }

    /// Sends a request and returns the response head with its body unread.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> anyhow::Result<hyper::Response<Incoming>> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.sender = Some(self.connect().await?);
        }
        let sender = self.sender.as_mut().expect("connected above");
        if sender.ready().await.is_err() {
            self.sender = None;
            bail!("connection closed");
        }
        let mut request = Request::builder().method(method).uri(path).header(header::HOST, "127.0.0.1");
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request.body(Full::new(body.unwrap_or_default()))?;
        match sender.send_request(request).await {
            Ok(response) => Ok(response),
            Err(e) => {
                self.sender = None;
                Err(e.into())
            }
        }
    }

    /// Sends a request and reads the whole response.
    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let response = self.send(method, path, body).await?;
        let status = response.status();
        match response.into_body().collect().await {
            Ok(body) => Ok((status, body.to_bytes())),
            Err(e) => {
                self.sender = None;
                Err(e.into())
            }
        }
    }

    /// Like [`Client::call`], but a non-2xx status is an error.
    pub async fn call_ok(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> anyhow::Result<Bytes> {
        let (status, body) = self.call(method.clone(), path, body).await?;
        if !status.is_success() {
            bail!("{method} {path} answered {status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(body)
    }
}

async fn handshake<S>(stream: S) -> anyhow::Result<SendRequest<Full<Bytes>>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Reads Server-Sent Events from a response body, one event at a time.
pub struct SseReader {
    body: Incoming,
    buf: BytesMut,
}

/// One event: its name, and its data for the figures that read it.
pub struct SseEvent {
    /// The `event:` field; for a data-only event (the AI SDK's chunks), its JSON's `type`.
    pub name: String,
    /// The `data:` field (one line: parley's events and the AI SDK's chunks have one).
    pub data: String,
}

impl SseEvent {
    /// A string field of the event's JSON data (`turn_id`, `delta`…), if it has one.
    pub fn field(&self, name: &str) -> Option<String> {
        let data: serde_json::Value = serde_json::from_str(&self.data).ok()?;
        Some(data.get(name)?.as_str()?.to_owned())
    }
}

impl SseReader {
    /// Reads the events of `body`.
    pub fn new(body: Incoming) -> Self {
        SseReader { body, buf: BytesMut::new() }
    }

    /// The next complete event (comments skipped); `None` at the end of the stream.
    pub async fn next(&mut self) -> anyhow::Result<Option<SseEvent>> {
        loop {
            if let Some(end) = find(&self.buf, b"\n\n") {
                let raw = self.buf.split_to(end + 2);
                if let Some(event) = parse_event(&raw) {
                    return Ok(Some(event));
                }
                continue;
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_event(raw: &[u8]) -> Option<SseEvent> {
    let text = std::str::from_utf8(raw).ok()?;
    let data = text.lines().find_map(|line| line.strip_prefix("data:")).map(str::trim);
    if let Some(name) = text.lines().find_map(|line| line.strip_prefix("event:")) {
        return Some(SseEvent { name: name.trim().to_owned(), data: data.unwrap_or_default().to_owned() });
    }
    let data = data?;
    let name = match serde_json::from_str::<serde_json::Value>(data) {
        Ok(chunk) => chunk.get("type")?.as_str()?.to_owned(),
        Err(_) => data.to_owned(), // `[DONE]`
    };
    Some(SseEvent { name, data: data.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse_and_comments_do_not() {
        let e = parse_event(b"event: message.delta\nid: 2\ndata: {\"delta\":\"hi \"}\n\n").unwrap();
        assert_eq!(e.name, "message.delta");
        assert_eq!(e.field("delta").as_deref(), Some("hi "));
        assert_eq!(e.field("turn_id"), None);
        assert!(parse_event(b": keep-alive\n\n").is_none());
        let chunk =
            parse_event(b"id: 3\ndata: {\"type\":\"text-delta\",\"id\":\"m\",\"delta\":\"hi\"}\n\n").unwrap();
        assert_eq!(chunk.name, "text-delta");
        assert_eq!(parse_event(b"data: [DONE]\n\n").unwrap().name, "[DONE]");
    }
}
