//! `/v1/sessions/{id}/turns/{turn_id}`: read a turn's record, follow its events, cancel it.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::extract::{ApiQuery, Tenant, TurnIdParams, session_id};
use super::{AppState, sse};
use crate::agent::TurnResult;
use crate::domain::Turn;
use crate::error::{AppError, Problem, Result};

/// Query of `GET /v1/sessions/{id}/turns/{turn_id}/events`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FollowQuery {
    /// Resume after this event, like `Last-Event-ID` (which wins when both are sent): for a
    /// browser `EventSource`, which cannot set a header on its first connection.
    #[param(minimum = 0, maximum = 999_999_999_999_999_999_i64)]
    pub after: Option<u64>,
}

/// The routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_turn)).routes(routes!(follow_turn)).routes(routes!(cancel_turn))
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
    state.agent.turn(&tenant, &id, turn_id).await.map(Json)
}

/// Follow a turn's events (SSE): resume a stream after a lost connection or a page reload.
///
/// A streamed turn is followed live, from its first event, or from the one after `Last-Event-ID`,
/// with its original ids: on any replica with Redis or PostgreSQL (the store's turn event log),
/// else on the replica running it. A turn without logged events (a JSON turn, an expired log, a
/// turn in another process of a one-process store) is waited for, with keep-alives, and then told
/// as a finished one is: `turn.started`, `message.completed` and `turn.completed` with the stored
/// messages, or `turn.failed`, or `turn.cancelled`.
#[utoipa::path(get, path = "/v1/sessions/{id}/turns/{turn_id}/events", tag = "turns",
    params(TurnIdParams, FollowQuery,
        ("Last-Event-ID" = Option<String>, Header, nullable = false, pattern = r"^[0-9]{1,19}$", description = "The id of the last event received: a live turn's stream goes on after it")),
    responses(
        (status = 200, description = "The turn's events (SSE: turn.started, message.delta, tool.call, tool.result, message.completed, turn.completed | turn.failed | turn.cancelled)",
            content((super::messages::TurnEventData = "text/event-stream"))),
        (status = 400, description = "Invalid id or Last-Event-ID", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session or turn", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid query", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn follow_turn(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path((id, turn_id)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<FollowQuery>,
    headers: HeaderMap,
) -> Result<Response> {
    let id = session_id(id)?;
    let turn_id = parse_turn_id(&turn_id)?;
    let after = last_event_id(&headers)?.or(query.after).unwrap_or(0);
    let events = state.agent.follow(&tenant, &id, turn_id, after).await?;
    Ok(sse::turn_stream_after(events, after, state.limits.sse_keepalive).into_response())
}

/// The `Last-Event-ID` header as an event number: 1 to 19 digits, as parley writes event ids.
fn last_event_id(headers: &HeaderMap) -> Result<Option<u64>> {
    let Some(value) = headers.get("last-event-id") else { return Ok(None) };
    let digits = value.as_bytes();
    let valid = (1..=19).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit);
    let id = valid.then(|| std::str::from_utf8(digits).ok()?.parse::<u64>().ok()).flatten();
    let message = "Last-Event-ID must be the id of an event of this turn's stream (digits)";
    id.map(Some).ok_or_else(|| AppError::BadRequest(message.to_owned()))
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
    state.agent.cancel_and_wait(&tenant, &id, turn_id).await.map(Json)
}

fn parse_turn_id(text: &str) -> Result<Uuid> {
    Uuid::parse_str(text)
        .map_err(|_| AppError::BadRequest(format!("invalid turn id {text:?}: expected a UUID")))
}

/// Body of `POST /v1/sessions/{id}/turns/{turn_id}/regenerate`; every field is optional.
#[derive(Debug, Default, serde::Deserialize, utoipa::ToSchema)]
pub struct RegenerateTurn {
    /// If another turn runs in the session: `reject` (409) or `wait` for it; default `PARLEY_IF_BUSY`.
    pub if_busy: Option<crate::config::IfBusy>,
}

/// Regenerate the session's last turn: run it again with the same user message (its new copy
/// records `metadata.regenerated_from`); once saved, the old turn's messages are superseded.
#[utoipa::path(post, path = "/v1/sessions/{id}/turns/{turn_id}/regenerate", tag = "turns",
    params(TurnIdParams, super::messages::PostMessageQuery,
        ("Idempotency-Key" = Option<String>, Header, pattern = r"^[!-~]{1,255}$", description = "Retry-safe key: a retry with the same key returns the same new turn without running the model again")),
    request_body(content = Option<RegenerateTurn>, content_type = "application/json"),
    responses(
        (status = 200, description = "The new turn's stored messages (JSON), or its events (SSE, as a post's)",
            content((TurnResult = "application/json"), (super::messages::TurnEventData = "text/event-stream"))),
        (status = 400, description = "Malformed JSON or invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session or turn", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`turn_not_last` (only the last turn can be regenerated), or a turn is running (`turn_in_progress`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The model failed; nothing was stored or superseded", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable, shutting down, turn_abandoned or turn_outcome_unknown (as a post)", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "The model timed out; nothing was stored or superseded", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn regenerate_turn(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path((id, turn_id)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<super::messages::PostMessageQuery>,
    headers: super::messages::TurnHeaders,
    super::extract::OptionalJson(body): super::extract::OptionalJson<RegenerateTurn>,
) -> Result<Response> {
    let session_id = session_id(id)?;
    let turn_id = parse_turn_id(&turn_id)?;
    let idempotency_key = super::messages::idempotency_key(headers.idempotency_key.as_ref())?;
    let stream = query.stream.unwrap_or(false) || headers.event_stream;
    let request = crate::agent::history::Regenerate {
        tenant,
        session_id,
        turn_id,
        if_busy: body.if_busy.unwrap_or(state.limits.if_busy),
        idempotency_key,
        stream,
    };
    let start = state.agent.regenerate(request).await?;
    super::messages::turn_response(&state, start, stream).await
}
