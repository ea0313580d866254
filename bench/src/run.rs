//! `parley-bench run`: every figure for every store, in one process that is the load generator.
//! parley and the floor server run as child processes; the figures go to stdout and to
//! `bench/results.json`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser as _;
use hyper::Method;
use parley::config::{Cli, StoreKind};
use serde::de::DeserializeOwned;
use tokio::process::Command;

use crate::client::Client;
use crate::floor::{self, PgReplay, RedisReplay, SqliteReplay};
use crate::footprint::Footprint;
use crate::growth;
use crate::load::{self, Plan, Worker, closed_loop};
use crate::procs::{self, Server};
use crate::report::{self, Machine, OnOff, Results, StoreFigures, TurnFigures};
use crate::setup;
use crate::stats::{Summary, median, median_summary};
use crate::streams::{self, Dialect, ProbeResult};

/// The user text of every benchmark turn.
const CONTENT: &str = "What is the weather like on the coast this weekend?";

/// Options of `parley-bench run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Stores to measure.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "memory,sqlite,redis,postgres")]
    pub stores: Vec<StoreKind>,
    /// Figures to measure (1 includes 2; 8, streams on any replica, only on Redis and PostgreSQL).
    #[arg(long, value_delimiter = ',', default_value = "1,3,4,5,6,7,8")]
    pub figures: Vec<u8>,
    /// Timed runs per figure; each figure is the median of the runs.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Seconds per timed run.
    #[arg(long, default_value_t = 3.0)]
    pub duration: f64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Sessions the clients spread over.
    #[arg(long, default_value_t = 1000)]
    pub sessions: usize,
    /// Messages of the big session of figure 4.
    #[arg(long, default_value_t = 100_000)]
    pub growth_messages: u64,
    /// Alternating big/small turn pairs per run of figure 4.
    #[arg(long, default_value_t = 200)]
    pub growth_pairs: usize,
    /// Open streams of figure 5b.
    #[arg(long, default_value_t = 10_000)]
    pub streams: usize,
    /// Messages stored for figure 6.
    #[arg(long, default_value_t = 1_000_000)]
    pub footprint_messages: usize,
    /// Stores whose parley runs with PARLEY_PIN_WORKERS=true (the memory store's floor server is
    /// pinned with it); `--pin-workers` alone pins none. Not Redis by default: its one thread
    /// shares these cores, and pinned workers cannot leave its CPU (bench/README.md).
    #[arg(long, value_enum, value_delimiter = ',', num_args = 0.., default_value = "memory,postgres")]
    pub pin_workers: Vec<StoreKind>,
    /// Start parley with PARLEY_DISABLE_THP (and the floor server the same way).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub disable_thp: bool,
    /// The parley binary (built in release).
    #[arg(long, default_value = "target/release/parley")]
    pub parley_bin: PathBuf,
    /// Where the results go.
    #[arg(long, default_value = "bench/results.json")]
    pub out: PathBuf,
    /// Redis, on this machine.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// PostgreSQL, on this machine.
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub database_url: String,
    /// Figure 8's sizes.
    #[command(flatten)]
    pub replicas: crate::replicas::Sizes,
}

impl RunArgs {
    pub(crate) fn plan(&self) -> Plan {
        Plan { duration: Duration::from_secs_f64(self.duration), max_per_worker: 10_000_000 }
    }

    fn wants(&self, figure: u8) -> bool {
        self.figures.contains(&figure)
    }
}

/// What a run shares between stores.
pub(crate) struct Ctx {
    pub(crate) args: RunArgs,
    /// This binary, for its `floor-server`, `stream-probe` and `footprint` subcommands.
    me: PathBuf,
    logs: PathBuf,
    /// The Redis prefix and PostgreSQL schema of this run.
    pub(crate) tag: String,
}

/// Runs everything and writes the results.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    check_loopback(&args.redis_url)?;
    check_loopback(&args.database_url)?;
    let root = std::env::current_dir()?;
    let tag = format!("bench_{}", std::process::id());
    let ctx = Ctx { me: std::env::current_exe()?, logs: procs::log_dir(&root)?, tag, args: args.clone() };
    let machine = machine();
    eprintln!("[bench] {} cores, {:.1} GiB, {}", machine.cores, machine.memory_gib, machine.cpu);
    let mut stores = Vec::new();
    for &kind in &args.stores {
        let name = store_name(kind);
        eprintln!("[bench] === {name} ===");
        let mut figures = StoreFigures { store: name.to_owned(), ..Default::default() };
        if let Err(e) = bench_store(&ctx, kind, &mut figures).await {
            eprintln!("[bench] {name}: {e:#}");
            figures.errors.push(format!("{e:#}"));
        }
        cleanup(&ctx, kind).await;
        stores.push(figures);
    }
    let footprint = if args.wants(6) { Some(footprint(&ctx).await?) } else { None };
    let targets = report::targets(&stores, footprint.as_ref());
    let results = Results { machine, settings: settings(&args), stores, footprint, targets };
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&results)? + "\n")?;
    println!("{}", report::markdown(&results));
    eprintln!("[bench] wrote {}", args.out.display());
    Ok(())
}

fn check_loopback(url: &str) -> anyhow::Result<()> {
    let host = url::Url::parse(url).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_default();
    if !matches!(host.as_str(), "127.0.0.1" | "localhost" | "[::1]" | "::1") {
        bail!("the bench only talks to services on this machine; {host:?} is not a loopback host");
    }
    Ok(())
}

fn store_name(kind: StoreKind) -> &'static str {
    match kind {
        StoreKind::Memory => "memory",
        StoreKind::Sqlite => "sqlite",
        StoreKind::Redis => "redis",
        StoreKind::Postgres => "postgres",
    }
}

fn settings(args: &RunArgs) -> serde_json::Value {
    serde_json::json!({
        "runs": args.runs, "duration_s": args.duration, "clients": args.clients,
        "sessions": args.sessions, "growth_messages": args.growth_messages,
        "pin_workers": args.pin_workers.iter().map(|&k| store_name(k)).collect::<Vec<_>>(), "disable_thp": args.disable_thp,
        "growth_pairs": args.growth_pairs, "streams": args.streams,
        "footprint_messages": args.footprint_messages, "content": CONTENT,
        "history_size": 20, "stream_probe_delay_ms": PROBE_DELAY_MS,
        "follow_turns": args.replicas.follow_turns, "follow_deltas": args.replicas.follow_deltas,
        "delta_ms": [args.replicas.delta_min_ms, args.replicas.delta_max_ms],
        "followers": args.replicas.followers, "log_deltas": args.replicas.log_deltas,
        "replica_parts": args.replicas.parts,
    })
}

/// parley's environment for this store.
pub(crate) fn parley_env(ctx: &Ctx, kind: StoreKind, echo_delay_ms: u64) -> Vec<(String, String)> {
    let a = &ctx.args;
    [
        ("PARLEY_STORE", store_name(kind).to_owned()),
        ("PARLEY_ECHO_DELAY_MS", echo_delay_ms.to_string()),
        ("PARLEY_MODEL_PROVIDER", "echo".to_owned()),
        ("PARLEY_LOG", "info".to_owned()),
        ("PARLEY_SHUTDOWN_GRACE", "1s".to_owned()),
        ("PARLEY_PIN_WORKERS", a.pin_workers.contains(&kind).to_string()),
        ("PARLEY_DISABLE_THP", a.disable_thp.to_string()),
        // The memory store keeps 10,000 messages per session by default; figure 4 needs more.
        ("PARLEY_MEMORY_MAX_MESSAGES", (a.growth_messages + 100_000).to_string()),
        ("PARLEY_REDIS_PREFIX", ctx.tag.clone()),
        ("PARLEY_PG_SCHEMA", ctx.tag.clone()),
        ("PARLEY_SQLITE_PATH", sqlite_path(ctx).display().to_string()),
        ("REDIS_URL", a.redis_url.clone()),
        ("DATABASE_URL", a.database_url.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// `env` with each of `set` replacing the variable of its name, or added.
pub(crate) fn with_env(mut env: Vec<(String, String)>, set: &[(&str, &str)]) -> Vec<(String, String)> {
    for &(key, value) in set {
        env.retain(|(k, _)| k != key);
        env.push((key.to_owned(), value.to_owned()));
    }
    env
}

async fn start_parley(ctx: &Ctx, kind: StoreKind, echo_delay_ms: u64, what: &str) -> anyhow::Result<Server> {
    start_parley_env(ctx, kind, parley_env(ctx, kind, echo_delay_ms), what).await
}

/// Starts parley with `env`, logging to `target/bench-logs/parley-<store>-<what>.log`.
pub(crate) async fn start_parley_env(
    ctx: &Ctx,
    kind: StoreKind,
    env: Vec<(String, String)>,
    what: &str,
) -> anyhow::Result<Server> {
    let log = ctx.logs.join(format!("parley-{}-{what}.log", store_name(kind)));
    Server::start("parley", &ctx.args.parley_bin, &[], &env, &log, "/readyz").await
}

async fn bench_store(ctx: &Ctx, kind: StoreKind, out: &mut StoreFigures) -> anyhow::Result<()> {
    let a = &ctx.args;
    let body = setup::turn_body(CONTENT);
    if a.wants(1) || a.wants(3) || a.wants(4) {
        turn_figures(ctx, kind, out, &body).await?;
    }
    if a.wants(7) && kind == StoreKind::Memory {
        eprintln!("[bench] figure 7: turns with metrics on and off");
        // A 3 % difference is within one run's noise here: twice as many pairs as other
        // figures, each half as long, and the median of the per-pair ratios.
        let plan = Plan { duration: Duration::from_secs_f64(a.duration / 2.0), ..a.plan() };
        out.metrics_cost = Some(on_off(ctx, kind, "PARLEY_METRICS", false, a.runs * 2, plan).await?);
    }
    if a.wants(5) {
        eprintln!("[bench] figure 5a: stream overhead");
        out.stream_overhead = Some(stream_probe(ctx, kind, false, Dialect::Native, a.runs, &[]).await?);
        eprintln!("[bench] figure 5a: stream overhead through the AI SDK dialect");
        out.stream_overhead_ai_sdk = Some(stream_probe(ctx, kind, false, Dialect::AiSdk, a.runs, &[]).await?);
        eprintln!("[bench] figure 5a: stream overhead through the openai provider");
        out.stream_overhead_upstream =
            Some(stream_probe(ctx, kind, true, Dialect::Native, a.runs, &[]).await?);
        eprintln!("[bench] figure 5b: {} open streams", a.streams);
        let parley = start_parley(ctx, kind, 1000, "streams").await?;
        let result = streams::open_streams(&parley, a.streams).await;
        parley.stop(Duration::from_secs(3)).await;
        out.open_streams = Some(result?);
    }
    if a.wants(8) && matches!(kind, StoreKind::Redis | StoreKind::Postgres) {
        out.replicas = Some(crate::replicas::figure(ctx, kind).await?);
    }
    Ok(())
}

/// Figures 1 to 4, on one parley.
async fn turn_figures(
    ctx: &Ctx,
    kind: StoreKind,
    out: &mut StoreFigures,
    body: &Bytes,
) -> anyhow::Result<()> {
    let a = &ctx.args;
    let parley = start_parley(ctx, kind, 0, "turns").await?;
    let sessions: Vec<String> = (0..a.sessions).map(|i| format!("bench-{i:05}")).collect();
    setup::create_sessions(parley.addr, &sessions, 64).await?;
    if a.wants(1) {
        eprintln!("[bench] figures 1-2: turns against the floor");
        out.turns = Some(turns_vs_floor(ctx, kind, &parley, &sessions, body).await?);
    }
    if a.wants(3) {
        eprintln!("[bench] figure 3: history reads");
        setup::top_up(parley.addr, &sessions, 50, body).await?;
        let mut workers = load::read_workers(parley.addr, a.clients, &sessions, 50);
        timed(&mut workers, warm_up()).await;
        for _ in 0..a.runs {
            out.reads_runs.push(timed(&mut workers, a.plan()).await);
        }
        out.reads = Some(median_summary(&out.reads_runs));
    }
    if a.wants(4) {
        eprintln!("[bench] figure 4: growth");
        out.growth = Some(growth_figure(ctx, kind, &parley, body).await?);
    }
    parley.stop(Duration::from_secs(5)).await;
    Ok(())
}

fn warm_up() -> Plan {
    Plan { duration: Duration::from_secs(1), max_per_worker: 1_000_000 }
}

/// Runs `workers` once under `plan`, keeping them (and their connections) for the next run.
async fn timed<W: Worker>(workers: &mut Vec<W>, plan: Plan) -> Summary {
    let (summary, back) = closed_loop(std::mem::take(workers), plan).await;
    *workers = back;
    summary
}

/// The floor of figure 2 for one store.
enum Floor {
    Axum(Box<Server>, Vec<load::HttpWorker>),
    Redis(Vec<RedisReplay>),
    Postgres(Vec<PgReplay>),
    Sqlite(Vec<SqliteReplay>),
}

impl Floor {
    async fn run(&mut self, plan: Plan) -> Summary {
        match self {
            Floor::Axum(_, w) => timed(w, plan).await,
            Floor::Redis(w) => timed(w, plan).await,
            Floor::Postgres(w) => timed(w, plan).await,
            Floor::Sqlite(w) => timed(w, plan).await,
        }
    }
}

async fn build_floor(
    ctx: &Ctx,
    kind: StoreKind,
    parley: &Server,
    sessions: &[String],
    body: &Bytes,
    fig: &mut TurnFigures,
) -> anyhow::Result<Floor> {
    let a = &ctx.args;
    match kind {
        StoreKind::Sqlite => {
            fig.commands = [
                "begin immediate; session state, lock row, take lock, running record, last 20; commit",
                "begin immediate; session state, fence, 2 messages, completed record, release, counters; commit",
            ]
            .map(String::from)
            .to_vec();
            fig.commands_per_turn = Some(16);
            fig.floor_kind =
                "raw sqlx client sending the turn's statements in its 2 write transactions (2d)".into();
            let path = ctx.logs.join(format!("{}-floor.db", ctx.tag));
            let writer = SqliteReplay::open(&path, sessions).await?;
            Ok(Floor::Sqlite(SqliteReplay::workers(&writer, a.clients, sessions, CONTENT)))
        }
        StoreKind::Memory => {
            fig.floor_kind = "bare axum: parse the same JSON, answer as many bytes (2a)".into();
            let args = [
                "floor-server".to_owned(),
                format!("--body-bytes={}", fig.response_bytes),
                format!("--pin-workers={}", a.pin_workers.contains(&kind)),
                format!("--disable-thp={}", a.disable_thp),
            ];
            let log = ctx.logs.join("floor-server.log");
            let server = Server::start("floor server", &ctx.me, &args, &[], &log, "/readyz").await?;
            let workers = load::turn_workers(server.addr, a.clients, sessions, body);
            Ok(Floor::Axum(Box::new(server), workers))
        }
        StoreKind::Redis => {
            let commands = floor::capture_redis_turn(&a.redis_url, parley.addr, body).await?;
            fig.commands = commands.iter().map(|c| String::from_utf8_lossy(&c[0]).into_owned()).collect();
            fig.commands_per_turn = Some(commands.len());
            fig.floor_kind = "raw client replaying the turn's captured Redis commands (2b)".into();
            let workers = RedisReplay::workers(&a.redis_url, 32, a.clients, sessions, &commands).await?;
            Ok(Floor::Redis(workers))
        }
        StoreKind::Postgres => {
            fig.commands = ["BEGIN_TURN (claim, running record, last 20)", "FINISH_TURN (append, release)"]
                .map(String::from)
                .to_vec();
            fig.commands_per_turn = Some(2);
            fig.floor_kind = "raw sqlx client sending the turn's 2 statements (2c)".into();
            let options = <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(&a.database_url)?
                .options([("search_path", ctx.tag.as_str())]);
            // Pooled like parley's: its own pool, 16 connections (`parley::store::postgres::pool`).
            let wait = Duration::from_secs(10);
            let pool = parley::store::postgres::ConnPool::new(options, 16, wait, wait);
            Ok(Floor::Postgres(PgReplay::workers(&pool, a.clients, sessions, CONTENT)))
        }
    }
}

/// Figures 1 and 2: parley and its floor, alternating (floor first in even runs, parley first
/// in odd ones), each figure the median of the runs, the ratio the median of per-run ratios.
async fn turns_vs_floor(
    ctx: &Ctx,
    kind: StoreKind,
    parley: &Server,
    sessions: &[String],
    body: &Bytes,
) -> anyhow::Result<TurnFigures> {
    let a = &ctx.args;
    let mut fig = TurnFigures::default();
    let sample = Client::new(parley.addr)
        .call_ok(Method::POST, &format!("/v1/sessions/{}/messages", sessions[0]), Some(body.clone()))
        .await?;
    fig.response_bytes = sample.len();
    let mut floor = build_floor(ctx, kind, parley, sessions, body, &mut fig).await?;
    let mut turns = load::turn_workers(parley.addr, a.clients, sessions, body);
    floor.run(warm_up()).await;
    timed(&mut turns, warm_up()).await;
    for run in 0..a.runs {
        let (f, p) = if run % 2 == 0 {
            let f = floor.run(a.plan()).await;
            (f, timed(&mut turns, a.plan()).await)
        } else {
            let p = timed(&mut turns, a.plan()).await;
            (floor.run(a.plan()).await, p)
        };
        eprintln!(
            "[bench]   run {run}: parley {:.0}/s (p99 {:.2} ms), floor {:.0}/s",
            p.per_sec, p.p99_ms, f.per_sec
        );
        fig.parley_runs.push(p);
        fig.floor_runs.push(f);
    }
    fig.parley = median_summary(&fig.parley_runs);
    fig.floor = median_summary(&fig.floor_runs);
    fig.ratio =
        median(fig.parley_runs.iter().zip(&fig.floor_runs).map(|(p, f)| p.per_sec / f.per_sec.max(1e-9)));
    if let Floor::Axum(server, _) = floor {
        server.stop(Duration::from_secs(2)).await;
    }
    Ok(fig)
}

/// Two parley processes that differ in one setting (`var`, true or false), the same turn load
/// (streamed or not) alternating between them, `pairs` times (off first in even pairs). Each has
/// sessions of its own, so that both can share a store. Figure 7 (`PARLEY_METRICS`) and 8c
/// (`PARLEY_EVENT_LOG`).
pub(crate) async fn on_off(
    ctx: &Ctx,
    kind: StoreKind,
    var: &str,
    streamed: bool,
    pairs: usize,
    plan: Plan,
) -> anyhow::Result<OnOff> {
    let a = &ctx.args;
    let label = var.trim_start_matches("PARLEY_").to_lowercase().replace('_', "-");
    let body = setup::turn_body(CONTENT);
    let start = |on: bool| {
        let env = with_env(parley_env(ctx, kind, 0), &[(var, if on { "true" } else { "false" })]);
        let what = format!("{label}-{}", if on { "on" } else { "off" });
        async move { start_parley_env(ctx, kind, env, &what).await }
    };
    let workers = |server: &Server, side: &str| {
        let sessions: Vec<String> = (0..a.sessions).map(|i| format!("{label}-{side}-{i:05}")).collect();
        let addr = server.addr;
        let body = body.clone();
        async move {
            setup::create_sessions(addr, &sessions, 64).await?;
            let mut w = if streamed {
                load::streamed_turn_workers(addr, a.clients, &sessions, &body)
            } else {
                load::turn_workers(addr, a.clients, &sessions, &body)
            };
            timed(&mut w, warm_up()).await;
            anyhow::Ok(w)
        }
    };
    let (on, off) = (start(true).await?, start(false).await?);
    let mut on_workers = workers(&on, "on").await?;
    let mut off_workers = workers(&off, "off").await?;
    let mut fig = OnOff::default();
    for run in 0..pairs {
        let (with, without) = if run % 2 == 0 {
            let without = timed(&mut off_workers, plan).await;
            (timed(&mut on_workers, plan).await, without)
        } else {
            let with = timed(&mut on_workers, plan).await;
            (with, timed(&mut off_workers, plan).await)
        };
        eprintln!("[bench]   run {run}: {label} on {:.0}/s, off {:.0}/s", with.per_sec, without.per_sec);
        fig.on_runs.push(with);
        fig.off_runs.push(without);
    }
    fig.on = median_summary(&fig.on_runs);
    fig.off = median_summary(&fig.off_runs);
    fig.ratio = median(fig.on_runs.iter().zip(&fig.off_runs).map(|(w, wo)| w.per_sec / wo.per_sec.max(1e-9)));
    fig.ratio_of_medians = fig.on.per_sec / fig.off.per_sec.max(1e-9);
    on.stop(Duration::from_secs(3)).await;
    off.stop(Duration::from_secs(3)).await;
    Ok(fig)
}

async fn growth_figure(
    ctx: &Ctx,
    kind: StoreKind,
    parley: &Server,
    body: &Bytes,
) -> anyhow::Result<growth::Growth> {
    let a = &ctx.args;
    let small = growth::small_ids(a.runs * a.growth_pairs);
    let mut ids = small.clone();
    ids.push(growth::BIG.to_owned());
    setup::create_sessions(parley.addr, &ids, 64).await?;
    setup::post_turns(parley.addr, small.into_iter().map(|s| (s, 5)).collect(), body, 64).await?;
    match kind {
        // parley holds the SQLite file (its `.lock`): fill it through parley too.
        StoreKind::Memory | StoreKind::Sqlite => {
            growth::seed_big_over_http(parley.addr, a.growth_messages, body).await?
        }
        _ => {
            let store = parley::app::build_store(&store_config(ctx, kind)?).await?;
            growth::seed_big_in_store(store.history(), a.growth_messages, CONTENT).await?;
        }
    }
    let runs = growth::measure(parley.addr, a.runs, a.growth_pairs, body).await?;
    Ok(growth::summarise(a.growth_messages, 10, runs))
}

/// The configuration parley runs with, for opening its store from here.
fn store_config(ctx: &Ctx, kind: StoreKind) -> anyhow::Result<parley::config::Config> {
    let a = &ctx.args;
    let args = [
        "parley",
        "--store",
        store_name(kind),
        "--redis-url",
        &a.redis_url,
        "--redis-prefix",
        &ctx.tag,
        "--database-url",
        &a.database_url,
        "--pg-schema",
        &ctx.tag,
        "--store-timeout",
        "60s",
    ];
    Ok(Cli::try_parse_from(args)?.config)
}

/// Echo delay per word while measuring stream overhead.
const PROBE_DELAY_MS: u64 = 20;

/// Figure 5a: with the echo model, or (`upstream`) with the openai provider against the probe's
/// OpenAI-compatible upstream; in parley's own events or in a client dialect's; `runs` runs, in a
/// probe process of its own whose parley has the store's environment with `env` set.
pub(crate) async fn stream_probe(
    ctx: &Ctx,
    kind: StoreKind,
    upstream: bool,
    dialect: Dialect,
    runs: usize,
    env: &[(&str, &str)],
) -> anyhow::Result<ProbeResult> {
    let a = &ctx.args;
    let mut args = vec![
        "stream-probe".to_owned(),
        format!("--clients={}", a.clients),
        format!("--delay-ms={PROBE_DELAY_MS}"),
        format!("--duration={}", a.duration),
        format!("--runs={runs}"),
    ];
    if upstream {
        args.push("--upstream".to_owned());
    }
    if dialect == Dialect::AiSdk {
        args.push("--dialect=ai-sdk".to_owned());
    }
    child_json(ctx, &args, &with_env(parley_env(ctx, kind, 0), env)).await
}

async fn footprint(ctx: &Ctx) -> anyhow::Result<Footprint> {
    eprintln!("[bench] figure 6: memory store footprint");
    let args = ["footprint".to_owned(), format!("--messages={}", ctx.args.footprint_messages)];
    child_json(ctx, &args, &[]).await
}

/// Runs a subcommand of this binary and parses the JSON it prints.
async fn child_json<T: DeserializeOwned>(
    ctx: &Ctx,
    args: &[String],
    env: &[(String, String)],
) -> anyhow::Result<T> {
    let output = Command::new(&ctx.me)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .kill_on_drop(true)
        .output()
        .await?;
    if !output.status.success() {
        bail!("{} failed: {}", args[0], String::from_utf8_lossy(&output.stderr));
    }
    serde_json::from_slice(&output.stdout).with_context(|| format!("output of {}", args[0]))
}

/// parley's SQLite database for this run.
fn sqlite_path(ctx: &Ctx) -> PathBuf {
    ctx.logs.join(format!("{}-parley.db", ctx.tag))
}

/// Drops what the run stored: the Redis keys under the run's prefix, the run's schema, the run's
/// SQLite files (parley's and the floor's).
async fn cleanup(ctx: &Ctx, kind: StoreKind) {
    let result = match kind {
        StoreKind::Memory => Ok(()),
        StoreKind::Sqlite => {
            for db in [sqlite_path(ctx), ctx.logs.join(format!("{}-floor.db", ctx.tag))] {
                for suffix in ["", "-wal", "-shm", ".lock"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
                }
            }
            Ok(())
        }
        StoreKind::Redis => drop_redis_keys(&ctx.args.redis_url, &ctx.tag).await,
        StoreKind::Postgres => drop_schema(&ctx.args.database_url, &ctx.tag).await,
    };
    if let Err(e) = result {
        eprintln!("[bench] cleanup of {}: {e:#}", store_name(kind));
    }
}

pub(crate) async fn drop_redis_keys(url: &str, prefix: &str) -> anyhow::Result<()> {
    use deadpool_redis::redis::{self, AsyncCommands};
    let mut conn = redis::Client::open(url)?.get_multiplexed_async_connection().await?;
    let mut keys: Vec<String> = Vec::new();
    {
        let mut iter = conn.scan_match::<_, String>(format!("{prefix}:*")).await?;
        while let Some(key) = futures::StreamExt::next(&mut iter).await {
            keys.push(key?);
        }
    }
    for chunk in keys.chunks(1000) {
        redis::cmd("UNLINK").arg(chunk).query_async::<()>(&mut conn).await?;
    }
    Ok(())
}

pub(crate) async fn drop_schema(url: &str, schema: &str) -> anyhow::Result<()> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await?;
    // The schema name is `bench_<pid>` (figure 8e: `bench_<pid>_log`): a plain identifier.
    let sql = format!("drop schema if exists \"{schema}\" cascade");
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await?;
    Ok(())
}

fn machine() -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_default();
    let mem_kb: f64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").and_then(|v| v.split_whitespace().next()?.parse().ok()))
        .unwrap_or(0.0);
    let git = std::process::Command::new("git")
        // "-dirty" when the working tree has changes: the figures are then not of that commit.
        .args(["describe", "--always", "--dirty", "--abbrev=7"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    Machine {
        date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu,
        memory_gib: mem_kb / 1024.0 / 1024.0,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
        git,
        command: std::env::args().collect::<Vec<_>>().join(" "),
    }
}

/// Options of `parley-bench load`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// parley's address (loopback only).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: std::net::SocketAddr,
    /// `turns` or `reads`.
    #[arg(long, default_value = "turns")]
    pub what: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Sessions (created when missing).
    #[arg(long, default_value_t = 1000)]
    pub sessions: usize,
    /// Seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
}

/// Drives an already running parley and prints the summary (for profiling).
pub async fn load(args: LoadArgs) -> anyhow::Result<()> {
    let sessions: Vec<String> = (0..args.sessions).map(|i| format!("load-{i:05}")).collect();
    setup::for_each(args.addr, sessions.clone(), 16, |mut client, id| async move {
        let body = Bytes::from(format!("{{\"id\":\"{id}\"}}"));
        client.call(Method::POST, "/v1/sessions", Some(body)).await?;
        Ok(client)
    })
    .await?;
    let plan = Plan { duration: Duration::from_secs_f64(args.duration), max_per_worker: 10_000_000 };
    let body = setup::turn_body(CONTENT);
    let mut workers = match args.what.as_str() {
        "reads" => load::read_workers(args.addr, args.clients, &sessions, 50),
        _ => load::turn_workers(args.addr, args.clients, &sessions, &body),
    };
    let summary = timed(&mut workers, plan).await;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
