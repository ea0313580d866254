//! Sessions: create, list, read, update, delete.

use serde_json::{Value, json};

use crate::helpers::{Backend, spawn_app_on};

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
    creating_a_session_returns_201_with_location_and_the_session,
    a_session_without_a_body_gets_a_uuid_v7_id,
    creating_a_taken_id_is_409,
    reading_an_unknown_session_is_404,
    deleting_a_session_removes_it_and_its_history,
    sessions_list_most_recently_updated_first_with_a_cursor,
    patching_a_session_replaces_its_metadata_and_keeps_its_place,
    patching_checks_the_session_and_the_body,
);
