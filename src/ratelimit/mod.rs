//! Rate limiting: fixed-window counters and concurrency slots, per key.
//!
//! - [`memory`]: one process (the default with the memory and PostgreSQL stores).
//! - [`redis`]: shared by every replica on the same Redis and key prefix (the default with the
//!   Redis store), so that a limit is a limit of the service, not of each replica.
//!
//! The HTTP side (which requests count, the `RateLimit-*` headers, the 429) is in
//! [`crate::http::ratelimit`].
//!
//! # Windows
//! A counter's window opens at its first event and lasts `window`; the count resets when it
//! closes. Every event counts, refused ones included, but the window never slides, so a client
//! that keeps hammering is let in again as soon as the window closes. A fixed window lets up to
//! twice the limit through across a window boundary; that is the price of one counter per key.
//!
//! # Slots
//! A slot bounds concurrent work (open streams). It is given back when its [`Slot`] guard drops;
//! in Redis it also lapses after its lease, so a replica that dies holding slots does not hold
//! them forever.

pub mod memory;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

/// A shared handle to the configured limiter.
pub type DynLimiter = Arc<dyn RateLimiter>;

/// One event counted in a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowHit {
    /// Events in the current window, this one included.
    pub count: u64,
    /// Time until the window closes.
    pub reset: Duration,
}

/// The limiter's backend failed; callers let the request through (see [`crate::http::ratelimit`]).
#[derive(Debug, thiserror::Error)]
#[error("rate limiter unavailable: {0}")]
pub struct LimiterError(pub String);

/// A held concurrency slot; dropping it gives the slot back.
pub struct Slot {
    release: Option<Box<dyn FnOnce() + Send>>,
}

impl Slot {
    /// A slot that runs `release` once, when it drops.
    pub fn new(release: impl FnOnce() + Send + 'static) -> Self {
        Slot { release: Some(Box::new(release)) }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release();
        }
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slot")
    }
}

/// Counters and slots, each named by a key id and a kind (`rps`, `turns`, `streams`).
#[async_trait]
pub trait RateLimiter: Send + Sync + 'static {
    /// Short backend name for logs (`memory`, `redis`).
    fn backend(&self) -> &'static str;

    /// Counts one event in the fixed window of `(key_id, kind)`, which opens at its first event
    /// and lasts `window`.
    async fn hit(&self, key_id: &str, kind: &str, window: Duration) -> Result<WindowHit, LimiterError>;

    /// Takes one of at most `max` slots of `(key_id, kind)`; `None` when all are held. The slot is
    /// held until the guard drops, and at most `lease`.
    async fn acquire(
        &self,
        key_id: &str,
        kind: &str,
        max: u64,
        lease: Duration,
    ) -> Result<Option<Slot>, LimiterError>;
}
