//! The turn event log on PostgreSQL: `turn_events` rows under a `turn_logs` row per turn (which
//! the sweeper deletes once expired), written one statement per append of several turns that
//! also announces them in one `pg_notify` (payload: their ids, comma-separated); each replica `LISTEN`s once, on its first follower, on a connection
//! of its own.

use std::sync::Weak;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::{PgListener, PgPool};
use uuid::Uuid;

use super::PgStore;
use super::sql::{APPEND_EVENTS, READ_EVENTS};
use crate::store::event_log::{
    EventHub, EventWatch, LoggedEvent, MAX_EVENTS_PER_TURN, TurnAppend, TurnEventLog, keep_listening,
};
use crate::store::sql_common::{to_i64, to_u64};
use crate::store::{LeaseKey, StoreResult};

/// The notification channel of a store in `schema` (channels are per database, not per schema).
pub(super) fn channel(schema: Option<&str>) -> String {
    let mut channel = match schema {
        Some(schema) => format!("parley_events_{schema}"),
        None => "parley_events".to_owned(),
    };
    // PostgreSQL truncates identifiers to 63 bytes; LISTEN must name what NOTIFY sends to.
    channel.truncate(63);
    channel
}

#[async_trait]
impl TurnEventLog for PgStore {
    async fn append_events(&self, appends: &[TurnAppend], ttl: Duration) -> StoreResult<()> {
        let appends: Vec<&TurnAppend> = appends.iter().filter(|a| !a.events.is_empty()).collect();
        if appends.is_empty() {
            return Ok(());
        }
        let events = appends.iter().map(|a| a.events.len()).sum();
        let (mut turn_ids, mut tenants, mut sessions, mut drop_up_to) = (vec![], vec![], vec![], vec![]);
        let (mut event_turns, mut ids, mut bodies) =
            (Vec::with_capacity(events), Vec::with_capacity(events), Vec::with_capacity(events));
        for append in &appends {
            let turn = &append.turn;
            turn_ids.push(turn.turn_id);
            tenants.push(turn.tenant.as_str());
            sessions.push(turn.session_id.as_str());
            let last = append.events.last().map_or(0, |e| e.id);
            drop_up_to.push(to_i64(last.saturating_sub(MAX_EVENTS_PER_TURN)));
            for event in &append.events {
                event_turns.push(turn.turn_id);
                ids.push(to_i64(event.id));
                bodies.push(event.body.as_str());
            }
        }
        let query = sqlx::query(APPEND_EVENTS)
            .bind(turn_ids)
            .bind(tenants)
            .bind(sessions)
            .bind(i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX))
            .bind(drop_up_to)
            .bind(event_turns)
            .bind(ids)
            .bind(bodies)
            .bind(&self.events_channel);
        self.timed(query.execute(&self.conns)).await.map(drop)
    }

    async fn read_events(&self, turn: &LeaseKey, after: u64, limit: usize) -> StoreResult<Vec<LoggedEvent>> {
        let query = sqlx::query(READ_EVENTS)
            .bind(turn.turn_id)
            .bind(&turn.tenant)
            .bind(&turn.session_id)
            .bind(to_i64(after))
            .bind(to_i64(limit as u64));
        let rows = self.timed(query.fetch_all(&self.conns)).await?;
        rows.iter()
            .map(|row| {
                let id: i64 = row.try_get("id").map_err(super::errors::db)?;
                let body: String = row.try_get("body").map_err(super::errors::db)?;
                Ok(LoggedEvent { id: to_u64(id), body })
            })
            .collect()
    }

    fn watch(&self, turn_id: Uuid) -> EventWatch {
        let (pool, channel) = (self.listen_pool.clone(), self.events_channel.clone());
        self.announcements.watch(turn_id, move |hub| listen(pool, channel, hub))
    }
}

/// Listens for the announcements and wakes the followers of each announced turn, for as long as
/// the hub lives (see [`keep_listening`]).
async fn listen(pool: PgPool, channel: String, hub: Weak<EventHub>) {
    let connect = || async {
        let mut listener = PgListener::connect_with(&pool).await.map_err(|e| e.to_string())?;
        listener.listen(&channel).await.map_err(|e| e.to_string())?;
        Ok(listener)
    };
    let drain = |mut listener: PgListener, hub: Weak<EventHub>| async move {
        // `None`: the connection was lost; listen again on a new one.
        while let Ok(Some(notification)) = listener.try_recv().await {
            let Some(hub) = hub.upgrade() else { return };
            hub.notify_announced(notification.payload());
        }
    };
    keep_listening(hub, connect, drain).await;
}
