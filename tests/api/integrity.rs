//! Turn integrity: one turn at a time per session across replicas, waiting in arrival order,
//! idempotent retries, cancel from another replica, abandoned turns, and a concurrency storm.

use std::collections::HashMap;
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use parley::domain::Turn;
use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, collect_events, spawn_replicas};

async fn post(app: &TestApp, session: &str, body: Value, key: Option<&str>) -> reqwest::Response {
    let mut request = app.client.post(app.url(&format!("/v1/sessions/{session}/messages"))).json(&body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.send().await.unwrap()
}

async fn a_busy_session_is_409_on_every_replica(backend: Backend) {
    let apps = spawn_replicas(backend, 2, &["--echo-delay-ms", "80"]).await;
    apps[0].create_session("busy").await;
    let mut stream = apps[0].open_stream("busy", "one two three four").await.bytes_stream().eventsource();
    let started: Value = serde_json::from_str(&stream.next().await.unwrap().unwrap().data).unwrap();
    let response = post(&apps[1], "busy", json!({"content": "from the other replica"}), None).await;
    assert_eq!(response.status(), 409);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "turn_in_progress");
    assert_eq!(problem["turn_id"], started["turn_id"]);
    while stream.next().await.is_some() {}
    assert_eq!(apps[1].post_message("busy", "now").await["messages"].as_array().unwrap().len(), 2);
}

async fn waiting_turns_run_after_the_running_one_in_arrival_order(backend: Backend) {
    let apps = spawn_replicas(backend, 1, &["--echo-delay-ms", "40", "--metrics", "true"]).await;
    waiters_run_in_arrival_order(&apps, &["second", "third", "fourth"]).await;
}

/// Waiters posted in turn on two replicas (B, A, B, A…) while a turn runs on A run in the order
/// they arrived: the coordinator's wait queue orders them across replicas (Redis, PostgreSQL).
async fn waiters_on_two_replicas_run_in_arrival_order(backend: Backend) {
    let apps = spawn_replicas(backend, 2, &["--echo-delay-ms", "40", "--metrics", "true"]).await;
    waiters_run_in_arrival_order(&apps, &["w1", "w2", "w3", "w4", "w5", "w6"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_on_two_redis_replicas_run_in_arrival_order() {
    waiters_on_two_replicas_run_in_arrival_order(Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_on_two_postgres_replicas_run_in_arrival_order() {
    waiters_on_two_replicas_run_in_arrival_order(Backend::Postgres).await;
}

/// A waiter whose client leaves keeps its place and runs (a turn posted is a turn saved, as for
/// any client that leaves), and the waiter behind it, on another replica, runs right after it:
/// nobody waits for a place to lapse.
async fn a_waiter_whose_client_left_runs_in_its_place(backend: Backend) {
    let apps = spawn_replicas(backend, 2, &["--echo-delay-ms", "100", "--turn-lease", "15s"]).await;
    apps[0].create_session("leave").await;
    let first = apps[0].open_stream("leave", "one two three four five six").await;
    let reader = tokio::spawn(collect_events(first));
    crate::safety::post_and_leave(&apps[1].base, "leave", "gone", false, Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let next = post(&apps[0], "leave", json!({"content": "next", "if_busy": "wait"}), None).await;
    assert_eq!(next.status(), 200);
    reader.await.unwrap();
    // Two turns of about a second each; a place kept until it lapsed would cost the 15 s lease.
    assert!(started.elapsed() < Duration::from_secs(8), "next waited {:?}", started.elapsed());
    let users: Vec<String> = apps[0]
        .history("leave")
        .await
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(users, vec!["one two three four five six", "gone", "next"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_client_left_runs_in_its_place_on_redis() {
    a_waiter_whose_client_left_runs_in_its_place(Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_client_left_runs_in_its_place_on_postgres() {
    a_waiter_whose_client_left_runs_in_its_place(Backend::Postgres).await;
}

/// How many turns this app has made to wait or refused (`parley_turn_conflicts_total`).
async fn conflicts(app: &TestApp) -> f64 {
    crate::metrics::value(&crate::metrics::scrape(app).await, "parley_turn_conflicts_total")
}

/// A slow turn streams on the first app; each of `names` is posted with `if_busy: wait` on the
/// apps in turn from the last, once the one before is waiting (its app counted a conflict: it has
/// taken its place in the queue); the history holds them in that order.
async fn waiters_run_in_arrival_order(apps: &[TestApp], names: &[&str]) {
    apps[0].create_session("queue").await;
    let slow = (1..=40).map(|i| format!("slow{i}")).collect::<Vec<_>>().join(" ");
    let first = apps[0].open_stream("queue", &slow).await;
    let reader = tokio::spawn(collect_events(first));
    let mut waiters = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let app = &apps[(apps.len() - 1 + i) % apps.len()];
        let before = conflicts(app).await;
        let (client, url) = (app.client.clone(), app.url("/v1/sessions/queue/messages"));
        let body = json!({"content": name, "if_busy": "wait"});
        waiters
            .push(tokio::spawn(async move { client.post(url).json(&body).send().await.unwrap().status() }));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while conflicts(app).await < before + 1.0 {
            assert!(std::time::Instant::now() < deadline, "{name} did not start waiting within 10 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    for waiter in waiters {
        assert_eq!(waiter.await.unwrap(), 200);
    }
    reader.await.unwrap();
    let users: Vec<String> = apps[0]
        .history("queue")
        .await
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect();
    let mut expected = vec![slow];
    expected.extend(names.iter().map(|n| n.to_string()));
    assert_eq!(users, expected);
}

async fn a_wait_past_the_busy_timeout_is_409(backend: Backend) {
    let apps = spawn_replicas(backend, 1, &["--echo-delay-ms", "200", "--if-busy-timeout", "150ms"]).await;
    let app = &apps[0];
    app.create_session("slow").await;
    let _first = app.open_stream("slow", "a b c d e").await;
    let response = post(app, "slow", json!({"content": "x", "if_busy": "wait"}), None).await;
    assert_eq!(response.status(), 409);
}

async fn an_idempotent_retry_returns_the_same_turn_without_running_it_again(backend: Backend) {
    let apps = spawn_replicas(backend, 2, &[]).await;
    apps[0].create_session("idem").await;
    let body = json!({"content": "pay once", "metadata": {"order": 7}});
    let first = post(&apps[0], "idem", body.clone(), Some("key-123")).await;
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    let retry = post(&apps[1], "idem", body.clone(), Some("key-123")).await;
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let retry: Value = retry.json().await.unwrap();
    assert_eq!(retry, first, "same turn, same ids, same messages");
    assert_eq!(apps[0].history("idem").await.len(), 2, "the model ran once");
    let other = post(&apps[0], "idem", json!({"content": "something else"}), Some("key-123")).await;
    assert_eq!(other.status(), 422);
    let problem: Value = other.json().await.unwrap();
    assert_eq!(problem["code"], "idempotency_key_reused");
    let streamed = apps[1]
        .client
        .post(apps[1].url("/v1/sessions/idem/messages?stream=true"))
        .header("idempotency-key", "key-123")
        .json(&body)
        .send()
        .await
        .unwrap();
    let events = collect_events(streamed).await;
    assert_eq!(events.last().unwrap().event, "turn.completed");
    assert_eq!(events.last().unwrap().data["messages"], first["messages"]);
    let bad_key = post(&apps[0], "idem", body, Some("")).await;
    assert_eq!(bad_key.status(), 400);
}

async fn an_idempotent_retry_while_the_turn_runs_is_409_with_its_id(backend: Backend) {
    let apps = spawn_replicas(backend, 1, &["--echo-delay-ms", "80"]).await;
    let app = &apps[0];
    app.create_session("run").await;
    let body = json!({"content": "one two three"});
    let client = app.client.clone();
    let url = app.url("/v1/sessions/run/messages");
    let first_body = body.clone();
    let first = tokio::spawn(async move {
        client.post(url).header("idempotency-key", "k").json(&first_body).send().await.unwrap()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let retry = post(app, "run", body.clone(), Some("k")).await;
    assert_eq!(retry.status(), 409);
    let problem: Value = retry.json().await.unwrap();
    let first: Value = first.await.unwrap().json().await.unwrap();
    assert_eq!(problem["turn_id"], first["turn_id"]);
    let replay: Value = post(app, "run", body, Some("k")).await.json().await.unwrap();
    assert_eq!(replay["turn_id"], first["turn_id"]);
}

async fn a_streaming_retry_while_the_turn_runs_attaches_to_its_stream(backend: Backend) {
    let apps = spawn_replicas(backend, 1, &["--echo-delay-ms", "60"]).await;
    let app = &apps[0];
    app.create_session("attach").await;
    let send = |app: &TestApp| {
        app.client
            .post(app.url("/v1/sessions/attach/messages?stream=true"))
            .header("idempotency-key", "retry-me")
            .json(&json!({"content": "one two three four five"}))
            .send()
    };
    let first = send(app).await.unwrap();
    let mut first = first.bytes_stream().eventsource();
    let started: Value = serde_json::from_str(&first.next().await.unwrap().unwrap().data).unwrap();
    first.next().await.unwrap().unwrap();
    // The client lost its connection and retries with the same key while the turn still runs.
    drop(first);
    let retry = send(app).await.unwrap();
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let events = collect_events(retry).await;
    assert_eq!(events[0].event, "turn.started", "the retry follows the turn from its first event");
    assert_eq!(events[0].data["turn_id"], started["turn_id"]);
    let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, (1..=events.len()).map(|i| i.to_string()).collect::<Vec<_>>());
    let last = events.last().unwrap();
    assert_eq!(last.event, "turn.completed");
    assert_eq!(last.data["messages"].as_array().unwrap().len(), 2);
    let text: String = events
        .iter()
        .filter(|e| e.event == "message.delta")
        .map(|e| e.data["delta"].as_str().unwrap())
        .collect();
    assert_eq!(text, "echo: one two three four five (context: 0 messages)");
    assert_eq!(app.history("attach").await.len(), 2, "the model ran once");
}

async fn a_turn_can_be_cancelled_from_another_replica(backend: Backend) {
    let apps = spawn_replicas(backend, 2, &["--echo-delay-ms", "100"]).await;
    apps[0].create_session("cx").await;
    let response = apps[0].open_stream("cx", "one two three four five six seven eight nine").await;
    let mut stream = response.bytes_stream().eventsource();
    let started: Value = serde_json::from_str(&stream.next().await.unwrap().unwrap().data).unwrap();
    stream.next().await.unwrap().unwrap();
    let turn_id = started["turn_id"].as_str().unwrap();
    let cancel = apps[1]
        .client
        .post(apps[1].url(&format!("/v1/sessions/cx/turns/{turn_id}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 200);
    let turn: Value = cancel.json().await.unwrap();
    assert_eq!(turn["status"], "cancelled", "{turn}");
    let mut last = None;
    while let Some(event) = stream.next().await {
        last = Some(event.unwrap().event);
    }
    assert_eq!(last.as_deref(), Some("turn.cancelled"));
    let history = apps[1].history("cx").await;
    assert_eq!(history.last().unwrap()["metadata"]["status"], "cancelled");
    assert!(!history.last().unwrap()["content"].as_str().unwrap().contains("nine"));
}

async fn a_turn_longer_than_its_lease_keeps_the_session(backend: Backend) {
    // A 600 ms lease is renewed every 200 ms by the replica's lease keeper; the turn runs ~3.5 s.
    // (A turn whose lease runs out stops, so the lease leaves room for a loaded machine.)
    let apps = spawn_replicas(backend, 2, &["--echo-delay-ms", "150", "--turn-lease", "600ms"]).await;
    apps[0].create_session("long").await;
    let words = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen";
    let response = apps[0].open_stream("long", words).await;
    let mut stream = response.bytes_stream().eventsource();
    let started: Value = serde_json::from_str(&stream.next().await.unwrap().unwrap().data).unwrap();
    tokio::time::sleep(Duration::from_millis(1900)).await;
    let response = post(&apps[1], "long", json!({"content": "too early"}), None).await;
    assert_eq!(response.status(), 409, "three leases later the turn still holds its session");
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["turn_id"], started["turn_id"]);
    let mut last = None;
    while let Some(event) = stream.next().await {
        last = Some(event.unwrap().event);
    }
    assert_eq!(last.as_deref(), Some("turn.completed"));
    let turn_id = started["turn_id"].as_str().unwrap();
    let (_, record) = apps[1].get_json(&format!("/v1/sessions/long/turns/{turn_id}")).await;
    assert_eq!(record["status"], "completed");
}

async fn the_session_is_free_when_the_last_event_arrives(backend: Backend) {
    let apps = spawn_replicas(backend, 1, &[]).await;
    let app = &apps[0];
    app.create_session("next").await;
    for i in 0..10 {
        let response = app.open_stream("next", &format!("turn {i}")).await;
        let mut stream = response.bytes_stream().eventsource();
        while let Some(event) = stream.next().await {
            if event.unwrap().event == "turn.completed" {
                break;
            }
        }
        // The client posts its next turn the moment it sees the end, before the stream closes.
        let next = post(app, "next", json!({"content": format!("right after {i}")}), None).await;
        assert_eq!(next.status(), 200, "turn {i}: the session was still busy");
        drop(stream);
    }
    assert_eq!(app.history("next").await.len(), 40);
}

async fn a_turn_abandoned_by_a_dead_replica_ends_failed_and_frees_the_session(backend: Backend) {
    let apps = spawn_replicas(backend, 1, &[]).await;
    let app = &apps[0];
    app.create_session("dead").await;
    // What a replica leaves when it dies mid-turn: a running record and a lock it no longer renews.
    let turn = Turn::start("dead");
    app.store.put_turn("default", &turn).await.unwrap();
    app.coordinator.acquire_turn_lock("default", "dead", turn.id, Duration::from_millis(300)).await.unwrap();
    let response = post(app, "dead", json!({"content": "hello?"}), None).await;
    assert_eq!(response.status(), 409, "the lease still holds");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, record) = app.get_json(&format!("/v1/sessions/dead/turns/{}", turn.id)).await;
    assert_eq!(record["status"], "failed");
    assert_eq!(record["error"]["code"], "turn_abandoned");
    app.post_message("dead", "hello again").await;
    let cancel = app
        .client
        .post(app.url(&format!("/v1/sessions/dead/turns/{}/cancel", turn.id)))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 409);
}

/// 32 clients post turns to the same 8 sessions at once through two replicas, retrying on 409;
/// a quarter of them also post turns they leave 0–5 ms after sending (a closed tab), which run or
/// are refused whole, and never corrupt or wedge a conversation.
async fn concurrent_clients_never_corrupt_a_conversation(backend: Backend) {
    let apps = spawn_replicas(backend, 2, &[]).await;
    let sessions: Vec<String> = (0..8).map(|i| format!("storm-{i}")).collect();
    for s in &sessions {
        apps[0].create_session(s).await;
    }
    let mut clients = Vec::new();
    for c in 0..32usize {
        let app = &apps[c % 2];
        let (client, base) = (app.client.clone(), app.base.clone());
        let session = sessions[c % 8].clone();
        clients.push(tokio::spawn(async move {
            let mut completed = Vec::new();
            for t in 0..3 {
                let url = format!("{base}/v1/sessions/{session}/messages");
                if c % 4 == 0 {
                    let linger = Duration::from_millis((c as u64 + t) % 6);
                    crate::safety::post_and_leave(
                        &base,
                        &session,
                        &format!("left-c{c}-t{t}"),
                        t == 1,
                        linger,
                    )
                    .await;
                }
                for _attempt in 0..400 {
                    let response = client
                        .post(&url)
                        .json(&json!({"content": format!("c{c}-t{t}")}))
                        .send()
                        .await
                        .unwrap();
                    match response.status().as_u16() {
                        200 => {
                            let turn: Value = response.json().await.unwrap();
                            completed.push((session.clone(), turn["turn_id"].as_str().unwrap().to_owned()));
                            break;
                        }
                        409 => tokio::time::sleep(Duration::from_millis(5 + (c as u64 % 7))).await,
                        other => panic!("unexpected status {other}"),
                    }
                }
            }
            completed
        }));
    }
    let mut completed: HashMap<String, Vec<String>> = HashMap::new();
    for client in clients {
        for (session, turn) in client.await.unwrap() {
            completed.entry(session).or_default().push(turn);
        }
    }
    assert_eq!(completed.values().map(Vec::len).sum::<usize>(), 96, "every turn completed");
    for session in &sessions {
        let history = apps[1].history(session).await;
        let seqs: Vec<u64> = history.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
        assert_eq!(
            seqs,
            (1..=history.len() as u64).collect::<Vec<_>>(),
            "{session}: contiguous, unique seqs"
        );
        let asked: Vec<&str> = history.iter().step_by(2).map(|m| m["content"].as_str().unwrap()).collect();
        let left = asked.iter().filter(|c| c.starts_with("left-")).count();
        assert_eq!(history.len(), (completed[session].len() + left) * 2, "{session}: messages = turns x 2");
        let mut unique = asked.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), asked.len(), "{session}: no turn stored twice");
        for turn in &completed[session] {
            assert_eq!(
                history.iter().filter(|m| m["turn_id"] == turn.as_str()).count(),
                2,
                "{session}: {turn}"
            );
        }
        for pair in history.chunks(2) {
            assert_eq!(pair[0]["role"], "user");
            assert_eq!(pair[1]["role"], "assistant");
            assert_eq!(pair[0]["turn_id"], pair[1]["turn_id"], "{session}: a turn's messages are adjacent");
            let asked = pair[0]["content"].as_str().unwrap();
            assert!(pair[1]["content"].as_str().unwrap().starts_with(&format!("echo: {asked} ")));
        }
    }
}

for_each_backend!(
    a_busy_session_is_409_on_every_replica,
    waiting_turns_run_after_the_running_one_in_arrival_order,
    a_wait_past_the_busy_timeout_is_409,
    an_idempotent_retry_returns_the_same_turn_without_running_it_again,
    an_idempotent_retry_while_the_turn_runs_is_409_with_its_id,
    a_streaming_retry_while_the_turn_runs_attaches_to_its_stream,
    a_turn_can_be_cancelled_from_another_replica,
    a_turn_longer_than_its_lease_keeps_the_session,
    the_session_is_free_when_the_last_event_arrives,
    a_turn_abandoned_by_a_dead_replica_ends_failed_and_frees_the_session,
    concurrent_clients_never_corrupt_a_conversation,
);
