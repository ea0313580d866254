//! Wiring: build the store, model, tools and agent from a `Config`, and serve the API on a bound
//! listener until a shutdown future resolves (then drain turns within the grace period).

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;

use crate::agent::{Agent, AgentSettings};
use crate::config::{Config, ModelProvider, StoreKind, redact_url};
use crate::http::auth::Auth;
use crate::http::ratelimit::RateLimits;
use crate::http::{AppParts, AppState, Limits};
use crate::llm::echo::EchoModel;
use crate::llm::openai::{OpenAiModel, OpenAiSettings};
use crate::llm::{DynModel, EchoSettings};
use crate::store::memory::MemoryStore;
use crate::store::postgres::{PgOptions, PgStore};
use crate::store::redis::{RedisOptions, RedisStore};
use crate::store::{DynStore, StoreError};
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

/// Assembles the state from already-built parts (tests use this to inject a store or model);
/// loads the API keys and builds the rate limiter.
pub fn state_from_parts(
    config: &Config,
    store: DynStore,
    model: DynModel,
    tools: ToolRegistry,
) -> anyhow::Result<AppState> {
    let settings = AgentSettings {
        history_size: config.agent.history_size,
        system_prompt: config.agent.system_prompt.clone(),
        max_iterations: config.agent.max_iterations,
        save_on_iteration: config.agent.save_on_iteration,
        turn_timeout: config.agent.turn_timeout,
        turn_lease: config.agent.turn_lease,
        if_busy_timeout: config.agent.if_busy_timeout,
        idempotency_ttl: config.agent.idempotency_ttl,
    };
    let agent = Arc::new(Agent::new(Arc::clone(&store), model, tools, settings));
    let auth = Arc::new(Auth::from_config(config)?);
    let rate_limits = Arc::new(RateLimits::from_config(config)?);
    Ok(AppState::new(AppParts { agent, store, limits: Arc::new(limits(config)), auth, rate_limits }))
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
        ui: config.http.ui,
    }
}

/// Builds the configured store. Durable stores connect lazily: parley starts while they are down
/// and reports 503 until they answer.
pub async fn build_store(config: &Config) -> anyhow::Result<DynStore> {
    match config.store.kind {
        StoreKind::Memory => Ok(Arc::new(MemoryStore::new(config.store.memory_max_messages))),
        StoreKind::Postgres => Ok(postgres_store(config).await?),
        StoreKind::Redis => {
            let store = RedisStore::new(RedisOptions::from_config(&config.store))?;
            tracing::info!(redis = %redact_url(&config.store.redis_url), prefix = %config.store.redis_prefix, "redis store configured");
            Ok(Arc::new(store))
        }
    }
}

fn pg_options(config: &Config) -> PgOptions {
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

/// The PostgreSQL store, migrated. If PostgreSQL is down at start-up, parley starts anyway
/// (`/readyz` answers 503) and applies the migrations as soon as it answers.
async fn postgres_store(config: &Config) -> anyhow::Result<Arc<PgStore>> {
    let store = Arc::new(PgStore::new(pg_options(config))?);
    let target = redact_url(&config.store.database_url);
    match store.migrate().await {
        Ok(()) => tracing::info!(database = %target, "postgres store ready"),
        Err(StoreError::Unavailable(e)) => {
            tracing::warn!(database = %target, error = %e, "postgres unreachable at start-up; will migrate when it answers");
            let retry = Arc::clone(&store);
            tokio::spawn(async move {
                while retry.migrate().await.is_err() {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                tracing::info!("postgres reachable again: migrations applied");
            });
        }
        Err(e) => return Err(anyhow::anyhow!("could not migrate {target}: {e}")),
    }
    if config.store.session_ttl.is_some() {
        store.spawn_ttl_sweeper(SWEEP_EVERY);
    }
    Ok(store)
}

/// How often expired PostgreSQL sessions are swept when a TTL is set.
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
/// turns finish within `grace` (cancelling the rest, which saves their partial text), and returns.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: std::time::Duration,
) -> anyhow::Result<()> {
    let agent = Arc::clone(&state.agent);
    let router = crate::http::router(state);
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        tracing::info!(grace_ms = grace.as_millis() as u64, "shutting down: draining running turns");
        agent.registry().shutdown(grace).await;
        let _ = drained_tx.send(());
    };
    // Without TCP_NODELAY, Nagle's algorithm holds each small SSE event until the client ACKs the
    // previous one (a delayed ACK: tens of milliseconds per delta).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on a connection");
        }
    });
    // The client address keys rate limits when authentication is off.
    let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
    let server = axum::serve(listener, service).with_graceful_shutdown(signal).into_future();
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result.context("server error")?,
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
