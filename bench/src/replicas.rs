//! Figure 8: streams on any replica (issue 18), on the stores that keep a turn event log (Redis
//! and PostgreSQL). The replica running a streamed turn relays its events into the log; a
//! follower on any replica reads it (`GET /v1/sessions/{id}/turns/{turn_id}/events`).
//!
//! - (a) The producer's first-delta overhead with the log: figure 5a's probe, alternately with the
//!   log on (the default) and `PARLEY_EVENT_LOG=false`, one probe process per run; the store is
//!   checked after each to hold the probe's turns' logs, or none.
//! - (b) Follower latency: parley A runs streamed turns against the OpenAI-compatible upstream of
//!   [`crate::upstream`] (every content chunk's instant noted under its word, the words all
//!   distinct); a follower on parley B (another replica) and one on A follow each turn from its
//!   first event. Per delta: the kernel's receive timestamp on the follower's socket − the instant
//!   the upstream wrote the chunk, both on this machine's real-time clock.
//! - (c) Streamed turns/s with the log against without: two parley processes, the same streamed
//!   turn load alternating between them.
//! - (d) Memory per follower on another replica: B's resident memory growth with N followers
//!   of slow turns running on A, divided by N.
//! - (e) Bytes per event in the store, after one turn of N deltas.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hyper::Method;
use parley::config::StoreKind;
use parley::domain::DEFAULT_TENANT;
use serde::Serialize;

use crate::client::{Client, SseReader};
use crate::procs::Server;
use crate::report::OnOff;
use crate::run::{self, Ctx};
use crate::setup;
use crate::stats::{Summary, median};
use crate::streams::{self, Dialect, Held, ProbeResult, Stamps, realtime_ns};
use crate::upstream::{self, Pacing};

/// Parts and sizes of figure 8 (options of `run` and `replicas`).
#[derive(Debug, Clone, clap::Args)]
pub struct Sizes {
    /// Figure 8's parts to measure (a to e).
    #[arg(long, value_delimiter = ',', default_value = "a,b,c,d,e")]
    pub parts: Vec<char>,
    /// Figure 8b: turns streaming at once, each followed on both replicas.
    #[arg(long, default_value_t = 8)]
    pub follow_turns: usize,
    /// Figure 8b: deltas per turn.
    #[arg(long, default_value_t = 250)]
    pub follow_deltas: usize,
    /// Figure 8b: shortest wait between two deltas, in milliseconds.
    #[arg(long, default_value_t = 5)]
    pub delta_min_ms: u64,
    /// Figure 8b: longest wait between two deltas, in milliseconds.
    #[arg(long, default_value_t = 20)]
    pub delta_max_ms: u64,
    /// Figure 8d: followers held open on the other replica.
    #[arg(long, default_value_t = 1000)]
    pub followers: usize,
    /// Figure 8e: deltas of the turn whose log is weighed.
    #[arg(long, default_value_t = 1000)]
    pub log_deltas: usize,
}

/// What figure 8 measured on one store.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplicaFigures {
    /// 8a.
    pub producer: Option<ProducerOverhead>,
    /// 8b.
    pub follow: Option<FollowLatency>,
    /// 8c: streamed turns with the log (on) and without (off).
    pub streamed_turns: Option<OnOff>,
    /// 8d.
    pub follower_memory: Option<FollowerMemory>,
    /// 8e.
    pub log_size: Option<LogSize>,
}

/// Figure 8a: first delta to the client's socket, with the log and without, one probe process
/// per run, alternating (without first in even pairs).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProducerOverhead {
    /// With the log, per run.
    pub on_runs: Vec<Summary>,
    /// Without, per run.
    pub off_runs: Vec<Summary>,
    /// Medians with the log.
    pub on: Summary,
    /// Medians without.
    pub off: Summary,
    /// Turn logs the store gained during the runs with the log (there must be some)…
    pub logged_turns_on: u64,
    /// …and during the runs without it (there must be none).
    pub logged_turns_off: u64,
}

/// Figure 8b: per delta, the upstream's write → a follower's socket.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FollowLatency {
    /// Turns streaming at once.
    pub turns: usize,
    /// Deltas per turn.
    pub deltas_per_turn: usize,
    /// Waits between deltas, ms (from, to).
    pub delta_ms: (u64, u64),
    /// The follower on the other replica, every delta of every round (`ok`: deltas measured,
    /// `errors`: deltas it never got, `per_sec`: deltas per second).
    pub other_replica: Summary,
    /// The follower on the replica running the turn.
    pub same_replica: Summary,
    /// The other replica's follower, per round.
    pub other_runs: Vec<Summary>,
    /// The same replica's follower, per round.
    pub same_runs: Vec<Summary>,
    /// Deltas written before a follower's answer arrived (replayed, not live): left out.
    pub replayed: u64,
}

/// Figure 8d.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FollowerMemory {
    /// Followers asked for.
    pub followers: usize,
    /// Followers that had their first event and were still open when memory was read.
    pub open: usize,
    /// The other replica's resident memory before them, bytes.
    pub rss_before: u64,
    /// With them open.
    pub rss_open: u64,
    /// (rss_open − rss_before) / open.
    pub per_follower_bytes: f64,
    /// For the record: the running replica's growth per streamed turn it runs and relays (its
    /// client's stream included), bytes.
    pub producer_per_turn_bytes: f64,
}

/// Figure 8e.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LogSize {
    /// Events in the turn's log (its deltas, `turn.started`, `message.completed`,
    /// `turn.completed`).
    pub events: u64,
    /// What the store holds for the log, per event: Redis `MEMORY USAGE` of the turn's stream;
    /// PostgreSQL's `pg_total_relation_size` growth of `turn_event_batches` (heap, index, TOAST).
    pub store_bytes_per_event: f64,
    /// PostgreSQL only: `pg_column_size` of the rows (a batch of events each), per event.
    pub row_bytes_per_event: Option<f64>,
    /// The encoded events' own length, per event.
    pub body_bytes_per_event: f64,
    /// A delta event's encoded length (the median one).
    pub delta_body_bytes: f64,
}

/// Figure 8 on one store: every part in turn.
pub async fn figure(ctx: &Ctx, kind: StoreKind) -> anyhow::Result<ReplicaFigures> {
    let a = &ctx.args;
    let wants = |part: char| a.replicas.parts.contains(&part);
    let mut out = ReplicaFigures::default();
    if wants('a') {
        eprintln!("[bench] figure 8a: first delta with the event log and without");
        out.producer = Some(producer_overhead(ctx, kind).await?);
    }
    if wants('b') {
        eprintln!("[bench] figure 8b: followers on the other replica and on the same");
        out.follow = Some(follow_latency(ctx, kind).await?);
    }
    if wants('c') {
        eprintln!("[bench] figure 8c: streamed turns with the event log and without");
        let plan = a.plan();
        out.streamed_turns = Some(run::on_off(ctx, kind, "PARLEY_EVENT_LOG", true, a.runs, plan).await?);
    }
    if wants('d') {
        eprintln!("[bench] figure 8d: {} followers on the other replica", a.replicas.followers);
        out.follower_memory = Some(follower_memory(ctx, kind).await?);
    }
    if wants('e') {
        eprintln!("[bench] figure 8e: bytes per event in the store");
        out.log_size = Some(log_size(ctx, kind).await?);
    }
    Ok(out)
}

/// Figure 8a.
async fn producer_overhead(ctx: &Ctx, kind: StoreKind) -> anyhow::Result<ProducerOverhead> {
    let mut fig = ProducerOverhead::default();
    for pair in 0..ctx.args.runs {
        let order = if pair % 2 == 0 { [false, true] } else { [true, false] };
        for log in order {
            let before = logged_turns(ctx, kind).await?;
            let env = [("PARLEY_EVENT_LOG", if log { "true" } else { "false" })];
            let probe: ProbeResult = run::stream_probe(ctx, kind, false, Dialect::Native, 1, &env).await?;
            let logged = logged_turns(ctx, kind).await?.saturating_sub(before);
            let run = probe.runs.into_iter().next().context("the probe measured no run")?;
            let which = if log { "with the log" } else { "without" };
            eprintln!(
                "[bench]   pair {pair}, {which}: p50 {:.3} ms, p99 {:.3} ms ({} streams, {logged} turn logs)",
                run.p50_ms, run.p99_ms, run.ok
            );
            if log {
                fig.logged_turns_on += logged;
                fig.on_runs.push(run);
            } else {
                fig.logged_turns_off += logged;
                fig.off_runs.push(run);
            }
        }
    }
    if fig.logged_turns_on == 0 || fig.logged_turns_off != 0 {
        bail!(
            "the event log was not as configured: {} turn logs with it, {} without",
            fig.logged_turns_on,
            fig.logged_turns_off
        );
    }
    fig.on = crate::stats::median_summary(&fig.on_runs);
    fig.off = crate::stats::median_summary(&fig.off_runs);
    Ok(fig)
}

/// Figure 8b.
async fn follow_latency(ctx: &Ctx, kind: StoreKind) -> anyhow::Result<FollowLatency> {
    let sizes = &ctx.args.replicas;
    let stamps = Stamps::default();
    let pacing = Pacing {
        min: Duration::from_millis(sizes.delta_min_ms),
        max: Duration::from_millis(sizes.delta_max_ms.max(sizes.delta_min_ms)),
        every_word: true,
    };
    let upstream = upstream::start(Arc::clone(&stamps), pacing).await?;
    let base_url = format!("http://{upstream}/v1");
    let env = run::with_env(
        run::parley_env(ctx, kind, 0),
        &[("PARLEY_MODEL_PROVIDER", "openai"), ("OPENAI_BASE_URL", &base_url), ("OPENAI_API_KEY", "bench")],
    );
    let a = run::start_parley_env(ctx, kind, env.clone(), "8b-a").await?;
    let b = run::start_parley_env(ctx, kind, env, "8b-b").await?;
    let result = follow_rounds(ctx, &a, &b, &stamps).await;
    a.stop(Duration::from_secs(3)).await;
    b.stop(Duration::from_secs(3)).await;
    result
}

async fn follow_rounds(ctx: &Ctx, a: &Server, b: &Server, stamps: &Stamps) -> anyhow::Result<FollowLatency> {
    let sizes = &ctx.args.replicas;
    let (turns, deltas) = (sizes.follow_turns.max(1), sizes.follow_deltas.max(1));
    let rounds = ctx.args.runs;
    let sessions: Vec<String> =
        (0..=rounds).flat_map(|r| (0..turns).map(move |t| format!("fol-{r}-{t}"))).collect();
    setup::create_sessions(a.addr, &sessions, 16).await?;
    // Receive timestamps on, and kept on, before the first byte measured.
    let _stamping = crate::rxstamp::keep_stamping(Duration::from_secs(5)).await?;
    let mut fig = FollowLatency {
        turns,
        deltas_per_turn: deltas,
        delta_ms: (sizes.delta_min_ms, sizes.delta_max_ms),
        ..Default::default()
    };
    let mut all: [Vec<u32>; 2] = Default::default();
    let mut missing = [0u64; 2];
    let mut elapsed = Duration::ZERO;
    // Round 0 warms up: B's subscription to the log's announcements starts with its first
    // follower, and every connection pool fills.
    for round in 0..=rounds {
        let started = Instant::now();
        let tasks: Vec<_> = (0..turns)
            .map(|t| {
                let session = format!("fol-{round}-{t}");
                let text: Vec<String> = (0..deltas).map(|i| format!("r{round}t{t}.{i}")).collect();
                tokio::spawn(followed_turn(a.addr, b.addr, session, text.join(" ")))
            })
            .collect();
        let mut followed = Vec::new();
        for task in tasks {
            followed.push(task.await.context("a follower panicked")??);
        }
        let round_time = started.elapsed();
        let stamps = std::mem::take(&mut *stamps.lock().expect("stamps"));
        if round == 0 {
            continue;
        }
        elapsed += round_time;
        let mut runs = Vec::new();
        for side in 0..2 {
            let (mut latencies, mut missed) = (Vec::new(), 0);
            for f in followed.iter().map(|pair| &pair[side]) {
                missed += deltas.saturating_sub(f.deltas.len()) as u64;
                fig.replayed += f.latencies(&stamps, &mut latencies)?;
            }
            runs.push(Summary::of(latencies.clone(), missed, round_time));
            all[side].extend(latencies);
            missing[side] += missed;
        }
        let [other, same] = <[Summary; 2]>::try_from(runs).expect("two sides");
        eprintln!(
            "[bench]   round {round}: other replica p50 {:.3} / p99 {:.3} ms ({} deltas), same replica p50 {:.3} / p99 {:.3} ms",
            other.p50_ms, other.p99_ms, other.ok, same.p50_ms, same.p99_ms
        );
        fig.other_runs.push(other);
        fig.same_runs.push(same);
    }
    let [other, same] = all;
    fig.other_replica = Summary::of(other, missing[0], elapsed);
    fig.same_replica = Summary::of(same, missing[1], elapsed);
    Ok(fig)
}

/// What a follower's socket received.
struct Followed {
    /// When its answer's head arrived (real-time clock, ns): deltas written before were replayed.
    attached_ns: u64,
    /// Each delta's text (its upstream word) and the receive timestamp of its bytes.
    deltas: Vec<(String, u64)>,
}

impl Followed {
    /// Adds to `out` each live delta's latency in µs, the upstream's write (`stamps`, by word)
    /// to this follower's socket; returns how many deltas were replayed instead (left out).
    fn latencies(&self, stamps: &HashMap<String, (Instant, u64)>, out: &mut Vec<u32>) -> anyhow::Result<u64> {
        let mut replayed = 0;
        for (word, rx_ns) in &self.deltas {
            let (_, sent_ns) = *stamps.get(word).with_context(|| format!("no upstream stamp for {word}"))?;
            if sent_ns < self.attached_ns {
                replayed += 1;
                continue;
            }
            out.push((rx_ns.saturating_sub(sent_ns) / 1000).min(u64::from(u32::MAX)) as u32);
        }
        Ok(replayed)
    }
}

/// One streamed turn on `a`, followed from its first event on `b` (the other replica) and on `a`.
async fn followed_turn(
    a: SocketAddr,
    b: SocketAddr,
    session: String,
    text: String,
) -> anyhow::Result<[Followed; 2]> {
    let mut poster = Client::new(a);
    let path = format!("/v1/sessions/{session}/messages?stream=true");
    let response = poster.send(Method::POST, &path, Some(setup::turn_body(&text))).await?;
    if !response.status().is_success() {
        bail!("the streamed turn answered {}", response.status());
    }
    let mut events = SseReader::new(response.into_body());
    let turn_id = loop {
        let event = events.next().await?.context("the turn's stream ended before turn.started")?;
        if event.name == "turn.started" {
            break event.field("turn_id").context("turn.started without a turn_id")?;
        }
    };
    let path = format!("/v1/sessions/{session}/turns/{turn_id}/events?after=0");
    let drain = async {
        while events.next().await?.is_some() {}
        Ok(())
    };
    let (other, same, ()) = tokio::try_join!(follow(b, &path), follow(a, &path), drain)?;
    Ok([other, same])
}

/// Follows a turn's events to its end, noting each delta's receive timestamp.
async fn follow(addr: SocketAddr, path: &str) -> anyhow::Result<Followed> {
    let mut client = Client::stamped(addr);
    let response = client.send(Method::GET, path, None).await?;
    if !response.status().is_success() {
        bail!("GET {path} answered {}", response.status());
    }
    let attached_ns = realtime_ns();
    let mut events = SseReader::new(response.into_body());
    let mut deltas = Vec::new();
    while let Some(event) = events.next().await? {
        match event.name.as_str() {
            "message.delta" => {
                // The delta's bytes came in the client's last read: its receive timestamp is theirs.
                let rx = client.last_rx_ns().context("no receive timestamp on the follower's socket")?;
                let word = event.field("delta").context("a delta without text")?;
                deltas.push((word.trim().to_owned(), rx));
            }
            "turn.completed" => break,
            "turn.failed" | "turn.cancelled" => bail!("a followed turn ended with {}", event.name),
            _ => {}
        }
    }
    Ok(Followed { attached_ns, deltas })
}

/// Followers of figure 8d opened before the memory baseline (B's subscription, its pools and
/// its allocator's first arenas are not per follower).
const WARM_FOLLOWERS: usize = 16;

/// Figure 8d.
async fn follower_memory(ctx: &Ctx, kind: StoreKind) -> anyhow::Result<FollowerMemory> {
    let n = ctx.args.replicas.followers;
    // One word a second, 40 words: each turn streams for about 45 s, longer than the figure.
    let env = run::parley_env(ctx, kind, 1000);
    let a = run::start_parley_env(ctx, kind, env.clone(), "8d-a").await?;
    let b = run::start_parley_env(ctx, kind, env, "8d-b").await?;
    let result = hold_followers(&a, &b, n).await;
    a.stop(Duration::from_secs(3)).await;
    b.stop(Duration::from_secs(3)).await;
    result
}

async fn hold_followers(a: &Server, b: &Server, n: usize) -> anyhow::Result<FollowerMemory> {
    let sessions: Vec<String> = (0..WARM_FOLLOWERS + n).map(|i| format!("fmem-{i:05}")).collect();
    setup::create_sessions(a.addr, &sessions, 64).await?;
    let held = Held::default();
    let hold = |session: &String| held.spawn(open_follower(a.addr, b.addr, session.clone()));
    let (warm, rest) = sessions.split_at(WARM_FOLLOWERS);
    let mut tasks: Vec<_> = warm.iter().map(hold).collect();
    held.wait_opened(WARM_FOLLOWERS, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (a_before, rss_before) = (a.rss()?, b.rss()?);
    tasks.extend(rest.iter().map(hold));
    held.wait_opened(WARM_FOLLOWERS + n, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (a_open, rss_open) = (a.rss()?, b.rss()?);
    let open = held.open().saturating_sub(WARM_FOLLOWERS);
    for task in tasks {
        task.abort();
    }
    if open == 0 {
        bail!("no follower opened on the other replica");
    }
    Ok(FollowerMemory {
        followers: n,
        open,
        rss_before,
        rss_open,
        per_follower_bytes: rss_open.saturating_sub(rss_before) as f64 / open as f64,
        producer_per_turn_bytes: a_open.saturating_sub(a_before) as f64 / open as f64,
    })
}

/// A slow streamed turn on `a` and its follower on `b` from event 0, once the follower has its
/// first event: the two connections and the two streams.
async fn open_follower(
    a: SocketAddr,
    b: SocketAddr,
    session: String,
) -> Option<([Client; 2], [SseReader; 2])> {
    let path = format!("/v1/sessions/{session}/messages?stream=true");
    let mut poster = Client::new(a);
    let response = poster.send(Method::POST, &path, Some(streams::slow_turn_body())).await.ok()?;
    let mut posted = SseReader::new(response.into_body());
    let turn_id = loop {
        let event = posted.next().await.ok()??;
        if event.name == "turn.started" {
            break event.field("turn_id")?;
        }
    };
    let path = format!("/v1/sessions/{session}/turns/{turn_id}/events?after=0");
    let mut follower = Client::new(b);
    let response = follower.send(Method::GET, &path, None).await.ok()?;
    let mut followed = SseReader::new(response.into_body());
    followed.next().await.ok()??;
    Some(([poster, follower], [posted, followed]))
}

/// Figure 8e: one turn of `log_deltas` deltas on a parley of its own, in a prefix (schema) of its
/// own, and the store's size of its log.
async fn log_size(ctx: &Ctx, kind: StoreKind) -> anyhow::Result<LogSize> {
    let n = ctx.args.replicas.log_deltas.max(1);
    let space = format!("{}_log", ctx.tag);
    let env = run::with_env(
        run::parley_env(ctx, kind, 0),
        &[("PARLEY_REDIS_PREFIX", &space), ("PARLEY_PG_SCHEMA", &space)],
    );
    let parley = run::start_parley_env(ctx, kind, env, "8e").await?;
    let result = weigh_log(ctx, kind, &parley, &space, n).await;
    parley.stop(Duration::from_secs(3)).await;
    let dropped = match kind {
        StoreKind::Redis => run::drop_redis_keys(&ctx.args.redis_url, &space).await,
        _ => run::drop_schema(&ctx.args.database_url, &space).await,
    };
    if let Err(e) = dropped {
        eprintln!("[bench] cleanup of {space}: {e:#}");
    }
    result
}

async fn weigh_log(
    ctx: &Ctx,
    kind: StoreKind,
    parley: &Server,
    space: &str,
    n: usize,
) -> anyhow::Result<LogSize> {
    let session = "log-size";
    setup::create_sessions(parley.addr, &[session.to_owned()], 1).await?;
    let before = match kind {
        StoreKind::Postgres => pg_relation_size(&ctx.args.database_url, space).await?,
        _ => 0,
    };
    // The echo model answers "echo: <the words> (context: 0 messages)", a word per delta.
    let words = vec!["word"; n].join(" ");
    let mut client = Client::new(parley.addr);
    let path = format!("/v1/sessions/{session}/messages?stream=true");
    let response = client.send(Method::POST, &path, Some(setup::turn_body(&words))).await?;
    let mut events = SseReader::new(response.into_body());
    let (mut turn_id, mut completed) = (None, false);
    while let Some(event) = events.next().await? {
        match event.name.as_str() {
            "turn.started" => turn_id = event.field("turn_id"),
            "turn.completed" => completed = true,
            _ => {}
        }
    }
    let turn_id = turn_id.context("the turn's stream had no turn.started")?;
    if !completed {
        bail!("the turn of figure 8e did not complete");
    }
    // The relay writes the log beside the stream: let it finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    match kind {
        StoreKind::Redis => redis_log_size(&ctx.args.redis_url, space, session, &turn_id).await,
        _ => {
            let after = pg_relation_size(&ctx.args.database_url, space).await?;
            pg_log_size(&ctx.args.database_url, space, &turn_id, after.saturating_sub(before)).await
        }
    }
}

async fn redis_log_size(url: &str, prefix: &str, session: &str, turn_id: &str) -> anyhow::Result<LogSize> {
    use deadpool_redis::redis;
    let mut conn = redis::Client::open(url)?.get_multiplexed_async_connection().await?;
    let key = format!("{prefix}:{{{DEFAULT_TENANT}/{session}}}:events:{turn_id}");
    let usage: Option<u64> =
        redis::cmd("MEMORY").arg("USAGE").arg(&key).arg("SAMPLES").arg(0).query_async(&mut conn).await?;
    let usage = usage.with_context(|| format!("no key {key}"))?;
    // Each entry is a batch: `<last event id>-0` → event id, encoded event, event id, …
    let entries: Vec<(String, Vec<String>)> =
        redis::cmd("XRANGE").arg(&key).arg("-").arg("+").query_async(&mut conn).await?;
    let mut bodies: Vec<String> = Vec::new();
    let mut last = 0u64;
    for (_, fields) in entries {
        for pair in fields.chunks_exact(2) {
            let id: u64 = pair[0].parse().context("an event id")?;
            // A retried batch that grew repeats events of the one before.
            if id > last {
                bodies.push(pair[1].clone());
                last = id;
            }
        }
    }
    Ok(sizes_of(&bodies, usage as f64, None))
}

/// The total size of the schema's `turn_event_batches`: heap, indexes, TOAST.
async fn pg_relation_size(url: &str, schema: &str) -> anyhow::Result<u64> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await?;
    // The schema name is `bench_<pid>_log`: a plain identifier.
    let sql = format!("select pg_total_relation_size('\"{schema}\".turn_event_batches')");
    let size: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(&mut conn).await?;
    Ok(size as u64)
}

async fn pg_log_size(url: &str, schema: &str, turn_id: &str, growth: u64) -> anyhow::Result<LogSize> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let sql = format!(
        "select first_id, bodies, pg_column_size(e.*)::bigint from \"{schema}\".turn_event_batches e \
         where turn_id = $1::uuid order by last_id"
    );
    let rows: Vec<(i64, Vec<String>, i64)> =
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(turn_id).fetch_all(&mut conn).await?;
    let row_bytes: i64 = rows.iter().map(|(_, _, size)| size).sum();
    let mut bodies: Vec<String> = Vec::new();
    let mut last = 0i64;
    for (first, batch, _) in rows {
        for (id, body) in (first..).zip(batch) {
            if id > last {
                bodies.push(body);
                last = id;
            }
        }
    }
    let per_row = row_bytes as f64 / bodies.len().max(1) as f64;
    Ok(sizes_of(&bodies, growth as f64, Some(per_row)))
}

/// The figure from the log's encoded events and what the store holds for them.
fn sizes_of(bodies: &[String], store_bytes: f64, row_bytes_per_event: Option<f64>) -> LogSize {
    let events = bodies.len().max(1) as f64;
    let deltas = bodies.iter().filter(|b| b.starts_with("message.delta\n")).map(|b| b.len() as f64);
    LogSize {
        events: bodies.len() as u64,
        store_bytes_per_event: store_bytes / events,
        row_bytes_per_event,
        body_bytes_per_event: bodies.iter().map(String::len).sum::<usize>() as f64 / events,
        delta_body_bytes: median(deltas),
    }
}

/// How many turn logs the run's prefix (schema) holds.
async fn logged_turns(ctx: &Ctx, kind: StoreKind) -> anyhow::Result<u64> {
    match kind {
        StoreKind::Redis => {
            use deadpool_redis::redis::{self, AsyncCommands};
            let url = &ctx.args.redis_url;
            let mut conn = redis::Client::open(url.as_str())?.get_multiplexed_async_connection().await?;
            let mut keys = conn.scan_match::<_, String>(format!("{}:*:events:*", ctx.tag)).await?;
            let mut count = 0;
            while let Some(key) = futures::StreamExt::next(&mut keys).await {
                key?;
                count += 1;
            }
            Ok(count)
        }
        StoreKind::Postgres => {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&ctx.args.database_url).await?;
            let table = format!("\"{}\".turn_logs", ctx.tag);
            // Before parley's first start, the run's schema has no tables.
            let exists: Option<String> =
                sqlx::query_scalar("select to_regclass($1)::text").bind(&table).fetch_one(&mut conn).await?;
            if exists.is_none() {
                return Ok(0);
            }
            let sql = format!("select count(*) from {table}");
            let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(&mut conn).await?;
            Ok(count as u64)
        }
        StoreKind::Memory | StoreKind::Sqlite => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_count_every_event_and_take_the_median_delta() {
        let bodies: Vec<String> =
            ["turn.started\n{..}", "message.delta\n{a}", "message.delta\n{abc}", "turn.completed\n{}"]
                .map(String::from)
                .to_vec();
        let size = sizes_of(&bodies, 400.0, None);
        assert_eq!(size.events, 4);
        assert_eq!(size.store_bytes_per_event, 100.0);
        assert_eq!(size.delta_body_bytes, 18.0);
    }
}
