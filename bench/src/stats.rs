//! Latency summaries and medians.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What one timed run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Requests (or sequences) that succeeded.
    pub ok: u64,
    /// Requests that failed (non-2xx or I/O error).
    pub errors: u64,
    /// Successes per second over the run.
    pub per_sec: f64,
    /// Median latency, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: f64,
}

impl Summary {
    /// Summarises latencies in microseconds taken over `elapsed`.
    pub fn of(mut latencies_us: Vec<u32>, errors: u64, elapsed: Duration) -> Self {
        latencies_us.sort_unstable();
        let ok = latencies_us.len() as u64;
        Summary {
            ok,
            errors,
            per_sec: ok as f64 / elapsed.as_secs_f64().max(1e-9),
            p50_ms: percentile(&latencies_us, 0.50) / 1000.0,
            p99_ms: percentile(&latencies_us, 0.99) / 1000.0,
        }
    }
}

/// The `q` quantile (nearest rank) of sorted values; 0 when empty.
pub fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    f64::from(sorted[rank - 1])
}

/// The median of some figures (the mean of the two middle ones for an even count); 0 when empty.
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 }
}

/// Medians of each field over several runs.
pub fn median_summary(runs: &[Summary]) -> Summary {
    Summary {
        ok: median(runs.iter().map(|r| r.ok as f64)) as u64,
        errors: runs.iter().map(|r| r.errors).sum(),
        per_sec: median(runs.iter().map(|r| r.per_sec)),
        p50_ms: median(runs.iter().map(|r| r.p50_ms)),
        p99_ms: median(runs.iter().map(|r| r.p99_ms)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[7], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median([]), 0.0);
    }
}
