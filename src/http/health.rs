//! `/healthz` (liveness) and `/readyz` (readiness: the store answers, and no shutdown is under way).

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use crate::error::{AppError, Problem, Result};

/// The routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(healthz)).routes(routes!(readyz))
}

/// Health status.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `ready`.
    pub status: &'static str,
    /// The store backend.
    pub store: &'static str,
}

/// Liveness: the process serves HTTP.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "Alive", body = Health)))]
pub async fn healthz(State(state): State<AppState>) -> Json<Health> {
    Json(Health { status: "ok", store: state.agent.store_backend() })
}

/// Readiness: the store is reachable and the service is not shutting down.
#[utoipa::path(get, path = "/readyz", tag = "health", responses(
    (status = 200, description = "Ready", body = Health),
    (status = 503, description = "Not ready", body = Problem, content_type = "application/problem+json"),
))]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Health>> {
    if state.agent.registry().is_closed() {
        return Err(AppError::ShuttingDown);
    }
    let ping = tokio::time::timeout(state.limits.store_timeout, state.agent.ping_store()).await;
    match ping {
        Ok(Ok(())) => Ok(Json(Health { status: "ready", store: state.agent.store_backend() })),
        Ok(Err(e)) => Err(AppError::StoreUnavailable(e.to_string())),
        Err(_) => Err(AppError::StoreUnavailable("ping timed out".to_owned())),
    }
}
