//! The PostgreSQL store: durable, shared by every parley replica (`is_distributed()` is true).
//!
//! The schema is in `migrations/` (embedded with `sqlx::migrate!`); `0001_init.sql` explains it.
//! In short: `sessions` holds `last_seq`, the last seq handed out, `floor_seq` (what a clear or
//! the cap gave up) and `message_count`; the active messages of a session are the rows of
//! `messages` with a seq above `floor_seq`, and every read filters on that. Messages an edit
//! replaced move to `superseded_messages` (`0003_superseded_messages.sql`), in the edit's append
//! statement, so active reads never scan them.
//!
//! Costs, in statements sent to the server:
//! - `append`: one statement, whatever the batch size. A CTE bumps `last_seq` (which row-locks
//!   the session, so concurrent appenders to one session queue there and each gets a contiguous
//!   range), inserts every message from `unnest` arrays, trims past the cap and upserts the turn
//!   record. One statement is one implicit transaction: all of it or none.
//! - `get_session`, `list_sessions`, `read_page`, `last_n`, `turn_messages`, `get_turn`,
//!   `put_turn`, `delete_session`, `ping`: one statement each. Pages and windows are range scans
//!   of the messages primary key; a turn's messages, index scans of (tenant, session_id, turn_id, seq)
//!   on both message tables (`0004_turn_messages_index.sql`).
//! - `create_session`: one statement (two more only to replace an expired, not yet swept session).
//! - `clear`: one transaction of two statements (`begin`, update, delete, `commit`).
//! - Turn locks (`turn_locks`, one row per held session) and idempotency keys
//!   (`idempotency_keys`), both in `0002_turn_locks_and_idempotency.sql`: one statement per method.
//!   `acquire_turn_lock` and `begin_idempotent` are an `insert … on conflict do update … where
//!   <expired>` plus, in the same statement, a read of the row as it was; when a concurrent
//!   transaction committed the row after that statement's snapshot, the read finds nothing and the
//!   statement runs again (a fresh snapshot sees it). `begin_idempotent` also deletes the session's
//!   expired keys, and [`PgStore::sweep_expired`] everyone's.
//!
//! Every operation is bounded by `op_timeout` (pool acquire included) and fails with
//! [`StoreError::Unavailable`] when PostgreSQL cannot be reached, or [`StoreError::Unanswered`]
//! when a statement was sent but no answer came in time.
//!
//! # Files
//! - `mod.rs` (this file): the options, the store and its [`ConversationStore`] implementation.
//! - [`sql`]: every statement, one file each in `sql/*.sql`.
//! - [`pool`]: parley's own pool of connections ([`ConnPool`]), one round trip per statement.
//! - `rows.rs`: rows to sessions, messages and turns, and batches to column arrays.
//! - `errors.rs`: driver errors to store errors.

mod errors;
mod events;
pub mod pool;
mod rows;
pub mod sql;

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::postgres::PgConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, Connection, Row};
use uuid::Uuid;

pub use super::sql_common::SWEEP_BATCH;
use super::sql_common::{json_text, micros, page_of, spawn_sweeper, status_str, to_i64, to_u64};
use super::{
    AppendBatch, ConversationStore, FinishedTurn, FusedTurns, IdempotencyBegin, LeaseKey, LockOutcome,
    LockStatus, MessagePage, Order, PageQuery, SessionCursor, SessionPage, StoreBackend, StoreError,
    StoreResult, TurnBegin, TurnCoordinator,
};
use crate::domain::{Message, Metadata, NewSession, Session, Turn, WindowMessage};
use crate::redact::redact_url;
use errors::{db, is_foreign_key_violation, is_unique_violation, migrate_err};
pub use pool::ConnPool;
use rows::{Columns, decode, idempotency_record, message_from_row, session_from_row, turn_from_row};
use sql::*;

/// The embedded migrations (`migrations/`).
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Most lease renewals sent in one statement.
const RENEW_BATCH: usize = 1000;

/// A pooled connection idle this long is pinged before it is used again (see
/// [`pool`]); one used a moment ago is not: that would be a round trip per statement.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(10);

/// How to reach PostgreSQL and how the store behaves.
#[derive(Clone)]
pub struct PgOptions {
    /// Connection URL (`postgres://user:password@host:port/db`).
    pub url: String,
    /// Most connections in the pool (at least 1).
    pub pool_size: u32,
    /// Schema holding the tables, created by [`PgStore::migrate`] if missing and set as the
    /// `search_path` of every connection; `None` uses the server's default search path.
    pub schema: Option<String>,
    /// Most messages kept per session, the oldest going first; `None` (or 0) keeps all.
    pub max_messages: Option<usize>,
    /// Sessions idle this long expire (each write slides it); `None` (or zero) keeps them.
    pub ttl: Option<Duration>,
    /// Longest one store operation may take, waiting for a connection included.
    pub op_timeout: Duration,
}

/// The earliest `timestamptz` PostgreSQL accepts (4714-11-24 BC), in microseconds since 1970.
const PG_MIN_TIMESTAMP_MICROS: i64 = -210_866_803_200_000_000;

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &redact_url(&self.url))
            .field("pool_size", &self.pool_size)
            .field("schema", &self.schema)
            .field("max_messages", &self.max_messages)
            .field("ttl", &self.ttl)
            .field("op_timeout", &self.op_timeout)
            .finish()
    }
}

/// The PostgreSQL conversation store.
#[derive(Debug)]
pub struct PgStore {
    /// The connections every store operation runs on (see [`ConnPool`]).
    conns: ConnPool,
    /// A small sqlx pool for tests and tools ([`PgStore::pool`]), opened only if they use it.
    pool: PgPool,
    schema: Option<String>,
    /// The cap on messages per session, as bound to queries.
    max_messages: Option<i64>,
    /// The TTL in microseconds, as bound to queries.
    ttl_micros: Option<i64>,
    op_timeout: Duration,
    /// The connections event log appends run on (see [`events`]): two, opened on the first
    /// streamed turn, beside those of the turns themselves.
    event_conns: ConnPool,
    /// One connection, opened on the first follower, that `LISTEN`s for event log appends.
    listen_pool: PgPool,
    /// Where event log appends are announced ([`events::channel`]).
    events_channel: String,
    /// What wakes this process's followers of turn event logs.
    announcements: crate::store::event_log::Announcements,
}

impl PgStore {
    /// Builds the store without connecting: connections open on first use, so parley starts while
    /// PostgreSQL is down and reports it through [`StoreBackend::ping`]. Must be called
    /// within a Tokio runtime (the pool spawns its maintenance task).
    pub fn new(opts: PgOptions) -> StoreResult<Self> {
        Self::pinging_idle_after(opts, PING_IF_IDLE_FOR)
    }

    /// [`PgStore::new`], with pooled connections pinged before use once idle for `idle`
    /// (10 s in `new`; a dead connection found so is replaced before the statement runs).
    /// Store operations run on parley's own pool ([`ConnPool`]), which sends no other ping.
    pub fn pinging_idle_after(opts: PgOptions, idle: Duration) -> StoreResult<Self> {
        let mut connect = PgConnectOptions::from_str(&opts.url).map_err(|e| {
            StoreError::Backend(format!("invalid PostgreSQL URL {}: {e}", redact_url(&opts.url)))
        })?;
        connect = connect.application_name("parley");
        if let Some(schema) = &opts.schema {
            check_schema_name(schema)?;
            connect = connect.options([("search_path", schema)]);
        }
        let conns = ConnPool::new(connect.clone(), opts.pool_size as usize, opts.op_timeout, idle);
        // Tests and tools only: two connections, opened when first needed.
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(opts.op_timeout)
            .connect_lazy_with(connect.clone());
        let event_conns = ConnPool::new(connect.clone(), 2, opts.op_timeout, idle);
        let listen_pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(opts.op_timeout)
            .connect_lazy_with(connect.clone());
        Ok(PgStore {
            event_conns,
            listen_pool,
            events_channel: events::channel(opts.schema.as_deref()),
            announcements: crate::store::event_log::Announcements::new(),
            conns,
            pool,
            schema: opts.schema,
            max_messages: opts.max_messages.filter(|&m| m > 0).map(|m| i64::try_from(m).unwrap_or(i64::MAX)),
            ttl_micros: opts.ttl.filter(|t| !t.is_zero()).map(micros),
            op_timeout: opts.op_timeout,
        })
    }

    /// Creates the schema if one is configured and missing, then applies pending migrations.
    pub async fn migrate(&self) -> StoreResult<()> {
        // On the store's own pool: the connection that answered a readiness check a moment ago
        // serves the migrations too.
        let mut checkout = self.conns.checkout().await.map_err(db)?;
        let conn = checkout.conn();
        if let Some(schema) = &self.schema {
            let sql = format!("create schema if not exists \"{schema}\"");
            // The name was checked to be a plain identifier in `new`.
            sqlx::query(AssertSqlSafe(sql)).execute(&mut *conn).await.map_err(db)?;
        }
        // `run_direct` is `run` on a connection (sqlx provides it for spawned futures, where
        // `run`'s `Acquire` bound is "not general enough").
        MIGRATOR.run_direct(None, conn, false).await.map_err(migrate_err)?;
        checkout.settle(&Ok::<(), sqlx::Error>(()));
        Ok(())
    }

    /// A connection pool for tests and tools that need raw access (not the one store operations
    /// run on: see [`PgStore::conns`]).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The pool store operations run on.
    pub fn conns(&self) -> &ConnPool {
        &self.conns
    }

    /// Deletes every expired session (with its messages, turns, lock and idempotency keys), then
    /// every lapsed wait queue place and expired turn event log, then every expired idempotency key of the sessions left, [`SWEEP_BATCH`] per statement; returns
    /// how many sessions went.
    pub async fn sweep_expired(&self) -> StoreResult<u64> {
        let mut total = 0;
        loop {
            let done = self.timed(sqlx::query(SWEEP).bind(SWEEP_BATCH).execute(&self.conns)).await?;
            total += done.rows_affected();
            if done.rows_affected() < SWEEP_BATCH as u64 {
                break;
            }
        }
        loop {
            let query = sqlx::query(SWEEP_QUEUE).bind(SWEEP_BATCH);
            if self.timed(query.execute(&self.conns)).await?.rows_affected() < SWEEP_BATCH as u64 {
                break;
            }
        }
        loop {
            let query = sqlx::query(SWEEP_EVENT_LOGS).bind(SWEEP_BATCH);
            if self.timed(query.execute(&self.conns)).await?.rows_affected() < SWEEP_BATCH as u64 {
                break;
            }
        }
        loop {
            let query = sqlx::query(SWEEP_IDEMPOTENCY).bind(SWEEP_BATCH);
            if self.timed(query.execute(&self.conns)).await?.rows_affected() < SWEEP_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    /// Runs [`PgStore::sweep_expired`] every `every` (at least 10 ms) until the store is dropped
    /// or the handle aborted. Errors are logged and retried at the next tick.
    pub fn spawn_ttl_sweeper(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        spawn_sweeper(self, every, |store| async move { store.sweep_expired().await })
    }

    /// Bounds `fut` by the operation timeout, leaving the driver's error to the caller.
    async fn within<T>(
        &self,
        fut: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> StoreResult<Result<T, sqlx::Error>> {
        tokio::time::timeout(self.op_timeout, fut).await.map_err(|_| {
            StoreError::Unanswered(format!(
                "PostgreSQL did not answer within {} ms",
                self.op_timeout.as_millis()
            ))
        })
    }

    /// Bounds `fut` by the operation timeout and maps its error.
    /// Runs a lock claim within the operation timeout; a session deleted between the claim's
    /// check and its insert (a foreign-key violation) is not found.
    async fn claiming<T>(
        &self,
        work: impl Future<Output = Result<StoreResult<T>, sqlx::Error>>,
    ) -> StoreResult<T> {
        match self.within(work).await? {
            Ok(outcome) => outcome,
            Err(e) if is_foreign_key_violation(&e) => Err(StoreError::SessionNotFound),
            Err(e) => Err(db(e)),
        }
    }

    async fn timed<T>(&self, fut: impl Future<Output = Result<T, sqlx::Error>>) -> StoreResult<T> {
        self.within(fut).await?.map_err(db)
    }

    async fn insert_session(&self, tenant: &str, new: &NewSession) -> Result<PgRow, sqlx::Error> {
        sqlx::query(CREATE_SESSION)
            .bind(tenant)
            .bind(&new.id)
            .bind(new.system_prompt.as_deref())
            .bind(json_text(&new.metadata))
            .bind(self.ttl_micros)
            .fetch_one(&self.conns)
            .await
    }

    /// Clears a session's messages in one transaction on `conn`; false if the session is missing.
    async fn clear_on(
        &self,
        conn: &mut PgConnection,
        tenant: &str,
        session_id: &str,
    ) -> Result<bool, sqlx::Error> {
        let mut tx = conn.begin().await?;
        let last_seq: Option<i64> = sqlx::query_scalar(CLEAR_SESSION)
            .bind(tenant)
            .bind(session_id)
            .bind(self.ttl_micros)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(last_seq) = last_seq else {
            tx.rollback().await?;
            return Ok(false);
        };
        // A new statement, so a new snapshot: it sees every append that committed before the
        // update above took the session's lock.
        sqlx::query(CLEAR_MESSAGES).bind(tenant).bind(session_id).bind(last_seq).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Creates a session in one transaction on `conn` unless the tenant holds `max` live sessions
    /// or the id is taken: [`PgStore::create_holding_on`] with no messages.
    async fn create_within_on(
        &self,
        conn: &mut PgConnection,
        tenant: &str,
        new: &NewSession,
        max: u64,
    ) -> Result<Creation, sqlx::Error> {
        self.create_holding_on(conn, tenant, new, &[], max).await
    }

    /// Creates a session holding `messages` (seqs from 1) in one transaction on `conn`, unless the
    /// tenant holds `max` live sessions or the id is taken. Creations of one tenant take turns on
    /// an advisory lock, and each counts in a statement after taking it, so it sees every creation
    /// before it: none overshoots.
    async fn create_holding_on(
        &self,
        conn: &mut PgConnection,
        tenant: &str,
        new: &NewSession,
        messages: &[Message],
        max: u64,
    ) -> Result<Creation, sqlx::Error> {
        let mut tx = conn.begin().await?;
        sqlx::query(LOCK_TENANT_CREATIONS).bind(tenant).execute(&mut *tx).await?;
        let held: i64 = sqlx::query_scalar(COUNT_SESSIONS).bind(tenant).fetch_one(&mut *tx).await?;
        if to_u64(held) >= max {
            tx.rollback().await?;
            return Ok(Creation::LimitReached);
        }
        sqlx::query(DROP_EXPIRED).bind(tenant).bind(&new.id).execute(&mut *tx).await?;
        let n = messages.len() as i64;
        let kept = self.max_messages.map_or(n, |cap| n.min(cap));
        let row = sqlx::query(CREATE_SESSION_HOLDING)
            .bind(tenant)
            .bind(&new.id)
            .bind(new.system_prompt.as_deref())
            .bind(json_text(&new.metadata))
            .bind(self.ttl_micros)
            .bind(n)
            .bind(kept)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(Creation::Exists);
        };
        if !messages.is_empty() {
            let cols = Columns::of(messages);
            sqlx::query(INSERT_MESSAGES)
                .bind(tenant)
                .bind(&new.id)
                .bind(n - kept)
                .bind(&cols.ids)
                .bind(&cols.turn_ids)
                .bind(&cols.roles)
                .bind(&cols.contents)
                .bind(&cols.metadata)
                .bind(&cols.tool_calls)
                .bind(&cols.tool_call_ids)
                .bind(&cols.names)
                .bind(&cols.created_at)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(Creation::Created(row))
    }

    /// Deletes the session if it has expired but was not swept yet; true if it did.
    async fn drop_if_expired(&self, tenant: &str, id: &str) -> StoreResult<bool> {
        let done = self.timed(sqlx::query(DROP_EXPIRED).bind(tenant).bind(id).execute(&self.conns)).await?;
        Ok(done.rows_affected() > 0)
    }

    /// Reads a window of messages: `(after, before)` exclusive, `limit` rows in `order`.
    /// `None` if the session does not exist.
    /// Appends a batch ([`APPEND`]), or ends a turn ([`FINISH_TURN`]) when `release` names the
    /// turn whose lock to release with it.
    async fn append_releasing(
        &self,
        tenant: &str,
        session_id: &str,
        batch: AppendBatch,
        fence: Option<Uuid>,
        release: Option<Uuid>,
    ) -> StoreResult<Vec<Message>> {
        let n = batch.messages.len() as i64;
        let cols = Columns::of(&batch.messages);
        let turn = batch.turn.as_ref();
        let fence = release.or(fence);
        let query =
            sqlx::query_as::<_, (Option<i64>, bool)>(if release.is_some() { FINISH_TURN } else { APPEND })
                .bind(tenant)
                .bind(session_id)
                .bind(n)
                .bind(self.max_messages)
                .bind(self.ttl_micros)
                .bind(&cols.ids)
                .bind(&cols.turn_ids)
                .bind(&cols.roles)
                .bind(&cols.contents)
                .bind(&cols.metadata)
                .bind(&cols.tool_calls)
                .bind(&cols.tool_call_ids)
                .bind(&cols.names)
                .bind(&cols.created_at)
                .bind(turn.map(|t| t.id))
                .bind(turn.map(|t| status_str(t.status)))
                .bind(turn.and_then(|t| t.error.as_ref()).map(json_text))
                .bind(turn.map(|t| t.message_ids.clone()))
                .bind(turn.and_then(|t| t.usage).map(Json))
                .bind(turn.map(|t| t.created_at))
                .bind(turn.and_then(|t| t.completed_at))
                .bind(fence)
                .bind(batch.supersede_from.map(to_i64));
        let last_seq = match self.timed(query.fetch_one(&self.conns)).await? {
            (Some(last_seq), _) => last_seq,
            (None, true) => return Err(StoreError::Fenced),
            (None, false) => return Err(StoreError::SessionNotFound),
        };
        let first = to_u64(last_seq - n) + 1;
        let mut stored = batch.messages;
        for (i, m) in stored.iter_mut().enumerate() {
            m.seq = first + i as u64;
            if m.session_id != session_id {
                m.session_id = session_id.to_owned();
            }
        }
        Ok(stored)
    }

    async fn window(
        &self,
        tenant: &str,
        session_id: &str,
        (order, include_superseded): (Order, bool),
        (after, before): (u64, u64),
        limit: usize,
    ) -> StoreResult<Option<Vec<Message>>> {
        let sql = match (order, include_superseded) {
            (Order::Asc, false) => PAGE_ASC,
            (Order::Desc, false) => PAGE_DESC,
            (Order::Asc, true) => PAGE_ALL_ASC,
            (Order::Desc, true) => PAGE_ALL_DESC,
        };
        let rows = self
            .timed(
                sqlx::query(sql)
                    .bind(tenant)
                    .bind(session_id)
                    .bind(to_i64(after))
                    .bind(to_i64(before))
                    .bind(to_i64(limit as u64))
                    .fetch_all(&self.conns),
            )
            .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut messages = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Some(message) = message_from_row(row, session_id)? {
                messages.push(message);
            }
        }
        Ok(Some(messages))
    }
}

/// How often an acquire or begin runs again when its snapshot could not tell who holds the lock
/// or key (another transaction changed it concurrently); in practice once is enough.
const ATTEMPTS: usize = 5;

/// What a capped session creation did.
enum Creation {
    Created(PgRow),
    Exists,
    LimitReached,
}

/// What one statement claiming a session's lock found.
enum Claim {
    /// No such session.
    Missing,
    /// The lock is ours.
    Acquired,
    /// Another turn holds it.
    Busy(Uuid),
    /// The holder committed after this statement's snapshot and shows as none: ask again.
    Retry,
}

/// Reads a claim statement's `found`, `acquired` and `holder` columns for turn `me`.
fn claim(found: bool, acquired: bool, holder: Option<Uuid>, me: Uuid) -> Claim {
    match (found, acquired, holder) {
        (false, _, _) => Claim::Missing,
        (true, true, _) => Claim::Acquired,
        (true, false, Some(other)) if other != me => Claim::Busy(other),
        _ => Claim::Retry,
    }
}

/// The claim still found no holder after [`ATTEMPTS`] statements.
fn lock_kept_changing_hands() -> StoreError {
    StoreError::Backend("the turn lock kept changing hands; try again".into())
}

/// Accepts only plain lowercase identifiers, so the name needs no quoting anywhere.
fn check_schema_name(schema: &str) -> StoreResult<()> {
    let mut chars = schema.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if first_ok && rest_ok && schema.len() <= 63 {
        Ok(())
    } else {
        Err(StoreError::Backend(format!(
            "invalid PostgreSQL schema name {schema:?}: use [a-z_][a-z0-9_]*, at most 63 characters"
        )))
    }
}

#[async_trait]
impl StoreBackend for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn is_distributed(&self) -> bool {
        true
    }

    async fn ping(&self) -> StoreResult<()> {
        self.timed(sqlx::query("select 1").execute(&self.conns)).await.map(|_| ())
    }
}

#[async_trait]
impl ConversationStore for PgStore {
    async fn create_session(&self, tenant: &str, new: NewSession) -> StoreResult<Session> {
        let row = match self.within(self.insert_session(tenant, &new)).await? {
            Ok(row) => row,
            Err(e) if is_unique_violation(&e) => {
                // The id may belong to an expired session the sweeper has not reached yet.
                if !self.drop_if_expired(tenant, &new.id).await? {
                    return Err(StoreError::SessionExists);
                }
                match self.within(self.insert_session(tenant, &new)).await? {
                    Err(e) if is_unique_violation(&e) => return Err(StoreError::SessionExists),
                    other => other.map_err(db)?,
                }
            }
            Err(e) => return Err(db(e)),
        };
        session_from_row(&row)
    }

    async fn create_session_within(&self, tenant: &str, new: NewSession, max: u64) -> StoreResult<Session> {
        let work = async {
            let mut checkout = self.conns.checkout().await?;
            let outcome = self.create_within_on(checkout.conn(), tenant, &new, max).await;
            checkout.settle(&outcome);
            outcome
        };
        match self.timed(work).await? {
            Creation::Created(row) => session_from_row(&row),
            Creation::Exists => Err(StoreError::SessionExists),
            Creation::LimitReached => Err(StoreError::SessionLimitReached(max)),
        }
    }

    async fn create_session_with(
        &self,
        tenant: &str,
        new: NewSession,
        mut messages: Vec<Message>,
        max: u64,
    ) -> StoreResult<(Session, Vec<Message>)> {
        let work = async {
            let mut checkout = self.conns.checkout().await?;
            let outcome = self.create_holding_on(checkout.conn(), tenant, &new, &messages, max).await;
            checkout.settle(&outcome);
            outcome
        };
        let session = match self.timed(work).await? {
            Creation::Created(row) => session_from_row(&row)?,
            Creation::Exists => return Err(StoreError::SessionExists),
            Creation::LimitReached => return Err(StoreError::SessionLimitReached(max)),
        };
        for (m, seq) in messages.iter_mut().zip(1..) {
            m.seq = seq;
            m.session_id.clone_from(&new.id);
        }
        Ok((session, messages))
    }

    async fn get_session(&self, tenant: &str, id: &str) -> StoreResult<Option<Session>> {
        let row =
            self.timed(sqlx::query(GET_SESSION).bind(tenant).bind(id).fetch_optional(&self.conns)).await?;
        row.as_ref().map(session_from_row).transpose()
    }

    async fn list_sessions(
        &self,
        tenant: &str,
        limit: usize,
        cursor: Option<&SessionCursor>,
    ) -> StoreResult<SessionPage> {
        let fetch = to_i64(limit as u64).saturating_add(1);
        let query = match cursor {
            None => sqlx::query(LIST_FIRST).bind(tenant).bind(fetch),
            Some(c) => {
                // PostgreSQL refuses timestamps before 4714 BC; no session is older, so a cursor
                // there lists the same (nothing) from the earliest one it accepts.
                let micros = c.updated_at_micros.max(PG_MIN_TIMESTAMP_MICROS);
                let at = DateTime::<Utc>::from_timestamp_micros(micros).ok_or(StoreError::InvalidCursor)?;
                sqlx::query(LIST_AFTER).bind(tenant).bind(fetch).bind(at).bind(c.id.as_str())
            }
        };
        let (rows, has_more) = page_of(self.timed(query.fetch_all(&self.conns)).await?, limit);
        let sessions = rows.iter().map(session_from_row).collect::<StoreResult<Vec<_>>>()?;
        Ok(SessionPage { sessions, has_more })
    }

    async fn delete_session(&self, tenant: &str, id: &str) -> StoreResult<bool> {
        let query = sqlx::query_scalar::<_, bool>(DELETE_SESSION).bind(tenant).bind(id);
        Ok(self.timed(query.fetch_optional(&self.conns)).await?.unwrap_or(false))
    }

    async fn set_session_metadata(
        &self,
        tenant: &str,
        id: &str,
        metadata: Metadata,
    ) -> StoreResult<Option<Session>> {
        let query = sqlx::query(SET_SESSION_METADATA)
            .bind(tenant)
            .bind(id)
            .bind(json_text(&metadata))
            .bind(self.ttl_micros);
        let row = self.timed(query.fetch_optional(&self.conns)).await?;
        row.as_ref().map(session_from_row).transpose()
    }

    async fn append(&self, tenant: &str, session_id: &str, batch: AppendBatch) -> StoreResult<Vec<Message>> {
        self.append_releasing(tenant, session_id, batch, None, None).await
    }

    async fn read_page(&self, tenant: &str, session_id: &str, query: PageQuery) -> StoreResult<MessagePage> {
        let bounds = (query.after.unwrap_or(0), query.before.unwrap_or(u64::MAX));
        let fetch = query.limit.saturating_add(1);
        let fetched = self
            .window(tenant, session_id, (query.order, query.include_superseded), bounds, fetch)
            .await?
            .ok_or(StoreError::SessionNotFound)?;
        let (messages, has_more) = page_of(fetched, query.limit);
        Ok(MessagePage { messages, has_more })
    }

    async fn last_n(&self, tenant: &str, session_id: &str, n: usize) -> StoreResult<Vec<Message>> {
        let mut messages = self
            .window(tenant, session_id, (Order::Desc, false), (0, u64::MAX), n)
            .await?
            .ok_or(StoreError::SessionNotFound)?;
        messages.reverse();
        Ok(messages)
    }

    async fn turn_messages(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
    ) -> StoreResult<Vec<Message>> {
        let query = sqlx::query(TURN_MESSAGES).bind(tenant).bind(session_id).bind(turn_id);
        let rows = self.timed(query.fetch_all(&self.conns)).await?;
        if rows.is_empty() {
            return Err(StoreError::SessionNotFound);
        }
        let mut messages = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Some(message) = message_from_row(row, session_id)? {
                messages.push(message);
            }
        }
        Ok(messages)
    }

    async fn clear(&self, tenant: &str, session_id: &str) -> StoreResult<()> {
        let work = async {
            let mut checkout = self.conns.checkout().await?;
            let outcome = self.clear_on(checkout.conn(), tenant, session_id).await;
            checkout.settle(&outcome);
            outcome
        };
        if self.timed(work).await? { Ok(()) } else { Err(StoreError::SessionNotFound) }
    }

    async fn put_turn(&self, tenant: &str, turn: &Turn) -> StoreResult<()> {
        let query = sqlx::query(PUT_TURN)
            .bind(tenant)
            .bind(&turn.session_id)
            .bind(turn.id)
            .bind(status_str(turn.status))
            .bind(turn.error.as_ref().map(json_text))
            .bind(&turn.message_ids)
            .bind(turn.usage.map(Json))
            .bind(turn.created_at)
            .bind(turn.completed_at);
        let found = match self.within(query.fetch_one(&self.conns)).await? {
            Ok(row) => row.try_get::<bool, _>(0).map_err(decode)?,
            // The session was deleted between the check and the insert.
            Err(e) if is_foreign_key_violation(&e) => return Err(StoreError::SessionNotFound),
            Err(e) => return Err(db(e)),
        };
        if found { Ok(()) } else { Err(StoreError::SessionNotFound) }
    }

    async fn get_turn(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<Option<Turn>> {
        let query = sqlx::query(GET_TURN).bind(tenant).bind(session_id).bind(turn_id);
        let row = self.timed(query.fetch_optional(&self.conns)).await?;
        row.map(|r| turn_from_row(&r, session_id)).transpose()
    }

    async fn count_sessions(&self, tenant: &str) -> StoreResult<u64> {
        let query = sqlx::query_scalar::<_, i64>(COUNT_SESSIONS).bind(tenant);
        Ok(to_u64(self.timed(query.fetch_one(&self.conns)).await?))
    }
}

#[async_trait]
impl TurnCoordinator for PgStore {
    async fn acquire_turn_lock(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<LockOutcome> {
        let work = async {
            for _ in 0..ATTEMPTS {
                let (found, acquired, holder): (bool, bool, Option<Uuid>) = sqlx::query_as(ACQUIRE_LOCK)
                    .bind(tenant)
                    .bind(session_id)
                    .bind(turn_id)
                    .bind(micros(lease))
                    .fetch_one(&self.conns)
                    .await?;
                match claim(found, acquired, holder, turn_id) {
                    Claim::Missing => return Ok(Err(StoreError::SessionNotFound)),
                    Claim::Acquired => return Ok(Ok(LockOutcome::Acquired)),
                    Claim::Busy(other) => return Ok(Ok(LockOutcome::Busy(other))),
                    Claim::Retry => {}
                }
            }
            Ok(Err(lock_kept_changing_hands()))
        };
        self.claiming(work).await
    }

    async fn renew_turn_lock(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<LockStatus> {
        let query = sqlx::query_scalar::<_, bool>(RENEW_LOCK)
            .bind(tenant)
            .bind(session_id)
            .bind(turn_id)
            .bind(micros(lease));
        Ok(match self.timed(query.fetch_optional(&self.conns)).await? {
            Some(cancel_requested) => LockStatus { held: true, cancel_requested },
            None => LockStatus { held: false, cancel_requested: false },
        })
    }

    async fn renew_turn_locks(&self, turns: &[LeaseKey], lease: Duration) -> StoreResult<Vec<LockStatus>> {
        let mut statuses = Vec::with_capacity(turns.len());
        for chunk in turns.chunks(RENEW_BATCH) {
            let tenants: Vec<&str> = chunk.iter().map(|t| t.tenant.as_str()).collect();
            let sessions: Vec<&str> = chunk.iter().map(|t| t.session_id.as_str()).collect();
            let ids: Vec<Uuid> = chunk.iter().map(|t| t.turn_id).collect();
            let query = sqlx::query_as::<_, (i64, bool)>(RENEW_LOCKS)
                .bind(tenants)
                .bind(sessions)
                .bind(ids)
                .bind(micros(lease));
            let renewed = self.timed(query.fetch_all(&self.conns)).await?;
            let mut chunk_statuses = vec![LockStatus { held: false, cancel_requested: false }; chunk.len()];
            for (ord, cancel_requested) in renewed {
                if let Some(status) = usize::try_from(ord - 1).ok().and_then(|i| chunk_statuses.get_mut(i)) {
                    *status = LockStatus { held: true, cancel_requested };
                }
            }
            statuses.extend(chunk_statuses);
        }
        Ok(statuses)
    }

    async fn release_turn_lock(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<()> {
        let query = sqlx::query(RELEASE_LOCK).bind(tenant).bind(session_id).bind(turn_id);
        self.timed(query.execute(&self.conns)).await.map(|_| ())
    }

    async fn turn_lock_holder(&self, tenant: &str, session_id: &str) -> StoreResult<Option<Uuid>> {
        let query = sqlx::query_scalar::<_, Option<Uuid>>(LOCK_HOLDER).bind(tenant).bind(session_id);
        self.timed(query.fetch_optional(&self.conns)).await?.ok_or(StoreError::SessionNotFound)
    }

    async fn join_queue(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<bool> {
        let query = sqlx::query(JOIN_QUEUE).bind(tenant).bind(session_id).bind(turn_id).bind(micros(lease));
        self.timed(query.execute(&self.conns)).await.map(|_| true)
    }

    async fn first_in_queue(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<bool> {
        let query = sqlx::query_scalar::<_, bool>(FIRST_IN_QUEUE)
            .bind(tenant)
            .bind(session_id)
            .bind(turn_id)
            .bind(micros(lease));
        self.timed(query.fetch_one(&self.conns)).await
    }

    async fn leave_queue(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<()> {
        let query = sqlx::query(LEAVE_QUEUE).bind(tenant).bind(session_id).bind(turn_id);
        self.timed(query.execute(&self.conns)).await.map(drop)
    }

    async fn request_cancel(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<bool> {
        let query =
            sqlx::query_as::<_, (bool, bool)>(CANCEL_LOCK).bind(tenant).bind(session_id).bind(turn_id);
        match self.timed(query.fetch_one(&self.conns)).await? {
            (false, _) => Err(StoreError::SessionNotFound),
            (true, flagged) => Ok(flagged),
        }
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
        type Found = (bool, bool, Option<String>, Option<Uuid>, Option<String>);
        let work = async {
            for _ in 0..ATTEMPTS {
                let found: Found = sqlx::query_as(BEGIN_IDEMPOTENT)
                    .bind(tenant)
                    .bind(session_id)
                    .bind(key)
                    .bind(fingerprint)
                    .bind(turn_id)
                    .bind(micros(ttl))
                    .fetch_one(&self.conns)
                    .await?;
                match found {
                    (false, ..) => return Ok(Err(StoreError::SessionNotFound)),
                    (true, true, ..) => return Ok(Ok(IdempotencyBegin::Started)),
                    (true, false, Some(fingerprint), Some(turn_id), response) => {
                        return Ok(idempotency_record(fingerprint, turn_id, response));
                    }
                    // The record committed after this statement's snapshot: ask again.
                    _ => {}
                }
            }
            Ok(Err(StoreError::Backend("the idempotency key kept changing; try again".into())))
        };
        match self.within(work).await? {
            Ok(outcome) => outcome,
            Err(e) if is_foreign_key_violation(&e) => Err(StoreError::SessionNotFound),
            Err(e) => Err(db(e)),
        }
    }

    async fn complete_idempotent(
        &self,
        tenant: &str,
        session_id: &str,
        key: &str,
        response: &serde_json::Value,
        ttl: Duration,
    ) -> StoreResult<()> {
        let query = sqlx::query_scalar::<_, bool>(COMPLETE_IDEMPOTENT)
            .bind(tenant)
            .bind(session_id)
            .bind(key)
            .bind(json_text(response))
            .bind(micros(ttl));
        if self.timed(query.fetch_one(&self.conns)).await? {
            Ok(())
        } else {
            Err(StoreError::SessionNotFound)
        }
    }

    async fn abort_idempotent(&self, tenant: &str, session_id: &str, key: &str) -> StoreResult<()> {
        let query = sqlx::query(ABORT_IDEMPOTENT).bind(tenant).bind(session_id).bind(key);
        self.timed(query.execute(&self.conns)).await.map(|_| ())
    }

    fn event_log(&self) -> Option<&dyn crate::store::event_log::TurnEventLog> {
        Some(self)
    }
}

#[async_trait]
impl FusedTurns for PgStore {
    async fn begin_turn(
        &self,
        tenant: &str,
        turn: &Turn,
        window: usize,
        lease: Duration,
    ) -> StoreResult<TurnBegin> {
        let session_id = turn.session_id.as_str();
        let work = async {
            for _ in 0..ATTEMPTS {
                let rows = sqlx::query(BEGIN_TURN)
                    .bind(tenant)
                    .bind(session_id)
                    .bind(turn.id)
                    .bind(micros(lease))
                    .bind(to_i64(window as u64))
                    .bind(status_str(turn.status))
                    .bind(turn.error.as_ref().map(json_text))
                    .bind(&turn.message_ids)
                    .bind(turn.usage.map(Json))
                    .bind(turn.created_at)
                    .bind(turn.completed_at)
                    .fetch_all(&self.conns)
                    .await?;
                let Some(head) = rows.first() else { return Ok(Err(StoreError::Backend("no row".into()))) };
                let found: bool = head.try_get("found")?;
                let acquired: bool = head.try_get("acquired")?;
                let holder: Option<Uuid> = head.try_get("holder")?;
                match claim(found, acquired, holder, turn.id) {
                    Claim::Missing => return Ok(Err(StoreError::SessionNotFound)),
                    Claim::Acquired => {
                        let system_prompt: Option<String> = head.try_get("system_prompt")?;
                        let mut messages = Vec::with_capacity(rows.len());
                        for row in &rows {
                            match message_from_row(row, session_id) {
                                Ok(Some(message)) => messages.push(WindowMessage::from(message)),
                                Ok(None) => {}
                                Err(e) => return Ok(Err(e)),
                            }
                        }
                        return Ok(Ok(TurnBegin::Started { system_prompt, window: messages }));
                    }
                    Claim::Busy(other) => return Ok(Ok(TurnBegin::Busy(other))),
                    Claim::Retry => {}
                }
            }
            Ok(Err(lock_kept_changing_hands()))
        };
        self.claiming(work).await
    }

    async fn append_fenced(
        &self,
        tenant: &str,
        session_id: &str,
        batch: AppendBatch,
        turn_id: Uuid,
    ) -> StoreResult<Vec<Message>> {
        self.append_releasing(tenant, session_id, batch, Some(turn_id), None).await
    }

    async fn finish_turn(
        &self,
        tenant: &str,
        session_id: &str,
        batch: AppendBatch,
        turn_id: Uuid,
    ) -> StoreResult<FinishedTurn> {
        let messages = self.append_releasing(tenant, session_id, batch, None, Some(turn_id)).await?;
        Ok(FinishedTurn { messages, lock_released: true })
    }
}
