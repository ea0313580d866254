//! `/v1/sessions`: create, list, read, update (metadata) and delete sessions.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::{ApiJson, ApiQuery, OptionalJson, SessionIdParam, Tenant, page_limit, session_id};
use crate::agent::SessionCursor;
use crate::domain::{Metadata, NewSession, Session, new_id};
use crate::error::{Problem, Result};

/// The routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_session, list_sessions))
        .routes(routes!(get_session, update_session, delete_session))
        .routes(routes!(fork_session))
}

/// Body of `POST /v1/sessions`; every field is optional.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct CreateSession {
    /// The session id, `[A-Za-z0-9._:-]{1,128}` but not `.` or `..`; a UUID v7 is chosen when
    /// omitted.
    #[schema(pattern = r"^(?!\.\.?$)[A-Za-z0-9._:-]{1,128}$", min_length = 1, max_length = 128)]
    pub id: Option<String>,
    /// The session's system prompt; the server default applies when omitted.
    pub system_prompt: Option<String>,
    /// Client metadata (a JSON object).
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Metadata>,
}

/// Body of `PATCH /v1/sessions/{id}`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct UpdateSession {
    /// The session's new metadata (a JSON object), replacing the old one whole.
    #[schema(value_type = Object)]
    pub metadata: Metadata,
}

/// Query of `GET /v1/sessions`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListSessionsQuery {
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = r"^-?[0-9]{1,18}\.[A-Za-z0-9._:-]{1,128}$")]
    pub cursor: Option<String>,
}

/// A page of sessions.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionList {
    /// Sessions, most recently updated first.
    pub data: Vec<Session>,
    /// Whether another page follows.
    pub has_more: bool,
    /// Pass as `cursor` to get the next page.
    pub next_cursor: Option<String>,
}

/// Create a session.
#[utoipa::path(post, path = "/v1/sessions", tag = "sessions",
    request_body(content = Option<CreateSession>, content_type = "application/json"),
    responses(
        (status = 201, description = "Created", body = Session, headers(("Location" = String))),
        (status = 400, description = "Malformed JSON or invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The id is taken (`session_exists`), or the tenant holds the most sessions allowed (`session_limit_reached`)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Too large", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_session(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    OptionalJson(body): OptionalJson<CreateSession>,
) -> Result<Response> {
    let id = match body.id {
        Some(id) => session_id(id)?,
        None => new_id().to_string(),
    };
    if let Some(prompt) = &body.system_prompt {
        state.limits.check_text("system_prompt", prompt)?;
    }
    let metadata = body.metadata.unwrap_or_default();
    state.limits.check_metadata(&metadata)?;
    let new = NewSession { id: id.clone(), system_prompt: body.system_prompt, metadata };
    let max = match state.limits.max_sessions_per_tenant {
        0 => None,
        max => Some(max),
    };
    let session = state.agent.create_session(&tenant, new, max).await?;
    let location = format!("/v1/sessions/{}", session.id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(session)).into_response())
}

/// List sessions, most recently updated first.
#[utoipa::path(get, path = "/v1/sessions", tag = "sessions", params(ListSessionsQuery),
    responses(
        (status = 200, description = "A page of sessions", body = SessionList),
        (status = 400, description = "Invalid cursor", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid limit", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_sessions(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    ApiQuery(query): ApiQuery<ListSessionsQuery>,
) -> Result<Json<SessionList>> {
    let limit = page_limit(query.limit)?;
    let cursor = query.cursor.as_deref().map(SessionCursor::decode).transpose()?;
    let page = state.agent.list_sessions(&tenant, limit, cursor.as_ref()).await?;
    let next_cursor =
        if page.has_more { page.sessions.last().map(|s| SessionCursor::after(s).encode()) } else { None };
    Ok(Json(SessionList { data: page.sessions, has_more: page.has_more, next_cursor }))
}

/// Read a session.
#[utoipa::path(get, path = "/v1/sessions/{id}", tag = "sessions",
    params(SessionIdParam),
    responses(
        (status = 200, description = "The session", body = Session),
        (status = 400, description = "Invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_session(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Json<Session>> {
    let id = session_id(id)?;
    state.agent.session(&tenant, &id).await.map(Json)
}

/// Update a session: replace its metadata (a chat's title, say). Its `updated_at`, and so its
/// place in the list, stay as they were.
#[utoipa::path(patch, path = "/v1/sessions/{id}", tag = "sessions",
    params(SessionIdParam),
    request_body(content = UpdateSession, content_type = "application/json"),
    responses(
        (status = 200, description = "The updated session", body = Session),
        (status = 400, description = "Malformed JSON or invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Metadata too large", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn update_session(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UpdateSession>,
) -> Result<Json<Session>> {
    let id = session_id(id)?;
    state.limits.check_metadata(&body.metadata)?;
    state.agent.set_session_metadata(&tenant, &id, body.metadata).await.map(Json)
}

/// Delete a session and all its history.
#[utoipa::path(delete, path = "/v1/sessions/{id}", tag = "sessions",
    params(SessionIdParam),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn delete_session(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let id = session_id(id)?;
    state.agent.delete_session(&tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Body of `POST /v1/sessions/{id}/fork`; every field is optional.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct ForkSession {
    /// The new session's id, `[A-Za-z0-9._:-]{1,128}`; a UUID v7 is chosen when omitted.
    #[schema(pattern = r"^[A-Za-z0-9._:-]{1,128}$", min_length = 1, max_length = 128)]
    pub id: Option<String>,
    /// Copy the active messages up to and including this seq (default: all). It may not cut a
    /// tool round (a tool call and its results).
    #[schema(minimum = 0)]
    pub up_to_seq: Option<u64>,
    /// The new session's metadata (a JSON object); the source's when omitted.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Metadata>,
}

/// Fork a session: a new session of the same tenant holding a copy of the source's active
/// history (up to `up_to_seq`), renumbered from 1, with new message ids and
/// `metadata.forked_from`, and the source's system prompt; written in one atomic step.
#[utoipa::path(post, path = "/v1/sessions/{id}/fork", tag = "sessions",
    params(SessionIdParam),
    request_body(content = Option<ForkSession>, content_type = "application/json"),
    responses(
        (status = 201, description = "The new session", body = Session, headers(("Location" = String))),
        (status = 400, description = "Malformed JSON or invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The new id is taken (`session_exists`), or the tenant holds the most sessions allowed (`session_limit_reached`)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`fork_too_large`: more messages than `PARLEY_FORK_MAX_MESSAGES`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields, or an `up_to_seq` inside a tool round", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn fork_session(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    OptionalJson(body): OptionalJson<ForkSession>,
) -> Result<Response> {
    let source = session_id(id)?;
    let id = match body.id {
        Some(id) => session_id(id)?,
        None => new_id().to_string(),
    };
    if let Some(metadata) = &body.metadata {
        state.limits.check_metadata(metadata)?;
    }
    let max_sessions = match state.limits.max_sessions_per_tenant {
        0 => u64::MAX,
        max => max,
    };
    let fork = crate::agent::history::Fork {
        tenant,
        source,
        id,
        up_to_seq: body.up_to_seq,
        metadata: body.metadata,
        max_sessions,
    };
    let session = state.agent.fork(fork).await?;
    let location = format!("/v1/sessions/{}", session.id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(session)).into_response())
}
