//! The agent's port to the store: a history store, the coordinator of its turns, and, when one
//! backend owns both, its fused paths.
//!
//! `app.rs` decides once which it is: [`TurnStore::fused`] when the history store coordinates
//! itself (the default, `PARLEY_COORDINATOR=store`), [`TurnStore::composed`] when another
//! backend coordinates (`PARLEY_COORDINATOR=redis`, say, or a custom history store in code). The
//! three turn steps that touch both parts ([`TurnStore::begin_turn`],
//! [`TurnStore::append_fenced`], [`TurnStore::finish_turn`]) go to the fused path when there is
//! one, and are composed from the single calls of the two traits otherwise.
//!
//! Composed fencing is check-then-write: the lease is checked with the coordinator, then the
//! history store writes. A turn that loses its lease between the two (its replica paused longer
//! than the lease, between two statements) may still write once, where the fused path, checking
//! in the same atomic step, writes nothing. Keep the history store and the coordinator in one
//! backend where that matters.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::domain::{Message, Turn, WindowMessage};
use crate::metrics::DynMetrics;
use crate::store::instrumented::Instrumented;
use crate::store::{
    AppendBatch, DynCoordinator, DynFused, DynStore, FinishedTurn, FusedTurns, LockOutcome, StoreError,
    StoreResult, TurnBegin,
};

/// The history store, its coordinator and, when one backend owns both, its fused paths.
#[derive(Clone)]
pub struct TurnStore {
    history: DynStore,
    coordinator: DynCoordinator,
    /// Set only when `history` and `coordinator` are this same backend.
    fused: Option<DynFused>,
}

impl std::fmt::Debug for TurnStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnStore")
            .field("history", &self.history.backend())
            .field("coordinator", &self.coordinator.backend())
            .field("fused", &self.fused.is_some())
            .finish()
    }
}

impl TurnStore {
    /// One backend keeps the history and coordinates its turns: the fused paths are used.
    pub fn fused<S: FusedTurns>(backend: Arc<S>) -> Self {
        TurnStore { history: backend.clone(), coordinator: backend.clone(), fused: Some(backend) }
    }

    /// A history store coordinated by another backend: the turn steps are composed.
    pub fn composed(history: DynStore, coordinator: DynCoordinator) -> Self {
        TurnStore { history, coordinator, fused: None }
    }

    /// The same parts, each timed into `metrics` (if any) and traced when traces are on (the
    /// fused paths stay fused).
    pub fn instrumented(self, metrics: Option<&DynMetrics>) -> Self {
        let metrics = metrics.cloned();
        let fused = self.fused.map(|f| Arc::new(Instrumented::new(f, metrics.clone())) as DynFused);
        match fused {
            Some(fused) => {
                TurnStore { history: fused.clone(), coordinator: fused.clone(), fused: Some(fused) }
            }
            None => TurnStore {
                history: Arc::new(Instrumented::new(self.history, metrics.clone())),
                coordinator: Arc::new(Instrumented::new(self.coordinator, metrics)),
                fused: None,
            },
        }
    }

    /// The history store.
    pub fn history(&self) -> &DynStore {
        &self.history
    }

    /// The coordinator.
    pub fn coordinator(&self) -> &DynCoordinator {
        &self.coordinator
    }

    /// Whether the turn steps take the fused paths.
    pub fn is_fused(&self) -> bool {
        self.fused.is_some()
    }

    /// Starts a turn (see [`FusedTurns::begin_turn`]). Composed: reads the session, claims it,
    /// reads the window and records the turn as running, releasing the claim if a later step
    /// fails.
    pub async fn begin_turn(
        &self,
        tenant: &str,
        turn: &Turn,
        window: usize,
        lease: Duration,
    ) -> StoreResult<TurnBegin> {
        if let Some(fused) = &self.fused {
            return fused.begin_turn(tenant, turn, window, lease).await;
        }
        let session_id = turn.session_id.as_str();
        let session =
            self.history.get_session(tenant, session_id).await?.ok_or(StoreError::SessionNotFound)?;
        if let LockOutcome::Busy(holder) =
            self.coordinator.acquire_turn_lock(tenant, session_id, turn.id, lease).await?
        {
            return Ok(TurnBegin::Busy(holder));
        }
        let rest = async {
            let messages = self.history.last_n(tenant, session_id, window).await?;
            self.history.put_turn(tenant, turn).await?;
            Ok(messages.into_iter().map(WindowMessage::from).collect())
        }
        .await;
        match rest {
            Ok(window) => Ok(TurnBegin::Started { system_prompt: session.system_prompt, window }),
            Err(e) => {
                let _ = self.coordinator.release_turn_lock(tenant, session_id, turn.id).await;
                Err(e)
            }
        }
    }

    /// Appends a batch only while `turn_id` holds the session (see
    /// [`FusedTurns::append_fenced`]). Composed: checks the holder, then appends.
    pub async fn append_fenced(
        &self,
        tenant: &str,
        session_id: &str,
        batch: AppendBatch,
        turn_id: Uuid,
    ) -> StoreResult<Vec<Message>> {
        if let Some(fused) = &self.fused {
            return fused.append_fenced(tenant, session_id, batch, turn_id).await;
        }
        self.check_holder(tenant, session_id, turn_id).await?;
        self.history.append(tenant, session_id, batch).await
    }

    /// Ends a turn: its last batch, fenced, and the release of its lock (see
    /// [`FusedTurns::finish_turn`]). Composed: checks the holder, appends, then releases; if the
    /// release fails it reports `lock_released: false`, since the append stands.
    pub async fn finish_turn(
        &self,
        tenant: &str,
        session_id: &str,
        batch: AppendBatch,
        turn_id: Uuid,
    ) -> StoreResult<FinishedTurn> {
        if let Some(fused) = &self.fused {
            return fused.finish_turn(tenant, session_id, batch, turn_id).await;
        }
        self.check_holder(tenant, session_id, turn_id).await?;
        let messages = self.history.append(tenant, session_id, batch).await?;
        let lock_released = self.coordinator.release_turn_lock(tenant, session_id, turn_id).await.is_ok();
        Ok(FinishedTurn { messages, lock_released })
    }

    /// `Fenced` unless `turn_id` holds the session with a live lease.
    async fn check_holder(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<()> {
        match self.coordinator.turn_lock_holder(tenant, session_id).await {
            Ok(Some(holder)) if holder == turn_id => Ok(()),
            Ok(_) => Err(StoreError::Fenced),
            Err(e) => Err(e),
        }
    }

    /// Checks that the history store, and the coordinator when it is another backend, answer.
    pub async fn ping(&self) -> StoreResult<()> {
        self.history.ping().await?;
        if self.fused.is_none() {
            self.coordinator.ping().await?;
        }
        Ok(())
    }
}
