//! The chat-client dialects (`/v1/ai-sdk/chat`, `/v1/ag-ui`) at the HTTP level, on every store:
//! an error before the stream starts is problem+json, as the published clients expect from a
//! failed fetch, and every 409 `turn_in_progress` (native or dialect) carries
//! `x-should-retry: false`. The clients themselves are exercised in `tests/web/clients`.

use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, spawn_app_on};

fn chat(id: &str, text: &str) -> Value {
    json!({"id": id, "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": text}]}],
        "trigger": "submit-message"})
}

fn run(thread: &str, id: &str, content: Value) -> Value {
    json!({"threadId": thread, "runId": "r1", "messages": [{"id": id, "role": "user", "content": content}],
        "tools": [], "context": [], "state": {}, "forwardedProps": {}})
}

async fn send(app: &TestApp, method: reqwest::Method, path: &str, body: Option<Value>) -> reqwest::Response {
    let request = app.client.request(method, app.url(path));
    let request = match body {
        Some(body) => request.json(&body),
        None => request,
    };
    request.send().await.expect("request")
}

/// Asserts a problem+json answer with this status and code.
async fn assert_problem(response: reqwest::Response, status: u16, code: &str) -> reqwest::header::HeaderMap {
    let headers = response.headers().clone();
    assert_eq!(response.status().as_u16(), status, "{code}");
    assert_eq!(headers["content-type"], "application/problem+json", "{code}");
    let body: Value = response.json().await.expect("problem body");
    assert_eq!(body["code"], code, "{body}");
    headers
}

/// Every request a client dialect refuses before its stream starts is a problem+json answer.
async fn dialect_errors_before_the_stream_are_problem_json(backend: Backend) {
    use reqwest::Method;
    let app = spawn_app_on(backend, &[]).await;
    let post = |path: &'static str, body: Value| send(&app, Method::POST, path, Some(body));
    let raw = app.client.post(app.url("/v1/ai-sdk/chat")).body("{").send().await.unwrap();
    assert_problem(raw, 400, "invalid_request").await;
    assert_problem(post("/v1/ai-sdk/chat", chat("bad id!", "hi")).await, 400, "invalid_request").await;
    assert_problem(post("/v1/ai-sdk/chat", chat("c", " ")).await, 422, "validation_failed").await;
    let file = json!({"id": "c", "messages": [{"id": "u1", "role": "user",
        "parts": [{"type": "file", "mediaType": "image/png", "url": "data:image/png;base64,AA=="}]}]});
    assert_problem(post("/v1/ai-sdk/chat", file).await, 422, "validation_failed").await;
    let none = json!({"id": "c", "messages": [], "trigger": "submit-message"});
    assert_problem(post("/v1/ai-sdk/chat", none).await, 422, "validation_failed").await;
    let regenerate = json!({"id": "nowhere", "messages": [], "trigger": "regenerate-message"});
    assert_problem(post("/v1/ai-sdk/chat", regenerate).await, 404, "session_not_found").await;
    let resume = send(&app, Method::GET, "/v1/ai-sdk/chat/nowhere/stream", None).await;
    assert_problem(resume, 404, "session_not_found").await;
    let stop = send(&app, Method::POST, "/v1/ai-sdk/chat/nowhere/stop", None).await;
    assert_problem(stop, 404, "session_not_found").await;
    // A chat made on first use: idle, so resume has nothing to replay, and stop nothing to stop.
    let first = post("/v1/ai-sdk/chat", chat("c", "hi")).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-vercel-ai-ui-message-stream"], "v1");
    assert!(first.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    assert_eq!(send(&app, Method::GET, "/v1/ai-sdk/chat/c/stream", None).await.status(), 204);
    assert_eq!(send(&app, Method::POST, "/v1/ai-sdk/chat/c/stop", None).await.status(), 204);
    // AG-UI: the same rules, and nothing new to run is 422.
    assert_problem(post("/v1/ag-ui", run("bad id!", "m1", json!("hi"))).await, 400, "invalid_request").await;
    let image = json!([{"type": "image", "source": {"type": "url", "value": "https://example.com/a.png"}}]);
    assert_problem(post("/v1/ag-ui", run("t", "m1", image)).await, 422, "validation_failed").await;
    let ran = post("/v1/ag-ui", run("t", "m1", json!("hi"))).await;
    assert_eq!(ran.status(), 200);
    // Read to its end: the turn is stored (and the session free) once the stream ends.
    assert!(ran.text().await.unwrap().contains("RUN_FINISHED"));
    assert_problem(post("/v1/ag-ui", run("t", "m1", json!("hi"))).await, 422, "validation_failed").await;
    assert_eq!(app.history("t").await.len(), 2, "the resent message was not stored again");
}

/// While a turn runs, a second one is refused 409 `turn_in_progress` with `x-should-retry:
/// false` on every route that starts one: the native post and regenerate, and both dialects.
async fn every_turn_in_progress_conflict_says_do_not_retry(backend: Backend) {
    use reqwest::Method;
    let app = spawn_app_on(backend, &["--echo-delay-ms", "40"]).await;
    app.create_session("s").await;
    let done = app.post_message("s", "first").await;
    let turn_id = done["turn_id"].as_str().unwrap().to_owned();
    let running = app.open_stream("s", "a b c d e f g h i j k l m n o p q r s t u v w x y z").await;
    let regenerate = format!("/v1/sessions/s/turns/{turn_id}/regenerate");
    let attempts = [
        send(&app, Method::POST, "/v1/sessions/s/messages", Some(json!({"content": "again"}))).await,
        send(&app, Method::POST, &regenerate, None).await,
        send(&app, Method::POST, "/v1/ai-sdk/chat", Some(chat("s", "again"))).await,
        send(&app, Method::POST, "/v1/ag-ui", Some(run("s", "m9", json!("again")))).await,
    ];
    for response in attempts {
        let headers = assert_problem(response, 409, "turn_in_progress").await;
        assert_eq!(headers["x-should-retry"], "false");
    }
    drop(running);
}

for_each_backend!(
    dialect_errors_before_the_stream_are_problem_json,
    every_turn_in_progress_conflict_says_do_not_retry
);
