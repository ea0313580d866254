//! The request body of a streamed `/chat/completions` call, in the OpenAI wire format.

use serde::Serialize;
use serde_json::Value;

use super::OpenAiSettings;
use crate::config::MaxTokensParam;
use crate::domain::{Role, ToolCall};
use crate::llm::{ChatRequest, PromptMessage, ToolSpec};

/// The JSON body sent upstream.
#[derive(Debug, Serialize)]
pub(crate) struct Body<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    stream: bool,
    stream_options: StreamOptions,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
}

#[derive(Debug, Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Debug, Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    /// `null` only for an assistant message that calls tools and says nothing.
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<WireToolCall<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct WireToolCall<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireFunctionCall<'a>,
}

#[derive(Debug, Serialize)]
struct WireFunctionCall<'a> {
    name: &'a str,
    /// The arguments as a JSON text, as the API expects.
    arguments: String,
}

#[derive(Debug, Serialize)]
struct WireTool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireFunction<'a>,
}

#[derive(Debug, Serialize)]
struct WireFunction<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    description: &'a str,
    parameters: Value,
}

/// Builds the body of a streamed call for this request.
pub(crate) fn body<'a>(settings: &'a OpenAiSettings, request: &'a ChatRequest) -> Body<'a> {
    // `Auto` is settled when the model is built; a body built from raw settings sends the old name.
    let completion_tokens = settings.max_tokens_param == MaxTokensParam::MaxCompletionTokens;
    Body {
        model: &settings.model,
        messages: request.messages.iter().map(message).collect(),
        stream: true,
        stream_options: StreamOptions { include_usage: true },
        tools: request.tools.iter().map(tool).collect(),
        temperature: settings.temperature,
        max_tokens: settings.max_tokens.filter(|_| !completion_tokens),
        max_completion_tokens: settings.max_tokens.filter(|_| completion_tokens),
    }
}

fn message(m: &PromptMessage) -> WireMessage<'_> {
    let calls_tools = m.role == Role::Assistant && !m.tool_calls.is_empty();
    let content = if calls_tools && m.content.is_empty() { None } else { Some(&*m.content) };
    let tool_calls = if calls_tools { m.tool_calls.iter().map(tool_call).collect() } else { Vec::new() };
    let tool_call_id = if m.role == Role::Tool { m.tool_call_id.as_deref() } else { None };
    WireMessage { role: m.role.as_str(), content, tool_calls, tool_call_id }
}

fn tool_call(call: &ToolCall) -> WireToolCall<'_> {
    WireToolCall {
        id: &call.id,
        kind: "function",
        function: WireFunctionCall { name: &call.name, arguments: arguments_text(&call.arguments) },
    }
}

/// The arguments as JSON text; a raw string (what an invalid reply was kept as) is sent back as is.
fn arguments_text(arguments: &Value) -> String {
    match arguments {
        Value::String(raw) => raw.clone(),
        other => other.to_string(),
    }
}

fn tool(spec: &ToolSpec) -> WireTool<'_> {
    let parameters = if spec.parameters.is_null() {
        serde_json::json!({"type": "object", "properties": {}})
    } else {
        spec.parameters.clone()
    };
    WireTool {
        kind: "function",
        function: WireFunction { name: &spec.name, description: &spec.description, parameters },
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn settings() -> OpenAiSettings {
        OpenAiSettings::new("http://localhost/v1", "m")
    }

    fn to_json(settings: &OpenAiSettings, request: &ChatRequest) -> Value {
        serde_json::to_value(body(settings, request)).unwrap()
    }

    #[test]
    fn a_plain_request_streams_with_usage_and_omits_unset_options() {
        let request =
            ChatRequest { messages: vec![PromptMessage::text(Role::User, "hi")], tools: Vec::new().into() };
        let v = to_json(&settings(), &request);
        assert_eq!(
            v,
            json!({
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": true,
                "stream_options": {"include_usage": true}
            })
        );
    }

    #[test]
    fn temperature_keeps_its_decimal_form() {
        let mut s = settings();
        s.temperature = Some(0.7);
        s.max_tokens = Some(100);
        let text =
            serde_json::to_string(&body(&s, &ChatRequest { messages: vec![], tools: Vec::new().into() }))
                .unwrap();
        assert!(text.contains(r#""temperature":0.7"#), "{text}");
        assert!(text.contains(r#""max_tokens":100"#), "{text}");
        assert!(!text.contains("max_completion_tokens"), "{text}");
    }

    #[test]
    fn the_token_limit_goes_in_the_chosen_field() {
        let mut s = settings();
        s.max_tokens = Some(64);
        s.max_tokens_param = MaxTokensParam::MaxCompletionTokens;
        let v = to_json(&s, &ChatRequest { messages: vec![], tools: Vec::new().into() });
        assert_eq!(v["max_completion_tokens"], json!(64));
        assert!(v.get("max_tokens").is_none(), "{v}");
        s.max_tokens = None;
        let v = to_json(&s, &ChatRequest { messages: vec![], tools: Vec::new().into() });
        assert!(v.get("max_completion_tokens").is_none(), "an unset limit sends neither field: {v}");
    }

    #[test]
    fn tool_rounds_use_the_openai_shapes() {
        let mut call = PromptMessage::text(Role::Assistant, "");
        call.tool_calls = vec![
            ToolCall { id: "c1".into(), name: "calc".into(), arguments: json!({"expression": "1+2"}) },
            ToolCall { id: "c2".into(), name: "calc".into(), arguments: json!("{not json") },
        ];
        let mut result = PromptMessage::text(Role::Tool, "3");
        result.tool_call_id = Some("c1".into());
        result.name = Some("calc".into());
        let request = ChatRequest {
            messages: vec![call, result],
            tools: vec![ToolSpec {
                name: "calc".into(),
                description: "math".into(),
                parameters: json!({"type": "object"}),
            }]
            .into(),
        };
        let v = to_json(&settings(), &request);
        assert_eq!(
            v["messages"][0],
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": "{\"expression\":\"1+2\"}"}},
                {"id": "c2", "type": "function", "function": {"name": "calc", "arguments": "{not json"}}
            ]})
        );
        assert_eq!(v["messages"][1], json!({"role": "tool", "content": "3", "tool_call_id": "c1"}));
        assert_eq!(
            v["tools"],
            json!([{"type": "function", "function": {"name": "calc", "description": "math", "parameters": {"type": "object"}}}])
        );
    }

    #[test]
    fn an_assistant_message_with_text_and_calls_keeps_its_text() {
        let mut m = PromptMessage::text(Role::Assistant, "let me check");
        m.tool_calls = vec![ToolCall { id: "c".into(), name: "t".into(), arguments: json!({}) }];
        let v = to_json(&settings(), &ChatRequest { messages: vec![m], tools: Vec::new().into() });
        assert_eq!(v["messages"][0]["content"], "let me check");
        assert_eq!(v["messages"][0]["tool_calls"][0]["function"]["arguments"], "{}");
    }
}
