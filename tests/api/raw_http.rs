//! A minimal HTTP/1.1 client over a raw socket, for what reqwest normalises or refuses: dot
//! segments in paths, repeated headers, oversized heads, and slow or idle connections.
#![allow(dead_code, reason = "each test module uses a different subset")]

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest any read of a response may take before the test fails.
const READ_LIMIT: Duration = Duration::from_secs(20);

/// A parsed response.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// The status code.
    pub status: u16,
    /// Every header, names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// The body (by `Content-Length`, or up to the end of the connection).
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// `127.0.0.1:<port>` from a `http://127.0.0.1:<port>` base URL.
pub fn authority(base: &str) -> &str {
    base.trim_start_matches("http://")
}

/// Opens a connection to the app.
pub async fn connect(base: &str) -> TcpStream {
    TcpStream::connect(authority(base)).await.expect("connect")
}

/// A GET of `path` with these extra header lines (each ending in `\r\n`), keeping the connection.
pub fn get(base: &str, path: &str, extra_headers: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: {}\r\n{extra_headers}\r\n", authority(base)).into_bytes()
}

/// A request with a JSON body, keeping the connection.
pub fn with_json(base: &str, method: &str, path: &str, extra_headers: &str, body: &Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra_headers}\r\n{body}",
        authority(base),
        body.len()
    )
    .into_bytes()
}

/// Sends one request on a fresh connection and reads the response.
pub async fn exchange(base: &str, request: &[u8]) -> RawResponse {
    let mut stream = connect(base).await;
    stream.write_all(request).await.expect("write the request");
    read_response(&mut stream).await.expect("a response")
}

/// Reads one response (head, then a `Content-Length` body or everything up to the end).
pub async fn read_response(stream: &mut TcpStream) -> std::io::Result<RawResponse> {
    tokio::time::timeout(READ_LIMIT, read_response_unbounded(stream))
        .await
        .unwrap_or_else(|_| panic!("no response within {READ_LIMIT:?}"))
}

async fn read_response_unbounded(stream: &mut TcpStream) -> std::io::Result<RawResponse> {
    let mut buffer = Vec::new();
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before a response"));
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = buffer[head_end + 4..].to_vec();
    let length = headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse().ok());
    match length {
        Some(length) => {
            while body.len() < length {
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        }
        None => {
            stream.read_to_end(&mut body).await?;
        }
    }
    Ok(RawResponse { status, headers, body })
}

/// Whether the server has closed the connection (end of stream or reset), waiting at most
/// `within`; any bytes that arrive first are discarded.
pub async fn closed_by_server(stream: &mut (impl AsyncRead + Unpin), within: Duration) -> bool {
    let wait = async {
        let mut sink = [0u8; 1024];
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, wait).await.is_ok()
}
