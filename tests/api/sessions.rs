//! Sessions: create, list, read, delete.

use serde_json::{Value, json};

use crate::helpers::{Backend, spawn_app, spawn_app_on};
use crate::raw_http;

async fn creating_a_session_returns_201_with_location_and_the_session(backend: Backend) {
    let app = spawn_app_on(backend, &[]).await;
    let response = app
        .create_session_with(
            json!({"id": "chat-1", "system_prompt": "Be brief.", "metadata": {"user": "u1"}}),
        )
        .await;
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["location"], "/v1/sessions/chat-1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["id"], "chat-1");
    assert_eq!(body["system_prompt"], "Be brief.");
    assert_eq!(body["metadata"], json!({"user": "u1"}));
    assert_eq!(body["message_count"], 0);
    assert_eq!(body["created_at"], body["updated_at"]);
    let (status, read) = app.get_json("/v1/sessions/chat-1").await;
    assert_eq!(status, 200);
    assert_eq!(read, body);
}

async fn a_session_without_a_body_gets_a_uuid_v7_id(backend: Backend) {
    let app = spawn_app_on(backend, &[]).await;
    let response = app.client.post(app.url("/v1/sessions")).send().await.unwrap();
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    let id = uuid::Uuid::parse_str(body["id"].as_str().unwrap()).expect("a uuid");
    assert_eq!(id.get_version_num(), 7);
    assert_eq!(body["system_prompt"], Value::Null);
    assert_eq!(body["metadata"], json!({}));
}

async fn creating_a_taken_id_is_409(backend: Backend) {
    let app = spawn_app_on(backend, &[]).await;
    app.create_session("dup").await;
    let response = app.create_session_with(json!({"id": "dup"})).await;
    assert_eq!(response.status(), 409);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "session_exists");
}

async fn reading_an_unknown_session_is_404(backend: Backend) {
    let app = spawn_app_on(backend, &[]).await;
    let (status, problem) = app.get_json("/v1/sessions/nobody").await;
    assert_eq!(status, 404);
    assert_eq!(problem["code"], "session_not_found");
    assert_eq!(problem["status"], 404);
}

async fn deleting_a_session_removes_it_and_its_history(backend: Backend) {
    let app = spawn_app_on(backend, &[]).await;
    app.create_session("gone").await;
    app.post_message("gone", "hello").await;
    let response = app.client.delete(app.url("/v1/sessions/gone")).send().await.unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(app.get_json("/v1/sessions/gone").await.0, 404);
    assert_eq!(app.get_json("/v1/sessions/gone/messages").await.0, 404);
    let again = app.client.delete(app.url("/v1/sessions/gone")).send().await.unwrap();
    assert_eq!(again.status(), 404);
    // The id is free again, with a fresh history.
    app.create_session("gone").await;
    assert!(app.history("gone").await.is_empty());
}

async fn sessions_list_most_recently_updated_first_with_a_cursor(backend: Backend) {
    let app = spawn_app_on(backend, &[]).await;
    for id in ["a", "b", "c", "d", "e"] {
        app.create_session(id).await;
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    app.post_message("b", "bump").await;
    let mut seen = Vec::new();
    let mut path = "/v1/sessions?limit=2".to_owned();
    loop {
        let (status, page) = app.get_json(&path).await;
        assert_eq!(status, 200, "{page}");
        assert!(page["data"].as_array().unwrap().len() <= 2);
        seen.extend(page["data"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_owned()));
        if page["has_more"] == false {
            assert_eq!(page["next_cursor"], Value::Null);
            break;
        }
        path = format!("/v1/sessions?limit=2&cursor={}", page["next_cursor"].as_str().unwrap());
    }
    assert_eq!(seen, vec!["b", "e", "d", "c", "a"]);
    let (_, one) = app.get_json("/v1/sessions/b").await;
    assert_eq!(one["message_count"], 2);
}

#[tokio::test]
async fn dot_segments_are_refused_as_session_ids_on_create_and_in_paths() {
    let app = spawn_app(&[]).await;
    for id in [".", ".."] {
        let response = app.create_session_with(json!({ "id": id })).await;
        assert_eq!(response.status(), 400, "creating {id:?}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "invalid_request", "{problem}");
    }
    app.create_session("...").await;
    app.create_session(".a..").await;
    // reqwest resolves dot segments (`%2E%2E` too) before sending, so these go over a raw socket.
    let turn = "/turns/0190b7a4-0000-7000-8000-000000000000";
    for id in [".", "..", "%2E", "%2e%2E"] {
        for tail in ["", "/messages", turn] {
            let path = format!("/v1/sessions/{id}{tail}");
            let response = raw_http::exchange(&app.base, &raw_http::get(&app.base, &path, "")).await;
            assert_eq!(response.status, 400, "GET {path}: {:?}", response.json());
            assert_eq!(response.header("content-type"), Some("application/problem+json"));
            assert_eq!(response.json()["code"], "invalid_request");
        }
        let path = format!("/v1/sessions/{id}/messages");
        let post = raw_http::with_json(&app.base, "POST", &path, "", &json!({"content": "hi"}));
        assert_eq!(raw_http::exchange(&app.base, &post).await.status, 400, "POST {path}");
        let delete = format!("DELETE /v1/sessions/{id} HTTP/1.1\r\nhost: x\r\n\r\n");
        assert_eq!(raw_http::exchange(&app.base, delete.as_bytes()).await.status, 400, "DELETE {id}");
    }
}

/// Numbers no f64 holds exactly, as the client writes them.
const EXACT_NUMBERS: [(&str, &str); 6] = [
    ("two_to_the_64", "18446744073709551616"),
    ("minus_two_to_the_64", "-18446744073709551616"),
    ("thirty_digits", "123456789012345678901234567890"),
    ("two_to_the_53_plus_1", "9007199254740993"),
    ("precise", "0.1000000000000000055511151231257827"),
    ("trailing_zero", "1.50"),
];

fn exact_metadata() -> String {
    let fields: Vec<String> = EXACT_NUMBERS.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
    format!("{{{}}}", fields.join(","))
}

fn assert_exact(text: &str, what: &str) {
    for (key, number) in EXACT_NUMBERS {
        assert!(text.contains(&format!("\"{key}\":{number}")), "{what}: {key} is not {number} in {text}");
    }
}

async fn metadata_numbers_round_trip_exactly(backend: Backend) {
    let app = spawn_app_on(backend, &[]).await;
    let body = format!(r#"{{"id": "exact", "metadata": {}}}"#, exact_metadata());
    let post = |path: &str, body: String| {
        app.client.post(app.url(path)).header("content-type", "application/json").body(body).send()
    };
    let created = post("/v1/sessions", body).await.unwrap();
    assert_eq!(created.status(), 201);
    assert_exact(&created.text().await.unwrap(), "the created session");
    let read = app.client.get(app.url("/v1/sessions/exact")).send().await.unwrap();
    assert_exact(&read.text().await.unwrap(), "the session read back");
    let listed = app.client.get(app.url("/v1/sessions")).send().await.unwrap();
    assert_exact(&listed.text().await.unwrap(), "the session list");
    let turn = format!(r#"{{"content": "hi", "metadata": {}}}"#, exact_metadata());
    let answered = post("/v1/sessions/exact/messages", turn).await.unwrap();
    assert_eq!(answered.status(), 200);
    assert_exact(&answered.text().await.unwrap(), "the turn's user message");
    let history = app.client.get(app.url("/v1/sessions/exact/messages")).send().await.unwrap();
    assert_exact(&history.text().await.unwrap(), "the message read back");
}

async fn patching_a_session_replaces_its_metadata_and_keeps_its_place(backend: Backend) {
    let app = spawn_app_on(backend, &[]).await;
    app.create_session_with(json!({"id": "old", "metadata": {"title": "First", "pinned": true}})).await;
    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    let newer = app.create_session("new").await;
    let patch =
        |id: &str, body: Value| app.client.patch(app.url(&format!("/v1/sessions/{id}"))).json(&body).send();
    let response = patch("old", json!({"metadata": {"title": "Renamed <b>ü</b>"}})).await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["metadata"], json!({"title": "Renamed <b>ü</b>"}), "replaced whole, not merged");
    assert_eq!(body["created_at"], body["updated_at"], "updated_at stays");
    let (_, read) = app.get_json("/v1/sessions/old").await;
    assert_eq!(read, body);
    let (_, list) = app.get_json("/v1/sessions").await;
    let ids: Vec<&str> = list["data"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["new", "old"], "a rename does not move a chat up the list");
    assert_eq!(app.get_json("/v1/sessions/new").await.1, newer);
}

async fn patching_checks_the_session_and_the_body(backend: Backend) {
    let app = spawn_app_on(backend, &["--max-metadata-bytes", "64"]).await;
    app.create_session("s").await;
    let patch = |id: &str, body: &str| {
        app.client.patch(app.url(&format!("/v1/sessions/{id}"))).body(body.to_owned()).send()
    };
    let cases = [
        ("nobody", r#"{"metadata": {}}"#, 404, "session_not_found"),
        ("s", r#"{"metadata": "x"}"#, 422, "validation_failed"),
        ("s", r#"{}"#, 422, "validation_failed"),
        ("s", r#"{"metadata": {"#, 400, "invalid_request"),
        ("s", &format!(r#"{{"metadata": {{"t": "{}"}}}}"#, "x".repeat(100)), 413, "payload_too_large"),
    ];
    for (id, body, status, code) in cases {
        let response = patch(id, body).await.unwrap();
        assert_eq!(response.status(), status, "{id} {body}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], code, "{id} {body}: {problem}");
    }
    assert_eq!(app.get_json("/v1/sessions/s").await.1["metadata"], json!({}), "nothing changed");
}

for_each_backend!(
    metadata_numbers_round_trip_exactly,
    creating_a_session_returns_201_with_location_and_the_session,
    a_session_without_a_body_gets_a_uuid_v7_id,
    creating_a_taken_id_is_409,
    reading_an_unknown_session_is_404,
    deleting_a_session_removes_it_and_its_history,
    sessions_list_most_recently_updated_first_with_a_cursor,
    patching_a_session_replaces_its_metadata_and_keeps_its_place,
    patching_checks_the_session_and_the_body,
);
