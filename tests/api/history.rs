//! History: the window the model sees, pages in both orders, clearing.

use serde_json::Value;

use crate::helpers::{Backend, spawn_app_on};

fn seqs(messages: &[Value]) -> Vec<u64> {
    messages.iter().map(|m| m["seq"].as_u64().unwrap()).collect()
}

async fn the_window_grows_with_the_conversation_and_caps_at_the_history_size(backend: Backend) {
    let app = spawn_app_on(backend, &["--history-size", "4"]).await;
    app.create_session("w").await;
    let mut replies = Vec::new();
    for i in 1..=5 {
        let turn = app.post_message("w", &format!("m{i}")).await;
        let messages = turn["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 2);
        replies.push(messages[1]["content"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        replies,
        vec![
            "echo: m1 (context: 0 messages)",
            "echo: m2 (context: 2 messages)",
            "echo: m3 (context: 4 messages)",
            "echo: m4 (context: 4 messages)",
            "echo: m5 (context: 4 messages)",
        ]
    );
    let history = app.history("w").await;
    assert_eq!(seqs(&history), (1..=10).collect::<Vec<u64>>());
}

async fn a_turn_answers_with_every_stored_message_in_order(backend: Backend) {
    let app = spawn_app_on(backend, &[]).await;
    app.create_session("t").await;
    let body = serde_json::json!({"content": "hi there", "metadata": {"client": "web"}});
    let response = app.post_message_raw("t", body).await;
    assert_eq!(response.status(), 200);
    let turn: Value = response.json().await.unwrap();
    let turn_id = turn["turn_id"].as_str().unwrap();
    let messages = turn["messages"].as_array().unwrap();
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(messages[0]["content"], "hi there");
    assert_eq!(messages[0]["metadata"]["client"], "web");
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(messages[1]["content"], "echo: hi there (context: 0 messages)");
    for m in messages {
        assert_eq!(m["turn_id"], turn_id);
        assert_eq!(m["session_id"], "t");
        assert_eq!(uuid::Uuid::parse_str(m["id"].as_str().unwrap()).unwrap().get_version_num(), 7);
    }
    assert_eq!(app.history("t").await, *messages, "the answer is exactly what was stored");
    assert!(turn["usage"]["total_tokens"].as_u64().unwrap() > 0);
}

async fn pages_walk_the_history_in_both_orders_without_gaps_or_repeats(backend: Backend) {
    let app = spawn_app_on(backend, &[]).await;
    app.create_session("p").await;
    for i in 0..7 {
        app.post_message("p", &format!("q{i}")).await;
    }
    for (order, param) in [("asc", "after"), ("desc", "before")] {
        let mut seen = Vec::new();
        let mut path = format!("/v1/sessions/p/messages?limit=3&order={order}");
        loop {
            let (status, page) = app.get_json(&path).await;
            assert_eq!(status, 200, "{page}");
            let data = page["data"].as_array().unwrap();
            assert!(data.len() <= 3);
            seen.extend(seqs(data));
            match page["next_cursor"].as_str() {
                Some(c) => path = format!("/v1/sessions/p/messages?limit=3&order={order}&{param}={c}"),
                None => break,
            }
        }
        let mut expected: Vec<u64> = (1..=14).collect();
        if order == "desc" {
            expected.reverse();
        }
        assert_eq!(seen, expected, "{order}");
    }
    let (_, default_page) = app.get_json("/v1/sessions/p/messages").await;
    assert_eq!(default_page["data"].as_array().unwrap().len(), 14, "default limit is 20");
    let (_, between) = app.get_json("/v1/sessions/p/messages?after=3&before=7").await;
    assert_eq!(seqs(between["data"].as_array().unwrap()), vec![4, 5, 6]);
}

async fn clearing_keeps_the_session_and_seqs_continue(backend: Backend) {
    let app = spawn_app_on(backend, &[]).await;
    app.create_session("c").await;
    app.post_message("c", "one").await;
    let response = app.client.delete(app.url("/v1/sessions/c/messages")).send().await.unwrap();
    assert_eq!(response.status(), 204);
    assert!(app.history("c").await.is_empty());
    let (status, session) = app.get_json("/v1/sessions/c").await;
    assert_eq!(status, 200);
    assert_eq!(session["message_count"], 0);
    let turn = app.post_message("c", "two").await;
    assert_eq!(seqs(turn["messages"].as_array().unwrap()), vec![3, 4]);
    assert_eq!(
        turn["messages"][1]["content"], "echo: two (context: 0 messages)",
        "the cleared history is not sent"
    );
    let missing = app.client.delete(app.url("/v1/sessions/nope/messages")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
}

async fn the_session_system_prompt_is_not_counted_as_context(backend: Backend) {
    let app = spawn_app_on(backend, &["--system-prompt", "You are parley."]).await;
    app.create_session_with(serde_json::json!({"id": "sp", "system_prompt": "Session prompt"})).await;
    let turn = app.post_message("sp", "hello").await;
    assert_eq!(turn["messages"][1]["content"], "echo: hello (context: 0 messages)");
}

for_each_backend!(
    the_window_grows_with_the_conversation_and_caps_at_the_history_size,
    a_turn_answers_with_every_stored_message_in_order,
    pages_walk_the_history_in_both_orders_without_gaps_or_repeats,
    clearing_keeps_the_session_and_seqs_continue,
    the_session_system_prompt_is_not_counted_as_context,
);
