//! The turn event log on Redis: a stream per turn in its session's hash slot, read with `XRANGE`
//! and announced on one pub/sub channel that each replica subscribes to once, on its first
//! follower.
//!
//! One append of several turns is one pipeline: per turn an `XADD` of one entry holding its
//! batch (fields: event id, body; entry id `<last event id>-0`, so that the entries are ordered
//! by the events they end with, trimmed exactly with `MINID`, whole batches at a time) and a
//! `PEXPIRE`, and its id added to its session's set of logged turns (kept as long), then one
//! `PUBLISH` naming every turn. A retried batch that was applied is refused by `XADD` (its id is not above the
//! stream's top) and counts as held; one that grew since is added whole, and the reader skips
//! the events it repeats.

use std::sync::Weak;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_redis::redis;
use futures::StreamExt;
use uuid::Uuid;

use super::RedisStore;
use super::keys::{event_logs_key, events_channel, events_key, events_key_prefix};
use super::pool::Request;
use crate::store::event_log::{
    EventHub, EventWatch, LoggedEvent, MAX_EVENTS_PER_TURN, TurnAppend, TurnEventLog, keep_listening,
};
use crate::store::{LeaseKey, StoreError, StoreResult};

/// What `XADD` answers when the entry's id is not above the stream's top: the batch is held.
const ALREADY_HELD: &str = "equal or smaller";

#[async_trait]
impl TurnEventLog for RedisStore {
    async fn append_events(&self, appends: &[TurnAppend], ttl: Duration) -> StoreResult<()> {
        let appends: Vec<&TurnAppend> = appends.iter().filter(|a| !a.events.is_empty()).collect();
        if appends.is_empty() {
            return Ok(());
        }
        let ttl_ms = super::lease_millis(ttl);
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut announcement = String::with_capacity(appends.len() * 37);
        for append in &appends {
            let turn = &append.turn;
            let key = events_key(&self.prefix, &turn.tenant, &turn.session_id, turn.turn_id);
            let last = append.events.last().map_or(0, |e| e.id);
            let xadd = pipe.cmd("XADD").arg(&key);
            if last > MAX_EVENTS_PER_TURN {
                xadd.arg("MINID").arg(last - MAX_EVENTS_PER_TURN + 1);
            }
            xadd.arg(format!("{last}-0"));
            for event in &append.events {
                xadd.arg(event.id).arg(event.body.as_str());
            }
            pipe.cmd("PEXPIRE").arg(&key).arg(ttl_ms).ignore();
            // Listed with its session (for as long as its log lives), to go with it.
            let logs = event_logs_key(&self.prefix, &turn.tenant, &turn.session_id);
            pipe.cmd("SADD").arg(&logs).arg(turn.turn_id.to_string()).ignore();
            pipe.cmd("PEXPIRE").arg(&logs).arg(ttl_ms).ignore();
            if !announcement.is_empty() {
                announcement.push(',');
            }
            announcement.push_str(&turn.turn_id.to_string());
        }
        pipe.cmd("PUBLISH").arg(events_channel(&self.prefix)).arg(announcement).ignore();
        // Every command repeats harmlessly, so a retry on a fresh connection is too.
        let added: Vec<redis::RedisResult<redis::Value>> = self.run(Request::Pipe(&pipe), true).await?;
        for result in added {
            if let Err(e) = result
                && !e.to_string().contains(ALREADY_HELD)
            {
                return Err(StoreError::Backend(format!("cannot log a turn's events: {e}")));
            }
        }
        Ok(())
    }

    async fn read_events(&self, turn: &LeaseKey, after: u64, limit: usize) -> StoreResult<Vec<LoggedEvent>> {
        let key = events_key(&self.prefix, &turn.tenant, &turn.session_id, turn.turn_id);
        // The entries that end within `limit` events after `after` (the first may begin before
        // it), and the one after them, which may begin within: no more than `limit` events past
        // `after` and one batch are read.
        let (from, upto) = (after.saturating_add(1), after.saturating_add(limit.max(1) as u64));
        let mut pipe = redis::pipe();
        pipe.cmd("XRANGE").arg(&key).arg(from).arg(upto);
        pipe.cmd("XRANGE").arg(&key).arg(upto.saturating_add(1)).arg("+").arg("COUNT").arg(1);
        let (within, next): (Vec<(String, Vec<String>)>, Vec<(String, Vec<String>)>) =
            self.query_pipe(&pipe).await?;
        let entries = within.into_iter().chain(next);
        let mut events: Vec<LoggedEvent> = Vec::new();
        let mut last = after;
        for (_, fields) in entries {
            let mut fields = fields.into_iter();
            while let (Some(id), Some(body)) = (fields.next(), fields.next()) {
                let id: u64 = id
                    .parse()
                    .map_err(|_| StoreError::Backend("unreadable entry in a turn's event log".into()))?;
                // A retried batch that grew repeats events of the entry before it.
                if id > last && events.len() < limit {
                    events.push(LoggedEvent { id, body });
                    last = id;
                }
            }
        }
        Ok(events)
    }

    async fn forget_session(&self, tenant: &str, session_id: &str) -> StoreResult<()> {
        let mut call = self.scripts.forget_event_logs.key(event_logs_key(&self.prefix, tenant, session_id));
        call.arg(events_key_prefix(&self.prefix, tenant, session_id));
        // Harmless to repeat.
        self.run::<i64>(Request::Script(&call), true).await.map(drop)
    }

    fn watch(&self, turn_id: Uuid) -> EventWatch {
        let (client, channel) = (self.pubsub.clone(), events_channel(&self.prefix));
        let timeout = self.op_timeout;
        self.announcements.watch(turn_id, move |hub| listen(client, channel, hub, timeout))
    }
}

/// Subscribes to the announcements and wakes the followers of each announced turn, for as long
/// as the hub lives (see [`keep_listening`]).
async fn listen(client: redis::Client, channel: String, hub: Weak<EventHub>, timeout: Duration) {
    let connect = || async {
        let subscribed = tokio::time::timeout(timeout, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        });
        match subscribed.await {
            Ok(Ok(pubsub)) => Ok(pubsub),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    };
    let drain = |pubsub: redis::aio::PubSub, hub: Weak<EventHub>| async move {
        let mut messages = pubsub.into_on_message();
        while let Some(message) = messages.next().await {
            let Some(hub) = hub.upgrade() else { return };
            if let Ok(turns) = message.get_payload::<String>() {
                hub.notify_announced(&turns);
            }
        }
    };
    keep_listening(hub, connect, drain).await;
}
