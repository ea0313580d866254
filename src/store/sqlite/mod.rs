//! The SQLite store: durable and embedded, the default for one process (`is_distributed()` is
//! false). The schema is in `migrations/sqlite/` (embedded with `sqlx::migrate!`).
//!
//! The file runs in WAL mode: readers never wait for the writer, nor the writer for readers.
//! Every write runs on **one writer connection** (a pool of one), in a `BEGIN IMMEDIATE`
//! transaction: writes from many requests queue for that connection, in order, instead of racing
//! for SQLite's write lock, so none of them sees `SQLITE_BUSY`. Reads run on a small pool of
//! read-only connections, each read in one transaction, so it sees one committed state.
//!
//! Each operation is one transaction of a few statements on an in-process library (no network
//! round trip); pages and windows are range scans of the messages key, so they cost O(page), and
//! a turn's messages are index searches on (tenant, session_id, turn_id, seq) of both message tables
//! (`migrations/sqlite/0002_turn_messages_index.sql`), so they cost O(the turn's messages).
//! Times are computed in Rust and bound as microseconds, so leases, TTLs and the session order
//! follow one clock.
//!
//! A second parley on the same file is refused at start-up: [`SqliteStore::open`] holds an
//! exclusive lock on `<path>.lock` for the store's life. A file that cannot be opened, read or
//! written (read-only, not a database, corrupt) fails [`SqliteStore::open`] with a message naming
//! the path; one that fails later (a full disk, a lock held by another program) answers
//! [`StoreError::Unavailable`], so the API answers 503 `store_unavailable` and nothing is half
//! written.
//!
//! # Files
//! - `mod.rs` (this file): the options, the store and its [`ConversationStore`] implementation.
//! - [`sql`]: every statement, one file each in `sql/*.sql`.
//! - `tx.rs`: the write and read transactions (`write_tx!`, `read_tx!`).
//! - `owner.rs`: the `<path>.lock` that keeps a second parley off the file.
//! - `rows.rs`: rows to sessions, messages and turns.
//! - `errors.rs`: driver errors to store errors.

#[macro_use]
mod tx;
mod errors;
mod owner;
mod rows;
pub mod sql;

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, SqliteConnection};
use uuid::Uuid;

pub use super::sql_common::SWEEP_BATCH;
use super::sql_common::{json_text, micros, page_of, spawn_sweeper, status_str, to_i64, to_u64};
use super::{
    AppendBatch, ConversationStore, FinishedTurn, FusedTurns, IdempotencyBegin, IdempotencyRecord, LeaseKey,
    LockOutcome, LockStatus, MessagePage, Order, PageQuery, SessionCursor, SessionPage, StoreBackend,
    StoreError, StoreResult, TurnBegin, TurnCoordinator,
};
use crate::domain::{Message, Metadata, NewSession, Session, Turn, WindowMessage, now};
use errors::{db, migrate_err};
use owner::take_ownership;
use rows::{decode, from_json, message_from_row, session_from_row, turn_from_row};

/// The embedded migrations (`migrations/sqlite/`).
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Where the database lives and how the store behaves.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// The database file, created if missing (with its `-wal`, `-shm` and `.lock` companions).
    pub path: PathBuf,
    /// Read-only connections in the reader pool (at least 1).
    pub readers: u32,
    /// Most messages kept per session, the oldest going first; `None` (or 0) keeps all.
    pub max_messages: Option<usize>,
    /// Sessions idle this long expire (each write slides it); `None` (or zero) keeps them.
    pub ttl: Option<Duration>,
    /// Longest one store operation may take, waiting for the writer included.
    pub op_timeout: Duration,
}

/// The SQLite conversation store.
#[derive(Debug)]
pub struct SqliteStore {
    /// The one writer connection: every write queues for it.
    writer: SqlitePool,
    /// Read-only connections.
    readers: SqlitePool,
    /// The cap on messages (and turn records) per session.
    max_messages: Option<i64>,
    /// The TTL in microseconds.
    ttl_micros: Option<i64>,
    op_timeout: Duration,
    /// Held for the store's life: a second parley on the same file cannot take it.
    _owner: File,
}

impl SqliteStore {
    /// Opens (creating if missing) and migrates the database, and proves it writable. Fails with
    /// a message naming the file when it is used by another parley, cannot be created, is not a
    /// database or is corrupt, or cannot be written.
    pub async fn open(opts: SqliteOptions) -> StoreResult<Self> {
        let shown = opts.path.display().to_string();
        let owner = take_ownership(&opts.path).await?;
        let base = SqliteConnectOptions::new()
            .filename(&opts.path)
            .foreign_keys(true)
            .busy_timeout(opts.op_timeout / 2);
        let writer_opts = base
            .clone()
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .acquire_timeout(opts.op_timeout)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(writer_opts)
            .await
            .map_err(|e| opening(&shown, db(e)))?;
        let readers = SqlitePoolOptions::new()
            .max_connections(opts.readers.max(1))
            .acquire_timeout(opts.op_timeout)
            .connect_lazy_with(base.read_only(true));
        let store = SqliteStore {
            writer,
            readers,
            max_messages: opts.max_messages.filter(|&m| m > 0).map(|m| i64::try_from(m).unwrap_or(i64::MAX)),
            ttl_micros: opts.ttl.filter(|t| !t.is_zero()).map(micros),
            op_timeout: opts.op_timeout,
            _owner: owner,
        };
        store.migrate().await.map_err(|e| opening(&shown, e))?;
        Ok(store)
    }

    /// Applies pending migrations, checks the file's integrity pages and writes one row, so that
    /// a file parley cannot use fails here rather than at the first turn.
    async fn migrate(&self) -> StoreResult<()> {
        let mut conn = self.writer.acquire().await.map_err(db)?;
        MIGRATOR.run_direct(None, &mut *conn, false).await.map_err(migrate_err)?;
        let check: String =
            sqlx::query_scalar("pragma quick_check(1)").fetch_one(&mut *conn).await.map_err(db)?;
        if check != "ok" {
            return Err(StoreError::Unavailable(format!("the database file is corrupt: {check}")));
        }
        sqlx::query(
            "insert into store_meta (k, v) values ('opened_at', ?1) on conflict (k) do update set v = ?1",
        )
        .bind(now_micros())
        .execute(&mut *conn)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// The writer's pool, for tests that need raw access (a pragma on the one writer connection).
    pub fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    /// Closes both pools (the owner lock goes when the store is dropped).
    pub async fn close(&self) {
        self.readers.close().await;
        self.writer.close().await;
    }

    /// Deletes every expired session (with its messages, turns, lock and keys), then every expired
    /// idempotency key, [`SWEEP_BATCH`] per transaction; returns how many sessions went.
    pub async fn sweep_expired(&self) -> StoreResult<u64> {
        let mut total = 0;
        for sql in [sql::SWEEP, sql::SWEEP_IDEMPOTENCY] {
            loop {
                let at = now_micros();
                let n = write_tx!(self, |conn| {
                    exec(sqlx::query(sql).bind(at).bind(SWEEP_BATCH), conn).await
                })?;
                if sql == sql::SWEEP {
                    total += n;
                }
                if n < SWEEP_BATCH as u64 {
                    break;
                }
            }
        }
        Ok(total)
    }

    /// Runs [`SqliteStore::sweep_expired`] every `every` (at least 10 ms) until the store is
    /// dropped or the handle aborted. Errors are logged and retried at the next tick.
    pub fn spawn_ttl_sweeper(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        spawn_sweeper(self, every, |store| async move { store.sweep_expired().await })
    }

    /// The error of an operation that ran out of time; `sent` if a write transaction had begun.
    fn timed_out(&self, sent: bool) -> StoreError {
        let ms = self.op_timeout.as_millis();
        if sent {
            StoreError::Unanswered(format!("SQLite did not answer within {ms} ms"))
        } else {
            StoreError::Unavailable(format!("the SQLite store was busy for {ms} ms"))
        }
    }

    fn expiry(&self, at: i64) -> Option<i64> {
        self.ttl_micros.map(|ttl| at.saturating_add(ttl))
    }
}

/// An open failure, with the file named.
fn opening(path: &str, error: StoreError) -> StoreError {
    StoreError::Unavailable(format!("cannot use the SQLite database {path}: {error}"))
}

async fn exec(
    query: sqlx::query::Query<'_, Sqlite, sqlx::sqlite::SqliteArguments>,
    conn: &mut SqliteConnection,
) -> StoreResult<u64> {
    query.execute(conn).await.map(|done| done.rows_affected()).map_err(db)
}

fn now_micros() -> i64 {
    now().timestamp_micros()
}

/// A session's counters, as a write reads them.
struct State {
    last_seq: i64,
    floor_seq: i64,
    message_count: i64,
    updated_at: i64,
    system_prompt: Option<String>,
}

async fn session_state(
    conn: &mut SqliteConnection,
    tenant: &str,
    id: &str,
    at: i64,
) -> StoreResult<Option<State>> {
    let row = sqlx::query(sql::SESSION_STATE)
        .bind(tenant)
        .bind(id)
        .bind(at)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db)?;
    row.map(|r| {
        Ok(State {
            last_seq: r.try_get(0).map_err(decode)?,
            floor_seq: r.try_get(1).map_err(decode)?,
            message_count: r.try_get(2).map_err(decode)?,
            updated_at: r.try_get(3).map_err(decode)?,
            system_prompt: r.try_get(4).map_err(decode)?,
        })
    })
    .transpose()
}

async fn insert_message(
    conn: &mut SqliteConnection,
    tenant: &str,
    session_id: &str,
    seq: i64,
    m: &Message,
) -> StoreResult<()> {
    sqlx::query(sql::INSERT_MESSAGE)
        .bind(tenant)
        .bind(session_id)
        .bind(seq)
        .bind(m.id)
        .bind(m.turn_id)
        .bind(m.role.as_str())
        .bind(m.content.as_str())
        .bind(json_text(&m.metadata))
        .bind(m.tool_calls.as_ref().map(json_text))
        .bind(m.tool_call_id.as_deref())
        .bind(m.name.as_deref())
        .bind(m.created_at.timestamp_micros())
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(())
}

async fn put_turn_on(
    conn: &mut SqliteConnection,
    tenant: &str,
    session_id: &str,
    t: &Turn,
) -> StoreResult<()> {
    sqlx::query(sql::PUT_TURN)
        .bind(tenant)
        .bind(session_id)
        .bind(t.id)
        .bind(status_str(t.status))
        .bind(t.error.as_ref().map(json_text))
        .bind(json_text(&t.message_ids))
        .bind(t.usage.as_ref().map(json_text))
        .bind(t.created_at.timestamp_micros())
        .bind(t.completed_at.map(|c| c.timestamp_micros()))
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(())
}

/// Claims the lock of a live session for `turn` unless another turn holds it with a live lease;
/// returns that turn when it does.
async fn claim(
    conn: &mut SqliteConnection,
    tenant: &str,
    session_id: &str,
    turn: Uuid,
    (at, expires): (i64, i64),
) -> StoreResult<Option<Uuid>> {
    let row = sqlx::query(sql::LOCK_ROW)
        .bind(tenant)
        .bind(session_id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db)?;
    let mut keep_cancel = false;
    if let Some(row) = row {
        let holder: Uuid = row.try_get(0).map_err(decode)?;
        let live = row.try_get::<i64, _>(1).map_err(decode)? > at;
        if live && holder != turn {
            return Ok(Some(holder));
        }
        keep_cancel = live && row.try_get::<bool, _>(2).map_err(decode)?;
    }
    sqlx::query(sql::TAKE_LOCK)
        .bind(tenant)
        .bind(session_id)
        .bind(turn)
        .bind(expires)
        .bind(keep_cancel)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(None)
}

/// What a capped creation asks for.
struct Creation<'a> {
    tenant: &'a str,
    new: &'a NewSession,
    messages: &'a [Message],
    max: Option<u64>,
}

impl SqliteStore {
    /// Creates a session holding `messages` (seqs from 1) in one transaction, unless the id is
    /// taken or the tenant holds `max` live sessions.
    async fn create(&self, c: Creation<'_>) -> StoreResult<Session> {
        let cap = self.max_messages;
        let ttl = self.ttl_micros;
        write_tx!(self, |conn| {
            let at = now_micros();
            if let Some(max) = c.max {
                let held: i64 = sqlx::query_scalar(sql::COUNT_SESSIONS)
                    .bind(c.tenant)
                    .bind(at)
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(db)?;
                if to_u64(held) >= max {
                    return Err(StoreError::SessionLimitReached(max));
                }
            }
            sqlx::query(sql::DROP_EXPIRED)
                .bind(c.tenant)
                .bind(&c.new.id)
                .bind(at)
                .execute(&mut *conn)
                .await
                .map_err(db)?;
            let n = c.messages.len() as i64;
            let kept = cap.map_or(n, |cap| n.min(cap));
            let row = sqlx::query(sql::CREATE_SESSION)
                .bind(c.tenant)
                .bind(&c.new.id)
                .bind(c.new.system_prompt.as_deref())
                .bind(json_text(&c.new.metadata))
                .bind(at)
                .bind(ttl.map(|t| at.saturating_add(t)))
                .bind(kept)
                .bind(n)
                .bind(n - kept)
                .fetch_optional(&mut *conn)
                .await
                .map_err(db)?;
            let Some(row) = row else { return Err(StoreError::SessionExists) };
            for (m, seq) in c.messages.iter().zip(1..).skip(to_u64(n - kept) as usize) {
                insert_message(conn, c.tenant, &c.new.id, seq, m).await?;
            }
            session_from_row(&row)
        })
    }

    /// Appends a batch and, when `release` names a turn, ends it: the batch is fenced by that
    /// turn and its lock released in the same transaction.
    async fn append_releasing(
        &self,
        tenant: &str,
        session_id: &str,
        batch: AppendBatch,
        fence: Option<Uuid>,
        release: Option<Uuid>,
    ) -> StoreResult<Vec<Message>> {
        let supersede = match batch.supersede_from {
            Some(from) => Some((
                to_i64(from),
                batch.turn.as_ref().map(|t| t.id).ok_or_else(|| {
                    StoreError::Backend("an append that supersedes messages must carry its turn".into())
                })?,
            )),
            None => None,
        };
        let fence = release.or(fence);
        let cap = self.max_messages;
        let messages = &batch.messages;
        let turn = batch.turn.as_ref();
        let first = write_tx!(self, |conn| {
            let at = now_micros();
            let state =
                session_state(conn, tenant, session_id, at).await?.ok_or(StoreError::SessionNotFound)?;
            if let Some(fence) = fence {
                let held = sqlx::query(sql::FENCE)
                    .bind(tenant)
                    .bind(session_id)
                    .bind(fence)
                    .bind(at)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(db)?;
                if held.is_none() {
                    return Err(StoreError::Fenced);
                }
            }
            let mut count = state.message_count;
            if let Some((from, by)) = supersede {
                let q = sqlx::query(sql::SUPERSEDE).bind(tenant).bind(session_id).bind(from).bind(by);
                exec(q, conn).await?;
                let moved =
                    exec(sqlx::query(sql::DELETE_FROM).bind(tenant).bind(session_id).bind(from), conn)
                        .await?;
                count -= moved as i64;
            }
            let n = messages.len() as i64;
            let last = state.last_seq + n;
            let floor = cap.map_or(state.floor_seq, |cap| state.floor_seq.max(last - cap));
            if floor > state.floor_seq {
                let trimmed =
                    exec(sqlx::query(sql::TRIM).bind(tenant).bind(session_id).bind(floor), conn).await?;
                count -= trimmed as i64;
                exec(sqlx::query(sql::TRIM_SUPERSEDED).bind(tenant).bind(session_id).bind(floor), conn)
                    .await?;
            }
            for (m, seq) in messages.iter().zip(state.last_seq + 1..) {
                if seq > floor {
                    insert_message(conn, tenant, session_id, seq, m).await?;
                    count += 1;
                }
            }
            if let Some(t) = turn {
                put_turn_on(conn, tenant, session_id, t).await?;
                if let Some(cap) = cap {
                    let q = sqlx::query(sql::TRIM_TURNS).bind(tenant).bind(session_id).bind(t.id).bind(cap);
                    exec(q, conn).await?;
                }
            }
            if let Some(turn_id) = release {
                exec(sqlx::query(sql::RELEASE_LOCK).bind(tenant).bind(session_id).bind(turn_id), conn)
                    .await?;
            }
            let touched = n > 0 || supersede.is_some();
            let updated_at = if touched { at.max(state.updated_at) } else { state.updated_at };
            let ttl = self.expiry(at);
            let q = sqlx::query(sql::SAVE_STATE)
                .bind(tenant)
                .bind(session_id)
                .bind(last)
                .bind(floor)
                .bind(count.max(0))
                .bind(updated_at)
                .bind(ttl);
            exec(q, conn).await?;
            Ok(state.last_seq + 1)
        })?;
        let mut stored = batch.messages;
        for (m, seq) in stored.iter_mut().zip(to_u64(first)..) {
            m.seq = seq;
            if m.session_id != session_id {
                m.session_id = session_id.to_owned();
            }
        }
        Ok(stored)
    }

    /// Reads a window of messages above `floor`: `(after, before)` exclusive, `limit` rows in
    /// `order`; `None` when the session does not exist.
    async fn window(
        &self,
        tenant: &str,
        session_id: &str,
        (order, include_superseded): (Order, bool),
        (after, before): (u64, u64),
        limit: usize,
    ) -> StoreResult<Option<Vec<Message>>> {
        let sql = match (order, include_superseded) {
            (Order::Asc, false) => sql::PAGE_ASC,
            (Order::Desc, false) => sql::PAGE_DESC,
            (Order::Asc, true) => sql::PAGE_ALL_ASC,
            (Order::Desc, true) => sql::PAGE_ALL_DESC,
        };
        read_tx!(self, |conn| {
            let at = now_micros();
            let Some(state) = session_state(conn, tenant, session_id, at).await? else { return Ok(None) };
            let rows = sqlx::query(sql)
                .bind(tenant)
                .bind(session_id)
                .bind(state.floor_seq.max(to_i64(after)))
                .bind(to_i64(before))
                .bind(to_i64(limit as u64))
                .fetch_all(&mut *conn)
                .await
                .map_err(db)?;
            rows.iter().map(|r| message_from_row(r, session_id)).collect::<StoreResult<Vec<_>>>().map(Some)
        })
    }
}

#[async_trait]
impl StoreBackend for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn is_distributed(&self) -> bool {
        false
    }

    async fn ping(&self) -> StoreResult<()> {
        read_tx!(self, |conn| {
            sqlx::query("select exists (select 1 from sessions)").execute(&mut *conn).await.map_err(db)?;
            Ok(())
        })
    }
}

#[async_trait]
impl ConversationStore for SqliteStore {
    async fn create_session(&self, tenant: &str, new: NewSession) -> StoreResult<Session> {
        self.create(Creation { tenant, new: &new, messages: &[], max: None }).await
    }

    async fn create_session_within(&self, tenant: &str, new: NewSession, max: u64) -> StoreResult<Session> {
        self.create(Creation { tenant, new: &new, messages: &[], max: Some(max) }).await
    }

    async fn create_session_with(
        &self,
        tenant: &str,
        new: NewSession,
        mut messages: Vec<Message>,
        max: u64,
    ) -> StoreResult<(Session, Vec<Message>)> {
        let session =
            self.create(Creation { tenant, new: &new, messages: &messages, max: Some(max) }).await?;
        for (m, seq) in messages.iter_mut().zip(1..) {
            m.seq = seq;
            m.session_id.clone_from(&new.id);
        }
        Ok((session, messages))
    }

    async fn get_session(&self, tenant: &str, id: &str) -> StoreResult<Option<Session>> {
        read_tx!(self, |conn| {
            let q = sqlx::query(sql::GET_SESSION).bind(tenant).bind(id).bind(now_micros());
            let row = q.fetch_optional(&mut *conn).await.map_err(db)?;
            row.as_ref().map(session_from_row).transpose()
        })
    }

    async fn list_sessions(
        &self,
        tenant: &str,
        limit: usize,
        cursor: Option<&SessionCursor>,
    ) -> StoreResult<SessionPage> {
        let fetch = to_i64(limit as u64).saturating_add(1);
        let rows = read_tx!(self, |conn| {
            let at = now_micros();
            let q = match cursor {
                None => sqlx::query(sql::LIST_FIRST).bind(tenant).bind(at).bind(fetch),
                Some(c) => sqlx::query(sql::LIST_AFTER)
                    .bind(tenant)
                    .bind(at)
                    .bind(fetch)
                    .bind(c.updated_at_micros)
                    .bind(c.id.as_str()),
            };
            q.fetch_all(&mut *conn).await.map_err(db)
        })?;
        let (rows, has_more) = page_of(rows, limit);
        let sessions = rows.iter().map(session_from_row).collect::<StoreResult<Vec<_>>>()?;
        Ok(SessionPage { sessions, has_more })
    }

    async fn delete_session(&self, tenant: &str, id: &str) -> StoreResult<bool> {
        write_tx!(self, |conn| {
            let at = now_micros();
            let live = sqlx::query_scalar::<_, bool>(sql::DELETE_SESSION)
                .bind(tenant)
                .bind(id)
                .bind(at)
                .fetch_optional(&mut *conn)
                .await
                .map_err(db)?;
            Ok(live.unwrap_or(false))
        })
    }

    async fn set_session_metadata(
        &self,
        tenant: &str,
        id: &str,
        metadata: Metadata,
    ) -> StoreResult<Option<Session>> {
        let text = json_text(&metadata);
        write_tx!(self, |conn| {
            let at = now_micros();
            let row = sqlx::query(sql::SET_SESSION_METADATA)
                .bind(tenant)
                .bind(id)
                .bind(&text)
                .bind(at)
                .bind(self.expiry(at))
                .fetch_optional(&mut *conn)
                .await
                .map_err(db)?;
            row.as_ref().map(session_from_row).transpose()
        })
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
        read_tx!(self, |conn| {
            let state = session_state(conn, tenant, session_id, now_micros())
                .await?
                .ok_or(StoreError::SessionNotFound)?;
            let rows = sqlx::query(sql::TURN_MESSAGES)
                .bind(tenant)
                .bind(session_id)
                .bind(turn_id)
                .bind(state.floor_seq)
                .fetch_all(&mut *conn)
                .await
                .map_err(db)?;
            rows.iter().map(|r| message_from_row(r, session_id)).collect()
        })
    }

    async fn clear(&self, tenant: &str, session_id: &str) -> StoreResult<()> {
        write_tx!(self, |conn| {
            let at = now_micros();
            let state =
                session_state(conn, tenant, session_id, at).await?.ok_or(StoreError::SessionNotFound)?;
            let last = state.last_seq;
            exec(sqlx::query(sql::TRIM).bind(tenant).bind(session_id).bind(last), conn).await?;
            exec(sqlx::query(sql::TRIM_SUPERSEDED).bind(tenant).bind(session_id).bind(last), conn).await?;
            let q = sqlx::query(sql::SAVE_STATE)
                .bind(tenant)
                .bind(session_id)
                .bind(last)
                .bind(last)
                .bind(0_i64)
                .bind(at.max(state.updated_at))
                .bind(self.expiry(at));
            exec(q, conn).await?;
            Ok(())
        })
    }

    async fn put_turn(&self, tenant: &str, turn: &Turn) -> StoreResult<()> {
        let session_id = turn.session_id.as_str();
        write_tx!(self, |conn| {
            session_state(conn, tenant, session_id, now_micros())
                .await?
                .ok_or(StoreError::SessionNotFound)?;
            put_turn_on(conn, tenant, session_id, turn).await
        })
    }

    async fn get_turn(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<Option<Turn>> {
        read_tx!(self, |conn| {
            let q = sqlx::query(sql::GET_TURN).bind(tenant).bind(session_id).bind(turn_id).bind(now_micros());
            let row = q.fetch_optional(&mut *conn).await.map_err(db)?;
            row.map(|r| turn_from_row(&r, session_id)).transpose()
        })
    }

    async fn count_sessions(&self, tenant: &str) -> StoreResult<u64> {
        read_tx!(self, |conn| {
            let q = sqlx::query_scalar::<_, i64>(sql::COUNT_SESSIONS).bind(tenant).bind(now_micros());
            Ok(to_u64(q.fetch_one(&mut *conn).await.map_err(db)?))
        })
    }
}

#[async_trait]
impl TurnCoordinator for SqliteStore {
    async fn acquire_turn_lock(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<LockOutcome> {
        write_tx!(self, |conn| {
            let at = now_micros();
            session_state(conn, tenant, session_id, at).await?.ok_or(StoreError::SessionNotFound)?;
            let expires = at.saturating_add(micros(lease));
            Ok(match claim(conn, tenant, session_id, turn_id, (at, expires)).await? {
                Some(holder) => LockOutcome::Busy(holder),
                None => LockOutcome::Acquired,
            })
        })
    }

    async fn renew_turn_lock(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<LockStatus> {
        let key = LeaseKey { tenant: tenant.to_owned(), session_id: session_id.to_owned(), turn_id };
        let statuses = self.renew_turn_locks(std::slice::from_ref(&key), lease).await?;
        Ok(statuses.into_iter().next().unwrap_or(LockStatus { held: false, cancel_requested: false }))
    }

    async fn renew_turn_locks(&self, turns: &[LeaseKey], lease: Duration) -> StoreResult<Vec<LockStatus>> {
        if turns.is_empty() {
            return Ok(Vec::new());
        }
        write_tx!(self, |conn| {
            let at = now_micros();
            let expires = at.saturating_add(micros(lease));
            let mut statuses = Vec::with_capacity(turns.len());
            for t in turns {
                let flag = sqlx::query_scalar::<_, bool>(sql::RENEW_LOCK)
                    .bind(&t.tenant)
                    .bind(&t.session_id)
                    .bind(t.turn_id)
                    .bind(at)
                    .bind(expires)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(db)?;
                statuses.push(match flag {
                    Some(cancel_requested) => LockStatus { held: true, cancel_requested },
                    None => LockStatus { held: false, cancel_requested: false },
                });
            }
            Ok(statuses)
        })
    }

    async fn release_turn_lock(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<()> {
        write_tx!(self, |conn| {
            exec(sqlx::query(sql::RELEASE_LOCK).bind(tenant).bind(session_id).bind(turn_id), conn).await?;
            Ok(())
        })
    }

    async fn turn_lock_holder(&self, tenant: &str, session_id: &str) -> StoreResult<Option<Uuid>> {
        read_tx!(self, |conn| {
            let q = sqlx::query_scalar::<_, Option<Uuid>>(sql::LOCK_HOLDER)
                .bind(tenant)
                .bind(session_id)
                .bind(now_micros());
            q.fetch_optional(&mut *conn).await.map_err(db)?.ok_or(StoreError::SessionNotFound)
        })
    }

    async fn request_cancel(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<bool> {
        write_tx!(self, |conn| {
            let at = now_micros();
            session_state(conn, tenant, session_id, at).await?.ok_or(StoreError::SessionNotFound)?;
            let q = sqlx::query(sql::CANCEL).bind(tenant).bind(session_id).bind(turn_id).bind(at);
            Ok(exec(q, conn).await? > 0)
        })
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
        write_tx!(self, |conn| {
            let at = now_micros();
            session_state(conn, tenant, session_id, at).await?.ok_or(StoreError::SessionNotFound)?;
            exec(sqlx::query(sql::PURGE_KEYS).bind(tenant).bind(session_id).bind(at), conn).await?;
            let found = sqlx::query_as::<_, (String, Uuid, Option<String>)>(sql::GET_KEY)
                .bind(tenant)
                .bind(session_id)
                .bind(key)
                .bind(at)
                .fetch_optional(&mut *conn)
                .await
                .map_err(db)?;
            if let Some((fingerprint, turn_id, response)) = found {
                let response = response.map(|r| from_json(&r)).transpose()?;
                return Ok(IdempotencyBegin::Existing(IdempotencyRecord { fingerprint, turn_id, response }));
            }
            let q = sqlx::query(sql::PUT_KEY)
                .bind(tenant)
                .bind(session_id)
                .bind(key)
                .bind(fingerprint)
                .bind(turn_id)
                .bind(at.saturating_add(micros(ttl)));
            exec(q, conn).await?;
            Ok(IdempotencyBegin::Started)
        })
    }

    async fn complete_idempotent(
        &self,
        tenant: &str,
        session_id: &str,
        key: &str,
        response: &serde_json::Value,
        ttl: Duration,
    ) -> StoreResult<()> {
        let text = json_text(response);
        write_tx!(self, |conn| {
            let at = now_micros();
            session_state(conn, tenant, session_id, at).await?.ok_or(StoreError::SessionNotFound)?;
            let q = sqlx::query(sql::COMPLETE_KEY)
                .bind(tenant)
                .bind(session_id)
                .bind(key)
                .bind(&text)
                .bind(at)
                .bind(at.saturating_add(micros(ttl)));
            exec(q, conn).await?;
            Ok(())
        })
    }

    async fn abort_idempotent(&self, tenant: &str, session_id: &str, key: &str) -> StoreResult<()> {
        write_tx!(self, |conn| {
            exec(sqlx::query(sql::ABORT_KEY).bind(tenant).bind(session_id).bind(key), conn).await?;
            Ok(())
        })
    }
}

#[async_trait]
impl FusedTurns for SqliteStore {
    async fn begin_turn(
        &self,
        tenant: &str,
        turn: &Turn,
        window: usize,
        lease: Duration,
    ) -> StoreResult<TurnBegin> {
        let session_id = turn.session_id.as_str();
        write_tx!(self, |conn| {
            let at = now_micros();
            let state =
                session_state(conn, tenant, session_id, at).await?.ok_or(StoreError::SessionNotFound)?;
            let expires = at.saturating_add(micros(lease));
            if let Some(holder) = claim(conn, tenant, session_id, turn.id, (at, expires)).await? {
                return Ok(TurnBegin::Busy(holder));
            }
            put_turn_on(conn, tenant, session_id, turn).await?;
            let rows = sqlx::query(sql::PAGE_DESC)
                .bind(tenant)
                .bind(session_id)
                .bind(state.floor_seq)
                .bind(i64::MAX)
                .bind(to_i64(window as u64))
                .fetch_all(&mut *conn)
                .await
                .map_err(db)?;
            let mut messages = rows
                .iter()
                .map(|r| message_from_row(r, session_id).map(WindowMessage::from))
                .collect::<StoreResult<Vec<_>>>()?;
            messages.reverse();
            Ok(TurnBegin::Started { system_prompt: state.system_prompt, window: messages })
        })
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
