//! The Redis connection pool: deadpool over multiplexed connections, with a manager that PINGs
//! only connections that sat idle, and a lease per request that drops a connection which failed
//! or timed out instead of handing it out again.

use std::time::Duration;

use deadpool::managed::{self, Metrics, Object, RecycleResult};
use deadpool_redis::redis::aio::MultiplexedConnection;
use deadpool_redis::redis::{self, FromRedisValue, RedisError, ScriptInvocation};

use crate::store::{StoreError, StoreResult};

/// A connection that sat idle this long is PINGed before it is handed out again.
const PING_AFTER_IDLE: Duration = Duration::from_secs(5);

pub(super) type Pool = managed::Pool<LeanManager>;

/// Creates connections like deadpool-redis, but checks a pooled one with a PING only when it sat
/// idle: deadpool-redis PINGs on every checkout, which doubles the round trips of every
/// operation. A connection that fails or times out while in use is dropped instead (see
/// [`Lease`]), so a busy pool still never hands out a broken connection twice.
pub(super) struct LeanManager {
    pub(super) inner: deadpool_redis::Manager,
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
pub(super) struct Lease {
    pub(super) conn: Option<Object<LeanManager>>,
    pub(super) healthy: bool,
}

impl Lease {
    pub(super) fn conn(&mut self) -> StoreResult<&mut MultiplexedConnection> {
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
pub(super) enum Request<'a> {
    Cmd(&'a redis::Cmd),
    Pipe(&'a redis::Pipeline),
    Script(&'a ScriptInvocation<'a>),
}

impl Request<'_> {
    pub(super) async fn send<T: FromRedisValue>(
        &self,
        conn: &mut MultiplexedConnection,
    ) -> redis::RedisResult<T> {
        match self {
            Request::Cmd(cmd) => cmd.query_async(conn).await,
            Request::Pipe(pipe) => pipe.query_async(conn).await,
            Request::Script(call) => call.invoke_async(conn).await,
        }
    }
}

/// Whether the error means the connection (or the server behind it) failed, not the command.
pub(super) fn is_connection_failure(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
}
