//! An OpenAI-compatible upstream for figure 5a's second form (`stream-probe --upstream`): parley
//! runs its real `openai` provider against it, so the overhead counts parley's whole path from a
//! model's bytes to the client's socket, its own wake-up on the upstream's bytes included.
//!
//! `POST /v1/chat/completions` streams the words of the prompt's last user message back as
//! `chat.completion.chunk` events, one per `delay`, then a finish chunk, a usage chunk and
//! `[DONE]`. The instant the first content chunk is handed to the server's connection (it is
//! written in that same poll) is noted under the message's first word, the probe's tag.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::routing::post;
use axum::serve::ListenerExt;
use futures::{Stream, StreamExt};
use serde_json::{Value, json};

use crate::streams::{Stamps, realtime_ns};

#[derive(Clone)]
struct Upstream {
    stamps: Stamps,
    delay: Duration,
}

/// Starts the upstream on 127.0.0.1 on the current runtime; returns its address.
pub async fn start(stamps: Stamps, delay: Duration) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(completions))
        .with_state(Upstream { stamps, delay });
    // As parley's own listener: without TCP_NODELAY each small chunk waits for the peer's ACK.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("probe upstream: {e}");
        }
    });
    Ok(addr)
}

async fn completions(
    State(up): State<Upstream>,
    axum::Json(request): axum::Json<Value>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let text = last_user_text(&request);
    let tag = text.split(' ').next().map(str::to_owned);
    let words: Vec<String> = text.split(' ').map(|w| format!("{w} ")).collect();
    let count = words.len() as u64;
    let chunks = futures::stream::iter(words.into_iter().enumerate()).then(move |(i, word)| {
        let (stamps, delay, tag) = (up.stamps.clone(), up.delay, tag.clone());
        async move {
            tokio::time::sleep(delay).await;
            if i == 0
                && let Some(tag) = tag
            {
                stamps.lock().expect("stamps").insert(tag, (Instant::now(), realtime_ns()));
            }
            chunk(json!({"content": word}), None)
        }
    });
    let tail = futures::stream::iter([
        chunk(json!({}), Some("stop")),
        json!({"id": "probe", "object": "chat.completion.chunk", "choices": [],
               "usage": {"prompt_tokens": 1, "completion_tokens": count, "total_tokens": count + 1}}),
    ]);
    let events = chunks
        .chain(tail)
        .map(|c| Event::default().data(c.to_string()))
        .chain(futures::stream::once(async { Event::default().data("[DONE]") }));
    Sse::new(events.map(Ok))
}

/// The text of the last user message of a chat-completions request ("" when there is none).
fn last_user_text(request: &Value) -> String {
    request["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned()
}

fn chunk(delta: Value, finish_reason: Option<&str>) -> Value {
    json!({
        "id": "probe", "object": "chat.completion.chunk", "created": 0, "model": "probe",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tag_is_the_last_user_messages_first_word() {
        let request = json!({"messages": [
            {"role": "user", "content": "old one"},
            {"role": "assistant", "content": "x"},
            {"role": "user", "content": "probe-001-1-7 how are you"},
        ]});
        assert_eq!(last_user_text(&request), "probe-001-1-7 how are you");
        assert_eq!(last_user_text(&json!({})), "");
    }
}
