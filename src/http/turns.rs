//! `/v1/sessions/{id}/turns/{turn_id}`: read a turn's record, cancel a running turn.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::AppState;
use super::extract::{Tenant, TurnIdParams, session_id};
use crate::domain::{Turn, TurnStatus};
use crate::error::{AppError, Problem, Result};

/// The routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_turn)).routes(routes!(cancel_turn))
}

async fn read_turn(state: &AppState, tenant: &str, id: &str, turn_id: Uuid) -> Result<Turn> {
    if state.store.get_session(tenant, id).await?.is_none() {
        return Err(AppError::SessionNotFound(id.to_owned()));
    }
    state.agent.repaired_turn(tenant, id, turn_id).await?.ok_or(AppError::TurnNotFound(turn_id))
}

/// Read a turn: its status, error, message ids and usage.
#[utoipa::path(get, path = "/v1/sessions/{id}/turns/{turn_id}", tag = "turns",
    params(TurnIdParams),
    responses(
        (status = 200, description = "The turn", body = Turn),
        (status = 400, description = "Invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session or turn", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_turn(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path((id, turn_id)): Path<(String, String)>,
) -> Result<Json<Turn>> {
    let id = session_id(id)?;
    let turn_id = parse_turn_id(&turn_id)?;
    read_turn(&state, &tenant, &id, turn_id).await.map(Json)
}

/// Cancel a running turn: the model call and tools stop, the text produced so far is saved with
/// `metadata.status = "cancelled"`, and an open stream gets `turn.cancelled`.
#[utoipa::path(post, path = "/v1/sessions/{id}/turns/{turn_id}/cancel", tag = "turns",
    params(TurnIdParams),
    responses(
        (status = 200, description = "The cancelled turn", body = Turn),
        (status = 400, description = "Invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session or turn", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The turn has already ended", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn cancel_turn(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path((id, turn_id)): Path<(String, String)>,
) -> Result<Json<Turn>> {
    let id = session_id(id)?;
    let turn_id = parse_turn_id(&turn_id)?;
    let local = state.agent.registry().cancel(&tenant, &id, turn_id);
    // A turn running on another replica sees the request at its next lease renewal (≤ 1 s).
    if !local
        && !state
            .store
            .request_cancel(&tenant, &id, turn_id)
            .await
            .map_err(|e| AppError::from_store(e, &id))?
    {
        let turn = read_turn(&state, &tenant, &id, turn_id).await?;
        return Err(AppError::TurnFinished(turn.id));
    }
    // The turn saves its partial text and records itself as cancelled; wait for that, boundedly.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let turn = read_turn(&state, &tenant, &id, turn_id).await?;
        if turn.status != TurnStatus::Running || tokio::time::Instant::now() >= deadline {
            return Ok(Json(turn));
        }
        tokio::time::sleep(Duration::from_millis(if local { 5 } else { 50 })).await;
    }
}

fn parse_turn_id(text: &str) -> Result<Uuid> {
    Uuid::parse_str(text)
        .map_err(|_| AppError::BadRequest(format!("invalid turn id {text:?}: expected a UUID")))
}
