//! The SQLite store's transactions: every write on the one writer connection in a
//! `BEGIN IMMEDIATE` transaction ([`write_tx!`], queued in order, so none sees `SQLITE_BUSY`),
//! every read in one read transaction on a reader connection ([`read_tx!`]), both bounded by the
//! operation timeout.

use sqlx::sqlite::SqlitePool;
use sqlx::{Sqlite, SqliteConnection, Transaction};

use super::errors::db;
use crate::store::StoreResult;

/// Runs `$body` (a block that may use `?`) with `$conn`, the writer connection, in a
/// `BEGIN IMMEDIATE` transaction: committed if it returns `Ok`, rolled back otherwise. The whole
/// is bounded by the operation timeout; a timeout before the transaction began is `Unavailable`
/// (nothing was sent), after it `Unanswered`.
macro_rules! write_tx {
    ($store:expr, |$conn:ident| $body:block) => {{
        let store: &$crate::store::sqlite::SqliteStore = $store;
        let began = std::sync::atomic::AtomicBool::new(false);
        let work = async {
            let mut guard = $crate::store::sqlite::tx::WriteGuard::begin(&store.writer).await?;
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
pub(super) struct WriteGuard {
    conn: sqlx::pool::PoolConnection<Sqlite>,
    open: bool,
}

impl WriteGuard {
    pub(super) async fn begin(pool: &SqlitePool) -> StoreResult<Self> {
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

    pub(super) fn conn(&mut self) -> &mut SqliteConnection {
        &mut self.conn
    }

    /// Commits if `outcome` is `Ok`, else rolls back.
    pub(super) async fn settle<T>(mut self, outcome: StoreResult<T>) -> StoreResult<T> {
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
        let store: &$crate::store::sqlite::SqliteStore = $store;
        let work = async {
            let mut tx = store.readers.begin().await.map_err($crate::store::sqlite::errors::db)?;
            let outcome = {
                let $conn: &mut SqliteConnection = &mut tx;
                async move { $body }.await
            };
            $crate::store::sqlite::tx::settle_read(tx, outcome).await
        };
        match tokio::time::timeout(store.op_timeout, work).await {
            Ok(outcome) => outcome,
            Err(_) => Err(store.timed_out(false)),
        }
    }};
}

/// Ends a read transaction.
pub(super) async fn settle_read<T>(
    tx: Transaction<'static, Sqlite>,
    outcome: StoreResult<T>,
) -> StoreResult<T> {
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
