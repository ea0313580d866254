//! The store: its traits, their query types and errors, and the backends.
//!
//! Two parts, two traits. [`ConversationStore`] is what a conversation *is*: sessions, their
//! history, their turn records; a history backend implements it and nothing else.
//! [`TurnCoordinator`] is what keeps turns safe: one turn per session (a lock with a lease that
//! carries cancel requests), and idempotency keys. Both share [`StoreBackend`] (name,
//! `is_distributed`, `ping`). A backend that owns both parts also implements [`FusedTurns`]: the
//! start and the end of a turn in one round trip, fenced atomically. `app.rs` pairs a history
//! store with a coordinator (`PARLEY_COORDINATOR`; by default each store coordinates itself, with
//! its fused paths) and hands both to the agent (`agent::TurnStore`), which composes the turn
//! steps from the single calls when the two are different backends: then a write is fenced by a
//! check before it, not in the same atomic step (see [`FusedTurns`]).
//!
//! Backends: [`sqlite`] (the default: one process, durable), [`memory`] (one process, nothing
//! survives a restart), [`redis`] and [`postgres`] (shared by replicas); each implements all three
//! traits. Coordinators for a history kept elsewhere: [`memory_coordinator`] (one process) and
//! [`redis::RedisCoordinator`] (shared by replicas).
//! `contract` holds the suites that pin the traits' behaviour, one per trait (a backend that
//! passes them is a backend); it is compiled only with the crate's `contract` feature, which
//! parley's own tests turn on and a custom backend's tests can too.
//!
//! Each durable backend is a folder whose files have one job each (the store and its trait
//! implementation in `mod.rs`; statements in `sql/*.sql` or scripts in `scripts/*.lua`, loaded
//! with `include_str!`; key naming, connection pools, row conversions, error mapping). A backend
//! takes its own options struct ([`sqlite::SqliteOptions`], [`postgres::PgOptions`],
//! [`redis::RedisOptions`]), which `app.rs` builds from the configuration: no store reads
//! `config`. `sql_common.rs` holds what the two SQL backends share; [`instrumented`] times any
//! store for the metrics.

#[cfg(feature = "contract")]
pub mod contract;
pub mod event_log;
pub mod instrumented;
pub mod memory;
pub mod memory_coordinator;
pub mod postgres;
pub mod redis;
mod sql_common;
pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::{Message, Metadata, NewSession, Session, Turn, WindowMessage};

/// A shared handle to a history store.
pub type DynStore = Arc<dyn ConversationStore>;

/// What can go wrong in a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The session does not exist (for this tenant).
    #[error("session not found")]
    SessionNotFound,
    /// A session with this id already exists (for this tenant).
    #[error("session already exists")]
    SessionExists,
    /// The tenant already holds the most sessions allowed (the number).
    #[error("the tenant already holds {0} sessions")]
    SessionLimitReached(u64),
    /// A cursor that this store did not issue.
    #[error("invalid cursor")]
    InvalidCursor,
    /// The backend cannot be reached; the request was not applied. The caller may retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The request was sent but no answer came (a timeout, a connection lost mid-request): it
    /// may or may not have been applied.
    #[error("store did not answer: {0}")]
    Unanswered(String),
    /// A fenced write of a turn that no longer holds its session's lock (its lease ran out, or
    /// it already ended): nothing was written.
    #[error("the turn no longer holds its session")]
    Fenced,
    /// Anything else the backend reported.
    #[error("store error: {0}")]
    Backend(String),
}

impl StoreError {
    /// Whether the write that failed this way may still have been applied: its outcome must be
    /// learnt before the caller is told anything.
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, StoreError::Unanswered(_))
    }
}

/// Short alias for store results.
pub type StoreResult<T> = Result<T, StoreError>;

/// Reading direction of a history page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Oldest first.
    #[default]
    Asc,
    /// Newest first.
    Desc,
}

/// A request for one page of history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageQuery {
    /// Page size, at least 1.
    pub limit: usize,
    /// Direction.
    pub order: Order,
    /// Only messages with a seq greater than this.
    pub after: Option<u64>,
    /// Only messages with a seq less than this.
    pub before: Option<u64>,
    /// Superseded messages too (they carry `superseded_by`), merged in seq order.
    pub include_superseded: bool,
}

/// One page of history.
#[derive(Debug, Clone, PartialEq)]
pub struct MessagePage {
    /// The messages, in the requested order.
    pub messages: Vec<Message>,
    /// Whether more messages follow in the same direction.
    pub has_more: bool,
}

impl MessagePage {
    /// The seq to pass as `after` (asc) or `before` (desc) for the next page, if there is one.
    pub fn next_seq(&self) -> Option<u64> {
        if self.has_more { self.messages.last().map(|m| m.seq) } else { None }
    }
}

/// Position in the session list, which is ordered by `updated_at` descending, then id descending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionCursor {
    /// `updated_at` of the last session returned, in microseconds since the epoch.
    pub updated_at_micros: i64,
    /// Id of the last session returned.
    pub id: String,
}

impl SessionCursor {
    /// The cursor that continues after `session`.
    pub fn after(session: &Session) -> Self {
        SessionCursor { updated_at_micros: session.updated_at.timestamp_micros(), id: session.id.clone() }
    }

    /// The opaque text form handed to clients.
    pub fn encode(&self) -> String {
        format!("{}.{}", self.updated_at_micros, self.id)
    }

    /// Parses what [`SessionCursor::encode`] produced.
    pub fn decode(text: &str) -> StoreResult<Self> {
        let (micros, id) = text.split_once('.').ok_or(StoreError::InvalidCursor)?;
        let updated_at_micros = micros.parse().map_err(|_| StoreError::InvalidCursor)?;
        // The id is only a tie-breaker compared as text, so any id-shaped text is a position
        // (`.` and `..` included, though no session has them).
        let id_shaped = !id.is_empty()
            && id.len() <= crate::domain::MAX_SESSION_ID_LEN
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        if !id_shaped {
            return Err(StoreError::InvalidCursor);
        }
        Ok(SessionCursor { updated_at_micros, id: id.to_owned() })
    }

    /// Whether a session with these keys comes after this cursor in list order.
    pub fn precedes(&self, updated_at: DateTime<Utc>, id: &str) -> bool {
        let micros = updated_at.timestamp_micros();
        micros < self.updated_at_micros || (micros == self.updated_at_micros && id < self.id.as_str())
    }
}

/// One page of the session list.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionPage {
    /// Sessions, most recently updated first.
    pub sessions: Vec<Session>,
    /// Whether more sessions follow.
    pub has_more: bool,
}

/// A batch written atomically: messages of one turn and, optionally, the turn's new record.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AppendBatch {
    /// Messages in order; the store assigns their `seq`.
    pub messages: Vec<Message>,
    /// The turn record to save in the same atomic step (e.g. `completed` with its message ids).
    /// A record that is already terminal (completed, failed, cancelled) is never changed.
    pub turn: Option<Turn>,
    /// An edit: before the batch's messages are appended, in the same atomic step, every active
    /// message with a seq at or above this one becomes superseded by the batch's turn (`turn`
    /// must be set). Superseded messages are kept apart from the active ones, so that active
    /// reads stay O(page).
    pub supersede_from: Option<u64>,
}

/// The outcome of claiming a session for a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockOutcome {
    /// The turn holds the session until it releases it or its lease runs out.
    Acquired,
    /// Another turn holds it.
    Busy(Uuid),
}

/// What renewing a turn's lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockStatus {
    /// Whether the turn still holds the session (false once its lease ran out and another took it).
    pub held: bool,
    /// Whether someone asked, from any replica, for the turn to be cancelled.
    pub cancel_requested: bool,
}

/// What starting a turn found (see [`FusedTurns::begin_turn`]).
#[derive(Debug, Clone, PartialEq)]
pub enum TurnBegin {
    /// The turn holds the session and is recorded as running.
    Started {
        /// The session's system prompt, if it has one.
        system_prompt: Option<String>,
        /// The session's last messages (at most the number asked for), oldest first.
        window: Vec<WindowMessage>,
    },
    /// Another turn holds the session; nothing was written.
    Busy(Uuid),
}

/// What finishing a turn stored (see [`FusedTurns::finish_turn`]).
#[derive(Debug, Clone, PartialEq)]
pub struct FinishedTurn {
    /// The messages appended, with their seqs.
    pub messages: Vec<Message>,
    /// Whether the turn's claim on the session is gone (released with the append, or it held
    /// none). If not, the caller releases it, or it goes when its lease runs out.
    pub lock_released: bool,
}

/// A running turn whose lease to renew (see [`TurnCoordinator::renew_turn_locks`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseKey {
    /// The tenant.
    pub tenant: String,
    /// The session the turn holds.
    pub session_id: String,
    /// The turn.
    pub turn_id: Uuid,
}

/// A remembered `Idempotency-Key`.
#[derive(Debug, Clone, PartialEq)]
pub struct IdempotencyRecord {
    /// A digest of the request the key was first used with.
    pub fingerprint: String,
    /// The turn that request started.
    pub turn_id: Uuid,
    /// The answer, once the turn completed.
    pub response: Option<serde_json::Value>,
}

/// The outcome of starting a request with an `Idempotency-Key`.
#[derive(Debug, Clone, PartialEq)]
pub enum IdempotencyBegin {
    /// The key was new: it now points at the given turn.
    Started,
    /// The key was used before.
    Existing(IdempotencyRecord),
}

/// A shared handle to a coordinator.
pub type DynCoordinator = Arc<dyn TurnCoordinator>;

/// A shared handle to a backend that owns both parts and their fused paths.
pub type DynFused = Arc<dyn FusedTurns>;

/// What every part of a store says about itself: its name, whether replicas can share it, and
/// whether it answers.
#[async_trait]
pub trait StoreBackend: Send + Sync + 'static {
    /// Short backend name for logs, metrics and `/readyz` (`sqlite`, `memory`, `redis`, `postgres`).
    fn backend(&self) -> &'static str;

    /// Whether several parley replicas can share it: what they write here, every replica sees.
    fn is_distributed(&self) -> bool;

    /// Checks that the backend is reachable.
    async fn ping(&self) -> StoreResult<()>;
}

/// The conversation store: what a conversation *is* (sessions, their history, their turn
/// records). Every method is scoped by tenant: a session id is unique per tenant, and one tenant
/// never sees another's sessions, messages or turns.
///
/// A history store knows nothing of locks, leases or idempotency keys: a [`TurnCoordinator`]
/// keeps turns safe, and `app.rs` pairs the two (`PARLEY_COORDINATOR`).
///
/// Contract (pinned by `contract::conversation`):
/// `append` is atomic (all messages or none, with the turn record and the supersession, and
/// readers never see part of a batch); seqs are 1, 2, 3… per session, strictly increasing in
/// append order and never reused, even after `clear` or trimming; reads of a page, of the last N
/// or of one turn's messages cost O(what they return).
#[async_trait]
pub trait ConversationStore: StoreBackend {
    /// Creates a session; `SessionExists` if the id is taken for this tenant.
    async fn create_session(&self, tenant: &str, new: NewSession) -> StoreResult<Session>;

    /// Reads a session.
    async fn get_session(&self, tenant: &str, id: &str) -> StoreResult<Option<Session>>;

    /// Lists sessions, most recently updated first (ties: id descending).
    async fn list_sessions(
        &self,
        tenant: &str,
        limit: usize,
        cursor: Option<&SessionCursor>,
    ) -> StoreResult<SessionPage>;

    /// Deletes a session, its history and its turns; false if it did not exist.
    async fn delete_session(&self, tenant: &str, id: &str) -> StoreResult<bool>;

    /// Replaces a session's metadata and returns the session; `None` if it does not exist. Its
    /// `updated_at`, and so its place in the list, stay as they were (it counts as a write for
    /// the TTL).
    async fn set_session_metadata(
        &self,
        tenant: &str,
        id: &str,
        metadata: Metadata,
    ) -> StoreResult<Option<Session>>;

    /// How many sessions the tenant holds, cheaply (for `PARLEY_MAX_SESSIONS_PER_TENANT`). Expired
    /// sessions may be counted until the backend notices they expired.
    async fn count_sessions(&self, tenant: &str) -> StoreResult<u64>;

    /// Appends a batch atomically (its messages, its turn record, its supersession) and returns
    /// the messages with their seqs. `SessionNotFound` if the session does not exist. The write
    /// is unconditional: fencing it by a turn's lock is the fused path's
    /// ([`FusedTurns::append_fenced`]) or the agent's (check, then write).
    async fn append(&self, tenant: &str, session_id: &str, batch: AppendBatch) -> StoreResult<Vec<Message>>;

    /// Reads one page of history.
    async fn read_page(&self, tenant: &str, session_id: &str, query: PageQuery) -> StoreResult<MessagePage>;

    /// Reads the last `n` active messages, oldest first.
    async fn last_n(&self, tenant: &str, session_id: &str, n: usize) -> StoreResult<Vec<Message>>;

    /// Reads the messages of one turn (those whose `turn_id` is `turn_id`), active and
    /// superseded alike (a superseded one carries `superseded_by`), in seq order, wherever they
    /// are in the history: what following a finished turn or regenerating the last one needs.
    /// The turn is found through an index of the store (a key, a structure the append keeps), not
    /// by reading the history: the cost is O(the turn's messages), however many came after them.
    /// Messages a clear or the per-session cap gave up are not returned. An unknown turn gives an
    /// empty list; `SessionNotFound` if the session does not exist (for this tenant), so another
    /// tenant's turn gives nothing.
    async fn turn_messages(&self, tenant: &str, session_id: &str, turn_id: Uuid)
    -> StoreResult<Vec<Message>>;

    /// Removes every message but keeps the session and its seq counter.
    async fn clear(&self, tenant: &str, session_id: &str) -> StoreResult<()>;

    /// Creates or replaces a turn record; a record that is already terminal (completed, failed,
    /// cancelled) is left as it is, so a turn's outcome never changes once written.
    /// `SessionNotFound` if the session does not exist.
    async fn put_turn(&self, tenant: &str, turn: &Turn) -> StoreResult<()>;

    /// Reads a turn record; `None` if the turn or the session does not exist.
    async fn get_turn(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<Option<Turn>>;

    /// Creates a session unless the tenant already holds `max` sessions
    /// (`PARLEY_MAX_SESSIONS_PER_TENANT`), then `SessionLimitReached(max)`. The built-in stores
    /// count and create in one atomic step, so concurrent creations never overshoot `max`. This
    /// default counts, then creates: a store that keeps it may overshoot by a few under concurrent
    /// creations.
    async fn create_session_within(&self, tenant: &str, new: NewSession, max: u64) -> StoreResult<Session> {
        if self.count_sessions(tenant).await? >= max {
            return Err(StoreError::SessionLimitReached(max));
        }
        self.create_session(tenant, new).await
    }

    /// Creates a session holding `messages` (their seqs assigned from 1, in order), unless the
    /// id is taken or the tenant already holds `max` sessions: what a fork writes. The built-in
    /// stores do it in one atomic step; this default creates, then appends (a failure between
    /// the two leaves an empty session).
    async fn create_session_with(
        &self,
        tenant: &str,
        new: NewSession,
        messages: Vec<Message>,
        max: u64,
    ) -> StoreResult<(Session, Vec<Message>)> {
        let id = new.id.clone();
        let mut session = self.create_session_within(tenant, new, max).await?;
        if messages.is_empty() {
            return Ok((session, messages));
        }
        let stored = self.append(tenant, &id, AppendBatch { messages, ..AppendBatch::default() }).await?;
        session.message_count = stored.len() as u64;
        Ok((session, stored))
    }
}

/// The turn coordinator: what keeps turns safe. One turn at a time holds a session (a lock with
/// a lease, renewed while the turn runs, carrying cancel requests from any replica), and an
/// `Idempotency-Key` maps a retried request to the turn it started.
///
/// Everything is keyed by (tenant, session id). A coordinator need not know whether the session
/// exists (the agent asks the history store first); one that lives with its sessions (each
/// built-in store coordinating itself) may answer `SessionNotFound` for a session it does not
/// hold, and drops a session's lock and keys with it. A standalone coordinator (`PARLEY_COORDINATOR`)
/// lets them go by themselves: a lock when its lease runs out, a key after its ttl.
///
/// Contract: the cases of `contract::coordination` (locks, leases, cancel, idempotency keys).
#[async_trait]
pub trait TurnCoordinator: StoreBackend {
    /// Claims the session for a turn for `lease`, unless another turn holds it (across every
    /// replica sharing the coordinator). Claiming again as the holder renews the lease.
    async fn acquire_turn_lock(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<LockOutcome>;

    /// Extends the lease of a turn that holds the session and reports any cancel request; `held:
    /// false` if the turn does not hold it (any more).
    async fn renew_turn_lock(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<LockStatus>;

    /// Renews the leases of many turns at once and reports each one's status, in order: what a
    /// replica's lease keeper sends once per tick for every turn it runs. A backend should send
    /// them in as few round trips as it can (the built-in ones do: one statement or one pipeline
    /// per thousand); the default renews them one by one.
    async fn renew_turn_locks(&self, turns: &[LeaseKey], lease: Duration) -> StoreResult<Vec<LockStatus>> {
        let mut statuses = Vec::with_capacity(turns.len());
        for t in turns {
            statuses.push(self.renew_turn_lock(&t.tenant, &t.session_id, t.turn_id, lease).await?);
        }
        Ok(statuses)
    }

    /// Releases the session if `turn_id` holds it (compare-and-delete); otherwise does nothing.
    async fn release_turn_lock(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<()>;

    /// The turn holding the session, if any (an expired lease holds nothing).
    async fn turn_lock_holder(&self, tenant: &str, session_id: &str) -> StoreResult<Option<Uuid>>;

    /// Asks the turn holding the session to stop (its next renewal reports it); false if
    /// `turn_id` does not hold it.
    async fn request_cancel(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<bool>;

    /// Remembers `key` for `ttl` as used by a request with this fingerprint that starts `turn_id`,
    /// unless the key is already remembered, in which case its record is returned unchanged.
    async fn begin_idempotent(
        &self,
        tenant: &str,
        session_id: &str,
        key: &str,
        fingerprint: &str,
        turn_id: Uuid,
        ttl: Duration,
    ) -> StoreResult<IdempotencyBegin>;

    /// Saves the answer of the turn the key started, and remembers it for `ttl` from now.
    async fn complete_idempotent(
        &self,
        tenant: &str,
        session_id: &str,
        key: &str,
        response: &serde_json::Value,
        ttl: Duration,
    ) -> StoreResult<()>;

    /// Forgets a key (its turn failed before storing anything, so a retry may run again).
    async fn abort_idempotent(&self, tenant: &str, session_id: &str, key: &str) -> StoreResult<()>;

    /// Joins the queue of turns waiting for the session (`if_busy: wait`), in arrival order
    /// across every replica sharing the coordinator, for `lease` unless renewed by
    /// [`TurnCoordinator::first_in_queue`]. False if the coordinator keeps no queue (the default):
    /// waiters then keep arrival order within each replica only. A distributed coordinator keeps
    /// one (pinned by `contract::coordination`).
    async fn join_queue(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<bool> {
        let _ = (tenant, session_id, turn_id, lease);
        Ok(false)
    }

    /// Whether `turn_id` is the first of the session's waiting turns, renewing its place for
    /// `lease`; places whose lease ran out are dropped first (a waiter whose place was dropped
    /// joins again at the end). True when the coordinator keeps no queue.
    async fn first_in_queue(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<bool> {
        let _ = (tenant, session_id, turn_id, lease);
        Ok(true)
    }

    /// Leaves the queue (the turn got the session, or gave up).
    async fn leave_queue(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<()> {
        let _ = (tenant, session_id, turn_id);
        Ok(())
    }

    /// The log of running turns' events that every replica reads, when this coordinator keeps
    /// one (Redis and PostgreSQL do): with it, any replica serves any turn's stream. Without one,
    /// only the process running a turn streams its events; others tell its outcome once it ends.
    fn event_log(&self) -> Option<&dyn event_log::TurnEventLog> {
        None
    }
}

/// The fused paths of a backend that owns both the history and its coordination: each is one
/// round trip and one atomic step. The agent uses them when `app.rs` built its history store and
/// its coordinator from this same backend; otherwise it composes the single calls of the two
/// traits (`agent/turn_store.rs`).
///
/// What fusing buys besides round trips is the fence: here a turn's write is checked against its
/// lock in the same atomic step (the same Lua script or SQL statement), so a turn whose lease ran
/// out writes nothing. Composed, the check comes before the write: a turn that loses its lease
/// between the two (a replica paused longer than the lease) may still write once.
///
/// Contract: the cases of `contract::fused` (begin, finish, fencing).
#[async_trait]
pub trait FusedTurns: ConversationStore + TurnCoordinator {
    /// Starts a turn: claims the session for `turn` (unless another turn holds it), reads its
    /// system prompt and last `window` messages, and records `turn` as running, atomically.
    /// `SessionNotFound` if the session does not exist; `Busy` and nothing written if another
    /// turn holds it.
    async fn begin_turn(
        &self,
        tenant: &str,
        turn: &Turn,
        window: usize,
        lease: Duration,
    ) -> StoreResult<TurnBegin>;

    /// Appends a batch (as [`ConversationStore::append`]) only while `turn_id` holds the session
    /// with a live lease, checked in the same atomic step: [`StoreError::Fenced`] and nothing
    /// written otherwise. What a turn saves between its tool rounds.
    async fn append_fenced(
        &self,
        tenant: &str,
        session_id: &str,
        batch: AppendBatch,
        turn_id: Uuid,
    ) -> StoreResult<Vec<Message>>;

    /// Ends a turn: appends its last batch fenced by `turn_id` (as
    /// [`FusedTurns::append_fenced`]) and releases the session lock, in one atomic step.
    async fn finish_turn(
        &self,
        tenant: &str,
        session_id: &str,
        batch: AppendBatch,
        turn_id: Uuid,
    ) -> StoreResult<FinishedTurn>;
}
