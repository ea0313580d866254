//! Turns: records, model failures that append nothing, what the model is sent.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use parley::domain::Role;
use parley::llm::echo::EchoModel;
use parley::llm::{ChatModel, ChatRequest, ModelError, ModelEvent, ModelStream};
use serde_json::{Value, json};

use crate::helpers::{Spawn, spawn_app_with};

/// A model that fails: at once, or after streaming some text.
struct FailingModel {
    deltas_first: usize,
    error: fn() -> ModelError,
}

#[async_trait]
impl ChatModel for FailingModel {
    fn name(&self) -> &str {
        "failing"
    }

    async fn stream(&self, _request: &ChatRequest) -> Result<ModelStream, ModelError> {
        if self.deltas_first == 0 {
            return Err((self.error)());
        }
        let deltas = (0..self.deltas_first).map(|i| Ok(ModelEvent::Delta(format!("part{i} "))));
        let error = (self.error)();
        Ok(futures::stream::iter(deltas).chain(futures::stream::once(async move { Err(error) })).boxed())
    }
}

/// The echo model, recording every request it gets.
#[derive(Default)]
struct RecordingModel {
    requests: Mutex<Vec<ChatRequest>>,
}

#[async_trait]
impl ChatModel for RecordingModel {
    fn name(&self) -> &str {
        "recording"
    }

    async fn stream(&self, request: &ChatRequest) -> Result<ModelStream, ModelError> {
        self.requests.lock().unwrap().push(request.clone());
        EchoModel::default().stream(request).await
    }
}

fn upstream_500() -> ModelError {
    ModelError::Status { status: 500, message: "upstream broke".into() }
}

fn spawn(model: Arc<dyn ChatModel>, args: &[&str]) -> Spawn {
    Spawn { args: args.iter().map(|s| s.to_string()).collect(), model: Some(model), ..Spawn::default() }
}

#[tokio::test]
async fn a_model_failure_is_502_appends_nothing_and_records_a_failed_turn() {
    let model = Arc::new(FailingModel { deltas_first: 0, error: upstream_500 });
    let app = spawn_app_with(spawn(model, &[])).await;
    app.create_session("f").await;
    let response = app.post_message_raw("f", json!({"content": "hello"})).await;
    assert_eq!(response.status(), 502);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "upstream_error");
    assert!(app.history("f").await.is_empty());
    let (_, session) = app.get_json("/v1/sessions/f").await;
    assert_eq!(session["message_count"], 0);
}

#[tokio::test]
async fn a_stream_that_fails_midway_ends_with_turn_failed_and_appends_nothing() {
    let model = Arc::new(FailingModel { deltas_first: 2, error: upstream_500 });
    let app = spawn_app_with(spawn(model, &[])).await;
    app.create_session("f").await;
    let events = app.stream_turn("f", "hello").await;
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names, vec!["turn.started", "message.delta", "message.delta", "turn.failed"]);
    let failed = &events[3].data;
    assert_eq!(failed["error"]["code"], "upstream_error");
    assert_eq!(failed["error"]["status"], 502);
    assert!(app.history("f").await.is_empty());
    let turn_id = failed["turn_id"].as_str().unwrap();
    let (status, turn) = app.get_json(&format!("/v1/sessions/f/turns/{turn_id}")).await;
    assert_eq!(status, 200);
    assert_eq!(turn["status"], "failed");
    assert_eq!(turn["error"]["code"], "upstream_error");
    assert_eq!(turn["message_ids"], json!([]));
    assert!(turn["completed_at"].is_string());
    // Following the ended turn tells how it ended.
    let url = app.url(&format!("/v1/sessions/f/turns/{turn_id}/events"));
    let followed = crate::helpers::collect_events(app.client.get(url).send().await.unwrap()).await;
    assert_eq!(followed.iter().map(|e| e.event.as_str()).collect::<Vec<_>>(), vec!["turn.failed"]);
    assert_eq!(followed[0].data, *failed);
}

#[tokio::test]
async fn a_model_timeout_is_504() {
    let model =
        Arc::new(FailingModel { deltas_first: 0, error: || ModelError::Timeout("no first byte".into()) });
    let app = spawn_app_with(spawn(model, &[])).await;
    app.create_session("t").await;
    let response = app.post_message_raw("t", json!({"content": "hello"})).await;
    assert_eq!(response.status(), 504);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "upstream_timeout");
}

#[tokio::test]
async fn a_turn_over_its_time_limit_fails_with_504_and_appends_nothing() {
    let app = spawn_app_with(spawn(
        Arc::new(EchoModel::new(parley::llm::EchoSettings { delay: Duration::from_millis(300) })),
        &["--turn-timeout", "200ms"],
    ))
    .await;
    app.create_session("slow").await;
    let response = app.post_message_raw("slow", json!({"content": "a b c"})).await;
    assert_eq!(response.status(), 504);
    assert!(app.history("slow").await.is_empty());
}

#[tokio::test]
async fn a_completed_turn_has_a_record_with_its_message_ids_and_usage() {
    let app = spawn_app_with(Spawn::default()).await;
    app.create_session("r").await;
    let turn = app.post_message("r", "hello").await;
    let turn_id = turn["turn_id"].as_str().unwrap();
    let (status, record) = app.get_json(&format!("/v1/sessions/r/turns/{turn_id}")).await;
    assert_eq!(status, 200);
    assert_eq!(record["id"], turn_id);
    assert_eq!(record["status"], "completed");
    assert_eq!(record["error"], Value::Null);
    let ids: Vec<Value> = turn["messages"].as_array().unwrap().iter().map(|m| m["id"].clone()).collect();
    assert_eq!(record["message_ids"], Value::Array(ids));
    assert_eq!(record["usage"], turn["usage"]);
    let unknown = uuid::Uuid::now_v7();
    let (status, problem) = app.get_json(&format!("/v1/sessions/r/turns/{unknown}")).await;
    assert_eq!((status, problem["code"].as_str()), (404, Some("turn_not_found")));
    let (status, _) = app.get_json("/v1/sessions/r/turns/not-a-uuid").await;
    assert_eq!(status, 400);
    let (status, _) = app.get_json(&format!("/v1/sessions/other/turns/{turn_id}")).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn the_model_gets_the_system_prompt_the_window_and_the_new_message() {
    let model = Arc::new(RecordingModel::default());
    let app =
        spawn_app_with(spawn(model.clone(), &["--history-size", "3", "--system-prompt", "Default prompt"]))
            .await;
    app.create_session("m").await;
    app.create_session_with(json!({"id": "own", "system_prompt": "Own prompt"})).await;
    for i in 0..3 {
        app.post_message("m", &format!("q{i}")).await;
    }
    app.post_message("own", "hi").await;
    let requests = model.requests.lock().unwrap().clone();
    let last_m = &requests[2];
    let roles: Vec<Role> = last_m.messages.iter().map(|m| m.role).collect();
    // The system prompt, the last 3 of [q0, a0, q1, a1], then the new message q2.
    assert_eq!(roles, vec![Role::System, Role::Assistant, Role::User, Role::Assistant, Role::User]);
    assert_eq!(last_m.messages[0].content.as_ref(), "Default prompt");
    assert_eq!(last_m.messages[2].content.as_ref(), "q1");
    assert_eq!(last_m.messages[4].content.as_ref(), "q2");
    assert_eq!(requests[3].messages[0].content.as_ref(), "Own prompt", "the session's prompt wins");
}
