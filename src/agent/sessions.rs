//! Sessions and their history as the HTTP layer sees them: the store's answers, with its errors
//! told as the API tells them (404 for a missing session, 503 for an unreachable store). The
//! handlers never hold the store; this is the only way to it besides running turns.

use super::Agent;
use crate::domain::{Metadata, NewSession, Session};
use crate::error::AppError;
use crate::store::{MessagePage, PageQuery, SessionCursor, SessionPage, StoreError};

impl Agent {
    /// The store's name (`memory`, `sqlite`, `redis`, `postgres`).
    pub fn store_backend(&self) -> &'static str {
        self.store.history().backend()
    }

    /// Whether the store answers.
    pub async fn ping_store(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }

    /// Creates a session; with `max_sessions`, only while the tenant has fewer.
    pub async fn create_session(
        &self,
        tenant: &str,
        new: NewSession,
        max_sessions: Option<u64>,
    ) -> Result<Session, AppError> {
        let id = new.id.clone();
        let created = match max_sessions {
            None => self.store.history().create_session(tenant, new).await,
            Some(max) => self.store.history().create_session_within(tenant, new, max).await,
        };
        created.map_err(|e| AppError::from_store(e, &id))
    }

    /// A page of the tenant's sessions, most recently updated first.
    pub async fn list_sessions(
        &self,
        tenant: &str,
        limit: usize,
        cursor: Option<&SessionCursor>,
    ) -> Result<SessionPage, AppError> {
        Ok(self.store.history().list_sessions(tenant, limit, cursor).await?)
    }

    /// A session of the tenant; 404 when it has none of that id.
    pub async fn session(&self, tenant: &str, id: &str) -> Result<Session, AppError> {
        self.store
            .history()
            .get_session(tenant, id)
            .await?
            .ok_or_else(|| AppError::SessionNotFound(id.to_owned()))
    }

    /// Replaces a session's metadata; 404 when the tenant has no such session.
    pub async fn set_session_metadata(
        &self,
        tenant: &str,
        id: &str,
        metadata: Metadata,
    ) -> Result<Session, AppError> {
        let session = self.store.history().set_session_metadata(tenant, id, metadata).await?;
        session.ok_or_else(|| AppError::SessionNotFound(id.to_owned()))
    }

    /// Deletes a session and its history (and its turns' event logs); 404 when the tenant has no
    /// such session.
    pub async fn delete_session(&self, tenant: &str, id: &str) -> Result<(), AppError> {
        if self.store.history().delete_session(tenant, id).await? {
            self.forget_event_logs(tenant, id).await;
            Ok(())
        } else {
            Err(AppError::SessionNotFound(id.to_owned()))
        }
    }

    /// Drops the event logs of a session's turns, which hold what its turns streamed. The history
    /// is already gone, so a failure only leaves them to expire (`PARLEY_EVENT_TTL`): logged,
    /// not answered.
    async fn forget_event_logs(&self, tenant: &str, id: &str) {
        // Turns of the session still running here log nothing more.
        self.log_writer.forget_session(tenant, id);
        // The coordinator's log even when relaying is off: logs written before are dropped too.
        if let Some(log) = self.store.coordinator().event_log()
            && let Err(e) = log.forget_session(tenant, id).await
        {
            tracing::warn!(error = %e, "cannot drop the session's turn event logs; they expire on their own");
        }
    }

    /// A page of a session's history.
    pub async fn history_page(
        &self,
        tenant: &str,
        id: &str,
        query: PageQuery,
    ) -> Result<MessagePage, AppError> {
        self.store.history().read_page(tenant, id, query).await.map_err(|e| AppError::from_store(e, id))
    }

    /// Clears a session's history (and its turns' event logs); the session stays, and seqs are
    /// never reused.
    pub async fn clear_history(&self, tenant: &str, id: &str) -> Result<(), AppError> {
        self.store.history().clear(tenant, id).await.map_err(|e| AppError::from_store(e, id))?;
        self.forget_event_logs(tenant, id).await;
        Ok(())
    }
}
