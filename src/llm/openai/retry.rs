//! When and how long to wait before trying a failed model call again.
//!
//! Only failures before the first chunk are candidates, and only the safe ones: connect errors,
//! timeouts before the first chunk, and the statuses 408, 409, 429 and 5xx. The wait is the
//! upstream's `Retry-After` (in seconds) when it sent one, otherwise exponential backoff with jitter.

use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};

use crate::llm::ModelError;

/// The longest `Retry-After` honoured; a longer one ends the call instead.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// The longest backoff between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// A failed attempt: the error, and whether trying again is safe.
#[derive(Debug)]
pub(crate) struct Failure {
    /// What went wrong.
    pub(crate) error: ModelError,
    /// Whether another attempt is safe (nothing was shown, and the failure may be transient).
    pub(crate) retryable: bool,
    /// How long the upstream asked us to wait.
    pub(crate) retry_after: Option<Duration>,
}

impl Failure {
    /// A failure worth another attempt.
    pub(crate) fn transient(error: ModelError) -> Self {
        Failure { error, retryable: true, retry_after: None }
    }

    /// A failure that another attempt would not fix.
    pub(crate) fn permanent(error: ModelError) -> Self {
        Failure { error, retryable: false, retry_after: None }
    }
}

/// Whether an upstream status may succeed when sent again.
pub(crate) fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 409 | 429 | 500..=599)
}

/// `Retry-After` in seconds (HTTP dates are ignored: the backoff applies then).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds: f64 = headers.get(RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds.min(86_400.0)))
}

/// How long to wait before attempt `attempt + 1` (0-based), or `None` to give up.
pub(crate) fn delay(failure: &Failure, attempt: u32, max_retries: u32, base: Duration) -> Option<Duration> {
    if !failure.retryable || attempt >= max_retries {
        return None;
    }
    match failure.retry_after {
        Some(wait) if wait > MAX_RETRY_AFTER => None,
        Some(wait) => Some(wait),
        None => Some(backoff(attempt, base)),
    }
}

/// `base × 2^attempt`, capped, then scaled by a random factor in [0.5, 1].
fn backoff(attempt: u32, base: Duration) -> Duration {
    let full = base.saturating_mul(1u32 << attempt.min(16)).min(MAX_BACKOFF);
    full.mul_f64(rand::random_range(0.5..=1.0))
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    fn status(code: u16) -> Failure {
        let error = ModelError::Status { status: code, message: String::new() };
        Failure { error, retryable: is_retryable_status(code), retry_after: None }
    }

    #[test]
    fn only_safe_statuses_are_retried() {
        for code in [408, 409, 429, 500, 502, 503, 504] {
            assert!(is_retryable_status(code), "{code}");
        }
        for code in [400, 401, 403, 404, 422] {
            assert!(!is_retryable_status(code), "{code}");
        }
    }

    #[test]
    fn backoff_grows_with_jitter_and_stops_at_max_retries() {
        let base = Duration::from_millis(100);
        let first = delay(&status(503), 0, 2, base).unwrap();
        assert!(first >= Duration::from_millis(50) && first <= base, "{first:?}");
        let second = delay(&status(503), 1, 2, base).unwrap();
        assert!(second >= base && second <= 2 * base, "{second:?}");
        assert_eq!(delay(&status(503), 2, 2, base), None);
        assert_eq!(delay(&status(400), 0, 2, base), None);
        assert!(delay(&status(503), 30, 40, base).unwrap() <= MAX_BACKOFF);
    }

    #[test]
    fn retry_after_wins_unless_it_is_too_long() {
        let mut f = status(429);
        f.retry_after = Some(Duration::from_secs(2));
        assert_eq!(delay(&f, 0, 1, Duration::ZERO), Some(Duration::from_secs(2)));
        f.retry_after = Some(Duration::from_secs(3600));
        assert_eq!(delay(&f, 0, 1, Duration::ZERO), None);
    }

    #[test]
    fn retry_after_takes_seconds_only() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("0.5"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(500)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"));
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("-1"));
        assert_eq!(retry_after(&h), None);
    }
}
