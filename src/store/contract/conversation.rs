//! The conversation contract: what any [`ConversationStore`] must do (sessions, history, turn
//! records, the messages of one turn), whoever coordinates its turns. Each case takes a factory
//! building a fresh, isolated store from a [`Setup`]; [`conversation_contract_tests!`] turns them
//! into tests.
//!
//! [`ConversationStore`]: crate::store::ConversationStore
//! [`conversation_contract_tests!`]: crate::conversation_contract_tests

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use super::{OTHER_TENANT, Setup, TENANT, append, build, fill, msg, named, new_session, pair, query, seqs};
use crate::domain::{Message, Metadata, NewSession, Role, ToolCall, Turn, TurnStatus, new_id};
use crate::store::{AppendBatch, DynStore, Order, PageQuery, SessionCursor, StoreError};

/// Appended messages read back in order, with seqs 1, 2, 3… and every field intact.
pub async fn append_and_read_back_in_order<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    new_session(&store, TENANT, "s1").await;
    let first = append(&store, TENANT, "s1", pair("s1", "one")).await;
    let second = append(&store, TENANT, "s1", pair("s1", "two")).await;
    assert_eq!(seqs(&first), vec![1, 2]);
    assert_eq!(seqs(&second), vec![3, 4]);
    let page = store.read_page(TENANT, "s1", query(10, Order::Asc, None, None)).await.unwrap();
    assert!(!page.has_more);
    let expected: Vec<Message> = first.into_iter().chain(second).collect();
    assert_eq!(page.messages, expected);
    let session = store.get_session(TENANT, "s1").await.unwrap().expect("session");
    assert_eq!(session.message_count, 4);
    assert!(session.updated_at >= session.created_at);
}

/// Walking pages by cursor, in both orders, visits every message once, with no gap or repeat.
pub async fn pages_by_cursor_in_both_orders<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    new_session(&store, TENANT, "s1").await;
    fill(&store, "s1", 23).await;
    for order in [Order::Asc, Order::Desc] {
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let (after, before) = match order {
                Order::Asc => (cursor, None),
                Order::Desc => (None, cursor),
            };
            let page = store.read_page(TENANT, "s1", query(5, order, after, before)).await.unwrap();
            assert!(page.messages.len() <= 5);
            seen.extend(seqs(&page.messages));
            match page.next_seq() {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        let mut expected: Vec<u64> = (1..=23).collect();
        if order == Order::Desc {
            expected.reverse();
        }
        assert_eq!(seen, expected, "order {order:?}");
    }
    let window = store.read_page(TENANT, "s1", query(100, Order::Asc, Some(5), Some(9))).await.unwrap();
    assert_eq!(seqs(&window.messages), vec![6, 7, 8]);
    assert!(!window.has_more);
    let window = store.read_page(TENANT, "s1", query(2, Order::Desc, Some(5), Some(9))).await.unwrap();
    assert_eq!(seqs(&window.messages), vec![8, 7]);
    assert!(window.has_more);
    let beyond = store.read_page(TENANT, "s1", query(5, Order::Asc, Some(23), None)).await.unwrap();
    assert!(beyond.messages.is_empty() && !beyond.has_more);
}

/// `last_n` returns the newest n messages, oldest first.
pub async fn last_n_returns_the_newest_messages_oldest_first<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    new_session(&store, TENANT, "s1").await;
    assert!(store.last_n(TENANT, "s1", 5).await.unwrap().is_empty());
    fill(&store, "s1", 12).await;
    assert_eq!(seqs(&store.last_n(TENANT, "s1", 5).await.unwrap()), vec![8, 9, 10, 11, 12]);
    assert_eq!(store.last_n(TENANT, "s1", 50).await.unwrap().len(), 12);
    assert!(matches!(store.last_n(TENANT, "missing", 5).await, Err(StoreError::SessionNotFound)));
}

/// Clearing keeps the session, empties the history, and later seqs continue after the old ones.
pub async fn clear_keeps_the_session_and_never_reuses_a_seq<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    new_session(&store, TENANT, "s1").await;
    fill(&store, "s1", 3).await;
    store.clear(TENANT, "s1").await.unwrap();
    let session = store.get_session(TENANT, "s1").await.unwrap().expect("session kept");
    assert_eq!(session.message_count, 0);
    assert!(store.last_n(TENANT, "s1", 10).await.unwrap().is_empty());
    let again = append(&store, TENANT, "s1", pair("s1", "after clear")).await;
    assert_eq!(seqs(&again), vec![4, 5]);
    assert!(matches!(store.clear(TENANT, "missing").await, Err(StoreError::SessionNotFound)));
}

/// Deleting removes the session, its history, its turns and its place in the list.
pub async fn delete_removes_everything<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    new_session(&store, TENANT, "s1").await;
    new_session(&store, TENANT, "s2").await;
    fill(&store, "s1", 3).await;
    let turn = Turn::start("s1");
    store.put_turn(TENANT, &turn).await.unwrap();
    assert!(store.delete_session(TENANT, "s1").await.unwrap());
    assert!(store.get_session(TENANT, "s1").await.unwrap().is_none());
    assert!(store.get_turn(TENANT, "s1", turn.id).await.unwrap().is_none());
    assert!(matches!(store.last_n(TENANT, "s1", 5).await, Err(StoreError::SessionNotFound)));
    let list = store.list_sessions(TENANT, 10, None).await.unwrap();
    assert_eq!(list.sessions.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), vec!["s2"]);
    assert!(!store.delete_session(TENANT, "s1").await.unwrap());
    // A new session with the same id starts from an empty history and seq 1.
    new_session(&store, TENANT, "s1").await;
    assert_eq!(seqs(&append(&store, TENANT, "s1", pair("s1", "x")).await), vec![1, 2]);
}

/// A session holds at most the configured number of messages; the oldest go first.
pub async fn the_per_session_cap_drops_the_oldest<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup { max_messages: Some(5), ttl: None }).await;
    new_session(&store, TENANT, "s1").await;
    fill(&store, "s1", 4).await;
    fill(&store, "s1", 4).await;
    let all = store.read_page(TENANT, "s1", query(100, Order::Asc, None, None)).await.unwrap();
    assert_eq!(seqs(&all.messages), vec![4, 5, 6, 7, 8]);
    assert_eq!(store.get_session(TENANT, "s1").await.unwrap().unwrap().message_count, 5);
    assert_eq!(seqs(&append(&store, TENANT, "s1", pair("s1", "x")).await), vec![9, 10]);
}

/// 64 concurrent appenders to one session lose nothing; seqs are unique, contiguous, and each
/// batch stays adjacent.
pub async fn concurrent_appenders_lose_nothing<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    new_session(&store, TENANT, "s1").await;
    let mut tasks = Vec::new();
    for i in 0..64 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            append(&store, TENANT, "s1", pair("s1", &format!("writer {i}"))).await
        }));
    }
    for task in tasks {
        let stored = task.await.expect("appender task");
        assert_eq!(stored[1].seq, stored[0].seq + 1, "a batch is adjacent");
    }
    let all = store.read_page(TENANT, "s1", query(200, Order::Asc, None, None)).await.unwrap();
    assert_eq!(seqs(&all.messages), (1..=128).collect::<Vec<u64>>());
    for chunk in all.messages.chunks(2) {
        assert_eq!(chunk[0].turn_id, chunk[1].turn_id, "turns are not interleaved");
        assert_eq!(chunk[1].content, format!("re: {}", chunk[0].content));
    }
    let distinct: HashSet<Uuid> = all.messages.iter().map(|m| m.id).collect();
    assert_eq!(distinct.len(), 128);
}

/// A 1 MiB message is stored and read back intact.
pub async fn a_one_mib_message_round_trips<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    new_session(&store, TENANT, "s1").await;
    let big = "x".repeat(1024 * 1024);
    append(&store, TENANT, "s1", vec![msg("s1", new_id(), Role::User, &big)]).await;
    let back = store.last_n(TENANT, "s1", 1).await.unwrap();
    assert_eq!(back[0].content.len(), big.len());
    assert_eq!(back[0].content, big);
}

/// Non-ASCII text and emoji survive unchanged.
pub async fn non_ascii_text_and_emoji_round_trip<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    let id = "unicode".to_owned();
    new_session(&store, TENANT, &id).await;
    let text = "héllo wörld — 日本語 — العربية — 👋🏽 family: 👨‍👩‍👧 — \"quoted\" \\ back\nslash";
    let stored = append(&store, TENANT, &id, vec![msg(&id, new_id(), Role::User, text)]).await;
    let back = store.last_n(TENANT, &id, 1).await.unwrap();
    assert_eq!(back, stored);
    assert_eq!(back[0].content, text);
}

/// Metadata, tool calls, tool results and timestamps round-trip exactly.
pub async fn metadata_and_tool_calls_round_trip_exactly<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    let mut meta = Metadata::new();
    meta.insert("z".into(), json!(1));
    meta.insert("a".into(), json!({"nested": [1, 2.5, "three", null, true], "ü": "✓"}));
    let created = store
        .create_session(
            TENANT,
            NewSession { id: "s1".into(), system_prompt: Some("Be terse.".into()), metadata: meta.clone() },
        )
        .await
        .unwrap();
    assert_eq!(store.get_session(TENANT, "s1").await.unwrap().unwrap(), created);
    let turn = new_id();
    let mut user = msg("s1", turn, Role::User, "what time is it?");
    user.metadata = meta.clone();
    let mut call = msg("s1", turn, Role::Assistant, "");
    call.tool_calls = Some(vec![
        ToolCall {
            id: "call_1".into(),
            name: "current_time".into(),
            arguments: json!({"utc_offset": "+02:00"}),
        },
        ToolCall { id: "call_2".into(), name: "calculator".into(), arguments: json!({"expression": "2^10"}) },
    ]);
    let mut result = msg("s1", turn, Role::Tool, "2026-01-01T00:00:00Z");
    result.tool_call_id = Some("call_1".into());
    result.name = Some("current_time".into());
    let mut status = Metadata::new();
    status.insert("status".into(), json!("cancelled"));
    let mut answer = msg("s1", turn, Role::Assistant, "It is midnight.");
    answer.metadata = status;
    let stored = append(&store, TENANT, "s1", vec![user, call, result, answer]).await;
    let back = store.read_page(TENANT, "s1", query(10, Order::Asc, None, None)).await.unwrap();
    assert_eq!(back.messages, stored);
    // `Map` equality ignores key order, so compare the serialised text.
    let text = |m: &[Message]| serde_json::to_string(m).expect("serialise");
    assert_eq!(text(&back.messages), text(&stored), "key order and types survive");
    let session = store.get_session(TENANT, "s1").await.unwrap().unwrap();
    assert_eq!(serde_json::to_string(&session.metadata).unwrap(), serde_json::to_string(&meta).unwrap());
}

/// Turn records are saved, replaced, and written atomically with an append.
pub async fn turn_records_round_trip<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    new_session(&store, TENANT, "s1").await;
    let mut turn = Turn::start("s1");
    store.put_turn(TENANT, &turn).await.unwrap();
    assert_eq!(store.get_turn(TENANT, "s1", turn.id).await.unwrap(), Some(turn.clone()));
    let messages = pair("s1", "hello");
    turn.status = TurnStatus::Completed;
    turn.message_ids = messages.iter().map(|m| m.id).collect();
    turn.usage = Some(crate::domain::Usage { prompt_tokens: 3, completion_tokens: 4, total_tokens: 7 });
    turn.completed_at = Some(crate::domain::now());
    store
        .append(TENANT, "s1", AppendBatch { messages, turn: Some(turn.clone()), supersede_from: None })
        .await
        .unwrap();
    assert_eq!(store.get_turn(TENANT, "s1", turn.id).await.unwrap(), Some(turn.clone()));
    let mut failed = Turn::start("s1");
    failed.status = TurnStatus::Failed;
    failed.error = Some(json!({"code": "upstream_error", "status": 502}));
    store.put_turn(TENANT, &failed).await.unwrap();
    assert_eq!(store.get_turn(TENANT, "s1", failed.id).await.unwrap(), Some(failed));
    assert!(store.get_turn(TENANT, "s1", new_id()).await.unwrap().is_none());
    assert!(store.get_turn(TENANT, "missing", turn.id).await.unwrap().is_none());
}

/// Creating a taken id conflicts; appending to an unknown session is not found.
pub async fn conflicts_and_unknown_sessions_are_reported<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    new_session(&store, TENANT, "s1").await;
    let again = store
        .create_session(
            TENANT,
            NewSession { id: "s1".into(), system_prompt: None, metadata: Metadata::new() },
        )
        .await;
    assert!(matches!(again, Err(StoreError::SessionExists)));
    let lost = store
        .append(TENANT, "nope", AppendBatch { messages: pair("nope", "x"), turn: None, supersede_from: None })
        .await;
    assert!(matches!(lost, Err(StoreError::SessionNotFound)));
    assert!(store.get_session(TENANT, "nope").await.unwrap().is_none());
    let page = store.read_page(TENANT, "nope", query(5, Order::Asc, None, None)).await;
    assert!(matches!(page, Err(StoreError::SessionNotFound)));
}

/// Metadata is replaced as given (key order kept); the session keeps its `updated_at` and its
/// place in the list; an unknown session, or another tenant's, answers `None` and changes nothing.
pub async fn session_metadata_is_replaced_in_place<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    new_session(&store, TENANT, "s1").await;
    tokio::time::sleep(Duration::from_millis(2)).await;
    new_session(&store, TENANT, "s2").await;
    let before = store.get_session(TENANT, "s1").await.unwrap().unwrap();
    let metadata: Metadata = serde_json::from_value(json!({"title": "Zebra ü", "a": {"b": [1, 2]}})).unwrap();
    let set = store.set_session_metadata(TENANT, "s1", metadata.clone()).await.unwrap().expect("the session");
    assert_eq!(set.metadata, metadata);
    assert_eq!((set.updated_at, set.message_count), (before.updated_at, before.message_count));
    assert_eq!(store.get_session(TENANT, "s1").await.unwrap().unwrap(), set);
    let ids: Vec<String> =
        store.list_sessions(TENANT, 10, None).await.unwrap().sessions.into_iter().map(|s| s.id).collect();
    assert_eq!(ids, vec!["s2", "s1"], "renaming does not move a session up the list");
    assert!(store.set_session_metadata(OTHER_TENANT, "s1", Metadata::new()).await.unwrap().is_none());
    assert!(store.set_session_metadata(TENANT, "nope", Metadata::new()).await.unwrap().is_none());
    assert_eq!(store.get_session(TENANT, "s1").await.unwrap().unwrap().metadata, metadata);
    assert!(store.get_session(OTHER_TENANT, "s1").await.unwrap().is_none());
}

/// Any cursor the API accepts is a position: one before every session lists nothing, one after
/// every session lists them all, and neither is an error (timestamps outside the backend's range
/// included; `.` and `..` are ids like any other here).
pub async fn cursors_at_the_ends_of_the_range_are_positions<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    for i in 0..3 {
        new_session(&store, TENANT, &format!("s{i}")).await;
    }
    for text in ["-999999999999999999.a", "-802111..", "-0.s1", "0.."] {
        let cursor = SessionCursor::decode(text).unwrap();
        let page = store.list_sessions(TENANT, 10, Some(&cursor)).await.unwrap();
        assert!(page.sessions.is_empty() && !page.has_more, "cursor {text}: {page:?}");
    }
    for text in ["999999999999999999.a", "999999999999999999..", "999999999999999999.~"] {
        let Ok(cursor) = SessionCursor::decode(text) else {
            assert_eq!(text, "999999999999999999.~", "{text} must decode");
            continue;
        };
        let page = store.list_sessions(TENANT, 10, Some(&cursor)).await.unwrap();
        let ids: Vec<_> = page.sessions.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["s2", "s1", "s0"], "cursor {text}");
    }
}

/// Sessions list newest-updated first and page by cursor with no gap or repeat.
pub async fn sessions_list_newest_first_by_cursor<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    for i in 0..7 {
        new_session(&store, TENANT, &format!("s{i}")).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Writing to s2 moves it to the top.
    append(&store, TENANT, "s2", pair("s2", "bump")).await;
    let mut seen = Vec::new();
    let mut cursor: Option<SessionCursor> = None;
    loop {
        let page = store.list_sessions(TENANT, 3, cursor.as_ref()).await.unwrap();
        assert!(page.sessions.len() <= 3);
        seen.extend(page.sessions.iter().map(|s| s.id.clone()));
        if !page.has_more {
            break;
        }
        cursor = Some(SessionCursor::after(page.sessions.last().unwrap()));
    }
    assert_eq!(seen, vec!["s2", "s6", "s5", "s4", "s3", "s1", "s0"]);
    let empty = store.list_sessions(OTHER_TENANT, 10, None).await.unwrap();
    assert!(empty.sessions.is_empty() && !empty.has_more);
}

/// One tenant never sees, changes or deletes another's session, even with the same id.
pub async fn tenants_are_isolated<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    new_session(&store, TENANT, "shared-id").await;
    fill(&store, "shared-id", 3).await;
    assert!(store.get_session(OTHER_TENANT, "shared-id").await.unwrap().is_none());
    assert!(matches!(store.last_n(OTHER_TENANT, "shared-id", 5).await, Err(StoreError::SessionNotFound)));
    assert!(matches!(store.clear(OTHER_TENANT, "shared-id").await, Err(StoreError::SessionNotFound)));
    assert!(!store.delete_session(OTHER_TENANT, "shared-id").await.unwrap());
    let turn = Turn::start("shared-id");
    assert!(store.put_turn(OTHER_TENANT, &turn).await.is_err());
    new_session(&store, OTHER_TENANT, "shared-id").await;
    assert_eq!(seqs(&append(&store, OTHER_TENANT, "shared-id", pair("shared-id", "b")).await), vec![1, 2]);
    assert_eq!(store.last_n(TENANT, "shared-id", 10).await.unwrap().len(), 3);
    assert_eq!(store.list_sessions(OTHER_TENANT, 10, None).await.unwrap().sessions.len(), 1);
}

/// Another tenant reaches nothing of a session: not its record, history, turns or place in the
/// list, and none of its writes land; the owner's data is unchanged afterwards.
pub async fn another_tenant_reaches_nothing_of_a_session<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    new_session(&store, TENANT, "private").await;
    let stored = append(&store, TENANT, "private", pair("private", "secret")).await;
    let turn = Turn::start("private");
    store.put_turn(TENANT, &turn).await.unwrap();
    let b = OTHER_TENANT;
    assert!(store.get_session(b, "private").await.unwrap().is_none());
    let page = store.read_page(b, "private", query(10, Order::Asc, None, None)).await;
    assert!(matches!(page, Err(StoreError::SessionNotFound)));
    assert!(matches!(store.last_n(b, "private", 10).await, Err(StoreError::SessionNotFound)));
    assert!(store.get_turn(b, "private", turn.id).await.unwrap().is_none());
    let written = store
        .append(
            b,
            "private",
            AppendBatch { messages: pair("private", "x"), turn: None, supersede_from: None },
        )
        .await;
    assert!(matches!(written, Err(StoreError::SessionNotFound)));
    assert!(matches!(store.clear(b, "private").await, Err(StoreError::SessionNotFound)));
    assert!(store.put_turn(b, &Turn::start("private")).await.is_err());
    assert!(!store.delete_session(b, "private").await.unwrap());
    assert!(store.list_sessions(b, 100, None).await.unwrap().sessions.is_empty());
    assert_eq!(store.count_sessions(b).await.unwrap(), 0);
    let page = store.read_page(TENANT, "private", query(10, Order::Asc, None, None)).await.unwrap();
    assert_eq!(page.messages, stored, "the owner's history is unchanged");
    assert_eq!(store.get_turn(TENANT, "private", turn.id).await.unwrap(), Some(turn));
    assert_eq!(store.get_session(TENANT, "private").await.unwrap().unwrap().message_count, 2);
}

/// The same id in two tenants is two sessions: each has its own record, history and seqs, and
/// deleting one leaves the other.
pub async fn the_same_id_in_two_tenants_is_two_sessions<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    let mut meta = Metadata::new();
    meta.insert("owner".into(), json!("a"));
    let new = |metadata| NewSession { id: "same".into(), system_prompt: None, metadata };
    store.create_session(TENANT, new(meta)).await.unwrap();
    store.create_session(OTHER_TENANT, new(Metadata::new())).await.unwrap();
    fill(&store, "same", 3).await;
    assert_eq!(seqs(&append(&store, OTHER_TENANT, "same", pair("same", "b")).await), vec![1, 2]);
    let a = store.get_session(TENANT, "same").await.unwrap().unwrap();
    let b = store.get_session(OTHER_TENANT, "same").await.unwrap().unwrap();
    assert_eq!((a.message_count, a.metadata["owner"].as_str()), (3, Some("a")));
    assert_eq!((b.message_count, b.metadata.get("owner")), (2, None));
    assert!(store.delete_session(OTHER_TENANT, "same").await.unwrap());
    assert_eq!(store.last_n(TENANT, "same", 10).await.unwrap().len(), 3);
    let listed = store.list_sessions(TENANT, 10, None).await.unwrap().sessions;
    assert_eq!(listed.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), vec!["same"]);
}

/// Sessions are counted per tenant; deleting one counts down.
pub async fn sessions_are_counted_per_tenant<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    assert_eq!(store.count_sessions(TENANT).await.unwrap(), 0);
    for id in ["s1", "s2", "s3"] {
        new_session(&store, TENANT, id).await;
    }
    new_session(&store, OTHER_TENANT, "s1").await;
    fill(&store, "s1", 2).await;
    assert_eq!(store.count_sessions(TENANT).await.unwrap(), 3);
    assert_eq!(store.count_sessions(OTHER_TENANT).await.unwrap(), 1);
    assert!(store.delete_session(TENANT, "s2").await.unwrap());
    store.clear(TENANT, "s1").await.unwrap();
    assert_eq!(store.count_sessions(TENANT).await.unwrap(), 2);
    assert_eq!(store.count_sessions("nobody").await.unwrap(), 0);
}

/// A capped creation counts and creates in one step: concurrent creations never overshoot the
/// limit, a taken id is still `SessionExists`, and deleting makes room again.
pub async fn concurrent_creations_never_overshoot_the_session_limit<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    const MAX: u64 = 5;
    let store = build(factory, Setup::default()).await;
    new_session(&store, TENANT, "before").await;
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(
                async move { store.create_session_within(TENANT, named(&format!("c{i}")), MAX).await },
            )
        })
        .collect();
    let (mut created, mut refused) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => created += 1,
            Err(StoreError::SessionLimitReached(max)) => {
                assert_eq!(max, MAX);
                refused += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!((created, refused), (MAX - 1, 40 - (MAX - 1)), "the session already there counts");
    assert_eq!(store.count_sessions(TENANT).await.unwrap(), MAX);
    assert!(matches!(
        store.create_session_within(TENANT, named("c100"), MAX).await,
        Err(StoreError::SessionLimitReached(MAX))
    ));
    // Another tenant's limit is its own; a taken id is reported as taken while there is room.
    store.create_session_within(OTHER_TENANT, named("c0"), MAX).await.expect("the other tenant has room");
    assert!(matches!(
        store.create_session_within(OTHER_TENANT, named("c0"), MAX).await,
        Err(StoreError::SessionExists)
    ));
    assert!(store.delete_session(TENANT, "before").await.unwrap());
    let session = store.create_session_within(TENANT, named("after"), MAX).await.expect("room again");
    assert_eq!((session.id.as_str(), session.message_count), ("after", 0));
    assert!(store.get_session(TENANT, "after").await.unwrap().is_some());
    assert_eq!(store.count_sessions(TENANT).await.unwrap(), MAX);
}

/// A turn's outcome never changes once written: a later record of the same turn (a replica
/// that lost its lease marking it failed, say) leaves a terminal record as it is.
pub async fn a_terminal_turn_record_never_changes<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    new_session(&store, TENANT, "s1").await;
    let mut turn = Turn::start("s1");
    store.put_turn(TENANT, &turn).await.unwrap();
    turn.status = TurnStatus::Failed;
    turn.error = Some(json!({"code": "turn_abandoned"}));
    store.put_turn(TENANT, &turn).await.unwrap();
    let failed = turn.clone();
    turn.status = TurnStatus::Completed;
    turn.error = None;
    store.put_turn(TENANT, &turn).await.unwrap();
    assert_eq!(store.get_turn(TENANT, "s1", turn.id).await.unwrap(), Some(failed.clone()), "put");
    let batch = AppendBatch { messages: Vec::new(), turn: Some(turn.clone()), supersede_from: None };
    store.append(TENANT, "s1", batch).await.unwrap();
    assert_eq!(store.get_turn(TENANT, "s1", turn.id).await.unwrap(), Some(failed), "append");
    assert_eq!(store.get_session(TENANT, "s1").await.unwrap().unwrap().message_count, 0);
}

/// Turn records are capped per session like messages: past the cap, the oldest go.
pub async fn turn_records_are_capped_like_messages<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup { max_messages: Some(3), ..Setup::default() }).await;
    new_session(&store, TENANT, "s1").await;
    let mut turns = Vec::new();
    for i in 0..6 {
        let mut turn = Turn::start("s1");
        turn.status = TurnStatus::Completed;
        let messages = vec![msg("s1", turn.id, Role::User, &format!("q{i}"))];
        let batch = AppendBatch { messages, turn: Some(turn.clone()), supersede_from: None };
        store.append(TENANT, "s1", batch).await.unwrap();
        turns.push(turn);
    }
    for (i, turn) in turns.iter().enumerate() {
        let kept = store.get_turn(TENANT, "s1", turn.id).await.unwrap().is_some();
        assert_eq!(kept, i >= 3, "turn {i} of 6 with a cap of 3");
    }
}

/// An edit's append supersedes, in the same atomic step, every active message from its seq on:
/// they leave the active pages, `last_n` (so the window) and `message_count`, and stay readable in
/// the superseded view (with `superseded_by`), merged in seq order with the same cursors; seqs
/// are never reused.
pub async fn an_edit_supersedes_in_the_same_append<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    new_session(&store, TENANT, "s1").await;
    for i in 0..3 {
        append(&store, TENANT, "s1", pair("s1", &format!("q{i}"))).await;
    }
    let mut edit = Turn::start("s1");
    edit.status = TurnStatus::Completed;
    let messages = vec![
        msg("s1", edit.id, Role::User, "q1 edited"),
        msg("s1", edit.id, Role::Assistant, "re: q1 edited"),
    ];
    let batch = AppendBatch { messages, turn: Some(edit.clone()), supersede_from: Some(3) };
    let stored = store.append(TENANT, "s1", batch).await.unwrap();
    assert_eq!(seqs(&stored), vec![7, 8], "seqs are never reused");

    let active = store.last_n(TENANT, "s1", 10).await.unwrap();
    assert_eq!(seqs(&active), vec![1, 2, 7, 8]);
    assert!(active.iter().all(|m| m.superseded_by.is_none()));
    assert_eq!(store.get_session(TENANT, "s1").await.unwrap().unwrap().message_count, 4);
    let page = store.read_page(TENANT, "s1", query(10, Order::Asc, None, None)).await.unwrap();
    assert_eq!(seqs(&page.messages), vec![1, 2, 7, 8]);

    let all = |limit, order, after, before| PageQuery {
        include_superseded: true,
        ..query(limit, order, after, before)
    };
    let every = store.read_page(TENANT, "s1", all(20, Order::Asc, None, None)).await.unwrap();
    assert_eq!(seqs(&every.messages), (1..=8).collect::<Vec<_>>());
    for m in &every.messages {
        let expected = (3..=6).contains(&m.seq).then_some(edit.id);
        assert_eq!(m.superseded_by, expected, "seq {}", m.seq);
    }
    assert_eq!(every.messages[2].content, "q1", "kept as it was");
    // Paged by cursor in both orders: no gap, no repeat.
    let (mut seen, mut after) = (Vec::new(), None);
    loop {
        let page = store.read_page(TENANT, "s1", all(3, Order::Asc, after, None)).await.unwrap();
        seen.extend(seqs(&page.messages));
        match page.next_seq() {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, (1..=8).collect::<Vec<_>>());
    let (mut seen, mut before) = (Vec::new(), None);
    loop {
        let page = store.read_page(TENANT, "s1", all(3, Order::Desc, None, before)).await.unwrap();
        seen.extend(seqs(&page.messages));
        match page.next_seq() {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, (1..=8).rev().collect::<Vec<_>>());

    // The last messages (what a turn's window is read from) hold no superseded message.
    let texts: Vec<String> =
        store.last_n(TENANT, "s1", 20).await.unwrap().into_iter().map(|m| m.content).collect();
    assert_eq!(texts, vec!["q0", "re: q0", "q1 edited", "re: q1 edited"]);

    // A second edit supersedes what the first left, and clear drops both kinds.
    let mut again = Turn::start("s1");
    again.status = TurnStatus::Completed;
    let batch = AppendBatch {
        messages: vec![msg("s1", again.id, Role::User, "q0 again")],
        turn: Some(again.clone()),
        supersede_from: Some(1),
    };
    assert_eq!(seqs(&store.append(TENANT, "s1", batch).await.unwrap()), vec![9]);
    assert_eq!(seqs(&store.last_n(TENANT, "s1", 10).await.unwrap()), vec![9]);
    let every = store.read_page(TENANT, "s1", all(20, Order::Asc, None, None)).await.unwrap();
    assert_eq!(seqs(&every.messages), (1..=9).collect::<Vec<_>>());
    assert_eq!(every.messages[0].superseded_by, Some(again.id));
    assert_eq!(every.messages[2].superseded_by, Some(edit.id), "superseded once, by the first edit");
    store.clear(TENANT, "s1").await.unwrap();
    let every = store.read_page(TENANT, "s1", all(20, Order::Asc, None, None)).await.unwrap();
    assert!(every.messages.is_empty(), "{:?}", every.messages);
}

/// A turn's messages are found by turn, active and superseded, in seq order, however many
/// messages came after them (1,500 here: more than any scan of recent pages would reach).
pub async fn a_turns_messages_are_found_at_any_depth<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    new_session(&store, TENANT, "s1").await;
    append(&store, TENANT, "s1", pair("s1", "before")).await;
    // The turn saves a tool round, then its answer with its record: two appends.
    let mut turn = Turn::start("s1");
    let mut call = msg("s1", turn.id, Role::Assistant, "");
    call.tool_calls =
        Some(vec![ToolCall { id: "c1".into(), name: "calculator".into(), arguments: json!({"e": "1+1"}) }]);
    let mut result = msg("s1", turn.id, Role::Tool, "2");
    result.tool_call_id = Some("c1".into());
    let round = vec![msg("s1", turn.id, Role::User, "what is 1+1?"), call, result];
    let mut stored = append(&store, TENANT, "s1", round).await;
    let answer = vec![msg("s1", turn.id, Role::Assistant, "2")];
    turn.status = TurnStatus::Completed;
    let batch = AppendBatch { messages: answer, turn: Some(turn.clone()), supersede_from: None };
    stored.extend(store.append(TENANT, "s1", batch).await.unwrap());
    assert_eq!(seqs(&stored), vec![3, 4, 5, 6]);
    for _ in 0..30 {
        fill(&store, "s1", 50).await;
    }
    assert_eq!(store.turn_messages(TENANT, "s1", turn.id).await.unwrap(), stored, "found whole, in order");
    let first = store.read_page(TENANT, "s1", query(2, Order::Asc, None, None)).await.unwrap().messages;
    let oldest = store.turn_messages(TENANT, "s1", first[0].turn_id).await.unwrap();
    assert_eq!(oldest, first, "the very first turn too");
    let newest = store.last_n(TENANT, "s1", 50).await.unwrap();
    assert_eq!(store.turn_messages(TENANT, "s1", newest[0].turn_id).await.unwrap(), newest);
}

/// A turn's messages that an edit superseded are found with it (carrying `superseded_by`), merged
/// in seq order with those still active, and the edit's own turn is found like any other.
pub async fn a_turns_superseded_messages_are_included<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    new_session(&store, TENANT, "s1").await;
    let kept = append(&store, TENANT, "s1", pair("s1", "q0")).await;
    let replaced = append(&store, TENANT, "s1", pair("s1", "q1")).await;
    let after = append(&store, TENANT, "s1", pair("s1", "q2")).await;
    // A regenerate of the last turn: its question stays, its answer is superseded.
    let mut regen = Turn::start("s1");
    regen.status = TurnStatus::Completed;
    let batch = AppendBatch {
        messages: vec![msg("s1", regen.id, Role::Assistant, "re: q2, again")],
        turn: Some(regen.clone()),
        supersede_from: Some(after[1].seq),
    };
    let regenerated = store.append(TENANT, "s1", batch).await.unwrap();
    let found = store.turn_messages(TENANT, "s1", after[0].turn_id).await.unwrap();
    assert_eq!(seqs(&found), vec![5, 6], "the active question and the superseded answer");
    assert_eq!((found[0].superseded_by, found[1].superseded_by), (None, Some(regen.id)));
    assert_eq!(found[1].content, "re: q2");
    // An edit of q1: q1's turn, what followed, and the regenerate are superseded.
    let mut edit = Turn::start("s1");
    edit.status = TurnStatus::Completed;
    let messages =
        vec![msg("s1", edit.id, Role::User, "q1 edited"), msg("s1", edit.id, Role::Assistant, "ok")];
    let batch = AppendBatch { messages, turn: Some(edit.clone()), supersede_from: Some(replaced[0].seq) };
    let edited = store.append(TENANT, "s1", batch).await.unwrap();
    let found = store.turn_messages(TENANT, "s1", replaced[0].turn_id).await.unwrap();
    let expected: Vec<Message> =
        replaced.iter().map(|m| Message { superseded_by: Some(edit.id), ..m.clone() }).collect();
    assert_eq!(found, expected, "superseded, as they were");
    let found = store.turn_messages(TENANT, "s1", regen.id).await.unwrap();
    assert_eq!(found, vec![Message { superseded_by: Some(edit.id), ..regenerated[0].clone() }]);
    let found = store.turn_messages(TENANT, "s1", after[0].turn_id).await.unwrap();
    assert_eq!((found[0].superseded_by, found[1].superseded_by), (Some(edit.id), Some(regen.id)));
    assert_eq!(store.turn_messages(TENANT, "s1", kept[0].turn_id).await.unwrap(), kept, "untouched");
    assert_eq!(store.turn_messages(TENANT, "s1", edit.id).await.unwrap(), edited);
}

/// An unknown turn has no messages; a missing session, or another tenant's, is not found, and a
/// session of the same id in another tenant holds none of the turn's messages.
pub async fn turn_messages_of_an_unknown_turn_or_another_tenant_are_none<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    new_session(&store, TENANT, "s1").await;
    let stored = append(&store, TENANT, "s1", pair("s1", "mine")).await;
    let turn_id = stored[0].turn_id;
    assert!(store.turn_messages(TENANT, "s1", new_id()).await.unwrap().is_empty(), "an unknown turn");
    assert!(matches!(
        store.turn_messages(TENANT, "missing", turn_id).await,
        Err(StoreError::SessionNotFound)
    ));
    assert!(matches!(
        store.turn_messages(OTHER_TENANT, "s1", turn_id).await,
        Err(StoreError::SessionNotFound)
    ));
    new_session(&store, OTHER_TENANT, "s1").await;
    append(&store, OTHER_TENANT, "s1", pair("s1", "theirs")).await;
    assert!(store.turn_messages(OTHER_TENANT, "s1", turn_id).await.unwrap().is_empty(), "not theirs");
    assert_eq!(store.turn_messages(TENANT, "s1", turn_id).await.unwrap(), stored);
}

/// What the per-session cap drops, and what a clear drops, is no longer a turn's.
pub async fn turn_messages_go_with_the_cap_and_a_clear<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup { max_messages: Some(5), ttl: None }).await;
    new_session(&store, TENANT, "s1").await;
    let turn = |text: &str, n: usize| {
        let id = new_id();
        (1..=n).map(|i| msg("s1", id, Role::User, &format!("{text}{i}"))).collect::<Vec<_>>()
    };
    let a = append(&store, TENANT, "s1", turn("a", 3)).await;
    let b = append(&store, TENANT, "s1", turn("b", 4)).await;
    assert_eq!(store.turn_messages(TENANT, "s1", a[0].turn_id).await.unwrap(), a[2..], "seqs 1, 2 dropped");
    assert_eq!(store.turn_messages(TENANT, "s1", b[0].turn_id).await.unwrap(), b);
    let c = append(&store, TENANT, "s1", turn("c", 4)).await;
    assert!(store.turn_messages(TENANT, "s1", a[0].turn_id).await.unwrap().is_empty(), "all dropped");
    assert_eq!(store.turn_messages(TENANT, "s1", b[0].turn_id).await.unwrap(), b[3..]);
    store.clear(TENANT, "s1").await.unwrap();
    assert!(store.turn_messages(TENANT, "s1", c[0].turn_id).await.unwrap().is_empty(), "cleared");
    let d = append(&store, TENANT, "s1", turn("d", 2)).await;
    assert_eq!(store.turn_messages(TENANT, "s1", d[0].turn_id).await.unwrap(), d, "found after a clear");
}

/// A fork's write: a new session holding messages with seqs from 1, created whole or not at all,
/// within the tenant's session cap, never over an existing id.
pub async fn a_session_is_created_holding_messages<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    new_session(&store, TENANT, "taken").await;
    let mut messages = pair("copy", "a");
    messages.extend(pair("copy", "b"));
    let new =
        NewSession { id: "copy".into(), system_prompt: Some("be brief".into()), metadata: Metadata::new() };
    let (session, stored) = store.create_session_with(TENANT, new, messages.clone(), 10).await.unwrap();
    assert_eq!((session.id.as_str(), session.message_count), ("copy", 4));
    assert_eq!(seqs(&stored), vec![1, 2, 3, 4]);
    let read = store.last_n(TENANT, "copy", 10).await.unwrap();
    assert_eq!(read, stored);
    assert_eq!(
        read.iter().map(|m| m.id).collect::<Vec<_>>(),
        messages.iter().map(|m| m.id).collect::<Vec<_>>()
    );
    let got = store.get_session(TENANT, "copy").await.unwrap().unwrap();
    assert_eq!((got.system_prompt.as_deref(), got.message_count), (Some("be brief"), 4));
    let next = store
        .append(TENANT, "copy", AppendBatch { messages: pair("copy", "c"), ..AppendBatch::default() })
        .await;
    assert_eq!(seqs(&next.unwrap()), vec![5, 6], "seqs go on after the copy");

    let again = NewSession { id: "taken".into(), system_prompt: None, metadata: Metadata::new() };
    let taken = store.create_session_with(TENANT, again, pair("taken", "x"), 10).await;
    assert!(matches!(taken, Err(StoreError::SessionExists)));
    assert!(store.last_n(TENANT, "taken", 10).await.unwrap().is_empty(), "nothing written");
    let full = NewSession { id: "third".into(), system_prompt: None, metadata: Metadata::new() };
    let capped = store.create_session_with(TENANT, full, pair("third", "x"), 2).await;
    assert!(matches!(capped, Err(StoreError::SessionLimitReached(2))));
    assert!(store.get_session(TENANT, "third").await.unwrap().is_none());
}

/// With a TTL, expired sessions do not count against the limit, and an expired id can be reused.
pub async fn expired_sessions_leave_room_under_the_limit<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup { max_messages: None, ttl: Some(Duration::from_secs(1)) }).await;
    store.create_session_within(TENANT, named("old"), 1).await.expect("room for one");
    assert!(matches!(
        store.create_session_within(TENANT, named("new"), 1).await,
        Err(StoreError::SessionLimitReached(1))
    ));
    tokio::time::sleep(Duration::from_millis(1300)).await;
    store.create_session_within(TENANT, named("old"), 1).await.expect("the expired id is free again");
    assert_eq!(store.count_sessions(TENANT).await.unwrap(), 1);
}

/// With a TTL, expired sessions are not counted.
pub async fn expired_sessions_are_not_counted<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup { max_messages: None, ttl: Some(Duration::from_secs(1)) }).await;
    new_session(&store, TENANT, "old").await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    new_session(&store, TENANT, "new").await;
    assert_eq!(store.count_sessions(TENANT).await.unwrap(), 1);
}

/// With a TTL, an idle session expires whole; each write slides the TTL.
pub async fn sessions_expire_after_the_ttl_and_writes_slide_it<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let ttl = Duration::from_secs(2);
    let store = build(factory, Setup { max_messages: None, ttl: Some(ttl) }).await;
    new_session(&store, TENANT, "idle").await;
    new_session(&store, TENANT, "busy").await;
    fill(&store, "idle", 2).await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        append(&store, TENANT, "busy", pair("busy", "keep alive")).await;
    }
    // 2.7 s after its last write, "idle" is gone; "busy" was written 0 s ago.
    assert!(store.get_session(TENANT, "idle").await.unwrap().is_none(), "idle session expired");
    assert!(matches!(store.last_n(TENANT, "idle", 5).await, Err(StoreError::SessionNotFound)));
    let busy = store.get_session(TENANT, "busy").await.unwrap().expect("busy session kept alive");
    assert_eq!(busy.message_count, 6);
    let listed: Vec<String> =
        store.list_sessions(TENANT, 10, None).await.unwrap().sessions.into_iter().map(|s| s.id).collect();
    assert_eq!(listed, vec!["busy"]);
}

/// Whether the store reports itself as shareable across replicas.
pub async fn reports_whether_it_is_distributed<F, Fut>(factory: &F, expected: bool)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynStore>,
{
    let store = build(factory, Setup::default()).await;
    assert_eq!(store.is_distributed(), expected);
    store.ping().await.expect("ping");
}
