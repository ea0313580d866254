#![allow(dead_code, reason = "a shared fake: each test module uses part of it")]
//! A fake OpenAI-compatible server for tests: it records every request to `/v1/chat/completions`
//! and answers each with the next scripted response, sent as raw bytes cut into small pieces (by
//! default every 7 bytes: mid-line, mid-JSON and mid-UTF-8 character).
//!
//! ```ignore
//! let fake = FakeOpenAi::start(vec![Script::status(500, "boom"), Script::text("Hello there")]).await;
//! let settings = OpenAiSettings::new(&fake.base_url, "fake-model");
//! // … run the call …
//! assert_eq!(fake.requests().len(), 2);
//! ```
//!
//! When the scripts run out, the fake answers 400 (not retried) naming the request.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::stream::{self, BoxStream, StreamExt};
use serde_json::{Value, json};

/// The default piece size of scripted bodies: small and prime, so cuts land everywhere.
pub const DEFAULT_PIECE: usize = 7;

/// A running fake server; it stops when dropped.
pub struct FakeOpenAi {
    /// The base URL to configure (`http://127.0.0.1:PORT/v1`).
    pub base_url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Shared {
    scripts: Mutex<VecDeque<Script>>,
    requests: Mutex<Vec<Recorded>>,
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The request headers.
    pub headers: HeaderMap,
    /// The JSON body (a JSON string of the raw text when it was not JSON).
    pub body: Value,
}

impl Recorded {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
    }
}

impl FakeOpenAi {
    /// Starts a fake on a free local port that answers with these scripts, in order.
    pub async fn start(scripts: Vec<Script>) -> FakeOpenAi {
        let shared = Arc::new(Shared { scripts: Mutex::new(scripts.into()), ..Default::default() });
        let app = Router::new().route("/v1/chat/completions", post(handle)).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the fake");
        let addr = listener.local_addr().expect("fake address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeOpenAi { base_url: format!("http://{addr}/v1"), shared, task }
    }

    /// Adds scripts for later requests.
    pub fn push(&self, script: Script) {
        self.shared.scripts.lock().unwrap().push_back(script);
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// How many scripts are still waiting for a request.
    pub fn scripts_left(&self) -> usize {
        self.shared.scripts.lock().unwrap().len()
    }
}

impl Drop for FakeOpenAi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let body = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    let (script, number) = {
        let mut requests = shared.requests.lock().unwrap();
        requests.push(Recorded { headers, body });
        (shared.scripts.lock().unwrap().pop_front(), requests.len())
    };
    match script {
        Some(script) => script.respond().await,
        None => {
            let message = format!("fake-openai: no script left for request #{number}");
            (StatusCode::BAD_REQUEST, axum::Json(json!({"error": {"message": message}}))).into_response()
        }
    }
}

/// How a scripted body ends after its last piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The body ends normally.
    Close,
    /// The connection stays open with nothing more sent.
    Hang,
    /// The connection is cut (the chunked body is never terminated).
    Drop,
}

/// One scripted response.
#[derive(Debug, Clone)]
pub struct Script {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Explicit pieces, when set (instead of cutting `body` every `piece` bytes).
    pieces: Option<Vec<Vec<u8>>>,
    piece: usize,
    pause: Duration,
    ending: Ending,
    hang_before_head: bool,
}

impl Script {
    /// An SSE response with exactly these bytes.
    pub fn raw(bytes: impl Into<Vec<u8>>) -> Script {
        Script {
            status: 200,
            headers: vec![("content-type".into(), "text/event-stream".into())],
            body: bytes.into(),
            pieces: None,
            piece: DEFAULT_PIECE,
            pause: Duration::ZERO,
            ending: Ending::Close,
            hang_before_head: false,
        }
    }

    /// An SSE response sent in exactly these pieces.
    pub fn pieces(pieces: Vec<String>) -> Script {
        let mut script = Script::raw(Vec::new());
        script.pieces = Some(pieces.into_iter().map(String::into_bytes).collect());
        script
    }

    /// An SSE response of these chunks (each a `data:` event), then `data: [DONE]`.
    pub fn chunks(chunks: Vec<Value>) -> Script {
        Script::raw([sse(&chunks), "data: [DONE]\n\n".to_owned()].concat())
    }

    /// An SSE response of these chunks and nothing else (no `[DONE]`).
    pub fn chunks_without_done(chunks: Vec<Value>) -> Script {
        Script::raw(sse(&chunks))
    }

    /// A complete text reply: a role-only chunk, one delta per word, `stop`, usage, `[DONE]`.
    pub fn text(text: &str) -> Script {
        let mut chunks = vec![chunk::role()];
        chunks.extend(words(text).into_iter().map(chunk::content));
        chunks.push(chunk::finish("stop"));
        chunks.push(chunk::usage(11, words(text).len() as u64));
        Script::chunks(chunks)
    }

    /// A reply that calls one tool (id `call_1`).
    pub fn tool_call(name: &str, arguments: Value) -> Script {
        Script::tool_calls(&[(name, arguments)])
    }

    /// A reply that calls these tools in parallel (ids `call_1`, `call_2`…), their argument
    /// fragments interleaved by index, then `tool_calls`, usage, `[DONE]`.
    pub fn tool_calls(calls: &[(&str, Value)]) -> Script {
        let mut chunks = vec![chunk::role()];
        let texts: Vec<String> = calls.iter().map(|(_, args)| args.to_string()).collect();
        for (i, (name, _)) in calls.iter().enumerate() {
            chunks.push(chunk::tool_call_start(i as u32, &format!("call_{}", i + 1), name));
        }
        let fragments: Vec<Vec<String>> = texts.iter().map(|t| fragments(t, 5)).collect();
        let rounds = fragments.iter().map(Vec::len).max().unwrap_or(0);
        for round in 0..rounds {
            for (i, parts) in fragments.iter().enumerate() {
                if let Some(part) = parts.get(round) {
                    chunks.push(chunk::tool_call_args(i as u32, part));
                }
            }
        }
        chunks.push(chunk::finish("tool_calls"));
        chunks.push(chunk::usage(20, 10));
        Script::chunks(chunks)
    }

    /// A plain (non-SSE) response with this status and body.
    pub fn status(status: u16, body: impl Into<String>) -> Script {
        let mut script = Script::raw(body.into());
        script.status = status;
        script.headers = vec![("content-type".into(), "application/json".into())];
        script.piece = 0;
        script
    }

    /// An error status with an OpenAI-style error object.
    pub fn error(status: u16, message: &str) -> Script {
        Script::status(status, json!({"error": {"message": message, "type": "fake_error"}}).to_string())
    }

    /// Never answers: no status line, no headers.
    pub fn hang() -> Script {
        let mut script = Script::raw(Vec::new());
        script.hang_before_head = true;
        script
    }

    /// Adds a response header.
    pub fn header(mut self, name: &str, value: &str) -> Script {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sends the body in pieces of `n` bytes (0: in one piece).
    pub fn cut_every(mut self, n: usize) -> Script {
        self.piece = n;
        self
    }

    /// Waits this long before each piece.
    pub fn pause(mut self, pause: Duration) -> Script {
        self.pause = pause;
        self
    }

    /// After the body, keeps the connection open and silent.
    pub fn then_hang(mut self) -> Script {
        self.ending = Ending::Hang;
        self
    }

    /// After the body, cuts the connection.
    pub fn then_drop(mut self) -> Script {
        self.ending = Ending::Drop;
        self
    }

    async fn respond(self) -> Response {
        if self.hang_before_head {
            std::future::pending::<()>().await;
        }
        let mut response = Response::new(Body::from_stream(self.body_stream()));
        *response.status_mut() = StatusCode::from_u16(self.status).expect("a valid status");
        for (name, value) in &self.headers {
            let name = header::HeaderName::try_from(name.as_str()).expect("header name");
            response.headers_mut().append(name, value.parse().expect("header value"));
        }
        response
    }

    fn body_stream(&self) -> BoxStream<'static, Result<Bytes, std::io::Error>> {
        let pause = self.pause;
        let pieces: Vec<Bytes> = match (&self.pieces, self.piece) {
            (Some(pieces), _) => pieces.iter().cloned().map(Bytes::from).collect(),
            (None, 0) => vec![Bytes::from(self.body.clone())],
            (None, n) => self.body.chunks(n).map(Bytes::copy_from_slice).collect(),
        };
        let body = stream::iter(pieces).then(move |piece| async move {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            Ok(piece)
        });
        let tail = match self.ending {
            Ending::Close => stream::empty().boxed(),
            Ending::Hang => stream::pending().boxed(),
            Ending::Drop => {
                stream::once(async { Err(std::io::Error::other("fake-openai: dropped")) }).boxed()
            }
        };
        body.chain(tail).boxed()
    }
}

/// The SSE frames of these chunks.
pub fn sse(chunks: &[Value]) -> String {
    chunks.iter().map(|c| format!("data: {c}\n\n")).collect()
}

/// Splits text into word deltas that concatenate back to it.
fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for c in text.chars() {
        if c == ' ' && !current.is_empty() {
            out.push(std::mem::take(&mut current));
        }
        current.push(c);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Splits text into `n`-character fragments.
fn fragments(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars.chunks(n).map(|c| c.iter().collect()).collect()
}

/// Builders of `chat.completion.chunk` objects.
pub mod chunk {
    use serde_json::{Value, json};

    /// A chunk with one choice.
    pub fn choice(delta: Value, finish_reason: Option<&str>) -> Value {
        json!({
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "fake-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            "usage": null
        })
    }

    /// The first chunk: the role only.
    pub fn role() -> Value {
        choice(json!({"role": "assistant", "content": ""}), None)
    }

    /// A text delta.
    pub fn content(text: impl Into<String>) -> Value {
        choice(json!({"content": text.into()}), None)
    }

    /// The first fragment of a tool call: its id and name.
    pub fn tool_call_start(index: u32, id: &str, name: &str) -> Value {
        let call = json!({"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": ""}});
        choice(json!({"tool_calls": [call]}), None)
    }

    /// A fragment of a tool call's arguments.
    pub fn tool_call_args(index: u32, fragment: &str) -> Value {
        choice(json!({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}), None)
    }

    /// The chunk with the finish reason.
    pub fn finish(reason: &str) -> Value {
        choice(json!({}), Some(reason))
    }

    /// The usage chunk: empty choices.
    pub fn usage(prompt: u64, completion: u64) -> Value {
        json!({
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        })
    }

    /// An error object sent inside the stream.
    pub fn error(message: &str) -> Value {
        json!({"error": {"message": message, "type": "server_error", "code": null}})
    }
}
