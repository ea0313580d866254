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
//! - `get_session`, `list_sessions`, `read_page`, `last_n`, `get_turn`, `put_turn`,
//!   `delete_session`, `ping`: one statement each. Pages and windows are range scans of the
//!   messages primary key.
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

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::PgConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, Connection, Row};

use super::pgpool::ConnPool;
use uuid::Uuid;

use super::{
    AppendBatch, ConversationStore, FinishedTurn, IdempotencyBegin, IdempotencyRecord, LeaseKey, LockOutcome,
    LockStatus, MessagePage, Order, PageQuery, SessionCursor, SessionPage, StoreError, StoreResult,
    TurnBegin,
};
use crate::config::redact_url;
use crate::domain::{
    Message, Metadata, NewSession, Role, Session, ToolCall, Turn, TurnStatus, Usage, WindowMessage,
};
use sql::*;

/// The embedded migrations (`migrations/`).
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Most expired sessions the sweeper deletes in one statement.
pub const SWEEP_BATCH: i64 = 500;

/// Most lease renewals sent in one statement.
const RENEW_BATCH: usize = 1000;

/// A pooled connection idle this long is pinged before it is used again (see
/// [`super::pgpool`]); one used a moment ago is not: that would be a round trip per statement.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(10);

/// Longest TTL applied (about 1000 years), so that `now() + ttl` stays a valid timestamp.
const MAX_TTL_MICROS: i64 = 1000 * 366 * 24 * 3600 * 1_000_000;

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
}

impl PgStore {
    /// Builds the store without connecting: connections open on first use, so parley starts while
    /// PostgreSQL is down and reports it through [`ConversationStore::ping`]. Must be called
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
            .connect_lazy_with(connect);
        Ok(PgStore {
            conns,
            pool,
            schema: opts.schema,
            max_messages: opts.max_messages.filter(|&m| m > 0).map(|m| i64::try_from(m).unwrap_or(i64::MAX)),
            ttl_micros: opts
                .ttl
                .filter(|t| !t.is_zero())
                .map(|t| i64::try_from(t.as_micros()).unwrap_or(i64::MAX).min(MAX_TTL_MICROS)),
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
    /// every expired idempotency key of the sessions left, [`SWEEP_BATCH`] per statement; returns
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
            let query = sqlx::query(SWEEP_IDEMPOTENCY).bind(SWEEP_BATCH);
            if self.timed(query.execute(&self.conns)).await?.rows_affected() < SWEEP_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    /// Runs [`PgStore::sweep_expired`] every `every` (at least 10 ms) until the store is dropped
    /// or the handle aborted. Errors are logged and retried at the next tick.
    pub fn spawn_ttl_sweeper(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let store = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(store) = store.upgrade() else { return };
                match store.sweep_expired().await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(sessions = n, "swept expired sessions"),
                    Err(error) => tracing::warn!(%error, "sweeping expired sessions failed"),
                }
            }
        })
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
        release: Option<Uuid>,
    ) -> StoreResult<Vec<Message>> {
        let n = batch.messages.len() as i64;
        let cols = Columns::of(&batch.messages);
        let turn = batch.turn.as_ref();
        let fence = release.or(batch.fence);
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

/// A lease or ttl in microseconds, as bound to queries: at most [`MAX_TTL_MICROS`].
fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX).min(MAX_TTL_MICROS)
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

/// Maps a driver error: unreachable server or exhausted pool is `Unavailable`, the rest `Backend`.
/// No message carries the connection URL.
fn db(error: sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    match error {
        E::PoolTimedOut => StoreError::Unavailable("no PostgreSQL connection available in time".to_owned()),
        E::PoolClosed => StoreError::Unavailable("the PostgreSQL pool is closed".to_owned()),
        // Refused or unroutable: nothing was sent.
        E::Io(e) if is_unreached(&e) => StoreError::Unavailable(format!("cannot reach PostgreSQL: {e}")),
        // Lost mid-statement: whether it committed is unknown.
        E::Io(e) => StoreError::Unanswered(format!("lost PostgreSQL: {e}")),
        E::Tls(e) => StoreError::Unavailable(format!("TLS with PostgreSQL failed: {e}")),
        E::WorkerCrashed => StoreError::Unanswered("the PostgreSQL connection worker crashed".to_owned()),
        E::Database(e) if e.code().is_some_and(|c| is_unavailable_code(&c)) => {
            StoreError::Unavailable(format!("PostgreSQL: {}", e.message()))
        }
        other => StoreError::Backend(other.to_string()),
    }
}

/// Whether an I/O error means the server was never reached (so no statement was sent).
fn is_unreached(error: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        error.kind(),
        K::ConnectionRefused | K::NotFound | K::AddrNotAvailable | K::HostUnreachable | K::NetworkUnreachable
    )
}

/// SQLSTATEs that mean "the server cannot serve now": connection exceptions, shutdown, too many
/// connections, statement timeout.
fn is_unavailable_code(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300" | "57014")
}

fn migrate_err(error: MigrateError) -> StoreError {
    match error {
        MigrateError::Execute(e) => db(e),
        other => StoreError::Backend(format!("migration failed: {other}")),
    }
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    error.as_database_error().is_some_and(|e| e.is_unique_violation())
}

fn is_foreign_key_violation(error: &sqlx::Error) -> bool {
    error.as_database_error().is_some_and(|e| e.is_foreign_key_violation())
}

/// JSON text exactly as serde writes it (key order kept); bound as text and cast to `json`.
fn json_text<T: serde::Serialize + ?Sized>(value: &T) -> String {
    // Serialising maps with string keys and serde_json values cannot fail.
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn decode(error: sqlx::Error) -> StoreError {
    StoreError::Backend(format!("unexpected row from PostgreSQL: {error}"))
}

fn session_from_row(row: &PgRow) -> StoreResult<Session> {
    let metadata: Json<Metadata> = row.try_get("metadata").map_err(decode)?;
    let count: i64 = row.try_get("message_count").map_err(decode)?;
    Ok(Session {
        id: row.try_get("id").map_err(decode)?,
        created_at: row.try_get("created_at").map_err(decode)?,
        updated_at: row.try_get("updated_at").map_err(decode)?,
        system_prompt: row.try_get("system_prompt").map_err(decode)?,
        metadata: metadata.0,
        message_count: to_u64(count),
    })
}

/// The message of a `left join lateral` row, or `None` when the session has none.
fn message_from_row(row: &PgRow, session_id: &str) -> StoreResult<Option<Message>> {
    let Some(seq) = row.try_get::<Option<i64>, _>("seq").map_err(decode)? else {
        return Ok(None);
    };
    let role: String = row.try_get("role").map_err(decode)?;
    let metadata: Json<Metadata> = row.try_get("metadata").map_err(decode)?;
    let tool_calls: Option<Json<Vec<ToolCall>>> = row.try_get("tool_calls").map_err(decode)?;
    Ok(Some(Message {
        id: row.try_get("id").map_err(decode)?,
        session_id: session_id.to_owned(),
        seq: to_u64(seq),
        turn_id: row.try_get("turn_id").map_err(decode)?,
        role: parse_role(&role)?,
        content: row.try_get("content").map_err(decode)?,
        metadata: metadata.0,
        tool_calls: tool_calls.map(|c| c.0),
        tool_call_id: row.try_get("tool_call_id").map_err(decode)?,
        name: row.try_get("name").map_err(decode)?,
        created_at: row.try_get("created_at").map_err(decode)?,
        // Only the superseded view selects the column.
        superseded_by: row.try_get::<Option<Uuid>, _>("superseded_by").unwrap_or(None),
    }))
}

fn turn_from_row(row: &PgRow, session_id: &str) -> StoreResult<Turn> {
    let status: String = row.try_get("status").map_err(decode)?;
    let error: Option<Json<serde_json::Value>> = row.try_get("error").map_err(decode)?;
    let usage: Option<Json<Usage>> = row.try_get("usage").map_err(decode)?;
    Ok(Turn {
        id: row.try_get("id").map_err(decode)?,
        session_id: session_id.to_owned(),
        status: parse_status(&status)?,
        error: error.map(|e| e.0),
        message_ids: row.try_get("message_ids").map_err(decode)?,
        usage: usage.map(|u| u.0),
        created_at: row.try_get("created_at").map_err(decode)?,
        completed_at: row.try_get("completed_at").map_err(decode)?,
    })
}

/// An existing idempotency record from its columns (the response as stored JSON text).
fn idempotency_record(
    fingerprint: String,
    turn_id: Uuid,
    response: Option<String>,
) -> StoreResult<IdempotencyBegin> {
    let response = response
        .map(|text| serde_json::from_str(&text))
        .transpose()
        .map_err(|e| StoreError::Backend(format!("stored idempotent response is not JSON: {e}")))?;
    Ok(IdempotencyBegin::Existing(IdempotencyRecord { fingerprint, turn_id, response }))
}

fn parse_role(text: &str) -> StoreResult<Role> {
    match text {
        "system" => Ok(Role::System),
        "user" => Ok(Role::User),
        "assistant" => Ok(Role::Assistant),
        "tool" => Ok(Role::Tool),
        other => Err(StoreError::Backend(format!("unknown message role {other:?} in PostgreSQL"))),
    }
}

fn status_str(status: TurnStatus) -> &'static str {
    match status {
        TurnStatus::Running => "running",
        TurnStatus::Completed => "completed",
        TurnStatus::Failed => "failed",
        TurnStatus::Cancelled => "cancelled",
    }
}

fn parse_status(text: &str) -> StoreResult<TurnStatus> {
    match text {
        "running" => Ok(TurnStatus::Running),
        "completed" => Ok(TurnStatus::Completed),
        "failed" => Ok(TurnStatus::Failed),
        "cancelled" => Ok(TurnStatus::Cancelled),
        other => Err(StoreError::Backend(format!("unknown turn status {other:?} in PostgreSQL"))),
    }
}

/// A batch split into one array per column, for `unnest`.
struct Columns<'a> {
    ids: Vec<Uuid>,
    turn_ids: Vec<Uuid>,
    roles: Vec<&'static str>,
    contents: Vec<&'a str>,
    metadata: Vec<String>,
    tool_calls: Vec<Option<String>>,
    tool_call_ids: Vec<Option<&'a str>>,
    names: Vec<Option<&'a str>>,
    created_at: Vec<DateTime<Utc>>,
}

impl<'a> Columns<'a> {
    fn of(messages: &'a [Message]) -> Self {
        Columns {
            ids: messages.iter().map(|m| m.id).collect(),
            turn_ids: messages.iter().map(|m| m.turn_id).collect(),
            roles: messages.iter().map(|m| m.role.as_str()).collect(),
            contents: messages.iter().map(|m| m.content.as_str()).collect(),
            metadata: messages.iter().map(|m| json_text(&m.metadata)).collect(),
            tool_calls: messages.iter().map(|m| m.tool_calls.as_ref().map(json_text)).collect(),
            tool_call_ids: messages.iter().map(|m| m.tool_call_id.as_deref()).collect(),
            names: messages.iter().map(|m| m.name.as_deref()).collect(),
            created_at: messages.iter().map(|m| m.created_at).collect(),
        }
    }
}

/// The `on conflict` clause that makes a turn insert replace the record, unless the record is
/// terminal already: a turn's outcome, once written, never changes.
macro_rules! turn_upsert {
    () => {
        " on conflict (tenant, session_id, id) do update set status = excluded.status, \
         error = excluded.error, message_ids = excluded.message_ids, usage = excluded.usage, \
         created_at = excluded.created_at, completed_at = excluded.completed_at \
         where turns.status = 'running'"
    };
}

/// The filter every read applies to a session row aliased `s`.
macro_rules! live {
    () => {
        "(s.expires_at is null or s.expires_at > now())"
    };
}

/// One page of messages in direction `$dir`: a range scan of the messages primary key, joined
/// to the live session so that a missing session yields no row and an empty one yields one row
/// of nulls. Binds: tenant, session, after, before, limit.
macro_rules! page_sql {
    ($dir:literal) => {
        concat!(
            "select m.* from sessions s left join lateral (",
            " select seq, id, turn_id, role, content, metadata, tool_calls, tool_call_id, name, created_at",
            " from messages",
            " where tenant = s.tenant and session_id = s.id",
            " and seq > s.floor_seq and seq > $3 and seq < $4",
            " order by seq ",
            $dir,
            " limit $5",
            ") m on true where s.tenant = $1 and s.id = $2 and ",
            live!(),
            " order by m.seq ",
            $dir
        )
    };
}

/// The one-statement append (see [`sql::APPEND`]), with `$release` spliced in as a last CTE
/// (empty, or the lock release of [`sql::FINISH_TURN`]).
macro_rules! append_sql {
    ($release:literal) => {
        concat!(
            "with fence as (",
            " select 1 from turn_locks where $22::uuid is not null and tenant = $1 and session_id = $2",
            " and turn_id = $22::uuid and expires_at > now() for update",
            "), pre as (",
            " select last_seq, floor_seq from sessions",
            " where tenant = $1 and id = $2 and (expires_at is null or expires_at > now())",
            " and ($22::uuid is null or exists (select 1 from fence)) for update",
            "), bounds as (",
            " select pre.last_seq + $3 as last_seq, pre.floor_seq as old_floor,",
            " case when $4::bigint is null then pre.floor_seq",
            " else greatest(pre.floor_seq, pre.last_seq + $3 - $4::bigint) end as floor_seq from pre",
            "), moved as (",
            " delete from messages d using bounds where $23::bigint is not null and d.tenant = $1",
            " and d.session_id = $2 and d.seq >= $23::bigint and d.seq > bounds.old_floor",
            " returning d.*",
            "), kept_moved as (",
            " insert into superseded_messages (tenant, session_id, seq, id, turn_id, role, content, metadata,",
            " tool_calls, tool_call_id, name, created_at, superseded_by)",
            " select tenant, session_id, seq, id, turn_id, role, content, metadata, tool_calls, tool_call_id,",
            " name, created_at, $15::uuid from moved, bounds where moved.seq > bounds.floor_seq",
            "), trimmed as (",
            " delete from messages d using bounds where $4::bigint is not null and d.tenant = $1",
            " and d.session_id = $2 and d.seq <= bounds.floor_seq",
            " and ($23::bigint is null or d.seq < $23::bigint) returning (d.seq > bounds.old_floor) as counted",
            "), trimmed_superseded as (",
            " delete from superseded_messages d using bounds where $4::bigint is not null and d.tenant = $1",
            " and d.session_id = $2 and d.seq <= bounds.floor_seq",
            "), s as (",
            " update sessions set last_seq = bounds.last_seq, floor_seq = bounds.floor_seq,",
            " message_count = least(bounds.last_seq - bounds.floor_seq, greatest(0, sessions.message_count",
            " + least($3, bounds.last_seq - bounds.floor_seq)",
            " - (select count(*) from moved) - (select count(*) from trimmed where counted))),",
            " updated_at = case when $3 > 0 or $23::bigint is not null then greatest(now(), updated_at)",
            " else updated_at end,",
            " expires_at = now() + $5::bigint * interval '1 microsecond'",
            " from bounds where tenant = $1 and id = $2",
            " returning sessions.last_seq",
            "), ins as (",
            " insert into messages (tenant, session_id, seq, id, turn_id, role, content, metadata,",
            " tool_calls, tool_call_id, name, created_at)",
            " select $1, $2, s.last_seq - $3 + m.ord, m.id, m.turn_id, m.role, m.content, m.metadata::json,",
            " m.tool_calls::json, m.tool_call_id, m.name, m.created_at",
            " from s, unnest($6::uuid[], $7::uuid[], $8::text[], $9::text[], $10::text[], $11::text[],",
            " $12::text[], $13::text[], $14::timestamptz[]) with ordinality",
            " as m(id, turn_id, role, content, metadata, tool_calls, tool_call_id, name, created_at, ord)",
            " where $4::bigint is null or m.ord > $3 - $4::bigint",
            "), saved_turn as (",
            " insert into turns (tenant, session_id, id, status, error, message_ids, usage, created_at, completed_at)",
            " select $1, $2, $15::uuid, $16, $17::text::json, $18, $19, $20, $21 from s where $15::uuid is not null",
            turn_upsert!(),
            "), trimmed_turns as (",
            " delete from turns t using s",
            " where $4::bigint is not null and $15::uuid is not null and t.tenant = $1 and t.session_id = $2",
            " and t.id <> $15::uuid and t.id <= (select o.id from turns o where o.tenant = $1",
            " and o.session_id = $2 and o.id <> $15::uuid order by o.id desc offset $4::bigint - 1 limit 1)",
            ")",
            $release,
            " select (select last_seq from s) as last_seq, exists (select 1 from sessions x",
            " where x.tenant = $1 and x.id = $2 and (x.expires_at is null or x.expires_at > now())) as found"
        )
    };
}

/// One page over active and superseded messages together, in direction `$dir`: a range scan of
/// each table's key, merged. Binds as [`page_sql!`].
macro_rules! page_all_sql {
    ($dir:literal) => {
        concat!(
            "select m.* from sessions s left join lateral (",
            " select * from ((",
            " select seq, id, turn_id, role, content, metadata, tool_calls, tool_call_id, name, created_at,",
            " null::uuid as superseded_by from messages",
            " where tenant = s.tenant and session_id = s.id and seq > s.floor_seq and seq > $3 and seq < $4",
            " order by seq ",
            $dir,
            " limit $5",
            ") union all (",
            " select seq, id, turn_id, role, content, metadata, tool_calls, tool_call_id, name, created_at,",
            " superseded_by from superseded_messages",
            " where tenant = s.tenant and session_id = s.id and seq > s.floor_seq and seq > $3 and seq < $4",
            " order by seq ",
            $dir,
            " limit $5",
            ")) both_sets order by seq ",
            $dir,
            " limit $5",
            ") m on true where s.tenant = $1 and s.id = $2 and ",
            live!(),
            " order by m.seq ",
            $dir
        )
    };
}

/// The statements this store sends; public so that tests can `EXPLAIN` them.
pub mod sql {
    /// One page, oldest first. Binds: tenant, session, after, before, limit.
    pub const PAGE_ASC: &str = page_sql!("asc");
    /// One page (or the last N), newest first. Binds: tenant, session, after, before, limit.
    pub const PAGE_DESC: &str = page_sql!("desc");
    /// [`PAGE_ASC`] over active and superseded messages together.
    pub const PAGE_ALL_ASC: &str = page_all_sql!("asc");
    /// [`PAGE_DESC`] over active and superseded messages together.
    pub const PAGE_ALL_DESC: &str = page_all_sql!("desc");

    /// Creates a session. Binds: tenant, id, system prompt, metadata text, ttl in µs.
    pub const CREATE_SESSION: &str = "insert into sessions \
         (tenant, id, created_at, updated_at, system_prompt, metadata, message_count, last_seq, expires_at) \
         values ($1, $2, now(), now(), $3, $4::text::json, 0, 0, now() + $5::bigint * interval '1 microsecond') \
         returning id, created_at, updated_at, system_prompt, metadata, message_count";

    /// Serialises a tenant's capped session creations until the transaction ends. Binds: tenant.
    pub const LOCK_TENANT_CREATIONS: &str =
        "select pg_advisory_xact_lock(hashtextextended('parley.create_session:' || $1, 0))";

    /// Deletes one session if it has expired. Binds: tenant, id.
    pub const DROP_EXPIRED: &str =
        "delete from sessions where tenant = $1 and id = $2 and expires_at <= now()";

    /// Reads a live session. Binds: tenant, id.
    pub const GET_SESSION: &str = concat!(
        "select id, created_at, updated_at, system_prompt, metadata, message_count from sessions s",
        " where s.tenant = $1 and s.id = $2 and ",
        live!()
    );

    /// The first page of the session list. Binds: tenant, limit.
    pub const LIST_FIRST: &str = concat!(
        "select id, created_at, updated_at, system_prompt, metadata, message_count from sessions s",
        " where s.tenant = $1 and ",
        live!(),
        " order by updated_at desc, id desc limit $2"
    );

    /// A later page of the session list. Binds: tenant, limit, cursor's updated_at, cursor's id.
    pub const LIST_AFTER: &str = concat!(
        "select id, created_at, updated_at, system_prompt, metadata, message_count from sessions s",
        " where s.tenant = $1 and (updated_at, id) < ($3, $4) and ",
        live!(),
        " order by updated_at desc, id desc limit $2"
    );

    /// Replaces a live session's metadata (not its `updated_at`) and slides its TTL. Binds: tenant,
    /// id, metadata text, ttl in µs.
    pub const SET_SESSION_METADATA: &str = concat!(
        "update sessions s set metadata = $3::text::json,",
        " expires_at = now() + $4::bigint * interval '1 microsecond'",
        " where s.tenant = $1 and s.id = $2 and ",
        live!(),
        " returning id, created_at, updated_at, system_prompt, metadata, message_count"
    );

    /// Deletes a session (cascading to its messages and turns); returns whether it was live.
    /// Binds: tenant, id.
    pub const DELETE_SESSION: &str = "delete from sessions where tenant = $1 and id = $2 \
         returning (expires_at is null or expires_at > now()) as live";

    /// The whole append in one statement. Binds: $1 tenant, $2 session, $3 batch size, $4 cap
    /// (null: none), $5 ttl in µs (null: none), $6..$14 the message columns, $15..$21 the turn
    /// (null id: no turn), $22 the fencing turn (null: none). Returns one row: the session's new
    /// `last_seq` (null when nothing was written) and whether the session is live (`found`); a
    /// live session with a null `last_seq` means the fence refused the write.
    ///
    /// `fence` row-locks the fencing turn's lock if it still holds it with a live lease, so no
    /// other turn can take the session before this statement commits; `s` (only if the fence
    /// held) row-locks the session and takes the next seqs; `ins` writes the batch (skipping what the
    /// cap would drop at once); `trimmed` deletes what fell out of the window; `saved_turn` upserts the
    /// turn. Rows that a concurrent appender committed after this statement's snapshot are
    /// invisible to `trimmed`; they are outside the window already and the next trim deletes them.
    /// Without a cap, `trimmed` stops at a one-time filter on `$4`: a generic plan cached while
    /// the table was small would otherwise scan every message of every session on each append
    /// (the benchmark's growth figure caught appends at 80 ms on a 100,000-message table).
    pub const APPEND: &str = append_sql!("");

    /// Ends a turn: [`APPEND`] fenced by the turn, plus the release of its session lock, in the
    /// same statement. Binds: those of [`APPEND`], with $22 the turn.
    pub const FINISH_TURN: &str = append_sql!(
        ", released as (delete from turn_locks l using s where l.tenant = $1 and l.session_id = $2 and l.turn_id = $22::uuid)"
    );

    /// Starts a turn in one statement: claims the live session's lock for the turn (as
    /// [`ACQUIRE_LOCK`]), records the turn when it got it (as [`PUT_TURN`]), and reads the
    /// system prompt and the last messages. Binds: $1 tenant, $2 session, $3 turn id, $4 lease
    /// in µs, $5 window size, $6..$11 the turn's status, error, message ids, usage, created_at,
    /// completed_at. Returns one row per message of the window, oldest first (or one row of
    /// null message columns), each with `found`, `acquired`, `holder` and `system_prompt`.
    pub const BEGIN_TURN: &str = concat!(
        "with s as (select s.tenant, s.id, s.system_prompt, s.floor_seq from sessions s",
        " where s.tenant = $1 and s.id = $2 and ",
        live!(),
        "), took as (",
        " insert into turn_locks as l (tenant, session_id, turn_id, expires_at, cancel_requested)",
        " select s.tenant, s.id, $3, now() + $4::bigint * interval '1 microsecond', false from s",
        " on conflict (tenant, session_id) do update set turn_id = excluded.turn_id,",
        " expires_at = excluded.expires_at,",
        " cancel_requested = l.cancel_requested and l.turn_id = excluded.turn_id and l.expires_at > now()",
        " where l.expires_at <= now() or l.turn_id = excluded.turn_id",
        " returning 1",
        "), saved_turn as (",
        " insert into turns (tenant, session_id, id, status, error, message_ids, usage, created_at, completed_at)",
        " select $1, $2, $3, $6, $7::text::json, $8, $9, $10, $11 from took",
        turn_upsert!(),
        "), head as (select exists (select 1 from s) as found, exists (select 1 from took) as acquired,",
        " (select turn_id from turn_locks where tenant = $1 and session_id = $2 and expires_at > now()) as holder,",
        " (select system_prompt from s) as system_prompt",
        ") select h.found, h.acquired, h.holder, h.system_prompt, m.* from head h left join lateral (",
        " select w.seq, w.id, w.turn_id, w.role, w.content, w.metadata, w.tool_calls, w.tool_call_id, w.name,",
        " w.created_at from messages w where h.acquired and w.tenant = $1 and w.session_id = $2",
        " and w.seq > (select s.floor_seq from s) order by w.seq desc limit $5",
        ") m on true order by m.seq asc"
    );

    /// Empties a live session's window and returns its `last_seq`. Binds: tenant, id, ttl in µs.
    pub const CLEAR_SESSION: &str = concat!(
        "update sessions s set message_count = 0, floor_seq = last_seq, updated_at = greatest(now(), updated_at),",
        " expires_at = now() + $3::bigint * interval '1 microsecond'",
        " where s.tenant = $1 and s.id = $2 and ",
        live!(),
        " returning last_seq"
    );

    /// Deletes the messages a clear gave up. Binds: tenant, session, last seq.
    pub const CLEAR_MESSAGES: &str = "with sup as (delete from superseded_messages \
         where tenant = $1 and session_id = $2 and seq <= $3) \
         delete from messages where tenant = $1 and session_id = $2 and seq <= $3";

    /// Creates a session holding a fork's messages, in the transaction that counted the tenant's
    /// sessions. Binds: tenant, id, system prompt, metadata text, ttl in µs, message count, the
    /// number kept (the cap). Returns the session row, or no row when the id is taken.
    pub const CREATE_SESSION_HOLDING: &str = "insert into sessions \
         (tenant, id, created_at, updated_at, system_prompt, metadata, message_count, last_seq, floor_seq, expires_at) \
         values ($1, $2, now(), now(), $3, $4::text::json, $7, $6, $6 - $7, now() + $5::bigint * interval '1 microsecond') \
         on conflict (tenant, id) do nothing \
         returning id, created_at, updated_at, system_prompt, metadata, message_count";

    /// Writes a fork's messages with seqs from 1, skipping those under the floor. Binds: tenant,
    /// session, floor seq, then the message columns as [`APPEND`]'s $6..$14.
    pub const INSERT_MESSAGES: &str = concat!(
        "insert into messages (tenant, session_id, seq, id, turn_id, role, content, metadata,",
        " tool_calls, tool_call_id, name, created_at)",
        " select $1, $2, m.ord, m.id, m.turn_id, m.role, m.content, m.metadata::json,",
        " m.tool_calls::json, m.tool_call_id, m.name, m.created_at",
        " from unnest($4::uuid[], $5::uuid[], $6::text[], $7::text[], $8::text[], $9::text[],",
        " $10::text[], $11::text[], $12::timestamptz[]) with ordinality",
        " as m(id, turn_id, role, content, metadata, tool_calls, tool_call_id, name, created_at, ord)",
        " where m.ord > $3"
    );

    /// Creates or replaces a turn of a live session (a terminal record stays as it is). Binds:
    /// tenant, session, then the turn's fields. Returns whether the session is live.
    pub const PUT_TURN: &str = concat!(
        "with s as (select 1 from sessions s where s.tenant = $1 and s.id = $2 and ",
        live!(),
        "), put as (",
        " insert into turns (tenant, session_id, id, status, error, message_ids, usage, created_at, completed_at)",
        " select $1, $2, $3, $4, $5::text::json, $6, $7, $8, $9 from s",
        turn_upsert!(),
        ") select exists (select 1 from s)"
    );

    /// Reads a turn of a live session. Binds: tenant, session, turn id.
    pub const GET_TURN: &str = concat!(
        "select t.id, t.status, t.error, t.message_ids, t.usage, t.created_at, t.completed_at",
        " from turns t join sessions s on s.tenant = t.tenant and s.id = t.session_id",
        " where t.tenant = $1 and t.session_id = $2 and t.id = $3 and ",
        live!()
    );

    /// Claims a live session for a turn: inserts the lock, or takes over a row whose lease ran out
    /// (or that the same turn holds, keeping its cancel flag). Binds: tenant, session, turn id,
    /// lease in µs. Returns one row: whether the session is live, whether the turn got the lock,
    /// and the holder this statement's snapshot saw (the other turn, when it did not).
    pub const ACQUIRE_LOCK: &str = concat!(
        "with s as (select s.tenant, s.id from sessions s where s.tenant = $1 and s.id = $2 and ",
        live!(),
        "), took as (",
        " insert into turn_locks as l (tenant, session_id, turn_id, expires_at, cancel_requested)",
        " select s.tenant, s.id, $3, now() + $4::bigint * interval '1 microsecond', false from s",
        " on conflict (tenant, session_id) do update set turn_id = excluded.turn_id,",
        " expires_at = excluded.expires_at,",
        " cancel_requested = l.cancel_requested and l.turn_id = excluded.turn_id and l.expires_at > now()",
        " where l.expires_at <= now() or l.turn_id = excluded.turn_id",
        " returning 1",
        ") select exists (select 1 from s) as found, exists (select 1 from took) as acquired,",
        " (select turn_id from turn_locks where tenant = $1 and session_id = $2 and expires_at > now())",
        " as holder"
    );

    /// Extends the lease of the turn holding a live session. Binds: tenant, session, turn id, lease
    /// in µs. Returns `cancel_requested`, or no row when the turn does not hold the session.
    pub const RENEW_LOCK: &str = concat!(
        "update turn_locks set expires_at = now() + $4::bigint * interval '1 microsecond'",
        " where tenant = $1 and session_id = $2 and turn_id = $3 and expires_at > now()",
        " and exists (select 1 from sessions s where s.tenant = $1 and s.id = $2 and ",
        live!(),
        ") returning cancel_requested"
    );

    /// Extends the leases of many turns at once. Binds: tenants, sessions, turn ids (arrays of one
    /// length), lease in µs. Returns `(ord, cancel_requested)` for each turn that still holds its
    /// live session, `ord` being its 1-based position in the arrays.
    pub const RENEW_LOCKS: &str = concat!(
        "update turn_locks l set expires_at = now() + $4::bigint * interval '1 microsecond'",
        " from unnest($1::text[], $2::text[], $3::uuid[]) with ordinality as r(tenant, session_id, turn_id, ord)",
        " where l.tenant = r.tenant and l.session_id = r.session_id and l.turn_id = r.turn_id",
        " and l.expires_at > now()",
        " and exists (select 1 from sessions s where s.tenant = r.tenant and s.id = r.session_id and ",
        live!(),
        ") returning r.ord, l.cancel_requested"
    );

    /// Deletes the lock if the turn holds it. Binds: tenant, session, turn id.
    pub const RELEASE_LOCK: &str =
        "delete from turn_locks where tenant = $1 and session_id = $2 and turn_id = $3";

    /// The turn holding a live session. Binds: tenant, session. No row when the session is missing;
    /// a null `turn_id` when no turn holds it.
    pub const LOCK_HOLDER: &str = concat!(
        "select l.turn_id from sessions s left join turn_locks l",
        " on l.tenant = s.tenant and l.session_id = s.id and l.expires_at > now()",
        " where s.tenant = $1 and s.id = $2 and ",
        live!()
    );

    /// Flags a cancel request if the turn holds the live session. Binds: tenant, session, turn id.
    /// Returns whether the session is live and whether the flag was set.
    pub const CANCEL_LOCK: &str = concat!(
        "with s as (select 1 from sessions s where s.tenant = $1 and s.id = $2 and ",
        live!(),
        "), flagged as (",
        " update turn_locks l set cancel_requested = true from s",
        " where l.tenant = $1 and l.session_id = $2 and l.turn_id = $3 and l.expires_at > now()",
        " returning 1",
        ") select exists (select 1 from s) as found, exists (select 1 from flagged) as flagged"
    );

    /// Remembers an idempotency key of a live session unless a live record has it, and deletes the
    /// session's other expired keys. Binds: tenant, session, key, fingerprint, turn id, ttl in µs.
    /// Returns one row: whether the session is live, whether the key was stored, and the live
    /// record this statement's snapshot saw (null when none).
    pub const BEGIN_IDEMPOTENT: &str = concat!(
        "with s as (select s.tenant, s.id from sessions s where s.tenant = $1 and s.id = $2 and ",
        live!(),
        "), purged as (",
        " delete from idempotency_keys",
        " where tenant = $1 and session_id = $2 and key <> $3 and expires_at <= now()",
        "), took as (",
        " insert into idempotency_keys as k (tenant, session_id, key, fingerprint, turn_id, expires_at)",
        " select s.tenant, s.id, $3, $4, $5, now() + $6::bigint * interval '1 microsecond' from s",
        " on conflict (tenant, session_id, key) do update set fingerprint = excluded.fingerprint,",
        " turn_id = excluded.turn_id, response = null, expires_at = excluded.expires_at",
        " where k.expires_at <= now()",
        " returning 1",
        ") select exists (select 1 from s) as found, exists (select 1 from took) as started,",
        " k.fingerprint, k.turn_id, k.response::text as response",
        " from (select 1) as one left join idempotency_keys k",
        " on k.tenant = $1 and k.session_id = $2 and k.key = $3 and k.expires_at > now()"
    );

    /// Saves the response of a live idempotency key and restarts its ttl. Binds: tenant, session,
    /// key, response JSON text, ttl in µs. Returns whether the session is live.
    pub const COMPLETE_IDEMPOTENT: &str = concat!(
        "with s as (select 1 from sessions s where s.tenant = $1 and s.id = $2 and ",
        live!(),
        "), saved as (",
        " update idempotency_keys k set response = $4::text::json,",
        " expires_at = now() + $5::bigint * interval '1 microsecond' from s",
        " where k.tenant = $1 and k.session_id = $2 and k.key = $3 and k.expires_at > now()",
        ") select exists (select 1 from s)"
    );

    /// Forgets an idempotency key. Binds: tenant, session, key.
    pub const ABORT_IDEMPOTENT: &str =
        "delete from idempotency_keys where tenant = $1 and session_id = $2 and key = $3";

    /// Deletes up to `$1` expired idempotency keys, skipping rows others hold.
    pub const SWEEP_IDEMPOTENCY: &str = "delete from idempotency_keys where (tenant, session_id, key) in (\
         select tenant, session_id, key from idempotency_keys where expires_at <= now() \
         order by expires_at limit $1 for update skip locked)";
    /// Counts a tenant's live sessions (an index-only range of `sessions_list_idx`, mostly).
    /// Binds: tenant.
    pub const COUNT_SESSIONS: &str =
        concat!("select count(*) from sessions s where s.tenant = $1 and ", live!());

    /// Deletes up to `$1` expired sessions, skipping rows other sweepers hold.
    pub const SWEEP: &str = "delete from sessions where (tenant, id) in (\
         select tenant, id from sessions where expires_at <= now() \
         order by expires_at limit $1 for update skip locked)";
}

#[async_trait]
impl ConversationStore for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn is_distributed(&self) -> bool {
        true
    }

    async fn ping(&self) -> StoreResult<()> {
        self.timed(sqlx::query("select 1").execute(&self.conns)).await.map(|_| ())
    }

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
                let at = DateTime::<Utc>::from_timestamp_micros(c.updated_at_micros)
                    .ok_or(StoreError::InvalidCursor)?;
                sqlx::query(LIST_AFTER).bind(tenant).bind(fetch).bind(at).bind(c.id.as_str())
            }
        };
        let rows = self.timed(query.fetch_all(&self.conns)).await?;
        let has_more = rows.len() > limit;
        let sessions = rows.iter().take(limit).map(session_from_row).collect::<StoreResult<Vec<_>>>()?;
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
        self.append_releasing(tenant, session_id, batch, None).await
    }

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

    async fn finish_turn(
        &self,
        tenant: &str,
        session_id: &str,
        batch: AppendBatch,
        turn_id: Uuid,
    ) -> StoreResult<FinishedTurn> {
        let messages = self.append_releasing(tenant, session_id, batch, Some(turn_id)).await?;
        Ok(FinishedTurn { messages, lock_released: true })
    }

    async fn read_page(&self, tenant: &str, session_id: &str, query: PageQuery) -> StoreResult<MessagePage> {
        let bounds = (query.after.unwrap_or(0), query.before.unwrap_or(u64::MAX));
        let fetch = query.limit.saturating_add(1);
        let mut messages = self
            .window(tenant, session_id, (query.order, query.include_superseded), bounds, fetch)
            .await?
            .ok_or(StoreError::SessionNotFound)?;
        let has_more = messages.len() > query.limit;
        messages.truncate(query.limit);
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

    async fn count_sessions(&self, tenant: &str) -> StoreResult<u64> {
        let query = sqlx::query_scalar::<_, i64>(COUNT_SESSIONS).bind(tenant);
        Ok(to_u64(self.timed(query.fetch_one(&self.conns)).await?))
    }
}
