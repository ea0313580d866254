//! Wiring: build the store, model, tools and agent from a `Config`, and serve the API on a bound
//! listener until a shutdown future resolves (then drain turns within the grace period).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::agent::{Agent, AgentSettings, TurnStore};
use crate::config::{Config, CoordinatorKind, ModelProvider, StoreKind, redact_url};
use crate::http::auth::Auth;
use crate::http::ratelimit::RateLimits;
use crate::http::{AppParts, AppState, Limits};
use crate::llm::echo::EchoModel;
use crate::llm::openai::{OpenAiModel, OpenAiSettings};
use crate::llm::{DynModel, EchoSettings};
use crate::metrics::Metrics;
use crate::server::ServerSettings;
use crate::store::StoreError;
use crate::store::memory::MemoryStore;
use crate::store::memory_coordinator::MemoryCoordinator;
use crate::store::postgres::{PgOptions, PgStore};
use crate::store::redis::{RedisCoordinator, RedisOptions, RedisStore};
use crate::store::sqlite::{SqliteOptions, SqliteStore};
use crate::telemetry::export::TraceSettings;
use crate::tools::ToolRegistry;
use crate::tools::http::load_tools_file;

/// Builds the application state from a validated configuration.
pub async fn build_state(config: &Config) -> anyhow::Result<AppState> {
    config.validate().map_err(anyhow::Error::msg)?;
    let store = build_store(config).await?;
    let model = build_model(config)?;
    let tools = build_tools(config)?;
    state_from_parts(config, store, model, tools)
}

/// Where traces go, when `PARLEY_OTLP_ENDPOINT` is set (and not blank).
pub fn trace_settings(config: &Config) -> Option<TraceSettings> {
    let endpoint = config.otlp_endpoint.as_deref().map(str::trim).filter(|e| !e.is_empty())?;
    Some(TraceSettings { endpoint: endpoint.to_owned(), service_name: config.otlp_service_name.clone() })
}

/// Assembles the state from already-built parts (tests use this to inject a store or model);
/// loads the API keys and builds the rate limiter.
pub fn state_from_parts(
    config: &Config,
    store: TurnStore,
    model: DynModel,
    tools: ToolRegistry,
) -> anyhow::Result<AppState> {
    check_distributed(config, &store)?;
    let metrics = config.http.metrics.then(|| Arc::new(Metrics::new(config.http.metrics_tenant_label)));
    let store = if metrics.is_some() || crate::telemetry::enabled() {
        store.instrumented(metrics.as_ref())
    } else {
        store
    };
    let settings = AgentSettings {
        history_size: config.agent.history_size,
        system_prompt: config.agent.system_prompt.clone(),
        max_iterations: config.agent.max_iterations,
        save_on_iteration: config.agent.save_on_iteration,
        turn_timeout: config.agent.turn_timeout,
        turn_lease: config.agent.turn_lease,
        if_busy_timeout: config.agent.if_busy_timeout,
        idempotency_ttl: config.agent.idempotency_ttl,
        event_ttl: config.agent.event_ttl,
        event_log: config.agent.event_log,
        store_timeout: config.store.store_timeout,
        fork_max_messages: config.agent.fork_max_messages,
        metrics: metrics.clone(),
    };
    let agent = Arc::new(Agent::new(store, model, tools, settings));
    let auth = Arc::new(Auth::from_config(config)?);
    let rate_limits = Arc::new(RateLimits::from_config(config)?);
    let limits = Arc::new(limits(config));
    Ok(AppState::new(AppParts { agent, limits, auth, rate_limits, metrics }))
}

fn limits(config: &Config) -> Limits {
    Limits {
        max_body_bytes: config.http.max_body_bytes,
        max_content_bytes: config.agent.max_content_bytes,
        request_timeout: config.http.request_timeout,
        store_timeout: config.store.store_timeout,
        sse_keepalive: config.http.sse_keepalive,
        cors_origins: config.http.cors_origins.iter().filter(|o| !o.is_empty()).cloned().collect(),
        if_busy: config.agent.if_busy,
        cors_credentials: config.http.cors_credentials,
        max_metadata_bytes: config.limits.max_metadata_bytes,
        max_metadata_depth: config.limits.max_metadata_depth,
        max_metadata_keys: config.limits.max_metadata_keys,
        max_sessions_per_tenant: config.limits.max_sessions_per_tenant,
        header_read_timeout: config.http.header_read_timeout,
        idle_timeout: config.http.idle_timeout,
        max_connections: config.http.max_connections,
        metrics_on_main: config.http.metrics && config.http.metrics_addr.is_none(),
        metrics_public: config.http.metrics_public,
        ui: config.http.ui,
    }
}

/// With `PARLEY_DISTRIBUTED=true`, refuses a history store or a coordinator that replicas cannot
/// share (a store built in code included), naming the fix.
fn check_distributed(config: &Config, store: &TurnStore) -> anyhow::Result<()> {
    if !config.store.distributed {
        return Ok(());
    }
    let (history, coordinator) = (store.history(), store.coordinator());
    if !history.is_distributed() {
        anyhow::bail!(
            "PARLEY_DISTRIBUTED=true but the {} history store cannot be shared by several replicas. \
             Use PARLEY_STORE=redis or PARLEY_STORE=postgres, or run a single replica with \
             PARLEY_DISTRIBUTED=false.",
            history.backend()
        );
    }
    if !coordinator.is_distributed() {
        anyhow::bail!(
            "PARLEY_DISTRIBUTED=true but the {} coordinator keeps turn locks in one process. Set \
             PARLEY_COORDINATOR=redis (with REDIS_URL), or PARLEY_COORDINATOR=store with a \
             distributed PARLEY_STORE, or run a single replica with PARLEY_DISTRIBUTED=false.",
            coordinator.backend()
        );
    }
    Ok(())
}

/// Builds the configured store: the history store and the coordinator of its turns
/// (`PARLEY_COORDINATOR`). By default, or when the coordinator named is the store's own backend,
/// the store coordinates itself with its fused paths; otherwise the agent composes the two.
/// Durable stores connect lazily: parley starts while they are down and reports 503 until they
/// answer.
pub async fn build_store(config: &Config) -> anyhow::Result<TurnStore> {
    let own = build_own_store(config).await?;
    let coordinator: crate::store::DynCoordinator = match (config.store.coordinator, config.store.kind) {
        (CoordinatorKind::Store, _)
        | (CoordinatorKind::Memory, StoreKind::Memory)
        | (CoordinatorKind::Redis, StoreKind::Redis) => return Ok(own),
        (CoordinatorKind::Memory, _) => {
            let coordinator = Arc::new(MemoryCoordinator::new());
            coordinator.spawn_purger(SWEEP_EVERY);
            coordinator
        }
        (CoordinatorKind::Redis, _) => {
            let coordinator = RedisCoordinator::new(redis_options(config))?;
            tracing::info!(redis = %redact_url(&config.store.redis_url), prefix = %config.store.redis_prefix, "redis coordinator configured");
            Arc::new(coordinator)
        }
    };
    Ok(TurnStore::composed(Arc::clone(own.history()), coordinator))
}

/// The configured store, coordinating its own turns.
async fn build_own_store(config: &Config) -> anyhow::Result<TurnStore> {
    match config.store.kind {
        StoreKind::Memory => {
            let store = Arc::new(MemoryStore::new(config.store.memory_max_messages));
            store.spawn_purger(SWEEP_EVERY);
            Ok(TurnStore::fused(store))
        }
        StoreKind::Sqlite => Ok(TurnStore::fused(sqlite_store(config).await?)),
        StoreKind::Postgres => Ok(TurnStore::fused(postgres_store(config).await?)),
        StoreKind::Redis => {
            let store = RedisStore::new(redis_options(config))?;
            tracing::info!(redis = %redact_url(&config.store.redis_url), prefix = %config.store.redis_prefix, "redis store configured");
            Ok(TurnStore::fused(Arc::new(store)))
        }
    }
}

/// The SQLite store, opened and migrated: a file parley cannot use (another parley holds it, it
/// is read-only, not a database or corrupt) stops start-up with a message naming it.
async fn sqlite_store(config: &Config) -> anyhow::Result<Arc<SqliteStore>> {
    let store =
        Arc::new(SqliteStore::open(sqlite_options(config)).await.map_err(|e| anyhow::anyhow!("{e}"))?);
    tracing::info!(path = %config.store.sqlite_path.display(), "sqlite store ready");
    // Always: idempotency keys expire whether or not sessions do.
    store.spawn_ttl_sweeper(SWEEP_EVERY);
    Ok(store)
}

/// The SQLite store's options, from the configuration.
pub fn sqlite_options(config: &Config) -> SqliteOptions {
    let store = &config.store;
    SqliteOptions {
        path: store.sqlite_path.clone(),
        readers: store.sqlite_readers,
        max_messages: Some(store.max_messages).filter(|&m| m > 0),
        ttl: store.session_ttl,
        op_timeout: store.store_timeout,
    }
}

/// The Redis store's options, from the configuration.
pub fn redis_options(config: &Config) -> RedisOptions {
    let store = &config.store;
    RedisOptions {
        url: store.redis_url.clone(),
        prefix: store.redis_prefix.clone(),
        pool_size: store.redis_pool_size,
        max_messages: Some(store.max_messages).filter(|&m| m > 0),
        ttl: store.session_ttl,
        op_timeout: store.store_timeout,
    }
}

/// The PostgreSQL store's options, from the configuration.
pub fn pg_options(config: &Config) -> PgOptions {
    let store = &config.store;
    PgOptions {
        url: store.database_url.clone(),
        pool_size: store.pg_pool_size,
        schema: store.pg_schema.clone(),
        max_messages: Some(store.max_messages).filter(|&m| m > 0),
        ttl: store.session_ttl,
        op_timeout: store.store_timeout,
    }
}

/// The PostgreSQL store, migrated. If PostgreSQL is unreachable at start-up, parley starts anyway
/// (`/readyz` answers 503) and applies the migrations as soon as it answers, logging each failed
/// attempt. An error that retrying cannot fix (the database does not exist, the login is refused,
/// a migration fails or no longer matches the database) stops start-up at once, or, met on a later
/// attempt, stops the retries with an error in the log.
async fn postgres_store(config: &Config) -> anyhow::Result<Arc<PgStore>> {
    let store = Arc::new(PgStore::new(pg_options(config))?);
    let target = redact_url(&config.store.database_url);
    match store.migrate().await {
        Ok(()) => tracing::info!(database = %target, "postgres store ready"),
        Err(StoreError::Unavailable(e) | StoreError::Unanswered(e)) => {
            tracing::warn!(database = %target, error = %e, attempt = 1,
                "postgres unreachable at start-up; serving (readyz answers 503) and retrying the migrations every 2 s");
            let retry = Arc::clone(&store);
            tokio::spawn(async move {
                match retry_migrations(|| retry.migrate(), MIGRATE_RETRY_EVERY).await {
                    Ok(attempts) => tracing::info!(attempts, "postgres reachable again: migrations applied"),
                    Err(e) => tracing::error!("{}; parley stops retrying", cannot_migrate(&target, &e)),
                }
            });
        }
        Err(e) => return Err(anyhow::anyhow!(cannot_migrate(&target, &e))),
    }
    // Always: idempotency keys expire whether or not sessions do.
    store.spawn_ttl_sweeper(SWEEP_EVERY);
    Ok(store)
}

/// How long to wait between two attempts to migrate an unreachable PostgreSQL.
const MIGRATE_RETRY_EVERY: Duration = Duration::from_secs(2);

/// Runs `migrate` every `every` (after a first attempt that found the store unavailable) until it
/// succeeds, returning how many attempts it took in all, or until it fails with an error that
/// retrying cannot fix, returned at once. Each failure is logged.
async fn retry_migrations<F, Fut>(mut migrate: F, every: Duration) -> Result<u32, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), StoreError>>,
{
    let mut attempt = 1;
    loop {
        tokio::time::sleep(every).await;
        attempt += 1;
        match migrate().await {
            Ok(()) => return Ok(attempt),
            Err(StoreError::Unavailable(e) | StoreError::Unanswered(e)) => {
                let retry_in_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
                tracing::warn!(attempt, error = %e, retry_in_ms, "postgres still unreachable; retrying the migrations");
            }
            Err(e) => return Err(e),
        }
    }
}

/// What an error that retrying cannot fix says, with what to check.
fn cannot_migrate(target: &str, error: &StoreError) -> String {
    format!(
        "cannot migrate PostgreSQL at {target}, and retrying cannot fix it: {error}. Check DATABASE_URL \
         (the database must exist and the user must be able to log in) and the migrations \
         (`parley migrate`)"
    )
}

/// How often expired sessions (PostgreSQL, with a TTL) and idempotency keys (memory, PostgreSQL)
/// are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Builds the configured model.
pub fn build_model(config: &Config) -> anyhow::Result<DynModel> {
    match config.model.provider {
        ModelProvider::Echo => Ok(Arc::new(EchoModel::new(EchoSettings {
            delay: std::time::Duration::from_millis(config.model.echo_delay_ms),
        }))),
        ModelProvider::Openai => {
            let settings = OpenAiSettings::from(&config.model);
            tracing::info!(model = %settings.model, "openai-compatible model configured");
            Ok(Arc::new(OpenAiModel::new(settings).context("invalid openai settings")?))
        }
    }
}

/// The built-in tools plus those declared in `PARLEY_TOOLS_FILE`.
pub fn build_tools(config: &Config) -> anyhow::Result<ToolRegistry> {
    let mut registry = ToolRegistry::with_builtins();
    if let Some(path) = &config.agent.tools_file {
        for tool in load_tools_file(path).map_err(anyhow::Error::msg)? {
            registry
                .register(tool)
                .map_err(|e| anyhow::anyhow!("PARLEY_TOOLS_FILE {}: {e}", path.display()))?;
        }
    }
    Ok(registry)
}

/// Serves the API on `listener` until `shutdown` resolves; then refuses new turns, lets running
/// turns finish within `grace` (cancelling the rest, which saves their partial text), stops
/// accepting connections, closes the open ones gracefully, and returns. Connections are timed and
/// capped as `crate::server` describes, with the state's limits.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: std::time::Duration,
) -> anyhow::Result<()> {
    let agent = Arc::clone(&state.agent);
    let settings = ServerSettings {
        header_read_timeout: state.limits.header_read_timeout,
        idle_timeout: state.limits.idle_timeout,
        max_connections: state.limits.max_connections,
    };
    let router = crate::http::router(state);
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        tracing::info!(grace_ms = grace.as_millis() as u64, "shutting down: draining running turns");
        agent.registry().shutdown(grace).await;
        let _ = drained_tx.send(());
    };
    let server = crate::server::run(listener, router, settings, signal);
    tokio::pin!(server);
    tokio::select! {
        () = &mut server => {}
        _ = async { let _ = drained_rx.await; tokio::time::sleep(std::time::Duration::from_secs(5)).await } => {
            tracing::warn!("connections still open 5 s after the turns drained: closing them");
        }
    }
    Ok(())
}

/// Applies the PostgreSQL migrations (`parley migrate`).
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    let store = PgStore::new(pg_options(config))?;
    store.migrate().await.context("could not apply the migrations")?;
    tracing::info!("migrations applied");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;

    /// Runs the retries over a migration that answers these outcomes in turn; returns their result
    /// and how many times the migration ran.
    async fn run(outcomes: Vec<Result<(), StoreError>>) -> (Result<u32, StoreError>, u32) {
        let script = Mutex::new(VecDeque::from(outcomes));
        let calls = Mutex::new(0);
        let migrate = || {
            *calls.lock().unwrap() += 1;
            let next = script.lock().unwrap().pop_front().expect("no more attempts were expected");
            async move { next }
        };
        let result = retry_migrations(migrate, Duration::from_millis(1)).await;
        let calls = *calls.lock().unwrap();
        (result, calls)
    }

    #[tokio::test]
    async fn migrations_are_retried_while_the_store_is_unreachable() {
        let down = || Err(StoreError::Unavailable("connection refused".into()));
        let (result, calls) = run(vec![down(), down(), Ok(())]).await;
        assert_eq!((result.unwrap(), calls), (4, 3), "the first attempt was made before");
    }

    #[tokio::test]
    async fn an_error_that_retrying_cannot_fix_stops_the_retries_at_once() {
        let down = Err(StoreError::Unavailable("connection refused".into()));
        let missing = Err(StoreError::Backend("database \"nope\" does not exist".into()));
        let (result, calls) = run(vec![down, missing]).await;
        assert!(matches!(result, Err(StoreError::Backend(_))), "{result:?}");
        assert_eq!(calls, 2, "no attempt after it");
        let text = cannot_migrate("postgres://h/nope", &result.unwrap_err());
        assert!(text.contains("does not exist") && text.contains("DATABASE_URL"), "{text}");
    }
}
