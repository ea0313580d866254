//! Edit and resend (`replace_from`), regenerate and fork: each one request, atomic on every
//! store, and nothing a user wrote is ever destroyed by it.

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, collect_events, spawn_app_on, spawn_replicas};

/// A session with three turns: seqs 1–6 (user q0, echo, user q1, echo, user q2, echo).
async fn three_turns(app: &TestApp, session: &str) -> Vec<Value> {
    app.create_session(session).await;
    let mut turns = Vec::new();
    for i in 0..3 {
        turns.push(app.post_message(session, &format!("q{i}")).await);
    }
    turns
}

/// Every message, active and superseded, oldest first.
async fn everything(app: &TestApp, session: &str) -> Vec<Value> {
    let (status, page) =
        app.get_json(&format!("/v1/sessions/{session}/messages?limit=100&include_superseded=true")).await;
    assert_eq!(status, 200, "{page}");
    page["data"].as_array().unwrap().clone()
}

fn contents(messages: &[Value]) -> Vec<&str> {
    messages.iter().map(|m| m["content"].as_str().unwrap()).collect()
}

fn seqs(messages: &[Value]) -> Vec<u64> {
    messages.iter().map(|m| m["seq"].as_u64().unwrap()).collect()
}

async fn post(app: &TestApp, session: &str, body: Value) -> (u16, Value) {
    let response = app.post_message_raw(session, body).await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// An edit runs with the history before the edited message (the echo model's `context: N`
/// counts it), and its save supersedes that message and everything after it, in one step:
/// superseded messages leave the history and `message_count`, keep their text, and carry the
/// turn that replaced them.
async fn an_edit_replaces_the_history_from_the_edited_message(backend: Backend) {
    let app = spawn_app_on(backend, &[]).await;
    three_turns(&app, "e").await;
    let (status, turn) = post(&app, "e", json!({"content": "q1 again", "replace_from": 3})).await;
    assert_eq!(status, 200, "{turn}");
    let reply = turn["messages"][1]["content"].as_str().unwrap();
    assert_eq!(reply, "echo: q1 again (context: 2 messages)", "the window is the history before seq 3");
    let history = app.history("e").await;
    assert_eq!(contents(&history), vec!["q0", "echo: q0 (context: 0 messages)", "q1 again", reply]);
    assert_eq!(seqs(&history), vec![1, 2, 7, 8], "seqs are never reused");
    let (_, session) = app.get_json("/v1/sessions/e").await;
    assert_eq!(session["message_count"], 4);

    let all = everything(&app, "e").await;
    assert_eq!(seqs(&all), (1..=8).collect::<Vec<_>>());
    for m in &all {
        let superseded = (3..=6).contains(&m["seq"].as_u64().unwrap());
        let expected = if superseded { turn["turn_id"].clone() } else { Value::Null };
        assert_eq!(m.get("superseded_by").cloned().unwrap_or(Value::Null), expected, "{m}");
    }
    assert_eq!(all[2]["content"], "q1", "nothing the user wrote is destroyed");

    // The next turn's window holds no superseded message.
    let next = app.post_message("e", "q3").await;
    assert_eq!(next["messages"][1]["content"], "echo: q3 (context: 4 messages)");
}

/// `turn.started` of a streamed edit says which seq it replaces from; a normal post says null.
async fn a_streamed_edit_says_what_it_replaces(backend: Backend) {
    let app = spawn_app_on(backend, &[]).await;
    three_turns(&app, "s").await;
    let response = app
        .client
        .post(app.url("/v1/sessions/s/messages?stream=true"))
        .json(&json!({"content": "q2 again", "replace_from": 5}))
        .send()
        .await
        .unwrap();
    let events = collect_events(response).await;
    assert_eq!(events[0].event, "turn.started");
    assert_eq!(events[0].data["replaces_from"], 5);
    assert_eq!(events.last().unwrap().event, "turn.completed");
    let plain = app.stream_turn("s", "q4").await;
    assert_eq!(plain[0].data["replaces_from"], Value::Null);
    assert!(plain[0].data.as_object().unwrap().contains_key("replaces_from"));
}

/// `replace_from` must name a user message of the active history: an assistant message, a
/// superseded one, or one past the end is 422 `invalid_replace_from`, and nothing changes.
async fn an_edit_of_anything_but_an_active_user_message_is_422(backend: Backend) {
    let app = spawn_app_on(backend, &[]).await;
    three_turns(&app, "v").await;
    let (status, _) = post(&app, "v", json!({"content": "x", "replace_from": 3})).await;
    assert_eq!(status, 200, "seqs 3 to 6 are superseded");
    let before = everything(&app, "v").await;
    for (seq, why) in
        [(2, "an assistant message"), (3, "a superseded message"), (99, "past the end"), (0, "seq 0")]
    {
        let (status, problem) = post(&app, "v", json!({"content": "y", "replace_from": seq})).await;
        assert_eq!(status, 422, "{why}: {problem}");
        assert_eq!(problem["code"], "invalid_replace_from", "{why}");
    }
    assert_eq!(everything(&app, "v").await, before, "nothing changed");
    let (status, _) = post(&app, "nope", json!({"content": "y", "replace_from": 1})).await;
    assert_eq!(status, 404);
}

/// A failed edit supersedes nothing: the history stays exactly as it was.
async fn a_failed_edit_supersedes_nothing(backend: Backend) {
    let app = spawn_app_on(backend, &["--turn-timeout", "1s", "--echo-delay-ms", "100"]).await;
    app.create_session("f").await;
    for i in 0..2 {
        app.post_message("f", &format!("q{i}")).await;
    }
    let before = everything(&app, "f").await;
    let long = "word ".repeat(30);
    let (status, problem) = post(&app, "f", json!({"content": long, "replace_from": 1})).await;
    assert_eq!(status, 504, "{problem}");
    assert_eq!(everything(&app, "f").await, before);
}

/// A cancelled edit is saved like any cancelled turn, and supersedes in the same write.
async fn a_cancelled_edit_supersedes_what_it_replaces(backend: Backend) {
    let app = spawn_app_on(backend, &["--echo-delay-ms", "100"]).await;
    three_turns(&app, "c").await;
    let response = app
        .client
        .post(app.url("/v1/sessions/c/messages?stream=true"))
        .json(&json!({"content": "one two three four five six seven eight", "replace_from": 3}))
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream().eventsource();
    let started: Value = serde_json::from_str(&stream.next().await.unwrap().unwrap().data).unwrap();
    stream.next().await.unwrap().unwrap(); // a first delta
    let turn_id = started["turn_id"].as_str().unwrap();
    let cancel =
        app.client.post(app.url(&format!("/v1/sessions/c/turns/{turn_id}/cancel"))).send().await.unwrap();
    assert_eq!(cancel.status(), 200);
    while stream.next().await.is_some() {}
    let history = app.history("c").await;
    assert_eq!(seqs(&history), vec![1, 2, 7, 8], "{history:?}");
    assert_eq!(history[2]["content"], "one two three four five six seven eight");
    assert_eq!(history[3]["metadata"]["status"], "cancelled");
    let all = everything(&app, "c").await;
    assert_eq!(all[2]["superseded_by"], turn_id);
}

/// An `Idempotency-Key` retry of an edit replays it: it never supersedes twice.
async fn an_idempotent_edit_retry_replays_it(backend: Backend) {
    let app = spawn_app_on(backend, &[]).await;
    three_turns(&app, "i").await;
    let send = || {
        app.client
            .post(app.url("/v1/sessions/i/messages"))
            .header("idempotency-key", "edit-1")
            .json(&json!({"content": "q1 again", "replace_from": 3}))
            .send()
    };
    let first: Value = send().await.unwrap().json().await.unwrap();
    let retry = send().await.unwrap();
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let retry: Value = retry.json().await.unwrap();
    assert_eq!(retry["turn_id"], first["turn_id"]);
    assert_eq!(seqs(&app.history("i").await), vec![1, 2, 7, 8]);
    assert_eq!(everything(&app, "i").await.len(), 8, "superseded once");
}

/// Regenerate re-runs the last turn: an edit of its user message with the same content and
/// metadata, recording `regenerated_from`; any other turn is 409 `turn_not_last`, an unknown one
/// 404.
async fn regenerate_reruns_the_last_turn(backend: Backend) {
    let app = spawn_app_on(backend, &[]).await;
    app.create_session("r").await;
    app.post_message("r", "q0").await;
    let (_, last) = post(&app, "r", json!({"content": "q1", "metadata": {"lang": "en"}})).await;
    let last_id = last["turn_id"].as_str().unwrap();
    let first_id = app.history("r").await[0]["turn_id"].as_str().unwrap().to_owned();

    let regenerate =
        |turn: String| app.client.post(app.url(&format!("/v1/sessions/r/turns/{turn}/regenerate"))).send();
    let response = regenerate(last_id.to_owned()).await.unwrap();
    assert_eq!(response.status(), 200);
    let turn: Value = response.json().await.unwrap();
    assert_ne!(turn["turn_id"], last_id);
    let user = &turn["messages"][0];
    assert_eq!(user["content"], "q1");
    assert_eq!(user["metadata"]["lang"], "en");
    assert_eq!(user["metadata"]["regenerated_from"], last_id);
    assert_eq!(turn["messages"][1]["content"], "echo: q1 (context: 2 messages)");
    let history = app.history("r").await;
    assert_eq!(seqs(&history), vec![1, 2, 5, 6]);
    assert_eq!(everything(&app, "r").await[2]["superseded_by"], turn["turn_id"]);

    for (turn, status, code) in [
        (first_id, 409, "turn_not_last"),
        (last_id.to_owned(), 409, "turn_not_last"),
        (uuid::Uuid::now_v7().to_string(), 404, "turn_not_found"),
    ] {
        let response = regenerate(turn).await.unwrap();
        assert_eq!(response.status(), status);
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], code);
    }
    // Streamed, like a post.
    let new_last = turn["turn_id"].as_str().unwrap();
    let response = app
        .client
        .post(app.url(&format!("/v1/sessions/r/turns/{new_last}/regenerate?stream=true")))
        .send()
        .await
        .unwrap();
    let events = collect_events(response).await;
    assert_eq!(events[0].data["replaces_from"], 5);
    assert_eq!(events.last().unwrap().event, "turn.completed");
}

/// Regenerating a turn that still runs is 409 `turn_in_progress`.
async fn regenerating_a_running_turn_is_409(backend: Backend) {
    let app = spawn_app_on(backend, &["--echo-delay-ms", "100"]).await;
    app.create_session("rr").await;
    let response = app.open_stream("rr", "one two three four five six").await;
    let mut stream = response.bytes_stream().eventsource();
    let started: Value = serde_json::from_str(&stream.next().await.unwrap().unwrap().data).unwrap();
    let turn_id = started["turn_id"].as_str().unwrap();
    let response = app
        .client
        .post(app.url(&format!("/v1/sessions/rr/turns/{turn_id}/regenerate")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "turn_in_progress");
}

/// A fork copies the active history (up to `up_to_seq`) into a new session of the tenant,
/// renumbered from 1, with new ids, `forked_from` and the system prompt; the source is untouched.
async fn a_fork_copies_the_active_history(backend: Backend) {
    let app = spawn_app_on(backend, &[]).await;
    let created = app
        .create_session_with(json!({"id": "src", "system_prompt": "be brief", "metadata": {"t": 1}}))
        .await;
    assert_eq!(created.status(), 201);
    for i in 0..3 {
        app.post_message("src", &format!("q{i}")).await;
    }
    post(&app, "src", json!({"content": "q1 again", "replace_from": 3})).await;
    let source = app.history("src").await;

    let fork = |body: Value| app.client.post(app.url("/v1/sessions/src/fork")).json(&body).send();
    let response = fork(json!({"id": "all"})).await.unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["location"], "/v1/sessions/all");
    let session: Value = response.json().await.unwrap();
    assert_eq!((session["id"].as_str(), session["message_count"].as_u64()), (Some("all"), Some(4)));
    assert_eq!(session["system_prompt"], "be brief");
    assert_eq!(session["metadata"], json!({"t": 1}), "the source's metadata by default");
    let copy = app.history("all").await;
    assert_eq!(seqs(&copy), vec![1, 2, 3, 4]);
    assert_eq!(contents(&copy), contents(&source));
    for (c, s) in copy.iter().zip(&source) {
        assert_ne!(c["id"], s["id"], "new ids");
        assert_eq!(c["metadata"]["forked_from"], json!({"session_id": "src", "message_id": s["id"]}));
    }
    let next = app.post_message("all", "more").await;
    assert_eq!(next["messages"][1]["content"], "echo: more (context: 4 messages)");
    assert_eq!(app.history("src").await, source, "the source is untouched");

    let response = fork(json!({"up_to_seq": 2, "metadata": {"title": "branch"}})).await.unwrap();
    assert_eq!(response.status(), 201);
    let session: Value = response.json().await.unwrap();
    assert_eq!(session["metadata"], json!({"title": "branch"}));
    let id = session["id"].as_str().unwrap();
    assert_eq!(contents(&app.history(id).await), vec!["q0", "echo: q0 (context: 0 messages)"]);
}

/// Fork's errors: an unknown source 404, an invalid id 400, a taken id 409, more messages than
/// `PARLEY_FORK_MAX_MESSAGES` 413 `fork_too_large`, a cut inside a tool round 422, and the
/// tenant's session cap 409; none leaves a session behind.
async fn fork_refuses_what_it_cannot_do(backend: Backend) {
    let app = spawn_app_on(backend, &["--fork-max-messages", "6", "--max-sessions-per-tenant", "3"]).await;
    app.create_session("src").await;
    app.post_message("src", "/tool current_time {}").await; // user, tool call, tool result, answer
    let fork = |source: &str, body: Value| {
        app.client.post(app.url(&format!("/v1/sessions/{source}/fork"))).json(&body).send()
    };
    let cases = [
        ("nope", json!({}), 404, "session_not_found"),
        ("src", json!({"id": "bad id!"}), 400, "invalid_request"),
        ("src", json!({"id": "src"}), 409, "session_exists"),
        ("src", json!({"up_to_seq": 2}), 422, "validation_failed"),
    ];
    for (source, body, status, code) in cases {
        let response = fork(source, body.clone()).await.unwrap();
        assert_eq!(response.status(), status, "{body}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], code, "{body}");
    }
    let after_round = fork("src", json!({"id": "ok", "up_to_seq": 3})).await.unwrap();
    assert_eq!(after_round.status(), 201, "after the round's last result is fine");
    app.post_message("src", "more").await; // 6 messages now
    app.post_message("src", "more").await; // 8
    let response = fork("src", json!({"id": "big"})).await.unwrap();
    assert_eq!(response.status(), 413);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "fork_too_large");
    assert_eq!(fork("src", json!({"id": "small", "up_to_seq": 6})).await.unwrap().status(), 201);
    let response = fork("src", json!({"id": "fourth", "up_to_seq": 1})).await.unwrap();
    assert_eq!(response.status(), 409, "the tenant holds 3 sessions");
    let (_, list) = app.get_json("/v1/sessions").await;
    let mut ids: Vec<&str> =
        list["data"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, vec!["ok", "small", "src"]);
}

/// An edit and a normal post on one session at once, through two replicas: exactly one wins,
/// the other is 409, and the history is consistent.
async fn an_edit_and_a_post_at_once_one_wins(backend: Backend) {
    let apps = spawn_replicas(backend, 2, &["--echo-delay-ms", "20"]).await;
    for round in 0..5 {
        let session = format!("race-{round}");
        apps[0].create_session(&session).await;
        apps[0].post_message(&session, "q0").await;
        apps[0].post_message(&session, "q1").await;
        let edit = post(&apps[0], &session, json!({"content": "edited", "replace_from": 3}));
        let plain = post(&apps[1], &session, json!({"content": "posted"}));
        let ((edited, _), (posted, _)) = tokio::join!(edit, plain);
        let mut statuses = [edited, posted];
        statuses.sort();
        assert_eq!(statuses, [200, 409], "round {round}");
        let history = apps[1].history(&session).await;
        if edited == 200 {
            assert_eq!(seqs(&history), vec![1, 2, 5, 6], "round {round}");
            assert_eq!(history[2]["content"], "edited");
        } else {
            assert_eq!(seqs(&history), vec![1, 2, 3, 4, 5, 6], "round {round}");
            assert_eq!(history[4]["content"], "posted");
            assert!(everything(&apps[0], &session).await.iter().all(|m| m.get("superseded_by").is_none()));
        }
        for pair in history.chunks(2) {
            assert_eq!(pair[0]["role"], "user");
            assert_eq!(pair[0]["turn_id"], pair[1]["turn_id"]);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

for_each_backend!(
    an_edit_replaces_the_history_from_the_edited_message,
    a_streamed_edit_says_what_it_replaces,
    an_edit_of_anything_but_an_active_user_message_is_422,
    a_failed_edit_supersedes_nothing,
    a_cancelled_edit_supersedes_what_it_replaces,
    an_idempotent_edit_retry_replays_it,
    regenerate_reruns_the_last_turn,
    regenerating_a_running_turn_is_409,
    a_fork_copies_the_active_history,
    fork_refuses_what_it_cannot_do,
    an_edit_and_a_post_at_once_one_wins,
);
