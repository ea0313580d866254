//! Redis coordinating the turns of another history store (`PARLEY_COORDINATOR=redis`): the turn
//! locks, cancel flags and idempotency keys of [`RedisStore`], with the same keys, scripts and
//! one round trip per call, minus the check that the session exists in Redis (it lives in the
//! history store; the agent asks there first).
//!
//! Nothing here is deleted with a session: a lock goes when its lease runs out (at most
//! `PARLEY_TURN_LEASE` after its turn stopped renewing it), and a session's idempotency keys when
//! the last of them expires.

use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use super::{RedisOptions, RedisStore};
use crate::store::{
    IdempotencyBegin, LeaseKey, LockOutcome, LockStatus, StoreBackend, StoreError, StoreResult,
    TurnCoordinator,
};

/// A [`TurnCoordinator`] on Redis for a history store kept elsewhere.
#[derive(Debug)]
pub struct RedisCoordinator {
    inner: RedisStore,
}

impl RedisCoordinator {
    /// A coordinator over a lazily connected pool (no I/O here); fails only on an invalid URL or
    /// prefix. `max_messages` and `ttl` of the options are not used.
    pub fn new(opts: RedisOptions) -> Result<Self, StoreError> {
        let mut inner = RedisStore::new(opts)?;
        inner.standalone = true;
        Ok(RedisCoordinator { inner })
    }
}

#[async_trait]
impl StoreBackend for RedisCoordinator {
    fn backend(&self) -> &'static str {
        "redis"
    }

    fn is_distributed(&self) -> bool {
        true
    }

    async fn ping(&self) -> StoreResult<()> {
        self.inner.ping().await
    }
}

#[async_trait]
impl TurnCoordinator for RedisCoordinator {
    async fn acquire_turn_lock(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<LockOutcome> {
        self.inner.acquire_turn_lock(tenant, session_id, turn_id, lease).await
    }

    async fn renew_turn_lock(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<LockStatus> {
        self.inner.renew_turn_lock(tenant, session_id, turn_id, lease).await
    }

    async fn renew_turn_locks(&self, turns: &[LeaseKey], lease: Duration) -> StoreResult<Vec<LockStatus>> {
        self.inner.renew_turn_locks(turns, lease).await
    }

    async fn release_turn_lock(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<()> {
        self.inner.release_turn_lock(tenant, session_id, turn_id).await
    }

    async fn turn_lock_holder(&self, tenant: &str, session_id: &str) -> StoreResult<Option<Uuid>> {
        self.inner.turn_lock_holder(tenant, session_id).await
    }

    async fn request_cancel(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<bool> {
        self.inner.request_cancel(tenant, session_id, turn_id).await
    }

    async fn join_queue(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<bool> {
        self.inner.join_queue(tenant, session_id, turn_id, lease).await
    }

    async fn first_in_queue(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<bool> {
        self.inner.first_in_queue(tenant, session_id, turn_id, lease).await
    }

    async fn leave_queue(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<()> {
        self.inner.leave_queue(tenant, session_id, turn_id).await
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
        self.inner.begin_idempotent(tenant, session_id, key, fingerprint, turn_id, ttl).await
    }

    async fn complete_idempotent(
        &self,
        tenant: &str,
        session_id: &str,
        key: &str,
        response: &serde_json::Value,
        ttl: Duration,
    ) -> StoreResult<()> {
        self.inner.complete_idempotent(tenant, session_id, key, response, ttl).await
    }

    async fn abort_idempotent(&self, tenant: &str, session_id: &str, key: &str) -> StoreResult<()> {
        self.inner.abort_idempotent(tenant, session_id, key).await
    }

    fn event_log(&self) -> Option<&dyn crate::store::event_log::TurnEventLog> {
        Some(&self.inner)
    }
}
