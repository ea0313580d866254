//! parley's pool of PostgreSQL connections: sqlx connections in a deadpool pool.
//!
//! sqlx's own pool pings every connection when it goes back to the pool and, by default, again
//! before it is reused: two round trips (and two wake-ups of a PostgreSQL backend) per statement.
//! The second can be turned off; the first cannot (sqlx 0.9). It is there to catch a connection left
//! in the middle of a statement (its future dropped by a timeout, say). This pool knows that
//! directly instead: a connection is marked busy while a statement runs on it and settled when
//! the statement ends, and a connection that comes back still busy, or after an I/O error, is
//! closed instead of reused. A connection idle for a while (`ping_idle_after`) is pinged before
//! reuse, so one that died while idle (the server restarted) is replaced first.
//!
//! [`ConnPool`] is a sqlx [`Executor`]: `query.fetch_all(&pool)` checks a connection out for the
//! statement and back in after it. Results are collected before they are handed on, which is what
//! every store operation does anyway.

use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgQueryResult, PgRow, PgStatement, PgTypeInfo};
use sqlx::{Connection, Either, Execute, Executor, Postgres, SqlStr};

use deadpool::managed::{self, Metrics, PoolError, RecycleError, RecycleResult};

/// A pooled connection and whether its last statement ran to its end.
#[derive(Debug)]
pub struct PooledConn {
    conn: PgConnection,
    /// False from the start of a statement to its end: a connection checked in while busy was
    /// interrupted mid-statement and is closed instead of reused.
    settled: bool,
}

/// Opens connections and decides whether a returning one can be reused. `Debug` shows where it
/// connects, never the password (sqlx's own `Debug` of the options shows it).
pub struct Manager {
    connect: PgConnectOptions,
    ping_idle_after: Duration,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("host", &self.connect.get_host())
            .field("port", &self.connect.get_port())
            .field("username", &self.connect.get_username())
            .field("database", &self.connect.get_database())
            .field("ping_idle_after", &self.ping_idle_after)
            .finish_non_exhaustive()
    }
}

impl managed::Manager for Manager {
    type Type = PooledConn;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<PooledConn, sqlx::Error> {
        Ok(PooledConn { conn: PgConnection::connect_with(&self.connect).await?, settled: true })
    }

    async fn recycle(&self, pooled: &mut PooledConn, metrics: &Metrics) -> RecycleResult<sqlx::Error> {
        if !pooled.settled {
            return Err(RecycleError::message("a statement on this connection was interrupted"));
        }
        if metrics.last_used() >= self.ping_idle_after {
            pooled.conn.ping().await.map_err(RecycleError::Backend)?;
        }
        Ok(())
    }
}

/// parley's PostgreSQL connection pool (see the module documentation).
#[derive(Debug, Clone)]
pub struct ConnPool {
    pool: managed::Pool<Manager>,
}

/// A connection checked out of a [`ConnPool`], for several statements in a row (a transaction).
pub struct Checkout(managed::Object<Manager>);

impl Checkout {
    /// The connection, marked busy until [`Checkout::settle`].
    pub fn conn(&mut self) -> &mut PgConnection {
        self.0.settled = false;
        &mut self.0.conn
    }

    /// Marks the connection settled unless `outcome` broke it (see [`keeps_connection`]).
    pub fn settle<T>(&mut self, outcome: &Result<T, sqlx::Error>) {
        self.0.settled = outcome.as_ref().map_or_else(keeps_connection, |_| true);
    }
}

/// Whether a connection is still usable after this error: an error PostgreSQL reported (a
/// constraint, a serialization failure…) leaves it between statements; anything on the wire does
/// not.
fn keeps_connection(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(_) | sqlx::Error::RowNotFound)
}

impl ConnPool {
    /// A pool of at most `size` connections opened with `connect` when first needed; checking one
    /// out waits at most `wait`; connections idle `ping_idle_after` or longer are pinged first.
    pub fn new(connect: PgConnectOptions, size: usize, wait: Duration, ping_idle_after: Duration) -> Self {
        let pool = managed::Pool::builder(Manager { connect, ping_idle_after })
            .max_size(size.max(1))
            .runtime(deadpool::Runtime::Tokio1)
            .wait_timeout(Some(wait))
            .create_timeout(Some(wait))
            .recycle_timeout(Some(wait))
            .build()
            .expect("a pool with a runtime and a size builds");
        ConnPool { pool }
    }

    /// Checks a connection out.
    pub async fn checkout(&self) -> Result<Checkout, sqlx::Error> {
        self.pool.get().await.map(Checkout).map_err(|e| match e {
            PoolError::Backend(e) => e,
            PoolError::Timeout(_) => sqlx::Error::PoolTimedOut,
            PoolError::Closed => sqlx::Error::PoolClosed,
            other => sqlx::Error::Protocol(format!("connection pool: {other}")),
        })
    }
}

/// Runs `$work` (a future using `$conn`) on a connection checked out of `$pool`, then settles the
/// connection by the outcome.
macro_rules! on_checkout {
    ($pool:expr, |$conn:ident| $work:expr) => {{
        let mut checkout = $pool.checkout().await?;
        let outcome = {
            let $conn = checkout.conn();
            $work.await
        };
        checkout.settle(&outcome);
        outcome
    }};
}

impl<'p> Executor<'p> for &'_ ConnPool {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        E: 'q + Execute<'q, Postgres>,
    {
        let pool = self.clone();
        let all = async move { on_checkout!(pool, |conn| conn.fetch_many(query).try_collect::<Vec<_>>()) };
        stream::once(all)
            .map(|outcome| match outcome {
                Ok(items) => stream::iter(items.into_iter().map(Ok)).left_stream(),
                Err(e) => stream::once(async move { Err(e) }).right_stream(),
            })
            .flatten()
            .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        E: 'q + Execute<'q, Postgres>,
    {
        let pool = self.clone();
        Box::pin(async move { on_checkout!(pool, |conn| conn.fetch_optional(query)) })
    }

    fn prepare_with<'e>(
        self,
        sql: SqlStr,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement, sqlx::Error>>
    where
        'p: 'e,
    {
        let pool = self.clone();
        Box::pin(async move { on_checkout!(pool, |conn| conn.prepare_with(sql, parameters)) })
    }

    fn describe<'e>(self, sql: SqlStr) -> BoxFuture<'e, Result<sqlx::Describe<Postgres>, sqlx::Error>> {
        let pool = self.clone();
        Box::pin(async move { on_checkout!(pool, |conn| conn.describe(sql)) })
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    #[tokio::test]
    async fn debug_output_never_shows_the_password() {
        let connect = PgConnectOptions::from_str("postgres://parley:pgsecret9@db.example:5432/chat").unwrap();
        let pool = ConnPool::new(connect, 2, Duration::from_secs(1), Duration::from_secs(10));
        let text = format!("{pool:?}");
        assert!(!text.contains("pgsecret9"), "{text}");
        assert!(text.contains("db.example"), "{text}");
    }
}
