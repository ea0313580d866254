//! A store that wraps the memory store and misbehaves on request: it can stall or panic in a
//! chosen method, to test the layers that guard handlers (request timeout, panic catching). It has
//! no fused paths: the agent composes its turn steps from the single calls, each of which can fail.

use std::time::Duration;

use async_trait::async_trait;
use parley::domain::{Message, Metadata, NewSession, Session, Turn};
use parley::store::memory::MemoryStore;
use parley::store::{
    AppendBatch, ConversationStore, IdempotencyBegin, LockOutcome, LockStatus, MessagePage, PageQuery,
    SessionCursor, SessionPage, StoreBackend, StoreResult, TurnCoordinator,
};
use uuid::Uuid;

/// The memory store, with a fault in one method.
pub struct FaultyStore {
    /// The real store.
    pub inner: MemoryStore,
    /// The method that misbehaves.
    pub method: &'static str,
    /// What it does.
    pub fault: Fault,
}

/// A misbehaviour.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Sleep this long first.
    Stall(Duration),
    /// Panic.
    Panic,
}

impl FaultyStore {
    async fn before(&self, method: &str) {
        if method != self.method {
            return;
        }
        match self.fault {
            Fault::Stall(pause) => tokio::time::sleep(pause).await,
            Fault::Panic => panic!("injected fault in {method}"),
        }
    }
}

#[async_trait]
impl StoreBackend for FaultyStore {
    fn backend(&self) -> &'static str {
        "faulty"
    }

    fn is_distributed(&self) -> bool {
        false
    }

    async fn ping(&self) -> StoreResult<()> {
        self.before("ping").await;
        self.inner.ping().await
    }
}

#[async_trait]
impl ConversationStore for FaultyStore {
    async fn create_session(&self, tenant: &str, new: NewSession) -> StoreResult<Session> {
        self.before("create_session").await;
        self.inner.create_session(tenant, new).await
    }

    async fn get_session(&self, tenant: &str, id: &str) -> StoreResult<Option<Session>> {
        self.before("get_session").await;
        self.inner.get_session(tenant, id).await
    }

    async fn list_sessions(
        &self,
        tenant: &str,
        limit: usize,
        cursor: Option<&SessionCursor>,
    ) -> StoreResult<SessionPage> {
        self.before("list_sessions").await;
        self.inner.list_sessions(tenant, limit, cursor).await
    }

    async fn delete_session(&self, tenant: &str, id: &str) -> StoreResult<bool> {
        self.before("delete_session").await;
        self.inner.delete_session(tenant, id).await
    }

    async fn set_session_metadata(
        &self,
        tenant: &str,
        id: &str,
        metadata: Metadata,
    ) -> StoreResult<Option<Session>> {
        self.before("set_session_metadata").await;
        self.inner.set_session_metadata(tenant, id, metadata).await
    }

    async fn append(&self, tenant: &str, session_id: &str, batch: AppendBatch) -> StoreResult<Vec<Message>> {
        self.before("append").await;
        self.inner.append(tenant, session_id, batch).await
    }

    async fn read_page(&self, tenant: &str, session_id: &str, query: PageQuery) -> StoreResult<MessagePage> {
        self.before("read_page").await;
        self.inner.read_page(tenant, session_id, query).await
    }

    async fn last_n(&self, tenant: &str, session_id: &str, n: usize) -> StoreResult<Vec<Message>> {
        self.before("last_n").await;
        self.inner.last_n(tenant, session_id, n).await
    }

    async fn turn_messages(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
    ) -> StoreResult<Vec<Message>> {
        self.before("turn_messages").await;
        self.inner.turn_messages(tenant, session_id, turn_id).await
    }

    async fn clear(&self, tenant: &str, session_id: &str) -> StoreResult<()> {
        self.before("clear").await;
        self.inner.clear(tenant, session_id).await
    }

    async fn put_turn(&self, tenant: &str, turn: &Turn) -> StoreResult<()> {
        self.before("put_turn").await;
        self.inner.put_turn(tenant, turn).await
    }

    async fn get_turn(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<Option<Turn>> {
        self.before("get_turn").await;
        self.inner.get_turn(tenant, session_id, turn_id).await
    }

    async fn count_sessions(&self, tenant: &str) -> StoreResult<u64> {
        self.before("count_sessions").await;
        self.inner.count_sessions(tenant).await
    }
}

#[async_trait]
impl TurnCoordinator for FaultyStore {
    async fn acquire_turn_lock(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<LockOutcome> {
        self.before("acquire_turn_lock").await;
        self.inner.acquire_turn_lock(tenant, session_id, turn_id, lease).await
    }

    async fn renew_turn_lock(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<LockStatus> {
        self.before("renew_turn_lock").await;
        self.inner.renew_turn_lock(tenant, session_id, turn_id, lease).await
    }

    async fn release_turn_lock(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<()> {
        self.before("release_turn_lock").await;
        self.inner.release_turn_lock(tenant, session_id, turn_id).await
    }

    async fn turn_lock_holder(&self, tenant: &str, session_id: &str) -> StoreResult<Option<Uuid>> {
        self.before("turn_lock_holder").await;
        self.inner.turn_lock_holder(tenant, session_id).await
    }

    async fn request_cancel(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<bool> {
        self.before("request_cancel").await;
        self.inner.request_cancel(tenant, session_id, turn_id).await
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
        self.before("begin_idempotent").await;
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
        self.before("complete_idempotent").await;
        self.inner.complete_idempotent(tenant, session_id, key, response, ttl).await
    }

    async fn abort_idempotent(&self, tenant: &str, session_id: &str, key: &str) -> StoreResult<()> {
        self.before("abort_idempotent").await;
        self.inner.abort_idempotent(tenant, session_id, key).await
    }
}
