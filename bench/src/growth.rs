//! Figure 4: does a turn cost the same on a session holding 100,000 messages as on one holding
//! 10? One client alternates a turn on the big session with a turn on a small session (a fresh
//! small session each time, so each holds exactly 10 messages when measured); the figure is the
//! p50 of the big turns over the p50 of the small ones, side by side in the same run.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use hyper::Method;
use parley::domain::{DEFAULT_TENANT, Message, Role, new_id};
use parley::store::{AppendBatch, DynStore};
use serde::Serialize;

use crate::client::Client;
use crate::setup;
use crate::stats::{median, percentile};

/// The big session's id.
pub const BIG: &str = "growth-big";

/// What figure 4 measured in one run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GrowthRun {
    /// p50 turn latency on the big session, ms.
    pub big_p50_ms: f64,
    /// p50 turn latency on the small sessions, ms.
    pub small_p50_ms: f64,
    /// big / small.
    pub ratio: f64,
}

/// Figure 4 over several runs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Growth {
    /// Messages the big session held before the runs.
    pub big_messages: u64,
    /// Messages each small session held when measured.
    pub small_messages: u64,
    /// Each run.
    pub runs: Vec<GrowthRun>,
    /// Median of the runs' p50 on the big session.
    pub big_p50_ms: f64,
    /// Median of the runs' p50 on the small sessions.
    pub small_p50_ms: f64,
    /// Median of the runs' ratios.
    pub ratio: f64,
}

/// The small sessions' ids.
pub fn small_ids(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("growth-small-{i:05}")).collect()
}

/// Fills the big session through the store directly (for Redis and PostgreSQL; the figure times
/// turns, not the filling), in batches of 1,000 user/assistant messages.
pub async fn seed_big_in_store(store: &DynStore, messages: u64, content: &str) -> anyhow::Result<()> {
    let mut left = messages;
    while left > 0 {
        let n = left.min(1000);
        let mut batch = Vec::with_capacity(n as usize);
        for i in 0..n {
            let turn = new_id();
            let role = if i % 2 == 0 { Role::User } else { Role::Assistant };
            batch.push(Message::new(BIG, turn, role, content));
        }
        store
            .append(DEFAULT_TENANT, BIG, AppendBatch { messages: batch, turn: None, supersede_from: None })
            .await?;
        left -= n;
    }
    Ok(())
}

/// Fills the big session with turns through parley's API, one after another.
pub async fn seed_big_over_http(addr: SocketAddr, messages: u64, body: &Bytes) -> anyhow::Result<()> {
    setup::post_turns(addr, vec![(BIG.to_owned(), messages.div_ceil(2))], body, 1).await
}

async fn timed_turn(client: &mut Client, session: &str, body: &Bytes) -> anyhow::Result<u32> {
    let t0 = Instant::now();
    client.call_ok(Method::POST, &format!("/v1/sessions/{session}/messages"), Some(body.clone())).await?;
    Ok(t0.elapsed().as_micros() as u32)
}

/// Runs `runs` runs of `pairs` alternating turns each; small session k is used once, in run
/// k / pairs.
pub async fn measure(
    addr: SocketAddr,
    runs: usize,
    pairs: usize,
    body: &Bytes,
) -> anyhow::Result<Vec<GrowthRun>> {
    let small = small_ids(runs * pairs);
    let mut client = Client::new(addr);
    // Warm-up on the big session and a spare: connection, caches.
    for _ in 0..20 {
        timed_turn(&mut client, BIG, body).await?;
    }
    let mut out = Vec::new();
    for run in 0..runs {
        let (mut big, mut little) = (Vec::with_capacity(pairs), Vec::with_capacity(pairs));
        for j in 0..pairs {
            big.push(timed_turn(&mut client, BIG, body).await?);
            little
                .push(timed_turn(&mut client, &small[run * pairs + j], body).await.context("small session")?);
        }
        big.sort_unstable();
        little.sort_unstable();
        let (b, s) = (percentile(&big, 0.5) / 1000.0, percentile(&little, 0.5) / 1000.0);
        out.push(GrowthRun { big_p50_ms: b, small_p50_ms: s, ratio: b / s.max(1e-9) });
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(out)
}

/// Summarises the runs.
pub fn summarise(big_messages: u64, small_messages: u64, runs: Vec<GrowthRun>) -> Growth {
    Growth {
        big_messages,
        small_messages,
        big_p50_ms: median(runs.iter().map(|r| r.big_p50_ms)),
        small_p50_ms: median(runs.iter().map(|r| r.small_p50_ms)),
        ratio: median(runs.iter().map(|r| r.ratio)),
        runs,
    }
}
