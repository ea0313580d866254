//! Limits: requests per second, turns per window and concurrent streams per key (429 with
//! `Retry-After` and `RateLimit-*`, then recovery), shared through Redis by replicas; bounds on
//! metadata; CORS.

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{
    Backend, Caller, KEY_A, KEY_B, TestApp, collect_events, spawn_app, spawn_app_on, two_tenants, unique_name,
};

async fn spawn(backend: Backend, extra: &[&str]) -> TestApp {
    let mut args = two_tenants();
    args.extend(backend.limiter_args());
    args.extend(extra.iter().map(|s| s.to_string()));
    spawn_app_on(backend, &args.iter().map(String::as_str).collect::<Vec<_>>()).await
}

fn header(response: &reqwest::Response, name: &str) -> Option<u64> {
    response.headers().get(name).map(|v| v.to_str().unwrap().parse().expect("a number"))
}

/// Asserts a 429 `rate_limited` with `Retry-After` of at least one second; returns the response's
/// `RateLimit-Remaining`, if any.
async fn limited(response: reqwest::Response, what: &str) -> Option<u64> {
    assert_eq!(response.status(), 429, "{what}");
    let retry_after = header(&response, "retry-after").expect("Retry-After");
    assert!((1..=60).contains(&retry_after), "{what}: Retry-After {retry_after}");
    let remaining = header(&response, "ratelimit-remaining");
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "rate_limited", "{what}: {problem}");
    remaining
}

async fn requests_over_the_rate_limit_get_429_with_headers_then_recover(backend: Backend) {
    let app = spawn(backend, &["--rate-limit-rps", "3"]).await;
    let (a, b) = (app.caller(KEY_A), app.caller(KEY_B));
    for remaining in [2, 1, 0] {
        let response = a.send(Method::GET, "/v1/sessions", None).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "ratelimit-limit"), Some(3));
        assert_eq!(header(&response, "ratelimit-remaining"), Some(remaining));
        assert_eq!(header(&response, "ratelimit-reset"), Some(1));
    }
    let remaining = limited(a.send(Method::GET, "/v1/sessions", None).await, "the 4th request").await;
    assert_eq!(remaining, Some(0));
    assert_eq!(b.send(Method::GET, "/v1/sessions", None).await.status(), 200, "another key is not limited");
    for _ in 0..5 {
        let health = app.client.get(app.url("/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200, "health checks are not limited");
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(a.send(Method::GET, "/v1/sessions", None).await.status(), 200, "recovered after the window");
}

async fn post(who: &Caller) -> reqwest::Response {
    who.send(Method::POST, "/v1/sessions/s/messages", Some(json!({"content": "hi"}))).await
}

async fn turns_over_the_limit_get_429_then_recover_after_the_window(backend: Backend) {
    let app = spawn(backend, &["--rate-limit-turns-per-min", "2", "--rate-limit-turns-window", "1s"]).await;
    let (a, b) = (app.caller(KEY_A), app.caller(KEY_B));
    a.create_session("s").await;
    b.create_session("s").await;
    let first = post(&a).await;
    assert_eq!(first.status(), 200);
    assert_eq!(
        (header(&first, "ratelimit-limit"), header(&first, "ratelimit-remaining")),
        (Some(2), Some(1))
    );
    assert_eq!(post(&a).await.status(), 200);
    limited(post(&a).await, "the 3rd turn").await;
    limited(a.start_stream("s", "hi").await, "a streamed 3rd turn").await;
    let (status, history) = a.get_json("/v1/sessions/s/messages").await;
    assert_eq!((status, history["data"].as_array().unwrap().len()), (200, 4), "reads are not turns");
    assert_eq!(post(&b).await.status(), 200, "another key has its own budget");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(post(&a).await.status(), 200, "recovered after the window");
}

/// Opens a streamed turn and waits for `turn.started`; the stream stays open.
async fn open_stream(caller: &Caller, session: &str) -> impl futures::Stream + Unpin {
    let response = caller.start_stream(session, "one two three four five six seven eight").await;
    assert_eq!(response.status(), 200, "stream on {session}");
    let mut events = response.bytes_stream().eventsource();
    events.next().await.expect("turn.started").expect("valid SSE");
    events
}

async fn streams_over_the_cap_get_429_until_one_ends(backend: Backend) {
    let app = spawn(backend, &["--max-streams-per-key", "2", "--echo-delay-ms", "100"]).await;
    let (a, b) = (app.caller(KEY_A), app.caller(KEY_B));
    for id in ["s1", "s2", "s3"] {
        a.create_session(id).await;
    }
    b.create_session("s1").await;
    let mut first = open_stream(&a, "s1").await;
    let _second = open_stream(&a, "s2").await;
    limited(a.start_stream("s3", "hi").await, "a third stream").await;
    let _other = open_stream(&b, "s1").await;
    let json_turn = a.send(Method::POST, "/v1/sessions/s3/messages", Some(json!({"content": "hi"}))).await;
    assert_eq!(json_turn.status(), 200, "a JSON turn is not a stream");
    while first.next().await.is_some() {}
    let mut status = 0;
    for _ in 0..40 {
        let response = a.start_stream("s3", "hi").await;
        status = response.status().as_u16();
        if status == 200 {
            let events = collect_events(response).await;
            assert_eq!(events.last().unwrap().event, "turn.completed");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 200, "a slot is free once a stream ends");
}

async fn following_a_turn_takes_a_stream_slot_and_no_turn(backend: Backend) {
    let args = ["--max-streams-per-key", "1", "--rate-limit-turns-per-min", "1", "--echo-delay-ms", "100"];
    let app = spawn(backend, &args).await;
    let a = app.caller(KEY_A);
    a.create_session("s").await;
    let response = a.start_stream("s", "one two three four five six seven eight").await;
    assert_eq!(response.status(), 200);
    let mut events = response.bytes_stream().eventsource();
    let started: Value = serde_json::from_str(&events.next().await.unwrap().unwrap().data).unwrap();
    let path = format!("/v1/sessions/s/turns/{}/events", started["turn_id"].as_str().unwrap());
    limited(a.send(Method::GET, &path, None).await, "a follower over the stream cap").await;
    while events.next().await.is_some() {}
    // The key's one turn of the window is spent; following is not a turn.
    let mut status = 0;
    for _ in 0..40 {
        let response = a.send(Method::GET, &path, None).await;
        status = response.status().as_u16();
        if status == 200 {
            assert_eq!(collect_events(response).await.last().unwrap().event, "turn.completed");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 200, "a slot is free once the stream ended, and the turn budget does not apply");
}

async fn a_stream_refused_by_the_handler_gives_its_slot_back(backend: Backend) {
    let app = spawn(backend, &["--max-streams-per-key", "1"]).await;
    let a = app.caller(KEY_A);
    for _ in 0..3 {
        let response = a.start_stream("nobody", "hi").await;
        assert_eq!(response.status(), 404);
    }
    a.create_session("s").await;
    let mut status = 0;
    for _ in 0..40 {
        status = a.start_stream("s", "hi").await.status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 200);
}

#[tokio::test]
async fn replicas_on_one_redis_share_their_limits() {
    let prefix = unique_name("parley_test_shared");
    let mut args = two_tenants();
    let extra = ["--store", "redis", "--redis-prefix", &prefix, "--rate-limit-rps", "4"];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["--max-streams-per-key", "1", "--echo-delay-ms", "100"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let one = spawn_app_on(Backend::Redis, &args).await;
    let two = spawn_app_on(Backend::Redis, &args).await;
    let (a1, a2) = (one.caller(KEY_A), two.caller(KEY_A));
    for caller in [&a1, &a2, &a1] {
        assert_eq!(caller.send(Method::GET, "/v1/sessions", None).await.status(), 200);
    }
    let fourth = a2.send(Method::GET, "/v1/sessions", None).await;
    assert_eq!(header(&fourth, "ratelimit-remaining"), Some(0), "the replicas count together");
    limited(a1.send(Method::GET, "/v1/sessions", None).await, "the 5th request, on either replica").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The stores are separate (each test store has its own prefix); the limiter is shared.
    a1.create_session("s").await;
    a2.create_session("s").await;
    let _open = open_stream(&a1, "s").await;
    limited(a2.start_stream("s", "hi").await, "a second stream, on the other replica").await;
}

#[tokio::test]
async fn without_auth_requests_are_limited_per_client_address() {
    let app = spawn_app(&["--rate-limit-rps", "2"]).await;
    for _ in 0..2 {
        assert_eq!(app.client.get(app.url("/v1/sessions")).send().await.unwrap().status(), 200);
    }
    limited(app.client.get(app.url("/v1/sessions")).send().await.unwrap(), "the 3rd request").await;
}

#[tokio::test]
async fn an_unreachable_limiter_lets_requests_through() {
    let mut args = two_tenants();
    let extra =
        ["--rate-limit-store", "redis", "--redis-url", "redis://127.0.0.1:1", "--store-timeout", "200ms"];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["--rate-limit-rps", "1"].map(String::from));
    let app = spawn_app(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let a = app.caller(KEY_A);
    for _ in 0..3 {
        let response = a.send(Method::GET, "/v1/sessions", None).await;
        assert_eq!(response.status(), 200);
        assert!(response.headers().get("ratelimit-limit").is_none());
    }
}

#[tokio::test]
async fn limits_are_on_by_default_with_api_keys_and_off_without() {
    let args = two_tenants();
    let keyed = spawn_app(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let response = keyed.caller(KEY_A).send(Method::GET, "/v1/sessions", None).await;
    assert_eq!(header(&response, "ratelimit-limit"), Some(100));
    let open = spawn_app(&[]).await;
    let response = open.client.get(open.url("/v1/sessions")).send().await.unwrap();
    assert!(response.headers().get("ratelimit-limit").is_none());
}

async fn metadata_is_bounded_in_keys_and_depth(backend: Backend) {
    let app = spawn(backend, &["--max-metadata-keys", "2", "--max-metadata-depth", "3"]).await;
    let a = app.caller(KEY_A);
    let create = |metadata: Value| a.send(Method::POST, "/v1/sessions", Some(json!({"metadata": metadata})));
    let refusal = |response: reqwest::Response, flag: &'static str| async move {
        assert_eq!(response.status(), 422);
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "validation_failed");
        assert!(problem["detail"].as_str().unwrap().contains(flag), "{problem}");
    };
    refusal(create(json!({"a": 1, "b": 2, "c": 3})).await, "PARLEY_MAX_METADATA_KEYS").await;
    refusal(create(json!({"a": {"b": [[1]]}})).await, "PARLEY_MAX_METADATA_DEPTH").await;
    assert_eq!(create(json!({"a": {"b": [1]}, "z": null})).await.status(), 201);
    a.create_session("s").await;
    let deep = json!({"content": "hi", "metadata": {"a": [[[1]]]}});
    refusal(a.send(Method::POST, "/v1/sessions/s/messages", Some(deep)).await, "PARLEY_MAX_METADATA_DEPTH")
        .await;
    let (_, session) = a.get_json("/v1/sessions/s").await;
    assert_eq!(session["message_count"], 0);
}

#[tokio::test]
async fn cors_allows_only_listed_origins_with_credentials_and_preflights_need_no_key() {
    let mut args = two_tenants();
    args.extend(
        ["--cors-origins", "https://app.example.com", "--cors-credentials", "true"].map(String::from),
    );
    let app = spawn_app(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let preflight = app
        .client
        .request(Method::OPTIONS, app.url("/v1/sessions"))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization, content-type")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 200);
    let headers = preflight.headers();
    assert_eq!(headers["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(headers["access-control-allow-credentials"], "true");
    let allowed = app
        .caller(KEY_A)
        .client
        .get(app.url("/v1/sessions"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    let exposed = allowed.headers()["access-control-expose-headers"].to_str().unwrap().to_lowercase();
    assert!(exposed.contains("ratelimit-remaining") && exposed.contains("retry-after"), "{exposed}");
    let foreign = app
        .caller(KEY_A)
        .client
        .get(app.url("/v1/sessions"))
        .header("origin", "https://evil.example.com")
        .send()
        .await
        .unwrap();
    assert!(foreign.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn without_allowed_origins_nothing_is_allowed_cross_origin() {
    let app = spawn_app(&[]).await;
    let preflight = app
        .client
        .request(Method::OPTIONS, app.url("/v1/sessions"))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(!preflight.status().is_success(), "a preflight fails: {}", preflight.status());
    assert!(preflight.headers().get("access-control-allow-origin").is_none());
    let read = app
        .client
        .get(app.url("/v1/sessions"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200, "a same-origin or non-browser client is served as usual");
    for name in ["access-control-allow-origin", "access-control-expose-headers", "vary"] {
        assert!(read.headers().get(name).is_none(), "no {name} header");
    }
}

for_each_backend!(
    requests_over_the_rate_limit_get_429_with_headers_then_recover,
    turns_over_the_limit_get_429_then_recover_after_the_window,
    streams_over_the_cap_get_429_until_one_ends,
    a_stream_refused_by_the_handler_gives_its_slot_back,
    following_a_turn_takes_a_stream_slot_and_no_turn,
    metadata_is_bounded_in_keys_and_depth,
);
