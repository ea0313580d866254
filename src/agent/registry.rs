//! The turns running in this process: one per session at a time, each cancellable, all tracked so
//! that shutdown can wait for them and then cancel the rest.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::feed::TurnFeed;
use crate::store::LeaseKey;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// (tenant, session).
type SessionKey = (String, String);

/// Running turns by tenant, then session (the turns of one shard).
type Running = foldhash::HashMap<String, foldhash::HashMap<String, RunningTurn>>;

/// How many locks the running turns are spread over. Every turn takes its shard's lock three
/// times; with one lock for all, a worker thread preempted while holding it stalled every other
/// worker's turns for a scheduler tick (bench/README.md).
const SHARDS: usize = 64;

/// Turns waiting for one session; tokio's mutex is fair, so they go in arrival order.
type WaitQueue = Arc<tokio::sync::Mutex<()>>;

/// Registry of running turns.
#[derive(Debug)]
pub struct TurnRegistry {
    /// Running turns by tenant, then session (looked up by `&str`, without building a key),
    /// spread over `SHARDS` locks by (tenant, session).
    running: Box<[Mutex<Running>]>,
    /// Every turn task, for graceful shutdown.
    tracker: TaskTracker,
    /// Set once shutdown begins: no new turns.
    closed: AtomicBool,
    /// Per-session queues of turns waiting for a busy session, in arrival order.
    queues: Mutex<HashMap<SessionKey, WaitQueue>>,
}

#[derive(Debug, Clone)]
struct RunningTurn {
    turn_id: Uuid,
    /// Its tokens: a cancel request, and the loss of its lock.
    tokens: TurnTokens,
    /// Its events, when they are kept.
    feed: Option<Arc<TurnFeed>>,
    /// Whether it holds the store's lock (from [`TurnRegistry::started`] on): only then is its
    /// lease renewed.
    claimed: bool,
    /// When its lease was last known to be extended (the claim, or a renewal's request); once
    /// longer ago than the lease, the lock may be another turn's.
    renewed: Instant,
}

/// What stops a running turn early.
#[derive(Debug, Clone, Default)]
pub struct TurnTokens {
    /// Someone asked for the turn to stop (it saves what it has).
    pub cancel: CancellationToken,
    /// The turn lost its session lock (its lease ran out): it stops and saves nothing more.
    pub lost: CancellationToken,
}

/// The turns whose leases the keeper renews, and what each needs (same order).
#[derive(Debug, Default)]
pub struct LeasedTurns {
    /// Which turns.
    pub keys: Vec<LeaseKey>,
    /// What cancels each.
    pub cancels: Vec<CancellationToken>,
    /// When each lease was last known to be extended.
    pub renewed: Vec<Instant>,
}

/// Why a turn could not be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterError {
    /// Another turn is running in the session.
    Busy(Uuid),
    /// The service is shutting down.
    Closed,
}

impl Default for TurnRegistry {
    fn default() -> Self {
        TurnRegistry {
            running: (0..SHARDS).map(|_| Mutex::default()).collect(),
            tracker: TaskTracker::new(),
            closed: AtomicBool::new(false),
            queues: Mutex::default(),
        }
    }
}

impl TurnRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The shard of a session's running turn, locked. A panic while holding it leaves the map
    /// consistent (nothing panics mid-update), so a poisoned lock is used as is.
    fn lock(&self, tenant: &str, session: &str) -> std::sync::MutexGuard<'_, Running> {
        use std::hash::BuildHasher;
        let hash = foldhash::fast::FixedState::with_seed(0).hash_one((tenant, session));
        self.running[(hash % SHARDS as u64) as usize].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every shard in turn, locked one at a time.
    fn each_shard(&self) -> impl Iterator<Item = std::sync::MutexGuard<'_, Running>> {
        self.running.iter().map(|shard| shard.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The turn running in a session, to read or change under the lock.
    fn with_turn<T>(&self, tenant: &str, session: &str, f: impl FnOnce(&mut RunningTurn) -> T) -> Option<T> {
        self.lock(tenant, session).get_mut(tenant).and_then(|t| t.get_mut(session)).map(f)
    }

    /// Registers a turn; fails if the session already runs one or shutdown has begun.
    pub fn register(&self, tenant: &str, session: &str, turn_id: Uuid) -> Result<TurnTokens, RegisterError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(RegisterError::Closed);
        }
        let mut running = self.lock(tenant, session);
        if !running.contains_key(tenant) {
            running.insert(tenant.to_owned(), Default::default());
        }
        let sessions = running.get_mut(tenant).expect("inserted above");
        if let Some(existing) = sessions.get(session) {
            return Err(RegisterError::Busy(existing.turn_id));
        }
        let tokens = TurnTokens::default();
        let turn = RunningTurn {
            turn_id,
            tokens: tokens.clone(),
            feed: None,
            claimed: false,
            renewed: Instant::now(),
        };
        sessions.insert(session.to_owned(), turn);
        Ok(tokens)
    }

    /// The queue of turns waiting for this session (tokio's mutex is fair: first come, first served).
    pub fn queue(&self, tenant: &str, session: &str) -> WaitQueue {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(queues.entry((tenant.to_owned(), session.to_owned())).or_default())
    }

    /// Drops a session's queue once nobody waits in it.
    pub fn forget_queue(&self, tenant: &str, session: &str) {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let key = (tenant.to_owned(), session.to_owned());
        if queues.get(&key).is_some_and(|q| Arc::strong_count(q) == 1) {
            queues.remove(&key);
        }
    }

    /// Removes a finished turn.
    pub fn finish(&self, tenant: &str, session: &str, turn_id: Uuid) {
        let mut running = self.lock(tenant, session);
        if let Some(sessions) = running.get_mut(tenant)
            && sessions.get(session).is_some_and(|r| r.turn_id == turn_id)
        {
            sessions.remove(session);
        }
    }

    /// Records that a registered turn holds the store's lock, and where its events go.
    pub fn started(&self, tenant: &str, session: &str, turn_id: Uuid, feed: Option<Arc<TurnFeed>>) {
        self.with_turn(tenant, session, |r| {
            if r.turn_id == turn_id {
                r.feed = feed;
                r.claimed = true;
                r.renewed = Instant::now();
            }
        });
    }

    /// The turns holding the store's lock, for the lease keeper.
    pub fn leased(&self) -> LeasedTurns {
        let mut leased = LeasedTurns::default();
        for running in self.each_shard() {
            for (tenant, sessions) in running.iter() {
                for (session, r) in sessions.iter().filter(|(_, r)| r.claimed) {
                    let key =
                        LeaseKey { tenant: tenant.clone(), session_id: session.clone(), turn_id: r.turn_id };
                    leased.keys.push(key);
                    leased.cancels.push(r.tokens.cancel.clone());
                    leased.renewed.push(r.renewed);
                }
            }
        }
        leased
    }

    /// Notes that a running turn lost its lock, which stops it; true the first time (to warn
    /// once), false if noted before or if the turn is not running here any more (it just ended).
    pub fn note_lost(&self, tenant: &str, session: &str, turn_id: Uuid) -> bool {
        self.with_turn(tenant, session, |r| {
            let first = r.turn_id == turn_id && !r.tokens.lost.is_cancelled();
            if first {
                r.tokens.lost.cancel();
            }
            first
        })
        .unwrap_or(false)
    }

    /// Notes that a running turn's lease was extended by a renewal sent at `at`.
    pub fn note_renewed(&self, tenant: &str, session: &str, turn_id: Uuid, at: Instant) {
        self.with_turn(tenant, session, |r| {
            if r.turn_id == turn_id {
                r.renewed = at;
            }
        });
    }

    /// The events of a turn running here, if they are kept.
    pub fn feed(&self, tenant: &str, session: &str, turn_id: Uuid) -> Option<Arc<TurnFeed>> {
        self.with_turn(tenant, session, |r| if r.turn_id == turn_id { r.feed.clone() } else { None })
            .flatten()
    }

    /// The turn running in a session, if any.
    pub fn running_in(&self, tenant: &str, session: &str) -> Option<Uuid> {
        self.with_turn(tenant, session, |r| r.turn_id)
    }

    /// Cancels a running turn; false if it is not running here.
    pub fn cancel(&self, tenant: &str, session: &str, turn_id: Uuid) -> bool {
        self.with_turn(tenant, session, |r| {
            if r.turn_id == turn_id {
                r.tokens.cancel.cancel();
            }
            r.turn_id == turn_id
        })
        .unwrap_or(false)
    }

    /// The tracker turn tasks are spawned on.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Whether shutdown has begun.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Stops new turns, waits up to `grace` for running ones, then cancels the rest (they save
    /// their partial text) and waits for them to finish saving.
    pub async fn shutdown(&self, grace: Duration) {
        self.closed.store(true, Ordering::SeqCst);
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_ok() {
            return;
        }
        let running: Vec<RunningTurn> = self
            .each_shard()
            .flat_map(|shard| shard.values().flat_map(|s| s.values().cloned()).collect::<Vec<_>>())
            .collect();
        tracing::warn!(turns = running.len(), "grace period over: cancelling running turns");
        for turn in running {
            turn.tokens.cancel.cancel();
        }
        self.tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_turn_per_session_and_tenant() {
        let r = TurnRegistry::new();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        r.register("t", "s", a).unwrap();
        assert_eq!(r.register("t", "s", b).err(), Some(RegisterError::Busy(a)));
        assert!(r.register("t2", "s", b).is_ok(), "another tenant's session is another session");
        assert!(r.register("t", "s2", b).is_ok());
        r.finish("t", "s", a);
        assert!(r.register("t", "s", b).is_ok());
    }

    #[test]
    fn cancel_reaches_only_the_named_turn() {
        let r = TurnRegistry::new();
        let a = Uuid::now_v7();
        let tokens = r.register("t", "s", a).unwrap();
        assert!(!r.cancel("t", "s", Uuid::now_v7()));
        assert!(!tokens.cancel.is_cancelled());
        assert!(r.cancel("t", "s", a));
        assert!(tokens.cancel.is_cancelled());
        assert!(!tokens.lost.is_cancelled(), "a cancel is not a lost lock");
        assert!(r.note_lost("t", "s", a));
        assert!(tokens.lost.is_cancelled());
        assert!(!r.note_lost("t", "s", a), "noted once");
    }

    #[test]
    fn every_shard_is_seen_by_the_lease_keeper() {
        let r = TurnRegistry::new();
        let mut claimed: Vec<(String, Uuid)> = Vec::new();
        for i in 0..200 {
            let (session, id) = (format!("s{i}"), Uuid::now_v7());
            r.register("t", &session, id).unwrap();
            // Only turns that hold the store's lock have leases to renew.
            if i % 2 == 0 {
                r.started("t", &session, id, None);
                claimed.push((session, id));
            }
        }
        let leased = r.leased();
        let mut got: Vec<(String, Uuid)> =
            leased.keys.iter().map(|k| (k.session_id.clone(), k.turn_id)).collect();
        got.sort();
        claimed.sort();
        assert_eq!(got, claimed);
        assert_eq!(leased.cancels.len(), 100);
        r.finish("t", "s0", claimed.iter().find(|(s, _)| s == "s0").unwrap().1);
        assert_eq!(r.leased().keys.len(), 99);
        assert_eq!(r.running_in("t", "s0"), None);
    }

    #[tokio::test]
    async fn shutdown_refuses_new_turns() {
        let r = TurnRegistry::new();
        r.shutdown(Duration::from_millis(10)).await;
        assert_eq!(r.register("t", "s", Uuid::now_v7()).err(), Some(RegisterError::Closed));
    }
}
