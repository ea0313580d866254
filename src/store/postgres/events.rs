//! The turn event log on PostgreSQL: `turn_event_batches` rows (one per turn and append: the
//! batch's bodies, first and last event id) under a `turn_logs` row per turn (which the sweeper
//! deletes once expired), written one statement per append of several turns that also
//! announces them in one `pg_notify` (payload: their ids, comma-separated), on connections of
//! their own, and commits without waiting for the WAL flush (`synchronous_commit` off for that
//! transaction only) (the log is a replay buffer: the
//! history is what is durable, and a follower that finds a gap is told the turn's outcome); each replica `LISTEN`s once, on its first follower, on a connection
//! of its own.

use std::sync::Weak;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::{PgListener, PgPool};
use uuid::Uuid;

use super::PgStore;
use super::sql::{APPEND_EVENTS, FORGET_EVENT_LOGS, READ_EVENTS};
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
        let n = appends.len();
        let (mut turn_ids, mut tenants, mut sessions) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut first_ids, mut last_ids, mut drop_up_to) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut los, mut his) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut bodies: Vec<&str> = Vec::with_capacity(appends.iter().map(|a| a.events.len()).sum());
        for append in &appends {
            let turn = &append.turn;
            let (first, last) = (append.events[0].id, append.events[append.events.len() - 1].id);
            turn_ids.push(turn.turn_id);
            tenants.push(turn.tenant.as_str());
            sessions.push(turn.session_id.as_str());
            first_ids.push(to_i64(first));
            last_ids.push(to_i64(last));
            drop_up_to.push(to_i64(last.saturating_sub(MAX_EVENTS_PER_TURN)));
            los.push(i32::try_from(bodies.len() + 1).unwrap_or(i32::MAX));
            bodies.extend(append.events.iter().map(|e| e.body.as_str()));
            his.push(i32::try_from(bodies.len()).unwrap_or(i32::MAX));
        }
        let query = sqlx::query(APPEND_EVENTS)
            .bind(turn_ids)
            .bind(tenants)
            .bind(sessions)
            .bind(i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX))
            .bind(first_ids)
            .bind(last_ids)
            .bind(drop_up_to)
            .bind(los)
            .bind(his)
            .bind(bodies)
            .bind(&self.events_channel);
        self.timed(query.execute(&self.event_conns)).await.map(drop)
    }

    async fn read_events(&self, turn: &LeaseKey, after: u64, limit: usize) -> StoreResult<Vec<LoggedEvent>> {
        let query = sqlx::query(READ_EVENTS)
            .bind(turn.turn_id)
            .bind(&turn.tenant)
            .bind(&turn.session_id)
            .bind(to_i64(after))
            .bind(to_i64(limit as u64));
        let rows = self.timed(query.fetch_all(&self.conns)).await?;
        let mut events: Vec<LoggedEvent> = Vec::new();
        let mut last = after;
        for row in &rows {
            let first: i64 = row.try_get("first_id").map_err(super::errors::db)?;
            let bodies: Vec<String> = row.try_get("bodies").map_err(super::errors::db)?;
            for (id, body) in (to_u64(first)..).zip(bodies) {
                // A retried batch that grew repeats events of the batch before it.
                if id > last && events.len() < limit {
                    events.push(LoggedEvent { id, body });
                    last = id;
                }
            }
        }
        Ok(events)
    }

    async fn forget_session(&self, tenant: &str, session_id: &str) -> StoreResult<()> {
        let query = sqlx::query(FORGET_EVENT_LOGS).bind(tenant).bind(session_id);
        self.timed(query.execute(&self.conns)).await.map(drop)
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
