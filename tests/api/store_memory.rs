//! The store contract against the memory backend.

use std::sync::Arc;

use parley::store::DynFused;
use parley::store::contract::Setup;
use parley::store::memory::{DEFAULT_MAX_MESSAGES, MemoryStore};

async fn store(setup: Setup) -> DynFused {
    Arc::new(MemoryStore::new(setup.max_messages.unwrap_or(DEFAULT_MAX_MESSAGES)))
}

parley::store_contract_tests!(store, distributed = false, ttl = false);

/// The memory store keeps a session's turn records up to its message cap, dropping the oldest
/// (by start time), and finds each one whatever order the turns ended in.
#[tokio::test]
async fn turn_records_are_capped_oldest_first_and_found_in_any_order() {
    use parley::domain::{Metadata, NewSession, Turn, TurnStatus};
    use parley::store::ConversationStore;

    let store = MemoryStore::new(3);
    let session = NewSession { id: "s".into(), system_prompt: None, metadata: Metadata::new() };
    store.create_session("t", session).await.unwrap();
    let started: Vec<Turn> = (0..5).map(|_| Turn::start("s")).collect();
    let ended = |turn: &Turn| Turn { status: TurnStatus::Completed, ..turn.clone() };
    // The turns end out of order: the second one last.
    for turn in [&started[0], &started[2], &started[3], &started[1]] {
        store.put_turn("t", &ended(turn)).await.unwrap();
    }
    store.put_turn("t", &started[4]).await.unwrap(); // still running
    let found = |i: usize| store.get_turn("t", "s", started[i].id);
    assert_eq!(found(0).await.unwrap(), None, "the oldest of four ended turns is gone");
    for (i, turn) in started.iter().enumerate().take(4).skip(1) {
        assert_eq!(found(i).await.unwrap(), Some(ended(turn)), "turn {i}");
    }
    assert_eq!(found(4).await.unwrap(), Some(started[4].clone()), "the running turn is apart");
    // Ending the running turn drops the oldest kept record; replacing one keeps the count.
    store.put_turn("t", &ended(&started[4])).await.unwrap();
    assert_eq!(found(1).await.unwrap(), None);
    let failed = Turn { status: TurnStatus::Failed, ..started[3].clone() };
    store.put_turn("t", &failed).await.unwrap();
    assert_eq!(found(3).await.unwrap(), Some(ended(&started[3])), "an ended turn's record never changes");
    assert_eq!(found(2).await.unwrap(), Some(ended(&started[2])));
    assert_eq!(found(4).await.unwrap(), Some(ended(&started[4])));
}

/// Sessions are spread over the store's shards, each with its own order by update: listing
/// merges them into one order, newest first, that pages by cursor with no gap or repeat, and the
/// count adds up every shard.
#[tokio::test]
async fn listing_merges_every_shard_newest_first_and_counts_them_all() {
    use parley::domain::{Message, Metadata, NewSession, Role};
    use parley::store::{AppendBatch, ConversationStore, SessionCursor};

    let store = MemoryStore::new(100);
    let new = |id: String| NewSession { id, system_prompt: None, metadata: Metadata::new() };
    for i in 0..300 {
        store.create_session("t", new(format!("s{i:03}"))).await.unwrap();
    }
    store.create_session("other", new("s000".into())).await.unwrap();
    // Updating every third session, newest last, reorders them across shards.
    for i in (0..300).step_by(3) {
        let id = format!("s{i:03}");
        let message = Message::new(&id, uuid::Uuid::now_v7(), Role::User, "bump");
        store
            .append("t", &id, AppendBatch { messages: vec![message], turn: None, supersede_from: None })
            .await
            .unwrap();
    }
    for gone in ["s001", "s150", "s299"] {
        assert!(store.delete_session("t", gone).await.unwrap());
    }
    assert_eq!(store.count_sessions("t").await.unwrap(), 297);
    assert_eq!(store.count_sessions("other").await.unwrap(), 1);

    let mut expected = Vec::new();
    for i in 0..300 {
        let id = format!("s{i:03}");
        if let Some(session) = store.get_session("t", &id).await.unwrap() {
            expected.push((session.updated_at, id));
        }
    }
    expected.sort_by(|a, b| b.cmp(a));
    let expected: Vec<String> = expected.into_iter().map(|(_, id)| id).collect();
    let mut listed = Vec::new();
    let mut cursor: Option<SessionCursor> = None;
    loop {
        let page = store.list_sessions("t", 7, cursor.as_ref()).await.unwrap();
        assert!(page.sessions.len() <= 7);
        listed.extend(page.sessions.iter().map(|s| s.id.clone()));
        if !page.has_more {
            break;
        }
        cursor = Some(SessionCursor::after(page.sessions.last().unwrap()));
    }
    assert_eq!(listed, expected);
    assert_eq!(listed.first().map(String::as_str), Some("s297"), "the last one updated comes first");
}
