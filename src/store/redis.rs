//! The Redis store: conversations shared by every replica (`is_distributed()` is true).
//!
//! # Key layout
//! With prefix `P`, tenant `T` and session `S` (both percent-encoded outside `[A-Za-z0-9._:-]`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:{T/S}:meta` | hash | `id`, `created_at`/`updated_at` (µs), `system_prompt` (absent when none), `metadata` (JSON), `message_count`, `last_seq`, `turn_seq` |
//! | `P:{T/S}:messages` | zset | score = seq, member = the message's JSON |
//! | `P:{T/S}:turns` | hash | turn id → the turn's JSON |
//! | `P:{T/S}:turn_order` | zset | turn id scored by first-save order, to drop the oldest turns under the cap |
//! | `P:{T/S}:lock` | hash | the turn lock: `turn` (holder's id), `cancel` (`0`/`1`); expires with its lease |
//! | `P:{T/S}:idem` | hash | idempotency keys: `f:<key>` → `{"fingerprint","turn_id"}`, `r:<key>` → the response JSON |
//! | `P:{T/S}:idem_exp` | zset | idempotency key scored by when it is forgotten (Redis server time, ms) |
//! | `P:{T}:sessions` | zset | the tenant's index: session id scored by `updated_at` (µs) |
//!
//! The `{T/S}` hash tag puts every key of one session in one Redis Cluster slot. The seq counter
//! (`last_seq`) lives in the meta hash, so `clear` (which only drops `messages`) keeps it.
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
//! `delete_session`, `set_session_metadata`, `read_page`, `last_n` and the eight lock and idempotency methods one EVALSHA
//! each · `ping` PING · `list_sessions` one ZRANGE (or a pipeline of two with a cursor) plus one
//! pipeline of HGETALL, plus one EVALSHA when it finds expired sessions · `count_sessions` ZCARD
//! (ZCOUNT with a TTL).

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool::Runtime;
use deadpool::managed::{self, Metrics, Object, QueueMode, RecycleResult};
use deadpool_redis::redis::aio::MultiplexedConnection;
use deadpool_redis::redis::{
    self, AsyncConnectionConfig, FromRedisValue, RedisError, Script, ScriptInvocation,
};
use uuid::Uuid;

use super::{
    AppendBatch, ConversationStore, FinishedTurn, IdempotencyBegin, IdempotencyRecord, LeaseKey, LockOutcome,
    LockStatus, MessagePage, Order, PageQuery, SessionCursor, SessionPage, StoreError, StoreResult,
    TurnBegin,
};
use crate::config::StoreConfig;
use crate::domain::{Message, Metadata, NewSession, Session, Turn, WindowMessage, now};

/// Lua shared by the write scripts. `KEYS` is always `meta, messages, turns, turn_order, index,
/// lock, idem, idem_exp`;
/// `ARGV` starts with `session id, now (µs), ttl (ms, 0 = none), cap (0 = none)`.
///
/// Timestamps stay strings in Lua: its numbers print with 14 digits, and µs since the epoch have 16.
const PRELUDE: &str = r#"
local meta, messages, turns, order, index = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local lock, idem, idem_exp, superseded = KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local id, now, ttl, cap = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])

local function call_chunked(command, key, list)
  for i = 1, #list, 1000 do
    redis.call(command, key, unpack(list, i, math.min(i + 999, #list)))
  end
end

-- Every key but the lock, whose expiry is its lease.
local function refresh()
  if ttl > 0 then
    for _, key in ipairs({meta, messages, turns, order, index, idem, idem_exp, superseded}) do
      redis.call('PEXPIRE', key, ttl)
    end
  end
end

local function touch(count)
  local at = now
  local old = redis.call('HGET', meta, 'updated_at')
  if old and tonumber(old) > tonumber(at) then at = old end
  redis.call('HSET', meta, 'updated_at', at, 'message_count', count)
  redis.call('ZADD', index, at, id)
end

-- A turn's outcome, once written, never changes: only a running record is replaced.
local function save_turn(turn_id, json)
  local old = redis.call('HGET', turns, turn_id)
  if old and not string.find(old, '"status":"running"', 1, true) then return end
  redis.call('HSET', turns, turn_id, json)
  if not redis.call('ZSCORE', order, turn_id) then
    redis.call('ZADD', order, redis.call('HINCRBY', meta, 'turn_seq', 1), turn_id)
  end
  local extra = 0
  if cap > 0 then extra = redis.call('ZCARD', order) - cap end
  if extra > 0 then
    local old = redis.call('ZRANGE', order, 0, extra - 1)
    redis.call('ZREMRANGEBYRANK', order, 0, extra - 1)
    call_chunked('HDEL', turns, old)
  end
end
"#;

/// Creates the session unless it exists or the tenant holds `max` sessions already. ARGV 5..: max
/// (0 = no limit), metadata JSON, `1` + prompt or `0`. Returns 1, 0 when the session exists, or -1
/// at the limit. Counting as `count_sessions` does (live index members), in the same script as the
/// creation, is what keeps concurrent creations from overshooting the limit.
const CREATE: &str = r#"
if redis.call('EXISTS', meta) == 1 then return 0 end
local max = tonumber(ARGV[5])
if max > 0 then
  local held
  if ttl > 0 then
    held = redis.call('ZCOUNT', index, '(' .. string.format('%d', tonumber(now) - ttl * 1000), '+inf')
  else
    held = redis.call('ZCARD', index)
  end
  if held >= max then return -1 end
end
redis.call('DEL', messages, turns, order, lock, idem, idem_exp, superseded)
redis.call('HSET', meta, 'id', id, 'created_at', now, 'updated_at', now, 'metadata', ARGV[6],
  'message_count', 0, 'last_seq', 0, 'turn_seq', 0)
if ARGV[7] == '1' then redis.call('HSET', meta, 'system_prompt', ARGV[8]) end
redis.call('ZADD', index, now, id)
refresh()
return 1
"#;

/// Appends a batch. ARGV 5..: the fencing turn (empty = none), `1` to release its lock with the
/// batch, turn id (empty = none), turn JSON, the seq from which active messages become superseded
/// by that turn (empty = none), then per message the JSON before and after its seq. Returns the
/// first seq, 0 when the session does not exist, or -1 when the fencing turn does not hold the
/// session (nothing written; an expired lease has no lock key, so it holds nothing).
const APPEND: &str = r#"
if redis.call('EXISTS', meta) == 0 then return 0 end
if ARGV[5] ~= '' and redis.call('HGET', lock, 'turn') ~= ARGV[5] then return -1 end
local n = (#ARGV - 9) / 2
local first = redis.call('HINCRBY', meta, 'last_seq', n) - n + 1
if ARGV[9] ~= '' then
  local moved = redis.call('ZRANGE', messages, ARGV[9], '+inf', 'BYSCORE', 'WITHSCORES')
  local marked = {}
  local tag = ',"superseded_by":"' .. ARGV[7] .. '"}'
  for i = 1, #moved, 2 do
    marked[#marked + 1] = moved[i + 1]
    marked[#marked + 1] = string.sub(moved[i], 1, -2) .. tag
  end
  if #marked > 0 then
    call_chunked('ZADD', superseded, marked)
    redis.call('ZREMRANGEBYSCORE', messages, ARGV[9], '+inf')
    local kept = redis.call('ZCARD', superseded)
    if cap > 0 and kept > cap then redis.call('ZREMRANGEBYRANK', superseded, 0, kept - cap - 1) end
  end
end
if n > 0 or ARGV[9] ~= '' then
  if n > 0 then
    local members = {}
    for i = 0, n - 1 do
      local seq = string.format('%d', first + i)
      members[#members + 1] = seq
      members[#members + 1] = ARGV[10 + 2 * i] .. seq .. ARGV[11 + 2 * i]
    end
    call_chunked('ZADD', messages, members)
  end
  local count = redis.call('ZCARD', messages)
  if cap > 0 and count > cap then
    redis.call('ZREMRANGEBYRANK', messages, 0, count - cap - 1)
    count = cap
  end
  touch(count)
end
if ARGV[7] ~= '' then save_turn(ARGV[7], ARGV[8]) end
refresh()
if ARGV[6] == '1' then redis.call('DEL', lock) end
return first
"#;

/// Creates a session holding messages (what a fork writes), as [`CREATE`] does, then adds the
/// messages with seqs from 1. ARGV 5..: max, metadata JSON, `1`/`0` has a prompt, the prompt
/// (empty when none), then per message the JSON before and after its seq. Returns as `CREATE`.
const CREATE_WITH: &str = r#"
if redis.call('EXISTS', meta) == 1 then return 0 end
local max = tonumber(ARGV[5])
if max > 0 then
  local held
  if ttl > 0 then
    held = redis.call('ZCOUNT', index, '(' .. string.format('%d', tonumber(now) - ttl * 1000), '+inf')
  else
    held = redis.call('ZCARD', index)
  end
  if held >= max then return -1 end
end
redis.call('DEL', messages, turns, order, lock, idem, idem_exp, superseded)
local n = (#ARGV - 8) / 2
redis.call('HSET', meta, 'id', id, 'created_at', now, 'updated_at', now, 'metadata', ARGV[6],
  'message_count', 0, 'last_seq', n, 'turn_seq', 0)
if ARGV[7] == '1' then redis.call('HSET', meta, 'system_prompt', ARGV[8]) end
local members = {}
for i = 0, n - 1 do
  local seq = string.format('%d', 1 + i)
  members[#members + 1] = seq
  members[#members + 1] = ARGV[9 + 2 * i] .. seq .. ARGV[10 + 2 * i]
end
if n > 0 then call_chunked('ZADD', messages, members) end
local count = redis.call('ZCARD', messages)
if cap > 0 and count > cap then
  redis.call('ZREMRANGEBYRANK', messages, 0, count - cap - 1)
  count = cap
end
redis.call('HSET', meta, 'message_count', count)
redis.call('ZADD', index, now, id)
refresh()
return 1
"#;

/// One page by seq over active and superseded messages together. KEYS: meta, messages,
/// superseded. ARGV as [`READ_PAGE`]. Takes up to limit + 1 from each set and merges them by seq.
const READ_PAGE_ALL: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local limit = tonumber(ARGV[4])
local function take(key)
  if ARGV[3] == 'desc' then
    return redis.call('ZRANGE', key, ARGV[2], ARGV[1], 'BYSCORE', 'REV', 'LIMIT', 0, limit + 1, 'WITHSCORES')
  end
  return redis.call('ZRANGE', key, ARGV[1], ARGV[2], 'BYSCORE', 'LIMIT', 0, limit + 1, 'WITHSCORES')
end
local a, b = take(KEYS[2]), take(KEYS[3])
local found, i, j = {}, 1, 1
while #found <= limit and (i <= #a or j <= #b) do
  local pick_a
  if i > #a then pick_a = false
  elseif j > #b then pick_a = true
  elseif ARGV[3] == 'desc' then pick_a = tonumber(a[i + 1]) > tonumber(b[j + 1])
  else pick_a = tonumber(a[i + 1]) < tonumber(b[j + 1]) end
  if pick_a then found[#found + 1] = a[i]; i = i + 2 else found[#found + 1] = b[j]; j = j + 2 end
end
local more = 0
if #found > limit then
  found[#found] = nil
  more = 1
end
return {more, found}
"#;

/// Starts a turn: claims the session unless another turn holds it, records the turn, and reads
/// the window and the system prompt. ARGV 5..: turn id, turn JSON, lease (ms), window size.
/// Returns nil when the session is missing, else `{acquired (0/1), holder when busy, window,
/// has prompt (0/1), prompt}`. A holder renewing its claim keeps its cancel flag.
const BEGIN_TURN: &str = r#"
if redis.call('EXISTS', meta) == 0 then return false end
local holder = redis.call('HGET', lock, 'turn')
if holder and holder ~= ARGV[5] then return {0, holder, {}, 0, ''} end
if not holder then redis.call('HSET', lock, 'turn', ARGV[5], 'cancel', '0') end
redis.call('PEXPIRE', lock, ARGV[7])
save_turn(ARGV[5], ARGV[6])
refresh()
local n = tonumber(ARGV[8])
local window = {}
if n > 0 then window = redis.call('ZRANGE', messages, -n, -1) end
local prompt = redis.call('HGET', meta, 'system_prompt')
if prompt then return {1, '', window, 1, prompt} end
return {1, '', window, 0, ''}
"#;

/// Drops every message, keeping the session and its seq counter. Returns 1, or 0 when missing.
const CLEAR: &str = r#"
if redis.call('EXISTS', meta) == 0 then return 0 end
redis.call('DEL', messages, superseded)
touch(0)
refresh()
return 1
"#;

/// Saves a turn record. ARGV 5..: turn id, turn JSON. Returns 1, or 0 when the session is missing.
const PUT_TURN: &str = r#"
if redis.call('EXISTS', meta) == 0 then return 0 end
save_turn(ARGV[5], ARGV[6])
refresh()
return 1
"#;

/// Deletes every key of the session and its index entry. Returns 1 if the session existed.
const DELETE: &str = r#"
local existed = redis.call('DEL', meta)
redis.call('DEL', messages, turns, order, lock, idem, idem_exp, superseded)
redis.call('ZREM', index, id)
return existed
"#;

/// Replaces the session's metadata, leaving `updated_at` and the index alone. ARGV 5: metadata
/// JSON. Returns the meta hash, or nothing when the session is missing.
const SET_METADATA: &str = r#"
if redis.call('EXISTS', meta) == 0 then return {} end
redis.call('HSET', meta, 'metadata', ARGV[5])
refresh()
return redis.call('HGETALL', meta)
"#;

/// One page by seq. KEYS: meta, messages. ARGV: min, max (ZRANGE BYSCORE bounds), `asc`/`desc`,
/// limit. Returns nil when the session is missing, else `{has_more, members}`.
const READ_PAGE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local limit = tonumber(ARGV[4])
local found
if ARGV[3] == 'desc' then
  found = redis.call('ZRANGE', KEYS[2], ARGV[2], ARGV[1], 'BYSCORE', 'REV', 'LIMIT', 0, limit + 1)
else
  found = redis.call('ZRANGE', KEYS[2], ARGV[1], ARGV[2], 'BYSCORE', 'LIMIT', 0, limit + 1)
end
local more = 0
if #found > limit then
  found[#found] = nil
  more = 1
end
return {more, found}
"#;

/// The last n messages, oldest first. KEYS: meta, messages. ARGV: n, -n.
/// Returns nil when the session is missing.
const LAST_N: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if ARGV[1] == '0' then return {} end
return redis.call('ZRANGE', KEYS[2], ARGV[2], -1)
"#;

/// Drops index members whose session is gone, unless their score moved since it was read (the
/// session was written or re-created meanwhile). KEYS: index. ARGV: id, score, id, score…
const DROP_STALE: &str = r#"
for i = 1, #ARGV, 2 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then redis.call('ZREM', KEYS[1], ARGV[i]) end
end
return 0
"#;

/// Claims the session for a turn. KEYS: meta, lock. ARGV: turn id, lease (ms).
/// Returns nil when the session is missing, else the turn holding it after the call (the caller's
/// own id when it got or already had the lock). A holder renewing its claim keeps its cancel flag.
const ACQUIRE_LOCK: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local holder = redis.call('HGET', KEYS[2], 'turn')
if holder and holder ~= ARGV[1] then return holder end
if not holder then redis.call('HSET', KEYS[2], 'turn', ARGV[1], 'cancel', '0') end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return ARGV[1]
"#;

/// Extends the lease of the turn holding the session. KEYS: meta, lock. ARGV: turn id, lease (ms).
/// Returns `{held, cancel_requested}` as 0/1.
const RENEW_LOCK: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HGET', KEYS[2], 'turn') ~= ARGV[1] then
  return {0, 0}
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
if redis.call('HGET', KEYS[2], 'cancel') == '1' then return {1, 1} end
return {1, 0}
"#;

/// Deletes the lock if the turn holds it. KEYS: lock. ARGV: turn id. Returns 1 if it did.
const RELEASE_LOCK: &str = r#"
if redis.call('HGET', KEYS[1], 'turn') ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"#;

/// The turn holding the session. KEYS: meta, lock. Returns nil when the session is missing, the
/// empty string when no turn holds it.
const LOCK_HOLDER: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return redis.call('HGET', KEYS[2], 'turn') or ''
"#;

/// Flags a cancel request on the lock if the turn holds it. KEYS: meta, lock. ARGV: turn id.
/// Returns -1 when the session is missing, 1 if flagged, 0 if the turn does not hold the session.
const CANCEL_LOCK: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[2], 'turn') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], 'cancel', '1')
return 1
"#;

/// Lua shared by the idempotency scripts. KEYS: meta, idem, idem_exp. `idem` holds per key
/// `f:<key>` (fingerprint and turn, JSON) and, once completed, `r:<key>` (the response JSON);
/// `idem_exp` scores each key by when it is forgotten (server ms). Both go when the session goes,
/// and expire when the session or their last record does.
const IDEM_PRELUDE: &str = r#"
local meta, idem, idem_exp = KEYS[1], KEYS[2], KEYS[3]
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local now_text = string.format('%d', now_ms)

local function forget_expired()
  local old = redis.call('ZRANGE', idem_exp, '-inf', now_text, 'BYSCORE')
  if #old == 0 then return end
  for i = 1, #old do redis.call('HDEL', idem, 'f:' .. old[i], 'r:' .. old[i]) end
  redis.call('ZREMRANGEBYSCORE', idem_exp, '-inf', now_text)
end

local function expire_with_last_record()
  local last = redis.call('ZRANGE', idem_exp, -1, -1, 'WITHSCORES')
  if #last == 0 then return end
  local at = tonumber(last[2])
  local session_ttl = redis.call('PTTL', meta)
  if session_ttl >= 0 and now_ms + session_ttl < at then at = now_ms + session_ttl end
  at = string.format('%d', at)
  redis.call('PEXPIREAT', idem, at)
  redis.call('PEXPIREAT', idem_exp, at)
end
"#;

/// Remembers a key unless it is remembered. ARGV: key, record JSON, ttl (ms). Returns nil when
/// the session is missing, `{}` when the key was new, else `{record, response or nil}`.
const BEGIN_IDEM: &str = r#"
if redis.call('EXISTS', meta) == 0 then return false end
forget_expired()
local record = redis.call('HGET', idem, 'f:' .. ARGV[1])
if record then return {record, redis.call('HGET', idem, 'r:' .. ARGV[1])} end
redis.call('HSET', idem, 'f:' .. ARGV[1], ARGV[2])
redis.call('ZADD', idem_exp, string.format('%d', now_ms + tonumber(ARGV[3])), ARGV[1])
expire_with_last_record()
return {}
"#;

/// Saves the response of a remembered key and restarts its ttl. ARGV: key, response JSON, ttl
/// (ms). Returns -1 when the session is missing, 1 if saved, 0 if the key is not remembered.
const COMPLETE_IDEM: &str = r#"
if redis.call('EXISTS', meta) == 0 then return -1 end
local until_ms = redis.call('ZSCORE', idem_exp, ARGV[1])
if not until_ms or tonumber(until_ms) <= now_ms or redis.call('HEXISTS', idem, 'f:' .. ARGV[1]) == 0 then
  return 0
end
redis.call('HSET', idem, 'r:' .. ARGV[1], ARGV[2])
redis.call('ZADD', idem_exp, string.format('%d', now_ms + tonumber(ARGV[3])), ARGV[1])
expire_with_last_record()
return 1
"#;

/// Forgets a key. ARGV: key. Returns 1 if it was remembered.
const ABORT_IDEM: &str = r#"
redis.call('HDEL', idem, 'f:' .. ARGV[1], 'r:' .. ARGV[1])
return redis.call('ZREM', idem_exp, ARGV[1])
"#;

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

impl RedisOptions {
    /// The options the service configuration asks for.
    pub fn from_config(config: &StoreConfig) -> Self {
        RedisOptions {
            url: config.redis_url.clone(),
            prefix: config.redis_prefix.clone(),
            pool_size: config.redis_pool_size,
            max_messages: (config.max_messages > 0).then_some(config.max_messages),
            ttl: config.session_ttl,
            op_timeout: config.store_timeout,
        }
    }
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
}

struct Scripts {
    create: Script,
    create_with: Script,
    append: Script,
    begin_turn: Script,
    clear: Script,
    put_turn: Script,
    delete: Script,
    set_metadata: Script,
    read_page: Script,
    read_page_all: Script,
    last_n: Script,
    drop_stale: Script,
    acquire_lock: Script,
    renew_lock: Script,
    release_lock: Script,
    lock_holder: Script,
    cancel_lock: Script,
    begin_idem: Script,
    complete_idem: Script,
    abort_idem: Script,
}

impl Scripts {
    fn new() -> Self {
        let write = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        let idem = |body: &str| Script::new(&format!("{IDEM_PRELUDE}{body}"));
        Scripts {
            create: write(CREATE),
            create_with: write(CREATE_WITH),
            append: write(APPEND),
            begin_turn: write(BEGIN_TURN),
            clear: write(CLEAR),
            put_turn: write(PUT_TURN),
            delete: write(DELETE),
            set_metadata: write(SET_METADATA),
            read_page: Script::new(READ_PAGE),
            read_page_all: Script::new(READ_PAGE_ALL),
            last_n: Script::new(LAST_N),
            drop_stale: Script::new(DROP_STALE),
            acquire_lock: Script::new(ACQUIRE_LOCK),
            renew_lock: Script::new(RENEW_LOCK),
            release_lock: Script::new(RELEASE_LOCK),
            lock_holder: Script::new(LOCK_HOLDER),
            cancel_lock: Script::new(CANCEL_LOCK),
            begin_idem: idem(BEGIN_IDEM),
            complete_idem: idem(COMPLETE_IDEM),
            abort_idem: idem(ABORT_IDEM),
        }
    }
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
        Ok(RedisStore {
            pool,
            prefix: opts.prefix,
            cap: opts.max_messages.unwrap_or(0),
            ttl_ms: ttl_millis(opts.ttl),
            op_timeout: opts.op_timeout,
            redactor,
            scripts: Scripts::new(),
        })
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
        release: Option<Uuid>,
    ) -> StoreResult<Vec<Message>> {
        let keys = self.session_keys(tenant, session_id);
        let mut messages = batch.messages;
        let mut call = self.write_call(&self.scripts.append, &keys, session_id, now().timestamp_micros());
        let fence = release.or(batch.fence);
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
        let mut call = script.prepare_invoke();
        call.key(keys.meta).key(keys.lock);
        call
    }

    /// An idempotency script call with the session's meta, idem and idem_exp keys.
    fn idem_call<'a>(&self, script: &'a Script, tenant: &str, id: &str) -> ScriptInvocation<'a> {
        let keys = self.session_keys(tenant, id);
        let mut call = script.prepare_invoke();
        call.key(keys.meta).key(keys.idem).key(keys.idem_exp);
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
impl ConversationStore for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    fn is_distributed(&self) -> bool {
        true
    }

    async fn ping(&self) -> StoreResult<()> {
        self.query::<String>(&redis::cmd("PING")).await.map(|_| ())
    }

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
        self.append_releasing(tenant, session_id, batch, None).await
    }

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
                pipe.cmd("EVALSHA")
                    .arg(self.scripts.renew_lock.get_hash())
                    .arg(2)
                    .arg(keys.meta)
                    .arg(keys.lock)
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

/// A connection that sat idle this long is PINGed before it is handed out again.
const PING_AFTER_IDLE: Duration = Duration::from_secs(5);

type Pool = managed::Pool<LeanManager>;

/// Creates connections like deadpool-redis, but checks a pooled one with a PING only when it sat
/// idle: deadpool-redis PINGs on every checkout, which doubles the round trips of every
/// operation. A connection that fails or times out while in use is dropped instead (see
/// [`Lease`]), so a busy pool still never hands out a broken connection twice.
struct LeanManager {
    inner: deadpool_redis::Manager,
}

impl managed::Manager for LeanManager {
    type Type = MultiplexedConnection;
    type Error = RedisError;

    async fn create(&self) -> Result<MultiplexedConnection, RedisError> {
        managed::Manager::create(&self.inner).await
    }

    async fn recycle(
        &self,
        conn: &mut MultiplexedConnection,
        metrics: &Metrics,
    ) -> RecycleResult<RedisError> {
        if metrics.last_used() < PING_AFTER_IDLE {
            return Ok(());
        }
        managed::Manager::recycle(&self.inner, conn, metrics).await
    }
}

/// A pooled connection for one request. Unless the request finished with the connection intact,
/// it is detached from the pool on drop (also when the request timed out and was abandoned).
struct Lease {
    conn: Option<Object<LeanManager>>,
    healthy: bool,
}

impl Lease {
    fn conn(&mut self) -> StoreResult<&mut MultiplexedConnection> {
        self.conn.as_deref_mut().ok_or_else(|| StoreError::Backend("connection already released".into()))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.healthy
            && let Some(conn) = self.conn.take()
        {
            drop(Object::take(conn));
        }
    }
}

/// One request to Redis.
enum Request<'a> {
    Cmd(&'a redis::Cmd),
    Pipe(&'a redis::Pipeline),
    Script(&'a ScriptInvocation<'a>),
}

impl Request<'_> {
    async fn send<T: FromRedisValue>(&self, conn: &mut MultiplexedConnection) -> redis::RedisResult<T> {
        match self {
            Request::Cmd(cmd) => cmd.query_async(conn).await,
            Request::Pipe(pipe) => pipe.query_async(conn).await,
            Request::Script(call) => call.invoke_async(conn).await,
        }
    }
}

/// Whether the error means the connection (or the server behind it) failed, not the command.
fn is_connection_failure(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
}

/// Every key of one session; they share the `{tenant/session}` hash tag (the index excepted).
#[derive(Debug, Clone, PartialEq, Eq)]
struct SessionKeys {
    meta: String,
    messages: String,
    turns: String,
    turn_order: String,
    /// The tenant's sessions index (another slot).
    index: String,
    /// The turn lock: hash `turn`, `cancel`, expiring with its lease.
    lock: String,
    /// Idempotency records: hash `f:<key>` → fingerprint and turn, `r:<key>` → response.
    idem: String,
    /// When each idempotency key is forgotten: zset key → server time in ms.
    idem_exp: String,
    /// Messages an edit replaced: zset seq → message JSON with `superseded_by`, apart from the
    /// active `messages`, so that active reads never skip them.
    superseded: String,
}

impl SessionKeys {
    fn new(prefix: &str, tenant: &str, id: &str) -> Self {
        let base = format!("{prefix}:{{{}/{}}}", encode_key_part(tenant), encode_key_part(id));
        SessionKeys {
            meta: format!("{base}:meta"),
            messages: format!("{base}:messages"),
            turns: format!("{base}:turns"),
            turn_order: format!("{base}:turn_order"),
            index: index_key(prefix, tenant),
            lock: format!("{base}:lock"),
            idem: format!("{base}:idem"),
            idem_exp: format!("{base}:idem_exp"),
            superseded: format!("{base}:superseded"),
        }
    }

    /// In the order the write scripts expect them as `KEYS`.
    fn all(&self) -> [&str; 9] {
        [
            &self.meta,
            &self.messages,
            &self.turns,
            &self.turn_order,
            &self.index,
            &self.lock,
            &self.idem,
            &self.idem_exp,
            &self.superseded,
        ]
    }
}

/// The tenant's sessions index, scored by `updated_at`.
fn index_key(prefix: &str, tenant: &str) -> String {
    format!("{prefix}:{{{}}}:sessions", encode_key_part(tenant))
}

/// Percent-encodes every byte outside `[A-Za-z0-9._:-]`, so that tenants and ids can neither end
/// the hash tag early (`}`), forge the tenant/session separator (`/`) nor act as SCAN glob syntax.
fn encode_key_part(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    for b in part.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The message's JSON (serialized with seq 0) cut around its seq, so the append script can splice
/// in the seq it allocates. The top-level `seq` comes right after `id` and `session_id`, whose
/// JSON cannot contain an unescaped quote, so the first match is the field itself.
fn split_at_seq(message: &mut Message) -> StoreResult<(String, String)> {
    const MARKER: &str = ",\"seq\":0,";
    message.seq = 0;
    let json = to_json(message)?;
    let at = json.find(MARKER).ok_or_else(|| StoreError::Backend("unexpected message encoding".into()))?;
    let cut = at + MARKER.len() - 2;
    Ok((json[..cut].to_owned(), json[cut + 1..].to_owned()))
}

/// What an idempotency key remembers besides the response (stored apart, so that the response's
/// JSON is kept byte for byte and never re-encoded by Lua).
#[derive(serde::Serialize, serde::Deserialize)]
struct IdemHead {
    fingerprint: String,
    turn_id: Uuid,
}

fn parse_uuid(text: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(text).map_err(|_| StoreError::Backend("stored turn id is not a UUID".into()))
}

fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Backend(format!("encoding JSON: {e}")))
}

fn from_json<T: serde::de::DeserializeOwned>(json: &str) -> StoreResult<T> {
    serde_json::from_str(json).map_err(|e| StoreError::Backend(format!("stored JSON is invalid: {e}")))
}

fn parse_messages(members: &[String]) -> StoreResult<Vec<Message>> {
    members.iter().map(|m| from_json(m)).collect()
}

/// A session from its meta hash; `None` when the hash is empty (no such session).
fn parse_session(fields: HashMap<String, String>) -> StoreResult<Option<Session>> {
    if fields.is_empty() {
        return Ok(None);
    }
    let field = |name: &str| {
        fields.get(name).ok_or_else(|| StoreError::Backend(format!("session record lacks `{name}`")))
    };
    let number = |name: &str| {
        field(name)?
            .parse::<i64>()
            .map_err(|_| StoreError::Backend(format!("session `{name}` is not a number")))
    };
    Ok(Some(Session {
        id: field("id")?.clone(),
        created_at: micros_to_time(number("created_at")?)?,
        updated_at: micros_to_time(number("updated_at")?)?,
        system_prompt: fields.get("system_prompt").cloned(),
        metadata: from_json(field("metadata")?)?,
        message_count: u64::try_from(number("message_count")?).unwrap_or(0),
    }))
}

fn micros_to_time(micros: i64) -> StoreResult<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| StoreError::Backend("timestamp out of range".into()))
}

/// Removes the URL's password from any text before it leaves the store.
#[derive(Debug, Clone, Default)]
struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    /// Finds the password in `url` (raw and percent-decoded), even when the URL is malformed.
    fn new(url: &str) -> Self {
        let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
        let password = rest
            .rsplit_once('@')
            .and_then(|(userinfo, _)| userinfo.split_once(':'))
            .map(|(_, password)| password)
            .filter(|p| !p.is_empty());
        let mut secrets = Vec::new();
        if let Some(raw) = password {
            let decoded = percent_decode(raw);
            secrets.push(raw.to_owned());
            if decoded != raw && !decoded.is_empty() {
                secrets.push(decoded);
            }
        }
        Redactor { secrets }
    }

    fn apply(&self, text: &str) -> String {
        self.secrets.iter().fold(text.to_owned(), |acc, secret| acc.replace(secret.as_str(), "***"))
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Role, new_id};

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
    fn every_key_of_a_session_shares_one_hash_tag() {
        let keys = SessionKeys::new("p", "acme", "chat:1");
        assert_eq!(keys.meta, "p:{acme/chat:1}:meta");
        assert_eq!(keys.messages, "p:{acme/chat:1}:messages");
        assert_eq!(keys.turns, "p:{acme/chat:1}:turns");
        assert_eq!(keys.turn_order, "p:{acme/chat:1}:turn_order");
        assert_eq!(keys.index, "p:{acme}:sessions");
        assert_eq!(keys.lock, "p:{acme/chat:1}:lock");
        assert_eq!(keys.idem, "p:{acme/chat:1}:idem");
        assert_eq!(keys.idem_exp, "p:{acme/chat:1}:idem_exp");
    }

    #[test]
    fn tenants_cannot_break_out_of_the_hash_tag() {
        let keys = SessionKeys::new("p", "a}b/c*", "s");
        assert_eq!(keys.meta, "p:{a%7Db%2Fc%2A/s}:meta");
        assert_ne!(SessionKeys::new("p", "a/b", "c").meta, SessionKeys::new("p", "a", "b/c").meta);
    }

    #[test]
    fn the_seq_is_spliced_into_the_message_json() {
        let mut m = Message::new("s1", new_id(), Role::User, r#"he said ,"seq":0, twice"#);
        m.metadata.insert("seq".into(), serde_json::json!(0));
        let (head, tail) = split_at_seq(&mut m).unwrap();
        let back: Message = serde_json::from_str(&format!("{head}42{tail}")).unwrap();
        m.seq = 42;
        assert_eq!(back, m);
    }

    #[test]
    fn the_redactor_finds_raw_and_decoded_passwords() {
        let r = Redactor::new("redis://user:p%40ss%3Aword@host:6379/0");
        assert_eq!(r.apply("x p%40ss%3Aword y p@ss:word z"), "x *** y *** z");
        let r = Redactor::new("redis://:hunter2@host");
        assert_eq!(r.apply("auth hunter2 failed"), "auth *** failed");
        assert!(Redactor::new("redis://host:6379").secrets.is_empty());
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
