//! The turn event log: every event of a running turn, kept in the store with its event id, so
//! that any replica can serve any turn's stream, live, from any event id.
//!
//! The replica running a turn appends its events in batches (one round trip per batch, however
//! many deltas came meanwhile); a follower on any replica reads what is logged after the last
//! event it sent, then waits to be woken ([`TurnEventLog::watch`]) when more is appended. Each
//! backend wakes followers with what it has (Redis pub/sub, PostgreSQL `LISTEN/NOTIFY`), routed
//! inside the process by an [`EventHub`]; no follower polls the store in a loop.
//!
//! The stores that serve one process (memory, SQLite) have no log: a turn's in-process feed
//! is all there is, and every stream is served by the process running the turn.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use uuid::Uuid;

use super::{LeaseKey, StoreResult};

/// Events kept per turn at most: a longer turn drops its oldest events from the log (a follower
/// that needs them waits for the turn's end instead and is told its outcome).
pub const MAX_EVENTS_PER_TURN: u64 = 50_000;

/// Turns in one [`TurnEventLog::append_events`] at most (an announcement naming them all stays
/// well within PostgreSQL's 8,000-byte `NOTIFY` payload).
pub const MAX_TURNS_PER_APPEND: usize = 128;

/// One logged event: its id within the turn (1, 2, 3…) and its encoded form (opaque to the store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEvent {
    /// The event id: consecutive from 1 within the turn.
    pub id: u64,
    /// The event as the agent encoded it.
    pub body: String,
}

/// One turn's events to append: ids consecutive, in order, after those appended before for the
/// turn (a retry after an unknown outcome may repeat some of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnAppend {
    /// The turn (and its session and tenant, which scope its log).
    pub turn: LeaseKey,
    /// The events, at least one.
    pub events: Vec<LoggedEvent>,
}

/// The log of every running turn's events, shared by the replicas.
///
/// Contract (pinned by `contract::events`): appends of one turn come with consecutive ids in
/// order and are read back in id order; events appended twice (a batch retried after an unknown
/// outcome) are kept once; a read after `after` returns the events with greater ids, at most
/// `limit`; an append wakes every [`TurnEventLog::watch`] of that turn on every replica; a turn's
/// log goes `ttl` after its last append, or when its session is forgotten; each turn's log is bounded by [`MAX_EVENTS_PER_TURN`]
/// (the oldest go first).
#[async_trait]
pub trait TurnEventLog: Send + Sync + 'static {
    /// Appends batches of events of several turns (each turn at most once, at most
    /// [`MAX_TURNS_PER_APPEND`]), in one round trip
    /// where the backend allows it: a replica writes what all its running turns produced since its
    /// last append at once. Keeps each turn's log for `ttl` from now, then wakes the turns'
    /// followers. On an error, any part may have been applied: the caller retries the batches.
    async fn append_events(&self, appends: &[TurnAppend], ttl: Duration) -> StoreResult<()>;

    /// The turn's logged events with ids greater than `after`, at most `limit`, in id order.
    async fn read_events(&self, turn: &LeaseKey, after: u64, limit: usize) -> StoreResult<Vec<LoggedEvent>>;

    /// Drops the logs of every turn of a session (it was deleted, or its history cleared): what
    /// they hold of its messages goes with them, not `ttl` later.
    async fn forget_session(&self, tenant: &str, session_id: &str) -> StoreResult<()>;

    /// Wakes whenever events of `turn_id` are appended, by any replica. Take it before reading,
    /// so that nothing appended after the read goes unnoticed.
    fn watch(&self, turn_id: Uuid) -> EventWatch;
}

/// Routes "events of turn T were appended" to the followers of T in this process, numbering the
/// announcements (see [`EventWatch::generation`]).
#[derive(Debug, Default)]
pub struct EventHub {
    /// Each followed turn's watch, holding the number of the last announcement that named it (or
    /// the count when it was first watched).
    turns: Mutex<HashMap<Uuid, watch::Sender<u64>>>,
    /// Announcements received so far (every wake-up counts one), kept under the `turns` lock.
    announced: std::sync::atomic::AtomicU64,
}

impl EventHub {
    /// A new hub with no followers.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    fn turns(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, watch::Sender<u64>>> {
        self.turns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next announcement's number (under the `turns` lock).
    fn next_announcement(&self) -> u64 {
        self.announced.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
    }

    /// A watch of one turn's appends.
    pub fn watch(self: &Arc<Self>, turn_id: Uuid) -> EventWatch {
        let mut turns = self.turns();
        let now = self.announced.load(std::sync::atomic::Ordering::Relaxed);
        let rx = turns.entry(turn_id).or_insert_with(|| watch::Sender::new(now)).subscribe();
        EventWatch { hub: Some(Arc::clone(self)), turn_id, rx: Some(rx) }
    }

    /// Wakes the followers of `turn_id`, if any follow it here.
    pub fn notify(&self, turn_id: Uuid) {
        let turns = self.turns();
        if let Some(tx) = turns.get(&turn_id) {
            tx.send_replace(self.next_announcement());
        }
    }

    /// Wakes the followers of each turn an announcement names: turn ids separated by commas
    /// (what one append of several turns announces). Anything else in it is ignored.
    pub fn notify_announced(&self, announcement: &str) {
        let turns = self.turns();
        if turns.is_empty() {
            return;
        }
        let number = self.next_announcement();
        for id in announcement.split(',') {
            if let Some(tx) = Uuid::parse_str(id).ok().and_then(|turn| turns.get(&turn)) {
                tx.send_replace(number);
            }
        }
    }

    /// Wakes every follower (after the notification channel was lost and found again: what was
    /// appended meanwhile went unannounced).
    pub fn notify_all(&self) {
        let turns = self.turns();
        let number = self.next_announcement();
        for tx in turns.values() {
            tx.send_replace(number);
        }
    }

    /// The number of the last announcement received: a read of the log started now sees what
    /// every announcement so far announced.
    pub fn announced(&self) -> u64 {
        let _turns = self.turns();
        self.announced.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many turns are followed here.
    pub fn followed(&self) -> usize {
        self.turns().len()
    }
}

/// A backend's announcements of appends, as this process receives them: the hub that routes them
/// to followers, and the task that listens (started with the first follower, stopped with this).
#[derive(Debug, Default)]
pub struct Announcements {
    hub: Arc<EventHub>,
    started: std::sync::OnceLock<()>,
    stop: tokio_util::sync::CancellationToken,
}

impl Announcements {
    /// No listener yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A watch of one turn's appends; the first one starts `listen` (given the hub to feed, which
    /// it must stop feeding once the hub is gone), as a task that ends when `self` is dropped.
    pub fn watch<Fut>(
        &self,
        turn_id: Uuid,
        listen: impl FnOnce(std::sync::Weak<EventHub>) -> Fut,
    ) -> EventWatch
    where
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.started.get_or_init(|| {
            let task = listen(Arc::downgrade(&self.hub));
            let stop = self.stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = task => {}
                    () = stop.cancelled() => {}
                }
            });
        });
        self.hub.watch(turn_id)
    }
}

impl Drop for Announcements {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Keeps a backend's announcement channel open for as long as `hub` lives: `connect` opens it
/// (listening; `Err` says why it could not), `drain` feeds the hub from it until the connection
/// ends. Between failed attempts it waits 50 ms, doubling up to a second, and warns once per
/// outage; after each (re)connection every follower is woken, since what was appended while the
/// channel was down went unannounced.
pub async fn keep_listening<C, Connecting, Draining>(
    hub: std::sync::Weak<EventHub>,
    mut connect: impl FnMut() -> Connecting,
    mut drain: impl FnMut(C, std::sync::Weak<EventHub>) -> Draining,
) where
    Connecting: std::future::Future<Output = Result<C, String>>,
    Draining: std::future::Future<Output = ()>,
{
    const FIRST_PAUSE: Duration = Duration::from_millis(50);
    let mut pause = FIRST_PAUSE;
    let mut warned = false;
    loop {
        match connect().await {
            Ok(channel) => {
                pause = FIRST_PAUSE;
                warned = false;
                let Some(live) = hub.upgrade() else { return };
                live.notify_all();
                drop(live);
                drain(channel, hub.clone()).await;
            }
            Err(why) => {
                if !std::mem::replace(&mut warned, true) {
                    tracing::warn!(error = %why, "cannot listen for the turn event announcements; retrying");
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
        if hub.strong_count() == 0 {
            return;
        }
    }
}

/// A follower's wake-up for one turn; dropping the last one of a turn forgets the turn.
#[derive(Debug)]
pub struct EventWatch {
    hub: Option<Arc<EventHub>>,
    turn_id: Uuid,
    rx: Option<watch::Receiver<u64>>,
}

impl EventWatch {
    /// A watch that never wakes (a log without notifications).
    pub fn never() -> Self {
        EventWatch { hub: None, turn_id: Uuid::nil(), rx: None }
    }

    /// The number of the last announcement that named the turn (or of the last one before the
    /// turn was first watched here): a read of the log that started once the hub had received
    /// that many announcements ([`EventHub::announced`]) sees everything this watch was woken
    /// for. `None` for a watch that never wakes.
    pub fn generation(&self) -> Option<u64> {
        self.rx.as_ref().map(|rx| *rx.borrow())
    }

    /// The hub's count of announcements now ([`EventHub::announced`]); `None` without a hub.
    pub fn announced(&self) -> Option<u64> {
        self.hub.as_ref().map(|hub| hub.announced())
    }

    /// Waits until events are appended after the last wake-up (at once if they were meanwhile).
    pub async fn changed(&mut self) {
        match self.rx.as_mut() {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending::<()>().await,
        }
    }
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        drop(self.rx.take());
        if let Some(hub) = &self.hub {
            let mut turns = hub.turns();
            if turns.get(&self.turn_id).is_some_and(|tx| tx.receiver_count() == 0) {
                turns.remove(&self.turn_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_notification_wakes_the_turns_watchers_and_the_last_drop_forgets_it() {
        let hub = EventHub::new();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let mut first = hub.watch(a);
        let mut second = hub.watch(a);
        let mut other = hub.watch(b);
        assert_eq!(other.generation(), Some(0), "no announcement yet");
        hub.notify(a);
        assert_eq!(first.generation(), Some(hub.announced()), "numbered by the announcement that woke it");
        assert_eq!(other.generation(), Some(0), "another turn's is unchanged");
        tokio::time::timeout(Duration::from_secs(1), first.changed()).await.expect("woken");
        tokio::time::timeout(Duration::from_secs(1), second.changed()).await.expect("woken");
        let quiet = tokio::time::timeout(Duration::from_millis(20), other.changed()).await;
        assert!(quiet.is_err(), "another turn's watcher sleeps on");
        hub.notify_all();
        tokio::time::timeout(Duration::from_secs(1), other.changed()).await.expect("woken by all");
        drop(first);
        assert_eq!(hub.followed(), 2);
        drop(second);
        assert_eq!(hub.followed(), 1, "the last watcher of a turn forgets it");
        drop(other);
        assert_eq!(hub.followed(), 0);
    }
}
