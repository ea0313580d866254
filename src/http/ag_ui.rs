//! `/v1/ag-ui`: the AG-UI dialect, so that an AG-UI `HttpAgent` (CopilotKit and others) talks to
//! parley unchanged.
//!
//! The request is a `RunAgentInput`; the answer is AG-UI's event stream as Server-Sent Events,
//! data only (`data: <event JSON>`, no `event:` or `id:` lines, no `[DONE]`): `RUN_STARTED`, then
//! parley's turn events rendered as AG-UI events ([`AgUiEvents`]), then `RUN_FINISHED` or
//! `RUN_ERROR`, nothing after it. The turn itself runs as any other.
//!
//! parley's stored history is the truth: the client's `messages` are not stored again; the turn's
//! input is the last user message whose id parley has not stored yet (kept with that id in
//! `metadata.client_message_id`, so a resent history never stores it twice). Client-declared
//! `tools`, `context`, `state` and `forwardedProps` are accepted and ignored for now: parley runs
//! its own server tools only.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
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
use super::extract::{ApiJson, Tenant, session_id};
use super::messages::{streamed_events, validate_content};
use crate::agent::clients::{CLIENT_MESSAGE_ID, known_as};
use crate::agent::{TurnEvent, TurnInput};
use crate::domain::{Message, Role};
use crate::error::{AppError, Problem, Result};

/// The route (no request timeout: turns have their own).
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(run_agent))
}

/// One message of the client's list.
#[derive(Debug, Deserialize, ToSchema)]
pub struct AgUiMessage {
    /// The client's id of the message.
    pub id: String,
    /// `user`, `assistant`, `system`, `developer`, `tool`…
    pub role: String,
    /// A string, or (for a user message) an array of parts of which parley reads `text` ones.
    #[schema(value_type = Option<Object>)]
    pub content: Option<Value>,
}

/// Body of `POST /v1/ag-ui`: AG-UI's `RunAgentInput`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunAgentInput {
    /// The thread: parley's session id, created for the caller's tenant on first use.
    pub thread_id: String,
    /// The run, named by the client; echoed in `RUN_STARTED` and `RUN_FINISHED`.
    pub run_id: String,
    /// The client's messages. Not stored: the turn's input is the last user message parley has
    /// not stored yet.
    pub messages: Vec<AgUiMessage>,
    /// Client-declared tools: ignored for now (parley runs its own server tools).
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Value>,
    /// Ignored.
    #[schema(value_type = Option<Vec<Object>>)]
    pub context: Option<Value>,
    /// Ignored.
    #[schema(value_type = Option<Object>)]
    pub state: Option<Value>,
    /// Ignored.
    #[schema(value_type = Option<Object>)]
    pub forwarded_props: Option<Value>,
}

/// Run an AG-UI agent: one turn with the last user message parley has not stored yet.
///
/// Events (data-only SSE): `RUN_STARTED {threadId, runId}`, `CUSTOM {name: "parley.turn", value:
/// {session_id, turn_id}}`, `TEXT_MESSAGE_START/CONTENT/END` for assistant text, `TOOL_CALL_START/
/// ARGS/END` and `TOOL_CALL_RESULT` for parley's server tools, then `RUN_FINISHED {threadId,
/// runId}` (with `outcome: {type: "cancelled"}` for a cancelled turn) or `RUN_ERROR {message,
/// code}`.
#[utoipa::path(post, path = "/v1/ag-ui", tag = "clients",
    request_body(content = RunAgentInput, content_type = "application/json"),
    responses(
        (status = 200, description = "AG-UI events (SSE, `data:` lines only)", content((String = "text/event-stream"))),
        (status = 400, description = "Malformed JSON or invalid thread id", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A turn is running (`turn_in_progress`, with `x-should-retry: false`), or the tenant's session cap", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Content or body too large", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "No user message parley has not stored yet, a content part other than text, or blank text", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable or shutting down", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn run_agent(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    ApiJson(input): ApiJson<RunAgentInput>,
) -> Result<Response> {
    let session = session_id(input.thread_id.clone())?;
    let users: Vec<&AgUiMessage> = input.messages.iter().filter(|m| m.role == "user").collect();
    if users.is_empty() {
        return Err(AppError::Validation("messages has no user message".to_owned()));
    }
    let max_sessions = match state.limits.max_sessions_per_tenant {
        0 => u64::MAX,
        max => max,
    };
    state.agent.ensure_session(&tenant, &session, max_sessions).await?;
    let ids: Vec<&str> = users.iter().map(|m| m.id.as_str()).collect();
    let stored = state.agent.find_messages(&tenant, &session, &ids).await?;
    let new = users.iter().rev().find(|m| !stored.iter().any(|s| known_as(s, &m.id))).ok_or_else(|| {
        AppError::Validation("messages has no user message that parley has not stored yet".to_owned())
    })?;
    let content = text_of(new)?;
    validate_content(&state, &content)?;
    let mut metadata = crate::domain::Metadata::new();
    metadata.insert(CLIENT_MESSAGE_ID.to_owned(), json!(new.id));
    let turn = TurnInput {
        tenant,
        session_id: session,
        content,
        metadata,
        if_busy: state.limits.if_busy,
        idempotency_key: None,
        stream: true,
        replace_from: None,
    };
    let start = state.agent.start_turn(turn).await?;
    let events = streamed_events(start).await?;
    Ok(ag_ui_stream(events, AgUiEvents::new(input.thread_id, input.run_id), state.limits.sse_keepalive))
}

/// The text of a user message: a string, or its `text` parts joined by new lines; any other
/// part is 422.
fn text_of(message: &AgUiMessage) -> Result<String> {
    let unsupported = |kind: &str| {
        AppError::Validation(format!(
            "message {:?} has content of type {kind}: parley takes text only, for now",
            message.id
        ))
    };
    match &message.content {
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(text)) => texts.push(text),
                    (kind, _) => return Err(unsupported(&format!("{:?}", kind.unwrap_or("(none)")))),
                }
            }
            Ok(texts.join("\n"))
        }
        _ => Err(unsupported("(none)")),
    }
}

/// The SSE response: data-only events, nothing after the run's last event.
fn ag_ui_stream(
    events: impl Stream<Item = TurnEvent> + Send + 'static,
    mut writer: AgUiEvents,
    keepalive: Duration,
) -> Response {
    let stream = events.flat_map(move |event| {
        let frames: Vec<Result<Event, Infallible>> =
            writer.push(&event).into_iter().map(|e| Ok(Event::default().data(e.to_string()))).collect();
        futures::stream::iter(frames)
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(keepalive).text("keep-alive")).into_response()
}

/// Renders parley's turn events as AG-UI events.
#[derive(Debug)]
pub struct AgUiEvents {
    thread_id: String,
    run_id: String,
    /// Whether `RUN_STARTED` was sent.
    started: bool,
    /// The assistant message whose text message is open.
    text: Option<Uuid>,
    /// The assistant messages whose text was sent.
    texted: Vec<Uuid>,
}

impl AgUiEvents {
    /// The renderer of one run.
    pub fn new(thread_id: String, run_id: String) -> Self {
        AgUiEvents { thread_id, run_id, started: false, text: None, texted: Vec::new() }
    }

    /// The AG-UI events of one turn event.
    pub fn push(&mut self, event: &TurnEvent) -> Vec<Value> {
        let mut out = Vec::new();
        self.start(event, &mut out);
        match event {
            TurnEvent::Started { .. } => {}
            TurnEvent::Delta { message_id, delta, .. } if !delta.is_empty() => {
                self.open_text(*message_id, &mut out);
                out.push(json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": message_id.to_string(), "delta": delta}));
            }
            TurnEvent::Delta { .. } => {}
            TurnEvent::ToolCall { message, .. } => {
                self.whole_text(message, &mut out);
                self.close_text(&mut out);
                for call in message.tool_calls.iter().flatten() {
                    let id = &call.id;
                    out.push(json!({"type": "TOOL_CALL_START", "toolCallId": id, "toolCallName": call.name,
                        "parentMessageId": message.id.to_string()}));
                    out.push(json!({"type": "TOOL_CALL_ARGS", "toolCallId": id, "delta": call.arguments.to_string()}));
                    out.push(json!({"type": "TOOL_CALL_END", "toolCallId": id}));
                }
            }
            TurnEvent::ToolResult { message, .. } => out.push(json!({"type": "TOOL_CALL_RESULT",
                "messageId": message.id.to_string(), "toolCallId": message.tool_call_id,
                "content": message.content, "role": "tool"})),
            TurnEvent::MessageCompleted { message, .. } => {
                self.whole_text(message, &mut out);
                self.close_text(&mut out);
            }
            TurnEvent::Completed { messages, .. } => {
                self.finish(messages, &mut out);
                out.push(json!({"type": "RUN_FINISHED", "threadId": self.thread_id, "runId": self.run_id}));
            }
            TurnEvent::Cancelled { messages, .. } => {
                self.finish(messages, &mut out);
                out.push(json!({"type": "RUN_FINISHED", "threadId": self.thread_id, "runId": self.run_id,
                    "outcome": {"type": "cancelled"}}));
            }
            TurnEvent::Failed { error, .. } => {
                self.close_text(&mut out);
                out.push(json!({"type": "RUN_ERROR", "message": error.detail, "code": error.code}));
            }
        }
        out
    }

    /// `RUN_STARTED` before anything, and the turn's ids once it starts.
    fn start(&mut self, event: &TurnEvent, out: &mut Vec<Value>) {
        if !self.started {
            self.started = true;
            out.push(json!({"type": "RUN_STARTED", "threadId": self.thread_id, "runId": self.run_id}));
        }
        if let TurnEvent::Started { turn_id, session_id, .. } = event {
            out.push(json!({"type": "CUSTOM", "name": "parley.turn",
                "value": {"session_id": session_id, "turn_id": turn_id}}));
        }
    }

    fn finish(&mut self, messages: &[Message], out: &mut Vec<Value>) {
        if let Some(last) = messages.last().filter(|m| m.role == Role::Assistant) {
            self.whole_text(last, out);
        }
        self.close_text(out);
    }

    fn open_text(&mut self, message: Uuid, out: &mut Vec<Value>) {
        if self.text != Some(message) {
            self.close_text(out);
            out.push(
                json!({"type": "TEXT_MESSAGE_START", "messageId": message.to_string(), "role": "assistant"}),
            );
            self.text = Some(message);
        }
        if !self.texted.contains(&message) {
            self.texted.push(message);
        }
    }

    /// Sends a message's whole text at once, if none of it was streamed.
    fn whole_text(&mut self, message: &Message, out: &mut Vec<Value>) {
        if message.content.is_empty() || self.texted.contains(&message.id) {
            return;
        }
        self.open_text(message.id, out);
        out.push(json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": message.id.to_string(), "delta": message.content}));
    }

    fn close_text(&mut self, out: &mut Vec<Value>) {
        if let Some(id) = self.text.take() {
            out.push(json!({"type": "TEXT_MESSAGE_END", "messageId": id.to_string()}));
        }
    }
}
