//! `/v1/sessions/{id}/messages`: post a user turn (JSON or SSE), read history pages, clear history.

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::{ApiJson, ApiQuery, SessionIdParam, Tenant, page_limit, session_id};
use super::sse;
use crate::agent::{Order, PageQuery};
use crate::agent::{StartedTurn, TurnEvent, TurnInput, TurnResult, TurnStart};
use crate::config::IfBusy;
use crate::domain::{Message, Metadata};
use crate::error::{AppError, Problem, Result};

/// The turn routes (no request timeout: turns have their own): post, and regenerate.
pub fn turn_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(post_message)).routes(routes!(super::turns::regenerate_turn))
}

/// The history routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_messages, clear_messages))
}

/// Body of `POST /v1/sessions/{id}/messages`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct PostMessage {
    /// The user's text: not blank, no NUL characters, at most `PARLEY_MAX_CONTENT_BYTES` bytes.
    #[schema(min_length = 1, pattern = r"^[^\x00]*[^\s\x00][^\x00]*$")]
    pub content: String,
    /// Metadata stored with the user message (a JSON object).
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Metadata>,
    /// If another turn runs in the session: `reject` (409) or `wait` for it; default `PARLEY_IF_BUSY`.
    pub if_busy: Option<IfBusy>,
    /// Edit and resend: the seq of a user message of the active history. The turn runs with the
    /// history before it, and when it is saved every active message from that seq on becomes
    /// superseded (kept, with `superseded_by`), in the same atomic step.
    #[schema(minimum = 1)]
    pub replace_from: Option<u64>,
}

/// One Server-Sent Event of a streamed turn.
#[derive(Debug, Serialize, ToSchema)]
pub struct TurnEventData {
    /// `turn.started`, `message.delta`, `tool.call`, `tool.result`, `message.completed`,
    /// `turn.completed`, `turn.failed` or `turn.cancelled`.
    pub event: String,
    /// 1, 2, 3… within the turn.
    pub id: String,
    /// One line of JSON with the turn id and the event's fields (see the README's event list).
    pub data: String,
}

/// Query of `POST /v1/sessions/{id}/messages`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PostMessageQuery {
    /// Stream the turn as Server-Sent Events (same as `Accept: text/event-stream`).
    pub stream: Option<bool>,
}

/// Query of `GET /v1/sessions/{id}/messages`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListMessagesQuery {
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
    /// `asc` (oldest first, the default) or `desc`.
    #[param(inline)]
    pub order: Option<Order>,
    /// Only messages with a greater seq.
    #[param(minimum = 0)]
    pub after: Option<i64>,
    /// Only messages with a smaller seq.
    #[param(minimum = 0)]
    pub before: Option<i64>,
    /// The `next_cursor` of the previous page (same as `after` for asc, `before` for desc).
    #[param(minimum = 0)]
    pub cursor: Option<i64>,
    /// Superseded messages too (replaced by an edit or a regenerate; they carry
    /// `superseded_by`), merged with the active ones in seq order, with the same cursors.
    pub include_superseded: Option<bool>,
}

/// A page of history.
#[derive(Debug, Serialize, ToSchema)]
pub struct MessageList {
    /// Messages in the requested order.
    pub data: Vec<Message>,
    /// Whether another page follows.
    pub has_more: bool,
    /// Pass as `cursor` (or as `after` for asc, `before` for desc) to get the next page.
    pub next_cursor: Option<String>,
}

/// The headers a turn request reads, taken from the request without copying its header map.
pub struct TurnHeaders {
    /// `Accept` names `text/event-stream`.
    pub event_stream: bool,
    /// The raw `Idempotency-Key`, checked by the handler.
    pub idempotency_key: Option<HeaderValue>,
}

impl<S: Send + Sync> FromRequestParts<S> for TurnHeaders {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let event_stream = parts
            .headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|part| part.trim().starts_with("text/event-stream")));
        Ok(TurnHeaders { event_stream, idempotency_key: parts.headers.get("idempotency-key").cloned() })
    }
}

/// 422 for blank content or content with NUL characters, 413 over the content limit.
pub fn validate_content(state: &AppState, content: &str) -> Result<()> {
    if content.trim().is_empty() {
        return Err(AppError::Validation("content must not be empty".to_owned()));
    }
    if content.contains('\0') {
        return Err(AppError::Validation("content must not contain NUL characters".to_owned()));
    }
    state.limits.check_text("content", content)
}

/// Post a user turn; the reply comes back as JSON, or as Server-Sent Events when asked.
#[utoipa::path(post, path = "/v1/sessions/{id}/messages", tag = "messages",
    params(SessionIdParam, PostMessageQuery,
        ("Idempotency-Key" = Option<String>, Header, pattern = r"^[!-~]{1,255}$", description = "Retry-safe key (1 to 255 visible ASCII characters): a retry with the same key and body returns the same turn without running the model again")),
    request_body(content = PostMessage, content_type = "application/json"),
    responses(
        (status = 200, description = "The turn's stored messages (JSON), or its events (SSE: turn.started, message.delta, tool.call, tool.result, message.completed, turn.completed | turn.failed | turn.cancelled)",
            content((TurnResult = "application/json"), (TurnEventData = "text/event-stream"))),
        (status = 400, description = "Malformed JSON or invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Another turn is running in the session", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Content or body too large", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields, or `invalid_replace_from` (not a user message of the active history)", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The model failed; nothing was stored", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable (nothing stored), shutting down, turn_abandoned (the turn lost its session lock), or turn_outcome_unknown (the store did not confirm the final append: read the turn named by turn_id later)", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "The model timed out; nothing was stored", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn post_message(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<PostMessageQuery>,
    headers: TurnHeaders,
    ApiJson(body): ApiJson<PostMessage>,
) -> Result<Response> {
    let session_id = session_id(id)?;
    validate_content(&state, &body.content)?;
    let metadata = body.metadata.unwrap_or_default();
    state.limits.check_metadata(&metadata)?;
    let idempotency_key = idempotency_key(headers.idempotency_key.as_ref())?;
    let if_busy = body.if_busy.unwrap_or(state.limits.if_busy);
    let stream = query.stream.unwrap_or(false) || headers.event_stream;
    let replace_from = body.replace_from;
    let input = TurnInput {
        tenant,
        session_id,
        content: body.content,
        metadata,
        if_busy,
        idempotency_key,
        stream,
        replace_from,
    };
    let start = state.agent.start_turn(input).await?;
    turn_response(&state, start, stream).await
}

/// Renders how a turn request was answered: the turn's events (SSE) or its result (JSON).
pub async fn turn_response(state: &AppState, start: TurnStart, stream: bool) -> Result<Response> {
    let turn_id = start.turn_id();
    let mut response = match start {
        TurnStart::Started(StartedTurn { feed: Some(feed), outcome, .. }) if stream => {
            let events = outcome.driving(Box::pin(feed.follow()));
            sse::turn_stream(events, state.limits.sse_keepalive).into_response()
        }
        TurnStart::Attached { events, .. } => {
            let mut response = sse::turn_stream(events, state.limits.sse_keepalive).into_response();
            response
                .headers_mut()
                .insert("idempotent-replayed", axum::http::HeaderValue::from_static("true"));
            response
        }
        TurnStart::Started(started) => Json(started.outcome.await?).into_response(),
        TurnStart::Replayed(result) => {
            let mut response = if stream {
                let events = futures::stream::iter(TurnEvent::replay(&result));
                sse::turn_stream(events, state.limits.sse_keepalive).into_response()
            } else {
                Json(result).into_response()
            };
            response
                .headers_mut()
                .insert("idempotent-replayed", axum::http::HeaderValue::from_static("true"));
            response
        }
    };
    if let Some(turn_id) = turn_id {
        response.extensions_mut().insert(super::observe::TurnRef(turn_id));
    }
    Ok(response)
}

/// A streamed turn's events, however the request was answered (a client dialect renders them
/// in its own wire format): a started turn's driven by the reader, an attached one's from its
/// first event, a replayed one's rebuilt from its result.
pub async fn streamed_events(start: TurnStart) -> Result<futures::stream::BoxStream<'static, TurnEvent>> {
    use futures::StreamExt;
    Ok(match start {
        TurnStart::Started(StartedTurn { feed: Some(feed), outcome, .. }) => {
            outcome.driving(Box::pin(feed.follow())).boxed()
        }
        TurnStart::Attached { events, .. } => events,
        TurnStart::Started(started) => {
            futures::stream::iter(TurnEvent::replay(&started.outcome.await?)).boxed()
        }
        TurnStart::Replayed(result) => futures::stream::iter(TurnEvent::replay(&result)).boxed(),
    })
}

/// The `Idempotency-Key` header: 1 to 255 visible ASCII characters.
pub fn idempotency_key(value: Option<&HeaderValue>) -> Result<Option<String>> {
    let Some(value) = value else { return Ok(None) };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()));
    key.map(|k| Some(k.to_owned())).ok_or_else(|| {
        AppError::BadRequest("Idempotency-Key must be 1 to 255 visible ASCII characters".to_owned())
    })
}

/// Read a page of history.
#[utoipa::path(get, path = "/v1/sessions/{id}/messages", tag = "messages",
    params(SessionIdParam, ListMessagesQuery),
    responses(
        (status = 200, description = "A page of history", body = MessageList),
        (status = 400, description = "Invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid query", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_messages(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<ListMessagesQuery>,
) -> Result<Json<MessageList>> {
    let id = session_id(id)?;
    let limit = page_limit(query.limit)?;
    let order = query.order.unwrap_or_default();
    let seq = |name: &str, v: Option<i64>| match v {
        Some(n) if n < 0 => Err(AppError::Validation(format!("{name} must be a seq (0 or more), got {n}"))),
        other => Ok(other.map(|n| n as u64)),
    };
    let (q_after, q_before, q_cursor) =
        (seq("after", query.after)?, seq("before", query.before)?, seq("cursor", query.cursor)?);
    let (after, before) = match (order, q_cursor) {
        (Order::Asc, Some(c)) => (Some(q_after.map_or(c, |a| a.max(c))), q_before),
        (Order::Desc, Some(c)) => (q_after, Some(q_before.map_or(c, |b| b.min(c)))),
        (_, None) => (q_after, q_before),
    };
    let include_superseded = query.include_superseded.unwrap_or(false);
    let query = PageQuery { limit, order, after, before, include_superseded };
    let page = state.agent.history_page(&tenant, &id, query).await?;
    let next_cursor = page.next_seq().map(|s| s.to_string());
    Ok(Json(MessageList { data: page.messages, has_more: page.has_more, next_cursor }))
}

/// Clear the history; the session stays, and seqs are never reused.
#[utoipa::path(delete, path = "/v1/sessions/{id}/messages", tag = "messages",
    params(SessionIdParam),
    responses(
        (status = 204, description = "Cleared"),
        (status = 400, description = "Invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn clear_messages(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let id = session_id(id)?;
    state.agent.clear_history(&tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
