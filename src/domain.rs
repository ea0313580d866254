//! The domain: sessions, messages, tool calls and turns, as the API shows them and the stores keep them.

use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

/// The tenant used when authentication is off.
pub const DEFAULT_TENANT: &str = "default";

/// The longest session id a client may choose.
pub const MAX_SESSION_ID_LEN: usize = 128;

/// Free-form JSON object attached to sessions and messages.
pub type Metadata = Map<String, Value>;

/// The current time, truncated to microseconds so that every store round-trips it exactly.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// A fresh time-ordered id (UUID v7).
pub fn new_id() -> Uuid {
    Uuid::now_v7()
}

/// Whether `id` is an acceptable session id: `[A-Za-z0-9._:-]{1,128}`, except `.` and `..`
/// (dot segments, which clients, proxies and URL libraries resolve away before a path arrives).
pub fn is_valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id != "."
        && id != ".."
        && id.len() <= MAX_SESSION_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A conversation: its settings and how many messages it currently holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Session {
    /// Client-chosen id, or a UUID v7 when the client chose none.
    pub id: String,
    /// When the session was created.
    pub created_at: DateTime<Utc>,
    /// When the session was created or last had messages appended or cleared.
    pub updated_at: DateTime<Utc>,
    /// The system prompt for this session; the server default applies when null.
    pub system_prompt: Option<String>,
    /// Client metadata, stored as given.
    #[schema(value_type = Object)]
    pub metadata: Metadata,
    /// How many messages the session holds now (after clears and trimming).
    pub message_count: u64,
}

/// What a store needs to create a session.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSession {
    /// The session id (already validated).
    pub id: String,
    /// Optional system prompt.
    pub system_prompt: Option<String>,
    /// Client metadata.
    pub metadata: Metadata,
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A system instruction.
    System,
    /// The human side of the conversation.
    User,
    /// The model.
    Assistant,
    /// The result of a tool call.
    Tool,
}

impl Role {
    /// The wire name of the role.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// A tool call requested by the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ToolCall {
    /// The id the model gave the call; the tool message answering it carries the same id.
    pub id: String,
    /// The tool's name.
    pub name: String,
    /// The arguments, as a JSON object (or the raw string when the model sent invalid JSON).
    #[schema(value_type = Object)]
    pub arguments: Value,
}

/// One message of a session's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Message {
    /// UUID v7.
    pub id: Uuid,
    /// The session it belongs to.
    pub session_id: String,
    /// 1, 2, 3… within the session, assigned by the store on append, never reused.
    pub seq: u64,
    /// The turn that produced it.
    pub turn_id: Uuid,
    /// Who wrote it.
    pub role: Role,
    /// The text.
    pub content: String,
    /// Metadata: the client's for user messages, parley's for others (e.g. `status`).
    #[schema(value_type = Object)]
    pub metadata: Metadata,
    /// For an assistant message that calls tools: the calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// For a tool message: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// For a tool message: the tool's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// When the message was created.
    pub created_at: DateTime<Utc>,
    /// For a message an edit or a regenerate replaced: the turn that replaced it. Superseded
    /// messages are kept, but leave the window, the default history pages and `message_count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<Uuid>,
}

impl Message {
    /// A message not yet stored (its `seq` is 0 until a store assigns one).
    pub fn new(session_id: &str, turn_id: Uuid, role: Role, content: impl Into<String>) -> Self {
        Message {
            id: new_id(),
            session_id: session_id.to_owned(),
            seq: 0,
            turn_id,
            role,
            content: content.into(),
            metadata: Metadata::new(),
            tool_calls: None,
            superseded_by: None,
            tool_call_id: None,
            name: None,
            created_at: now(),
        }
    }

    /// Whether this is an assistant message that calls at least one tool.
    pub fn calls_tools(&self) -> bool {
        self.role == Role::Assistant && self.tool_calls.as_ref().is_some_and(|c| !c.is_empty())
    }
}

/// A message of a turn's history window: what the prompt and the window's trimming need, without
/// the id, seq, session, metadata and time the stored message also has. The text is shared, so a
/// store that keeps it as an `Arc<str>` (the memory store) hands the window over without copying.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowMessage {
    /// The turn that produced it.
    pub turn_id: Uuid,
    /// Who wrote it.
    pub role: Role,
    /// The text.
    pub content: Arc<str>,
    /// For an assistant message that calls tools: the calls.
    pub tool_calls: Option<Vec<ToolCall>>,
    /// For a tool message: the id of the call it answers.
    pub tool_call_id: Option<String>,
    /// For a tool message: the tool's name.
    pub name: Option<String>,
}

impl WindowMessage {
    /// Whether this is an assistant message that calls at least one tool.
    pub fn calls_tools(&self) -> bool {
        self.role == Role::Assistant && self.tool_calls.as_ref().is_some_and(|c| !c.is_empty())
    }
}

impl From<Message> for WindowMessage {
    fn from(m: Message) -> Self {
        WindowMessage {
            turn_id: m.turn_id,
            role: m.role,
            content: m.content.into(),
            tool_calls: m.tool_calls,
            tool_call_id: m.tool_call_id,
            name: m.name,
        }
    }
}

/// Token counts reported by the model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    /// Tokens in the prompts sent.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
    /// The sum.
    pub total_tokens: u64,
}

impl Usage {
    /// Adds another call's usage to this one.
    pub fn add(&mut self, other: Usage) {
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.total_tokens += other.total_tokens;
    }
}

/// Where a turn is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TurnStatus {
    /// The agent loop is running.
    Running,
    /// Every message of the turn is stored.
    Completed,
    /// The turn failed; see `error`.
    Failed,
    /// The turn was cancelled; partial text, if any, was saved.
    Cancelled,
}

/// The record of one turn: a user message and everything the agent did to answer it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Turn {
    /// UUID v7.
    pub id: Uuid,
    /// The session it ran in.
    pub session_id: String,
    /// Where the turn is.
    pub status: TurnStatus,
    /// For a failed turn, the problem object.
    #[schema(value_type = Option<Object>)]
    pub error: Option<Value>,
    /// The ids of the messages the turn stored, in order.
    pub message_ids: Vec<Uuid>,
    /// Token usage summed over the turn's model calls, when the model reported it.
    pub usage: Option<Usage>,
    /// When the turn started.
    pub created_at: DateTime<Utc>,
    /// When the turn ended.
    pub completed_at: Option<DateTime<Utc>>,
}

impl Turn {
    /// A new running turn.
    pub fn start(session_id: &str) -> Self {
        Turn {
            id: new_id(),
            session_id: session_id.to_owned(),
            status: TurnStatus::Running,
            error: None,
            message_ids: Vec::new(),
            usage: None,
            created_at: now(),
            completed_at: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_follow_the_documented_pattern() {
        assert!(is_valid_session_id("abc"));
        assert!(is_valid_session_id("user-1:chat_2.v3"));
        assert!(is_valid_session_id(&"a".repeat(128)));
        assert!(!is_valid_session_id(""));
        assert!(!is_valid_session_id(&"a".repeat(129)));
        assert!(!is_valid_session_id("has space"));
        assert!(!is_valid_session_id("slash/no"));
        assert!(!is_valid_session_id("ümlaut"));
        assert!(!is_valid_session_id(".") && !is_valid_session_id(".."));
        assert!(is_valid_session_id("...") && is_valid_session_id(".a") && is_valid_session_id("a.."));
    }

    #[test]
    fn message_serialises_optional_fields_only_when_present() {
        let m = Message::new("s", new_id(), Role::User, "hi");
        let v = serde_json::to_value(&m).unwrap();
        assert!(v.get("tool_calls").is_none());
        assert!(v.get("tool_call_id").is_none());
        assert_eq!(v["role"], "user");
        assert_eq!(v["seq"], 0);
    }
}
