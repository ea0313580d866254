//! `/v1/ai-sdk/chat`: the Vercel AI SDK's chat dialect, so that `useChat` with
//! `DefaultChatTransport({api: ".../v1/ai-sdk/chat"})` talks to parley unchanged.
//!
//! The request is what the transport sends (`{id, messages, trigger, messageId}`); the answer is
//! the UI message stream, protocol v1 (`ai` 5 to 7): one `data: <chunk JSON>` per chunk, parley's
//! turn event number on the `id:` line, `data: [DONE]` last. Only the fields `ai@5.0.0`'s strict
//! chunk schemas accept are sent. The chunks are a rendering of parley's own turn events
//! ([`UiMessageChunks`]); the turn itself runs as any other.
//!
//! parley's stored history is the truth: the client's `messages` are not stored again, only the
//! text of the last user message is the turn's input (kept with the client's id in
//! `metadata.client_message_id`, so that the client can name it later).

use std::collections::HashSet;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::AppState;
use super::extract::{ApiJson, SessionIdParam, Tenant, session_id};
use super::messages::{streamed_events, validate_content};
use crate::agent::clients::{CLIENT_MESSAGE_ID, known_as};
use crate::agent::history::Regenerate;
use crate::agent::{TurnEvent, TurnInput, TurnStart};
use crate::config::IfBusy;
use crate::domain::{Message, Role};
use crate::error::{AppError, Problem, Result};

/// The routes that stream (no request timeout: turns have their own): post and resume.
pub fn stream_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(post_chat)).routes(routes!(resume_chat_stream))
}

/// The routes that answer at once: stop.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(stop_chat))
}

/// What the request asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// A new user message, or an edit when `messageId` (or the last user message's id) names a
    /// stored user message.
    #[default]
    SubmitMessage,
    /// Regenerate the last reply.
    RegenerateMessage,
}

/// One `UIMessage` of the client's list; only the last user message's text parts are read.
#[derive(Debug, Deserialize, ToSchema)]
pub struct UiMessage {
    /// The client's id of the message.
    pub id: String,
    /// `user`, `assistant` or `system`.
    pub role: String,
    /// The message's parts; a user message may have only `text` parts (`{type: "text", text}`).
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub parts: Vec<Value>,
}

/// Body of `POST /v1/ai-sdk/chat`: exactly what the AI SDK's `DefaultChatTransport` sends (other
/// fields, e.g. from the transport's `body` option, are ignored unless named here).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatRequest {
    /// The chat id: parley's session id, created for the caller's tenant on first use.
    pub id: String,
    /// The client's messages. Not stored: the turn's input is the text of the last user message.
    pub messages: Vec<UiMessage>,
    /// `submit-message` (the default) or `regenerate-message`.
    #[serde(default)]
    pub trigger: Trigger,
    /// For a submit: the user message being edited (parley's id or the client's). For a
    /// regenerate: a message of the last turn (else 409 `turn_not_last`).
    pub message_id: Option<String>,
    /// If another turn runs in the session: `reject` (409) or `wait`; default `PARLEY_IF_BUSY`.
    #[serde(alias = "if_busy")]
    pub if_busy: Option<IfBusy>,
}

/// Answer the AI SDK's chat transport with a UI message stream.
///
/// A submit runs a turn with the text of the last user message (an edit of a stored user message
/// when `messageId`, or the last user message's own id, names one); a regenerate runs the last
/// turn again. Chunks: `start` (parley's assistant message id) → per model round `start-step`,
/// `text-start`/`text-delta`/`text-end`, `tool-input-available` and `tool-output-available` (or
/// `tool-output-error`) with `dynamic: true`, `finish-step` → `finish`; a failed turn sends
/// `error`, a stopped one `abort`; then `data: [DONE]`.
#[utoipa::path(post, path = "/v1/ai-sdk/chat", tag = "clients",
    request_body(content = ChatRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The UI message stream (SSE, `x-vercel-ai-ui-message-stream: v1`): one `data: <chunk>` per chunk, ending with `data: [DONE]`",
            content((String = "text/event-stream")),
            headers(("x-vercel-ai-ui-message-stream" = String, description = "`v1`"))),
        (status = 400, description = "Malformed JSON or invalid chat id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Regenerate in a chat that does not exist", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A turn is running (`turn_in_progress`, with `x-should-retry: false`), `turn_not_last`, or the tenant's session cap", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Content or body too large", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "No user message, a part type other than `text`, blank text, or nothing to regenerate", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable or shutting down", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn post_chat(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    ApiJson(body): ApiJson<ChatRequest>,
) -> Result<Response> {
    let session = session_id(body.id.clone())?;
    let if_busy = body.if_busy.unwrap_or(state.limits.if_busy);
    let start = match body.trigger {
        Trigger::RegenerateMessage => regenerate(&state, tenant, session, body.message_id, if_busy).await?,
        Trigger::SubmitMessage => submit(&state, tenant, session, &body, if_busy).await?,
    };
    Ok(ui_message_stream(streamed_events(start).await?, state.limits.sse_keepalive))
}

/// Runs the text of the last user message as a turn; an edit if it names a stored user message.
async fn submit(
    state: &AppState,
    tenant: String,
    session: String,
    body: &ChatRequest,
    if_busy: IfBusy,
) -> Result<TurnStart> {
    let last = body
        .messages
        .iter()
        .rfind(|m| m.role == "user")
        .ok_or_else(|| AppError::Validation("messages has no user message".to_owned()))?;
    let content = text_of(last)?;
    validate_content(state, &content)?;
    let max_sessions = match state.limits.max_sessions_per_tenant {
        0 => u64::MAX,
        max => max,
    };
    state.agent.ensure_session(&tenant, &session, max_sessions).await?;
    let target = body.message_id.as_deref().unwrap_or(&last.id);
    let stored = state.agent.find_messages(&tenant, &session, &[target]).await?;
    let edited = stored.iter().find(|m| m.role == Role::User && m.superseded_by.is_none());
    let mut metadata = crate::domain::Metadata::new();
    metadata.insert(CLIENT_MESSAGE_ID.to_owned(), json!(last.id));
    let input = TurnInput {
        tenant,
        session_id: session,
        content,
        metadata,
        if_busy,
        idempotency_key: None,
        stream: true,
        replace_from: edited.map(|m| m.seq),
    };
    state.agent.start_turn(input).await
}

/// The text of a user message: its `text` parts, joined by new lines; any other part is 422.
fn text_of(message: &UiMessage) -> Result<String> {
    let mut texts = Vec::with_capacity(message.parts.len());
    for part in &message.parts {
        match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
            (Some("text"), Some(text)) => texts.push(text),
            (kind, _) => {
                return Err(AppError::Validation(format!(
                    "message {:?} has a part of type {}: parley takes the text parts of a user message only, for now",
                    message.id,
                    kind.map_or("(none)".to_owned(), |k| format!("{k:?}"))
                )));
            }
        }
    }
    Ok(texts.join("\n"))
}

/// Regenerates the session's last turn; `message_id`, when given, must name one of its messages.
async fn regenerate(
    state: &AppState,
    tenant: String,
    session: String,
    message_id: Option<String>,
    if_busy: IfBusy,
) -> Result<TurnStart> {
    state.agent.require_session(&tenant, &session).await?;
    let last = state.agent.last_turn_messages(&tenant, &session).await?;
    let turn_id = last
        .first()
        .map(|m| m.turn_id)
        .ok_or_else(|| AppError::Validation("the chat has no reply to regenerate".to_owned()))?;
    if let Some(id) = message_id.as_deref()
        && id != turn_id.to_string()
        && !last.iter().any(|m| known_as(m, id))
    {
        let named = state.agent.find_messages(&tenant, &session, &[id]).await?;
        return Err(match named.first() {
            Some(m) => AppError::TurnNotLast(m.turn_id),
            None => AppError::Validation(format!("messageId {id:?} names no message of this chat")),
        });
    }
    let request =
        Regenerate { tenant, session_id: session, turn_id, if_busy, idempotency_key: None, stream: true };
    state.agent.regenerate(request).await
}

/// Resume the chat's running reply: what `useChat({resume: true})` calls on mount.
///
/// 204 when no turn runs in the chat; else the running turn's UI message stream replayed from
/// `start` (the client rebuilds the message from scratch) and then live, on any replica with
/// Redis or PostgreSQL (the turn event log); with a one-process store, a turn running in another
/// process is told once it ends, as its whole message.
#[utoipa::path(get, path = "/v1/ai-sdk/chat/{id}/stream", tag = "clients",
    params(SessionIdParam),
    responses(
        (status = 200, description = "The running turn's UI message stream, from `start`", content((String = "text/event-stream"))),
        (status = 204, description = "No turn runs in the chat"),
        (status = 400, description = "Invalid chat id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such chat for this tenant", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn resume_chat_stream(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Response> {
    let id = session_id(id)?;
    state.agent.require_session(&tenant, &id).await?;
    let Some(turn_id) = state.agent.running_turn(&tenant, &id).await? else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let events = state.agent.follow(&tenant, &id, turn_id, 0).await?;
    Ok(ui_message_stream(events, state.limits.sse_keepalive))
}

/// Stop the chat's running reply: the turn is cancelled (its partial text is saved, marked
/// `metadata.status = "cancelled"`), and its open stream ends with `abort`. 204 also when no
/// turn runs.
#[utoipa::path(post, path = "/v1/ai-sdk/chat/{id}/stop", tag = "clients",
    params(SessionIdParam),
    responses(
        (status = 204, description = "Stopped, or nothing ran"),
        (status = 400, description = "Invalid chat id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such chat for this tenant", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn stop_chat(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let id = session_id(id)?;
    state.agent.require_session(&tenant, &id).await?;
    if let Some(turn_id) = state.agent.running_turn(&tenant, &id).await? {
        match state.agent.cancel_and_wait(&tenant, &id, turn_id).await {
            Ok(_) | Err(AppError::TurnFinished(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The SSE response of a UI message stream, with the headers the AI SDK documents.
fn ui_message_stream(
    events: impl Stream<Item = TurnEvent> + Send + 'static,
    keepalive: Duration,
) -> Response {
    let mut chunks = UiMessageChunks::default();
    let stream = events.enumerate().flat_map(move |(i, event)| {
        let id = (i + 1).to_string();
        let mut frames: Vec<Result<Event, Infallible>> = chunks
            .push(&event)
            .iter()
            .map(|chunk| Ok(Event::default().id(&id).data(chunk.to_string())))
            .collect();
        if event.is_terminal() {
            frames.push(Ok(Event::default().data("[DONE]")));
        }
        futures::stream::iter(frames)
    });
    let mut response =
        Sse::new(stream).keep_alive(KeepAlive::new().interval(keepalive).text("keep-alive")).into_response();
    let headers = response.headers_mut();
    headers.insert("x-vercel-ai-ui-message-stream", HeaderValue::from_static("v1"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// Renders parley's turn events as UI message chunks. One UI message spans the turn (its id is
/// the turn's first assistant message's); each model round is a step.
#[derive(Debug, Default)]
pub struct UiMessageChunks {
    /// `{session_id, turn_id}`, once the turn has started.
    metadata: Option<Value>,
    /// Whether `start` was sent.
    started: bool,
    /// The assistant message whose step is open.
    step: Option<Uuid>,
    /// The assistant message whose text part is open.
    text: Option<Uuid>,
    /// The assistant messages whose text was sent.
    texted: HashSet<Uuid>,
}

impl UiMessageChunks {
    /// The chunks of one turn event (`[DONE]` is the caller's, after a terminal event).
    pub fn push(&mut self, event: &TurnEvent) -> Vec<Value> {
        let mut out = Vec::new();
        match event {
            TurnEvent::Started { turn_id, session_id, .. } => {
                self.metadata = Some(json!({"session_id": session_id, "turn_id": turn_id}));
            }
            TurnEvent::Delta { message_id, delta, .. } if !delta.is_empty() => {
                self.open_text(*message_id, &mut out);
                out.push(json!({"type": "text-delta", "id": message_id.to_string(), "delta": delta}));
            }
            TurnEvent::Delta { .. } => {}
            TurnEvent::ToolCall { message, .. } => {
                self.whole_text(message, &mut out);
                self.close_text(&mut out);
                self.enter(message.id, &mut out);
                for call in message.tool_calls.iter().flatten() {
                    out.push(
                        json!({"type": "tool-input-available", "toolCallId": call.id, "toolName": call.name,
                        "input": call.arguments, "dynamic": true}),
                    );
                }
            }
            TurnEvent::ToolResult { message, .. } => out.push(tool_output(message)),
            TurnEvent::MessageCompleted { message, .. } => {
                self.whole_text(message, &mut out);
                self.close_text(&mut out);
            }
            TurnEvent::Completed { messages, .. } => {
                if let Some(last) = messages.last().filter(|m| m.role == Role::Assistant) {
                    self.whole_text(last, &mut out);
                }
                self.close_step(&mut out);
                let mut metadata = self.metadata.clone().unwrap_or_else(|| json!({}));
                metadata["seq"] = json!(messages.last().map(|m| m.seq));
                out.push(json!({"type": "finish", "messageMetadata": metadata}));
            }
            TurnEvent::Cancelled { messages, .. } => {
                if let Some(last) = messages.last().filter(|m| m.role == Role::Assistant) {
                    self.whole_text(last, &mut out);
                }
                self.close_step(&mut out);
                out.push(json!({"type": "abort"}));
            }
            TurnEvent::Failed { error, .. } => {
                out.push(json!({"type": "error", "errorText": error.detail}));
            }
        }
        out
    }

    /// Sends `start` once, then opens the step of `message` (closing the one before).
    fn enter(&mut self, message: Uuid, out: &mut Vec<Value>) {
        if !self.started {
            self.started = true;
            let mut start = json!({"type": "start", "messageId": message.to_string()});
            if let Some(metadata) = &self.metadata {
                start["messageMetadata"] = metadata.clone();
            }
            out.push(start);
        }
        if self.step != Some(message) {
            self.close_step(out);
            out.push(json!({"type": "start-step"}));
            self.step = Some(message);
        }
    }

    /// Opens the text part of `message` (closing the one before).
    fn open_text(&mut self, message: Uuid, out: &mut Vec<Value>) {
        self.enter(message, out);
        if self.text != Some(message) {
            self.close_text(out);
            out.push(json!({"type": "text-start", "id": message.to_string()}));
            self.text = Some(message);
        }
        self.texted.insert(message);
    }

    /// Sends a message's whole text as one delta, if none of it was streamed (a replay, or a
    /// turn told from its record).
    fn whole_text(&mut self, message: &Message, out: &mut Vec<Value>) {
        if message.content.is_empty() || self.texted.contains(&message.id) {
            return;
        }
        self.open_text(message.id, out);
        out.push(json!({"type": "text-delta", "id": message.id.to_string(), "delta": message.content}));
    }

    fn close_text(&mut self, out: &mut Vec<Value>) {
        if let Some(id) = self.text.take() {
            out.push(json!({"type": "text-end", "id": id.to_string()}));
        }
    }

    fn close_step(&mut self, out: &mut Vec<Value>) {
        self.close_text(out);
        if self.step.take().is_some() {
            out.push(json!({"type": "finish-step"}));
        }
    }
}

/// `tool-output-available`, or `tool-output-error` for a tool that failed.
fn tool_output(message: &Message) -> Value {
    let call = message.tool_call_id.clone().unwrap_or_default();
    if message.metadata.get("is_error").and_then(Value::as_bool) == Some(true) {
        json!({"type": "tool-output-error", "toolCallId": call, "errorText": message.content, "dynamic": true})
    } else {
        json!({"type": "tool-output-available", "toolCallId": call, "output": message.content, "dynamic": true})
    }
}
