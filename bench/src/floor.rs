//! The floors parley is compared with, each measured by the same load generator in the same run:
//! - 2a: a bare axum server that parses the same JSON request and answers a JSON body of the
//!   same size as parley's turn response ([`serve_floor`], run as `parley-bench floor-server`);
//! - 2b: the exact Redis commands of one turn, captured with `redis-cli monitor` and replayed
//!   by a raw client ([`capture_redis_turn`], [`RedisReplay`]);
//! - 2c: the exact PostgreSQL statements of one turn (parley's own SQL text, same binds),
//!   replayed by a raw sqlx client ([`PgReplay`]);
//! - 2d: the exact SQLite statements of one turn (parley's own SQL text, same binds, the same two
//!   write transactions on one writer connection with the same pragmas), replayed by a raw sqlx
//!   client on a database file of its own ([`SqliteReplay`]).

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use async_trait::async_trait;
use axum::Json;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use bytes::Bytes;
use chrono::Utc;
use deadpool_redis::redis::{self, aio::MultiplexedConnection};
use hyper::Method;
use parley::domain::{DEFAULT_TENANT, Usage};
use parley::store::postgres::ConnPool;
use parley::store::postgres::sql;
use serde::{Deserialize, Serialize};
use sqlx::types::Json as SqlJson;
use tokio::io::{AsyncBufReadExt, BufReader};
use uuid::Uuid;

use crate::client::Client;
use crate::load::Worker;

/// Body of the floor's request: the fields parley's turn takes.
#[derive(Deserialize)]
struct PostMessage {
    content: String,
    #[expect(dead_code, reason = "parsed like parley parses it, not used")]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Serialize)]
struct FloorReply<'a> {
    turn_id: Uuid,
    session_id: &'a str,
    content: &'a str,
    pad: &'a str,
}

async fn floor_turn(
    State(size): State<usize>,
    Path(id): Path<String>,
    Json(body): Json<PostMessage>,
) -> Json<serde_json::Value> {
    let mut reply = FloorReply { turn_id: Uuid::now_v7(), session_id: &id, content: &body.content, pad: "" };
    let bare = serde_json::to_vec(&reply).map(|v| v.len()).unwrap_or(0);
    let pad = "x".repeat(size.saturating_sub(bare));
    reply.pad = &pad;
    Json(serde_json::to_value(&reply).unwrap_or_default())
}

/// Serves the bare-axum floor on `addr` until killed: `POST /v1/sessions/{id}/messages` answers
/// a JSON body of `body_bytes` bytes; `GET /readyz` answers 200.
pub async fn serve_floor(addr: SocketAddr, body_bytes: usize) -> anyhow::Result<()> {
    let app = axum::Router::new()
        .route("/v1/sessions/{id}/messages", post(floor_turn))
        .route("/readyz", get(|| async { "ok" }))
        .with_state(body_bytes);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

/// The id of the session whose turn is captured; replays substitute their own session id.
pub const CAPTURE_SESSION: &str = "capture-0";

/// One command: its name and arguments as sent.
pub type RawCommand = Vec<Vec<u8>>;

/// The Redis commands one turn sends, in order: `redis-cli monitor` watches while parley runs a
/// turn on [`CAPTURE_SESSION`] (after a warm-up turn that loads the scripts and opens
/// connections); commands run inside scripts (`lua`) are not sent by parley and are left out.
pub async fn capture_redis_turn(
    redis_url: &str,
    parley: SocketAddr,
    body: &Bytes,
) -> anyhow::Result<Vec<RawCommand>> {
    let mut client = Client::new(parley);
    let path = format!("/v1/sessions/{CAPTURE_SESSION}/messages");
    client
        .call_ok(Method::POST, "/v1/sessions", Some(Bytes::from(format!("{{\"id\":\"{CAPTURE_SESSION}\"}}"))))
        .await?;
    client.call_ok(Method::POST, &path, Some(body.clone())).await?;
    let mut monitor = tokio::process::Command::new("redis-cli")
        .args(["-u", redis_url, "monitor"])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("start redis-cli monitor (apt-get install redis-tools)")?;
    let mut lines = BufReader::new(monitor.stdout.take().context("monitor stdout")?).lines();
    let first = tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await??;
    if first.as_deref() != Some("OK") {
        bail!("redis-cli monitor said {first:?}");
    }
    client.call_ok(Method::POST, &path, Some(body.clone())).await?;
    let mut commands = Vec::new();
    while let Ok(Ok(Some(line))) = tokio::time::timeout(Duration::from_millis(500), lines.next_line()).await {
        if line.contains(CAPTURE_SESSION) && !line.contains(" lua]") {
            commands.push(parse_monitor_line(&line).with_context(|| format!("monitor line {line:?}"))?);
        }
    }
    let _ = monitor.kill().await;
    if commands.is_empty() {
        bail!("captured no command of the turn");
    }
    Ok(commands)
}

/// Parses `1700000000.123 [0 127.0.0.1:5000] "CMD" "arg"…` (quoted with `\"`, `\\`, `\n`,
/// `\r`, `\t`, `\a`, `\b` and `\xHH` escapes) into the command's arguments.
pub fn parse_monitor_line(line: &str) -> anyhow::Result<RawCommand> {
    let start = line.find("] ").context("no client field")? + 2;
    let bytes = &line.as_bytes()[start..];
    let mut args = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'"' {
            i += 1;
            continue;
        }
        i += 1;
        let mut arg = Vec::new();
        while i < bytes.len() && bytes[i] != b'"' {
            if bytes[i] == b'\\' && i + 1 < bytes.len() {
                let (byte, used) = unescape(&bytes[i + 1..])?;
                arg.push(byte);
                i += 1 + used;
            } else {
                arg.push(bytes[i]);
                i += 1;
            }
        }
        i += 1;
        args.push(arg);
    }
    Ok(args)
}

fn unescape(rest: &[u8]) -> anyhow::Result<(u8, usize)> {
    Ok(match rest[0] {
        b'n' => (b'\n', 1),
        b'r' => (b'\r', 1),
        b't' => (b'\t', 1),
        b'a' => (7, 1),
        b'b' => (8, 1),
        b'x' => {
            let hex = std::str::from_utf8(rest.get(1..3).context("short \\x escape")?)?;
            (u8::from_str_radix(hex, 16)?, 3)
        }
        other => (other, 1),
    })
}

fn replace_bytes(arg: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(arg.len() + 16);
    let mut i = 0;
    while i < arg.len() {
        if arg[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(arg[i]);
            i += 1;
        }
    }
    out
}

/// A raw Redis client replaying one turn's commands on its own sessions, one after another (as
/// the turn sends them), on a shared multiplexed connection.
pub struct RedisReplay {
    conn: MultiplexedConnection,
    /// Per session, the turn's commands with the session id substituted.
    turns: Vec<Vec<redis::Cmd>>,
}

impl RedisReplay {
    /// Workers over `connections` shared connections; worker w owns sessions w, w + clients…
    pub async fn workers(
        url: &str,
        connections: usize,
        clients: usize,
        sessions: &[String],
        template: &[RawCommand],
    ) -> anyhow::Result<Vec<RedisReplay>> {
        let client = redis::Client::open(url)?;
        let mut conns = Vec::new();
        for _ in 0..connections.max(1) {
            conns.push(client.get_multiplexed_async_connection().await?);
        }
        Ok((0..clients)
            .map(|w| RedisReplay {
                conn: conns[w % conns.len()].clone(),
                turns: sessions.iter().skip(w).step_by(clients).map(|s| commands_for(template, s)).collect(),
            })
            .collect())
    }
}

fn commands_for(template: &[RawCommand], session: &str) -> Vec<redis::Cmd> {
    template
        .iter()
        .map(|args| {
            let mut cmd = redis::Cmd::new();
            for arg in args {
                cmd.arg(replace_bytes(arg, CAPTURE_SESSION.as_bytes(), session.as_bytes()));
            }
            cmd
        })
        .collect()
}

#[async_trait]
impl Worker for RedisReplay {
    async fn once(&mut self, i: u64) -> bool {
        let turn = &self.turns[i as usize % self.turns.len()];
        for cmd in turn {
            if cmd.query_async::<redis::Value>(&mut self.conn).await.is_err() {
                return false;
            }
        }
        true
    }
}

/// A raw sqlx client sending one turn's statements (parley's SQL text, parley's binds) on its
/// own sessions: `BEGIN_TURN` (claim the session, record the running turn, read the prompt and
/// the last 20 messages), then `FINISH_TURN` (append the user and assistant messages with the
/// completed turn, release the session).
pub struct PgReplay {
    pool: ConnPool,
    sessions: Vec<String>,
    content: String,
}

impl PgReplay {
    /// Workers sharing `pool`; worker w owns sessions w, w + clients…
    pub fn workers(pool: &ConnPool, clients: usize, sessions: &[String], content: &str) -> Vec<PgReplay> {
        (0..clients)
            .map(|w| PgReplay {
                pool: pool.clone(),
                sessions: sessions.iter().skip(w).step_by(clients).cloned().collect(),
                content: content.to_owned(),
            })
            .collect()
    }

    async fn turn(&self, session: &str) -> Result<(), sqlx::Error> {
        let turn_id = Uuid::now_v7();
        let started = Utc::now();
        let lease_micros = 15_000_000i64;
        sqlx::query(sql::BEGIN_TURN)
            .bind(DEFAULT_TENANT)
            .bind(session)
            .bind(turn_id)
            .bind(lease_micros)
            .bind(20i64)
            .bind("running")
            .bind(None::<String>)
            .bind(Vec::<Uuid>::new())
            .bind(None::<SqlJson<Usage>>)
            .bind(started)
            .bind(None::<chrono::DateTime<Utc>>)
            .fetch_all(&self.pool)
            .await?;
        self.append(session, turn_id, started).await
    }

    async fn append(
        &self,
        session: &str,
        turn_id: Uuid,
        started: chrono::DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        let ids = vec![Uuid::now_v7(), Uuid::now_v7()];
        let reply = format!("echo: {} (context: 20 messages)", self.content);
        let usage = Usage { prompt_tokens: 40, completion_tokens: 10, total_tokens: 50 };
        sqlx::query_scalar::<_, i64>(sql::FINISH_TURN)
            .bind(DEFAULT_TENANT)
            .bind(session)
            .bind(2i64)
            .bind(None::<i64>)
            .bind(None::<i64>)
            .bind(&ids)
            .bind(vec![turn_id, turn_id])
            .bind(vec!["user", "assistant"])
            .bind(vec![self.content.as_str(), reply.as_str()])
            .bind(vec!["{}".to_owned(), "{}".to_owned()])
            .bind(vec![None::<String>, None])
            .bind(vec![None::<&str>, None])
            .bind(vec![None::<&str>, None])
            .bind(vec![started, Utc::now()])
            .bind(Some(turn_id))
            .bind(Some("completed"))
            .bind(None::<String>)
            .bind(Some(ids.clone()))
            .bind(Some(SqlJson(usage)))
            .bind(Some(started))
            .bind(Some(Utc::now()))
            .bind(turn_id)
            .bind(None::<i64>)
            .fetch_optional(&self.pool)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Worker for PgReplay {
    async fn once(&mut self, i: u64) -> bool {
        let session = self.sessions[i as usize % self.sessions.len()].clone();
        self.turn(&session).await.is_ok()
    }
}

/// A raw sqlx client sending one turn's SQLite statements (parley's SQL text, parley's binds) as
/// parley's SQLite store does: two `begin immediate` transactions on the one writer connection —
/// begin (session state, the lock row, take the lock, the running record, the last 20 messages),
/// then finish (session state, the fence, the two messages, the completed record, release the
/// lock, save the session's counters).
pub struct SqliteReplay {
    writer: sqlx::SqlitePool,
    sessions: Vec<String>,
    content: String,
}

/// Now, in µs since the epoch (how parley's SQLite store stamps rows).
fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}

impl SqliteReplay {
    /// Creates the database at `path` with parley's own schema (by opening a `SqliteStore` there
    /// once) and `sessions` in it, then opens the one writer connection as parley does.
    pub async fn open(path: &std::path::Path, sessions: &[String]) -> anyhow::Result<sqlx::SqlitePool> {
        use parley::store::ConversationStore;
        use parley::store::sqlite::{SqliteOptions, SqliteStore};
        for suffix in ["", "-wal", "-shm", ".lock"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        let options = SqliteOptions {
            path: path.to_owned(),
            readers: 1,
            max_messages: None,
            ttl: None,
            op_timeout: Duration::from_secs(10),
        };
        {
            let store = SqliteStore::open(options).await.context("create the floor's SQLite database")?;
            for id in sessions {
                let new = parley::domain::NewSession {
                    id: id.clone(),
                    system_prompt: None,
                    metadata: Default::default(),
                };
                store.create_session(DEFAULT_TENANT, new).await?;
            }
        }
        let connect = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5))
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .synchronous(sqlx::sqlite::SqliteSynchronous::Normal);
        Ok(sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(connect)
            .await?)
    }

    /// Workers sharing the writer; worker w owns sessions w, w + clients…
    pub fn workers(
        writer: &sqlx::SqlitePool,
        clients: usize,
        sessions: &[String],
        content: &str,
    ) -> Vec<Self> {
        (0..clients)
            .map(|w| SqliteReplay {
                writer: writer.clone(),
                sessions: sessions.iter().skip(w).step_by(clients).cloned().collect(),
                content: content.to_owned(),
            })
            .collect()
    }

    async fn turn(&self, session: &str) -> Result<(), sqlx::Error> {
        use parley::store::sqlite::sql;
        use sqlx::Row;
        let turn_id = Uuid::now_v7();
        let started = Utc::now();
        let lease = 15_000_000i64;
        let t = DEFAULT_TENANT;
        // Begin: claim, record the running turn, read the window.
        let mut conn = self.writer.acquire().await?;
        sqlx::query("begin immediate").execute(&mut *conn).await?;
        let at = now_micros();
        let state =
            sqlx::query(sql::SESSION_STATE).bind(t).bind(session).bind(at).fetch_one(&mut *conn).await?;
        let floor: i64 = state.try_get(1)?;
        let lock = sqlx::query(sql::LOCK_ROW).bind(t).bind(session).fetch_optional(&mut *conn).await?;
        let _ = lock.map(|row| row.try_get::<i64, _>(1));
        sqlx::query(sql::TAKE_LOCK)
            .bind(t)
            .bind(session)
            .bind(turn_id)
            .bind(at + lease)
            .bind(false)
            .execute(&mut *conn)
            .await?;
        sqlx::query(sql::PUT_TURN)
            .bind(t)
            .bind(session)
            .bind(turn_id)
            .bind("running")
            .bind(None::<String>)
            .bind("[]")
            .bind(None::<String>)
            .bind(started.timestamp_micros())
            .bind(None::<i64>)
            .execute(&mut *conn)
            .await?;
        let window = sqlx::query(sql::PAGE_DESC)
            .bind(t)
            .bind(session)
            .bind(floor)
            .bind(i64::MAX)
            .bind(20i64)
            .fetch_all(&mut *conn)
            .await?;
        std::hint::black_box(window.len());
        sqlx::query("commit").execute(&mut *conn).await?;
        drop(conn);
        // Finish: fenced append of the two messages with the completed record, release.
        let ids = [Uuid::now_v7(), Uuid::now_v7()];
        let reply = format!("echo: {} (context: 20 messages)", self.content);
        let mut conn = self.writer.acquire().await?;
        sqlx::query("begin immediate").execute(&mut *conn).await?;
        let at = now_micros();
        let state =
            sqlx::query(sql::SESSION_STATE).bind(t).bind(session).bind(at).fetch_one(&mut *conn).await?;
        let (last, floor, count): (i64, i64, i64) = (state.try_get(0)?, state.try_get(1)?, state.try_get(2)?);
        let held = sqlx::query(sql::FENCE)
            .bind(t)
            .bind(session)
            .bind(turn_id)
            .bind(at)
            .fetch_optional(&mut *conn)
            .await?;
        if held.is_none() {
            sqlx::query("rollback").execute(&mut *conn).await?;
            return Err(sqlx::Error::RowNotFound);
        }
        for (k, (id, (role, text))) in
            ids.iter().zip([("user", self.content.as_str()), ("assistant", reply.as_str())]).enumerate()
        {
            sqlx::query(sql::INSERT_MESSAGE)
                .bind(t)
                .bind(session)
                .bind(last + 1 + k as i64)
                .bind(id)
                .bind(turn_id)
                .bind(role)
                .bind(text)
                .bind("{}")
                .bind(None::<String>)
                .bind(None::<&str>)
                .bind(None::<&str>)
                .bind(at)
                .execute(&mut *conn)
                .await?;
        }
        let usage = Usage { prompt_tokens: 40, completion_tokens: 10, total_tokens: 50 };
        sqlx::query(sql::PUT_TURN)
            .bind(t)
            .bind(session)
            .bind(turn_id)
            .bind("completed")
            .bind(None::<String>)
            .bind(serde_json::to_string(&ids).unwrap_or_default())
            .bind(serde_json::to_string(&usage).ok())
            .bind(started.timestamp_micros())
            .bind(Some(now_micros()))
            .execute(&mut *conn)
            .await?;
        sqlx::query(sql::RELEASE_LOCK).bind(t).bind(session).bind(turn_id).execute(&mut *conn).await?;
        sqlx::query(sql::SAVE_STATE)
            .bind(t)
            .bind(session)
            .bind(last + 2)
            .bind(floor)
            .bind(count + 2)
            .bind(at)
            .bind(None::<i64>)
            .execute(&mut *conn)
            .await?;
        sqlx::query("commit").execute(&mut *conn).await?;
        Ok(())
    }
}

#[async_trait]
impl Worker for SqliteReplay {
    async fn once(&mut self, i: u64) -> bool {
        let session = self.sessions[i as usize % self.sessions.len()].clone();
        self.turn(&session).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_lines_parse_with_escapes() {
        let line = r#"1700000000.1 [0 127.0.0.1:5000] "EVALSHA" "ab" "1" "p:{default/capture-0}:meta" "{\"a\":\"x\\ny\"}" "\xc3\xa9""#;
        let cmd = parse_monitor_line(line).unwrap();
        assert_eq!(cmd[0], b"EVALSHA");
        assert_eq!(cmd[3], b"p:{default/capture-0}:meta");
        assert_eq!(cmd[4], br#"{"a":"x\ny"}"#);
        assert_eq!(cmd[5], "é".as_bytes());
    }

    #[test]
    fn the_session_id_is_substituted_everywhere() {
        assert_eq!(replace_bytes(b"p:{d/capture-0}:m capture-0", b"capture-0", b"s-1"), b"p:{d/s-1}:m s-1");
    }
}
