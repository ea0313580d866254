//! What the SQL backends ([`super::postgres`], [`super::sqlite`]) share: how domain values are
//! written to and read from columns (roles, turn statuses, JSON text, integer conversions, times
//! as microseconds), the paging arithmetic over rows fetched one past the limit, and the task
//! that sweeps expired sessions and keys.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::domain::{Role, TurnStatus};
use crate::store::{StoreError, StoreResult};

/// Most expired sessions (or keys) a sweeper deletes in one statement or transaction.
pub const SWEEP_BATCH: i64 = 500;

/// Longest TTL or lease applied (about 1000 years), so that `now + ttl` stays a valid time.
pub(crate) const MAX_TTL_MICROS: i64 = 1000 * 366 * 24 * 3600 * 1_000_000;

/// A lease or ttl in microseconds, as bound to statements: at most [`MAX_TTL_MICROS`].
pub(crate) fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX).min(MAX_TTL_MICROS)
}

/// JSON text exactly as serde writes it (key order kept).
pub(crate) fn json_text<T: serde::Serialize + ?Sized>(value: &T) -> String {
    // Serialising maps with string keys and serde_json values cannot fail.
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

/// A count or seq as bound to a statement (saturating).
pub(crate) fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A count or seq as read from a row (a negative one reads as 0).
pub(crate) fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// A message role from its column; `backend` names the database in the error.
pub(crate) fn parse_role(text: &str, backend: &str) -> StoreResult<Role> {
    match text {
        "system" => Ok(Role::System),
        "user" => Ok(Role::User),
        "assistant" => Ok(Role::Assistant),
        "tool" => Ok(Role::Tool),
        other => Err(StoreError::Backend(format!("unknown message role {other:?} in {backend}"))),
    }
}

/// A turn status as its column holds it.
pub(crate) fn status_str(status: TurnStatus) -> &'static str {
    match status {
        TurnStatus::Running => "running",
        TurnStatus::Completed => "completed",
        TurnStatus::Failed => "failed",
        TurnStatus::Cancelled => "cancelled",
    }
}

/// A turn status from its column; `backend` names the database in the error.
pub(crate) fn parse_status(text: &str, backend: &str) -> StoreResult<TurnStatus> {
    match text {
        "running" => Ok(TurnStatus::Running),
        "completed" => Ok(TurnStatus::Completed),
        "failed" => Ok(TurnStatus::Failed),
        "cancelled" => Ok(TurnStatus::Cancelled),
        other => Err(StoreError::Backend(format!("unknown turn status {other:?} in {backend}"))),
    }
}

/// Cuts rows fetched with a limit of `limit + 1` to `limit`, and says whether more follow.
pub(crate) fn page_of<T>(mut rows: Vec<T>, limit: usize) -> (Vec<T>, bool) {
    let has_more = rows.len() > limit;
    rows.truncate(limit);
    (rows, has_more)
}

/// Runs `sweep` on the store every `every` (at least 10 ms) until the store is dropped or the
/// handle aborted; `sweep` answers how many sessions went. Errors are logged and retried at the
/// next tick.
pub(crate) fn spawn_sweeper<S, F, Fut>(
    store: &Arc<S>,
    every: Duration,
    sweep: F,
) -> tokio::task::JoinHandle<()>
where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>) -> Fut + Send + 'static,
    Fut: Future<Output = StoreResult<u64>> + Send,
{
    let store = Arc::downgrade(store);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(store) = store.upgrade() else { return };
            match sweep(store).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(sessions = n, "swept expired sessions"),
                Err(error) => tracing::warn!(%error, "sweeping expired sessions failed"),
            }
        }
    })
}
