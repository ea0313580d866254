//! The Redis limiter: every replica on the same Redis and key prefix shares the counts.
//!
//! # Keys
//! With prefix `P` and key id `K` (percent-encoded outside `[A-Za-z0-9._:-]`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:rl:{K}:<kind>:<window ms>` | string | the count of the open window; it expires when the window closes |
//! | `P:rl:{K}:<kind>` | zset | held slots: a random member per slot, scored by its lease's end (ms) |
//!
//! A hit is one script (`INCR`, then `PEXPIRE` when the window opens), a slot one script (drop
//! lapsed leases, count, add) and its release one `ZREM`, so each costs one round trip. The window
//! is timed by Redis itself; only slot leases use the replica's clock, and they last minutes.
//!
//! # Connection
//! One multiplexed connection, opened on first use and reopened after it fails; every call is
//! bounded by the store timeout.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use deadpool_redis::redis::aio::MultiplexedConnection;
use deadpool_redis::redis::{self, AsyncConnectionConfig, RedisError, Script};
use tokio::sync::Mutex;

use super::{LimiterError, RateLimiter, Slot, WindowHit};

/// Counts one event. KEYS: the counter. ARGV: window (ms). Returns `{count, ms until reset}`.
const HIT: &str = r#"
local count = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {count, ttl}
"#;

/// Takes a slot. KEYS: the slot set. ARGV: now (ms), lease (ms), max, member. Returns 1 or 0.
const ACQUIRE: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#;

/// The Redis limiter.
#[derive(Clone)]
pub struct RedisLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    config: AsyncConnectionConfig,
    conn: Mutex<Option<MultiplexedConnection>>,
    prefix: String,
    timeout: Duration,
    hit: Script,
    acquire: Script,
}

impl std::fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimiter").field("prefix", &self.inner.prefix).finish_non_exhaustive()
    }
}

impl RedisLimiter {
    /// A limiter on Redis at `url` under `prefix`. No I/O happens here: it connects on first use.
    /// Fails only on an invalid URL (the error does not repeat it, so no password leaks).
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<Self, LimiterError> {
        let client = redis::Client::open(url)
            .map_err(|_| LimiterError("invalid REDIS_URL for the rate limiter".to_owned()))?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let inner = Inner {
            client,
            config,
            conn: Mutex::new(None),
            prefix: prefix.to_owned(),
            timeout,
            hit: Script::new(HIT),
            acquire: Script::new(ACQUIRE),
        };
        Ok(RedisLimiter { inner: Arc::new(inner) })
    }
}

impl Inner {
    fn key(&self, key_id: &str, kind: &str) -> String {
        format!("{}:rl:{{{}}}:{kind}", self.prefix, encode(key_id))
    }

    async fn connection(&self) -> Result<MultiplexedConnection, RedisError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let conn = self.client.get_multiplexed_async_connection_with_config(&self.config).await?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Runs `call` on the connection within the timeout; a broken connection is dropped.
    async fn run<T, F>(&self, call: impl FnOnce(MultiplexedConnection) -> F) -> Result<T, LimiterError>
    where
        F: Future<Output = Result<T, RedisError>>,
    {
        let work = async {
            let conn = self.connection().await?;
            call(conn).await
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                if is_connection_failure(&e) {
                    *self.conn.lock().await = None;
                }
                Err(LimiterError(format!("Redis: {e}")))
            }
            Err(_) => {
                *self.conn.lock().await = None;
                Err(LimiterError(format!("Redis did not answer within {:?}", self.timeout)))
            }
        }
    }

    async fn release(&self, key: String, member: String) {
        let result = self
            .run(|mut conn| async move {
                redis::cmd("ZREM").arg(&key).arg(&member).query_async::<i64>(&mut conn).await
            })
            .await;
        if let Err(error) = result {
            tracing::warn!(%error, "could not release a stream slot; its lease will lapse");
        }
    }
}

fn is_connection_failure(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

/// Percent-encodes every byte outside `[A-Za-z0-9._:-]`, so a key id can never close the hash tag.
fn encode(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    for b in part.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn now_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[async_trait]
impl RateLimiter for RedisLimiter {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn hit(&self, key_id: &str, kind: &str, window: Duration) -> Result<WindowHit, LimiterError> {
        let inner = &self.inner;
        let window_ms = millis(window);
        let key = format!("{}:{window_ms}", inner.key(key_id, kind));
        let (count, ttl): (u64, i64) = inner
            .run(|mut conn| async move {
                let mut call = inner.hit.prepare_invoke();
                call.key(&key).arg(window_ms);
                call.invoke_async(&mut conn).await
            })
            .await?;
        Ok(WindowHit { count, reset: Duration::from_millis(ttl.max(0) as u64) })
    }

    async fn acquire(
        &self,
        key_id: &str,
        kind: &str,
        max: u64,
        lease: Duration,
    ) -> Result<Option<Slot>, LimiterError> {
        let inner = &self.inner;
        let key = inner.key(key_id, kind);
        let member = uuid::Uuid::now_v7().to_string();
        let taken: i64 = inner
            .run(|mut conn| {
                let mut call = inner.acquire.prepare_invoke();
                call.key(&key).arg(now_millis()).arg(millis(lease)).arg(max).arg(&member);
                async move { call.invoke_async(&mut conn).await }
            })
            .await?;
        if taken == 0 {
            return Ok(None);
        }
        let inner = Arc::clone(&self.inner);
        Ok(Some(Slot::new(move || {
            // Drop is synchronous: give the slot back from a task (its lease covers a failure).
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { inner.release(key, member).await });
            }
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_cannot_leave_the_hash_tag() {
        let limiter = RedisLimiter::new("redis://127.0.0.1:1", "p", Duration::from_secs(1)).unwrap();
        assert_eq!(limiter.inner.key("k-1", "rps"), "p:rl:{k-1}:rps");
        assert_eq!(limiter.inner.key("a}b{c", "streams"), "p:rl:{a%7Db%7Bc}:streams");
        assert_eq!(limiter.inner.key("ip:::1", "rps"), "p:rl:{ip:::1}:rps");
    }

    #[test]
    fn an_invalid_url_error_does_not_repeat_it() {
        let err = RedisLimiter::new("nope://user:hunter2@host", "p", Duration::from_secs(1)).unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_an_error_within_the_timeout() {
        let limiter = RedisLimiter::new("redis://127.0.0.1:1", "p", Duration::from_millis(300)).unwrap();
        let started = std::time::Instant::now();
        assert!(limiter.hit("k", "rps", Duration::from_secs(1)).await.is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
