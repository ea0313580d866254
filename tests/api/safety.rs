//! Failure safety: a client that leaves right after posting never wedges its session (the turn it
//! posted runs to its end and is saved), a panic inside a turn ends it `failed` and frees the
//! session at once, and idempotency keys do not pile up.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use parley::llm::{ChatModel, ChatRequest, ModelError, ModelStream};
use parley::tools::{Tool, ToolError, ToolRegistry};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::helpers::{Backend, Spawn, TestApp, collect_events, config, spawn_app_on, spawn_app_with};

/// Writes a whole turn request on a raw socket, waits `linger`, and closes the connection
/// without reading the answer: a closed tab, a navigation, a mobile network drop.
pub async fn post_and_leave(base: &str, session: &str, content: &str, stream: bool, linger: Duration) {
    let addr = base.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // `wait`: if the client's next turn gets in first, this one runs after it, not 409.
    let body = json!({ "content": content, "if_busy": "wait" }).to_string();
    let accept = if stream { "text/event-stream" } else { "application/json" };
    let request = format!(
        "POST /v1/sessions/{session}/messages HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         accept: {accept}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.expect("write");
    tokio::time::sleep(linger).await;
    drop(socket);
}

/// The contents of a session's history, oldest first.
async fn contents(app: &TestApp, session: &str) -> Vec<String> {
    app.history(session).await.iter().map(|m| m["content"].as_str().unwrap_or_default().to_owned()).collect()
}

/// Hundreds of posts whose client leaves 0–5 ms after sending (JSON and streamed): every turn
/// still runs to its end and is saved, and every session takes its next turn at once.
async fn clients_that_leave_right_after_posting_never_wedge_their_session(backend: Backend) {
    let app = Arc::new(spawn_app_on(backend, &["--if-busy-timeout", "10s"]).await);
    let mut runs = Vec::new();
    for i in 0..120usize {
        let app = Arc::clone(&app);
        runs.push(async move {
            let session = format!("leave-{i}");
            app.create_session(&session).await;
            let first = format!("first {i}");
            post_and_leave(&app.base, &session, &first, i % 2 == 1, Duration::from_millis(i as u64 % 6))
                .await;
            // At once: waiting only for the first turn, if it still runs (never for a wedge).
            let next = app
                .post_message_raw(&session, json!({"content": format!("next {i}"), "if_busy": "wait"}))
                .await;
            assert_eq!(next.status(), 200, "{session} takes its next turn: {:?}", next.text().await);
            // The first turn may still be running (or even start after the next one did). A
            // request whose body never reached parley (the connection closed first) was not
            // accepted: nothing of it may remain. One that was accepted is saved whole.
            let mut history = Vec::new();
            for _ in 0..40 {
                history = contents(&app, &session).await;
                if history.len() >= 4 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(history.contains(&format!("next {i}")), "{session}: {history:?}");
            match history.iter().position(|c| *c == first) {
                Some(at) => {
                    assert_eq!(history.len(), 4, "{session}: both turns, once each: {history:?}");
                    assert!(
                        history[at + 1].starts_with(&format!("echo: {first} ")),
                        "{session}: {history:?}"
                    );
                    true
                }
                None => {
                    assert_eq!(
                        history.len(),
                        2,
                        "{session}: nothing of a request never accepted: {history:?}"
                    );
                    false
                }
            }
        });
    }
    let saved = futures::stream::iter(runs).buffer_unordered(12).collect::<Vec<bool>>().await;
    let accepted = saved.iter().filter(|s| **s).count();
    // Most requests are in before their client leaves; each of those was run and saved.
    assert!(accepted >= saved.len() / 2, "only {accepted} of {} first turns were accepted", saved.len());
}

/// A model that panics on a message saying `panic`, and echoes otherwise.
struct PanickyModel {
    echo: parley::llm::DynModel,
}

#[async_trait]
impl ChatModel for PanickyModel {
    fn name(&self) -> &str {
        "panicky"
    }

    async fn stream(&self, request: &ChatRequest) -> Result<ModelStream, ModelError> {
        let last = request.messages.last().map(|m| m.content.to_string()).unwrap_or_default();
        if last == "panic" {
            panic!("the provider's parser met something it did not expect");
        }
        self.echo.stream(request).await
    }
}

/// A tool that panics.
struct PanickyTool;

#[async_trait]
impl Tool for PanickyTool {
    fn name(&self) -> &str {
        "explode"
    }

    fn description(&self) -> &str {
        "Panics."
    }

    fn parameters(&self) -> Value {
        json!({"type": "object"})
    }

    async fn call(&self, _arguments: Value) -> Result<String, ToolError> {
        panic!("the tool panicked");
    }
}

async fn panicky_app(backend: Backend) -> TestApp {
    let cfg = config(&[]);
    let mut tools = ToolRegistry::new();
    tools.register(Arc::new(PanickyTool)).unwrap();
    let echo = parley::app::build_model(&cfg).unwrap();
    spawn_app_with(Spawn {
        store: Some(backend.store(&cfg).await),
        model: Some(Arc::new(PanickyModel { echo })),
        tools: Some(tools),
        ..Spawn::default()
    })
    .await
}

/// A panic in the model provider or in a tool ends the turn `failed` with `internal_error`
/// (JSON: a 500 problem; SSE: `turn.failed`), stores nothing of it, and leaves the session free
/// for the next turn at once.
async fn a_panic_inside_a_turn_fails_it_and_frees_the_session(backend: Backend) {
    let app = panicky_app(backend).await;
    app.create_session("p").await;
    app.post_message("p", "before").await;
    for trigger in ["panic", "/tool explode {}"] {
        let response = app.post_message_raw("p", json!({"content": trigger})).await;
        assert_eq!(response.status(), 500, "{trigger}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "internal_error", "{trigger}");
        assert!(!problem["detail"].as_str().unwrap().contains("panicked"), "no internals: {problem}");

        let events = collect_events(app.open_stream("p", trigger).await).await;
        let last = events.last().expect("events");
        assert_eq!(last.event, "turn.failed", "{trigger}: {events:?}");
        assert_eq!(last.data["error"]["code"], "internal_error");
        let turn_id = last.data["turn_id"].as_str().unwrap();
        let (status, record) = app.get_json(&format!("/v1/sessions/p/turns/{turn_id}")).await;
        assert_eq!(status, 200);
        assert_eq!(record["status"], "failed", "{record}");
        assert_eq!(record["error"]["code"], "internal_error");

        // Free at once, with nothing of the failed turns stored.
        let next = app.post_message_raw("p", json!({"content": "after"})).await;
        assert_eq!(next.status(), 200, "{trigger}: the session is free");
        let history = contents(&app, "p").await;
        assert!(!history.iter().any(|c| c == trigger), "{trigger}: {history:?}");
    }
    assert_eq!(contents(&app, "p").await.len(), 6, "before, after, after");
}

for_each_backend!(
    clients_that_leave_right_after_posting_never_wedge_their_session,
    a_panic_inside_a_turn_fails_it_and_frees_the_session,
);

/// Idempotency keys expire whether or not sessions do: the memory store forgets expired keys on
/// its own (`MemoryStore::purge_expired`, which a timer runs), not only when a key is reused.
#[tokio::test]
async fn the_memory_store_forgets_expired_idempotency_keys() {
    use parley::store::memory::MemoryStore;
    use parley::store::{ConversationStore, TurnCoordinator};
    let store = MemoryStore::new(100);
    for s in 0..20 {
        let session = format!("s{s}");
        let new = parley::domain::NewSession {
            id: session.clone(),
            system_prompt: None,
            metadata: Default::default(),
        };
        store.create_session("t", new).await.unwrap();
        for k in 0..5 {
            let (key, turn) = (format!("k{k}"), uuid::Uuid::now_v7());
            store
                .begin_idempotent("t", &session, &key, "fp", turn, Duration::from_millis(100))
                .await
                .unwrap();
        }
    }
    assert_eq!(store.idempotency_keys(), 100);
    assert_eq!(store.purge_expired(), 0, "none expired yet");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(store.purge_expired(), 100);
    assert_eq!(store.idempotency_keys(), 0);
}
