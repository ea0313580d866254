//! Figure 5: streams.
//!
//! (a) Overhead: how long after the echo model yields its first delta the client has it. The
//! model's instant is only known inside parley, so `parley-bench stream-probe` runs parley's real
//! application (the configured store, `app::state_from_parts`, the real router, `app::serve`) on
//! its own runtime, with the echo model wrapped to note the instant it yields the first delta of
//! each turn; clients on another runtime of the same process read the SSE stream over TCP on
//! 127.0.0.1. The overhead is measured to two instants: when the bytes completing the
//! `message.delta` event reached the client's socket (the kernel's receive timestamp, see
//! [`crate::rxstamp`]; the figure), and when the client's read returned them. The first is what
//! parley adds: the agent loop, the event channel, SSE encoding, hyper and the write. The second
//! adds the load process's own wake-up: on 2 cores shared with a database, its thread can wait a
//! scheduler slice for a CPU after the bytes have arrived, a delay of the load generator's.
//!
//! (b) Memory: the real parley process holds N open streams (echo delay 1 s per word, replies of
//! ~45 words); resident memory once every stream has its `turn.started`, minus the resident
//! memory before they opened, divided by N.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use hyper::Method;
use parley::config::Config;
use parley::llm::echo::EchoModel;
use parley::llm::{ChatModel, ChatRequest, EchoSettings, ModelError, ModelEvent, ModelStream};
use serde::{Deserialize, Serialize};

use crate::client::{Client, SseReader};
use crate::procs::Server;
use crate::setup;
use crate::stats::{Summary, median};

/// About how many deltas the echo model streams for a probe's message (its reply's words).
const REPLY_DELTAS: u64 = 10;

/// When each probe's first delta left the model, by probe tag: on the monotonic clock, and on the
/// real-time clock (ns since the Unix epoch) that the kernel's receive timestamps use.
pub type Stamps = Arc<Mutex<HashMap<String, (Instant, u64)>>>;

/// Now on the real-time clock, in ns since the Unix epoch.
pub fn realtime_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// The echo model, noting the instant it yields the first delta of each turn. The turn is
/// recognised by the first word of its user message (`probe-…`).
struct ProbeModel {
    echo: EchoModel,
    stamps: Stamps,
}

#[async_trait]
impl ChatModel for ProbeModel {
    fn name(&self) -> &str {
        "echo-probe"
    }

    async fn stream(&self, request: &ChatRequest) -> Result<ModelStream, ModelError> {
        let tag = request.messages.last().and_then(|m| m.content.split(' ').next()).map(str::to_owned);
        let inner = self.echo.stream(request).await?;
        let stamps = Arc::clone(&self.stamps);
        let mut tag = tag;
        Ok(inner
            .inspect(move |event| {
                if let Ok(ModelEvent::Delta(_)) = event
                    && let Some(tag) = tag.take()
                {
                    let at = (Instant::now(), realtime_ns());
                    stamps.lock().expect("stamps").insert(tag, at);
                }
            })
            .boxed())
    }
}

/// Options of `parley-bench stream-probe`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeArgs {
    /// Concurrent streaming clients.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Echo delay per word, in milliseconds.
    #[arg(long, default_value_t = 20)]
    pub delay_ms: u64,
    /// Seconds per run.
    #[arg(long, default_value_t = 3.0)]
    pub duration: f64,
    /// Runs (the figure is the median of their p99s).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Run parley's `openai` provider against an OpenAI-compatible upstream in this process,
    /// instead of the echo model, and measure from the upstream's first content chunk.
    #[arg(long)]
    pub upstream: bool,
    /// The stream's wire format: parley's own events, or the AI SDK's UI message stream
    /// (`POST /v1/ai-sdk/chat`).
    #[arg(long, value_enum, default_value_t = Dialect::Native)]
    pub dialect: Dialect,
}

/// A client dialect the probe can stream a turn in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dialect {
    /// `POST /v1/sessions/{id}/messages?stream=true`; the delta is `event: message.delta`.
    Native,
    /// `POST /v1/ai-sdk/chat`; the delta is a `text-delta` chunk.
    AiSdk,
}

/// What the probe measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProbeResult {
    /// Per run: first-delta overheads to the client's socket (p50/p99 in ms, `ok` = streams).
    pub runs: Vec<Summary>,
    /// Median over runs of the p50, to the client's socket.
    pub p50_ms: f64,
    /// Median over runs of the p99, to the client's socket.
    pub p99_ms: f64,
    /// Per run: the same to the client's read returning (with the load process's wake-up).
    pub read_runs: Vec<Summary>,
    /// Median over runs of the p50, to the client's read.
    pub read_p50_ms: f64,
    /// Median over runs of the p99, to the client's read.
    pub read_p99_ms: f64,
}

/// Runs the probe; parley's configuration comes from the environment like the service's own.
pub fn probe(args: &ProbeArgs) -> anyhow::Result<ProbeResult> {
    let stamps: Stamps = Arc::default();
    // parley's own process settings and runtime; the clients run on another runtime.
    let config = Config::from_env();
    if config.disable_thp {
        parley::runtime::disable_transparent_huge_pages()?;
    }
    let server_rt = parley::runtime::build(config.pin_workers)?;
    let client_rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let delay = Duration::from_millis(args.delay_ms);
    let model: parley::llm::DynModel = if args.upstream {
        // The upstream runs beside the clients, on their runtime: parley's is parley's alone.
        let upstream = client_rt
            .block_on(crate::upstream::start(Arc::clone(&stamps), crate::upstream::Pacing::fixed(delay)))?;
        let mut config = config;
        config.model.provider = parley::config::ModelProvider::Openai;
        config.model.openai_base_url = format!("http://{upstream}/v1");
        config.model.openai_api_key = Some("probe".to_owned());
        parley::app::build_model(&config)?
    } else {
        Arc::new(ProbeModel { echo: EchoModel::new(EchoSettings { delay }), stamps: Arc::clone(&stamps) })
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let addr = server_rt.block_on(start_parley(model, stop_rx))?;
    let result = client_rt.block_on(drive_probe(addr, args, stamps));
    let _ = stop_tx.send(());
    server_rt.shutdown_timeout(Duration::from_secs(2));
    result
}

async fn start_parley(
    model: parley::llm::DynModel,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> anyhow::Result<SocketAddr> {
    let config = Config::from_env();
    let store = parley::app::build_store(&config).await?;
    let tools = parley::app::build_tools(&config)?;
    let state = parley::app::state_from_parts(&config, store, model, tools)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let shutdown = async {
            let _ = stop.await;
        };
        if let Err(e) = parley::app::serve(listener, state, shutdown, Duration::from_secs(1)).await {
            eprintln!("probe server: {e:#}");
        }
    });
    Ok(addr)
}

async fn drive_probe(addr: SocketAddr, args: &ProbeArgs, stamps: Stamps) -> anyhow::Result<ProbeResult> {
    // Receive timestamps on, and kept on, before the first byte measured.
    let _stamping = crate::rxstamp::keep_stamping(Duration::from_secs(5)).await?;
    // Each probe process has sessions of its own: every form, and figure 8a's alternating
    // probes, run against the same store.
    let form = match (args.upstream, args.dialect) {
        (true, _) => "up",
        (false, Dialect::Native) => "echo",
        (false, Dialect::AiSdk) => "aisdk",
    };
    let pid = std::process::id();
    let sessions: Vec<String> = (0..args.clients).map(|i| format!("probe-{form}-{pid}-{i:03}")).collect();
    setup::create_sessions(addr, &sessions, 16).await?;
    // Warm-up: connections, the store's pools, the allocator.
    // Clients start spread over one turn: turns of equal length in a closed loop that all start
    // at once would start and end in lockstep for the whole run, 64 store writes at the same
    // instant, which no real traffic does.
    let spread = Duration::from_millis(args.delay_ms * REPLY_DELTAS);
    let dialect = args.dialect;
    probe_run(addr, &sessions, Duration::from_secs(1), &stamps, 0, spread, dialect).await?;
    let (mut runs, mut read_runs) = (Vec::new(), Vec::new());
    let duration = Duration::from_secs_f64(args.duration);
    for run in 1..=args.runs {
        let (to_socket, to_read) =
            probe_run(addr, &sessions, duration, &stamps, run, spread, dialect).await?;
        runs.push(Summary::of(to_socket, 0, duration));
        read_runs.push(Summary::of(to_read, 0, duration));
    }
    Ok(ProbeResult {
        p50_ms: median(runs.iter().map(|r| r.p50_ms)),
        p99_ms: median(runs.iter().map(|r| r.p99_ms)),
        read_p50_ms: median(read_runs.iter().map(|r| r.p50_ms)),
        read_p99_ms: median(read_runs.iter().map(|r| r.p99_ms)),
        runs,
        read_runs,
    })
}

/// Every client streams turns one after another until `duration` is over; returns the
/// first-delta overheads in microseconds, to the client's socket and to its read.
async fn probe_run(
    addr: SocketAddr,
    sessions: &[String],
    duration: Duration,
    stamps: &Stamps,
    run: usize,
    spread: Duration,
    dialect: Dialect,
) -> anyhow::Result<(Vec<u32>, Vec<u32>)> {
    let deadline = Instant::now() + duration;
    let count = sessions.len().max(1) as u32;
    let tasks: Vec<_> = sessions
        .iter()
        .enumerate()
        .map(|(k, session)| {
            let (session, stamps) = (session.clone(), Arc::clone(stamps));
            tokio::spawn(async move {
                tokio::time::sleep(spread * k as u32 / count).await;
                let mut client = Client::stamped(addr);
                let mut out = Vec::new();
                let mut i = 0u64;
                while Instant::now() < deadline && i < 100_000 {
                    let tag = format!("{session}-{run}-{i}");
                    out.push(one_probe(&mut client, &session, &tag, &stamps, dialect).await?);
                    i += 1;
                }
                Ok::<_, anyhow::Error>(out)
            })
        })
        .collect();
    let (mut to_socket, mut to_read) = (Vec::new(), Vec::new());
    for task in tasks {
        for (socket, read) in task.await.context("probe client panicked")?? {
            to_socket.push(socket);
            to_read.push(read);
        }
    }
    Ok((to_socket, to_read))
}

/// One streamed turn; its first delta's overhead in µs, to the client's socket and to its read.
async fn one_probe(
    client: &mut Client,
    session: &str,
    tag: &str,
    stamps: &Stamps,
    dialect: Dialect,
) -> anyhow::Result<(u32, u32)> {
    let text = format!("{tag} how are you today");
    let (path, body, delta) = match dialect {
        Dialect::Native => {
            (format!("/v1/sessions/{session}/messages?stream=true"), setup::turn_body(&text), "message.delta")
        }
        Dialect::AiSdk => {
            // What the AI SDK's `DefaultChatTransport` sends for a new user message.
            let body = serde_json::json!({
                "id": session,
                "trigger": "submit-message",
                "messages": [{"id": tag, "role": "user", "parts": [{"type": "text", "text": text}]}],
            });
            ("/v1/ai-sdk/chat".to_owned(), Bytes::from(serde_json::to_vec(&body)?), "text-delta")
        }
    };
    let response = client.send(Method::POST, &path, Some(body)).await?;
    if !response.status().is_success() {
        bail!("stream answered {}", response.status());
    }
    let mut reader = SseReader::new(response.into_body());
    let mut overhead = None;
    while let Some(event) = reader.next().await? {
        if event.name == delta && overhead.is_none() {
            let read = Instant::now();
            // The delta's bytes came in the client's last read: its receive timestamp is theirs.
            let arrived = client.last_rx_ns().context("no receive timestamp on the probe's socket")?;
            let (sent, sent_ns) =
                stamps.lock().expect("stamps").remove(tag).context("no model stamp for the probe")?;
            let to_socket = arrived.saturating_sub(sent_ns) / 1000;
            let to_read = read.saturating_duration_since(sent).as_micros();
            overhead = Some((to_socket as u32, to_read as u32));
        }
    }
    overhead.context("the stream had no delta")
}

/// What figure 5b measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OpenStreams {
    /// Streams asked for.
    pub streams: usize,
    /// Streams that had their `turn.started` and were still open when memory was read.
    pub open: usize,
    /// parley's resident memory before the streams, bytes.
    pub rss_before: u64,
    /// parley's resident memory with every stream open, bytes.
    pub rss_open: u64,
    /// (rss_open - rss_before) / open, bytes.
    pub per_stream_bytes: f64,
}

/// Opens `n` streams on fresh sessions of `server` and measures its resident memory.
pub async fn open_streams(server: &Server, n: usize) -> anyhow::Result<OpenStreams> {
    let addr = server.addr;
    let sessions: Vec<String> = (0..n).map(|i| format!("stream-{i:05}")).collect();
    setup::create_sessions(addr, &sessions, 64).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = server.rss()?;
    let held = Held::default();
    let tasks: Vec<_> = sessions
        .into_iter()
        .map(|session| {
            held.spawn(async move {
                let mut client = Client::new(addr);
                let path = format!("/v1/sessions/{session}/messages?stream=true");
                let response = client.send(Method::POST, &path, Some(slow_turn_body())).await.ok()?;
                let mut reader = SseReader::new(response.into_body());
                while reader.next().await.ok()??.name != "turn.started" {}
                Some((client, [reader]))
            })
        })
        .collect();
    held.wait_opened(n, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_open = server.rss()?;
    let open = held.open();
    for task in tasks {
        task.abort();
    }
    let per_stream_bytes = rss_open.saturating_sub(rss_before) as f64 / open.max(1) as f64;
    Ok(OpenStreams { streams: n, open, rss_before, rss_open, per_stream_bytes })
}

/// A streamed turn of the memory figures (5b, 8d): 40 words, about 45 s of stream with
/// `PARLEY_ECHO_DELAY_MS=1000`.
pub fn slow_turn_body() -> Bytes {
    setup::turn_body(&vec!["word"; 40].join(" "))
}

/// Streams held open for the memory figures (5b, 8d): how many opened, ended since, or failed
/// to open. At most 256 open at once, so that the server is not flooded with connections.
#[derive(Clone)]
pub struct Held {
    opening: Arc<tokio::sync::Semaphore>,
    opened: Arc<AtomicUsize>,
    ended: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
}

impl Default for Held {
    fn default() -> Self {
        Held {
            opening: Arc::new(tokio::sync::Semaphore::new(256)),
            opened: Arc::default(),
            ended: Arc::default(),
            failed: Arc::default(),
        }
    }
}

impl Held {
    /// Opens what `open` opens (`None`: it could not) and holds it, reading each of its streams
    /// to its end, until the task is aborted.
    pub fn spawn<C, Fut, const N: usize>(&self, open: Fut) -> tokio::task::JoinHandle<()>
    where
        Fut: Future<Output = Option<(C, [SseReader; N])>> + Send + 'static,
        C: Send + 'static,
    {
        let held = self.clone();
        tokio::spawn(async move {
            let permit = held.opening.acquire().await;
            let Some((_connections, readers)) = open.await else {
                held.failed.fetch_add(1, Ordering::SeqCst);
                return;
            };
            held.opened.fetch_add(1, Ordering::SeqCst);
            drop(permit);
            let drains =
                readers.map(|mut reader| async move { while let Ok(Some(_)) = reader.next().await {} });
            futures::future::join_all(drains).await;
            held.ended.fetch_add(1, Ordering::SeqCst);
        })
    }

    /// Held open now.
    pub fn open(&self) -> usize {
        self.opened.load(Ordering::SeqCst).saturating_sub(self.ended.load(Ordering::SeqCst))
    }

    /// Until `n` have opened or failed to, or `timeout`.
    pub async fn wait_opened(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let settled = || self.opened.load(Ordering::SeqCst) + self.failed.load(Ordering::SeqCst);
        while settled() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
