//! Turn lifecycle: one turn per session, cancel, disconnects, graceful shutdown.

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::helpers::{collect_events, spawn_app};

#[tokio::test]
async fn a_second_turn_in_a_busy_session_is_409_with_the_running_turn_id() {
    let app = spawn_app(&["--echo-delay-ms", "100"]).await;
    app.create_session("busy").await;
    let mut first = app.open_stream("busy", "one two three").await.bytes_stream().eventsource();
    let started = first.next().await.unwrap().unwrap();
    let running: Value = serde_json::from_str(&started.data).unwrap();
    let response = app.post_message_raw("busy", json!({"content": "me too"})).await;
    assert_eq!(response.status(), 409);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "turn_in_progress");
    assert_eq!(problem["turn_id"], running["turn_id"]);
    while first.next().await.is_some() {}
    app.post_message("busy", "now it is my turn").await;
    assert_eq!(app.history("busy").await.len(), 4);
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_still_gets_its_reply_saved() {
    let app = spawn_app(&["--echo-delay-ms", "50"]).await;
    app.create_session("d").await;
    let mut stream = app.open_stream("d", "a b c d e f").await.bytes_stream().eventsource();
    stream.next().await.unwrap().unwrap(); // turn.started
    stream.next().await.unwrap().unwrap(); // first delta
    drop(stream);
    let mut history = Vec::new();
    for _ in 0..100 {
        history = app.history("d").await;
        if history.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(history.len(), 2, "the turn ran to completion after the disconnect");
    assert_eq!(history[1]["content"], "echo: a b c d e f (context: 0 messages)");
}

#[tokio::test]
async fn cancelling_a_running_turn_saves_the_partial_text_and_ends_the_stream() {
    let app = spawn_app(&["--echo-delay-ms", "100"]).await;
    app.create_session("c").await;
    let response = app.open_stream("c", "one two three four five six seven eight").await;
    let mut stream = response.bytes_stream().eventsource();
    let started: Value = serde_json::from_str(&stream.next().await.unwrap().unwrap().data).unwrap();
    stream.next().await.unwrap().unwrap(); // a delta or two arrive
    stream.next().await.unwrap().unwrap();
    let turn_id = started["turn_id"].as_str().unwrap();
    let cancel =
        app.client.post(app.url(&format!("/v1/sessions/c/turns/{turn_id}/cancel"))).send().await.unwrap();
    assert_eq!(cancel.status(), 200);
    let record: Value = cancel.json().await.unwrap();
    assert_eq!(record["status"], "cancelled");
    let mut rest = Vec::new();
    while let Some(event) = stream.next().await {
        rest.push(event.unwrap());
    }
    assert_eq!(rest.last().unwrap().event, "turn.cancelled", "the stream ends with turn.cancelled");
    let history = app.history("c").await;
    assert_eq!(history.len(), 2, "the user message and the partial answer");
    assert_eq!(history[0]["role"], "user");
    assert_eq!(history[1]["metadata"]["status"], "cancelled");
    let partial = history[1]["content"].as_str().unwrap();
    assert!(partial.starts_with("echo: one") && !partial.contains("eight"), "{partial}");
    assert_eq!(record["message_ids"], json!([history[0]["id"], history[1]["id"]]));
    let again =
        app.client.post(app.url(&format!("/v1/sessions/c/turns/{turn_id}/cancel"))).send().await.unwrap();
    assert_eq!(again.status(), 409);
    let problem: Value = again.json().await.unwrap();
    assert_eq!(problem["code"], "turn_finished");
}

#[tokio::test]
async fn shutdown_lets_running_turns_finish_and_refuses_new_ones() {
    let mut app = spawn_app(&["--echo-delay-ms", "100", "--shutdown-grace", "10s"]).await;
    app.create_session("g").await;
    app.create_session("h").await;
    let response = app.open_stream("g", "one two three four").await;
    let reader = tokio::spawn(collect_events(response));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let server = app.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let events = reader.await.unwrap();
    assert_eq!(events.last().unwrap().event, "turn.completed", "the in-flight turn finished");
    tokio::time::timeout(Duration::from_secs(10), server).await.expect("server stopped").unwrap();
    let history = app.store.last_n("default", "g", 10).await.unwrap();
    assert_eq!(history.len(), 2);
}

#[tokio::test]
async fn shutdown_cancels_turns_still_running_after_the_grace_period() {
    let mut app = spawn_app(&["--echo-delay-ms", "200", "--shutdown-grace", "300ms"]).await;
    app.create_session("g").await;
    let response = app.open_stream("g", "a b c d e f g h i j k l m n o p").await;
    let reader = tokio::spawn(collect_events(response));
    tokio::time::sleep(Duration::from_millis(450)).await;
    let server = app.begin_shutdown();
    let events = reader.await.unwrap();
    assert_eq!(events.last().unwrap().event, "turn.cancelled");
    tokio::time::timeout(Duration::from_secs(10), server).await.expect("server stopped").unwrap();
    let history = app.store.last_n("default", "g", 10).await.unwrap();
    assert_eq!(history.len(), 2, "user message and partial answer saved");
    assert_eq!(history[1].metadata["status"], "cancelled");
}

#[tokio::test]
async fn a_json_client_that_gives_up_mid_turn_still_gets_its_reply_saved() {
    let app = spawn_app(&["--echo-delay-ms", "50"]).await;
    app.create_session("j").await;
    // The turn runs inside the request's task until the client goes away; then it moves to one
    // of its own and finishes.
    let gave_up = app
        .client
        .post(app.url("/v1/sessions/j/messages"))
        .timeout(Duration::from_millis(150))
        .json(&json!({"content": "a b c d e f g h"}))
        .send()
        .await;
    assert!(gave_up.is_err_and(|e| e.is_timeout()), "the client gave up before the reply");
    let mut history = Vec::new();
    for _ in 0..100 {
        history = app.history("j").await;
        if history.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(history.len(), 2, "the turn ran to completion after the client left");
    assert_eq!(history[1]["content"], "echo: a b c d e f g h (context: 0 messages)");
}

#[tokio::test]
async fn shutdown_waits_for_a_json_turn_and_cancels_it_after_the_grace_period() {
    let mut app = spawn_app(&["--echo-delay-ms", "200", "--shutdown-grace", "300ms"]).await;
    app.create_session("k").await;
    let client = app.client.clone();
    let url = app.url("/v1/sessions/k/messages");
    let request = tokio::spawn(async move {
        let response =
            client.post(url).json(&json!({"content": "a b c d e f g h i j"})).send().await.unwrap();
        (response.status(), response.json::<Value>().await.unwrap())
    });
    tokio::time::sleep(Duration::from_millis(450)).await;
    let server = app.begin_shutdown();
    let (status, body) = request.await.unwrap();
    assert_eq!(status, 200, "{body}");
    let answer = body["messages"].as_array().unwrap();
    assert_eq!(answer.last().unwrap()["metadata"]["status"], "cancelled", "{body}");
    tokio::time::timeout(Duration::from_secs(10), server).await.expect("server stopped").unwrap();
    let history = app.store.last_n("default", "k", 10).await.unwrap();
    assert_eq!(history.len(), 2, "user message and partial answer saved before the server stopped");
}
