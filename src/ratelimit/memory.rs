//! The in-process limiter: counters and slots in a map behind a short lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{LimiterError, RateLimiter, Slot, WindowHit};

/// Closed windows are dropped from the map every this many hits.
const PRUNE_EVERY: u64 = 4096;

/// The in-process limiter.
#[derive(Debug, Default)]
pub struct MemoryLimiter {
    windows: Mutex<Windows>,
    slots: Arc<Mutex<HashMap<String, u64>>>,
}

#[derive(Debug, Default)]
struct Windows {
    open: HashMap<String, Window>,
    hits: u64,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    count: u64,
    closes_at: Instant,
}

impl MemoryLimiter {
    /// An empty limiter.
    pub fn new() -> Self {
        MemoryLimiter::default()
    }
}

fn bucket(key_id: &str, kind: &str, window: Duration) -> String {
    format!("{key_id}\n{kind}\n{}", window.as_millis())
}

impl Windows {
    fn hit(&mut self, bucket: String, window: Duration, now: Instant) -> WindowHit {
        self.hits += 1;
        if self.hits.is_multiple_of(PRUNE_EVERY) {
            self.open.retain(|_, w| w.closes_at > now);
        }
        let entry = self.open.entry(bucket).or_insert(Window { count: 0, closes_at: now + window });
        if entry.closes_at <= now {
            *entry = Window { count: 0, closes_at: now + window };
        }
        entry.count += 1;
        WindowHit { count: entry.count, reset: entry.closes_at - now }
    }
}

#[async_trait]
impl RateLimiter for MemoryLimiter {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn hit(&self, key_id: &str, kind: &str, window: Duration) -> Result<WindowHit, LimiterError> {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        Ok(windows.hit(bucket(key_id, kind, window), window, Instant::now()))
    }

    async fn acquire(
        &self,
        key_id: &str,
        kind: &str,
        max: u64,
        _lease: Duration,
    ) -> Result<Option<Slot>, LimiterError> {
        let name = format!("{key_id}\n{kind}");
        {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            let held = slots.entry(name.clone()).or_insert(0);
            if *held >= max {
                return Ok(None);
            }
            *held += 1;
        }
        let slots = Arc::clone(&self.slots);
        Ok(Some(Slot::new(move || {
            let mut slots = slots.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(held) = slots.get_mut(&name) {
                *held = held.saturating_sub(1);
                if *held == 0 {
                    slots.remove(&name);
                }
            }
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_window_counts_then_resets_when_it_closes() {
        let limiter = MemoryLimiter::new();
        let window = Duration::from_millis(300);
        let first = limiter.hit("k", "rps", window).await.unwrap();
        assert_eq!(first.count, 1);
        assert!(first.reset <= window && first.reset > Duration::from_millis(250));
        assert_eq!(limiter.hit("k", "rps", window).await.unwrap().count, 2);
        assert_eq!(limiter.hit("other", "rps", window).await.unwrap().count, 1, "keys are separate");
        assert_eq!(limiter.hit("k", "turns", window).await.unwrap().count, 1, "kinds are separate");
        tokio::time::sleep(window).await;
        assert_eq!(limiter.hit("k", "rps", window).await.unwrap().count, 1, "a new window");
    }

    #[tokio::test]
    async fn slots_are_given_back_when_their_guard_drops() {
        let limiter = MemoryLimiter::new();
        let lease = Duration::from_secs(60);
        let a = limiter.acquire("k", "streams", 2, lease).await.unwrap().expect("first");
        let _b = limiter.acquire("k", "streams", 2, lease).await.unwrap().expect("second");
        assert!(limiter.acquire("k", "streams", 2, lease).await.unwrap().is_none());
        assert!(limiter.acquire("j", "streams", 2, lease).await.unwrap().is_some(), "per key");
        drop(a);
        assert!(limiter.acquire("k", "streams", 2, lease).await.unwrap().is_some());
    }
}
