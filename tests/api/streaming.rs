//! Streamed turns: SSE event names, ids, order, and deltas that add up to the stored message.

use serde_json::{Value, json};

use crate::helpers::{Backend, SseEvent, collect_events, spawn_app, spawn_app_on};

fn names(events: &[SseEvent]) -> Vec<&str> {
    events.iter().map(|e| e.event.as_str()).collect()
}

async fn a_streamed_turn_sends_ordered_events_whose_deltas_make_the_stored_message(backend: Backend) {
    let app = spawn_app_on(backend, &[]).await;
    app.create_session("s").await;
    app.post_message("s", "first").await;
    let events = app.stream_turn("s", "tell me more").await;
    let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    let expected_ids: Vec<String> = (1..=events.len()).map(|i| i.to_string()).collect();
    assert_eq!(ids, expected_ids, "ids are 1, 2, 3… within the turn");
    let names = names(&events);
    assert_eq!(names[0], "turn.started");
    assert_eq!(names[names.len() - 2], "message.completed");
    assert_eq!(names[names.len() - 1], "turn.completed");
    let deltas: Vec<&SseEvent> = events.iter().filter(|e| e.event == "message.delta").collect();
    assert!(deltas.len() >= 3, "the echo model streams a word at a time");
    assert_eq!(deltas.len(), names.len() - 3, "only deltas between start and completion");
    let turn_id = events[0].data["turn_id"].clone();
    assert!(events.iter().all(|e| e.data["turn_id"] == turn_id));
    assert_eq!(events[0].data["session_id"], "s");
    assert_eq!(events[0].data["user_message"]["content"], "tell me more");
    let text: String = deltas.iter().map(|e| e.data["delta"].as_str().unwrap()).collect();
    let completed = &events[names.len() - 2].data["message"];
    assert_eq!(text, completed["content"].as_str().unwrap());
    assert_eq!(text, "echo: tell me more (context: 2 messages)");
    assert!(deltas.iter().all(|e| e.data["message_id"] == completed["id"]));
    let history = app.history("s").await;
    assert_eq!(&history[3], completed, "message.completed is the message exactly as stored");
    let turn_messages = events.last().unwrap().data["messages"].as_array().unwrap().clone();
    assert_eq!(turn_messages, history[2..].to_vec());
    assert_eq!(turn_messages[0]["id"], events[0].data["user_message"]["id"]);
}

async fn stream_true_in_the_query_also_streams(backend: Backend) {
    let app = spawn_app_on(backend, &[]).await;
    app.create_session("q").await;
    let response = app
        .client
        .post(app.url("/v1/sessions/q/messages?stream=true"))
        .json(&json!({"content": "hey"}))
        .send()
        .await
        .unwrap();
    let events = collect_events(response).await;
    assert_eq!(events.last().unwrap().event, "turn.completed");
}

for_each_backend!(
    a_streamed_turn_sends_ordered_events_whose_deltas_make_the_stored_message,
    stream_true_in_the_query_also_streams
);

#[tokio::test]
async fn a_streamed_request_for_an_unknown_session_is_a_404_problem_not_a_stream() {
    let app = spawn_app(&[]).await;
    let response = app
        .client
        .post(app.url("/v1/sessions/none/messages"))
        .header("accept", "text/event-stream")
        .json(&json!({"content": "hey"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "session_not_found");
}

#[tokio::test]
async fn keep_alive_comments_are_sent_while_the_model_is_slow() {
    let app = spawn_app(&["--sse-keepalive", "100ms", "--echo-delay-ms", "150"]).await;
    app.create_session("k").await;
    let response = app
        .client
        .post(app.url("/v1/sessions/k/messages"))
        .header("accept", "text/event-stream")
        .json(&json!({"content": "one two three"}))
        .send()
        .await
        .unwrap();
    let raw = response.text().await.unwrap();
    assert!(raw.contains(": keep-alive"), "a keep-alive comment was sent: {raw}");
    assert!(raw.trim_end().ends_with('}'), "the stream ends right after the terminal event");
    assert!(raw.contains("event: turn.completed"));
}
