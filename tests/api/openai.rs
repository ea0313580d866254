//! The OpenAI-compatible provider against the fake server, over real HTTP: streaming, tool calls,
//! awkward chunk boundaries, in-stream errors, retries, timeouts, request shape and the API key.

use std::time::{Duration, Instant};

use futures::StreamExt;
use parley::domain::{Role, ToolCall, Usage};
use parley::error::AppError;
use parley::llm::openai::{OpenAiModel, OpenAiSettings};
use parley::llm::{ChatModel, ChatRequest, ModelError, ModelEvent, ModelOutput, PromptMessage, ToolSpec};
use serde_json::json;

use crate::fake_openai::{FakeOpenAi, Script, chunk};

const KEY: &str = "sk-test-do-not-leak-42";

fn settings(fake: &FakeOpenAi) -> OpenAiSettings {
    let mut s = OpenAiSettings::new(&fake.base_url, "fake-model");
    s.request_timeout = Duration::from_secs(5);
    s.retry_backoff = Duration::from_millis(10);
    s
}

fn model(settings: OpenAiSettings) -> OpenAiModel {
    OpenAiModel::new(settings).expect("model")
}

fn ask(text: &str) -> ChatRequest {
    ChatRequest { messages: vec![PromptMessage::text(Role::User, text)], tools: Vec::new().into() }
}

/// Everything a stream produced: its deltas, then its output or its error.
struct Run {
    deltas: Vec<String>,
    end: Result<ModelOutput, ModelError>,
}

async fn run(model: &OpenAiModel, request: ChatRequest) -> Result<Run, ModelError> {
    let mut stream = model.stream(&request).await?;
    let mut deltas = Vec::new();
    while let Some(event) = stream.next().await {
        match event {
            Ok(ModelEvent::Delta(d)) => deltas.push(d),
            Ok(ModelEvent::Done(out)) => {
                assert!(stream.next().await.is_none(), "nothing after Done");
                return Ok(Run { deltas, end: Ok(out) });
            }
            Err(e) => {
                assert!(stream.next().await.is_none(), "nothing after an error");
                return Ok(Run { deltas, end: Err(e) });
            }
        }
    }
    panic!("the stream ended without Done or an error");
}

async fn complete(model: &OpenAiModel, request: ChatRequest) -> (Vec<String>, ModelOutput) {
    let run = run(model, request).await.expect("the call starts");
    (run.deltas, run.end.expect("the stream completes"))
}

#[tokio::test]
async fn text_streams_as_deltas_then_done_with_usage() {
    let text = "Grüße aus dem 世界 🌍, line one\nline two";
    let fake = FakeOpenAi::start(vec![Script::text(text)]).await;
    let (deltas, out) = complete(&model(settings(&fake)), ask("hi")).await;
    assert!(deltas.len() > 3, "{deltas:?}");
    assert_eq!(deltas.concat(), text);
    assert_eq!(out.content, text);
    assert_eq!(out.finish_reason.as_deref(), Some("stop"));
    assert_eq!(out.usage, Some(Usage { prompt_tokens: 11, completion_tokens: 8, total_tokens: 19 }));
    assert!(out.tool_calls.is_empty());
}

#[tokio::test]
async fn one_byte_pieces_split_every_line_json_and_utf8_character() {
    let text = "ä€😀 — ok";
    let fake = FakeOpenAi::start(vec![Script::text(text).cut_every(1)]).await;
    let (deltas, out) = complete(&model(settings(&fake)), ask("hi")).await;
    assert_eq!(deltas.concat(), text);
    assert_eq!(out.content, text);
}

#[tokio::test]
async fn parallel_tool_calls_are_assembled_by_index() {
    let calls = [
        ("calculator", json!({"expression": "(1 + 2) × 3 — ü"})),
        ("current_time", json!({"utc_offset": "+02:00"})),
        ("lookup", json!({"q": "日本", "n": [1, 2, {"deep": true}]})),
    ];
    let fake = FakeOpenAi::start(vec![Script::tool_calls(&calls).cut_every(3)]).await;
    let (deltas, out) = complete(&model(settings(&fake)), ask("hi")).await;
    assert!(deltas.is_empty());
    assert_eq!(out.finish_reason.as_deref(), Some("tool_calls"));
    let want: Vec<ToolCall> = calls
        .iter()
        .enumerate()
        .map(|(i, (name, args))| ToolCall {
            id: format!("call_{}", i + 1),
            name: (*name).into(),
            arguments: args.clone(),
        })
        .collect();
    assert_eq!(out.tool_calls, want);
    assert_eq!(out.usage.map(|u| u.total_tokens), Some(30));
}

#[tokio::test]
async fn invalid_tool_arguments_are_kept_as_raw_text() {
    let chunks = vec![
        chunk::role(),
        chunk::tool_call_start(0, "call_x", "calculator"),
        chunk::tool_call_args(0, "{\"expression\": "),
        chunk::finish("tool_calls"),
    ];
    let fake = FakeOpenAi::start(vec![Script::chunks(chunks)]).await;
    let (_, out) = complete(&model(settings(&fake)), ask("hi")).await;
    assert_eq!(out.tool_calls[0].arguments, json!("{\"expression\": "));
}

#[tokio::test]
async fn comments_keep_alives_crlf_and_event_fields_are_handled() {
    let body = [
        ": this is a comment\r\n\r\n",
        ":keep-alive\r\n\r\n",
        "retry: 1000\r\nid: 1\r\n",
        &format!("data: {}\r\n\r\n", chunk::role()),
        ": OPENROUTER PROCESSING\r\n\r\n",
        &format!("data: {}\r\n\r\n", chunk::content("Hi")),
        &format!("data:{}\r\n\r\n", chunk::content(" there")),
        &format!("data: {}\r\n\r\n", chunk::finish("stop")),
        ": ping\r\n\r\n",
        &format!("data: {}\r\n\r\n", chunk::usage(1, 2)),
        "data: [DONE]\r\n\r\n",
    ]
    .concat();
    let fake = FakeOpenAi::start(vec![Script::raw(body).cut_every(2)]).await;
    let (deltas, out) = complete(&model(settings(&fake)), ask("hi")).await;
    assert_eq!(deltas, vec!["Hi", " there"]);
    assert_eq!(out.usage.map(|u| u.total_tokens), Some(3));
}

#[tokio::test]
async fn an_error_object_inside_the_stream_ends_it_with_an_error() {
    let chunks = vec![chunk::role(), chunk::content("partial"), chunk::error("the model is overloaded")];
    let fake = FakeOpenAi::start(vec![Script::chunks(chunks)]).await;
    let run = run(&model(settings(&fake)), ask("hi")).await.unwrap();
    assert_eq!(run.deltas, vec!["partial"]);
    let err = run.end.unwrap_err();
    assert!(matches!(&err, ModelError::Protocol(m) if m.contains("the model is overloaded")), "{err}");
    assert_eq!(AppError::from(err).status().as_u16(), 502);
}

#[tokio::test]
async fn a_stream_without_done_or_finish_reason_is_an_error() {
    let fake =
        FakeOpenAi::start(vec![Script::chunks_without_done(vec![chunk::role(), chunk::content("a")])]).await;
    let run = run(&model(settings(&fake)), ask("hi")).await.unwrap();
    assert_eq!(run.deltas, vec!["a"]);
    assert!(matches!(run.end, Err(ModelError::Protocol(_))));
}

#[tokio::test]
async fn a_500_is_retried_then_the_reply_streams() {
    let fake = FakeOpenAi::start(vec![Script::error(500, "boom"), Script::text("ok now")]).await;
    let (_, out) = complete(&model(settings(&fake)), ask("hi")).await;
    assert_eq!(out.content, "ok now");
    assert_eq!(fake.requests().len(), 2);
    assert_eq!(fake.requests()[0].body, fake.requests()[1].body, "the same request is sent again");
}

#[tokio::test]
async fn a_429_waits_for_retry_after() {
    let busy = Script::error(429, "slow down").header("retry-after", "1");
    let fake = FakeOpenAi::start(vec![busy, Script::text("ok")]).await;
    let started = Instant::now();
    let (_, out) = complete(&model(settings(&fake)), ask("hi")).await;
    assert_eq!(out.content, "ok");
    assert!(started.elapsed() >= Duration::from_millis(950), "{:?}", started.elapsed());
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test]
async fn retries_stop_at_max_retries_with_the_last_status() {
    let scripts =
        vec![Script::error(503, "a"), Script::error(502, "b"), Script::error(503, "c"), Script::text("x")];
    let fake = FakeOpenAi::start(scripts).await;
    let err = model(settings(&fake)).stream(&ask("hi")).await.err().expect("an error");
    assert!(matches!(&err, ModelError::Status { status: 503, message } if message == "c"), "{err}");
    assert_eq!(fake.requests().len(), 3, "one call and max_retries = 2 retries");
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    for status in [400, 401, 403, 404, 422] {
        let fake = FakeOpenAi::start(vec![Script::error(status, "nope"), Script::text("x")]).await;
        let err = model(settings(&fake)).stream(&ask("hi")).await.err().expect("an error");
        assert!(
            matches!(&err, ModelError::Status { status: s, message } if *s == status && message == "nope")
        );
        assert_eq!(fake.requests().len(), 1, "{status} is not retried");
        assert_eq!(AppError::from(err).status().as_u16(), 502);
    }
}

#[tokio::test]
async fn an_error_body_that_is_not_json_is_quoted_briefly() {
    let fake = FakeOpenAi::start(vec![Script::status(400, "x".repeat(5000))]).await;
    let err = model(settings(&fake)).stream(&ask("hi")).await.err().expect("an error");
    let ModelError::Status { message, .. } = err else { panic!("{err}") };
    assert!(message.len() <= 300, "{}", message.len());
}

#[tokio::test]
async fn nothing_is_retried_after_the_first_chunk() {
    let partial =
        Script::chunks_without_done(vec![chunk::role(), chunk::content("one "), chunk::content("two")]);
    let fake = FakeOpenAi::start(vec![partial.then_drop(), Script::text("should not be used")]).await;
    let run = run(&model(settings(&fake)), ask("hi")).await.unwrap();
    assert_eq!(run.deltas, vec!["one ", "two"]);
    let err = run.end.unwrap_err();
    assert!(matches!(err, ModelError::Connect(_)), "the cut is reported: {err}");
    assert_eq!(AppError::from(err).status().as_u16(), 502);
    assert_eq!(fake.requests().len(), 1);
    assert_eq!(fake.scripts_left(), 1);
}

#[tokio::test]
async fn no_answer_before_the_timeout_is_a_timeout_and_504() {
    let fake = FakeOpenAi::start(vec![Script::hang()]).await;
    let mut s = settings(&fake);
    s.request_timeout = Duration::from_millis(300);
    s.max_retries = 0;
    let started = Instant::now();
    let err = model(s).stream(&ask("hi")).await.err().expect("an error");
    assert!(matches!(err, ModelError::Timeout(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(AppError::from(err).status().as_u16(), 504);
}

#[tokio::test]
async fn timeouts_before_the_first_chunk_are_retried() {
    let silent_body = Script::raw(Vec::new()).then_hang();
    let fake = FakeOpenAi::start(vec![Script::hang(), silent_body, Script::text("finally")]).await;
    let mut s = settings(&fake);
    s.request_timeout = Duration::from_millis(300);
    let (_, out) = complete(&model(s), ask("hi")).await;
    assert_eq!(out.content, "finally");
    assert_eq!(fake.requests().len(), 3);
}

#[tokio::test]
async fn a_connection_cut_before_the_first_chunk_is_retried() {
    let cut = Script::raw(": hello\n\n").then_drop();
    let fake = FakeOpenAi::start(vec![cut, Script::text("second try")]).await;
    let (_, out) = complete(&model(settings(&fake)), ask("hi")).await;
    assert_eq!(out.content, "second try");
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test]
async fn a_stream_that_goes_quiet_mid_reply_times_out_without_retry() {
    let partial = Script::chunks_without_done(vec![chunk::role(), chunk::content("half")]).then_hang();
    let fake = FakeOpenAi::start(vec![partial, Script::text("unused")]).await;
    let mut s = settings(&fake);
    s.request_timeout = Duration::from_millis(300);
    let run = run(&model(s), ask("hi")).await.unwrap();
    assert_eq!(run.deltas, vec!["half"]);
    assert!(matches!(run.end, Err(ModelError::Timeout(_))));
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn a_long_stream_with_short_gaps_outlives_the_timeout() {
    let script = Script::text("one two three four five six seven eight")
        .cut_every(40)
        .pause(Duration::from_millis(40));
    let fake = FakeOpenAi::start(vec![script]).await;
    let mut s = settings(&fake);
    s.request_timeout = Duration::from_millis(250);
    let started = Instant::now();
    let (_, out) = complete(&model(s), ask("hi")).await;
    assert!(started.elapsed() > Duration::from_millis(250), "the whole stream took longer than the timeout");
    assert_eq!(out.content, "one two three four five six seven eight");
}

#[tokio::test]
async fn keep_alive_comments_count_as_activity_before_the_first_chunk() {
    let mut pieces = vec![": wait\n\n".to_owned(); 6];
    pieces.push(crate::fake_openai::sse(&[chunk::content("late"), chunk::finish("stop")]));
    let script = Script::pieces(pieces).pause(Duration::from_millis(100));
    let fake = FakeOpenAi::start(vec![script]).await;
    let mut s = settings(&fake);
    s.request_timeout = Duration::from_millis(300);
    s.max_retries = 0;
    let (_, out) = complete(&model(s), ask("hi")).await;
    assert_eq!(out.content, "late");
}

#[tokio::test]
async fn connect_errors_are_retried_then_reported() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mut s = OpenAiSettings::new(format!("http://{addr}/v1"), "m");
    s.max_retries = 1;
    s.retry_backoff = Duration::from_millis(10);
    let err = model(s).stream(&ask("hi")).await.err().expect("an error");
    assert!(matches!(err, ModelError::Connect(_)), "{err}");
    assert!(!err.to_string().contains(&addr.to_string()), "no URL in the message: {err}");
}

#[tokio::test]
async fn the_request_body_has_the_openai_shape() {
    let fake = FakeOpenAi::start(vec![Script::text("ok")]).await;
    let mut s = settings(&fake);
    s.temperature = Some(0.2);
    s.max_tokens = Some(64);
    let mut call = PromptMessage::text(Role::Assistant, "");
    call.tool_calls = vec![ToolCall {
        id: "call_9".into(),
        name: "calculator".into(),
        arguments: json!({"expression": "2+2"}),
    }];
    let mut result = PromptMessage::text(Role::Tool, "4");
    result.tool_call_id = Some("call_9".into());
    result.name = Some("calculator".into());
    let request = ChatRequest {
        messages: vec![
            PromptMessage::text(Role::System, "be brief"),
            PromptMessage::text(Role::User, "2+2?"),
            call,
            result,
        ],
        tools: vec![ToolSpec {
            name: "calculator".into(),
            description: "Evaluates arithmetic.".into(),
            parameters: json!({"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}),
        }]
        .into(),
    };
    complete(&model(s), request).await;
    let sent = &fake.requests()[0];
    assert_eq!(sent.header("content-type").as_deref(), Some("application/json"));
    assert_eq!(sent.header("accept").as_deref(), Some("text/event-stream"));
    assert_eq!(
        sent.body,
        json!({
            "model": "fake-model",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_9", "type": "function", "function": {"name": "calculator", "arguments": "{\"expression\":\"2+2\"}"}}
                ]},
                {"role": "tool", "content": "4", "tool_call_id": "call_9"}
            ],
            "stream": true,
            "stream_options": {"include_usage": true},
            "tools": [{"type": "function", "function": {
                "name": "calculator",
                "description": "Evaluates arithmetic.",
                "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}
            }}],
            "temperature": 0.2,
            "max_tokens": 64
        })
    );
}

#[tokio::test]
async fn the_configured_token_limit_field_reaches_the_upstream() {
    for (param, field, other) in [
        ("max_completion_tokens", "max_completion_tokens", "max_tokens"),
        ("max_tokens", "max_tokens", "max_completion_tokens"),
        // `auto` on a host that is not OpenAI's: the name every compatible server reads.
        ("auto", "max_tokens", "max_completion_tokens"),
    ] {
        let fake = FakeOpenAi::start(vec![Script::text("ok")]).await;
        let app = crate::helpers::spawn_app(&[
            "--model-provider=openai",
            &format!("--openai-base-url={}", fake.base_url),
            "--max-tokens=64",
            &format!("--max-tokens-param={param}"),
        ])
        .await;
        app.create_session("s").await;
        app.post_message("s", "hi").await;
        let body = &fake.requests()[0].body;
        assert_eq!(body[field], json!(64), "{param}: {body}");
        assert!(body.get(other).is_none(), "{param}: {body}");
    }
}

#[tokio::test]
async fn without_tools_the_tools_field_is_absent() {
    let fake = FakeOpenAi::start(vec![Script::text("ok")]).await;
    complete(&model(settings(&fake)), ask("hi")).await;
    let body = &fake.requests()[0].body;
    assert!(body.get("tools").is_none());
    assert!(body.get("temperature").is_none());
    assert!(body.get("max_tokens").is_none());
    assert!(body.get("max_completion_tokens").is_none());
}

#[tokio::test]
async fn authorization_is_sent_only_with_a_key() {
    let fake = FakeOpenAi::start(vec![Script::text("a"), Script::text("b")]).await;
    complete(&model(settings(&fake)), ask("hi")).await;
    let mut with_key = settings(&fake);
    with_key.api_key = Some(KEY.into());
    complete(&model(with_key), ask("hi")).await;
    let requests = fake.requests();
    assert_eq!(requests[0].header("authorization"), None);
    assert_eq!(requests[1].header("authorization"), Some(format!("Bearer {KEY}")));
}

#[tokio::test]
async fn the_key_never_appears_in_errors() {
    let echo = format!("Incorrect API key provided: {KEY}.");
    let in_stream = Script::chunks(vec![chunk::role(), chunk::error(&format!("bad key {KEY}"))]);
    let fake = FakeOpenAi::start(vec![Script::error(401, &echo), in_stream]).await;
    let mut s = settings(&fake);
    s.api_key = Some(KEY.into());
    let model = model(s);
    let err = model.stream(&ask("hi")).await.err().expect("an error");
    assert!(matches!(err, ModelError::Status { status: 401, .. }));
    let texts = [err.to_string(), format!("{err:?}"), format!("{model:?}")];
    let streamed = run(&model, ask("hi")).await.unwrap().end.unwrap_err();
    for text in texts.iter().chain([streamed.to_string()].iter()) {
        assert!(!text.contains(KEY), "leaked: {text}");
    }
}

#[tokio::test]
async fn a_json_body_instead_of_a_stream_is_a_clear_error() {
    let fake =
        FakeOpenAi::start(vec![Script::status(200, r#"{"error": {"message": "streaming unsupported"}}"#)])
            .await;
    let err = model(settings(&fake)).stream(&ask("hi")).await.err().expect("an error");
    assert!(err.to_string().contains("streaming unsupported"), "{err}");
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn an_upstream_error_body_reaches_the_log_not_the_client() {
    let body = "Incorrect API key provided: sk-live-abcdef123456 (shard db-7.internal.corp)";
    let in_stream =
        Script::chunks(vec![chunk::role(), chunk::error("stack trace at worker-9.internal.corp")]);
    let fake = FakeOpenAi::start(vec![Script::error(401, body), Script::error(401, body), in_stream]).await;
    let app = crate::helpers::spawn_app(&[
        "--model-provider=openai",
        &format!("--openai-base-url={}", fake.base_url),
        "--max-retries=0",
    ])
    .await;
    app.create_session("s").await;
    let leaks = |text: &str| ["Incorrect", "sk-live", "internal.corp"].iter().any(|w| text.contains(w));

    let response = app.post_message_raw("s", json!({"content": "hi"})).await;
    assert_eq!(response.status(), 502);
    let problem: serde_json::Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "upstream_error");
    assert!(problem["detail"].as_str().unwrap().contains("401"), "the upstream status is told: {problem}");
    assert!(!leaks(&problem.to_string()), "{problem}");

    for (content, status) in [("streamed", Some("401")), ("in-stream error", None)] {
        let response = app
            .client
            .post(app.url("/v1/sessions/s/messages"))
            .header("accept", "text/event-stream")
            .json(&json!({ "content": content }))
            .send()
            .await
            .unwrap();
        let events = crate::helpers::collect_events(response).await;
        let last = events.last().expect("events");
        assert_eq!(last.event, "turn.failed");
        let text = last.data.to_string();
        assert!(!leaks(&text), "{text}");
        if let Some(status) = status {
            assert!(text.contains(status), "{text}");
        }
        let turn_id = last.data["turn_id"].as_str().unwrap();
        let (code, record) = app.get_json(&format!("/v1/sessions/s/turns/{turn_id}")).await;
        assert_eq!(code, 200);
        assert!(!leaks(&record.to_string()), "the turn record keeps no upstream text: {record}");
    }
}
