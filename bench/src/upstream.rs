//! An OpenAI-compatible upstream for figure 5a's second form (`stream-probe --upstream`) and for
//! figure 8b (cross-replica followers): parley runs its real `openai` provider against it, so the
//! figures count parley's whole path from a model's bytes to a client's socket, its own wake-up
//! on the upstream's bytes included.
//!
//! `POST /v1/chat/completions` streams the words of the prompt's last user message back as
//! `chat.completion.chunk` events, each after a wait of the [`Pacing`], then a finish chunk, a
//! usage chunk and `[DONE]`. The instant a content chunk is handed to the server's connection (it
//! is written in that same poll) is noted under its word: for the first chunk only (the message's
//! first word, the probe's tag), or for every chunk ([`Pacing::every_word`]; figure 8b's words
//! are all distinct).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::routing::post;
use axum::serve::ListenerExt;
use futures::{Stream, StreamExt};
use serde_json::{Value, json};

use crate::streams::{Stamps, realtime_ns};

/// How the upstream paces its content chunks and which it notes.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    /// The shortest wait before a content chunk.
    pub min: Duration,
    /// The longest: the waits spread from `min` to `max`, chunk by chunk, as a model's do.
    pub max: Duration,
    /// Note every content chunk's instant under its word, not only the first one's.
    pub every_word: bool,
}

impl Pacing {
    /// The same wait before every chunk; only the first chunk noted.
    pub fn fixed(delay: Duration) -> Self {
        Pacing { min: delay, max: delay, every_word: false }
    }

    /// The wait before chunk `i` of the reply to `tag`: spread over [min, max] by a fixed
    /// scramble of both, so that turns started together do not stay in step.
    fn delay(&self, tag: &str, i: usize) -> Duration {
        let spread = self.max.saturating_sub(self.min).as_micros() as u64;
        // FNV-1a of the tag, then a multiplicative scramble of it with the chunk's index.
        let seed = tag
            .bytes()
            .fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3));
        let scrambled = (seed ^ (i as u64 + 1)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33;
        self.min + Duration::from_micros(scrambled % (spread + 1))
    }
}

#[derive(Clone)]
struct Upstream {
    stamps: Stamps,
    pacing: Pacing,
}

/// Starts the upstream on 127.0.0.1 on the current runtime; returns its address.
pub async fn start(stamps: Stamps, pacing: Pacing) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(completions))
        .with_state(Upstream { stamps, pacing });
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
    let words: Vec<String> = text.split(' ').map(str::to_owned).collect();
    let tag = Arc::new(words[0].clone());
    let count = words.len() as u64;
    let chunks = futures::stream::iter(words.into_iter().enumerate()).then(move |(i, word)| {
        let (stamps, pacing, tag) = (up.stamps.clone(), up.pacing, Arc::clone(&tag));
        async move {
            tokio::time::sleep(pacing.delay(&tag, i)).await;
            let content = format!("{word} ");
            if i == 0 || pacing.every_word {
                stamps.lock().expect("stamps").insert(word, (Instant::now(), realtime_ns()));
            }
            chunk(json!({"content": content}), None)
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

    #[test]
    fn waits_spread_over_the_pacing_and_a_fixed_one_does_not() {
        let ms = Duration::from_millis;
        let pacing = Pacing { min: ms(5), max: ms(20), every_word: true };
        let waits: Vec<Duration> = (0..1000).map(|i| pacing.delay("r1t0.0", i)).collect();
        assert!(waits.iter().all(|w| (ms(5)..=ms(20)).contains(w)));
        let mean = waits.iter().sum::<Duration>() / 1000;
        assert!((ms(11)..=ms(14)).contains(&mean), "mean wait {mean:?}");
        let other: Vec<Duration> = (0..1000).map(|i| pacing.delay("r1t1.0", i)).collect();
        let same = waits.iter().zip(&other).filter(|(a, b)| a == b).count();
        assert!(same < 50, "two turns' waits in step {same} times of 1000");
        assert!((0..50).all(|i| Pacing::fixed(ms(20)).delay("t", i) == ms(20)));
    }
}
