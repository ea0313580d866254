//! Following a turn's events (`GET …/turns/{turn_id}/events`): live on the replica that streams
//! it, resumed after `Last-Event-ID`, waited for when it runs elsewhere, told from the store when
//! it has ended.

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::helpers::{Backend, SseEvent, TestApp, collect_events, spawn_app, spawn_replicas};

const WORDS: &str = "one two three four five six";

/// `GET …/turns/{turn_id}/events`, with `Last-Event-ID` when given.
async fn follow(
    app: &TestApp,
    session: &str,
    turn_id: &str,
    last_event_id: Option<&str>,
) -> reqwest::Response {
    let mut request = app.client.get(app.url(&format!("/v1/sessions/{session}/turns/{turn_id}/events")));
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    request.send().await.unwrap()
}

/// Opens a streamed turn and reads its first `n` events; returns them and the rest of the stream.
async fn first_events(
    app: &TestApp,
    session: &str,
    n: usize,
) -> (Vec<SseEvent>, impl futures::Stream<Item = Result<eventsource_stream::Event, impl std::fmt::Debug>>) {
    let mut stream = app.open_stream(session, WORDS).await.bytes_stream().eventsource();
    let mut events = Vec::new();
    for _ in 0..n {
        let event = stream.next().await.unwrap().unwrap();
        events.push(SseEvent {
            event: event.event,
            id: event.id,
            data: serde_json::from_str(&event.data).unwrap(),
        });
    }
    (events, stream)
}

fn names(events: &[SseEvent]) -> Vec<&str> {
    events.iter().map(|e| e.event.as_str()).collect()
}

fn ids(events: &[SseEvent]) -> Vec<String> {
    events.iter().map(|e| e.id.clone()).collect()
}

fn text(events: &[SseEvent]) -> String {
    events.iter().filter(|e| e.event == "message.delta").map(|e| e.data["delta"].as_str().unwrap()).collect()
}

fn turn_id(events: &[SseEvent]) -> String {
    events[0].data["turn_id"].as_str().unwrap().to_owned()
}

async fn a_streaming_turn_is_followed_live_from_its_first_event(backend: Backend) {
    let apps = spawn_replicas(backend, 1, &["--echo-delay-ms", "100"]).await;
    let app = &apps[0];
    app.create_session("live").await;
    let (head, rest) = first_events(app, "live", 2).await;
    let followed = follow(app, "live", &turn_id(&head), None).await;
    assert_eq!(followed.status(), 200);
    let followed = collect_events(followed).await;
    let original: Vec<SseEvent> = head
        .into_iter()
        .chain(
            rest.map(|e| e.unwrap())
                .map(|e| SseEvent { event: e.event, id: e.id, data: serde_json::from_str(&e.data).unwrap() })
                .collect::<Vec<_>>()
                .await,
        )
        .collect();
    assert_eq!(followed, original, "the follower sees what the poster sees, ids included");
    assert_eq!(text(&followed), "echo: one two three four five six (context: 0 messages)");
}

async fn last_event_id_resumes_after_that_event(backend: Backend) {
    let apps = spawn_replicas(backend, 1, &["--echo-delay-ms", "100"]).await;
    let app = &apps[0];
    app.create_session("resume").await;
    let (head, rest) = first_events(app, "resume", 3).await;
    // The connection drops after event 3; the client reconnects with the last id it saw.
    drop(rest);
    let resumed = collect_events(follow(app, "resume", &turn_id(&head), Some("3")).await).await;
    assert_eq!(resumed[0].id, "4", "the stream goes on after event 3");
    let ids: Vec<String> = resumed.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, (4..4 + resumed.len()).map(|i| i.to_string()).collect::<Vec<_>>());
    let whole: Vec<SseEvent> = head.into_iter().chain(resumed).collect();
    assert_eq!(
        text(&whole),
        "echo: one two three four five six (context: 0 messages)",
        "no delta lost or doubled"
    );
    let last = whole.last().unwrap();
    assert_eq!(last.event, "turn.completed", "{}", last.data);
    assert_eq!(last.data["messages"], json!(app.history("resume").await), "what was stored");
}

async fn a_finished_turn_is_told_from_the_store(backend: Backend) {
    let app = crate::helpers::spawn_app_on(backend, &[]).await;
    app.create_session("done").await;
    app.post_message("done", "earlier").await;
    let turn = app.post_message("done", "hello").await;
    app.post_message("done", "later").await;
    let turn_id = turn["turn_id"].as_str().unwrap();
    let events = collect_events(follow(&app, "done", turn_id, None).await).await;
    assert_eq!(names(&events), vec!["turn.started", "message.completed", "turn.completed"]);
    assert_eq!(events[0].data["user_message"], turn["messages"][0]);
    assert_eq!(events[1].data["message"], turn["messages"][1]);
    assert_eq!(
        events[2].data["messages"], turn["messages"],
        "the turn's stored messages, not its neighbours'"
    );
    assert_eq!(events[2].data["usage"], turn["usage"]);
    // Last-Event-ID from the live stream that was lost: the ids go on from it.
    let events = collect_events(follow(&app, "done", turn_id, Some("12")).await).await;
    assert_eq!(ids(&events), vec!["13", "14", "15"]);
    // `?after=` for a browser EventSource's first connection; the header it sends later wins.
    let url = app.url(&format!("/v1/sessions/done/turns/{turn_id}/events?after=20"));
    let events = collect_events(app.client.get(&url).send().await.unwrap()).await;
    assert_eq!(ids(&events), vec!["21", "22", "23"]);
    let events =
        collect_events(app.client.get(&url).header("last-event-id", "30").send().await.unwrap()).await;
    assert_eq!(ids(&events), vec!["31", "32", "33"]);
}

/// A finished turn with more than a thousand messages after it (beyond any scan of recent pages)
/// is told whole: the store finds its messages by turn.
async fn a_finished_turn_deep_in_the_history_is_told_whole(backend: Backend) {
    let app = crate::helpers::spawn_app_on(backend, &[]).await;
    app.create_session("deep").await;
    let turn = app.post_message("deep", "the old question").await;
    let turn_id = turn["turn_id"].as_str().unwrap();
    // 1,200 later messages, written straight to the store (24 turns of 50).
    for i in 0..24 {
        let later = uuid::Uuid::now_v7();
        let messages = (0..50)
            .map(|j| {
                parley::domain::Message::new("deep", later, parley::domain::Role::User, format!("m{i}.{j}"))
            })
            .collect();
        let batch = parley::store::AppendBatch { messages, ..Default::default() };
        app.store.append("default", "deep", batch).await.unwrap();
    }
    assert_eq!(app.history("deep").await.len(), 1202);
    let events = collect_events(follow(&app, "deep", turn_id, None).await).await;
    assert_eq!(names(&events), vec!["turn.started", "message.completed", "turn.completed"]);
    assert_eq!(events[0].data["user_message"], turn["messages"][0]);
    assert_eq!(events[1].data["message"], turn["messages"][1]);
    assert_eq!(events[2].data["messages"], turn["messages"], "the turn's stored messages, all of them");
    assert_eq!(events[2].data["usage"], turn["usage"]);
}

/// Whether the backend keeps a turn event log (the distributed ones): then another replica
/// serves a running turn's stream; else it tells the turn's outcome once it ends.
fn keeps_an_event_log(backend: Backend) -> bool {
    matches!(backend, Backend::Redis | Backend::Postgres)
}

/// Another replica serves the turn's stream from the store's event log: every event, deltas
/// included, with the ids the running replica gave them. Without a log (an in-process store
/// shared by two apps in one test), it tells the outcome.
async fn a_turn_on_another_replica_is_followed_live_from_the_event_log(backend: Backend) {
    let apps = spawn_replicas(backend, 2, &["--echo-delay-ms", "50"]).await;
    apps[0].create_session("far").await;
    let (head, rest) = first_events(&apps[0], "far", 1).await;
    let followed = follow(&apps[1], "far", &turn_id(&head), None).await;
    assert_eq!(followed.status(), 200);
    let followed = collect_events(followed).await;
    drop(rest);
    if !keeps_an_event_log(backend) {
        assert_eq!(names(&followed), vec!["turn.started", "message.completed", "turn.completed"]);
        assert_eq!(followed[2].data["messages"], json!(apps[1].history("far").await));
        return;
    }
    let names = names(&followed);
    assert_eq!(names.first().copied(), Some("turn.started"));
    assert_eq!(names.last().copied(), Some("turn.completed"));
    let deltas: String = followed
        .iter()
        .filter(|e| e.event == "message.delta")
        .map(|e| e.data["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, "echo: one two three four five six (context: 0 messages)");
    let expected_ids: Vec<String> = (1..=followed.len()).map(|i| i.to_string()).collect();
    assert_eq!(ids(&followed), expected_ids, "the running replica's ids, no gap");
    assert_eq!(followed.last().unwrap().data["messages"], json!(apps[1].history("far").await));
}

async fn a_cancelled_turn_is_told_as_cancelled(backend: Backend) {
    let apps = spawn_replicas(backend, 2, &["--echo-delay-ms", "100"]).await;
    apps[0].create_session("cx").await;
    let (head, _rest) = first_events(&apps[0], "cx", 3).await;
    let turn_id = turn_id(&head);
    let cancel = apps[0].client.post(apps[0].url(&format!("/v1/sessions/cx/turns/{turn_id}/cancel"))).send();
    assert_eq!(cancel.await.unwrap().status(), 200);
    let events = collect_events(follow(&apps[1], "cx", &turn_id, None).await).await;
    if !keeps_an_event_log(backend) {
        assert_eq!(names(&events), vec!["turn.cancelled"]);
        assert_eq!(events[0].data["messages"], json!(apps[1].history("cx").await));
        return;
    }
    // From the event log: what the turn streamed before the cancel, then its end.
    let names = names(&events);
    assert_eq!(names.first().copied(), Some("turn.started"));
    assert_eq!(names.last().copied(), Some("turn.cancelled"));
    assert!(names.iter().filter(|n| **n == "message.delta").count() >= 2, "{names:?}");
    let saved = &events.last().unwrap().data["messages"];
    assert_eq!(saved, &json!(apps[1].history("cx").await));
    assert_eq!(saved[1]["metadata"]["status"], "cancelled");
}

for_each_backend!(
    a_streaming_turn_is_followed_live_from_its_first_event,
    last_event_id_resumes_after_that_event,
    a_finished_turn_is_told_from_the_store,
    a_finished_turn_deep_in_the_history_is_told_whole,
    a_turn_on_another_replica_is_followed_live_from_the_event_log,
    a_cancelled_turn_is_told_as_cancelled,
);

#[tokio::test]
async fn an_idempotent_json_turn_is_followed_live() {
    let app = spawn_app(&["--echo-delay-ms", "100"]).await;
    app.create_session("json").await;
    // The same idempotent JSON turn twice: one runs it, the other is refused at once with its id.
    let post = || {
        let request = app.client.post(app.url("/v1/sessions/json/messages")).header("idempotency-key", "k");
        let request = request.json(&json!({"content": WORDS}));
        tokio::spawn(async move { request.send().await.unwrap() })
    };
    let first = post();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let second = post();
    let (refused, runner) = match futures::future::select(first, second).await {
        futures::future::Either::Left((done, other)) | futures::future::Either::Right((done, other)) => {
            (done.unwrap(), other)
        }
    };
    assert_eq!(refused.status(), 409, "the turn runs while the other request is refused");
    let problem: Value = refused.json().await.unwrap();
    let turn_id = problem["turn_id"].as_str().unwrap().to_owned();
    let events = collect_events(follow(&app, "json", &turn_id, None).await).await;
    let answer: Value = runner.await.unwrap().json().await.unwrap();
    // A turn with an Idempotency-Key keeps a feed for retries, so it is followed live.
    assert_eq!(text(&events), "echo: one two three four five six (context: 0 messages)");
    let last = events.last().unwrap();
    assert_eq!(last.event, "turn.completed");
    assert_eq!(answer["turn_id"], turn_id.as_str());
    assert_eq!(last.data["messages"], answer["messages"]);
}

#[tokio::test]
async fn following_an_unknown_turn_or_with_a_bad_last_event_id_is_a_problem() {
    let app = spawn_app(&[]).await;
    app.create_session("s").await;
    let turn = app.post_message("s", "hi").await;
    let turn_id = turn["turn_id"].as_str().unwrap();
    let unknown = uuid::Uuid::now_v7().to_string();
    for (session, turn, last_event_id, status, code) in [
        ("s", unknown.as_str(), None, 404, "turn_not_found"),
        ("nobody", turn_id, None, 404, "session_not_found"),
        ("s", "not-a-uuid", None, 400, "invalid_request"),
        ("s", turn_id, Some("three"), 400, "invalid_request"),
        ("s", turn_id, Some("null"), 400, "invalid_request"),
        ("s", turn_id, Some("-1"), 400, "invalid_request"),
        ("s", turn_id, Some("99999999999999999999"), 400, "invalid_request"),
    ] {
        let response = follow(&app, session, turn, last_event_id).await;
        assert_eq!(response.status(), status, "{session} {turn} {last_event_id:?}");
        assert_eq!(response.headers()["content-type"], "application/problem+json");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], code, "{problem}");
    }
    let url = app.url(&format!("/v1/sessions/s/turns/{turn_id}/events?after=-1"));
    let response = app.client.get(url).send().await.unwrap();
    assert_eq!(response.status(), 422, "after is an event id");
}

/// Streams a turn on `session` (created) to its end, then waits until the writer has logged
/// every event of it: the turn and its logged events.
async fn streamed_and_logged(
    app: &TestApp,
    session: &str,
) -> (parley::store::LeaseKey, Vec<parley::store::event_log::LoggedEvent>) {
    let log = app.coordinator.event_log().expect("this backend keeps an event log");
    let events = collect_events(app.open_stream(session, WORDS).await).await;
    let turn = parley::store::LeaseKey {
        tenant: parley::domain::DEFAULT_TENANT.to_owned(),
        session_id: session.to_owned(),
        turn_id: turn_id(&events).parse().unwrap(),
    };
    // The writer appends beside the stream.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let logged = log.read_events(&turn, 0, 1000).await.unwrap();
        if logged.len() == events.len() {
            return (turn, logged);
        }
        assert!(tokio::time::Instant::now() < deadline, "{session}'s turn logged within 10 s");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Deleting a session, or clearing its history, drops its turns' event logs at once (they hold
/// what the turns streamed), and no other session's.
async fn deleting_or_clearing_a_session_drops_its_turns_event_logs(backend: Backend) {
    let apps = spawn_replicas(backend, 1, &["--echo-delay-ms", "0"]).await;
    let app = &apps[0];
    let log = app.coordinator.event_log().expect("this backend keeps an event log");
    let mut turns = Vec::new();
    for session in ["deleted", "cleared", "kept"] {
        app.create_session(session).await;
        let (turn, logged) = streamed_and_logged(app, session).await;
        turns.push((turn, logged.len()));
    }
    let deleted = app.client.delete(app.url("/v1/sessions/deleted")).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    let cleared = app.client.delete(app.url("/v1/sessions/cleared/messages")).send().await.unwrap();
    assert_eq!(cleared.status(), 204);
    for (turn, events) in &turns {
        let logged = log.read_events(turn, 0, 1000).await.unwrap().len();
        let expected = if turn.session_id == "kept" { *events } else { 0 };
        assert_eq!(logged, expected, "events logged for {}'s turn", turn.session_id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_or_clearing_a_redis_session_drops_its_turns_event_logs() {
    deleting_or_clearing_a_session_drops_its_turns_event_logs(Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_or_clearing_a_postgres_session_drops_its_turns_event_logs() {
    deleting_or_clearing_a_session_drops_its_turns_event_logs(Backend::Postgres).await;
}

/// A log with a gap in the middle (events lost by a store that crashed, say): a follower sends
/// what comes before the gap, then the turn's outcome, never what comes after the gap as if
/// nothing were missing.
async fn a_gap_in_the_middle_of_a_log_ends_in_the_outcome(backend: Backend) {
    let apps = spawn_replicas(backend, 1, &["--echo-delay-ms", "0"]).await;
    let app = &apps[0];
    let log = app.coordinator.event_log().expect("this backend keeps an event log");
    app.create_session("holes").await;
    let (turn, logged) = streamed_and_logged(app, "holes").await;
    assert!(logged.len() > 6, "{} events", logged.len());
    // The log again, without events 4 and 5, in two appends (each consecutive).
    log.forget_session(&turn.tenant, &turn.session_id).await.unwrap();
    let ttl = std::time::Duration::from_secs(60);
    for part in [&logged[..3], &logged[5..]] {
        let append = parley::store::event_log::TurnAppend { turn: turn.clone(), events: part.to_vec() };
        log.append_events(&[append], ttl).await.unwrap();
    }
    let followed = collect_events(follow(app, "holes", &turn.turn_id.to_string(), None).await).await;
    let (last, before) = followed.split_last().unwrap();
    assert_eq!(ids(before), vec!["1", "2", "3"], "what comes before the gap, and only that");
    assert_eq!(last.event, "turn.completed");
    assert_eq!(last.data["messages"], json!(app.history("holes").await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_the_middle_of_a_redis_log_ends_in_the_outcome() {
    a_gap_in_the_middle_of_a_log_ends_in_the_outcome(Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_the_middle_of_a_postgres_log_ends_in_the_outcome() {
    a_gap_in_the_middle_of_a_log_ends_in_the_outcome(Backend::Postgres).await;
}

/// `PARLEY_EVENT_LOG=false`: nothing is logged, so another replica tells the turn's outcome once
/// it ends, as a store without a log does.
#[tokio::test]
async fn with_the_event_log_off_another_replica_tells_the_outcome() {
    let apps = spawn_replicas(Backend::Redis, 2, &["--echo-delay-ms", "50", "--event-log", "false"]).await;
    apps[0].create_session("off").await;
    let (head, rest) = first_events(&apps[0], "off", 1).await;
    let followed = collect_events(follow(&apps[1], "off", &turn_id(&head), None).await).await;
    drop(rest);
    assert_eq!(names(&followed), vec!["turn.started", "message.completed", "turn.completed"]);
    assert_eq!(followed[2].data["messages"], json!(apps[1].history("off").await));
}
