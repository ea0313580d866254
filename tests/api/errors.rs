//! Bad input: every rejection is problem+json with the right status and code, and appends nothing.

use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, spawn_app, spawn_app_on};

async fn problem(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status().as_u16(), status);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status);
    assert_eq!(body["type"], format!("urn:parley:problem:{code}"));
    assert!(body["title"].is_string() && body["detail"].is_string());
    body
}

async fn post_raw(app: &TestApp, session: &str, body: &'static str) -> reqwest::Response {
    app.client
        .post(app.url(&format!("/v1/sessions/{session}/messages")))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn rejected_turns_are_problems_and_append_nothing(backend: Backend) {
    let app = spawn_app_on(backend, &["--max-content-bytes", "64", "--max-body-bytes", "1024"]).await;
    app.create_session("e").await;
    app.post_message("e", "kept").await;
    problem(post_raw(&app, "e", "{\"content\": ").await, 400, "invalid_request").await;
    problem(post_raw(&app, "e", "not json").await, 400, "invalid_request").await;
    problem(post_raw(&app, "e", "{\"content\": 42}").await, 422, "validation_failed").await;
    problem(post_raw(&app, "e", "{\"metadata\": {}}").await, 422, "validation_failed").await;
    problem(post_raw(&app, "e", "{\"content\": \"\"}").await, 422, "validation_failed").await;
    problem(post_raw(&app, "e", "{\"content\": \"   \"}").await, 422, "validation_failed").await;
    problem(post_raw(&app, "e", "{\"content\": \"x\", \"metadata\": [1]}").await, 422, "validation_failed")
        .await;
    problem(post_raw(&app, "e", "{\"content\": \"a\\u0000b\"}").await, 422, "validation_failed").await;
    let long = json!({"content": "x".repeat(65)});
    problem(app.post_message_raw("e", long).await, 413, "payload_too_large").await;
    let huge = json!({"content": "ok", "metadata": {"pad": "y".repeat(2000)}});
    problem(app.post_message_raw("e", huge).await, 413, "payload_too_large").await;
    problem(app.post_message_raw("nobody", json!({"content": "hi"})).await, 404, "session_not_found").await;
    let history = app.history("e").await;
    assert_eq!(history.len(), 2, "only the accepted turn is stored");
}

async fn invalid_ids_limits_and_cursors_are_rejected(backend: Backend) {
    let app = spawn_app_on(backend, &[]).await;
    app.create_session("ok").await;
    let bad_id = app.create_session_with(json!({"id": "has space"})).await;
    problem(bad_id, 400, "invalid_request").await;
    let too_long = app.create_session_with(json!({"id": "x".repeat(129)})).await;
    problem(too_long, 400, "invalid_request").await;
    let wrong_type = app.create_session_with(json!({"metadata": "not an object"})).await;
    problem(wrong_type, 422, "validation_failed").await;
    let get = |path: &str| app.client.get(app.url(path)).send();
    problem(get("/v1/sessions/bad%20id").await.unwrap(), 400, "invalid_request").await;
    problem(get("/v1/sessions/bad%20id/messages").await.unwrap(), 400, "invalid_request").await;
    for limit in ["0", "101", "-1", "abc"] {
        problem(
            get(&format!("/v1/sessions/ok/messages?limit={limit}")).await.unwrap(),
            422,
            "validation_failed",
        )
        .await;
        problem(get(&format!("/v1/sessions?limit={limit}")).await.unwrap(), 422, "validation_failed").await;
    }
    problem(get("/v1/sessions/ok/messages?order=sideways").await.unwrap(), 422, "validation_failed").await;
    problem(get("/v1/sessions?cursor=garbage").await.unwrap(), 400, "invalid_request").await;
    let (status, _) = app.get_json("/v1/sessions?limit=100").await;
    assert_eq!(status, 200);
}

for_each_backend!(
    rejected_turns_are_problems_and_append_nothing,
    invalid_ids_limits_and_cursors_are_rejected
);

/// Cases schemathesis found, kept as regression tests.
#[tokio::test]
async fn fuzzing_regressions_stay_fixed() {
    let app = spawn_app(&[]).await;
    let null_body = app
        .client
        .post(app.url("/v1/sessions"))
        .header("content-type", "application/json")
        .body("null")
        .send()
        .await
        .unwrap();
    assert_eq!(null_body.status(), 201, "a null body is an empty body");
    let post_json = |path: &str, body: &'static str| {
        app.client.post(app.url(path)).header("content-type", "application/json").body(body).send()
    };
    let sessions_before = app.get_json("/v1/sessions").await.1["data"].as_array().unwrap().len();
    // Form feed is ASCII whitespace but not JSON whitespace: it is malformed JSON, not "no body".
    problem(post_json("/v1/sessions", "\x0c").await.unwrap(), 400, "invalid_request").await;
    problem(post_json("/v1/sessions", " \x0b ").await.unwrap(), 400, "invalid_request").await;
    let whitespace = post_json("/v1/sessions", " \r\n\t ").await.unwrap();
    assert_eq!(whitespace.status(), 201, "a body of JSON whitespace only is an empty body");
    let sessions_after = app.get_json("/v1/sessions").await.1["data"].as_array().unwrap().len();
    assert_eq!(sessions_after, sessions_before + 1, "only the whitespace body created a session");
    // serde would read an array as the body's fields in order; the spec says object.
    problem(post_json("/v1/sessions", "[null, null, null]").await.unwrap(), 422, "validation_failed").await;
    app.create_session("f").await;
    problem(post_json("/v1/sessions/f/messages", r#"["hi"]"#).await.unwrap(), 422, "validation_failed").await;
    assert!(app.history("f").await.is_empty(), "nothing was stored");
    let get = |path: &str| app.client.get(app.url(path)).send();
    problem(get("/v1/sessions/f/messages?after=-1").await.unwrap(), 422, "validation_failed").await;
    problem(
        get("/v1/sessions/f/messages?cursor=9223372036854775808").await.unwrap(),
        422,
        "validation_failed",
    )
    .await;
    problem(get("/v1/sessions?cursor=").await.unwrap(), 400, "invalid_request").await;
    // Any cursor the spec's pattern allows is accepted (schemathesis found `-802111..`).
    for cursor in ["922337203685477580.x", "-802111..", "-999999999999999999.-", "0.."] {
        let (status, body) = app.get_json(&format!("/v1/sessions?cursor={cursor}")).await;
        assert_eq!(status, 200, "cursor {cursor}: {body}");
    }
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let app = spawn_app(&["--max-body-bytes", "1000", "--max-content-bytes", "1000"]).await;
    app.create_session("b").await;
    let body = json!({"content": "z".repeat(2000)});
    problem(app.post_message_raw("b", body).await, 413, "payload_too_large").await;
    let big_session = app.create_session_with(json!({"metadata": {"pad": "q".repeat(5000)}})).await;
    problem(big_session, 413, "payload_too_large").await;
    assert!(app.history("b").await.is_empty());
}

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405_as_problems() {
    let app = spawn_app(&[]).await;
    let response = app.client.get(app.url("/v2/nothing")).send().await.unwrap();
    problem(response, 404, "not_found").await;
    let response = app.client.put(app.url("/v1/sessions")).send().await.unwrap();
    let allow = response.headers()["allow"].to_str().unwrap().to_owned();
    assert!(allow.contains("POST") && allow.contains("GET"), "{allow}");
    problem(response, 405, "method_not_allowed").await;
    let response = app.client.patch(app.url("/v1/sessions/x/messages")).send().await.unwrap();
    problem(response, 405, "method_not_allowed").await;
}

fn faulty(method: &'static str, fault: crate::faulty_store::Fault) -> crate::helpers::Spawn {
    let store =
        std::sync::Arc::new(crate::faulty_store::FaultyStore { inner: Default::default(), method, fault });
    crate::helpers::Spawn {
        args: vec!["--request-timeout".into(), "300ms".into()],
        store: Some(parley::agent::TurnStore::composed(store.clone(), store)),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_request_over_the_timeout_is_408_as_a_problem() {
    let stall = crate::faulty_store::Fault::Stall(std::time::Duration::from_secs(5));
    let app = crate::helpers::spawn_app_with(faulty("list_sessions", stall)).await;
    let started = std::time::Instant::now();
    let response = app.client.get(app.url("/v1/sessions")).send().await.unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    problem(response, 408, "request_timeout").await;
}

#[tokio::test]
async fn a_panic_in_a_handler_is_a_500_problem_without_its_message() {
    let app = crate::helpers::spawn_app_with(faulty("get_session", crate::faulty_store::Fault::Panic)).await;
    let response = app.client.get(app.url("/v1/sessions/boom")).send().await.unwrap();
    let body = problem(response, 500, "internal_error").await;
    assert!(!body.to_string().contains("injected"), "the panic message is not sent: {body}");
    let (status, _) = app.get_json("/healthz").await;
    assert_eq!(status, 200, "the service keeps serving");
}

#[tokio::test]
async fn every_answer_carries_a_request_id_and_a_given_one_is_kept() {
    let app = spawn_app(&[]).await;
    let made = app.client.get(app.url("/v1/sessions")).send().await.unwrap();
    let id = made.headers()["x-request-id"].to_str().unwrap();
    let parsed = uuid::Uuid::parse_str(id).expect("a UUID");
    assert_eq!(parsed.get_version_num(), 7, "time-ordered like every id parley makes");
    let given =
        app.client.get(app.url("/v1/nowhere")).header("x-request-id", "trace-42").send().await.unwrap();
    assert_eq!(given.headers()["x-request-id"], "trace-42");
}

#[tokio::test]
async fn a_uri_over_parleys_limit_is_414_as_a_problem() {
    let app = spawn_app(&[]).await;
    let long = format!("/v1/sessions?cursor={}", "a".repeat(10 * 1024));
    let body = problem(app.client.get(app.url(&long)).send().await.unwrap(), 414, "uri_too_long").await;
    assert!(body["detail"].as_str().unwrap().contains("8192"), "{body}");
    let id = "b".repeat(9 * 1024);
    let response = app.client.post(app.url(&format!("/v1/sessions/{id}/messages"))).send().await.unwrap();
    problem(response, 414, "uri_too_long").await;
}

#[tokio::test]
async fn headers_over_parleys_limits_are_431_as_a_problem() {
    let app = spawn_app(&[]).await;
    // 40 KiB in ten fields.
    let mut request = app.client.get(app.url("/v1/sessions"));
    for i in 0..10 {
        request = request.header(format!("x-big-{i}"), "v".repeat(4 * 1024));
    }
    problem(request.send().await.unwrap(), 431, "headers_too_large").await;
    // 150 small fields: more than hyper itself parses by default (100), which would answer a bare 431.
    let mut request = app.client.get(app.url("/v1/sessions"));
    for i in 0..150 {
        request = request.header(format!("x-small-{i}"), "v");
    }
    problem(request.send().await.unwrap(), 431, "headers_too_large").await;
    assert_eq!(
        app.client
            .get(app.url("/v1/sessions"))
            .header("x-ok", "v".repeat(8 * 1024))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn two_authorization_headers_are_refused_with_400_whether_auth_is_on_or_off() {
    use crate::helpers::{KEY_A, KEY_B, two_tenants};
    let keyed = two_tenants();
    let keyed: Vec<&str> = keyed.iter().map(String::as_str).collect();
    for args in [keyed, Vec::new()] {
        let app = spawn_app(&args).await;
        for second in [KEY_A, KEY_B] {
            let response = app
                .client
                .get(app.url("/v1/sessions"))
                .header("authorization", format!("Bearer {KEY_A}"))
                .header("authorization", format!("Bearer {second}"))
                .send()
                .await
                .unwrap();
            let body = problem(response, 400, "invalid_request").await;
            assert!(body["detail"].as_str().unwrap().contains("Authorization"), "{body}");
        }
    }
}
