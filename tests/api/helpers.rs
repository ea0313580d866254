//! Shared test helpers: `spawn_app()` starts parley on a free port with the chosen store and model,
//! and `TestApp` has typed helpers for the API. Environment requirements fail loudly.
#![allow(dead_code, reason = "each test module uses a different subset")]

use std::sync::Arc;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use parley::agent::TurnStore;
use parley::config::{Cli, Config};
use parley::llm::DynModel;
use parley::store::memory::MemoryStore;
use parley::store::postgres::{PgOptions, PgStore};
use parley::store::redis::RedisStore;
use parley::store::sqlite::{SqliteOptions, SqliteStore};
use parley::store::{DynCoordinator, DynStore};
use parley::tools::ToolRegistry;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The value of a variable a test needs; fails the test, naming the variable, when it is unset.
pub fn require_env(var: &str, what: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!(
            "{var} is not set: this test needs {what}. Run the suite with `scripts/test`, which starts \
             the services and exports {var}, or set {var} yourself."
        ),
    }
}

/// The Redis URL the tests use (`REDIS_URL`).
pub fn redis_url() -> String {
    require_env("REDIS_URL", "a running Redis (e.g. redis://127.0.0.1:6379)")
}

/// The PostgreSQL URL the tests use (`DATABASE_URL`).
pub fn database_url() -> String {
    require_env("DATABASE_URL", "a running PostgreSQL (e.g. postgres://postgres@127.0.0.1:5432/postgres)")
}

/// A short unique name for isolating a test's data (key prefix, schema).
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

/// Installs the TLS crypto provider reqwest needs (once per process).
pub fn install_crypto() {
    parley::llm::openai::install_crypto_provider();
}

/// Which store a test app runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The in-memory store.
    Memory,
    /// Redis, under a fresh key prefix (needs `REDIS_URL`).
    Redis,
    /// PostgreSQL, on a fresh schema (needs `DATABASE_URL`).
    Postgres,
    /// SQLite, on a fresh database file ([`fresh_sqlite_path`]).
    Sqlite,
}

/// A fresh database file path in its own folder under the test binary's temporary folder
/// (`CARGO_TARGET_TMPDIR`). Folders older than ten minutes (earlier runs') are removed first, so
/// no running test loses its file.
pub fn fresh_sqlite_path() -> std::path::PathBuf {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("sqlite");
    SWEPT.call_once(|| {
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(600);
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            if entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t < old) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    });
    let dir = root.join(unique_name("db"));
    std::fs::create_dir_all(&dir).expect("create the test database folder");
    dir.join("parley.db")
}

/// A SQLite store on this file.
pub async fn sqlite_store_at(path: &std::path::Path) -> SqliteStore {
    let options = SqliteOptions {
        path: path.to_owned(),
        readers: 2,
        max_messages: None,
        ttl: None,
        op_timeout: std::time::Duration::from_secs(10),
    };
    SqliteStore::open(options).await.expect("open the SQLite store")
}

/// A SQLite store on a fresh file.
pub async fn sqlite_store(max_messages: Option<usize>, ttl: Option<std::time::Duration>) -> Arc<SqliteStore> {
    let options = SqliteOptions {
        path: fresh_sqlite_path(),
        readers: 4,
        max_messages,
        ttl,
        op_timeout: std::time::Duration::from_secs(10),
    };
    Arc::new(SqliteStore::open(options).await.expect("open the SQLite store"))
}

impl Backend {
    /// A fresh, isolated store of this kind, coordinating its own turns (fused).
    pub async fn store(self, config: &Config) -> TurnStore {
        match self {
            Backend::Memory => TurnStore::fused(Arc::new(MemoryStore::new(config.store.memory_max_messages))),
            Backend::Redis => {
                let mut options = parley::app::redis_options(config);
                options.url = redis_url();
                options.prefix = unique_name("parley_test");
                options.pool_size = 4;
                TurnStore::fused(Arc::new(RedisStore::new(options).expect("redis store")))
            }
            Backend::Postgres => {
                let store = PgStore::new(PgOptions {
                    url: database_url(),
                    pool_size: 4,
                    schema: Some(unique_name("t")),
                    max_messages: None,
                    ttl: None,
                    op_timeout: std::time::Duration::from_secs(10),
                })
                .expect("postgres store");
                store.migrate().await.expect("migrate");
                TurnStore::fused(Arc::new(store))
            }
            Backend::Sqlite => {
                TurnStore::fused(sqlite_store(Some(config.store.max_messages).filter(|&m| m > 0), None).await)
            }
        }
    }
}

impl Backend {
    /// Flags that make the rate limiter count where this backend keeps its data: Redis (under a
    /// fresh prefix) for Redis, memory otherwise.
    pub fn limiter_args(self) -> Vec<String> {
        match self {
            Backend::Redis => {
                vec!["--store".into(), "redis".into(), "--redis-prefix".into(), unique_name("parley_test_rl")]
            }
            Backend::Memory | Backend::Postgres | Backend::Sqlite => Vec::new(),
        }
    }
}

/// The API key of tenant `acme` in [`two_tenants`].
pub const KEY_A: &str = "pk_keya_0123456789abcdef0123456789abcdef";
/// The API key of tenant `globex` in [`two_tenants`].
pub const KEY_B: &str = "pk_keyb_fedcba9876543210fedcba9876543210";

/// Flags for API-key authentication with two tenants: `acme` ([`KEY_A`]) and `globex` ([`KEY_B`]).
pub fn two_tenants() -> Vec<String> {
    let keys = format!("acme:{KEY_A},globex:{KEY_B}");
    vec!["--auth".into(), "api_key".into(), "--api-keys".into(), keys]
}

/// Parses flags as the binary would (environment variables apply too).
pub fn config(args: &[&str]) -> Config {
    let mut all = vec!["parley", "--addr", "127.0.0.1:0"];
    all.extend_from_slice(args);
    use clap::Parser;
    Cli::try_parse_from(all).expect("valid test flags").config
}

/// A running parley.
pub struct TestApp {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// A client for it.
    pub client: reqwest::Client,
    /// The history store it runs on.
    pub store: DynStore,
    /// The coordinator of its turns.
    pub coordinator: DynCoordinator,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

/// Options of [`spawn_app_with`].
#[derive(Default)]
pub struct Spawn {
    /// Flags, as on the command line.
    pub args: Vec<String>,
    /// A model to use instead of the configured one.
    pub model: Option<DynModel>,
    /// A store to use instead of a fresh memory store.
    pub store: Option<TurnStore>,
    /// Tools instead of the configured ones.
    pub tools: Option<ToolRegistry>,
}

/// Starts parley on the memory store and the echo model with these flags.
pub async fn spawn_app(args: &[&str]) -> TestApp {
    spawn_app_with(Spawn { args: args.iter().map(|s| s.to_string()).collect(), ..Spawn::default() }).await
}

/// Starts parley on a backend with these flags.
pub async fn spawn_app_on(backend: Backend, args: &[&str]) -> TestApp {
    let cfg = config(args);
    let store = backend.store(&cfg).await;
    spawn_app_with(Spawn {
        args: args.iter().map(|s| s.to_string()).collect(),
        store: Some(store),
        ..Spawn::default()
    })
    .await
}

/// Starts parley with full control over its parts.
pub async fn spawn_app_with(spawn: Spawn) -> TestApp {
    install_crypto();
    let args: Vec<&str> = spawn.args.iter().map(String::as_str).collect();
    let cfg = config(&args);
    cfg.validate().expect("valid test config");
    let store = match spawn.store {
        Some(store) => store,
        None => Backend::Memory.store(&cfg).await,
    };
    let model = match spawn.model {
        Some(model) => model,
        None => parley::app::build_model(&cfg).expect("model"),
    };
    let tools = match spawn.tools {
        Some(tools) => tools,
        None => parley::app::build_tools(&cfg).expect("tools"),
    };
    let (history, coordinator) = (Arc::clone(store.history()), Arc::clone(store.coordinator()));
    let state = parley::app::state_from_parts(&cfg, store, model, tools).expect("app state");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    let grace = cfg.http.shutdown_grace;
    let server = tokio::spawn(async move {
        let shutdown = async move {
            let _ = rx.await;
        };
        parley::app::serve(listener, state, shutdown, grace).await.expect("serve");
    });
    TestApp {
        base,
        client: reqwest::Client::new(),
        store: history,
        coordinator,
        shutdown: Some(tx),
        server: Some(server),
    }
}

impl TestApp {
    /// The full URL of a path.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Starts the graceful shutdown and returns the server task.
    pub fn begin_shutdown(&mut self) -> JoinHandle<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.server.take().expect("server running")
    }

    /// `POST /v1/sessions` with a body; returns the response.
    pub async fn create_session_with(&self, body: Value) -> reqwest::Response {
        self.client.post(self.url("/v1/sessions")).json(&body).send().await.expect("request")
    }

    /// Creates a session with this id and returns its JSON.
    pub async fn create_session(&self, id: &str) -> Value {
        let response = self.create_session_with(json!({ "id": id })).await;
        assert_eq!(response.status(), 201, "create session {id}");
        response.json().await.unwrap()
    }

    /// `GET` a path and return status and JSON body.
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self.client.get(self.url(path)).send().await.expect("request");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Posts a user turn (JSON answer); returns the response.
    pub async fn post_message_raw(&self, session: &str, body: Value) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/v1/sessions/{session}/messages")))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Posts a user turn and returns the turn JSON, asserting 200.
    pub async fn post_message(&self, session: &str, content: &str) -> Value {
        let response = self.post_message_raw(session, json!({ "content": content })).await;
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 200, "post message: {body}");
        body
    }

    /// Every message of a session, oldest first, read page by page.
    pub async fn history(&self, session: &str) -> Vec<Value> {
        let mut all = Vec::new();
        let mut path = format!("/v1/sessions/{session}/messages?limit=100");
        loop {
            let (status, page) = self.get_json(&path).await;
            assert_eq!(status, 200, "history: {page}");
            all.extend(page["data"].as_array().unwrap().iter().cloned());
            match page["next_cursor"].as_str() {
                Some(c) => path = format!("/v1/sessions/{session}/messages?limit=100&cursor={c}"),
                None => return all,
            }
        }
    }

    /// Posts a streamed turn and returns the open SSE response, asserting 200.
    pub async fn open_stream(&self, session: &str, content: &str) -> reqwest::Response {
        let response = self
            .client
            .post(self.url(&format!("/v1/sessions/{session}/messages")))
            .header("accept", "text/event-stream")
            .json(&json!({ "content": content }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response
    }

    /// Posts a streamed turn and collects every SSE event until the stream ends.
    pub async fn stream_turn(&self, session: &str, content: &str) -> Vec<SseEvent> {
        collect_events(self.open_stream(session, content).await).await
    }
}

impl TestApp {
    /// A caller that sends `Authorization: Bearer <key>` on every request.
    pub fn caller(&self, key: &str) -> Caller {
        let mut headers = reqwest::header::HeaderMap::new();
        let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}")).expect("header");
        headers.insert(reqwest::header::AUTHORIZATION, value);
        let client = reqwest::Client::builder().default_headers(headers).build().expect("client");
        Caller { base: self.base.clone(), client }
    }
}

/// One caller of a running parley, with its own API key.
pub struct Caller {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// A client that sends the caller's key.
    pub client: reqwest::Client,
}

impl Caller {
    /// The full URL of a path.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request with an optional JSON body.
    pub async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> reqwest::Response {
        let mut request = self.client.request(method, self.url(path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.expect("request")
    }

    /// `GET` a path and return status and JSON body.
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self.send(reqwest::Method::GET, path, None).await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Creates a session with this id, asserting 201.
    pub async fn create_session(&self, id: &str) -> Value {
        let response = self.send(reqwest::Method::POST, "/v1/sessions", Some(json!({ "id": id }))).await;
        assert_eq!(response.status(), 201, "create session {id}");
        response.json().await.unwrap()
    }

    /// Posts a user turn (JSON answer), asserting 200; returns the turn.
    pub async fn post_message(&self, session: &str, content: &str) -> Value {
        let path = format!("/v1/sessions/{session}/messages");
        let response = self.send(reqwest::Method::POST, &path, Some(json!({ "content": content }))).await;
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 200, "post message: {body}");
        body
    }

    /// Posts a streamed turn and returns the response as is (the stream open).
    pub async fn start_stream(&self, session: &str, content: &str) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/v1/sessions/{session}/messages")))
            .header("accept", "text/event-stream")
            .json(&json!({ "content": content }))
            .send()
            .await
            .expect("request")
    }
}

/// One received SSE event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    /// `event:` name.
    pub event: String,
    /// `id:`.
    pub id: String,
    /// `data:` parsed as JSON.
    pub data: Value,
}

/// Reads an SSE response to its end.
pub async fn collect_events(response: reqwest::Response) -> Vec<SseEvent> {
    let content_type = response.headers().get("content-type").unwrap().to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/event-stream"), "content type {content_type}");
    let mut stream = response.bytes_stream().eventsource();
    let mut events = Vec::new();
    while let Some(event) = stream.next().await {
        let event = event.expect("valid SSE");
        let data = serde_json::from_str(&event.data).expect("one line of JSON data");
        events.push(SseEvent { event: event.event, id: event.id, data });
    }
    events
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Starts `n` parley replicas sharing one fresh store of this backend.
pub async fn spawn_replicas(backend: Backend, n: usize, args: &[&str]) -> Vec<TestApp> {
    let store = backend.store(&config(args)).await;
    let mut apps = Vec::with_capacity(n);
    for _ in 0..n {
        let spawn = Spawn {
            args: args.iter().map(|s| s.to_string()).collect(),
            store: Some(store.clone()),
            ..Spawn::default()
        };
        apps.push(spawn_app_with(spawn).await);
    }
    apps
}

/// An SSE response's events as they come, each `data:` parsed as JSON (a stream that is not
/// valid SSE, or data that is not one line of JSON, fails the test).
pub fn sse_events(
    response: reqwest::Response,
) -> impl futures::Stream<Item = SseEvent> + Send + Unpin + 'static {
    response.bytes_stream().eventsource().map(|event| {
        let event = event.expect("valid SSE");
        let data = serde_json::from_str(&event.data).expect("one line of JSON data");
        SseEvent { event: event.event, id: event.id, data }
    })
}

/// The next event, waiting at most `within`.
pub async fn next_event(
    events: &mut (impl futures::Stream<Item = SseEvent> + Unpin),
    within: std::time::Duration,
) -> SseEvent {
    tokio::time::timeout(within, events.next())
        .await
        .unwrap_or_else(|_| panic!("no event within {within:?}"))
        .expect("the stream went on")
}

/// Every event until the stream ends, waiting at most `within` in all.
pub async fn rest_of(
    events: impl futures::Stream<Item = SseEvent> + Unpin,
    within: std::time::Duration,
) -> Vec<SseEvent> {
    tokio::time::timeout(within, events.collect())
        .await
        .unwrap_or_else(|_| panic!("the stream did not end within {within:?}"))
}
