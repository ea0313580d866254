//! PostgreSQL driver errors as store errors: what means "not reached, nothing sent"
//! ([`StoreError::Unavailable`]), what means "sent, no answer" ([`StoreError::Unanswered`]), and
//! the constraint violations the store turns into answers. No message carries the URL.

use sqlx::migrate::MigrateError;

use crate::store::StoreError;

/// Maps a driver error: unreachable server or exhausted pool is `Unavailable`, the rest `Backend`.
/// No message carries the connection URL.
pub(super) fn db(error: sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    match error {
        E::PoolTimedOut => StoreError::Unavailable("no PostgreSQL connection available in time".to_owned()),
        E::PoolClosed => StoreError::Unavailable("the PostgreSQL pool is closed".to_owned()),
        // Refused or unroutable: nothing was sent.
        E::Io(e) if is_unreached(&e) => StoreError::Unavailable(format!("cannot reach PostgreSQL: {e}")),
        // Lost mid-statement: whether it committed is unknown.
        E::Io(e) => StoreError::Unanswered(format!("lost PostgreSQL: {e}")),
        E::Tls(e) => StoreError::Unavailable(format!("TLS with PostgreSQL failed: {e}")),
        E::WorkerCrashed => StoreError::Unanswered("the PostgreSQL connection worker crashed".to_owned()),
        E::Database(e) if e.code().is_some_and(|c| is_unavailable_code(&c)) => {
            StoreError::Unavailable(format!("PostgreSQL: {}", e.message()))
        }
        other => StoreError::Backend(other.to_string()),
    }
}

/// Whether an I/O error means the server was never reached (so no statement was sent).
fn is_unreached(error: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        error.kind(),
        K::ConnectionRefused | K::NotFound | K::AddrNotAvailable | K::HostUnreachable | K::NetworkUnreachable
    )
}

/// SQLSTATEs that mean "the server cannot serve now": connection exceptions, shutdown, too many
/// connections, statement timeout.
fn is_unavailable_code(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300" | "57014")
}

pub(super) fn migrate_err(error: MigrateError) -> StoreError {
    match error {
        MigrateError::Execute(e) => db(e),
        other => StoreError::Backend(format!("migration failed: {other}")),
    }
}

pub(super) fn is_unique_violation(error: &sqlx::Error) -> bool {
    error.as_database_error().is_some_and(|e| e.is_unique_violation())
}

pub(super) fn is_foreign_key_violation(error: &sqlx::Error) -> bool {
    error.as_database_error().is_some_and(|e| e.is_foreign_key_violation())
}
