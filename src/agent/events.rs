//! Typed events of a turn, as streamed to clients over SSE, and the turn's final result.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::domain::{Message, Usage};
use crate::error::Problem;

/// Something that happened during a turn. The SSE event name is [`TurnEvent::name`]; the data is
/// the variant's fields as one JSON object.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum TurnEvent {
    /// The turn began; the user message is not stored yet (its `seq` is 0 until `turn.completed`).
    Started {
        /// The turn.
        turn_id: Uuid,
        /// The session.
        session_id: String,
        /// The user message as it will be stored.
        user_message: Message,
        /// For an edit or a regenerate: the seq from which the active messages will be
        /// superseded when the turn is saved (a UI can drop those bubbles at once); else null.
        replaces_from: Option<u64>,
    },
    /// A piece of assistant text.
    Delta {
        /// The turn.
        turn_id: Uuid,
        /// The assistant message the text belongs to.
        message_id: Uuid,
        /// The text.
        delta: String,
    },
    /// The model asked for tools: the assistant message with its `tool_calls`.
    ToolCall {
        /// The turn.
        turn_id: Uuid,
        /// The assistant message.
        message: Message,
    },
    /// A tool answered: the tool message.
    ToolResult {
        /// The turn.
        turn_id: Uuid,
        /// The tool message.
        message: Message,
    },
    /// The final assistant message, exactly as stored.
    MessageCompleted {
        /// The turn.
        turn_id: Uuid,
        /// The stored message.
        message: Message,
    },
    /// The turn is stored: every message of it, in order.
    Completed {
        /// The turn.
        turn_id: Uuid,
        /// The stored messages.
        messages: Vec<Message>,
        /// Token usage over the turn.
        usage: Option<Usage>,
    },
    /// The turn failed; nothing more was stored.
    Failed {
        /// The turn.
        turn_id: Uuid,
        /// The problem.
        error: Problem,
    },
    /// The turn was cancelled; partial text, if any, was stored.
    Cancelled {
        /// The turn.
        turn_id: Uuid,
        /// The messages stored for the cancelled turn (possibly none).
        messages: Vec<Message>,
    },
}

impl TurnEvent {
    /// The SSE event name.
    pub fn name(&self) -> &'static str {
        match self {
            TurnEvent::Started { .. } => "turn.started",
            TurnEvent::Delta { .. } => "message.delta",
            TurnEvent::ToolCall { .. } => "tool.call",
            TurnEvent::ToolResult { .. } => "tool.result",
            TurnEvent::MessageCompleted { .. } => "message.completed",
            TurnEvent::Completed { .. } => "turn.completed",
            TurnEvent::Failed { .. } => "turn.failed",
            TurnEvent::Cancelled { .. } => "turn.cancelled",
        }
    }

    /// The events that replay a completed turn: started, the final message, completed.
    pub fn replay(result: &TurnResult) -> Vec<TurnEvent> {
        let turn_id = result.turn_id;
        let mut events = Vec::with_capacity(3);
        if let Some(first) = result.messages.first() {
            let session_id = first.session_id.clone();
            let replaces_from = None;
            events.push(TurnEvent::Started {
                turn_id,
                session_id,
                user_message: first.clone(),
                replaces_from,
            });
        }
        if let Some(last) = result.messages.last() {
            events.push(TurnEvent::MessageCompleted { turn_id, message: last.clone() });
        }
        events.push(TurnEvent::Completed { turn_id, messages: result.messages.clone(), usage: result.usage });
        events
    }

    /// The event as a turn event log keeps it: its name, a newline, its data.
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(256);
        text.push_str(self.name());
        text.push('\n');
        text.push_str(&serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned()));
        text
    }

    /// The event [`TurnEvent::encode`] wrote; `None` if it is not one.
    pub fn decode(text: &str) -> Option<TurnEvent> {
        let (name, data) = text.split_once('\n')?;
        let f: LoggedFields = serde_json::from_str(data).ok()?;
        let turn_id = f.turn_id;
        Some(match name {
            "turn.started" => TurnEvent::Started {
                turn_id,
                session_id: f.session_id?,
                user_message: f.user_message?,
                replaces_from: f.replaces_from,
            },
            "message.delta" => TurnEvent::Delta { turn_id, message_id: f.message_id?, delta: f.delta? },
            "tool.call" => TurnEvent::ToolCall { turn_id, message: f.message? },
            "tool.result" => TurnEvent::ToolResult { turn_id, message: f.message? },
            "message.completed" => TurnEvent::MessageCompleted { turn_id, message: f.message? },
            "turn.completed" => TurnEvent::Completed { turn_id, messages: f.messages?, usage: f.usage },
            "turn.failed" => TurnEvent::Failed { turn_id, error: f.error? },
            "turn.cancelled" => TurnEvent::Cancelled { turn_id, messages: f.messages? },
            _ => return None,
        })
    }

    /// Whether this event ends the stream.
    pub fn is_terminal(&self) -> bool {
        matches!(self, TurnEvent::Completed { .. } | TurnEvent::Failed { .. } | TurnEvent::Cancelled { .. })
    }
}

/// The fields of any event's data, to read a logged event back (its name says which it is).
#[derive(Deserialize)]
struct LoggedFields {
    turn_id: Uuid,
    session_id: Option<String>,
    user_message: Option<Message>,
    replaces_from: Option<u64>,
    message_id: Option<Uuid>,
    delta: Option<String>,
    message: Option<Message>,
    messages: Option<Vec<Message>>,
    usage: Option<Usage>,
    error: Option<Problem>,
}

/// The answer to a non-streamed turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TurnResult {
    /// The turn.
    pub turn_id: Uuid,
    /// Every message of the turn as stored: the user message, any tool rounds, the final answer.
    pub messages: Vec<Message>,
    /// Token usage over the turn, when the model reported it.
    pub usage: Option<Usage>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Role;

    #[test]
    fn every_event_reads_back_as_it_was_logged() {
        let (turn_id, session) = (Uuid::now_v7(), "s".to_owned());
        let user = Message::new(&session, turn_id, Role::User, "hi\nthere ✓");
        let reply = Message::new(&session, turn_id, Role::Assistant, "hello");
        let error = crate::error::AppError::Internal("boom".into()).problem();
        let events = vec![
            TurnEvent::Started {
                turn_id,
                session_id: session.clone(),
                user_message: user.clone(),
                replaces_from: Some(3),
            },
            TurnEvent::Delta { turn_id, message_id: reply.id, delta: "hel\nlo".into() },
            TurnEvent::ToolCall { turn_id, message: reply.clone() },
            TurnEvent::ToolResult { turn_id, message: reply.clone() },
            TurnEvent::MessageCompleted { turn_id, message: reply.clone() },
            TurnEvent::Completed {
                turn_id,
                messages: vec![user, reply.clone()],
                usage: Some(Usage { prompt_tokens: 1, completion_tokens: 2, total_tokens: 3 }),
            },
            TurnEvent::Failed { turn_id, error },
            TurnEvent::Cancelled { turn_id, messages: vec![reply] },
        ];
        for event in events {
            assert_eq!(TurnEvent::decode(&event.encode()).as_ref(), Some(&event), "{}", event.name());
        }
        assert_eq!(TurnEvent::decode("message.delta\n{}"), None);
        assert_eq!(TurnEvent::decode("no newline"), None);
    }
}
