//! The turn event log on Redis: a stream per turn in its session's hash slot (`XADD` by one
//! script per batch, which skips events a retried batch already added), read with `XRANGE`, and
//! announced on one pub/sub channel that each replica subscribes to once, on its first follower.

use std::sync::Weak;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_redis::redis;
use futures::StreamExt;
use uuid::Uuid;

use super::RedisStore;
use super::keys::{events_channel, events_key};
use super::pool::Request;
use crate::store::event_log::{
    EventHub, EventWatch, LoggedEvent, MAX_EVENTS_PER_TURN, TurnEventLog, keep_listening,
};
use crate::store::{LeaseKey, StoreError, StoreResult};

#[async_trait]
impl TurnEventLog for RedisStore {
    async fn append_events(&self, turn: &LeaseKey, events: &[LoggedEvent], ttl: Duration) -> StoreResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        let key = events_key(&self.prefix, &turn.tenant, &turn.session_id, turn.turn_id);
        let mut call = self.scripts.append_events.key(key);
        call.arg(ttl.as_millis().max(1) as u64)
            .arg(MAX_EVENTS_PER_TURN)
            .arg(events_channel(&self.prefix))
            .arg(turn.turn_id.to_string());
        for event in events {
            call.arg(event.id).arg(event.body.as_str());
        }
        // The script skips what it already holds, so a retry on a fresh connection is harmless.
        self.run::<i64>(Request::Script(&call), true).await.map(drop)
    }

    async fn read_events(&self, turn: &LeaseKey, after: u64, limit: usize) -> StoreResult<Vec<LoggedEvent>> {
        let key = events_key(&self.prefix, &turn.tenant, &turn.session_id, turn.turn_id);
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(key).arg(format!("0-{}", after.saturating_add(1))).arg("+").arg("COUNT").arg(limit.max(1));
        let entries: Vec<(String, Vec<String>)> = self.query(&cmd).await?;
        entries
            .into_iter()
            .map(|(id, mut fields)| {
                let id = id.strip_prefix("0-").and_then(|n| n.parse().ok());
                match (id, fields.len()) {
                    (Some(id), 2) => Ok(LoggedEvent { id, body: fields.swap_remove(1) }),
                    _ => Err(StoreError::Backend("unreadable entry in a turn's event log".into())),
                }
            })
            .collect()
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
            let turn = message.get_payload::<String>().ok().and_then(|p| Uuid::parse_str(&p).ok());
            if let Some(turn) = turn {
                hub.notify(turn);
            }
        }
    };
    keep_listening(hub, connect, drain).await;
}
