//! The HTTP API: one module per resource, each with its own `router()`, merged here under one
//! tuple of layers. The OpenAPI document is generated from the same routers, so it cannot drift.
//!
//! - [`sessions`], [`messages`], [`turns`], [`health`]: the resources.
//! - [`extract`]: extractors that reject bad input as problem+json.
//! - [`middleware`]: bounds on request heads, and the problem+json fallback for errors raised
//!   outside handlers.
//! - [`sse`]: the Server-Sent Events encoding of a turn.
//! - [`auth`], [`ratelimit`], [`bounds`]: API keys and tenants, rate limits per key, bounds on
//!   client input.
//! - [`ui`]: the chat page at `/` (outside the OpenAPI document).
//! - [`ai_sdk`], [`ag_ui`]: the chat-client dialects (the Vercel AI SDK's UI message stream, and
//!   AG-UI), each a rendering of the same turn events for a published client.

pub mod ag_ui;
pub mod ai_sdk;
pub mod auth;
pub mod bounds;
pub mod extract;
pub mod health;
pub mod messages;
pub mod middleware;
pub mod observe;
pub mod ratelimit;
pub mod sessions;
pub mod sse;
pub mod turns;
pub mod ui;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use tower::ServiceBuilder;
use tower::util::MapResponseLayer;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa::openapi::OpenApi as OpenApiDoc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use crate::agent::Agent;
use crate::domain::Metadata;
use crate::error::{AppError, Result};

/// Shared state of every handler: one `Arc`, so that handing it to a request (axum clones it
/// for every one) is one reference count, not five.
#[derive(Clone)]
pub struct AppState(Arc<AppParts>);

impl AppState {
    /// The state made of these parts.
    pub fn new(parts: AppParts) -> Self {
        AppState(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppParts;

    fn deref(&self) -> &AppParts {
        &self.0
    }
}

/// What the handlers share.
pub struct AppParts {
    /// The agent, which owns the running turns.
    pub agent: Arc<Agent>,
    /// The Prometheus series, when metrics are on.
    pub metrics: Option<crate::metrics::DynMetrics>,
    /// Input limits and HTTP settings.
    pub limits: Arc<Limits>,
    /// How requests are authenticated.
    pub auth: Arc<auth::Auth>,
    /// Rate limits per key.
    pub rate_limits: Arc<ratelimit::RateLimits>,
}

/// Limits on what clients send, and HTTP timings.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Largest message content or system prompt.
    pub max_content_bytes: usize,
    /// Largest metadata object, serialised.
    pub max_metadata_bytes: usize,
    /// Timeout of non-turn requests.
    pub request_timeout: Duration,
    /// Timeout of one store operation (readiness).
    pub store_timeout: Duration,
    /// SSE keep-alive interval.
    pub sse_keepalive: Duration,
    /// CORS origins; `*` for any.
    pub cors_origins: Vec<String>,
    /// What a turn posted to a busy session does when the request does not say.
    pub if_busy: crate::config::IfBusy,
    /// Whether CORS allows credentials (never with `*`).
    pub cors_credentials: bool,
    /// Deepest metadata nesting (the object is depth 1).
    pub max_metadata_depth: usize,
    /// Most top-level metadata keys.
    pub max_metadata_keys: usize,
    /// Most sessions per tenant; 0 is unlimited.
    pub max_sessions_per_tenant: u64,
    /// Longest a client may take to send a request's head.
    pub header_read_timeout: Duration,
    /// Longest a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Most open client connections; 0 is unlimited.
    pub max_connections: usize,
    /// Whether `/` serves the chat page.
    pub ui: bool,
    /// Whether the main listener serves `/metrics` (metrics on, no listener of their own).
    pub metrics_on_main: bool,
    /// Whether `/metrics` on the main listener needs no API key.
    pub metrics_public: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 256 * 1024,
            max_content_bytes: 32 * 1024,
            max_metadata_bytes: 16 * 1024,
            request_timeout: Duration::from_secs(30),
            store_timeout: Duration::from_secs(5),
            sse_keepalive: Duration::from_secs(15),
            cors_origins: Vec::new(),
            if_busy: crate::config::IfBusy::Reject,
            cors_credentials: false,
            max_metadata_depth: 8,
            max_metadata_keys: 64,
            max_sessions_per_tenant: 0,
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            ui: true,
            metrics_on_main: false,
            metrics_public: false,
        }
    }
}

impl Limits {
    /// 413 if a text field is over the content limit.
    pub fn check_text(&self, field: &str, text: &str) -> Result<()> {
        if text.len() > self.max_content_bytes {
            return Err(AppError::PayloadTooLarge(format!(
                "{field} is {} bytes; the limit is {} bytes (PARLEY_MAX_CONTENT_BYTES)",
                text.len(),
                self.max_content_bytes
            )));
        }
        Ok(())
    }

    /// 413 if a metadata object is over its size limit, 422 if it has too many keys or nests
    /// too deep.
    pub fn check_metadata(&self, metadata: &Metadata) -> Result<()> {
        bounds::check_metadata_shape(metadata, self.max_metadata_depth, self.max_metadata_keys)?;
        let size = serde_json::to_vec(metadata).map(|v| v.len()).unwrap_or(usize::MAX);
        if size > self.max_metadata_bytes {
            return Err(AppError::PayloadTooLarge(format!(
                "metadata is {size} bytes; the limit is {} bytes (PARLEY_MAX_METADATA_BYTES)",
                self.max_metadata_bytes
            )));
        }
        Ok(())
    }
}

/// The OpenAPI document's fixed parts; paths and schemas come from the routers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "parley",
        description = "A chat-session microservice: sessions, history and streamed agent replies. Errors are RFC 9457 problem+json with a stable `code`."
    ),
    tags(
        (name = "sessions", description = "Create, list, read and delete sessions"),
        (name = "messages", description = "Post turns and read history"),
        (name = "turns", description = "Turn records and cancellation"),
        (name = "health", description = "Liveness and readiness"),
        (name = "clients", description = "Chat-client dialects: the Vercel AI SDK's UI message stream (`useChat`) and AG-UI (`HttpAgent`)"),
    )
)]
struct ApiDoc;

fn api_router(state: &AppState) -> OpenApiRouter<AppState> {
    let timed = OpenApiRouter::new()
        .merge(sessions::router())
        .merge(messages::router())
        .merge(turns::router())
        .merge(health::router())
        .merge(ai_sdk::router())
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, state.limits.request_timeout));
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(timed)
        .merge(messages::turn_router())
        .merge(ai_sdk::stream_router())
        .merge(ag_ui::router())
}

/// The OpenAPI document, as served at `/openapi.json` and committed in `openapi/openapi.json`.
pub fn openapi() -> OpenApiDoc {
    let state = AppState::new(AppParts {
        agent: Arc::new(Agent::offline()),
        limits: Arc::new(Limits::default()),
        auth: Arc::new(auth::Auth::off()),
        rate_limits: Arc::new(ratelimit::RateLimits::off()),
        metrics: None,
    });
    let mut spec = api_router(&state).split_for_parts().1;
    auth::document(&mut spec);
    spec
}

fn cors(origins: &[String], credentials: bool) -> CorsLayer {
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            header::ACCEPT,
            HeaderName::from_static("idempotency-key"),
        ])
        .expose_headers([
            header::LOCATION,
            HeaderName::from_static("x-request-id"),
            header::RETRY_AFTER,
            header::WWW_AUTHENTICATE,
            HeaderName::from_static("x-should-retry"),
            HeaderName::from_static("ratelimit-limit"),
            HeaderName::from_static("ratelimit-remaining"),
            HeaderName::from_static("ratelimit-reset"),
        ])
        // Config validation refuses credentials with `*`, which CorsLayer would reject too.
        .allow_credentials(credentials)
}

/// The whole application: every route, the docs, and one tuple of layers.
pub fn router(state: AppState) -> Router {
    let (api, mut spec) = api_router(&state).split_for_parts();
    auth::document(&mut spec);
    let request_id = HeaderName::from_static("x-request-id");
    let layers = ServiceBuilder::new()
        .layer(SetSensitiveRequestHeadersLayer::new([header::AUTHORIZATION]))
        .layer(SetRequestIdLayer::new(request_id.clone(), middleware::MakeRequestUuidV7))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(middleware::make_span)
                .on_response(middleware::log_response),
        )
        .layer(PropagateRequestIdLayer::new(request_id))
        .layer(CatchPanicLayer::custom(middleware::panic_response))
        // Without an allowed origin there is nothing for CORS to allow: no layer, no `Vary`
        // headers on every answer (a browser's preflight then fails, as it would anyway).
        .option_layer(
            state
                .limits
                .cors_origins
                .iter()
                .any(|o| !o.is_empty())
                .then(|| cors(&state.limits.cors_origins, state.limits.cors_credentials)),
        )
        .layer(MapResponseLayer::new(middleware::problem_fallback))
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes));
    // The principal is needed by the rate limits (per key, or per address without keys) and to
    // authenticate; with neither, the two layers would only pass requests on, so they are left out.
    let (limited, keyed) = (state.rate_limits.is_on(), state.auth.is_on());
    let (auth, rate_limits) = (Arc::clone(&state.auth), Arc::clone(&state.rate_limits));
    let ui = if state.limits.ui { ui::router() } else { Router::new() };
    let scrape = match &state.metrics {
        Some(metrics) if state.limits.metrics_on_main => observe::metrics_router(
            Arc::clone(metrics),
            (!state.limits.metrics_public).then(|| Arc::clone(&state.auth)),
        ),
        _ => Router::new(),
    };
    let observed = (state.metrics.is_some() || observe::access_log_enabled()).then(|| state.metrics.clone());
    let mut app = api
        .route_layer(axum::middleware::from_fn(observe::tag_route))
        .merge(SwaggerUi::new("/docs").url("/openapi.json", spec))
        .merge(ui)
        .fallback(middleware::not_found)
        .method_not_allowed_fallback(middleware::method_not_allowed)
        .with_state(state)
        .merge(scrape);
    if limited {
        app = app.layer(axum::middleware::from_fn_with_state(rate_limits, ratelimit::enforce));
    }
    if limited || keyed {
        app = app.layer(axum::middleware::from_fn_with_state(auth, auth::authenticate));
    }
    if let Some(metrics) = observed {
        // Outside authentication and rate limits: their 401s and 429s are counted too.
        app = app.layer(axum::middleware::from_fn_with_state(metrics, observe::observe));
    }
    if crate::telemetry::enabled() {
        // Outermost of the API's own layers: the request span covers authentication too.
        app = app.layer(axum::middleware::from_fn(observe::trace_request));
    }
    // Before authentication and everything else that reads the head.
    app.layer(axum::middleware::from_fn(middleware::check_head)).layer(layers)
}

/// The OpenAPI document as pretty JSON with a trailing newline, exactly as committed.
pub fn openapi_json() -> String {
    let mut text = openapi().to_pretty_json().expect("the OpenAPI document serialises");
    text.push('\n');
    text
}
