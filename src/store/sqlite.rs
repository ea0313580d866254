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
//! round trip); pages and windows are range scans of the messages key, so they cost O(page).
//! Times are computed in Rust and bound as microseconds, so leases, TTLs and the session order
//! follow one clock.
//!
//! A second parley on the same file is refused at start-up: [`SqliteStore::open`] holds an
//! exclusive lock on `<path>.lock` for the store's life. A file that cannot be opened, read or
//! written (read-only, not a database, corrupt) fails [`SqliteStore::open`] with a message naming
//! the path; one that fails later (a full disk, a lock held by another program) answers
//! [`StoreError::Unavailable`], so the API answers 503 `store_unavailable` and nothing is half
//! written.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, SqliteConnection, Transaction};
use uuid::Uuid;

use super::{
    AppendBatch, ConversationStore, FinishedTurn, IdempotencyBegin, IdempotencyRecord, LeaseKey, LockOutcome,
    LockStatus, MessagePage, Order, PageQuery, SessionCursor, SessionPage, StoreError, StoreResult,
    TurnBegin,
};
use crate::domain::{
    Message, Metadata, NewSession, Role, Session, ToolCall, Turn, TurnStatus, Usage, WindowMessage, now,
};

/// Runs `$body` (a block that may use `?`) with `$conn`, the writer connection, in a
/// `BEGIN IMMEDIATE` transaction: committed if it returns `Ok`, rolled back otherwise. The whole
/// is bounded by the operation timeout; a timeout before the transaction began is `Unavailable`
/// (nothing was sent), after it `Unanswered`.
macro_rules! write_tx {
    ($store:expr, |$conn:ident| $body:block) => {{
        let store: &SqliteStore = $store;
        let began = std::sync::atomic::AtomicBool::new(false);
        let work = async {
            let mut guard = WriteGuard::begin(&store.writer).await?;
            began.store(true, std::sync::atomic::Ordering::Relaxed);
            let outcome = {
                let $conn: &mut SqliteConnection = guard.conn();
                async move { $body }.await
            };
            guard.settle(outcome).await
        };
        match tokio::time::timeout(store.op_timeout, work).await {
            Ok(outcome) => outcome,
            Err(_) => Err(store.timed_out(began.load(std::sync::atomic::Ordering::Relaxed))),
        }
    }};
}

/// The writer connection inside a `BEGIN IMMEDIATE` transaction that parley opened itself (not
/// sqlx's `Transaction`, whose depth count goes wrong when SQLite rolls back on its own, as on a
/// full disk). If the transaction may still be open when the guard goes (a timeout dropped the
/// operation, or a rollback failed), the connection is closed instead of pooled, which makes
/// SQLite roll back, and the next write opens a fresh one.
struct WriteGuard {
    conn: sqlx::pool::PoolConnection<Sqlite>,
    open: bool,
}

impl WriteGuard {
    async fn begin(pool: &SqlitePool) -> StoreResult<Self> {
        let conn = pool.acquire().await.map_err(db)?;
        let mut guard = WriteGuard { conn, open: true };
        match sqlx::query("begin immediate").execute(&mut *guard.conn).await {
            Ok(_) => Ok(guard),
            Err(e) => {
                // No transaction began (busy past the timeout, an unusable file).
                guard.open = false;
                Err(db(e))
            }
        }
    }

    fn conn(&mut self) -> &mut SqliteConnection {
        &mut self.conn
    }

    /// Commits if `outcome` is `Ok`, else rolls back.
    async fn settle<T>(mut self, outcome: StoreResult<T>) -> StoreResult<T> {
        let result = match outcome {
            Ok(value) => match sqlx::query("commit").execute(&mut *self.conn).await {
                Ok(_) => {
                    self.open = false;
                    return Ok(value);
                }
                Err(e) => Err(db(e)),
            },
            Err(e) => Err(e),
        };
        // SQLite may have rolled back already (a full disk does): then this fails, and the
        // connection is closed on drop to be sure.
        if sqlx::query("rollback").execute(&mut *self.conn).await.is_ok() {
            self.open = false;
        }
        result
    }
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        if self.open {
            self.conn.close_on_drop();
        }
    }
}

/// Runs `$body` with `$conn`, a reader connection, in one read transaction (one committed
/// state), within the operation timeout.
macro_rules! read_tx {
    ($store:expr, |$conn:ident| $body:block) => {{
        let store: &SqliteStore = $store;
        let work = async {
            let mut tx = store.readers.begin().await.map_err(db)?;
            let outcome = {
                let $conn: &mut SqliteConnection = &mut tx;
                async move { $body }.await
            };
            settle_read(tx, outcome).await
        };
        match tokio::time::timeout(store.op_timeout, work).await {
            Ok(outcome) => outcome,
            Err(_) => Err(store.timed_out(false)),
        }
    }};
}

/// Ends a read transaction.
async fn settle_read<T>(tx: Transaction<'static, Sqlite>, outcome: StoreResult<T>) -> StoreResult<T> {
    match outcome {
        Ok(value) => {
            tx.commit().await.map_err(db)?;
            Ok(value)
        }
        Err(e) => {
            // A failed rollback leaves nothing applied either: SQLite rolls back on its own.
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

/// The embedded migrations (`migrations/sqlite/`).
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Most expired sessions (or keys) the sweeper deletes in one transaction.
pub const SWEEP_BATCH: i64 = 500;

/// Longest TTL or lease applied (about 1000 years), so that `now + ttl` stays a valid time.
const MAX_TTL_MICROS: i64 = 1000 * 366 * 24 * 3600 * 1_000_000;

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

/// Takes the exclusive lock on `<path>.lock`, trying for a second: a parley that is stopping (or
/// a child process between its fork and its exec, which holds a copy of the lock for that
/// moment) lets go of it soon.
async fn take_ownership(path: &Path) -> StoreResult<File> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        if let Some(file) = try_ownership(path, attempt >= 20)? {
            return Ok(file);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One attempt of [`take_ownership`]: `None` if the lock is held, unless this is the `last`
/// attempt, which says which file another parley holds.
fn try_ownership(path: &Path, last: bool) -> StoreResult<Option<File>> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", lock_path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) if !last => Ok(None),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Unavailable(format!(
            "the SQLite database {} is in use by another parley (it holds {}); stop it, or set \
             PARLEY_SQLITE_PATH to another file (several replicas need PARLEY_STORE=postgres or redis)",
            path.display(),
            lock_path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(StoreError::Unavailable(format!("cannot lock {}: {e}", lock_path.display())))
        }
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

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX).min(MAX_TTL_MICROS)
}

fn time(micros: i64) -> StoreResult<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| StoreError::Backend(format!("invalid time {micros} in SQLite")))
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Maps a driver error. Every failure of the file itself (busy past the timeout, locked,
/// read-only, I/O, corrupt, full, cannot open, not a database) is `Unavailable`: SQLite rolls a
/// failed transaction back, so nothing was applied.
fn db(error: sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    match error {
        E::PoolTimedOut => StoreError::Unavailable("the SQLite writer was busy for too long".to_owned()),
        E::PoolClosed => StoreError::Unavailable("the SQLite store is closed".to_owned()),
        E::Io(e) => StoreError::Unavailable(format!("SQLite I/O: {e}")),
        E::Database(e) => {
            let primary = e.code().and_then(|c| c.parse::<i32>().ok()).map(|c| c & 0xff);
            // BUSY, LOCKED, READONLY, IOERR, CORRUPT, FULL, CANTOPEN, PROTOCOL, NOTADB.
            if primary.is_some_and(|c| matches!(c, 5 | 6 | 8 | 10 | 11 | 13 | 14 | 15 | 26)) {
                StoreError::Unavailable(format!("SQLite: {}", e.message()))
            } else {
                StoreError::Backend(format!("SQLite: {}", e.message()))
            }
        }
        other => StoreError::Backend(other.to_string()),
    }
}

fn migrate_err(error: MigrateError) -> StoreError {
    match error {
        MigrateError::Execute(e) => db(e),
        other => StoreError::Backend(format!("migration failed: {other}")),
    }
}

fn decode(error: sqlx::Error) -> StoreError {
    StoreError::Backend(format!("unexpected row from SQLite: {error}"))
}

/// JSON text exactly as serde writes it (key order kept).
fn json_text<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str) -> StoreResult<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Backend(format!("invalid JSON in SQLite: {e}")))
}

fn session_from_row(row: &SqliteRow) -> StoreResult<Session> {
    let metadata: String = row.try_get("metadata").map_err(decode)?;
    Ok(Session {
        id: row.try_get("id").map_err(decode)?,
        created_at: time(row.try_get("created_at").map_err(decode)?)?,
        updated_at: time(row.try_get("updated_at").map_err(decode)?)?,
        system_prompt: row.try_get("system_prompt").map_err(decode)?,
        metadata: from_json(&metadata)?,
        message_count: to_u64(row.try_get("message_count").map_err(decode)?),
    })
}

fn message_from_row(row: &SqliteRow, session_id: &str) -> StoreResult<Message> {
    let role: String = row.try_get("role").map_err(decode)?;
    let metadata: String = row.try_get("metadata").map_err(decode)?;
    let tool_calls: Option<String> = row.try_get("tool_calls").map_err(decode)?;
    Ok(Message {
        id: row.try_get("id").map_err(decode)?,
        session_id: session_id.to_owned(),
        seq: to_u64(row.try_get("seq").map_err(decode)?),
        turn_id: row.try_get("turn_id").map_err(decode)?,
        role: parse_role(&role)?,
        content: row.try_get("content").map_err(decode)?,
        metadata: from_json(&metadata)?,
        tool_calls: tool_calls.map(|t| from_json::<Vec<ToolCall>>(&t)).transpose()?,
        tool_call_id: row.try_get("tool_call_id").map_err(decode)?,
        name: row.try_get("name").map_err(decode)?,
        created_at: time(row.try_get("created_at").map_err(decode)?)?,
        superseded_by: row.try_get::<Option<Uuid>, _>("superseded_by").map_err(decode)?,
    })
}

fn turn_from_row(row: &SqliteRow, session_id: &str) -> StoreResult<Turn> {
    let status: String = row.try_get("status").map_err(decode)?;
    let error: Option<String> = row.try_get("error").map_err(decode)?;
    let ids: String = row.try_get("message_ids").map_err(decode)?;
    let usage: Option<String> = row.try_get("usage").map_err(decode)?;
    let completed_at: Option<i64> = row.try_get("completed_at").map_err(decode)?;
    Ok(Turn {
        id: row.try_get("id").map_err(decode)?,
        session_id: session_id.to_owned(),
        status: parse_status(&status)?,
        error: error.map(|e| from_json(&e)).transpose()?,
        message_ids: from_json(&ids)?,
        usage: usage.map(|u| from_json::<Usage>(&u)).transpose()?,
        created_at: time(row.try_get("created_at").map_err(decode)?)?,
        completed_at: completed_at.map(time).transpose()?,
    })
}

fn parse_role(text: &str) -> StoreResult<Role> {
    match text {
        "system" => Ok(Role::System),
        "user" => Ok(Role::User),
        "assistant" => Ok(Role::Assistant),
        "tool" => Ok(Role::Tool),
        other => Err(StoreError::Backend(format!("unknown message role {other:?} in SQLite"))),
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
        other => Err(StoreError::Backend(format!("unknown turn status {other:?} in SQLite"))),
    }
}

/// The statements this store sends. `?N` placeholders; times in µs since the epoch.
pub mod sql {
    /// The columns of a session row.
    macro_rules! session_cols {
        () => {
            "id, created_at, updated_at, system_prompt, metadata, message_count"
        };
    }

    /// The columns of a message row (without `superseded_by`).
    macro_rules! message_cols {
        () => {
            "seq, id, turn_id, role, content, metadata, tool_calls, tool_call_id, name, created_at"
        };
    }

    /// A live session. Binds: tenant, id, now.
    pub const GET_SESSION: &str = concat!(
        "select ",
        session_cols!(),
        " from sessions where tenant = ?1 and id = ?2 and (expires_at is null or expires_at > ?3)"
    );

    /// The first page of the list. Binds: tenant, now, limit.
    pub const LIST_FIRST: &str = concat!(
        "select ",
        session_cols!(),
        " from sessions where tenant = ?1 and (expires_at is null or expires_at > ?2)",
        " order by updated_at desc, id desc limit ?3"
    );

    /// A later page of the list. Binds: tenant, now, limit, cursor's updated_at, cursor's id.
    pub const LIST_AFTER: &str = concat!(
        "select ",
        session_cols!(),
        " from sessions where tenant = ?1 and (expires_at is null or expires_at > ?2)",
        " and (updated_at, id) < (?4, ?5) order by updated_at desc, id desc limit ?3"
    );

    /// Counts a tenant's live sessions. Binds: tenant, now.
    pub const COUNT_SESSIONS: &str =
        "select count(*) from sessions where tenant = ?1 and (expires_at is null or expires_at > ?2)";

    /// Deletes one session if it has expired. Binds: tenant, id, now.
    pub const DROP_EXPIRED: &str = "delete from sessions where tenant = ?1 and id = ?2 and expires_at <= ?3";

    /// Creates a session unless the id is taken (then no row). Binds: tenant, id, system prompt,
    /// metadata, now, expires_at, message count, last seq, floor seq.
    pub const CREATE_SESSION: &str = concat!(
        "insert into sessions (tenant, id, created_at, updated_at, system_prompt, metadata,",
        " message_count, last_seq, floor_seq, expires_at)",
        " values (?1, ?2, ?5, ?5, ?3, ?4, ?7, ?8, ?9, ?6) on conflict (tenant, id) do nothing returning ",
        session_cols!()
    );

    /// Writes one message. Binds: tenant, session, seq, then the message's columns.
    pub const INSERT_MESSAGE: &str = concat!(
        "insert into messages (tenant, session_id, ",
        message_cols!(),
        ") values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
    );

    /// A live session's counters. Binds: tenant, id, now.
    pub const SESSION_STATE: &str = "select last_seq, floor_seq, message_count, updated_at, system_prompt \
         from sessions where tenant = ?1 and id = ?2 and (expires_at is null or expires_at > ?3)";

    /// Saves a session's counters after a write. Binds: tenant, id, last seq, floor seq, message
    /// count, updated_at, expires_at.
    pub const SAVE_STATE: &str = "update sessions set last_seq = ?3, floor_seq = ?4, message_count = ?5, \
         updated_at = ?6, expires_at = ?7 where tenant = ?1 and id = ?2";

    /// Whether a turn holds a session with a live lease. Binds: tenant, session, turn, now.
    pub const FENCE: &str = "select 1 from turn_locks where tenant = ?1 and session_id = ?2 and turn_id = ?3 \
         and expires_at > ?4";

    /// Moves active messages from a seq on to the superseded ones. Binds: tenant, session, from
    /// seq, the superseding turn.
    pub const SUPERSEDE: &str = concat!(
        "insert into superseded_messages (tenant, session_id, ",
        message_cols!(),
        ", superseded_by) select tenant, session_id, ",
        message_cols!(),
        ", ?4 from messages where tenant = ?1 and session_id = ?2 and seq >= ?3"
    );

    /// Deletes active messages from a seq on. Binds: tenant, session, from seq.
    pub const DELETE_FROM: &str = "delete from messages where tenant = ?1 and session_id = ?2 and seq >= ?3";

    /// Deletes active messages up to a seq. Binds: tenant, session, seq.
    pub const TRIM: &str = "delete from messages where tenant = ?1 and session_id = ?2 and seq <= ?3";

    /// Deletes superseded messages up to a seq. Binds: tenant, session, seq.
    pub const TRIM_SUPERSEDED: &str =
        "delete from superseded_messages where tenant = ?1 and session_id = ?2 and seq <= ?3";

    /// Creates or replaces a turn record, unless it is terminal already. Binds: tenant, session,
    /// id, status, error, message ids, usage, created_at, completed_at.
    pub const PUT_TURN: &str = "insert into turns (tenant, session_id, id, status, error, message_ids, usage, \
         created_at, completed_at) values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
         on conflict (tenant, session_id, id) do update set status = excluded.status, error = excluded.error, \
         message_ids = excluded.message_ids, usage = excluded.usage, created_at = excluded.created_at, \
         completed_at = excluded.completed_at where turns.status = 'running'";

    /// Keeps the newest `cap` turn records (the given turn among them). Binds: tenant, session,
    /// turn, cap.
    pub const TRIM_TURNS: &str = "delete from turns where tenant = ?1 and session_id = ?2 and id <> ?3 \
         and id <= (select id from turns where tenant = ?1 and session_id = ?2 and id <> ?3 \
         order by id desc limit 1 offset ?4 - 1)";

    /// A turn record of a live session. Binds: tenant, session, turn, now.
    pub const GET_TURN: &str = "select t.id, t.status, t.error, t.message_ids, t.usage, t.created_at, \
         t.completed_at from turns t join sessions s on s.tenant = t.tenant and s.id = t.session_id \
         where t.tenant = ?1 and t.session_id = ?2 and t.id = ?3 \
         and (s.expires_at is null or s.expires_at > ?4)";

    /// A page of active messages, oldest first. Binds: tenant, session, above seq, below seq, limit.
    pub const PAGE_ASC: &str = concat!(
        "select ",
        message_cols!(),
        ", null as superseded_by from messages where tenant = ?1 and session_id = ?2",
        " and seq > ?3 and seq < ?4 order by seq asc limit ?5"
    );

    /// [`PAGE_ASC`], newest first.
    pub const PAGE_DESC: &str = concat!(
        "select ",
        message_cols!(),
        ", null as superseded_by from messages where tenant = ?1 and session_id = ?2",
        " and seq > ?3 and seq < ?4 order by seq desc limit ?5"
    );

    /// A page over active and superseded messages, merged. Binds as [`PAGE_ASC`].
    macro_rules! page_all {
        ($dir:literal) => {
            concat!(
                "select * from (select ",
                message_cols!(),
                ", null as superseded_by from messages where tenant = ?1 and session_id = ?2",
                " and seq > ?3 and seq < ?4 order by seq ",
                $dir,
                " limit ?5) union all select * from (select ",
                message_cols!(),
                ", superseded_by from superseded_messages where tenant = ?1 and session_id = ?2",
                " and seq > ?3 and seq < ?4 order by seq ",
                $dir,
                " limit ?5) order by seq ",
                $dir,
                " limit ?5"
            )
        };
    }

    /// [`PAGE_ASC`] over active and superseded messages.
    pub const PAGE_ALL_ASC: &str = page_all!("asc");
    /// [`PAGE_DESC`] over active and superseded messages.
    pub const PAGE_ALL_DESC: &str = page_all!("desc");

    /// The lock row of a session. Binds: tenant, session.
    pub const LOCK_ROW: &str =
        "select turn_id, expires_at, cancel_requested from turn_locks where tenant = ?1 and session_id = ?2";

    /// Claims a session for a turn. Binds: tenant, session, turn, expires_at, cancel flag kept.
    pub const TAKE_LOCK: &str = "insert into turn_locks (tenant, session_id, turn_id, expires_at, cancel_requested) \
         values (?1, ?2, ?3, ?4, ?5) on conflict (tenant, session_id) do update set turn_id = excluded.turn_id, \
         expires_at = excluded.expires_at, cancel_requested = excluded.cancel_requested";

    /// Extends a held lease. Binds: tenant, session, turn, now, new expires_at. Returns the cancel flag.
    pub const RENEW_LOCK: &str = "update turn_locks set expires_at = ?5 where tenant = ?1 and session_id = ?2 \
         and turn_id = ?3 and expires_at > ?4 and exists (select 1 from sessions s where s.tenant = ?1 \
         and s.id = ?2 and (s.expires_at is null or s.expires_at > ?4)) returning cancel_requested";

    /// Releases the lock if the turn holds it. Binds: tenant, session, turn.
    pub const RELEASE_LOCK: &str =
        "delete from turn_locks where tenant = ?1 and session_id = ?2 and turn_id = ?3";

    /// The turn holding a live session (null: none; no row: no session). Binds: tenant, session, now.
    pub const LOCK_HOLDER: &str = "select l.turn_id from sessions s left join turn_locks l \
         on l.tenant = s.tenant and l.session_id = s.id and l.expires_at > ?3 \
         where s.tenant = ?1 and s.id = ?2 and (s.expires_at is null or s.expires_at > ?3)";

    /// Flags a cancel request. Binds: tenant, session, turn, now.
    pub const CANCEL: &str = "update turn_locks set cancel_requested = 1 where tenant = ?1 and session_id = ?2 \
         and turn_id = ?3 and expires_at > ?4";

    /// Forgets a session's expired keys. Binds: tenant, session, now.
    pub const PURGE_KEYS: &str =
        "delete from idempotency_keys where tenant = ?1 and session_id = ?2 and expires_at <= ?3";

    /// A live key. Binds: tenant, session, key, now.
    pub const GET_KEY: &str = "select fingerprint, turn_id, response from idempotency_keys \
         where tenant = ?1 and session_id = ?2 and key = ?3 and expires_at > ?4";

    /// Remembers a key. Binds: tenant, session, key, fingerprint, turn, expires_at.
    pub const PUT_KEY: &str = "insert into idempotency_keys (tenant, session_id, key, fingerprint, turn_id, \
         response, expires_at) values (?1, ?2, ?3, ?4, ?5, null, ?6)";

    /// Saves a live key's answer and restarts its ttl. Binds: tenant, session, key, response,
    /// now, expires_at.
    pub const COMPLETE_KEY: &str = "update idempotency_keys set response = ?4, expires_at = ?6 \
         where tenant = ?1 and session_id = ?2 and key = ?3 and expires_at > ?5";

    /// Forgets a key. Binds: tenant, session, key.
    pub const ABORT_KEY: &str =
        "delete from idempotency_keys where tenant = ?1 and session_id = ?2 and key = ?3";

    /// Deletes up to `?2` expired sessions. Binds: now, batch.
    pub const SWEEP: &str = "delete from sessions where rowid in (select rowid from sessions \
         where expires_at <= ?1 order by expires_at limit ?2)";

    /// Deletes up to `?2` expired idempotency keys. Binds: now, batch.
    pub const SWEEP_IDEMPOTENCY: &str = "delete from idempotency_keys where rowid in (select rowid from \
         idempotency_keys where expires_at <= ?1 order by expires_at limit ?2)";
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
        let fence = release.or(batch.fence);
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
impl ConversationStore for SqliteStore {
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
        let has_more = rows.len() > limit;
        let sessions = rows.iter().take(limit).map(session_from_row).collect::<StoreResult<Vec<_>>>()?;
        Ok(SessionPage { sessions, has_more })
    }

    async fn delete_session(&self, tenant: &str, id: &str) -> StoreResult<bool> {
        write_tx!(self, |conn| {
            let at = now_micros();
            let live = sqlx::query_scalar::<_, bool>(
                "delete from sessions where tenant = ?1 and id = ?2 \
                     returning (expires_at is null or expires_at > ?3)",
            )
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
            let row = sqlx::query(concat!(
                "update sessions set metadata = ?3, expires_at = ?5 where tenant = ?1 and id = ?2",
                " and (expires_at is null or expires_at > ?4)",
                " returning id, created_at, updated_at, system_prompt, metadata, message_count"
            ))
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

    async fn count_sessions(&self, tenant: &str) -> StoreResult<u64> {
        read_tx!(self, |conn| {
            let q = sqlx::query_scalar::<_, i64>(sql::COUNT_SESSIONS).bind(tenant).bind(now_micros());
            Ok(to_u64(q.fetch_one(&mut *conn).await.map_err(db)?))
        })
    }
}
