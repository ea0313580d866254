//! Claiming a session for a turn across replicas, and idempotent retries.
//!
//! A turn holds its session through the store's lock (a lease renewed every second while it runs,
//! which also carries cancel requests from any replica). A turn posted while another runs is
//! rejected with the running turn's id, or waits for it: waiters queue in arrival order (across
//! replicas in the coordinator's wait queue, when it keeps one; else per replica), and the first
//! polls the store lock. An `Idempotency-Key` maps a request to the turn it started, so
//! a retry returns the same turn instead of running the model again.

use std::sync::{Arc, Weak};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;
use uuid::Uuid;

use super::registry::{RegisterError, TurnTokens};
use super::{Agent, TurnInput, TurnResult};
use crate::config::IfBusy;
use crate::domain::{Role, Turn, TurnStatus, WindowMessage, now};
use crate::error::{AppError, Problem};
use crate::store::{
    AppendBatch, IdempotencyBegin, IdempotencyRecord, Order, PageQuery, StoreError, TurnBegin,
};
use futures::StreamExt;

/// How often a running turn renews its lease and checks for cancel requests.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);

/// A session claimed for a turn, with what the turn needs from it.
pub(super) struct Claimed {
    /// Gives the claim back (registry entry and store lock) however the turn ends.
    pub guard: ClaimGuard,
    /// Stops the turn: a cancel request (from this replica's registry, or seen in the store), or
    /// the loss of its lock.
    pub tokens: TurnTokens,
    /// The session's system prompt.
    pub system_prompt: Option<String>,
    /// The session's last messages, before the window is fitted.
    pub window: Vec<WindowMessage>,
}

/// What an idempotent request found.
pub(super) enum Replay {
    /// The key is new (or no key was given): run the turn.
    Run,
    /// The key's turn completed: its answer.
    Done(TurnResult),
    /// A streaming retry while the key's turn runs (here, or on any replica when the store keeps
    /// an event log): follow its events from the first.
    Attach {
        /// The key's turn.
        turn_id: Uuid,
        /// Its events from the first.
        events: futures::stream::BoxStream<'static, super::TurnEvent>,
    },
}

/// A digest of what a turn request asks for, to recognise a retry of the same request.
pub fn fingerprint(input: &TurnInput) -> String {
    let mut hasher = Sha256::new();
    hasher.update(input.content.as_bytes());
    hasher.update([0u8]);
    hasher.update(serde_json::to_vec(&input.metadata).unwrap_or_default());
    if let Some(seq) = input.replace_from {
        // An edit is another request than a post of the same text.
        hasher.update(b"\0replace_from:");
        hasher.update(seq.to_le_bytes());
    }
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

impl Agent {
    /// Starts an idempotent request, or finds what the key's first request did.
    pub(super) async fn begin_idempotent(
        self: &Arc<Self>,
        input: &TurnInput,
        turn_id: Uuid,
    ) -> Result<Replay, AppError> {
        let Some(key) = &input.idempotency_key else { return Ok(Replay::Run) };
        let (tenant, session) = (&input.tenant, &input.session_id);
        let fp = fingerprint(input);
        let ttl = self.settings.idempotency_ttl;
        for _ in 0..2 {
            let record = match self
                .store
                .coordinator()
                .begin_idempotent(tenant, session, key, &fp, turn_id, ttl)
                .await?
            {
                IdempotencyBegin::Started => return Ok(Replay::Run),
                IdempotencyBegin::Existing(record) => record,
            };
            if record.fingerprint != fp {
                return Err(AppError::IdempotencyKeyReused);
            }
            match self.replay(input, &record).await? {
                Some(replay) => return Ok(replay),
                // The first request failed without storing anything: forget the key, run again.
                None => self.store.coordinator().abort_idempotent(tenant, session, key).await?,
            }
        }
        Err(AppError::TurnInProgress(turn_id))
    }

    /// The answer to a retry: the saved result, 409 while the first request runs, or `None`
    /// when the first request failed and the retry may run.
    async fn replay(
        self: &Arc<Self>,
        input: &TurnInput,
        record: &IdempotencyRecord,
    ) -> Result<Option<Replay>, AppError> {
        let (tenant, session) = (input.tenant.as_str(), input.session_id.as_str());
        if let Some(response) = &record.response {
            let result = serde_json::from_value(response.clone())
                .map_err(|e| AppError::Internal(format!("unreadable idempotent response: {e}")))?;
            return Ok(Some(Replay::Done(result)));
        }
        let turn = self.repaired_turn(tenant, session, record.turn_id).await?;
        let turn_id = record.turn_id;
        match turn.as_ref().map(|t| t.status) {
            Some(TurnStatus::Running) if input.stream => {
                let events = match (self.registry.feed(tenant, session, turn_id), turn.as_ref()) {
                    (Some(feed), _) => Some(feed.follow().boxed()),
                    (None, Some(turn)) => self.follow_log(tenant, turn, 0).map(StreamExt::boxed),
                    (None, None) => None,
                };
                match events {
                    Some(events) => Ok(Some(Replay::Attach { turn_id, events })),
                    None => Err(AppError::TurnInProgress(turn_id)),
                }
            }
            Some(TurnStatus::Running) => Err(AppError::TurnInProgress(turn_id)),
            Some(TurnStatus::Completed | TurnStatus::Cancelled) => {
                // Completed, but the process stopped before saving the answer: rebuild it.
                let messages = self.store.history().turn_messages(tenant, session, record.turn_id).await?;
                let turn = self.store.history().get_turn(tenant, session, record.turn_id).await?;
                let usage = turn.and_then(|t| t.usage);
                Ok(Some(Replay::Done(TurnResult { turn_id: record.turn_id, messages, usage })))
            }
            Some(TurnStatus::Failed) | None => Ok(None),
        }
    }

    /// Claims the session for a turn: the local registry, then the store lock (shared by
    /// replicas), which in the same store call loads the window and records the turn as running.
    pub(super) async fn claim_session(
        self: &Arc<Self>,
        input: &TurnInput,
        turn: &Turn,
    ) -> Result<Claimed, AppError> {
        if self.registry.is_closed() {
            return Err(AppError::ShuttingDown);
        }
        let claimed = match input.if_busy {
            IfBusy::Reject => self.try_claim(input, turn).await,
            IfBusy::Wait => self.wait_to_claim(input, turn).await,
        };
        if let (Err(AppError::TurnInProgress(_)), Some(metrics)) = (&claimed, &self.settings.metrics) {
            metrics.turn_conflict();
        }
        claimed
    }

    /// One attempt: 409 with the running turn's id if the session is busy here or elsewhere.
    /// The registry entry is given back on every way out, a dropped request and a panic included
    /// (the guard's drop), and so is the store's lock when the store may have granted it.
    async fn try_claim(self: &Arc<Self>, input: &TurnInput, turn: &Turn) -> Result<Claimed, AppError> {
        let (tenant, session) = (input.tenant.as_str(), input.session_id.as_str());
        let tokens = self.registry.register(tenant, session, turn.id).map_err(|e| match e {
            RegisterError::Busy(running) => AppError::TurnInProgress(running),
            RegisterError::Closed => AppError::ShuttingDown,
        })?;
        let mut guard = ClaimGuard::new(self, tenant, session, turn.id);
        let lease = self.settings.turn_lease;
        // An edit reads its window (the history before the message it replaces) once it holds
        // the session.
        let window = if input.replace_from.is_some() { 0 } else { self.settings.history_size };
        let begun = self.store.begin_turn(tenant, turn, window, lease).await;
        match begun {
            Ok(TurnBegin::Started { system_prompt, window }) => match input.replace_from {
                None => Ok(Claimed { guard, tokens, system_prompt, window }),
                Some(seq) => match self.edit_window(tenant, session, seq).await {
                    Ok(window) => Ok(Claimed { guard, tokens, system_prompt, window }),
                    Err(e) => {
                        self.refuse_claimed(turn, &e, &mut guard, tenant).await;
                        Err(e)
                    }
                },
            },
            Ok(TurnBegin::Busy(running)) => {
                guard.lock_released = true;
                Err(AppError::TurnInProgress(running))
            }
            // The store may have granted the lock before it failed: the guard releases it.
            Err(e) => Err(AppError::from_store(e, session)),
        }
    }

    /// The window of an edit: the history before `seq`, which must be a user message of the
    /// active history (a user message starts its turn), read in one page.
    pub(super) async fn edit_window(
        &self,
        tenant: &str,
        session: &str,
        seq: u64,
    ) -> Result<Vec<WindowMessage>, AppError> {
        let limit = self.settings.history_size + 1;
        let query =
            PageQuery { limit, order: Order::Desc, before: seq.checked_add(1), ..PageQuery::default() };
        let page = self
            .store
            .history()
            .read_page(tenant, session, query)
            .await
            .map_err(|e| AppError::from_store(e, session))?;
        let mut messages = page.messages.into_iter();
        match messages.next() {
            Some(m) if m.seq == seq && m.role == Role::User => {}
            Some(m) if m.seq == seq => {
                return Err(AppError::InvalidReplaceFrom(format!(
                    "replace_from {seq} is a{} {} message; it must be a user message",
                    if m.role == Role::Assistant { "n" } else { "" },
                    m.role.as_str()
                )));
            }
            _ => {
                return Err(AppError::InvalidReplaceFrom(format!(
                    "replace_from {seq} is not a message of the session's active history (superseded, cleared, or past the end)"
                )));
            }
        }
        let mut window: Vec<WindowMessage> = messages.map(WindowMessage::from).collect();
        window.reverse();
        Ok(window)
    }

    /// Ends a turn refused after it claimed its session (an edit whose message was superseded in
    /// the meantime): its record says why, and the session is free again.
    async fn refuse_claimed(&self, turn: &Turn, error: &AppError, guard: &mut ClaimGuard, tenant: &str) {
        let mut record = turn.clone();
        record.status = TurnStatus::Failed;
        record.error = serde_json::to_value(error.problem()).ok();
        record.completed_at = Some(now());
        let batch = AppendBatch { turn: Some(record), ..AppendBatch::default() };
        if self.store.finish_turn(tenant, &turn.session_id, batch, turn.id).await.is_ok() {
            guard.lock_released = true;
        }
    }

    /// Waits in arrival order for the session, up to the busy timeout: across replicas when the
    /// coordinator keeps a wait queue (Redis, PostgreSQL: only the first waiter tries to claim),
    /// else within this replica (a fair local queue).
    async fn wait_to_claim(self: &Arc<Self>, input: &TurnInput, turn: &Turn) -> Result<Claimed, AppError> {
        let (tenant, session) = (input.tenant.as_str(), input.session_id.as_str());
        let deadline = Instant::now() + self.settings.if_busy_timeout;
        let lease = self.settings.turn_lease;
        let coordinator = self.store.coordinator();
        let queued = coordinator
            .join_queue(tenant, session, turn.id, lease)
            .await
            .map_err(|e| AppError::from_store(e, session))?;

        let place = queued.then(|| QueuePlace::new(self, tenant, session, turn.id));
        let local = (!queued).then(|| self.registry.queue(tenant, session));
        let result = async {
            let _place = match &local {
                Some(queue) => Some(tokio::time::timeout_at(deadline, queue.lock()).await.map_err(|_| ())?),
                None => None,
            };
            let mut pause = Duration::from_millis(10);
            loop {
                let first = !queued
                    || match coordinator.first_in_queue(tenant, session, turn.id, lease).await {
                        Ok(first) => first,
                        Err(e) => return Ok(Err(AppError::from_store(e, session))),
                    };

                let attempt = if first {
                    self.try_claim(input, turn).await
                } else {
                    Err(AppError::TurnInProgress(turn.id))
                };
                match attempt {
                    Err(AppError::TurnInProgress(_)) if Instant::now() + pause < deadline => {
                        if pause == Duration::from_millis(10)
                            && let Some(metrics) = &self.settings.metrics
                        {
                            // Made to wait: counted once, when the wait begins.
                            metrics.turn_conflict();
                        }
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(200));
                    }
                    Err(AppError::TurnInProgress(_)) => return Err(()),
                    other => return Ok(other),
                }
            }
        }
        .await;
        if let Some(place) = place {
            place.leave().await;
        }
        if let Some(queue) = local {
            drop(queue);
            self.registry.forget_queue(tenant, session);
        }
        match result {
            Ok(outcome) => outcome,
            Err(()) => {
                let running = coordinator.turn_lock_holder(tenant, session).await.ok().flatten();
                Err(AppError::TurnInProgress(
                    running.or(self.registry.running_in(tenant, session)).unwrap_or(turn.id),
                ))
            }
        }
    }

    /// Reads a turn, first marking it failed if it claims to run but holds no lock (the replica
    /// that ran it stopped and its lease ran out).
    pub async fn repaired_turn(
        &self,
        tenant: &str,
        session: &str,
        turn_id: Uuid,
    ) -> Result<Option<Turn>, AppError> {
        let Some(turn) = self.store.history().get_turn(tenant, session, turn_id).await? else {
            return Ok(None);
        };
        if turn.status != TurnStatus::Running
            || self.store.coordinator().turn_lock_holder(tenant, session).await? == Some(turn_id)
        {
            return Ok(Some(turn));
        }
        // A turn writes its last record before it frees the session: read the record again, or a
        // turn that ended between the two reads above would be overwritten as abandoned.
        let Some(mut turn) = self.store.history().get_turn(tenant, session, turn_id).await? else {
            return Ok(None);
        };
        if turn.status != TurnStatus::Running {
            return Ok(Some(turn));
        }
        turn.status = TurnStatus::Failed;
        turn.error = serde_json::to_value(abandoned_problem()).ok();
        turn.completed_at = Some(now());
        self.store.history().put_turn(tenant, &turn).await?;
        Ok(Some(turn))
    }
}

fn abandoned_problem() -> Problem {
    Problem {
        kind: "urn:parley:problem:turn_abandoned".to_owned(),
        title: "Turn abandoned".to_owned(),
        status: 503,
        detail: "the replica running this turn stopped before it ended; nothing more was saved".to_owned(),
        code: "turn_abandoned".to_owned(),
        turn_id: None,
    }
}

/// Renews the lease of every turn running in this process, every `every`, and passes on the
/// cancel requests it finds in the store (from any replica). One task per agent rather than one
/// per turn, and one batch per tick ([`crate::store::ConversationStore::renew_turn_locks`]), so
/// that ten thousand open streams cost a statement or a pipeline a second, not ten thousand.
/// It starts with the first turn and stops once the agent is gone.
pub(super) async fn keep_leases(agent: Weak<Agent>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(agent) = agent.upgrade() else { return };
        agent.renew_leases().await;
    }
}

impl Agent {
    async fn renew_leases(&self) {
        let turns = self.registry.leased();
        if turns.keys.is_empty() {
            return;
        }
        let lease = self.settings.turn_lease;
        let sent = Instant::now();
        let statuses = match self.store.coordinator().renew_turn_locks(&turns.keys, lease).await {
            Ok(statuses) => statuses,
            Err(e) => {
                tracing::warn!(turns = turns.keys.len(), error = %e, "could not renew the turn leases");
                // A lease the store has not extended for longer than the lease may be another
                // turn's by now: those turns stop (their writes would be refused anyway).
                for (key, renewed) in turns.keys.iter().zip(&turns.renewed) {
                    if sent.duration_since(*renewed) >= lease
                        && self.registry.note_lost(&key.tenant, &key.session_id, key.turn_id)
                    {
                        tracing::warn!(turn.id = %key.turn_id, session.id = %key.session_id, "the turn's lease ran out while the store did not answer: stopping it");
                    }
                }
                return;
            }
        };
        for ((key, cancel), status) in turns.keys.iter().zip(&turns.cancels).zip(statuses) {
            let (session, turn_id) = (&key.session_id, key.turn_id);
            if status.held {
                self.registry.note_renewed(&key.tenant, session, turn_id, sent);
                if status.cancel_requested {
                    cancel.cancel();
                }
            } else if self.registry.note_lost(&key.tenant, session, turn_id) {
                tracing::warn!(turn.id = %turn_id, session.id = %session, "the turn lost its session lock: stopping it");
            }
        }
    }

    /// How often leases are renewed: every second, or a third of a shorter lease.
    pub(super) fn renew_every(&self) -> Duration {
        RENEW_EVERY.min(self.settings.turn_lease / 3).max(Duration::from_millis(10))
    }
}

/// The margin parley takes, past `PARLEY_STORE_TIMEOUT`, to learn the outcome of a write the
/// store did not answer (at most this, and never more than the store timeout itself).
pub const OUTCOME_MARGIN: Duration = Duration::from_secs(1);

/// A turn's claim on its session: its registry entry here, and the store's lock. Given back
/// once, by [`ClaimGuard::give_back`] or on drop (a dropped request, a panic): the registry
/// entry at once, and the store's lock, unless known gone, by a task that keeps trying while
/// the lease lasts.
pub(super) struct ClaimGuard {
    agent: Arc<Agent>,
    tenant: String,
    session: String,
    turn_id: Uuid,
    /// Whether the store's lock is known to be gone (released with the turn's last write, or
    /// never granted).
    pub lock_released: bool,
    /// A terminal record to write, fenced, in place of a plain release (the turn's last write
    /// had no answer: writing the record settles whether it was applied).
    pub settle: Option<Turn>,
    armed: bool,
}

impl ClaimGuard {
    fn new(agent: &Arc<Agent>, tenant: &str, session: &str, turn_id: Uuid) -> Self {
        ClaimGuard {
            agent: Arc::clone(agent),
            tenant: tenant.to_owned(),
            session: session.to_owned(),
            turn_id,
            lock_released: false,
            settle: None,
            armed: true,
        }
    }

    /// Gives the claim back (once).
    pub fn give_back(&mut self) {
        if !std::mem::replace(&mut self.armed, false) {
            return;
        }
        if !self.lock_released
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(settle_when_possible(
                self.agent.store().clone(),
                self.tenant.clone(),
                self.session.clone(),
                self.turn_id,
                self.settle.take(),
                self.agent.settings.turn_lease,
            ));
        }
        self.agent.registry.finish(&self.tenant, &self.session, self.turn_id);
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        self.give_back();
    }
}

/// A turn's place in its session's wait queue (in the coordinator), left once: by
/// [`QueuePlace::leave`], or on drop (a waiting request whose client went away), by a task. A
/// place never left lapses after the lease.
struct QueuePlace {
    agent: Arc<Agent>,
    tenant: String,
    session: String,
    turn_id: Uuid,
    left: bool,
}

impl QueuePlace {
    fn new(agent: &Arc<Agent>, tenant: &str, session: &str, turn_id: Uuid) -> Self {
        QueuePlace {
            agent: Arc::clone(agent),
            tenant: tenant.to_owned(),
            session: session.to_owned(),
            turn_id,
            left: false,
        }
    }

    async fn leave(mut self) {
        self.left = true;
        let coordinator = self.agent.store.coordinator();
        if let Err(e) = coordinator.leave_queue(&self.tenant, &self.session, self.turn_id).await {
            tracing::debug!(turn.id = %self.turn_id, error = %e, "could not leave the wait queue; the place lapses");
        }
    }
}

impl Drop for QueuePlace {
    fn drop(&mut self) {
        if self.left {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let coordinator = Arc::clone(self.agent.store.coordinator());
            let (tenant, session, turn_id) = (self.tenant.clone(), self.session.clone(), self.turn_id);
            runtime.spawn(async move {
                let _ = coordinator.leave_queue(&tenant, &session, turn_id).await;
            });
        }
    }
}

/// Keeps trying to free a session whose turn ended while the store did not answer, so it is
/// free as soon as the store is back rather than when the lease runs out: writes the turn's
/// terminal record fenced with the lock's release (`settle`), or releases the lock. Gives up
/// when the lease has run out (the lock is gone by itself then).
pub(super) async fn settle_when_possible(
    store: super::TurnStore,
    tenant: String,
    session: String,
    turn_id: Uuid,
    settle: Option<Turn>,
    lease: Duration,
) {
    let deadline = Instant::now() + lease;
    while Instant::now() < deadline {
        let done = match &settle {
            Some(record) => {
                let batch = AppendBatch { turn: Some(record.clone()), ..AppendBatch::default() };
                match store.finish_turn(&tenant, &session, batch, turn_id).await {
                    Ok(_) | Err(StoreError::Fenced | StoreError::SessionNotFound) => true,
                    Err(_) => false,
                }
            }
            None => store.coordinator().release_turn_lock(&tenant, &session, turn_id).await.is_ok(),
        };
        if done {
            tracing::info!(turn.id = %turn_id, "session lock given back after the store answered again");
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
