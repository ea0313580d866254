//! Tenants: with API keys, each caller sees only its own tenant's sessions, and another tenant's
//! session answers 404 on every endpoint, as if it did not exist.

use eventsource_stream::Eventsource;
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Backend, Caller, KEY_A, KEY_B, collect_events, spawn_app_on, two_tenants};

fn args(extra: &[&str]) -> Vec<String> {
    let mut args = two_tenants();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

async fn spawn(backend: Backend, extra: &[&str]) -> crate::helpers::TestApp {
    let args = args(extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn_app_on(backend, &refs).await
}

/// Asserts a 404 `session_not_found`, exactly what an unknown session answers.
async fn not_found(response: reqwest::Response, what: &str) {
    assert_eq!(response.status(), 404, "{what}");
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "session_not_found", "{what}: {problem}");
}

/// Starts a slow streamed turn for `a` and returns the open event stream and the turn id.
async fn running_turn(
    a: &Caller,
    session: &str,
) -> (impl futures::Stream<Item = Result<eventsource_stream::Event, impl std::fmt::Debug>>, String) {
    let response = a.start_stream(session, "one two three four five six").await;
    assert_eq!(response.status(), 200);
    let mut events = response.bytes_stream().eventsource();
    let started = events.next().await.unwrap().unwrap();
    let data: Value = serde_json::from_str(&started.data).unwrap();
    (events, data["turn_id"].as_str().unwrap().to_owned())
}

async fn another_tenant_gets_404_on_every_endpoint_of_a_session(backend: Backend) {
    let app = spawn(backend, &["--echo-delay-ms", "60"]).await;
    let (a, b) = (app.caller(KEY_A), app.caller(KEY_B));
    a.create_session("private").await;
    a.post_message("private", "hello").await;
    let (mut events, turn_id) = running_turn(&a, "private").await;

    let s = "/v1/sessions/private";
    let turn = format!("{s}/turns/{turn_id}");
    not_found(b.send(Method::GET, s, None).await, "GET session").await;
    not_found(b.send(Method::GET, &format!("{s}/messages"), None).await, "GET messages").await;
    not_found(b.send(Method::GET, &turn, None).await, "GET turn").await;
    not_found(b.send(Method::POST, &format!("{turn}/cancel"), None).await, "POST cancel").await;
    not_found(b.send(Method::GET, &format!("{turn}/events"), None).await, "GET turn events").await;
    let post = Some(json!({"content": "let me in"}));
    not_found(b.send(Method::POST, &format!("{s}/messages"), post.clone()).await, "POST message").await;
    not_found(b.start_stream("private", "let me in").await, "POST message, streamed").await;
    not_found(b.send(Method::DELETE, &format!("{s}/messages"), None).await, "DELETE messages").await;
    let patch = Some(json!({"metadata": {"title": "mine now"}}));
    not_found(b.send(Method::PATCH, s, patch).await, "PATCH session").await;
    not_found(b.send(Method::DELETE, s, None).await, "DELETE session").await;

    let mut names = Vec::new();
    while let Some(event) = events.next().await {
        names.push(event.unwrap().event);
    }
    assert_eq!(names.last().map(String::as_str), Some("turn.completed"), "B's cancel did not reach A's turn");
    let (status, session) = a.get_json(s).await;
    assert_eq!((status, session["message_count"].as_u64()), (200, Some(4)), "A's session is intact");
    let (status, record) = a.get_json(&turn).await;
    assert_eq!((status, record["status"].as_str()), (200, Some("completed")));
}

async fn listing_shows_only_the_callers_sessions(backend: Backend) {
    let app = spawn(backend, &[]).await;
    let (a, b) = (app.caller(KEY_A), app.caller(KEY_B));
    for id in ["a1", "a2", "a3"] {
        a.create_session(id).await;
    }
    b.create_session("b1").await;
    let ids = |list: &Value| -> Vec<String> {
        list["data"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_owned()).collect()
    };
    let (status, list) = b.get_json("/v1/sessions?limit=100").await;
    assert_eq!((status, ids(&list)), (200, vec!["b1".to_owned()]));
    let (_, list) = a.get_json("/v1/sessions?limit=100").await;
    assert_eq!(ids(&list), vec!["a3", "a2", "a1"]);
    // A cursor from A's list does not show A's sessions to B.
    let (_, first) = a.get_json("/v1/sessions?limit=1").await;
    let cursor = first["next_cursor"].as_str().unwrap();
    let (status, page) = b.get_json(&format!("/v1/sessions?limit=100&cursor={cursor}")).await;
    assert_eq!(status, 200);
    assert!(ids(&page).iter().all(|id| id == "b1"), "{page}");
}

async fn the_same_session_id_in_two_tenants_is_two_sessions(backend: Backend) {
    let app = spawn(backend, &[]).await;
    let (a, b) = (app.caller(KEY_A), app.caller(KEY_B));
    a.create_session("support").await;
    b.create_session("support").await;
    a.post_message("support", "from acme").await;
    let (_, history) = b.get_json("/v1/sessions/support/messages").await;
    assert_eq!(history["data"], json!([]), "B sees none of A's messages");
    let turn = b.post_message("support", "from globex").await;
    assert_eq!(turn["messages"][0]["seq"], 1, "B's seqs are its own");
    assert_eq!(turn["messages"][1]["content"], "echo: from globex (context: 0 messages)");
    assert_eq!(b.send(Method::DELETE, "/v1/sessions/support", None).await.status(), 204);
    let (status, session) = a.get_json("/v1/sessions/support").await;
    assert_eq!((status, session["message_count"].as_u64()), (200, Some(2)));
}

async fn the_session_cap_is_per_tenant(backend: Backend) {
    let app = spawn(backend, &["--max-sessions-per-tenant", "2"]).await;
    let (a, b) = (app.caller(KEY_A), app.caller(KEY_B));
    a.create_session("one").await;
    a.create_session("two").await;
    let refused = a.send(Method::POST, "/v1/sessions", Some(json!({"id": "three"}))).await;
    assert_eq!(refused.status(), 409);
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["code"], "session_limit_reached", "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("PARLEY_MAX_SESSIONS_PER_TENANT"));
    b.create_session("one").await;
    b.create_session("two").await;
    assert_eq!(a.send(Method::DELETE, "/v1/sessions/one", None).await.status(), 204);
    a.create_session("three").await;
}

async fn concurrent_creations_never_overshoot_the_session_cap(backend: Backend) {
    let app = spawn(backend, &["--max-sessions-per-tenant", "3"]).await;
    let a = app.caller(KEY_A);
    let posts = (0..20).map(|i| a.send(Method::POST, "/v1/sessions", Some(json!({"id": format!("s{i}")}))));
    let statuses: Vec<u16> =
        futures::future::join_all(posts).await.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(statuses.iter().filter(|&&s| s == 201).count(), 3, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|&&s| s == 409).count(), 17, "{statuses:?}");
    let (_, page) = a.get_json("/v1/sessions?limit=100").await;
    assert_eq!(page["data"].as_array().unwrap().len(), 3, "{page}");
}

async fn without_auth_every_caller_is_the_default_tenant(backend: Backend) {
    let app = spawn_app_on(backend, &[]).await;
    app.create_session("shared").await;
    // A key is ignored when authentication is off.
    let (status, _) = app.caller(KEY_A).get_json("/v1/sessions/shared").await;
    assert_eq!(status, 200);
    let events = collect_events(app.caller(KEY_B).start_stream("shared", "hi").await).await;
    assert_eq!(events.last().unwrap().event, "turn.completed");
}

for_each_backend!(
    another_tenant_gets_404_on_every_endpoint_of_a_session,
    listing_shows_only_the_callers_sessions,
    the_same_session_id_in_two_tenants_is_two_sessions,
    the_session_cap_is_per_tenant,
    concurrent_creations_never_overshoot_the_session_cap,
    without_auth_every_caller_is_the_default_tenant,
);
