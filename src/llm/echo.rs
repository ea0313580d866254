//! The `echo` model: an offline, deterministic development model. It is not a language model.
//!
//! It answers the last user message with `echo: <text> (context: <n> messages)`, where n counts the
//! history messages it was given (everything but the system prompt and the new user message), and
//! streams that reply a word at a time. Development aid: a user message `/tool NAME {json args}`
//! makes it call tool NAME with those arguments, then answer with the tool's result.

use async_trait::async_trait;
use futures::StreamExt;
use serde_json::Value;

use super::{
    ChatModel, ChatRequest, EchoSettings, ModelError, ModelEvent, ModelOutput, ModelStream, PromptMessage,
};
use crate::domain::{Role, ToolCall, Usage};

/// The echo model.
#[derive(Debug, Clone, Default)]
pub struct EchoModel {
    settings: EchoSettings,
}

impl EchoModel {
    /// An echo model with the given settings.
    pub fn new(settings: EchoSettings) -> Self {
        EchoModel { settings }
    }
}

/// Parses `/tool NAME {json}`; the arguments default to `{}`.
fn parse_tool_command(text: &str) -> Option<(String, Value)> {
    let rest = text.trim().strip_prefix("/tool ")?.trim_start();
    let (name, args) = match rest.split_once(char::is_whitespace) {
        Some((name, args)) => (name, args.trim()),
        None => (rest, ""),
    };
    if name.is_empty() {
        return None;
    }
    let arguments = if args.is_empty() {
        Value::Object(Default::default())
    } else {
        serde_json::from_str(args).unwrap_or_else(|_| Value::String(args.to_owned()))
    };
    Some((name.to_owned(), arguments))
}

/// Decides the reply: text to stream, and tool calls to make.
fn reply(request: &ChatRequest) -> (String, Vec<ToolCall>) {
    let messages = &request.messages;
    let Some(user_index) = messages.iter().rposition(|m| m.role == Role::User) else {
        return ("echo: (no user message)".to_owned(), Vec::new());
    };
    let user = &messages[user_index];
    let context = messages[..user_index].iter().filter(|m| m.role != Role::System).count();
    let results: Vec<&PromptMessage> =
        messages[user_index + 1..].iter().filter(|m| m.role == Role::Tool).collect();
    if !results.is_empty() {
        let text = results
            .iter()
            .map(|r| format!("tool {} returned: {}", r.name.as_deref().unwrap_or("?"), r.content))
            .collect::<Vec<_>>()
            .join("; ");
        return (format!("echo: {text} (context: {context} messages)"), Vec::new());
    }
    if let Some((name, arguments)) = parse_tool_command(&user.content)
        && !request.tools.is_empty()
    {
        let call = ToolCall { id: format!("call_echo_{user_index}"), name, arguments };
        return (String::new(), vec![call]);
    }
    (format!("echo: {} (context: {context} messages)", user.content), Vec::new())
}

/// Splits text into word-sized deltas that concatenate back to it exactly.
fn word_deltas(text: &str) -> Vec<String> {
    let mut deltas = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if c == ' ' && i > start {
            deltas.push(text[start..i].to_owned());
            start = i;
        }
    }
    if start < text.len() {
        deltas.push(text[start..].to_owned());
    }
    deltas
}

/// Tokens by the usual rule of thumb, one per 4 bytes of text (rounded up). Only the length is
/// read: every model call counts its whole prompt, and reading the history's text (cold in the
/// cache) to count words cost 8 % of a turn in the profile.
fn approx_tokens(text: &str) -> u64 {
    text.len().div_ceil(4) as u64
}

#[async_trait]
impl ChatModel for EchoModel {
    fn name(&self) -> &str {
        "echo"
    }

    async fn stream(&self, request: &ChatRequest) -> Result<ModelStream, ModelError> {
        let (content, tool_calls) = reply(request);
        let prompt_tokens: u64 = request.messages.iter().map(|m| approx_tokens(&m.content)).sum();
        let completion_tokens = approx_tokens(&content);
        let usage =
            Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens };
        let finish_reason = if tool_calls.is_empty() { "stop" } else { "tool_calls" };
        let done = ModelEvent::Done(ModelOutput {
            content: content.clone(),
            tool_calls,
            usage: Some(usage),
            finish_reason: Some(finish_reason.to_owned()),
        });
        let events = word_deltas(&content).into_iter().map(ModelEvent::Delta).chain(std::iter::once(done));
        let delay = self.settings.delay;
        if delay.is_zero() {
            return Ok(futures::stream::iter(events.map(Ok)).boxed());
        }
        let stream = futures::stream::iter(events).then(move |event| async move {
            if matches!(event, ModelEvent::Delta(_)) {
                tokio::time::sleep(delay).await;
            }
            Ok(event)
        });
        Ok(stream.boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(messages: Vec<PromptMessage>, with_tools: bool) -> ChatRequest {
        let tools = if with_tools {
            vec![super::super::ToolSpec {
                name: "calculator".into(),
                description: String::new(),
                parameters: Value::Null,
            }]
            .into()
        } else {
            Vec::new().into()
        };
        ChatRequest { messages, tools }
    }

    async fn run(req: ChatRequest) -> (Vec<String>, ModelOutput) {
        let mut stream = EchoModel::default().stream(&req).await.unwrap();
        let mut deltas = Vec::new();
        while let Some(event) = stream.next().await {
            match event.unwrap() {
                ModelEvent::Delta(d) => deltas.push(d),
                ModelEvent::Done(out) => return (deltas, out),
            }
        }
        panic!("stream ended without Done");
    }

    #[tokio::test]
    async fn echoes_the_user_text_and_counts_the_context() {
        let req = request(
            vec![
                PromptMessage::text(Role::System, "sys"),
                PromptMessage::text(Role::User, "a"),
                PromptMessage::text(Role::Assistant, "b"),
                PromptMessage::text(Role::User, "hello  big world"),
            ],
            false,
        );
        let (deltas, out) = run(req).await;
        assert_eq!(out.content, "echo: hello  big world (context: 2 messages)");
        assert!(deltas.len() > 3, "streams a word at a time: {deltas:?}");
        assert_eq!(deltas.concat(), out.content);
    }

    #[tokio::test]
    async fn the_tool_command_calls_the_tool_then_reports_its_result() {
        let ask = PromptMessage::text(Role::User, r#"/tool calculator {"expression": "1+2"}"#);
        let (deltas, out) = run(request(vec![ask.clone()], true)).await;
        assert!(deltas.is_empty());
        assert_eq!(out.tool_calls.len(), 1);
        assert_eq!(out.tool_calls[0].name, "calculator");
        assert_eq!(out.tool_calls[0].arguments, serde_json::json!({"expression": "1+2"}));
        let mut call = PromptMessage::text(Role::Assistant, "");
        call.tool_calls = out.tool_calls.clone();
        let mut result = PromptMessage::text(Role::Tool, "3");
        result.name = Some("calculator".into());
        result.tool_call_id = Some(out.tool_calls[0].id.clone());
        let (_, out) = run(request(vec![ask, call, result], true)).await;
        assert_eq!(out.content, "echo: tool calculator returned: 3 (context: 0 messages)");
        assert!(out.tool_calls.is_empty());
    }

    #[tokio::test]
    async fn without_tools_offered_the_tool_command_is_echoed() {
        let (_, out) = run(request(vec![PromptMessage::text(Role::User, "/tool x")], false)).await;
        assert_eq!(out.content, "echo: /tool x (context: 0 messages)");
    }

    #[test]
    fn tokens_are_a_quarter_of_the_bytes_rounded_up() {
        assert_eq!(approx_tokens(""), 0);
        assert_eq!(approx_tokens("abc"), 1);
        assert_eq!(approx_tokens("abcd"), 1);
        assert_eq!(approx_tokens("one two three"), 4);
        assert_eq!(approx_tokens("héllo"), 2, "bytes, not characters");
    }

    #[test]
    fn tool_commands_parse_names_and_arguments() {
        assert_eq!(
            parse_tool_command("/tool current_time"),
            Some(("current_time".into(), serde_json::json!({})))
        );
        assert_eq!(
            parse_tool_command("/tool t not-json"),
            Some(("t".into(), Value::String("not-json".into())))
        );
        assert_eq!(parse_tool_command("hello"), None);
        assert_eq!(parse_tool_command("/tool "), None);
    }
}
