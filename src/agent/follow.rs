//! Following and cancelling a turn from any request: its events from a given one on (live from
//! the feed when it runs here; from the store's event log on any replica; otherwise by watching
//! its record until it ends, then rebuilt from what it stored), and a cancel that reaches a turn on any replica and waits until it has
//! recorded itself as ended. The HTTP layer and the client dialects only render what this gives.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use uuid::Uuid;

use super::{Agent, TurnEvent, TurnResult};
use crate::domain::{Message, Turn, TurnStatus};
use crate::error::AppError;

/// How often a follower reads the record of a turn that runs without a feed on this replica.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// The longest [`Agent::cancel_and_wait`] waits for the cancelled turn to record its end.
const CANCEL_WAIT: Duration = Duration::from_secs(10);

impl Agent {
    /// The record of a turn of the tenant's session (repaired if its process died): 404 for a
    /// missing session or turn.
    pub async fn turn(&self, tenant: &str, session: &str, turn_id: Uuid) -> Result<Turn, AppError> {
        self.require_session(tenant, session).await?;
        self.repaired_turn(tenant, session, turn_id).await?.ok_or(AppError::TurnNotFound(turn_id))
    }

    /// A turn's events after the first `after`: live from its feed when the turn runs on this
    /// replica; else from the store's event log, replayed and then live, on any replica (see
    /// `relay`); else (no log), once it has ended, the events that tell how (its stored
    /// messages, or its error). 404 for a missing session or turn.
    pub async fn follow(
        self: &Arc<Self>,
        tenant: &str,
        session: &str,
        turn_id: Uuid,
        after: u64,
    ) -> Result<BoxStream<'static, TurnEvent>, AppError> {
        if let Some(feed) = self.registry().feed(tenant, session, turn_id) {
            return Ok(feed.follow().skip(usize::try_from(after).unwrap_or(usize::MAX)).boxed());
        }
        let turn = self.turn(tenant, session, turn_id).await?;
        if let Some(events) = self.follow_log(tenant, &turn, after) {
            return Ok(events.boxed());
        }
        Ok(self.outcome_events(tenant.to_owned(), session.to_owned(), turn).boxed())
    }

    /// The events that tell how `turn` ended, once it has: its record is read again while it
    /// runs. The stream ends without a terminal event, which tells the client to reconnect, if
    /// this replica shuts down meanwhile or a read fails (the store is down, the session was
    /// deleted): the reconnection then gets the answer a request gets, from a replica that can.
    fn outcome_events(
        self: &Arc<Self>,
        tenant: String,
        session: String,
        turn: Turn,
    ) -> impl futures::Stream<Item = TurnEvent> + Send + 'static {
        let agent = Arc::clone(self);
        futures::stream::once(async move {
            let turn_id = turn.id;
            let ended = async {
                let mut turn = turn;
                while turn.status == TurnStatus::Running {
                    if agent.registry().is_closed() {
                        return Ok(Vec::new());
                    }
                    tokio::time::sleep(FOLLOW_POLL).await;
                    let read = agent.repaired_turn(&tenant, &session, turn_id).await?;
                    turn = read.ok_or(AppError::TurnNotFound(turn_id))?;
                }
                agent.ended_events(&tenant, &session, turn).await
            };
            ended.await.unwrap_or_else(|e: AppError| {
                tracing::debug!(session.id = %session, turn.id = %turn_id, error = %e, "a turn's follower stops");
                Vec::new()
            })
        })
        .flat_map(futures::stream::iter)
    }

    /// The events that tell a finished turn: as an idempotent replay tells a completed one.
    pub(super) async fn ended_events(
        &self,
        tenant: &str,
        session: &str,
        turn: Turn,
    ) -> Result<Vec<TurnEvent>, AppError> {
        let turn_id = turn.id;
        Ok(match turn.status {
            TurnStatus::Completed => {
                let messages = self.stored_turn_messages(tenant, session, &turn).await?;
                TurnEvent::replay(&TurnResult { turn_id, messages, usage: turn.usage })
            }
            TurnStatus::Cancelled => {
                let messages = self.stored_turn_messages(tenant, session, &turn).await?;
                vec![TurnEvent::Cancelled { turn_id, messages }]
            }
            TurnStatus::Failed | TurnStatus::Running => {
                let error = turn.error.and_then(|e| serde_json::from_value(e).ok());
                let error =
                    error.unwrap_or_else(|| AppError::Internal("the turn failed".to_owned()).problem());
                vec![TurnEvent::Failed { turn_id, error }]
            }
        })
    }

    /// The stored messages of a finished turn, in seq order, however old the turn: the store
    /// finds them by turn (O(the turn's messages)), with those an edit has superseded since.
    /// Messages a clear or the per-session cap gave up are not found.
    async fn stored_turn_messages(
        &self,
        tenant: &str,
        session: &str,
        turn: &Turn,
    ) -> Result<Vec<Message>, AppError> {
        self.store
            .history()
            .turn_messages(tenant, session, turn.id)
            .await
            .map_err(|e| AppError::from_store(e, session))
    }

    /// Cancels a running turn, here or on another replica, and waits (at most [`CANCEL_WAIT`])
    /// until it has recorded itself as ended; 409 `turn_finished` if it had already ended.
    pub async fn cancel_and_wait(
        &self,
        tenant: &str,
        session: &str,
        turn_id: Uuid,
    ) -> Result<Turn, AppError> {
        let local = self.registry().cancel(tenant, session, turn_id);
        // A turn running on another replica sees the request at its next lease renewal (≤ 1 s).
        if !local
            && !self
                .store
                .coordinator()
                .request_cancel(tenant, session, turn_id)
                .await
                .map_err(|e| AppError::from_store(e, session))?
        {
            let turn = self.turn(tenant, session, turn_id).await?;
            return Err(AppError::TurnFinished(turn.id));
        }
        // The turn saves its partial text and records itself as cancelled; wait for that, boundedly.
        let deadline = tokio::time::Instant::now() + CANCEL_WAIT;
        loop {
            let turn = self.turn(tenant, session, turn_id).await?;
            if turn.status != TurnStatus::Running || tokio::time::Instant::now() >= deadline {
                return Ok(turn);
            }
            tokio::time::sleep(Duration::from_millis(if local { 5 } else { 50 })).await;
        }
    }
}
