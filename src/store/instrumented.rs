//! A store part that times every operation of another (`parley_store_operation_duration_seconds`,
//! `parley_store_errors_total`) and, with traces on, opens a span for each (`db.system.name`,
//! `db.operation.name`): what the agent's store port wraps the history store, the coordinator and
//! the fused paths in when metrics or traces are on. `Instrumented<S>` implements each trait `S`
//! does; every method, the fused ones included, goes to the inner part's own implementation, so a
//! backend's one-round-trip paths stay one round trip.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use uuid::Uuid;

use super::{
    AppendBatch, ConversationStore, FinishedTurn, FusedTurns, IdempotencyBegin, LeaseKey, LockOutcome,
    LockStatus, MessagePage, PageQuery, SessionCursor, SessionPage, StoreBackend, StoreResult, TurnBegin,
    TurnCoordinator,
};
use crate::domain::{Message, Metadata, NewSession, Session, Turn};
use crate::metrics::DynMetrics;

/// The inner store part (a history store, a coordinator, or a backend with fused paths), timed.
pub struct Instrumented<S: ?Sized> {
    inner: Arc<S>,
    /// Where operations are timed (`None`: metrics off, traces only).
    metrics: Option<DynMetrics>,
}

impl<S: StoreBackend + ?Sized> Instrumented<S> {
    /// Times every operation of `inner` into `metrics` (if any), and traces it when traces are on.
    pub fn new(inner: Arc<S>, metrics: Option<DynMetrics>) -> Self {
        Instrumented { inner, metrics }
    }

    async fn timed<T>(&self, op: &'static str, work: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
        let work = crate::telemetry::traced(|| self.span(op), async {
            crate::telemetry::failed_if(work.await, Result::is_err)
        });
        let Some(metrics) = &self.metrics else { return work.await };
        let started = Instant::now();
        let result = work.await;
        metrics.store_operation(self.inner.backend(), op, result.is_ok(), started.elapsed());
        result
    }

    /// The span of one store operation, for traces: `{op} {backend}`.
    fn span(&self, op: &'static str) -> tracing::Span {
        let backend = self.inner.backend();
        tracing::info_span!(target: crate::telemetry::TARGET, "store",
            otel.name = %format_args!("{op} {backend}"), otel.kind = "client",
            otel.status_code = tracing::field::Empty, db.system.name = backend, db.operation.name = op)
    }
}

#[async_trait]
impl<S: StoreBackend + ?Sized> StoreBackend for Instrumented<S> {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn is_distributed(&self) -> bool {
        self.inner.is_distributed()
    }

    async fn ping(&self) -> StoreResult<()> {
        self.timed("ping", self.inner.ping()).await
    }
}

#[async_trait]
impl<S: ConversationStore + ?Sized> ConversationStore for Instrumented<S> {
    async fn create_session(&self, tenant: &str, new: NewSession) -> StoreResult<Session> {
        self.timed("create_session", self.inner.create_session(tenant, new)).await
    }

    async fn get_session(&self, tenant: &str, id: &str) -> StoreResult<Option<Session>> {
        self.timed("get_session", self.inner.get_session(tenant, id)).await
    }

    async fn list_sessions(
        &self,
        tenant: &str,
        limit: usize,
        cursor: Option<&SessionCursor>,
    ) -> StoreResult<SessionPage> {
        self.timed("list_sessions", self.inner.list_sessions(tenant, limit, cursor)).await
    }

    async fn delete_session(&self, tenant: &str, id: &str) -> StoreResult<bool> {
        self.timed("delete_session", self.inner.delete_session(tenant, id)).await
    }

    async fn set_session_metadata(
        &self,
        tenant: &str,
        id: &str,
        metadata: Metadata,
    ) -> StoreResult<Option<Session>> {
        self.timed("set_session_metadata", self.inner.set_session_metadata(tenant, id, metadata)).await
    }

    async fn append(&self, tenant: &str, session_id: &str, batch: AppendBatch) -> StoreResult<Vec<Message>> {
        self.timed("append", self.inner.append(tenant, session_id, batch)).await
    }

    async fn read_page(&self, tenant: &str, session_id: &str, query: PageQuery) -> StoreResult<MessagePage> {
        self.timed("read_page", self.inner.read_page(tenant, session_id, query)).await
    }

    async fn last_n(&self, tenant: &str, session_id: &str, n: usize) -> StoreResult<Vec<Message>> {
        self.timed("last_n", self.inner.last_n(tenant, session_id, n)).await
    }

    async fn turn_messages(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
    ) -> StoreResult<Vec<Message>> {
        self.timed("turn_messages", self.inner.turn_messages(tenant, session_id, turn_id)).await
    }

    async fn clear(&self, tenant: &str, session_id: &str) -> StoreResult<()> {
        self.timed("clear", self.inner.clear(tenant, session_id)).await
    }

    async fn put_turn(&self, tenant: &str, turn: &Turn) -> StoreResult<()> {
        self.timed("put_turn", self.inner.put_turn(tenant, turn)).await
    }

    async fn get_turn(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<Option<Turn>> {
        self.timed("get_turn", self.inner.get_turn(tenant, session_id, turn_id)).await
    }

    async fn create_session_with(
        &self,
        tenant: &str,
        new: NewSession,
        messages: Vec<Message>,
        max: u64,
    ) -> StoreResult<(Session, Vec<Message>)> {
        self.timed("create_session_with", self.inner.create_session_with(tenant, new, messages, max)).await
    }

    async fn count_sessions(&self, tenant: &str) -> StoreResult<u64> {
        self.timed("count_sessions", self.inner.count_sessions(tenant)).await
    }

    async fn create_session_within(&self, tenant: &str, new: NewSession, max: u64) -> StoreResult<Session> {
        self.timed("create_session_within", self.inner.create_session_within(tenant, new, max)).await
    }
}

#[async_trait]
impl<S: TurnCoordinator + ?Sized> TurnCoordinator for Instrumented<S> {
    async fn acquire_turn_lock(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<LockOutcome> {
        self.timed("acquire_turn_lock", self.inner.acquire_turn_lock(tenant, session_id, turn_id, lease))
            .await
    }

    async fn renew_turn_lock(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<LockStatus> {
        self.timed("renew_turn_lock", self.inner.renew_turn_lock(tenant, session_id, turn_id, lease)).await
    }

    async fn renew_turn_locks(&self, turns: &[LeaseKey], lease: Duration) -> StoreResult<Vec<LockStatus>> {
        self.timed("renew_turn_locks", self.inner.renew_turn_locks(turns, lease)).await
    }

    async fn release_turn_lock(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<()> {
        self.timed("release_turn_lock", self.inner.release_turn_lock(tenant, session_id, turn_id)).await
    }

    async fn turn_lock_holder(&self, tenant: &str, session_id: &str) -> StoreResult<Option<Uuid>> {
        self.timed("turn_lock_holder", self.inner.turn_lock_holder(tenant, session_id)).await
    }

    async fn request_cancel(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<bool> {
        self.timed("request_cancel", self.inner.request_cancel(tenant, session_id, turn_id)).await
    }

    async fn join_queue(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<bool> {
        self.timed("join_queue", self.inner.join_queue(tenant, session_id, turn_id, lease)).await
    }

    async fn first_in_queue(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<bool> {
        self.timed("first_in_queue", self.inner.first_in_queue(tenant, session_id, turn_id, lease)).await
    }

    async fn leave_queue(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<()> {
        self.timed("leave_queue", self.inner.leave_queue(tenant, session_id, turn_id)).await
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
        let work = self.inner.begin_idempotent(tenant, session_id, key, fingerprint, turn_id, ttl);
        self.timed("begin_idempotent", work).await
    }

    async fn complete_idempotent(
        &self,
        tenant: &str,
        session_id: &str,
        key: &str,
        response: &serde_json::Value,
        ttl: Duration,
    ) -> StoreResult<()> {
        let work = self.inner.complete_idempotent(tenant, session_id, key, response, ttl);
        self.timed("complete_idempotent", work).await
    }

    async fn abort_idempotent(&self, tenant: &str, session_id: &str, key: &str) -> StoreResult<()> {
        self.timed("abort_idempotent", self.inner.abort_idempotent(tenant, session_id, key)).await
    }

    fn event_log(&self) -> Option<&dyn crate::store::event_log::TurnEventLog> {
        self.inner.event_log()
    }
}

#[async_trait]
impl<S: FusedTurns + ?Sized> FusedTurns for Instrumented<S> {
    async fn begin_turn(
        &self,
        tenant: &str,
        turn: &Turn,
        window: usize,
        lease: Duration,
    ) -> StoreResult<TurnBegin> {
        self.timed("begin_turn", self.inner.begin_turn(tenant, turn, window, lease)).await
    }

    async fn append_fenced(
        &self,
        tenant: &str,
        session_id: &str,
        batch: AppendBatch,
        turn_id: Uuid,
    ) -> StoreResult<Vec<Message>> {
        self.timed("append_fenced", self.inner.append_fenced(tenant, session_id, batch, turn_id)).await
    }

    async fn finish_turn(
        &self,
        tenant: &str,
        session_id: &str,
        batch: AppendBatch,
        turn_id: Uuid,
    ) -> StoreResult<FinishedTurn> {
        self.timed("finish_turn", self.inner.finish_turn(tenant, session_id, batch, turn_id)).await
    }
}
