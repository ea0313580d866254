//! The Redis store: conversations shared by every replica (`is_distributed()` is true).
//!
//! # Files
//! - `mod.rs` (this file): the options, the store and its [`ConversationStore`] implementation.
//! - `keys.rs`: the key layout (which keys a session owns, and their names).
//! - `scripts.rs`: the Lua scripts (`scripts/*.lua`), one per write and per lock or key method.
//! - `pool.rs`: the connection pool and the one-request lease that drops broken connections.
//! - `codec.rs`: what is stored, as text: messages, turns and sessions to and from JSON and hashes.
//! - `redact.rs`: keeps the URL's password out of every error and `Debug` output.
//! - `coordinator.rs`: [`RedisCoordinator`], the locks and keys alone, for a history store kept
//!   elsewhere (`PARLEY_COORDINATOR=redis`).
//!
//! # Atomicity and the index
//! Every write is one Lua script (`EVALSHA`, loaded on first use): it checks that the session
//! exists, changes the session's keys, moves the session in the tenant index and slides the TTL,
//! in one round trip and atomically. The index is per tenant, so it lives in another slot than the
//! session: the scripts declare it in `KEYS` like the others, which is what a single Redis node (or
//! a primary with replicas) needs. Keeping it in the same script means the index never lags a
//! write, at the price of not running on Redis Cluster as is (there the index update would move to a
//! command pipelined right after the script). Reads only touch the session's slot.
//!
//! # A turn's messages
//! `turn_messages` finds a turn without reading the history: the scripts that add or drop
//! messages keep `turn_msgs`, a hash of turn id → `lo hi n` (the lowest and highest seq of the
//! turn's messages and how many are held), in the same atomic step. Reading a turn is then one
//! `HGET` and a `ZRANGE BYSCORE lo hi` of the active and superseded sets: O(the turn's messages),
//! since a turn holding its session writes contiguous seqs. Appending costs one `HGET` and one
//! `HSET` per turn in the batch; dropping messages past the cap reads them once to count them
//! out, so a turn's entry goes with its last message. The turn record's `message_ids` would not
//! do: only turns the agent ran have a record (a plain append or a fork's copy has none), and ids
//! are not the seqs the sets are scored by. A session created before `turn_msgs` existed has no
//! `turn_index` field in its meta; its turns are found by scanning both sets until it is cleared.
//!
//! # Expiry
//! With a TTL, every write sets it again on every key of the session and on the tenant index, so a
//! session's keys expire together, and the index outlives the sessions in it. Expired sessions leave
//! a member in the index; listing drops such members (when their score has not moved since).
//!
//! The lock key is the exception: its expiry is the turn's lease, which session writes leave alone.
//! A lock that outlives its (expired) session is ignored, since every lock script first checks that
//! the session's meta exists, and `create_session` deletes it. Idempotency records expire one by one:
//! `begin` first forgets the keys whose time has passed, and `idem`/`idem_exp` expire when their
//! last record does (or with the session, if that comes first).
//!
//! # Turn locks and idempotency keys
//! Each method is one EVALSHA. Acquire sets the lock if absent (or renews it if the caller holds
//! it), renew compares the holder and `PEXPIRE`s, release compares and deletes, cancel compares and
//! sets the flag. Locks and idempotency scripts other than `begin` and `abort` are retried once after
//! a broken connection, since running them twice changes nothing.
//!
//! # Connections
//! Every operation is bounded by the operation timeout (pool wait, connect, response, and the whole
//! call); an unreachable Redis answers [`StoreError::Unavailable`], never with the URL's password.
//! Pooled connections are not PINGed on every checkout (only after sitting idle), so each
//! operation below costs exactly the commands listed; a connection that fails or times out is
//! dropped from the pool, and a read that failed on it is retried once on a fresh one. A write is
//! never retried (but for the lock scripts and `complete_idempotent`, see above): after a connection
//! failure nobody knows whether it ran.
//!
//! # Commands per operation
//! `get_session` HGETALL · `get_turn` HGET · `append`, `create_session`, `clear`, `put_turn`,
//! `delete_session`, `set_session_metadata`, `read_page`, `last_n`, `turn_messages` and the eight lock and idempotency methods one EVALSHA
//! each · `ping` PING · `list_sessions` one ZRANGE (or a pipeline of two with a cursor) plus one
//! pipeline of HGETALL, plus one EVALSHA when it finds expired sessions · `count_sessions` ZCARD
//! (ZCOUNT with a TTL).

mod codec;
mod coordinator;
mod events;
mod keys;
mod pool;
mod redact;
mod scripts;

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use deadpool::Runtime;
use deadpool::managed::{self, QueueMode};
use deadpool_redis::redis::{
    self, AsyncConnectionConfig, FromRedisValue, RedisError, Script, ScriptInvocation,
};
use uuid::Uuid;

use super::{
    AppendBatch, ConversationStore, FinishedTurn, FusedTurns, IdempotencyBegin, IdempotencyRecord, LeaseKey,
    LockOutcome, LockStatus, MessagePage, Order, PageQuery, SessionCursor, SessionPage, StoreBackend,
    StoreError, StoreResult, TurnBegin, TurnCoordinator,
};
use crate::domain::{Message, Metadata, NewSession, Session, Turn, WindowMessage, now};
use codec::{IdemHead, from_json, parse_messages, parse_session, parse_uuid, split_at_seq, to_json};
use keys::{SessionKeys, index_key};
use pool::{LeanManager, Lease, Pool, Request, is_connection_failure};
use redact::Redactor;
use scripts::{RENEW_LOCK, Scripts};

pub use coordinator::RedisCoordinator;

/// What the begin-turn script answers: acquired (0/1), the holder when busy, the window, whether
/// the session has a system prompt (0/1), the prompt.
type Begun = (i64, String, Vec<String>, i64, String);

/// Most lease renewals sent in one pipeline.
const RENEW_BATCH: usize = 500;

/// The largest page this store fetches at once; larger limits are clamped (Lua counts in doubles).
const MAX_FETCH: usize = u32::MAX as usize;

/// The longest TTL passed to Redis (about 1,100 years), so that `PEXPIRE` never overflows.
const MAX_TTL_MS: u64 = 1 << 45;

/// A lease or record ttl in milliseconds: at least 1 ms, at most [`MAX_TTL_MS`].
fn lease_millis(lease: Duration) -> u64 {
    u64::try_from(lease.as_millis()).unwrap_or(MAX_TTL_MS).clamp(1, MAX_TTL_MS)
}

/// The TTL in milliseconds as the scripts take it: 0 for none (also for a zero duration), else at
/// least 1 ms.
fn ttl_millis(ttl: Option<Duration>) -> u64 {
    match ttl {
        Some(t) if !t.is_zero() => u64::try_from(t.as_millis()).unwrap_or(MAX_TTL_MS).clamp(1, MAX_TTL_MS),
        _ => 0,
    }
}

/// How to reach Redis and how to keep sessions there.
#[derive(Clone)]
pub struct RedisOptions {
    /// Connection URL (`redis://[user][:password@]host[:port][/db]`, `rediss://` for TLS).
    pub url: String,
    /// Prefix of every key; must not contain `{` or `}` (they would change the hash tag).
    pub prefix: String,
    /// Most pooled connections (each one multiplexes many concurrent requests).
    pub pool_size: usize,
    /// Most messages (and turn records) kept per session, the oldest going first; `None` keeps all.
    pub max_messages: Option<usize>,
    /// Idle time after which a session expires, sliding on each write; `None` never expires.
    pub ttl: Option<Duration>,
    /// Bound on one store operation, including waiting for and opening a connection.
    pub op_timeout: Duration,
}

impl std::fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOptions")
            .field("url", &Redactor::new(&self.url).apply(&self.url))
            .field("prefix", &self.prefix)
            .field("pool_size", &self.pool_size)
            .field("max_messages", &self.max_messages)
            .field("ttl", &self.ttl)
            .field("op_timeout", &self.op_timeout)
            .finish()
    }
}

/// The Redis conversation store.
pub struct RedisStore {
    pool: Pool,
    prefix: String,
    /// Cap on messages (and turn records) per session; 0 keeps all.
    cap: usize,
    /// Session TTL in milliseconds; 0 never expires.
    ttl_ms: u64,
    op_timeout: Duration,
    redactor: Redactor,
    scripts: Scripts,
    /// Coordinating turns for another history store ([`RedisCoordinator`]): the lock and key
    /// scripts do not look for the session, which lives elsewhere.
    standalone: bool,
    /// For the announcements' own connection (a subscribed connection can send nothing else).
    pubsub: redis::Client,
    /// What wakes this process's followers of turn event logs.
    announcements: crate::store::event_log::Announcements,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("cap", &self.cap)
            .field("ttl_ms", &self.ttl_ms)
            .field("op_timeout", &self.op_timeout)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store over a lazily connected pool: no I/O happens here, so the service starts even
    /// while Redis is down. Fails only on an invalid URL or prefix.
    pub fn new(opts: RedisOptions) -> Result<Self, StoreError> {
        let redactor = Redactor::new(&opts.url);
        if opts.prefix.contains(['{', '}']) {
            return Err(StoreError::Backend("the Redis key prefix must not contain '{' or '}'".into()));
        }
        let timeout = Some(opts.op_timeout);
        let connection =
            AsyncConnectionConfig::new().set_connection_timeout(timeout).set_response_timeout(timeout);
        let inner = deadpool_redis::Manager::new_with_config(opts.url.as_str(), connection)
            .map_err(|e| StoreError::Backend(redactor.apply(&format!("invalid Redis URL: {e}"))))?;
        let pool = Pool::builder(LeanManager { inner })
            .max_size(opts.pool_size.max(1))
            .queue_mode(QueueMode::Lifo)
            .runtime(Runtime::Tokio1)
            .wait_timeout(timeout)
            .create_timeout(timeout)
            .recycle_timeout(timeout)
            .build()
            .map_err(|e| StoreError::Backend(redactor.apply(&format!("Redis pool: {e}"))))?;
        let client = redis::Client::open(opts.url.as_str())
            .map_err(|e| StoreError::Backend(redactor.apply(&format!("invalid Redis URL: {e}"))))?;
        Ok(RedisStore {
            pubsub: client,
            announcements: crate::store::event_log::Announcements::new(),
            pool,
            prefix: opts.prefix,
            cap: opts.max_messages.unwrap_or(0),
            ttl_ms: ttl_millis(opts.ttl),
            op_timeout: opts.op_timeout,
            redactor,
            scripts: Scripts::new(),
            standalone: false,
        })
    }

    /// The key the lock and idempotency scripts check the session's existence by: its meta, or
    /// none (the empty name) when coordinating for another history store.
    fn meta_for_locks(&self, keys: SessionKeys) -> String {
        if self.standalone { String::new() } else { keys.meta }
    }

    fn session_keys(&self, tenant: &str, id: &str) -> SessionKeys {
        SessionKeys::new(&self.prefix, tenant, id)
    }

    fn index_key(&self, tenant: &str) -> String {
        index_key(&self.prefix, tenant)
    }

    /// Runs `work` within the operation timeout.
    async fn bounded<T>(&self, work: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
        match tokio::time::timeout(self.op_timeout, work).await {
            Ok(result) => result,
            Err(_) => {
                Err(StoreError::Unanswered(format!("Redis did not answer within {:?}", self.op_timeout)))
            }
        }
    }

    async fn lease(&self) -> StoreResult<Lease> {
        let conn = self.pool.get().await.map_err(|e| self.pool_error(e))?;
        Ok(Lease { conn: Some(conn), healthy: false })
    }

    /// Maps a command's result, marking the lease healthy unless the connection itself failed.
    fn settle<T>(&self, lease: &mut Lease, result: redis::RedisResult<T>) -> StoreResult<T> {
        match result {
            Ok(value) => {
                lease.healthy = true;
                Ok(value)
            }
            Err(e) => {
                lease.healthy = !is_connection_failure(&e);
                Err(self.redis_error(e))
            }
        }
    }

    /// Sends a read (retried once on a fresh connection if the pooled one turns out broken).
    async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> StoreResult<T> {
        self.run(Request::Cmd(cmd), true).await
    }

    /// Sends a pipeline of reads (retried like [`RedisStore::query`]).
    async fn query_pipe<T: FromRedisValue>(&self, pipe: &redis::Pipeline) -> StoreResult<T> {
        self.run(Request::Pipe(pipe), true).await
    }

    /// Runs a script that only reads, or whose repetition is harmless (retried).
    async fn read<T: FromRedisValue>(&self, call: &ScriptInvocation<'_>) -> StoreResult<T> {
        self.run(Request::Script(call), true).await
    }

    /// Runs a writing script, never twice: after a connection failure, whether it ran is unknown.
    async fn write<T: FromRedisValue>(&self, call: &ScriptInvocation<'_>) -> StoreResult<T> {
        self.run(Request::Script(call), false).await
    }

    async fn run<T: FromRedisValue>(&self, request: Request<'_>, retry: bool) -> StoreResult<T> {
        self.bounded(async {
            let mut retry = retry;
            loop {
                let mut lease = self.lease().await?;
                let result = request.send(lease.conn()?).await;
                let broken = result.as_ref().is_err_and(is_connection_failure);
                match self.settle(&mut lease, result) {
                    Err(_) if broken && retry => retry = false,
                    done => return done,
                }
            }
        })
        .await
    }

    /// Appends a batch and, with `release`, releases the session lock that turn holds, in one
    /// script.
    async fn append_releasing(
        &self,
        tenant: &str,
        session_id: &str,
        batch: AppendBatch,
        fence: Option<Uuid>,
        release: Option<Uuid>,
    ) -> StoreResult<Vec<Message>> {
        let keys = self.session_keys(tenant, session_id);
        let mut messages = batch.messages;
        let mut call = self.write_call(&self.scripts.append, &keys, session_id, now().timestamp_micros());
        let fence = release.or(fence);
        call.arg(fence.map(|id| id.to_string()).unwrap_or_default());
        call.arg(if release.is_some() { "1" } else { "0" });
        match &batch.turn {
            Some(turn) => call.arg(turn.id.to_string()).arg(to_json(turn)?),
            None if batch.supersede_from.is_some() => {
                return Err(StoreError::Backend(
                    "an append that supersedes messages must carry its turn".into(),
                ));
            }
            None => call.arg("").arg(""),
        };
        call.arg(batch.supersede_from.map(|s| s.to_string()).unwrap_or_default());
        for m in &mut messages {
            m.session_id = session_id.to_owned();
            let (head, tail) = split_at_seq(m)?;
            call.arg(head).arg(tail);
        }
        let first = match self.write::<i64>(&call).await? {
            0 => return Err(StoreError::SessionNotFound),
            -1 => return Err(StoreError::Fenced),
            first => first as u64,
        };
        for (m, seq) in messages.iter_mut().zip(first..) {
            m.seq = seq;
        }
        Ok(messages)
    }

    /// Creates a session unless it exists or the tenant holds `max` sessions (0 = no limit).
    async fn create(&self, tenant: &str, new: NewSession, max: u64) -> StoreResult<Session> {
        let keys = self.session_keys(tenant, &new.id);
        let metadata = to_json(&new.metadata)?;
        let at = now();
        let mut call = self.write_call(&self.scripts.create, &keys, &new.id, at.timestamp_micros());
        call.arg(max).arg(metadata);
        match &new.system_prompt {
            Some(prompt) => call.arg("1").arg(prompt),
            None => call.arg("0"),
        };
        match self.write::<i64>(&call).await? {
            0 => return Err(StoreError::SessionExists),
            -1 => return Err(StoreError::SessionLimitReached(max)),
            _ => {}
        }
        Ok(Session {
            id: new.id,
            created_at: at,
            updated_at: at,
            system_prompt: new.system_prompt,
            metadata: new.metadata,
            message_count: 0,
        })
    }

    /// A write script call with the session's keys and the common arguments.
    fn write_call<'a>(
        &self,
        script: &'a Script,
        keys: &SessionKeys,
        id: &str,
        at: i64,
    ) -> ScriptInvocation<'a> {
        let mut call = script.prepare_invoke();
        for key in keys.all() {
            call.key(key);
        }
        call.arg(id).arg(at).arg(self.ttl_ms).arg(self.cap);
        call
    }

    /// A read script call with the session's meta and messages keys.
    fn read_call<'a>(&self, script: &'a Script, tenant: &str, id: &str) -> ScriptInvocation<'a> {
        let keys = self.session_keys(tenant, id);
        let mut call = script.prepare_invoke();
        call.key(keys.meta).key(keys.messages);
        call
    }

    /// A lock script call with the session's meta and lock keys.
    fn lock_call<'a>(&self, script: &'a Script, tenant: &str, id: &str) -> ScriptInvocation<'a> {
        let keys = self.session_keys(tenant, id);
        let lock = keys.lock.clone();
        let mut call = script.prepare_invoke();
        call.key(self.meta_for_locks(keys)).key(lock);
        call
    }

    /// A wait queue script call: the session's queue keys, the turn and the lease.
    fn queue_call<'a>(
        &self,
        script: &'a Script,
        tenant: &str,
        id: &str,
        turn_id: Uuid,
        lease: Option<Duration>,
    ) -> ScriptInvocation<'a> {
        let keys = self.session_keys(tenant, id);
        let mut call = script.prepare_invoke();
        call.key(keys.queue).key(keys.queue_exp).arg(turn_id.to_string());
        if let Some(lease) = lease {
            call.arg(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1));
        }
        call
    }

    /// An idempotency script call with the session's meta, idem and idem_exp keys.
    fn idem_call<'a>(&self, script: &'a Script, tenant: &str, id: &str) -> ScriptInvocation<'a> {
        let keys = self.session_keys(tenant, id);
        let (idem, idem_exp) = (keys.idem.clone(), keys.idem_exp.clone());
        let mut call = script.prepare_invoke();
        call.key(self.meta_for_locks(keys)).key(idem).key(idem_exp);
        call
    }

    fn pool_error(&self, e: managed::PoolError<RedisError>) -> StoreError {
        StoreError::Unavailable(self.redactor.apply(&format!("Redis connection: {e}")))
    }

    fn redis_error(&self, e: RedisError) -> StoreError {
        let text = self.redactor.apply(&format!("Redis: {e}"));
        if is_connection_failure(&e) {
            // The connection broke with the command sent, or about to be: it may have run.
            return StoreError::Unanswered(text);
        }
        let unavailable =
            e.is_cluster_error() || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading);
        if unavailable { StoreError::Unavailable(text) } else { StoreError::Backend(text) }
    }

    /// Up to `want` index entries after `pos` in list order (score desc, then id desc).
    async fn index_after(
        &self,
        index: &str,
        pos: Option<&(i64, String)>,
        want: usize,
    ) -> StoreResult<Vec<(i64, String)>> {
        let Some((micros, last_id)) = pos else {
            let mut cmd = redis::cmd("ZRANGE");
            cmd.arg(index).arg("+inf").arg("-inf").arg("BYSCORE").arg("REV");
            cmd.arg("LIMIT").arg(0).arg(want).arg("WITHSCORES");
            let rows: Vec<(String, f64)> = self.query(&cmd).await?;
            return Ok(rows.into_iter().map(|(id, score)| (score as i64, id)).collect());
        };
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGE").arg(index).arg(micros).arg(micros).arg("BYSCORE");
        pipe.cmd("ZRANGE").arg(index).arg(format!("({micros}")).arg("-inf").arg("BYSCORE").arg("REV");
        pipe.arg("LIMIT").arg(0).arg(want).arg("WITHSCORES");
        let (ties, older): (Vec<String>, Vec<(String, f64)>) = self.query_pipe(&pipe).await?;
        let ties = ties.into_iter().rev().filter(|id| id < last_id).map(|id| (*micros, id));
        let older = older.into_iter().map(|(id, score)| (score as i64, id));
        Ok(ties.chain(older).take(want).collect())
    }

    /// Loads the sessions of `entries` (one pipelined round trip); `None` for those that are gone.
    async fn load_sessions(
        &self,
        tenant: &str,
        entries: &[(i64, String)],
    ) -> StoreResult<Vec<Option<Session>>> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (_, id) in entries {
            pipe.cmd("HGETALL").arg(self.session_keys(tenant, id).meta);
        }
        let metas: Vec<HashMap<String, String>> = self.query_pipe(&pipe).await?;
        metas.into_iter().map(parse_session).collect()
    }

    async fn drop_stale(&self, index: &str, stale: &[(i64, String)]) -> StoreResult<()> {
        if stale.is_empty() {
            return Ok(());
        }
        let mut call = self.scripts.drop_stale.prepare_invoke();
        call.key(index);
        for (micros, id) in stale {
            call.arg(id).arg(micros);
        }
        self.read::<i64>(&call).await.map(|_| ())
    }
}

#[async_trait]
impl StoreBackend for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    fn is_distributed(&self) -> bool {
        true
    }

    async fn ping(&self) -> StoreResult<()> {
        self.query::<String>(&redis::cmd("PING")).await.map(|_| ())
    }
}

#[async_trait]
impl ConversationStore for RedisStore {
    async fn create_session(&self, tenant: &str, new: NewSession) -> StoreResult<Session> {
        self.create(tenant, new, 0).await
    }

    async fn create_session_within(&self, tenant: &str, new: NewSession, max: u64) -> StoreResult<Session> {
        if max == 0 {
            // The script reads 0 as no limit.
            return Err(StoreError::SessionLimitReached(0));
        }
        self.create(tenant, new, max).await
    }

    async fn create_session_with(
        &self,
        tenant: &str,
        new: NewSession,
        mut messages: Vec<Message>,
        max: u64,
    ) -> StoreResult<(Session, Vec<Message>)> {
        if max == 0 {
            return Err(StoreError::SessionLimitReached(0));
        }
        let keys = self.session_keys(tenant, &new.id);
        let at = now();
        let mut call = self.write_call(&self.scripts.create_with, &keys, &new.id, at.timestamp_micros());
        call.arg(max).arg(to_json(&new.metadata)?);
        match &new.system_prompt {
            Some(prompt) => call.arg("1").arg(prompt),
            None => call.arg("0").arg(""),
        };
        for m in &mut messages {
            m.session_id.clone_from(&new.id);
            let (head, tail) = split_at_seq(m)?;
            call.arg(head).arg(tail);
        }
        match self.write::<i64>(&call).await? {
            0 => return Err(StoreError::SessionExists),
            -1 => return Err(StoreError::SessionLimitReached(max)),
            _ => {}
        }
        for (m, seq) in messages.iter_mut().zip(1..) {
            m.seq = seq;
        }
        let kept = if self.cap > 0 { messages.len().min(self.cap) } else { messages.len() };
        let session = Session {
            id: new.id,
            created_at: at,
            updated_at: at,
            system_prompt: new.system_prompt,
            metadata: new.metadata,
            message_count: kept as u64,
        };
        Ok((session, messages))
    }

    async fn get_session(&self, tenant: &str, id: &str) -> StoreResult<Option<Session>> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(self.session_keys(tenant, id).meta);
        parse_session(self.query(&cmd).await?)
    }

    async fn list_sessions(
        &self,
        tenant: &str,
        limit: usize,
        cursor: Option<&SessionCursor>,
    ) -> StoreResult<SessionPage> {
        let limit = limit.min(MAX_FETCH);
        let index = self.index_key(tenant);
        let mut pos = cursor.map(|c| (c.updated_at_micros, c.id.clone()));
        let mut sessions = Vec::with_capacity(limit.min(100) + 1);
        let mut stale = Vec::new();
        // Fetch one more than asked to learn whether more follow; repeat while expired sessions
        // left holes in the page.
        while sessions.len() <= limit {
            let want = limit + 1 - sessions.len();
            let entries = self.index_after(&index, pos.as_ref(), want).await?;
            let loaded = self.load_sessions(tenant, &entries).await?;
            for (entry, session) in entries.iter().zip(loaded) {
                match session {
                    Some(s) => sessions.push(s),
                    None => stale.push(entry.clone()),
                }
            }
            if entries.len() < want {
                break;
            }
            pos = entries.last().cloned();
        }
        self.drop_stale(&index, &stale).await?;
        let has_more = sessions.len() > limit;
        sessions.truncate(limit);
        Ok(SessionPage { sessions, has_more })
    }

    async fn delete_session(&self, tenant: &str, id: &str) -> StoreResult<bool> {
        let keys = self.session_keys(tenant, id);
        let call = self.write_call(&self.scripts.delete, &keys, id, now().timestamp_micros());
        Ok(self.write::<i64>(&call).await? == 1)
    }

    async fn set_session_metadata(
        &self,
        tenant: &str,
        id: &str,
        metadata: Metadata,
    ) -> StoreResult<Option<Session>> {
        let keys = self.session_keys(tenant, id);
        let mut call = self.write_call(&self.scripts.set_metadata, &keys, id, now().timestamp_micros());
        call.arg(to_json(&metadata)?);
        parse_session(self.write(&call).await?)
    }

    async fn append(&self, tenant: &str, session_id: &str, batch: AppendBatch) -> StoreResult<Vec<Message>> {
        self.append_releasing(tenant, session_id, batch, None, None).await
    }

    async fn read_page(&self, tenant: &str, session_id: &str, query: PageQuery) -> StoreResult<MessagePage> {
        let mut call = if query.include_superseded {
            let keys = self.session_keys(tenant, session_id);
            let mut call = self.scripts.read_page_all.prepare_invoke();
            call.key(keys.meta).key(keys.messages).key(keys.superseded);
            call
        } else {
            self.read_call(&self.scripts.read_page, tenant, session_id)
        };
        let min = query.after.map_or_else(|| "-inf".to_owned(), |a| format!("({a}"));
        let max = query.before.map_or_else(|| "+inf".to_owned(), |b| format!("({b}"));
        let order = if query.order == Order::Desc { "desc" } else { "asc" };
        call.arg(min).arg(max).arg(order).arg(query.limit.min(MAX_FETCH));
        let found: Option<(i64, Vec<String>)> = self.read(&call).await?;
        let (more, members) = found.ok_or(StoreError::SessionNotFound)?;
        Ok(MessagePage { messages: parse_messages(&members)?, has_more: more == 1 })
    }

    async fn last_n(&self, tenant: &str, session_id: &str, n: usize) -> StoreResult<Vec<Message>> {
        let n = n.min(MAX_FETCH);
        let mut call = self.read_call(&self.scripts.last_n, tenant, session_id);
        call.arg(n).arg(format!("-{n}"));
        let found: Option<Vec<String>> = self.read(&call).await?;
        parse_messages(&found.ok_or(StoreError::SessionNotFound)?)
    }

    async fn turn_messages(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
    ) -> StoreResult<Vec<Message>> {
        let keys = self.session_keys(tenant, session_id);
        let mut call = self.scripts.turn_messages.prepare_invoke();
        call.key(keys.meta).key(keys.messages).key(keys.superseded).key(keys.turn_msgs);
        call.arg(turn_id.to_string());
        let found: Option<Vec<String>> = self.read(&call).await?;
        let mut messages = parse_messages(&found.ok_or(StoreError::SessionNotFound)?)?;
        messages.sort_by_key(|m| m.seq);
        Ok(messages)
    }

    async fn clear(&self, tenant: &str, session_id: &str) -> StoreResult<()> {
        let keys = self.session_keys(tenant, session_id);
        let call = self.write_call(&self.scripts.clear, &keys, session_id, now().timestamp_micros());
        if self.write::<i64>(&call).await? == 0 {
            return Err(StoreError::SessionNotFound);
        }
        Ok(())
    }

    async fn put_turn(&self, tenant: &str, turn: &Turn) -> StoreResult<()> {
        let keys = self.session_keys(tenant, &turn.session_id);
        let mut call =
            self.write_call(&self.scripts.put_turn, &keys, &turn.session_id, now().timestamp_micros());
        call.arg(turn.id.to_string()).arg(to_json(turn)?);
        if self.write::<i64>(&call).await? == 0 {
            return Err(StoreError::SessionNotFound);
        }
        Ok(())
    }

    async fn get_turn(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<Option<Turn>> {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(self.session_keys(tenant, session_id).turns).arg(turn_id.to_string());
        let found: Option<String> = self.query(&cmd).await?;
        found.map(|json| from_json(&json)).transpose()
    }

    async fn count_sessions(&self, tenant: &str) -> StoreResult<u64> {
        // The index scores a session by its last write, and every write slides its TTL: with a
        // TTL, members scored before `now - ttl` have expired and are not counted.
        let index = self.index_key(tenant);
        let cmd = if self.ttl_ms == 0 {
            let mut cmd = redis::cmd("ZCARD");
            cmd.arg(index);
            cmd
        } else {
            let oldest = now().timestamp_micros().saturating_sub(self.ttl_ms as i64 * 1000);
            let mut cmd = redis::cmd("ZCOUNT");
            cmd.arg(index).arg(format!("({oldest}")).arg("+inf");
            cmd
        };
        self.query(&cmd).await
    }
}

#[async_trait]
impl TurnCoordinator for RedisStore {
    async fn acquire_turn_lock(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<LockOutcome> {
        let mut call = self.lock_call(&self.scripts.acquire_lock, tenant, session_id);
        call.arg(turn_id.to_string()).arg(lease_millis(lease));
        // Repeating a claim is harmless: a retry after a lost reply finds its own turn holding it.
        let holder: Option<String> = self.read(&call).await?;
        match parse_uuid(&holder.ok_or(StoreError::SessionNotFound)?)? {
            holder if holder == turn_id => Ok(LockOutcome::Acquired),
            holder => Ok(LockOutcome::Busy(holder)),
        }
    }

    async fn renew_turn_lock(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<LockStatus> {
        let mut call = self.lock_call(&self.scripts.renew_lock, tenant, session_id);
        call.arg(turn_id.to_string()).arg(lease_millis(lease));
        let (held, cancel): (i64, i64) = self.read(&call).await?;
        Ok(LockStatus { held: held == 1, cancel_requested: cancel == 1 })
    }

    async fn renew_turn_locks(&self, turns: &[LeaseKey], lease: Duration) -> StoreResult<Vec<LockStatus>> {
        let mut statuses = Vec::with_capacity(turns.len());
        for chunk in turns.chunks(RENEW_BATCH) {
            // One pipeline per chunk: the script is loaded first (a no-op when it is), then one
            // EVALSHA per turn, so a restarted Redis cannot answer NOSCRIPT.
            let mut pipe = redis::pipe();
            pipe.cmd("SCRIPT").arg("LOAD").arg(RENEW_LOCK).ignore();
            for t in chunk {
                let keys = self.session_keys(&t.tenant, &t.session_id);
                let lock = keys.lock.clone();
                pipe.cmd("EVALSHA")
                    .arg(self.scripts.renew_lock.get_hash())
                    .arg(2)
                    .arg(self.meta_for_locks(keys))
                    .arg(lock)
                    .arg(t.turn_id.to_string())
                    .arg(lease_millis(lease));
            }
            let answers: Vec<(i64, i64)> = self.query_pipe(&pipe).await?;
            statuses.extend(
                answers
                    .into_iter()
                    .map(|(held, cancel)| LockStatus { held: held == 1, cancel_requested: cancel == 1 }),
            );
        }
        Ok(statuses)
    }

    async fn release_turn_lock(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<()> {
        let mut call = self.scripts.release_lock.prepare_invoke();
        call.key(self.session_keys(tenant, session_id).lock).arg(turn_id.to_string());
        self.read::<i64>(&call).await.map(|_| ())
    }

    async fn turn_lock_holder(&self, tenant: &str, session_id: &str) -> StoreResult<Option<Uuid>> {
        let call = self.lock_call(&self.scripts.lock_holder, tenant, session_id);
        let holder: Option<String> = self.read(&call).await?;
        match holder.ok_or(StoreError::SessionNotFound)? {
            none if none.is_empty() => Ok(None),
            holder => parse_uuid(&holder).map(Some),
        }
    }

    async fn join_queue(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<bool> {
        let call = self.queue_call(&self.scripts.join_queue, tenant, session_id, turn_id, Some(lease));
        self.read::<i64>(&call).await.map(|_| true)
    }

    async fn first_in_queue(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<bool> {
        let call = self.queue_call(&self.scripts.first_in_queue, tenant, session_id, turn_id, Some(lease));
        self.read::<i64>(&call).await.map(|first| first == 1)
    }

    async fn leave_queue(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<()> {
        let call = self.queue_call(&self.scripts.leave_queue, tenant, session_id, turn_id, None);
        self.read::<i64>(&call).await.map(drop)
    }

    async fn request_cancel(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<bool> {
        let mut call = self.lock_call(&self.scripts.cancel_lock, tenant, session_id);
        call.arg(turn_id.to_string());
        match self.read::<i64>(&call).await? {
            -1 => Err(StoreError::SessionNotFound),
            flagged => Ok(flagged == 1),
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
        let mut call = self.idem_call(&self.scripts.begin_idem, tenant, session_id);
        let head = IdemHead { fingerprint: fingerprint.to_owned(), turn_id };
        call.arg(key).arg(to_json(&head)?).arg(lease_millis(ttl));
        // Never retried: a retry after a lost reply would find the key it just stored.
        let found: Option<Vec<Option<String>>> = self.write(&call).await?;
        match found.ok_or(StoreError::SessionNotFound)?.as_slice() {
            [] => Ok(IdempotencyBegin::Started),
            [Some(head), response] => {
                let head: IdemHead = from_json(head)?;
                let response = response.as_deref().map(from_json).transpose()?;
                Ok(IdempotencyBegin::Existing(IdempotencyRecord {
                    fingerprint: head.fingerprint,
                    turn_id: head.turn_id,
                    response,
                }))
            }
            _ => Err(StoreError::Backend("unexpected idempotency record in Redis".into())),
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
        let mut call = self.idem_call(&self.scripts.complete_idem, tenant, session_id);
        call.arg(key).arg(to_json(response)?).arg(lease_millis(ttl));
        // Saving the same answer twice is harmless.
        match self.read::<i64>(&call).await? {
            -1 => Err(StoreError::SessionNotFound),
            _ => Ok(()),
        }
    }

    async fn abort_idempotent(&self, tenant: &str, session_id: &str, key: &str) -> StoreResult<()> {
        let mut call = self.idem_call(&self.scripts.abort_idem, tenant, session_id);
        call.arg(key);
        // Never retried: by then another request may have begun the key afresh.
        self.write::<i64>(&call).await.map(|_| ())
    }

    fn event_log(&self) -> Option<&dyn crate::store::event_log::TurnEventLog> {
        Some(self)
    }
}

#[async_trait]
impl FusedTurns for RedisStore {
    async fn begin_turn(
        &self,
        tenant: &str,
        turn: &Turn,
        window: usize,
        lease: Duration,
    ) -> StoreResult<TurnBegin> {
        let id = turn.session_id.as_str();
        let keys = self.session_keys(tenant, id);
        let n = window.min(MAX_FETCH);
        let mut call = self.write_call(&self.scripts.begin_turn, &keys, id, now().timestamp_micros());
        call.arg(turn.id.to_string()).arg(to_json(turn)?).arg(lease_millis(lease)).arg(n);
        let (acquired, holder, members, has_prompt, prompt): Begun =
            self.write::<Option<Begun>>(&call).await?.ok_or(StoreError::SessionNotFound)?;
        if acquired == 0 {
            return Ok(TurnBegin::Busy(parse_uuid(&holder)?));
        }
        let system_prompt = (has_prompt == 1).then_some(prompt);
        let window = parse_messages(&members)?.into_iter().map(WindowMessage::from).collect();
        Ok(TurnBegin::Started { system_prompt, window })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn options(url: &str) -> RedisOptions {
        RedisOptions {
            url: url.into(),
            prefix: "parley".into(),
            pool_size: 2,
            max_messages: None,
            ttl: None,
            op_timeout: Duration::from_millis(300),
        }
    }

    #[test]
    fn an_invalid_url_error_does_not_show_the_password() {
        let err = RedisStore::new(options("redis://user:s3cr3t-pw@host:notaport/x")).unwrap_err();
        assert!(!err.to_string().contains("s3cr3t-pw"), "{err}");
        let err = RedisStore::new(options("nope://user:s3cr3t-pw@host")).unwrap_err();
        assert!(!err.to_string().contains("s3cr3t-pw"), "{err}");
    }

    #[test]
    fn debug_output_does_not_show_the_password() {
        let opts = options("redis://:s3cr3t-pw@127.0.0.1:1");
        assert!(!format!("{opts:?}").contains("s3cr3t-pw"));
        let store = RedisStore::new(opts).unwrap();
        assert!(!format!("{store:?}").contains("s3cr3t-pw"));
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_unavailable_without_the_password() {
        let store = RedisStore::new(options("redis://:s3cr3t-pw@127.0.0.1:1")).unwrap();
        let err = store.get_session("t", "s").await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(!err.to_string().contains("s3cr3t-pw"), "{err}");
    }

    #[test]
    fn a_zero_ttl_means_none_and_huge_ones_are_clamped() {
        assert_eq!(ttl_millis(None), 0);
        assert_eq!(ttl_millis(Some(Duration::ZERO)), 0);
        assert_eq!(ttl_millis(Some(Duration::from_micros(10))), 1);
        assert_eq!(ttl_millis(Some(Duration::from_secs(2))), 2000);
        assert_eq!(ttl_millis(Some(Duration::MAX)), MAX_TTL_MS);
    }

    #[test]
    fn a_prefix_with_braces_is_refused() {
        let mut opts = options("redis://127.0.0.1:6379");
        opts.prefix = "p{x}".into();
        assert!(matches!(RedisStore::new(opts), Err(StoreError::Backend(_))));
    }
}
