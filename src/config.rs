//! Configuration: one typed `Config`, loaded once from flags and environment variables.
//!
//! Every setting is a flag with an environment variable; `parley --help` lists them, and the README
//! has the table. Durations take humantime forms (`500ms`, `30s`, `7d`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::auth::key::Secret;
pub use crate::redact::redact_url;

/// Command line of the `parley` binary.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "parley",
    version,
    about = "A chat-session microservice: sessions, history and streamed agent replies."
)]
pub struct Cli {
    /// What to do; serves the API when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The service configuration.
    #[command(flatten)]
    pub config: Config,
}

/// Subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (the default).
    Serve,
    /// Apply the PostgreSQL migrations to DATABASE_URL and exit.
    Migrate,
    /// Print the OpenAPI document (as committed in openapi/openapi.json) and exit.
    Openapi,
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
}

/// `parley keys …`.
#[derive(Debug, Clone, Subcommand)]
pub enum KeysCommand {
    /// Generate a key: prints the key (once; only its hash is kept) and the entry to append to
    /// PARLEY_API_KEYS_FILE.
    New {
        /// The tenant the key acts for (`[A-Za-z0-9._:-]`, at most 64 characters).
        #[arg(long)]
        tenant: String,
        /// The key id (`[A-Za-z0-9-]`, at most 64 characters); 12 random hex digits when omitted.
        #[arg(long)]
        id: Option<String>,
        /// Print the entry for a JSON keys file instead of TOML.
        #[arg(long)]
        json: bool,
    },
}

/// How requests are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// No authentication: every caller acts for the `default` tenant.
    None,
    /// `Authorization: Bearer <API key>` on every `/v1` request; the key names the tenant.
    #[value(name = "api_key", alias = "api-key")]
    ApiKey,
}

/// Where rate limits are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LimiterKind {
    /// Redis with `PARLEY_STORE=redis`, memory otherwise.
    Auto,
    /// In this process: each replica counts alone.
    Memory,
    /// In Redis (`REDIS_URL`, `PARLEY_REDIS_PREFIX`): replicas share the counts.
    Redis,
}

/// Which conversation store to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// A SQLite file (`PARLEY_SQLITE_PATH`): one replica, durable. The default.
    Sqlite,
    /// In-process memory: one replica, nothing survives a restart.
    Memory,
    /// Redis, shared by replicas.
    Redis,
    /// PostgreSQL, shared by replicas.
    Postgres,
}

/// Which backend coordinates turns: their session locks and leases, cancel requests and
/// idempotency keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CoordinatorKind {
    /// The history store coordinates its own turns, with its fused one-round-trip paths. The
    /// default.
    Store,
    /// In-process memory: one replica.
    Memory,
    /// Redis (`REDIS_URL`, `PARLEY_REDIS_PREFIX`), shared by replicas.
    Redis,
}

/// Which model provider to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelProvider {
    /// The offline development model.
    Echo,
    /// An OpenAI-compatible chat-completions endpoint.
    Openai,
}

/// Which request field carries the reply's token limit (`PARLEY_MAX_TOKENS`) upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum MaxTokensParam {
    /// `max_completion_tokens` for OpenAI's and Azure OpenAI's own hosts, `max_tokens` elsewhere.
    #[default]
    Auto,
    /// `max_tokens`: what vLLM, Ollama, llama.cpp server and most compatible servers read.
    #[value(name = "max_tokens", alias = "max-tokens")]
    MaxTokens,
    /// `max_completion_tokens`: what OpenAI reads now (its reasoning models refuse `max_tokens`).
    #[value(name = "max_completion_tokens", alias = "max-completion-tokens")]
    MaxCompletionTokens,
}

/// What a turn does when another turn runs in its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum IfBusy {
    /// Answer 409 `turn_in_progress` with the running turn's id.
    #[default]
    Reject,
    /// Wait for the running turn (bounded by `PARLEY_IF_BUSY_TIMEOUT`), then run, in arrival order.
    Wait,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Parses a humantime duration (`30s`, `500ms`, `2h`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| e.to_string())
}

/// The whole service configuration.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "PARLEY_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "PARLEY_LOG", default_value = "info")]
    pub log: String,
    /// Log format.
    #[arg(long, env = "PARLEY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Export traces over OTLP/HTTP (protobuf) to this URL, used as is (end it with
    /// `/v1/traces`, e.g. `http://localhost:4318/v1/traces`). Off when unset.
    #[arg(long, env = "PARLEY_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of exported spans.
    #[arg(long, env = "PARLEY_OTLP_SERVICE_NAME", default_value = "parley")]
    pub otlp_service_name: String,
    /// Pin one runtime worker thread to each CPU parley may use (Linux). For a machine or an
    /// exclusive cpuset of parley's own; leave off where the CPUs are shared under a quota.
    #[arg(long, env = "PARLEY_PIN_WORKERS", default_value_t = false, action = clap::ArgAction::Set)]
    pub pin_workers: bool,
    /// Turn transparent huge pages off for parley's process (Linux), as Redis's `disable-thp`:
    /// the first write to each new 2 MiB of heap otherwise stalls a worker thread.
    #[arg(long, env = "PARLEY_DISABLE_THP", default_value_t = true, action = clap::ArgAction::Set)]
    pub disable_thp: bool,

    #[command(flatten)]
    /// Limits and the agent loop.
    pub agent: AgentConfig,
    #[command(flatten)]
    /// HTTP behaviour.
    pub http: HttpConfig,
    #[command(flatten)]
    /// The conversation store.
    pub store: StoreConfig,
    #[command(flatten)]
    /// The model.
    pub model: ModelConfig,
    #[command(flatten)]
    /// Authentication.
    pub auth: AuthConfig,
    #[command(flatten)]
    /// Rate limits and bounds on client input.
    pub limits: LimitsConfig,
}

/// Authentication.
#[derive(Debug, Clone, Args)]
pub struct AuthConfig {
    /// `none` or `api_key`. When unset: `none` on a loopback address; on any other address parley
    /// refuses to start until it is set.
    #[arg(long = "auth", env = "PARLEY_AUTH", value_enum)]
    pub mode: Option<AuthMode>,
    /// A TOML or JSON file of API keys: id, tenant, SHA-256 of the key, revoked.
    #[arg(long, env = "PARLEY_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Development keys as `tenant:key` pairs, comma-separated. Hashed at load, never logged.
    #[arg(long, env = "PARLEY_API_KEYS", hide_env_values = true, value_parser = parse_secret)]
    pub api_keys: Option<Secret>,
    /// How often PARLEY_API_KEYS_FILE is re-read, so that new and revoked keys apply without a
    /// restart; `0s` reads it at start-up only.
    #[arg(long, env = "PARLEY_API_KEYS_RELOAD", value_parser = parse_duration, default_value = "10s")]
    pub api_keys_reload: Duration,
}

/// Takes a secret without ever showing it (clap repeats invalid values in its errors, so none is
/// invalid here; the content is checked at load).
fn parse_secret(text: &str) -> Result<Secret, String> {
    Ok(Secret::new(text))
}

/// Rate limits and bounds on client input.
#[derive(Debug, Clone, Args)]
pub struct LimitsConfig {
    /// Requests per second per key on /v1; 0 is off. Unset: 100 with PARLEY_AUTH=api_key, else off.
    #[arg(long, env = "PARLEY_RATE_LIMIT_RPS")]
    pub rate_limit_rps: Option<u64>,
    /// Turns (POST …/messages) per minute per key; 0 is off. Unset: 120 with PARLEY_AUTH=api_key,
    /// else off.
    #[arg(long, env = "PARLEY_RATE_LIMIT_TURNS_PER_MIN")]
    pub rate_limit_turns_per_min: Option<u64>,
    /// The window of PARLEY_RATE_LIMIT_TURNS_PER_MIN (one minute; shorter in tests).
    #[arg(long, env = "PARLEY_RATE_LIMIT_TURNS_WINDOW", value_parser = parse_duration, default_value = "1m")]
    pub rate_limit_turns_window: Duration,
    /// Concurrent streams per key; 0 is off. Unset: 32 with PARLEY_AUTH=api_key, else off.
    #[arg(long, env = "PARLEY_MAX_STREAMS_PER_KEY")]
    pub max_streams_per_key: Option<u64>,
    /// Where limits are counted: `auto` (Redis with PARLEY_STORE=redis), `memory` or `redis`.
    #[arg(long, env = "PARLEY_RATE_LIMIT_STORE", value_enum, default_value = "auto")]
    pub rate_limit_store: LimiterKind,
    /// Largest metadata object, serialised, in bytes.
    #[arg(long, env = "PARLEY_MAX_METADATA_BYTES", default_value_t = 16 * 1024)]
    pub max_metadata_bytes: usize,
    /// Deepest nesting of metadata (the object itself is depth 1).
    #[arg(long, env = "PARLEY_MAX_METADATA_DEPTH", default_value_t = 8)]
    pub max_metadata_depth: usize,
    /// Most keys in a metadata object (top level).
    #[arg(long, env = "PARLEY_MAX_METADATA_KEYS", default_value_t = 64)]
    pub max_metadata_keys: usize,
    /// Most sessions one tenant may hold; 0 is unlimited.
    #[arg(long, env = "PARLEY_MAX_SESSIONS_PER_TENANT", default_value_t = 0)]
    pub max_sessions_per_tenant: u64,
}

/// The agent loop and input limits.
#[derive(Debug, Clone, Args)]
pub struct AgentConfig {
    /// How many past messages are sent to the model with each turn.
    #[arg(long, env = "PARLEY_HISTORY_SIZE", default_value_t = 20)]
    pub history_size: usize,
    /// System prompt for sessions that set none.
    #[arg(long, env = "PARLEY_SYSTEM_PROMPT")]
    pub system_prompt: Option<String>,
    /// Largest user message content, in bytes.
    #[arg(long, env = "PARLEY_MAX_CONTENT_BYTES", default_value_t = 32 * 1024)]
    pub max_content_bytes: usize,
    /// Most model calls with tools in one turn before a last call without tools forces an answer.
    #[arg(long, env = "PARLEY_MAX_ITERATIONS", default_value_t = 8)]
    pub max_iterations: usize,
    /// Append each completed tool round as soon as it ends, instead of the whole turn at the end.
    #[arg(long, env = "PARLEY_SAVE_ON_ITERATION", default_value_t = false, action = clap::ArgAction::Set)]
    pub save_on_iteration: bool,
    /// Longest a turn may run, model calls and tools included.
    #[arg(long, env = "PARLEY_TURN_TIMEOUT", value_parser = parse_duration, default_value = "5m")]
    pub turn_timeout: Duration,
    /// What a turn posted while another runs in the session does: `reject` (409) or `wait`.
    #[arg(long, env = "PARLEY_IF_BUSY", value_enum, default_value = "reject")]
    pub if_busy: IfBusy,
    /// Most messages `POST /v1/sessions/{id}/fork` copies; a larger fork answers 413.
    #[arg(long, env = "PARLEY_FORK_MAX_MESSAGES", default_value_t = 10_000)]
    pub fork_max_messages: usize,
    /// Longest a turn waits for the running one with `if_busy = wait`, before answering 409.
    #[arg(long, env = "PARLEY_IF_BUSY_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    pub if_busy_timeout: Duration,
    /// Lease of a turn's lock on its session, renewed every second while the turn runs; a turn
    /// whose replica died frees the session when the lease runs out.
    #[arg(long, env = "PARLEY_TURN_LEASE", value_parser = parse_duration, default_value = "15s")]
    pub turn_lease: Duration,
    /// How long an `Idempotency-Key` is remembered.
    #[arg(long, env = "PARLEY_IDEMPOTENCY_TTL", value_parser = parse_duration, default_value = "24h")]
    pub idempotency_ttl: Duration,
    /// How long a turn's event log is kept after its last event (Redis and PostgreSQL): any
    /// replica replays and follows a turn's stream from it until then.
    #[arg(long, env = "PARLEY_EVENT_TTL", value_parser = parse_duration, default_value = "1h")]
    pub event_ttl: Duration,
    /// Whether streamed turns log their events in Redis or PostgreSQL so that any replica serves
    /// their streams (`false`: only the replica running a turn streams it; others tell its end).
    #[arg(long, env = "PARLEY_EVENT_LOG", default_value_t = true, action = clap::ArgAction::Set)]
    pub event_log: bool,
    /// A JSON or TOML file declaring HTTP tools.
    #[arg(long, env = "PARLEY_TOOLS_FILE")]
    pub tools_file: Option<PathBuf>,
}

/// HTTP behaviour.
#[derive(Debug, Clone, Args)]
pub struct HttpConfig {
    /// Largest request body, in bytes.
    #[arg(long, env = "PARLEY_MAX_BODY_BYTES", default_value_t = 256 * 1024)]
    pub max_body_bytes: usize,
    /// Timeout of non-streaming requests other than turns.
    #[arg(long, env = "PARLEY_REQUEST_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    pub request_timeout: Duration,
    /// Interval of SSE keep-alive comments.
    #[arg(long, env = "PARLEY_SSE_KEEPALIVE", value_parser = parse_duration, default_value = "15s")]
    pub sse_keepalive: Duration,
    /// Origins allowed by CORS, comma-separated (`*` for any); none when empty.
    #[arg(long, env = "PARLEY_CORS_ORIGINS", value_delimiter = ',', default_value = "")]
    pub cors_origins: Vec<String>,
    /// Let browsers send credentials cross-origin (`Access-Control-Allow-Credentials`); refused
    /// with `*`.
    #[arg(long, env = "PARLEY_CORS_CREDENTIALS", default_value_t = false, action = clap::ArgAction::Set)]
    pub cors_credentials: bool,
    /// How long running turns may take to finish after SIGTERM before they are cancelled.
    #[arg(long, env = "PARLEY_SHUTDOWN_GRACE", value_parser = parse_duration, default_value = "30s")]
    pub shutdown_grace: Duration,
    /// Longest a client may take to send a request's head (request line and headers), counted
    /// from its first byte, or from the opening of a connection that sends nothing; the connection
    /// is closed after it.
    #[arg(long, env = "PARLEY_HEADER_READ_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    pub header_read_timeout: Duration,
    /// Longest a kept-alive connection may wait for its next request; a request in flight (a
    /// streaming turn included) keeps it busy, not idle.
    #[arg(long, env = "PARLEY_IDLE_TIMEOUT", value_parser = parse_duration, default_value = "60s")]
    pub idle_timeout: Duration,
    /// Most open client connections; past it, a new connection gets 503 `too_many_connections`
    /// and is closed. 0 is unlimited.
    #[arg(long, env = "PARLEY_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Serve the chat page at `/` (built into the binary).
    #[arg(long, env = "PARLEY_UI", default_value_t = true, action = clap::ArgAction::Set)]
    pub ui: bool,
    /// Count requests, turns, model and tool calls and store operations, export them in the
    /// Prometheus text format at `/metrics` (or on `PARLEY_METRICS_ADDR`), and log one line per
    /// request at `info`. Off by default: on, it costs a measurable share of a memory-store turn
    /// (bench/README.md).
    #[arg(long, env = "PARLEY_METRICS", default_value_t = false, action = clap::ArgAction::Set)]
    pub metrics: bool,
    /// Serve `/metrics` on a listener of its own at this address (say, a private interface)
    /// instead of the main one.
    #[arg(long, env = "PARLEY_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// On the main listener, serve `/metrics` without an API key (with `PARLEY_AUTH=api_key` it
    /// needs one otherwise, like any route).
    #[arg(long, env = "PARLEY_METRICS_PUBLIC", default_value_t = false, action = clap::ArgAction::Set)]
    pub metrics_public: bool,
    /// Add a `tenant` label to the request and turn counters (one series per tenant).
    #[arg(long, env = "PARLEY_METRICS_TENANT_LABEL", default_value_t = false, action = clap::ArgAction::Set)]
    pub metrics_tenant_label: bool,
}

/// The conversation store. `Debug` hides the passwords of the URLs.
#[derive(Clone, Args)]
pub struct StoreConfig {
    /// Which store keeps the history.
    #[arg(long = "store", env = "PARLEY_STORE", value_enum, default_value = "sqlite")]
    pub kind: StoreKind,
    /// Which backend coordinates turns; `store`: the history store itself.
    #[arg(long, env = "PARLEY_COORDINATOR", value_enum, default_value = "store")]
    pub coordinator: CoordinatorKind,
    /// Declares that several replicas share state; refuses to start with a non-distributed store
    /// or coordinator.
    #[arg(long, env = "PARLEY_DISTRIBUTED", default_value_t = false, action = clap::ArgAction::Set)]
    pub distributed: bool,
    /// Memory store: most messages kept per session (the oldest go first).
    #[arg(long, env = "PARLEY_MEMORY_MAX_MESSAGES", default_value_t = 10_000)]
    pub memory_max_messages: usize,
    /// SQLite: the database file (created if missing, with its `-wal`, `-shm` and `.lock` files).
    #[arg(long, env = "PARLEY_SQLITE_PATH", default_value = "parley.db")]
    pub sqlite_path: std::path::PathBuf,
    /// SQLite: read-only connections beside the one writer.
    #[arg(long, env = "PARLEY_SQLITE_READERS", default_value_t = 4)]
    pub sqlite_readers: u32,
    /// SQLite, Redis and PostgreSQL: most messages kept per session (the oldest go first); 0 keeps all.
    #[arg(long, env = "PARLEY_STORE_MAX_MESSAGES", default_value_t = 0)]
    pub max_messages: usize,
    /// SQLite, Redis and PostgreSQL: sessions idle this long expire (sliding on each write); off when unset.
    #[arg(long, env = "PARLEY_SESSION_TTL", value_parser = parse_duration)]
    pub session_ttl: Option<Duration>,
    /// Timeout of one store operation.
    #[arg(long, env = "PARLEY_STORE_TIMEOUT", value_parser = parse_duration, default_value = "5s")]
    pub store_timeout: Duration,
    /// Redis connection URL.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Redis key prefix.
    #[arg(long, env = "PARLEY_REDIS_PREFIX", default_value = "parley")]
    pub redis_prefix: String,
    /// Redis connection pool size.
    #[arg(long, env = "PARLEY_REDIS_POOL_SIZE", default_value_t = 32)]
    pub redis_pool_size: usize,
    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub database_url: String,
    /// PostgreSQL schema for parley's tables (created if missing); the server's search path when unset.
    #[arg(long, env = "PARLEY_PG_SCHEMA")]
    pub pg_schema: Option<String>,
    /// PostgreSQL connection pool size.
    #[arg(long, env = "PARLEY_PG_POOL_SIZE", default_value_t = 16)]
    pub pg_pool_size: u32,
}

/// The model. `Debug` hides the API key and any password in the base URL.
#[derive(Clone, Args)]
pub struct ModelConfig {
    /// Which provider answers turns.
    #[arg(long = "model-provider", env = "PARLEY_MODEL_PROVIDER", value_enum, default_value = "echo")]
    pub provider: ModelProvider,
    /// Base URL of the OpenAI-compatible API.
    #[arg(long, env = "OPENAI_BASE_URL", default_value = "https://api.openai.com/v1")]
    pub openai_base_url: String,
    /// API key for the OpenAI-compatible API (local servers need none). Never logged.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub openai_api_key: Option<String>,
    /// Model name sent upstream.
    #[arg(long = "model", env = "PARLEY_MODEL", default_value = "gpt-4o-mini")]
    pub name: String,
    /// Sampling temperature; the upstream default when unset.
    #[arg(long, env = "PARLEY_TEMPERATURE")]
    pub temperature: Option<f32>,
    /// Most tokens per model reply; the upstream default when unset.
    #[arg(long, env = "PARLEY_MAX_TOKENS")]
    pub max_tokens: Option<u32>,
    /// The request field that carries `PARLEY_MAX_TOKENS` upstream.
    #[arg(long, env = "PARLEY_MAX_TOKENS_PARAM", value_enum, default_value = "auto")]
    pub max_tokens_param: MaxTokensParam,
    /// Timeout to connect to the model endpoint.
    #[arg(id = "model_connect_timeout", long = "model-connect-timeout", env = "PARLEY_MODEL_CONNECT_TIMEOUT", value_parser = parse_duration, default_value = "5s")]
    pub connect_timeout: Duration,
    /// Timeout until the first chunk of a reply, and between two chunks.
    #[arg(id = "model_timeout", long = "model-timeout", env = "PARLEY_MODEL_TIMEOUT", value_parser = parse_duration, default_value = "60s")]
    pub request_timeout: Duration,
    /// Retries of a model call that failed before its first token (connect errors, 408, 429, 5xx).
    #[arg(long, env = "PARLEY_MODEL_MAX_RETRIES", default_value_t = 2)]
    pub max_retries: u32,
    /// Echo model: pause before each streamed word, in milliseconds.
    #[arg(long, env = "PARLEY_ECHO_DELAY_MS", default_value_t = 0)]
    pub echo_delay_ms: u64,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Destructured so that a new field cannot be forgotten here.
        let StoreConfig {
            kind,
            coordinator,
            distributed,
            memory_max_messages,
            sqlite_path,
            sqlite_readers,
            max_messages,
            session_ttl,
            store_timeout,
            redis_url,
            redis_prefix,
            redis_pool_size,
            database_url,
            pg_schema,
            pg_pool_size,
        } = self;
        f.debug_struct("StoreConfig")
            .field("kind", kind)
            .field("coordinator", coordinator)
            .field("distributed", distributed)
            .field("memory_max_messages", memory_max_messages)
            .field("sqlite_path", sqlite_path)
            .field("sqlite_readers", sqlite_readers)
            .field("max_messages", max_messages)
            .field("session_ttl", session_ttl)
            .field("store_timeout", store_timeout)
            .field("redis_url", &redact_url(redis_url))
            .field("redis_prefix", redis_prefix)
            .field("redis_pool_size", redis_pool_size)
            .field("database_url", &redact_url(database_url))
            .field("pg_schema", pg_schema)
            .field("pg_pool_size", pg_pool_size)
            .finish()
    }
}

impl std::fmt::Debug for ModelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Destructured so that a new field cannot be forgotten here.
        let ModelConfig {
            provider,
            openai_base_url,
            openai_api_key,
            name,
            temperature,
            max_tokens,
            max_tokens_param,
            connect_timeout,
            request_timeout,
            max_retries,
            echo_delay_ms,
        } = self;
        f.debug_struct("ModelConfig")
            .field("provider", provider)
            .field("openai_base_url", &redact_url(openai_base_url))
            .field("openai_api_key", &openai_api_key.as_ref().map(|_| crate::redact::REDACTED))
            .field("name", name)
            .field("temperature", temperature)
            .field("max_tokens", max_tokens)
            .field("max_tokens_param", max_tokens_param)
            .field("connect_timeout", connect_timeout)
            .field("request_timeout", request_timeout)
            .field("max_retries", max_retries)
            .field("echo_delay_ms", echo_delay_ms)
            .finish()
    }
}

impl Config {
    /// The configuration from the environment only (no flags), as tests and embedders build it.
    pub fn from_env() -> Self {
        Cli::parse_from(["parley"]).config
    }

    /// Checks settings that depend on each other; the message names the fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.store.distributed && matches!(self.store.kind, StoreKind::Memory | StoreKind::Sqlite) {
            let kind = if self.store.kind == StoreKind::Memory { "memory" } else { "sqlite" };
            return Err(format!(
                "PARLEY_DISTRIBUTED=true but PARLEY_STORE={kind}: the {kind} store cannot be shared \
                 by several replicas. Set PARLEY_STORE=redis (with REDIS_URL) or PARLEY_STORE=postgres \
                 (with DATABASE_URL), or run a single replica with PARLEY_DISTRIBUTED=false."
            ));
        }
        if self.store.distributed && self.store.coordinator == CoordinatorKind::Memory {
            return Err("PARLEY_DISTRIBUTED=true but PARLEY_COORDINATOR=memory: turns coordinated in one \
                 process are not safe across replicas. Set PARLEY_COORDINATOR=redis (with REDIS_URL) or \
                 PARLEY_COORDINATOR=store (with a distributed PARLEY_STORE), or run a single replica \
                 with PARLEY_DISTRIBUTED=false."
                .to_owned());
        }
        if let Some(endpoint) = self.otlp_endpoint.as_deref().map(str::trim).filter(|e| !e.is_empty()) {
            let valid = url::Url::parse(endpoint).is_ok_and(|u| matches!(u.scheme(), "http" | "https"));
            if !valid {
                return Err(format!(
                    "PARLEY_OTLP_ENDPOINT={endpoint:?} is not an http(s) URL; give the whole OTLP/HTTP \
                     traces URL, e.g. http://localhost:4318/v1/traces"
                ));
            }
        }
        if self.agent.history_size == 0 {
            return Err("PARLEY_HISTORY_SIZE must be at least 1".to_owned());
        }
        if self.agent.max_content_bytes > self.http.max_body_bytes {
            return Err("PARLEY_MAX_CONTENT_BYTES must not exceed PARLEY_MAX_BODY_BYTES".to_owned());
        }
        if self.http.cors_origins.iter().any(|o| o == "*") && self.http.cors_origins.len() > 1 {
            return Err("PARLEY_CORS_ORIGINS: `*` cannot be combined with other origins".to_owned());
        }
        self.validate_security()
    }

    /// Authentication, CORS and limits.
    fn validate_security(&self) -> Result<(), String> {
        self.validate_auth()?;
        validate_cors(&self.http)?;
        let limits = &self.limits;
        if limits.max_metadata_depth == 0 || limits.max_metadata_keys == 0 {
            return Err(
                "PARLEY_MAX_METADATA_DEPTH and PARLEY_MAX_METADATA_KEYS must be at least 1".to_owned()
            );
        }
        if limits.rate_limit_turns_window.is_zero() {
            return Err("PARLEY_RATE_LIMIT_TURNS_WINDOW must be longer than 0".to_owned());
        }
        if self.http.header_read_timeout.is_zero() || self.http.idle_timeout.is_zero() {
            return Err("PARLEY_HEADER_READ_TIMEOUT and PARLEY_IDLE_TIMEOUT must be longer than 0".to_owned());
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), String> {
        let auth = &self.auth;
        match auth.mode {
            None if !self.addr.ip().is_loopback() => Err(format!(
                "PARLEY_ADDR={} is not a loopback address and PARLEY_AUTH is not set. Set \
                 PARLEY_AUTH=api_key (with PARLEY_API_KEYS_FILE) to require API keys, or \
                 PARLEY_AUTH=none to serve every caller as one tenant without authentication.",
                self.addr
            )),
            Some(AuthMode::ApiKey) if auth.api_keys_file.is_none() && auth.api_keys.is_none() => Err(
                "PARLEY_AUTH=api_key needs keys: set PARLEY_API_KEYS_FILE (make keys with `parley keys new \
                 --tenant NAME`) or, for development, PARLEY_API_KEYS=tenant:key,…"
                    .to_owned(),
            ),
            _ => Ok(()),
        }
    }
}

/// Origins must be `scheme://host[:port]`; `*` never goes with credentials.
fn validate_cors(http: &HttpConfig) -> Result<(), String> {
    let origins: Vec<&String> = http.cors_origins.iter().filter(|o| !o.is_empty()).collect();
    if http.cors_credentials && origins.iter().any(|o| *o == "*") {
        return Err("PARLEY_CORS_CREDENTIALS=true cannot be combined with PARLEY_CORS_ORIGINS=*: \
                    list the allowed origins"
            .to_owned());
    }
    for origin in origins.into_iter().filter(|o| *o != "*") {
        let parsed = url::Url::parse(origin).ok();
        let is_origin = parsed.is_some_and(|u| {
            matches!(u.scheme(), "http" | "https")
                && u.host().is_some()
                && u.path() == "/"
                && !origin.ends_with('/')
        });
        if !is_origin {
            return Err(format!(
                "PARLEY_CORS_ORIGINS: {origin:?} is not an origin; write scheme://host[:port], such as https://app.example.com"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        let mut all = vec!["parley"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).expect("parse").config
    }

    #[test]
    fn defaults_are_the_embedded_ones() {
        let c = parse(&[]);
        assert_eq!(c.addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.store.kind, StoreKind::Sqlite);
        assert_eq!(c.store.sqlite_path, std::path::PathBuf::from("parley.db"));
        assert_eq!(c.model.provider, ModelProvider::Echo);
        assert_eq!(c.agent.history_size, 20);
        assert_eq!(c.agent.max_content_bytes, 32 * 1024);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn a_distributed_memory_store_is_refused_with_the_fix() {
        for (args, kind) in [
            (&["--distributed", "true"][..], "sqlite"),
            (&["--distributed", "true", "--store", "memory"][..], "memory"),
        ] {
            let err = parse(args).validate().unwrap_err();
            assert!(err.contains("PARLEY_STORE=redis") && err.contains("PARLEY_STORE=postgres"), "{err}");
            assert!(err.contains(&format!("PARLEY_STORE={kind}:")), "{err}");
        }
        assert!(parse(&["--distributed", "true", "--store", "redis"]).validate().is_ok());
    }

    #[test]
    fn traces_are_off_by_default_and_need_an_http_endpoint() {
        let c = parse(&[]);
        assert_eq!((c.otlp_endpoint, c.otlp_service_name.as_str()), (None, "parley"));
        let err = parse(&["--otlp-endpoint", "localhost:4318"]).validate().unwrap_err();
        assert!(err.contains("PARLEY_OTLP_ENDPOINT") && err.contains("/v1/traces"), "{err}");
        assert!(parse(&["--otlp-endpoint", "http://localhost:4318/v1/traces"]).validate().is_ok());
        assert!(parse(&["--otlp-endpoint", ""]).validate().is_ok(), "blank is off");
    }

    #[test]
    fn a_distributed_deployment_needs_a_distributed_coordinator_too() {
        let err = parse(&["--distributed", "true", "--store", "postgres", "--coordinator", "memory"])
            .validate()
            .unwrap_err();
        assert!(
            err.contains("PARLEY_COORDINATOR=memory:") && err.contains("PARLEY_COORDINATOR=redis"),
            "{err}"
        );
        let ok = ["--distributed", "true", "--store", "postgres", "--coordinator", "redis"];
        assert!(parse(&ok).validate().is_ok());
        assert_eq!(parse(&[]).store.coordinator, CoordinatorKind::Store, "each store coordinates itself");
    }

    #[test]
    fn a_public_address_needs_an_explicit_auth_mode() {
        let err = parse(&["--addr", "0.0.0.0:8080"]).validate().unwrap_err();
        assert!(err.contains("PARLEY_AUTH=api_key") && err.contains("PARLEY_AUTH=none"), "{err}");
        assert!(parse(&["--addr", "0.0.0.0:8080", "--auth", "none"]).validate().is_ok());
        assert!(parse(&["--addr", "[::1]:8080"]).validate().is_ok(), "loopback needs nothing");
        let keys = ["--addr", "0.0.0.0:8080", "--auth", "api_key", "--api-keys", "acme:pk_a_b"];
        assert!(parse(&keys).validate().is_ok());
    }

    #[test]
    fn api_key_auth_without_keys_is_refused() {
        let err = parse(&["--auth", "api_key"]).validate().unwrap_err();
        assert!(err.contains("PARLEY_API_KEYS_FILE") && err.contains("parley keys new"), "{err}");
        assert!(parse(&["--auth", "api-key", "--api-keys-file", "keys.toml"]).validate().is_ok());
    }

    #[test]
    fn dev_keys_never_show_in_debug_output() {
        let c = parse(&["--auth", "api_key", "--api-keys", "acme:pk_dev_hunter2"]);
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn cors_credentials_never_go_with_a_wildcard_and_origins_are_checked() {
        let err = parse(&["--cors-origins", "*", "--cors-credentials", "true"]).validate().unwrap_err();
        assert!(err.contains("PARLEY_CORS_CREDENTIALS"), "{err}");
        assert!(parse(&["--cors-origins", "*"]).validate().is_ok());
        let listed =
            ["--cors-origins", "https://app.example.com,http://localhost:3000", "--cors-credentials", "true"];
        assert!(parse(&listed).validate().is_ok());
        for bad in ["app.example.com", "https://app.example.com/", "https://a.com/path", "ftp://a.com"] {
            assert!(parse(&["--cors-origins", bad]).validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn input_bounds_are_checked() {
        assert!(parse(&["--max-metadata-depth", "0"]).validate().is_err());
        assert!(parse(&["--rate-limit-turns-window", "0s"]).validate().is_err());
        assert!(parse(&["--header-read-timeout", "0s"]).validate().is_err());
        assert!(parse(&["--idle-timeout", "0s"]).validate().is_err());
        let c = parse(&[]);
        assert_eq!((c.limits.max_metadata_depth, c.limits.max_metadata_keys), (8, 64));
        assert_eq!(c.limits.rate_limit_rps, None);
        let http = &c.http;
        assert_eq!(
            (http.header_read_timeout, http.idle_timeout),
            (Duration::from_secs(30), Duration::from_secs(60))
        );
        assert_eq!(http.max_connections, 10_000);
    }

    #[test]
    fn no_secret_of_the_configuration_shows_in_debug_output() {
        let c = parse(&[
            "--auth",
            "api_key",
            "--api-keys",
            "acme:pk_dev_keysecret1",
            "--openai-api-key",
            "sk-modelsecret2",
            "--openai-base-url",
            "https://user:basesecret3@llm.example.com/v1",
            "--redis-url",
            "redis://:redissecret4@cache:6379/0",
            "--database-url",
            "postgres://parley:pgsecret5@db:5432/parley?sslpassword=sslsecret6",
        ]);
        let cli = Cli::try_parse_from(["parley", "--openai-api-key", "sk-modelsecret2"]).unwrap();
        let shown = [format!("{c:?}"), format!("{c:#?}"), format!("{:?}", c.store), format!("{cli:?}")];
        for text in shown {
            for secret in
                ["keysecret1", "modelsecret2", "basesecret3", "redissecret4", "pgsecret5", "sslsecret6"]
            {
                assert!(!text.contains(secret), "{secret} shows in {text}");
            }
        }
        let text = format!("{c:?}");
        assert!(text.contains("db:5432") && text.contains("llm.example.com"), "the rest still shows: {text}");
    }
}
