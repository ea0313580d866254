//! What the chat-client dialects (`http::ai_sdk`, `http::ag_ui`) need from a session besides
//! running turns: a session made on first use, stored messages found by the ids a client knows
//! (parley's own, or the client's, kept in a user message's `metadata.client_message_id`), the
//! last turn's messages, and the turn running in a session wherever it runs.

use std::sync::Arc;

use uuid::Uuid;

use super::Agent;
use crate::domain::{Message, NewSession};
use crate::error::AppError;
use crate::store::{Order, PageQuery, StoreError};

/// The metadata key under which a user message keeps the id its client gave it.
pub const CLIENT_MESSAGE_ID: &str = "client_message_id";

/// Most history pages of 100 read backwards to find messages by id.
const SCAN_PAGES: usize = 100;

/// Whether a stored message answers to `id`: its own id, or its client's.
pub fn known_as(message: &Message, id: &str) -> bool {
    message.id.to_string() == id
        || message.metadata.get(CLIENT_MESSAGE_ID).and_then(|v| v.as_str()) == Some(id)
}

impl Agent {
    /// Makes sure the tenant has session `id`: creates it (without a system prompt) when missing,
    /// within the tenant's cap (`u64::MAX`: none).
    pub async fn ensure_session(&self, tenant: &str, id: &str, max_sessions: u64) -> Result<(), AppError> {
        if self
            .store
            .history()
            .get_session(tenant, id)
            .await
            .map_err(|e| AppError::from_store(e, id))?
            .is_some()
        {
            return Ok(());
        }
        let new = NewSession { id: id.to_owned(), system_prompt: None, metadata: Default::default() };
        let created = match max_sessions {
            u64::MAX => self.store.history().create_session(tenant, new).await,
            max => self.store.history().create_session_within(tenant, new, max).await,
        };
        match created {
            // Another request made it first: the session exists, which is all that was asked.
            Ok(_) | Err(StoreError::SessionExists) => Ok(()),
            Err(e) => Err(AppError::from_store(e, id)),
        }
    }

    /// 404 unless the tenant has session `id`.
    pub async fn require_session(&self, tenant: &str, id: &str) -> Result<(), AppError> {
        match self.store.history().get_session(tenant, id).await.map_err(|e| AppError::from_store(e, id))? {
            Some(_) => Ok(()),
            None => Err(AppError::SessionNotFound(id.to_owned())),
        }
    }

    /// The stored messages (active or superseded) known as one of `ids`, newest first; the
    /// history is read backwards until each id is found (at most [`SCAN_PAGES`] pages of 100).
    pub async fn find_messages(
        &self,
        tenant: &str,
        session: &str,
        ids: &[&str],
    ) -> Result<Vec<Message>, AppError> {
        let mut found: Vec<Message> = Vec::new();
        let mut before = None;
        for _ in 0..SCAN_PAGES {
            let query = PageQuery {
                limit: 100,
                order: Order::Desc,
                before,
                include_superseded: true,
                ..PageQuery::default()
            };
            let page = self
                .store
                .history()
                .read_page(tenant, session, query)
                .await
                .map_err(|e| AppError::from_store(e, session))?;
            before = page.next_seq();
            found.extend(page.messages.into_iter().filter(|m| ids.iter().any(|id| known_as(m, id))));
            let all = ids.iter().all(|id| found.iter().any(|m| known_as(m, id)));
            if all || before.is_none() {
                break;
            }
        }
        Ok(found)
    }

    /// The messages of the session's last turn (the turn of its newest active message), active
    /// ones only, oldest first; empty for an empty history. Two reads whatever the turn's length:
    /// the newest message, then its turn's messages.
    pub async fn last_turn_messages(&self, tenant: &str, session: &str) -> Result<Vec<Message>, AppError> {
        let history = self.store.history();
        let newest = PageQuery { limit: 1, order: Order::Desc, ..PageQuery::default() };
        let page =
            history.read_page(tenant, session, newest).await.map_err(|e| AppError::from_store(e, session))?;
        let Some(last) = page.messages.first() else {
            return Ok(Vec::new());
        };
        let mut messages = history
            .turn_messages(tenant, session, last.turn_id)
            .await
            .map_err(|e| AppError::from_store(e, session))?;
        messages.retain(|m| m.superseded_by.is_none());
        Ok(messages)
    }

    /// The turn running in a session: here (from the registry), or on another replica (the
    /// holder of the store's lock).
    pub async fn running_turn(
        self: &Arc<Self>,
        tenant: &str,
        session: &str,
    ) -> Result<Option<Uuid>, AppError> {
        if let Some(turn_id) = self.registry.running_in(tenant, session) {
            return Ok(Some(turn_id));
        }
        self.store
            .coordinator()
            .turn_lock_holder(tenant, session)
            .await
            .map_err(|e| AppError::from_store(e, session))
    }
}
