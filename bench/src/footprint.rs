//! Figure 6: resident memory per message in the memory store. This process creates a
//! `MemoryStore`, appends the messages the way turns do (a user and an assistant message of
//! `bytes` bytes each, with the completed turn record, per append), and divides the growth of its
//! own resident memory by the number of messages.

use serde::Serialize;

use parley::domain::{DEFAULT_TENANT, Message, NewSession, Role, Turn, TurnStatus, Usage, now};
use parley::store::memory::MemoryStore;
use parley::store::{AppendBatch, ConversationStore};

use crate::procs::own_rss;

/// What figure 6 measured.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Footprint {
    /// Messages stored.
    pub messages: usize,
    /// Content bytes per message.
    pub payload_bytes: usize,
    /// Sessions they were spread over.
    pub sessions: usize,
    /// Resident memory before, bytes.
    pub rss_before: u64,
    /// Resident memory after, bytes.
    pub rss_after: u64,
    /// (after - before) / messages.
    pub bytes_per_message: f64,
}

fn content(i: usize, bytes: usize) -> String {
    let mut text = format!("message {i} ");
    while text.len() < bytes {
        text.push_str("lorem ipsum ");
    }
    text.truncate(bytes);
    text
}

fn turn_batch(session: &str, i: usize, bytes: usize) -> AppendBatch {
    let mut turn = Turn::start(session);
    let user = Message::new(session, turn.id, Role::User, content(2 * i, bytes));
    let assistant = Message::new(session, turn.id, Role::Assistant, content(2 * i + 1, bytes));
    turn.status = TurnStatus::Completed;
    turn.message_ids = vec![user.id, assistant.id];
    turn.usage = Some(Usage { prompt_tokens: 50, completion_tokens: 40, total_tokens: 90 });
    turn.completed_at = Some(now());
    AppendBatch { messages: vec![user, assistant], turn: Some(turn), supersede_from: None }
}

/// Stores `messages` messages of `bytes` bytes over `sessions` sessions and measures.
pub async fn measure(messages: usize, bytes: usize, sessions: usize) -> anyhow::Result<Footprint> {
    let per_session = messages.div_ceil(sessions);
    let store = MemoryStore::new(per_session + 2);
    let rss_before = own_rss()?;
    let ids: Vec<String> = (0..sessions).map(|s| format!("footprint-{s:05}")).collect();
    for id in &ids {
        let new = NewSession { id: id.clone(), system_prompt: None, metadata: Default::default() };
        store.create_session(DEFAULT_TENANT, new).await?;
    }
    let mut stored = 0;
    let mut i = 0;
    while stored < messages {
        let id = &ids[i % sessions];
        stored += store.append(DEFAULT_TENANT, id, turn_batch(id, i, bytes)).await?.len();
        i += 1;
    }
    let rss_after = own_rss()?;
    let bytes_per_message = rss_after.saturating_sub(rss_before) as f64 / stored as f64;
    drop(store);
    Ok(Footprint {
        messages: stored,
        payload_bytes: bytes,
        sessions,
        rss_before,
        rss_after,
        bytes_per_message,
    })
}
