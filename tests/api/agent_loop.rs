//! The agent loop end to end through the HTTP API: tools via the echo model's `/tool` convention,
//! a real OpenAI-compatible wire format via the fake server, iteration limits, concurrency of tool
//! calls, save-on-iteration, and the window around tool pairs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parley::llm::openai::{OpenAiModel, OpenAiSettings};
use parley::tools::{Tool, ToolError, ToolRegistry};
use serde_json::{Value, json};

use crate::fake_openai::{FakeOpenAi, Script};
use crate::helpers::{Backend, Spawn, TestApp, spawn_app_on, spawn_app_with};

fn roles(messages: &[Value]) -> Vec<&str> {
    messages.iter().map(|m| m["role"].as_str().unwrap()).collect()
}

async fn openai_app(fake: &FakeOpenAi, args: &[&str], tools: Option<ToolRegistry>) -> TestApp {
    let mut settings = OpenAiSettings::new(&fake.base_url, "fake-model");
    settings.retry_backoff = Duration::from_millis(10);
    settings.max_retries = 1;
    let model = Arc::new(OpenAiModel::new(settings).expect("model"));
    spawn_app_with(Spawn {
        args: args.iter().map(|s| s.to_string()).collect(),
        model: Some(model),
        tools,
        ..Spawn::default()
    })
    .await
}

async fn the_echo_tool_command_runs_a_tool_and_stores_the_whole_round(backend: Backend) {
    let app = spawn_app_on(backend, &[]).await;
    app.create_session("tools").await;
    let turn = app.post_message("tools", r#"/tool calculator {"expression": "2^10 + 1"}"#).await;
    let messages = turn["messages"].as_array().unwrap();
    assert_eq!(roles(messages), vec!["user", "assistant", "tool", "assistant"]);
    let call = &messages[1]["tool_calls"][0];
    assert_eq!(call["name"], "calculator");
    assert_eq!(call["arguments"], json!({"expression": "2^10 + 1"}));
    assert_eq!(messages[2]["tool_call_id"], call["id"]);
    assert_eq!(messages[2]["name"], "calculator");
    assert_eq!(messages[2]["content"], "1025");
    assert_eq!(messages[3]["content"], "echo: tool calculator returned: 1025 (context: 0 messages)");
    assert_eq!(app.history("tools").await, *messages, "the whole round is stored, in order");
}

async fn tool_errors_become_tool_messages_and_the_loop_goes_on(backend: Backend) {
    let app = spawn_app_on(backend, &[]).await;
    app.create_session("errs").await;
    for (command, expected) in [
        ("/tool no_such_tool {}", "unknown tool"),
        ("/tool calculator not-json", "invalid arguments"),
        (r#"/tool calculator {"expression": "1/0"}"#, "division by zero"),
        (r#"/tool current_time {"utc_offset": "+99:00"}"#, "error"),
    ] {
        let turn = app.post_message("errs", command).await;
        let messages = turn["messages"].as_array().unwrap();
        assert_eq!(roles(messages), vec!["user", "assistant", "tool", "assistant"], "{command}");
        let result = messages[2]["content"].as_str().unwrap();
        assert!(result.contains(expected), "{command}: {result}");
        assert_eq!(messages[2]["metadata"]["is_error"], true);
    }
}

async fn a_streamed_tool_turn_sends_tool_call_and_tool_result_events(backend: Backend) {
    let app = spawn_app_on(backend, &[]).await;
    app.create_session("st").await;
    let events = app.stream_turn("st", r#"/tool current_time {}"#).await;
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names[..3], ["turn.started", "tool.call", "tool.result"]);
    assert_eq!(names[names.len() - 2..], ["message.completed", "turn.completed"]);
    let call = &events[1].data["message"];
    assert_eq!(call["tool_calls"][0]["name"], "current_time");
    let result = &events[2].data["message"];
    let time = result["content"].as_str().unwrap();
    assert!(chrono::DateTime::parse_from_rfc3339(time).is_ok(), "RFC 3339: {time}");
    let stored = app.history("st").await;
    assert_eq!(&stored[1]["id"], &call["id"]);
    assert_eq!(&stored[2]["id"], &result["id"]);
}

for_each_backend!(
    the_echo_tool_command_runs_a_tool_and_stores_the_whole_round,
    tool_errors_become_tool_messages_and_the_loop_goes_on,
    a_streamed_tool_turn_sends_tool_call_and_tool_result_events,
);

#[tokio::test]
async fn an_openai_compatible_model_streams_through_the_api_with_usage() {
    let fake =
        FakeOpenAi::start(vec![Script::text("Hello from the fake model, ünïcode ✓.").cut_every(3)]).await;
    let app = openai_app(&fake, &[], None).await;
    app.create_session("oa").await;
    let events = app.stream_turn("oa", "hi").await;
    let text: String = events
        .iter()
        .filter(|e| e.event == "message.delta")
        .map(|e| e.data["delta"].as_str().unwrap())
        .collect();
    assert_eq!(text, "Hello from the fake model, ünïcode ✓.");
    let completed = events.last().unwrap();
    assert_eq!(completed.event, "turn.completed");
    assert!(completed.data["usage"]["total_tokens"].as_u64().is_some(), "{}", completed.data);
    let history = app.history("oa").await;
    assert_eq!(history[1]["content"], text);
    let sent = &fake.requests()[0].body;
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["messages"].as_array().unwrap().last().unwrap()["content"], "hi");
    assert!(sent["tools"].as_array().is_some_and(|t| t.len() == 2), "the built-in tools are offered");
}

#[tokio::test]
async fn an_upstream_failure_answers_502_and_stores_nothing() {
    let fake = FakeOpenAi::start(vec![Script::status(500, "boom"), Script::status(500, "boom")]).await;
    let app = openai_app(&fake, &[], None).await;
    app.create_session("bad").await;
    let response = app.post_message_raw("bad", json!({"content": "hi"})).await;
    assert_eq!(response.status(), 502);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "upstream_error");
    assert!(app.history("bad").await.is_empty());
    assert_eq!(fake.requests().len(), 2, "retried once before the first token");
}

#[tokio::test]
async fn after_max_iterations_a_last_call_without_tools_forces_an_answer() {
    let fake = FakeOpenAi::start(vec![
        Script::tool_call("calculator", json!({"expression": "1+1"})),
        Script::tool_call("calculator", json!({"expression": "2+2"})),
        Script::text("Done."),
    ])
    .await;
    let app = openai_app(&fake, &["--max-iterations", "2"], None).await;
    app.create_session("it").await;
    let turn = app.post_message("it", "compute").await;
    let messages = turn["messages"].as_array().unwrap();
    assert_eq!(roles(messages), vec!["user", "assistant", "tool", "assistant", "tool", "assistant"]);
    assert_eq!(messages[2]["content"], "2");
    assert_eq!(messages[4]["content"], "4");
    let requests = fake.requests();
    assert_eq!(requests.len(), 3);
    assert!(requests[0].body["tools"].is_array() && requests[1].body["tools"].is_array());
    assert!(requests[2].body.get("tools").is_none(), "the last call offers no tools");
    let sent = requests[2].body["messages"].as_array().unwrap();
    let tool_msg = sent.iter().find(|m| m["role"] == "tool").unwrap();
    assert_eq!(tool_msg["tool_call_id"], messages[1]["tool_calls"][0]["id"]);
}

/// A tool that sleeps, then answers its own name.
struct Sleepy {
    name: &'static str,
    sleep: Duration,
}

#[async_trait]
impl Tool for Sleepy {
    fn name(&self) -> &str {
        self.name
    }
    fn description(&self) -> &str {
        "sleeps"
    }
    fn parameters(&self) -> Value {
        json!({"type": "object"})
    }
    async fn call(&self, _arguments: Value) -> Result<String, ToolError> {
        tokio::time::sleep(self.sleep).await;
        Ok(self.name.to_owned())
    }
}

#[tokio::test]
async fn tool_calls_of_one_round_run_concurrently_and_keep_call_order() {
    let fake = FakeOpenAi::start(vec![
        Script::tool_calls(&[("slow", json!({})), ("fast", json!({})), ("slow2", json!({}))]),
        Script::text("ok"),
    ])
    .await;
    let mut tools = ToolRegistry::new();
    tools.register(Arc::new(Sleepy { name: "slow", sleep: Duration::from_millis(400) })).unwrap();
    tools.register(Arc::new(Sleepy { name: "fast", sleep: Duration::from_millis(1) })).unwrap();
    tools.register(Arc::new(Sleepy { name: "slow2", sleep: Duration::from_millis(400) })).unwrap();
    let app = openai_app(&fake, &[], Some(tools)).await;
    app.create_session("par").await;
    let started = Instant::now();
    let turn = app.post_message("par", "go").await;
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_millis(790), "two 400 ms tools ran at once: {elapsed:?}");
    let results: Vec<&str> =
        turn["messages"].as_array().unwrap()[2..5].iter().map(|m| m["content"].as_str().unwrap()).collect();
    assert_eq!(results, vec!["slow", "fast", "slow2"], "results keep the calls' order");
}

#[tokio::test]
async fn save_on_iteration_keeps_finished_rounds_of_a_failed_turn_out_of_later_prompts() {
    let fake = FakeOpenAi::start(vec![
        Script::tool_call("calculator", json!({"expression": "6*7"})),
        Script::status(400, "bad request"),
        Script::text("fine"),
    ])
    .await;
    let app = openai_app(&fake, &["--save-on-iteration", "true"], None).await;
    app.create_session("soi").await;
    let response = app.post_message_raw("soi", json!({"content": "first"})).await;
    assert_eq!(response.status(), 502);
    let saved = app.history("soi").await;
    assert_eq!(roles(&saved), vec!["user", "assistant", "tool"], "the finished round was saved");
    let turn_id = saved[0]["turn_id"].as_str().unwrap();
    let (_, record) = app.get_json(&format!("/v1/sessions/soi/turns/{turn_id}")).await;
    assert_eq!(record["status"], "failed");
    assert_eq!(record["message_ids"], json!([saved[0]["id"], saved[1]["id"], saved[2]["id"]]));
    app.post_message("soi", "second").await;
    let last = fake.requests().last().unwrap().body.clone();
    let sent: Vec<&str> =
        last["messages"].as_array().unwrap().iter().map(|m| m["content"].as_str().unwrap_or("")).collect();
    assert_eq!(sent, vec!["second"], "the failed turn's rounds are not sent again");
    assert_eq!(app.history("soi").await.len(), 5, "they stay readable");
}

#[tokio::test]
async fn the_window_never_starts_inside_a_tool_round() {
    let fake = FakeOpenAi::start(vec![
        Script::tool_call("calculator", json!({"expression": "1+2"})),
        Script::text("three"),
        Script::text("ok"),
    ])
    .await;
    let app = openai_app(&fake, &["--history-size", "3"], None).await;
    app.create_session("win").await;
    app.post_message("win", "add").await; // stores user, call, tool, answer
    app.post_message("win", "next").await;
    let sent = fake.requests().last().unwrap().body["messages"].as_array().unwrap().clone();
    // The last 3 stored are [call, tool, answer]: a whole group, so it is kept as is.
    assert_eq!(
        sent.iter().map(|m| m["role"].as_str().unwrap()).collect::<Vec<_>>(),
        vec!["assistant", "tool", "assistant", "user"]
    );
    assert!(sent[0]["tool_calls"].is_array());
}
