//! Turn coordination in this process only, for a history store kept elsewhere
//! (`PARLEY_COORDINATOR=memory`): one replica, nothing survives a restart (`is_distributed()` is
//! false). What a custom history store pairs with to run turns without a lock service.
//!
//! Each session with a lock or a key has an entry in one of a few maps, spread by (tenant,
//! session) over `std::sync` mutexes held for in-memory work only. An entry goes once its lock and
//! its keys are gone: a lock when released or when its lease has run out (found so by the next
//! call), keys when aborted or expired ([`MemoryCoordinator::purge_expired`] sweeps the rest).

use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use foldhash::{HashMap, HashMapExt};
use uuid::Uuid;

use super::{
    IdempotencyBegin, IdempotencyRecord, LockOutcome, LockStatus, StoreBackend, StoreResult, TurnCoordinator,
};

/// How many mutexes the sessions are spread over.
const SHARDS: usize = 16;

/// The coordination of one session.
#[derive(Debug, Default)]
struct Entry {
    lock: Option<Held>,
    keys: HashMap<String, (IdempotencyRecord, Instant)>,
}

#[derive(Debug, Clone, Copy)]
struct Held {
    turn_id: Uuid,
    expires: Instant,
    cancel_requested: bool,
}

impl Entry {
    /// The live lock, dropping one whose lease ran out.
    fn live_lock(&mut self) -> Option<&mut Held> {
        if self.lock.is_some_and(|l| l.expires <= Instant::now()) {
            self.lock = None;
        }
        self.lock.as_mut()
    }

    fn live_key(&mut self, key: &str) -> Option<&mut (IdempotencyRecord, Instant)> {
        if self.keys.get(key).is_some_and(|(_, until)| *until <= Instant::now()) {
            self.keys.remove(key);
        }
        self.keys.get_mut(key)
    }

    fn is_empty(&self) -> bool {
        self.lock.is_none() && self.keys.is_empty()
    }
}

type Shard = HashMap<(String, String), Entry>;

/// Turn locks, cancel flags and idempotency keys in this process.
#[derive(Debug)]
pub struct MemoryCoordinator {
    shards: Box<[Mutex<Shard>]>,
}

impl Default for MemoryCoordinator {
    fn default() -> Self {
        MemoryCoordinator { shards: (0..SHARDS).map(|_| Mutex::new(Shard::new())).collect() }
    }
}

impl MemoryCoordinator {
    /// An empty coordinator.
    pub fn new() -> Self {
        Self::default()
    }

    fn shard(&self, tenant: &str, session: &str) -> MutexGuard<'_, Shard> {
        let mut hasher = std::hash::DefaultHasher::new();
        (tenant, session).hash(&mut hasher);
        let shard = &self.shards[(hasher.finish() % SHARDS as u64) as usize];
        // Every change is complete before anything can panic: a poisoned map is used as is.
        shard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the session's entry (made if missing), dropping the entry if it ends empty.
    fn with<T>(&self, tenant: &str, session: &str, f: impl FnOnce(&mut Entry) -> T) -> T {
        let mut shard = self.shard(tenant, session);
        let key = (tenant.to_owned(), session.to_owned());
        let entry = shard.entry(key.clone()).or_default();
        let out = f(entry);
        if entry.is_empty() {
            shard.remove(&key);
        }
        out
    }

    /// Forgets expired keys and locks; returns how many sessions lost their entry.
    pub fn purge_expired(&self) -> usize {
        let now = Instant::now();
        let mut purged = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            let before = shard.len();
            shard.retain(|_, e| {
                e.keys.retain(|_, (_, until)| *until > now);
                if e.lock.is_some_and(|l| l.expires <= now) {
                    e.lock = None;
                }
                !e.is_empty()
            });
            purged += before - shard.len();
        }
        purged
    }

    /// Runs [`MemoryCoordinator::purge_expired`] every `every` while the coordinator lives.
    pub fn spawn_purger(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(this) = this.upgrade() else { return };
                this.purge_expired();
            }
        })
    }
}

#[async_trait]
impl StoreBackend for MemoryCoordinator {
    fn backend(&self) -> &'static str {
        "memory"
    }

    fn is_distributed(&self) -> bool {
        false
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }
}

#[async_trait]
impl TurnCoordinator for MemoryCoordinator {
    async fn acquire_turn_lock(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<LockOutcome> {
        Ok(self.with(tenant, session_id, |e| match e.live_lock() {
            Some(held) if held.turn_id != turn_id => LockOutcome::Busy(held.turn_id),
            held => {
                // Claiming again keeps a pending cancel request, so none is lost.
                let cancel_requested = held.is_some_and(|h| h.cancel_requested);
                e.lock = Some(Held { turn_id, expires: Instant::now() + lease, cancel_requested });
                LockOutcome::Acquired
            }
        }))
    }

    async fn renew_turn_lock(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<LockStatus> {
        Ok(self.with(tenant, session_id, |e| match e.live_lock() {
            Some(held) if held.turn_id == turn_id => {
                held.expires = Instant::now() + lease;
                LockStatus { held: true, cancel_requested: held.cancel_requested }
            }
            _ => LockStatus { held: false, cancel_requested: false },
        }))
    }

    async fn release_turn_lock(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<()> {
        self.with(tenant, session_id, |e| {
            if e.lock.is_some_and(|l| l.turn_id == turn_id) {
                e.lock = None;
            }
        });
        Ok(())
    }

    async fn turn_lock_holder(&self, tenant: &str, session_id: &str) -> StoreResult<Option<Uuid>> {
        Ok(self.with(tenant, session_id, |e| e.live_lock().map(|l| l.turn_id)))
    }

    async fn request_cancel(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<bool> {
        Ok(self.with(tenant, session_id, |e| match e.live_lock() {
            Some(held) if held.turn_id == turn_id => {
                held.cancel_requested = true;
                true
            }
            _ => false,
        }))
    }

    async fn begin_idempotent(
        &self,
        tenant: &str,
        session_id: &str,
        key: &str,
        fingerprint: &str,
        turn_id: Uuid,
        ttl: Duration,
    ) -> StoreResult<IdempotencyBegin> {
        Ok(self.with(tenant, session_id, |e| {
            if let Some((existing, _)) = e.live_key(key) {
                return IdempotencyBegin::Existing(existing.clone());
            }
            let record = IdempotencyRecord { fingerprint: fingerprint.to_owned(), turn_id, response: None };
            e.keys.insert(key.to_owned(), (record, Instant::now() + ttl));
            IdempotencyBegin::Started
        }))
    }

    async fn complete_idempotent(
        &self,
        tenant: &str,
        session_id: &str,
        key: &str,
        response: &serde_json::Value,
        ttl: Duration,
    ) -> StoreResult<()> {
        self.with(tenant, session_id, |e| {
            if let Some((record, until)) = e.live_key(key) {
                record.response = Some(response.clone());
                *until = Instant::now() + ttl;
            }
        });
        Ok(())
    }

    async fn abort_idempotent(&self, tenant: &str, session_id: &str, key: &str) -> StoreResult<()> {
        self.with(tenant, session_id, |e| e.keys.remove(key));
        Ok(())
    }
}
