//! The model: a trait for chat models that stream, and its providers.
//!
//! - [`echo`]: the offline development model (deterministic, no network).
//! - [`openai`]: any OpenAI-compatible `/chat/completions` endpoint.

pub mod echo;
pub mod openai;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde_json::Value;

use crate::domain::{Message, Role, ToolCall, Usage, WindowMessage};

/// A shared handle to the configured model.
pub type DynModel = Arc<dyn ChatModel>;

/// One message of a prompt, in the shape chat-completion APIs take.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptMessage {
    /// Who wrote it.
    pub role: Role,
    /// The text (shared with the history window it came from).
    pub content: Arc<str>,
    /// For an assistant message that called tools.
    pub tool_calls: Vec<ToolCall>,
    /// For a tool message: the call it answers.
    pub tool_call_id: Option<String>,
    /// For a tool message: the tool's name.
    pub name: Option<String>,
}

impl PromptMessage {
    /// A plain text message.
    pub fn text(role: Role, content: impl Into<Arc<str>>) -> Self {
        PromptMessage {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }
}

impl From<WindowMessage> for PromptMessage {
    fn from(m: WindowMessage) -> Self {
        PromptMessage {
            role: m.role,
            content: m.content,
            tool_calls: m.tool_calls.unwrap_or_default(),
            tool_call_id: m.tool_call_id,
            name: m.name,
        }
    }
}

impl From<&Message> for PromptMessage {
    fn from(m: &Message) -> Self {
        PromptMessage {
            role: m.role,
            content: m.content.as_str().into(),
            tool_calls: m.tool_calls.clone().unwrap_or_default(),
            tool_call_id: m.tool_call_id.clone(),
            name: m.name.clone(),
        }
    }
}

/// A tool as offered to the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    /// The tool's name.
    pub name: String,
    /// What it does, for the model.
    pub description: String,
    /// JSON Schema of its arguments.
    pub parameters: Value,
}

/// One call to the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The prompt: system prompt, history window, new messages.
    pub messages: Vec<PromptMessage>,
    /// Tools the model may call; empty forces a text answer. Shared: the agent builds them once.
    pub tools: Arc<[ToolSpec]>,
}

/// What the model produced in the end.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelOutput {
    /// The full text (the concatenation of every delta).
    pub content: String,
    /// Tool calls, in the model's order.
    pub tool_calls: Vec<ToolCall>,
    /// Token usage, when the model reports it.
    pub usage: Option<Usage>,
    /// Why the model stopped (`stop`, `tool_calls`, `length`…), when known.
    pub finish_reason: Option<String>,
}

/// An event of a streamed model reply.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelEvent {
    /// A piece of text, as the model produces it.
    Delta(String),
    /// The reply is complete. Always the last event of a successful stream.
    Done(ModelOutput),
}

/// What can go wrong calling the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The upstream answered with an error status (after any retries).
    #[error("model endpoint answered {status}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// A short, credential-free description.
        message: String,
    },
    /// The upstream did not answer in time.
    #[error("model endpoint timed out: {0}")]
    Timeout(String),
    /// The upstream could not be reached.
    #[error("model endpoint unreachable: {0}")]
    Connect(String),
    /// The upstream sent something that is not a valid chat-completion stream, or an error in it.
    #[error("model stream error: {0}")]
    Protocol(String),
}

/// The stream of a model reply.
pub type ModelStream = BoxStream<'static, Result<ModelEvent, ModelError>>;

/// A chat model that streams its reply.
#[async_trait]
pub trait ChatModel: Send + Sync + 'static {
    /// The model's name, for logs.
    fn name(&self) -> &str;

    /// Starts a reply. The stream yields text deltas and ends with exactly one `Done`, or an error.
    /// The request is borrowed: the agent reuses its prompt from one call to the next.
    async fn stream(&self, request: &ChatRequest) -> Result<ModelStream, ModelError>;
}

/// Settings of the echo model.
#[derive(Debug, Clone, Copy, Default)]
pub struct EchoSettings {
    /// Pause before each delta, to make streams look like a real model's.
    pub delay: Duration,
}
