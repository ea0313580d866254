//! The history operations chat UIs offer besides posting: regenerate the last reply, and fork a
//! conversation into a new session. (Edit is a post with `replace_from`: see [`super::TurnInput`].)

use std::sync::Arc;

use serde_json::json;
use uuid::Uuid;

use super::{Agent, TurnInput, TurnStart};
use crate::config::IfBusy;
use crate::domain::{Message, Metadata, NewSession, Role, Session, TurnStatus, new_id};
use crate::error::AppError;
use crate::store::{Order, PageQuery};

/// Messages read per page when a history operation walks the history.
const PAGE: usize = 100;

/// A regenerate request: the turn to run again and how.
#[derive(Debug, Clone)]
pub struct Regenerate {
    /// The caller's tenant.
    pub tenant: String,
    /// The session.
    pub session_id: String,
    /// The turn to regenerate: the session's last.
    pub turn_id: Uuid,
    /// What to do if another turn runs in the session.
    pub if_busy: IfBusy,
    /// The client's `Idempotency-Key`, if any.
    pub idempotency_key: Option<String>,
    /// Whether the client streams the new turn.
    pub stream: bool,
}

/// A fork request.
#[derive(Debug, Clone)]
pub struct Fork {
    /// The caller's tenant.
    pub tenant: String,
    /// The session to fork.
    pub source: String,
    /// The new session's id (validated).
    pub id: String,
    /// Copy the active messages up to and including this seq (default: all).
    pub up_to_seq: Option<u64>,
    /// The new session's metadata (default: the source's).
    pub metadata: Option<Metadata>,
    /// The tenant's session cap (`u64::MAX`: none).
    pub max_sessions: u64,
}

impl Agent {
    /// Runs the session's last turn again: an edit of its user message, with the same content
    /// and metadata (plus `regenerated_from`). 404 for an unknown turn, 409 `turn_in_progress`
    /// for a running one and `turn_not_last` for any turn but the last.
    pub async fn regenerate(self: &Arc<Self>, r: Regenerate) -> Result<TurnStart, AppError> {
        let (tenant, session) = (r.tenant.as_str(), r.session_id.as_str());
        let turn = self
            .store
            .history()
            .get_turn(tenant, session, r.turn_id)
            .await
            .map_err(|e| AppError::from_store(e, session))?
            .ok_or(AppError::TurnNotFound(r.turn_id))?;
        if turn.status == TurnStatus::Running {
            return Err(AppError::TurnInProgress(turn.id));
        }
        let user = self.last_turn_user_message(tenant, session, r.turn_id).await?;
        let mut metadata = user.metadata;
        metadata.insert("regenerated_from".to_owned(), json!(r.turn_id));
        let input = TurnInput {
            tenant: r.tenant,
            session_id: r.session_id,
            content: user.content,
            metadata,
            if_busy: r.if_busy,
            idempotency_key: r.idempotency_key,
            stream: r.stream,
            replace_from: Some(user.seq),
        };
        self.start_turn(input).await
    }

    /// The user message of the session's last turn, which must be `turn_id`.
    async fn last_turn_user_message(
        &self,
        tenant: &str,
        session: &str,
        turn_id: Uuid,
    ) -> Result<Message, AppError> {
        let mut before = None;
        // A turn holds one user message and its tool rounds: a few pages at most.
        for _ in 0..100 {
            let query = PageQuery { limit: PAGE, order: Order::Desc, before, ..PageQuery::default() };
            let page = self
                .store
                .history()
                .read_page(tenant, session, query)
                .await
                .map_err(|e| AppError::from_store(e, session))?;
            for m in &page.messages {
                if m.turn_id != turn_id {
                    return Err(AppError::TurnNotLast(turn_id));
                }
                if m.role == Role::User {
                    return Ok(m.clone());
                }
            }
            if !page.has_more {
                break;
            }
            before = page.messages.last().map(|m| m.seq);
        }
        Err(AppError::TurnNotLast(turn_id))
    }

    /// Creates a new session of the tenant whose history is a copy of the source's active
    /// messages up to `up_to_seq` (all by default), renumbered from 1, with new ids and
    /// `metadata.forked_from`, in one atomic write. Never splits a tool round (422), copies at
    /// most `fork_max_messages` (413 `fork_too_large`).
    pub async fn fork(&self, f: Fork) -> Result<Session, AppError> {
        let (tenant, source_id) = (f.tenant.as_str(), f.source.as_str());
        let source = self
            .store
            .history()
            .get_session(tenant, source_id)
            .await
            .map_err(|e| AppError::from_store(e, source_id))?
            .ok_or_else(|| AppError::SessionNotFound(source_id.to_owned()))?;
        let copied = self.fork_messages(tenant, source_id, f.up_to_seq).await?;
        let messages = copied
            .into_iter()
            .map(|original| {
                let origin = json!({"session_id": source_id, "message_id": original.id});
                let mut copy = Message {
                    id: new_id(),
                    seq: 0,
                    session_id: f.id.clone(),
                    superseded_by: None,
                    ..original
                };
                copy.metadata.insert("forked_from".to_owned(), origin);
                copy
            })
            .collect();
        let new = NewSession {
            id: f.id.clone(),
            system_prompt: source.system_prompt,
            metadata: f.metadata.unwrap_or(source.metadata),
        };
        let (session, _) = self
            .store
            .history()
            .create_session_with(tenant, new, messages, f.max_sessions)
            .await
            .map_err(|e| AppError::from_store(e, &f.id))?;
        Ok(session)
    }

    /// The active messages a fork copies, oldest first, checked against the fork's limits.
    async fn fork_messages(
        &self,
        tenant: &str,
        session: &str,
        up_to: Option<u64>,
    ) -> Result<Vec<Message>, AppError> {
        let max = self.settings.fork_max_messages;
        let before = up_to.and_then(|s| s.checked_add(1));
        let mut copied: Vec<Message> = Vec::new();
        let mut after = None;
        loop {
            let query = PageQuery { limit: PAGE, order: Order::Asc, after, before, ..PageQuery::default() };
            let page = self
                .store
                .history()
                .read_page(tenant, session, query)
                .await
                .map_err(|e| AppError::from_store(e, session))?;
            copied.extend(page.messages);
            if copied.len() > max {
                return Err(AppError::ForkTooLarge(format!(
                    "the fork would copy more than {max} messages (PARLEY_FORK_MAX_MESSAGES); fork up to an earlier up_to_seq"
                )));
            }
            if !page.has_more {
                break;
            }
            after = copied.last().map(|m| m.seq);
        }
        if let Some(seq) = up_to {
            self.check_fork_cut(tenant, session, seq, copied.last()).await?;
        }
        Ok(copied)
    }

    /// A fork that ends at `seq` must not split a tool round: its last message may not call tools
    /// whose results follow, nor may the next message be a tool result.
    async fn check_fork_cut(
        &self,
        tenant: &str,
        session: &str,
        seq: u64,
        last: Option<&Message>,
    ) -> Result<(), AppError> {
        let inside = || {
            AppError::Validation(format!(
                "up_to_seq {seq} is inside a tool round (a tool call and its results); fork before the call or after its last result"
            ))
        };
        if last.is_some_and(Message::calls_tools) {
            return Err(inside());
        }
        let query = PageQuery { limit: 1, order: Order::Asc, after: Some(seq), ..PageQuery::default() };
        let next = self
            .store
            .history()
            .read_page(tenant, session, query)
            .await
            .map_err(|e| AppError::from_store(e, session))?;
        if next.messages.first().is_some_and(|m| m.role == Role::Tool) {
            return Err(inside());
        }
        Ok(())
    }
}
