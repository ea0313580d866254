//! The store contract against the memory backend.

use std::sync::Arc;

use parley::store::DynStore;
use parley::store::contract::Setup;
use parley::store::memory::{DEFAULT_MAX_MESSAGES, MemoryStore};

async fn store(setup: Setup) -> DynStore {
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
    assert_eq!(found(3).await.unwrap(), Some(failed));
    assert_eq!(found(2).await.unwrap(), Some(ended(&started[2])));
    assert_eq!(found(4).await.unwrap(), Some(ended(&started[4])));
}
