//! SQLite driver errors as store errors. Every failure of the file itself (busy past the timeout,
//! locked, read-only, I/O, corrupt, full) is [`StoreError::Unavailable`]: SQLite rolls a failed
//! transaction back, so nothing was applied, and the API answers 503 `store_unavailable`.

use sqlx::migrate::MigrateError;

use crate::store::StoreError;

/// Maps a driver error. Every failure of the file itself (busy past the timeout, locked,
/// read-only, I/O, corrupt, full, cannot open, not a database) is `Unavailable`: SQLite rolls a
/// failed transaction back, so nothing was applied.
pub(super) fn db(error: sqlx::Error) -> StoreError {
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

pub(super) fn migrate_err(error: MigrateError) -> StoreError {
    match error {
        MigrateError::Execute(e) => db(e),
        other => StoreError::Backend(format!("migration failed: {other}")),
    }
}
