//! Reading a streamed chat completion: bytes → SSE events → text deltas and one final output.
//!
//! The bytes go through eventsource-stream (which joins lines split anywhere, even inside a UTF-8
//! character, and takes `\n`, `\r\n` and `\r` line endings), then each `data:` payload goes to the
//! [`Assembler`], which keeps the text, the tool calls by `index`, the usage and the finish reason.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::time::Duration;

use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures::stream::{BoxStream, Stream, StreamExt};
use serde::Deserialize;
use serde_json::Value;

use crate::domain::{ToolCall, Usage};
use crate::llm::{ModelError, ModelEvent, ModelOutput, ModelStream};
use crate::tools::truncate;

/// The longest upstream text quoted in an error.
const MAX_QUOTE: usize = 300;

/// SSE events of a reply, or the error that ended them.
pub(crate) type SseEvents = BoxStream<'static, Result<Event, ModelError>>;

/// What one SSE event meant.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Feed {
    /// Nothing to show (role-only chunk, tool-call fragment, usage, finish reason).
    Nothing,
    /// A piece of text.
    Delta(String),
    /// `[DONE]`: the reply is complete.
    Done,
}

/// Collects the chunks of one reply.
#[derive(Debug, Default)]
pub(crate) struct Assembler {
    content: String,
    calls: BTreeMap<u32, PartialCall>,
    usage: Option<Usage>,
    finish_reason: Option<String>,
}

/// A tool call being assembled; `arguments` is concatenated text, parsed at the end.
#[derive(Debug, Default)]
struct PartialCall {
    id: String,
    name: String,
    arguments: String,
}

#[derive(Debug, Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Option<Vec<Choice>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Debug, Deserialize)]
struct ToolCallDelta {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(Debug, Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
    /// A string fragment; some servers send a whole object instead.
    #[serde(default)]
    arguments: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    total_tokens: Option<u64>,
}

impl Assembler {
    /// Takes one SSE event (its type and data).
    pub(crate) fn feed(&mut self, event: &str, data: &str) -> Result<Feed, ModelError> {
        let data = data.trim();
        if data == "[DONE]" {
            return Ok(Feed::Done);
        }
        if event == "error" {
            return Err(stream_error(&serde_json::from_str(data).unwrap_or(Value::String(data.into()))));
        }
        let chunk: Chunk = serde_json::from_str(data).map_err(|e| {
            ModelError::Protocol(format!("invalid chunk ({e}): {}", truncate(data, MAX_QUOTE)))
        })?;
        if let Some(error) = chunk.error.filter(|e| !e.is_null()) {
            return Err(stream_error(&error));
        }
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage.into());
        }
        let mut text = String::new();
        for choice in chunk.choices.unwrap_or_default().into_iter().filter(|c| c.index.unwrap_or(0) == 0) {
            self.take_choice(choice, &mut text);
        }
        Ok(if text.is_empty() { Feed::Nothing } else { Feed::Delta(text) })
    }

    fn take_choice(&mut self, choice: Choice, text: &mut String) {
        if let Some(reason) = choice.finish_reason.filter(|r| !r.is_empty()) {
            self.finish_reason = Some(reason);
        }
        let Some(delta) = choice.delta else { return };
        if let Some(content) = delta.content {
            self.content.push_str(&content);
            text.push_str(&content);
        }
        for (position, call) in delta.tool_calls.unwrap_or_default().into_iter().enumerate() {
            self.take_call(position, call);
        }
    }

    /// Merges a tool-call fragment into the call with its `index` (its position when absent).
    fn take_call(&mut self, position: usize, delta: ToolCallDelta) {
        let index = delta.index.unwrap_or(position as u32);
        let call = self.calls.entry(index).or_default();
        if let Some(id) = delta.id.filter(|id| !id.is_empty())
            && call.id.is_empty()
        {
            call.id = id;
        }
        let Some(function) = delta.function else { return };
        if let Some(name) = function.name.filter(|n| !n.is_empty())
            && call.name.is_empty()
        {
            call.name = name;
        }
        match function.arguments {
            Some(Value::String(fragment)) => call.arguments.push_str(&fragment),
            Some(Value::Null) | None => {}
            Some(whole) => call.arguments.push_str(&whole.to_string()),
        }
    }

    /// Whether the model said why it stopped.
    pub(crate) fn has_finished(&self) -> bool {
        self.finish_reason.is_some()
    }

    /// The final output; tool calls in `index` order, arguments parsed.
    pub(crate) fn finish(self) -> ModelOutput {
        let tool_calls = self.calls.into_iter().map(|(index, call)| call.into_tool_call(index)).collect();
        ModelOutput {
            content: self.content,
            tool_calls,
            usage: self.usage,
            finish_reason: self.finish_reason,
        }
    }

    /// The final output when the stream ended without `[DONE]`: fine after a finish reason.
    pub(crate) fn finish_at_eof(self) -> Result<ModelOutput, ModelError> {
        if self.has_finished() {
            Ok(self.finish())
        } else {
            Err(ModelError::Protocol("the stream ended before the reply was complete".to_owned()))
        }
    }
}

impl PartialCall {
    fn into_tool_call(self, index: u32) -> ToolCall {
        let id = if self.id.is_empty() { format!("call_{index}") } else { self.id };
        let arguments = if self.arguments.trim().is_empty() {
            Value::Object(Default::default())
        } else {
            serde_json::from_str(&self.arguments).unwrap_or(Value::String(self.arguments))
        };
        ToolCall { id, name: self.name, arguments }
    }
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens.unwrap_or(u.prompt_tokens + u.completion_tokens),
        }
    }
}

/// The error for an `error` object sent inside the stream.
fn stream_error(error: &Value) -> ModelError {
    let inner = error.get("error").unwrap_or(error);
    let message = inner
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| inner.as_str().map(str::to_owned))
        .unwrap_or_else(|| inner.to_string());
    let kind = ["code", "type"].iter().find_map(|k| inner.get(*k).filter(|v| !v.is_null()));
    let label = match kind {
        Some(Value::String(s)) => format!(" ({s})"),
        Some(other) => format!(" ({other})"),
        None => String::new(),
    };
    ModelError::Protocol(format!("the upstream reported an error{label}: {}", truncate(&message, MAX_QUOTE)))
}

/// Wraps a byte stream so that waiting longer than `idle` for the next piece is a timeout.
pub(crate) fn with_idle_timeout<S, B, E>(
    bytes: S,
    idle: Duration,
) -> impl Stream<Item = Result<B, ModelError>> + Send + 'static
where
    S: Stream<Item = Result<B, E>> + Send + 'static,
    B: Send + 'static,
    E: Display + Send + 'static,
{
    futures::stream::unfold(Some(bytes.boxed()), move |state| async move {
        let mut bytes = state?;
        match tokio::time::timeout(idle, bytes.next()).await {
            Err(_) => Some((Err(idle_timeout(idle)), None)),
            Ok(None) => None,
            Ok(Some(Ok(piece))) => Some((Ok(piece), Some(bytes))),
            Ok(Some(Err(e))) => {
                Some((Err(ModelError::Connect(format!("the connection was lost: {e}"))), None))
            }
        }
    })
}

/// The timeout error of a stream that went quiet.
pub(crate) fn idle_timeout(idle: Duration) -> ModelError {
    ModelError::Timeout(format!("no data from the model for {}", humantime::format_duration(idle)))
}

/// SSE events from a body, with the idle timeout between pieces of the body.
pub(crate) fn sse_events<S, B, E>(bytes: S, idle: Duration) -> SseEvents
where
    S: Stream<Item = Result<B, E>> + Send + 'static,
    B: AsRef<[u8]> + Send + 'static,
    E: Display + Send + 'static,
{
    with_idle_timeout(bytes, idle)
        .eventsource()
        .map(|item| {
            item.map_err(|e| match e {
                EventStreamError::Transport(e) => e,
                EventStreamError::Utf8(e) => ModelError::Protocol(format!("the stream is not UTF-8: {e}")),
                EventStreamError::Parser(e) => ModelError::Protocol(format!("invalid event stream: {e}")),
            })
        })
        .boxed()
}

struct ReadState {
    events: SseEvents,
    assembler: Assembler,
    finished: bool,
}

/// Turns SSE events into the model stream: deltas, then one `Done`, or an error that ends it.
pub(crate) fn model_stream(events: SseEvents) -> ModelStream {
    let state = ReadState { events, assembler: Assembler::default(), finished: false };
    futures::stream::unfold(state, |mut state| async move {
        if state.finished {
            return None;
        }
        let item = next_item(&mut state).await;
        state.finished = !matches!(item, Ok(ModelEvent::Delta(_)));
        Some((item, state))
    })
    .boxed()
}

async fn next_item(state: &mut ReadState) -> Result<ModelEvent, ModelError> {
    loop {
        let Some(event) = state.events.next().await else {
            return std::mem::take(&mut state.assembler).finish_at_eof().map(ModelEvent::Done);
        };
        let event = event?;
        match state.assembler.feed(&event.event, &event.data)? {
            Feed::Nothing => continue,
            Feed::Delta(text) => return Ok(ModelEvent::Delta(text)),
            Feed::Done => return Ok(ModelEvent::Done(std::mem::take(&mut state.assembler).finish())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn frame(v: Value) -> String {
        format!("data: {v}\n\n")
    }

    fn chunk(delta: Value, finish: Option<&str>) -> String {
        frame(json!({"id": "x", "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": delta, "finish_reason": finish}
        ]}))
    }

    fn call_part(index: u32, id: Option<&str>, name: Option<&str>, args: &str) -> String {
        let mut call = json!({"index": index, "function": {"arguments": args}});
        if let Some(id) = id {
            call["id"] = json!(id);
            call["type"] = json!("function");
        }
        if let Some(name) = name {
            call["function"]["name"] = json!(name);
        }
        chunk(json!({"tool_calls": [call]}), None)
    }

    /// A reply with text (multi-byte characters included), two interleaved tool calls and usage.
    fn transcript() -> String {
        [
            ": keep-alive\n\n".to_owned(),
            chunk(json!({"role": "assistant", "content": ""}), None),
            chunk(json!({"content": "Grüße, "}), None),
            chunk(json!({"content": "世界 🌍"}), None),
            call_part(0, Some("call_a"), Some("calculator"), ""),
            call_part(1, Some("call_b"), Some("current_time"), "{\"utc_"),
            call_part(0, None, None, "{\"expression\": \"2×"),
            call_part(1, None, None, "offset\": \"+02:00\"}"),
            call_part(0, None, None, "3 — ü\"}"),
            chunk(json!({}), Some("tool_calls")),
            frame(json!({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})),
            "data: [DONE]\n\n".to_owned(),
        ]
        .concat()
    }

    fn expected() -> (Vec<String>, ModelOutput) {
        let output = ModelOutput {
            content: "Grüße, 世界 🌍".into(),
            tool_calls: vec![
                ToolCall {
                    id: "call_a".into(),
                    name: "calculator".into(),
                    arguments: json!({"expression": "2×3 — ü"}),
                },
                ToolCall {
                    id: "call_b".into(),
                    name: "current_time".into(),
                    arguments: json!({"utc_offset": "+02:00"}),
                },
            ],
            usage: Some(Usage { prompt_tokens: 10, completion_tokens: 5, total_tokens: 15 }),
            finish_reason: Some("tool_calls".into()),
        };
        (vec!["Grüße, ".into(), "世界 🌍".into()], output)
    }

    /// Runs bytes, cut into the given pieces, through the whole pipeline.
    async fn run(pieces: Vec<Vec<u8>>) -> Vec<Result<ModelEvent, String>> {
        let bytes = futures::stream::iter(pieces.into_iter().map(Ok::<_, Infallible>));
        let stream = model_stream(sse_events(bytes, Duration::from_secs(5)));
        stream.map(|r| r.map_err(|e| e.to_string())).collect().await
    }

    fn cut(bytes: &[u8], at: &[usize]) -> Vec<Vec<u8>> {
        let mut pieces = Vec::new();
        let mut start = 0;
        for &end in at {
            pieces.push(bytes[start..end].to_vec());
            start = end;
        }
        pieces.push(bytes[start..].to_vec());
        pieces
    }

    fn split(events: Vec<Result<ModelEvent, String>>) -> (Vec<String>, ModelOutput) {
        let mut deltas = Vec::new();
        let mut done = None;
        for event in events {
            match event.expect("no error") {
                ModelEvent::Delta(d) => deltas.push(d),
                ModelEvent::Done(out) => {
                    assert!(done.is_none(), "one Done");
                    done = Some(out);
                }
            }
        }
        (deltas, done.expect("a Done"))
    }

    #[tokio::test]
    async fn every_single_cut_point_gives_the_same_reply() {
        let bytes = transcript().into_bytes();
        let (want_deltas, want) = expected();
        for at in 0..=bytes.len() {
            let (deltas, out) = split(run(cut(&bytes, &[at])).await);
            assert_eq!(out, want, "cut at {at}");
            assert_eq!(deltas.concat(), want_deltas.concat(), "cut at {at}");
        }
    }

    #[tokio::test]
    async fn one_byte_pieces_and_crlf_line_endings_work() {
        let bytes = transcript().replace('\n', "\r\n").into_bytes();
        let pieces = bytes.iter().map(|b| vec![*b]).collect();
        let (deltas, out) = split(run(pieces).await);
        assert_eq!((deltas, out), expected());
    }

    #[tokio::test]
    async fn crlf_split_between_cr_and_lf_is_one_line_end() {
        let bytes = transcript().replace('\n', "\r\n").into_bytes();
        let cuts: Vec<usize> =
            bytes.windows(2).enumerate().filter(|(_, w)| w == b"\r\n").map(|(i, _)| i + 1).collect();
        let (_, out) = split(run(cut(&bytes, &cuts)).await);
        assert_eq!(out, expected().1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_cut_points_give_the_same_reply(mut at in proptest::collection::vec(0usize..2000, 0..12)) {
            let bytes = transcript().into_bytes();
            at.iter_mut().for_each(|a| *a %= bytes.len() + 1);
            at.sort_unstable();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let (_, out) = split(rt.block_on(run(cut(&bytes, &at))));
            prop_assert_eq!(out, expected().1);
        }
    }

    #[test]
    fn usage_in_a_chunk_with_empty_or_null_choices_is_kept() {
        let mut a = Assembler::default();
        let usage = r#"{"choices":null,"usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        assert_eq!(a.feed("message", usage).unwrap(), Feed::Nothing);
        assert_eq!(a.finish().usage, Some(Usage { prompt_tokens: 3, completion_tokens: 4, total_tokens: 7 }));
    }

    #[test]
    fn invalid_tool_arguments_are_kept_as_the_raw_string() {
        let mut a = Assembler::default();
        let part = r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c","function":{"name":"t","arguments":"{\"a\": "}}]}}]}"#;
        a.feed("message", part).unwrap();
        let out = a.finish();
        assert_eq!(out.tool_calls[0].arguments, Value::String("{\"a\": ".into()));
    }

    #[test]
    fn empty_arguments_become_an_empty_object_and_missing_ids_are_made_up() {
        let mut a = Assembler::default();
        a.feed("message", r#"{"choices":[{"delta":{"tool_calls":[{"function":{"name":"t"}}]}}]}"#).unwrap();
        let out = a.finish();
        assert_eq!(
            out.tool_calls[0],
            ToolCall { id: "call_0".into(), name: "t".into(), arguments: json!({}) }
        );
    }

    #[test]
    fn arguments_sent_as_an_object_are_accepted() {
        let mut a = Assembler::default();
        let whole = r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c","function":{"name":"t","arguments":{"x":1}}}]}}]}"#;
        a.feed("message", whole).unwrap();
        assert_eq!(a.finish().tool_calls[0].arguments, json!({"x": 1}));
    }

    #[test]
    fn choices_other_than_the_first_are_ignored() {
        let mut a = Assembler::default();
        let f = a.feed(
            "message",
            r#"{"choices":[{"index":1,"delta":{"content":"no"}},{"index":0,"delta":{"content":"yes"}}]}"#,
        );
        assert_eq!(f.unwrap(), Feed::Delta("yes".into()));
    }

    #[test]
    fn an_error_object_in_the_stream_is_an_error_with_its_message() {
        let mut a = Assembler::default();
        let err = a
            .feed(
                "message",
                r#"{"error":{"message":"overloaded, try later","type":"server_error","code":null}}"#,
            )
            .unwrap_err();
        assert!(matches!(err, ModelError::Protocol(_)));
        assert_eq!(
            err.to_string(),
            "model stream error: the upstream reported an error (server_error): overloaded, try later"
        );
        let err = a.feed("error", "plain text failure").unwrap_err();
        assert!(err.to_string().contains("plain text failure"), "{err}");
    }

    #[test]
    fn garbage_data_is_a_protocol_error() {
        let err = Assembler::default().feed("message", "{nope").unwrap_err();
        assert!(matches!(err, ModelError::Protocol(m) if m.starts_with("invalid chunk")));
    }

    #[tokio::test]
    async fn a_stream_that_stops_early_is_an_error_after_its_deltas() {
        let text =
            [chunk(json!({"role": "assistant"}), None), chunk(json!({"content": "Hel"}), None)].concat();
        let events = run(vec![text.into_bytes()]).await;
        assert_eq!(events[0], Ok(ModelEvent::Delta("Hel".into())));
        assert!(events[1].as_ref().unwrap_err().contains("ended before the reply was complete"));
        assert_eq!(events.len(), 2);
    }

    #[tokio::test]
    async fn a_finish_reason_without_done_is_enough() {
        let text = [chunk(json!({"content": "ok"}), None), chunk(json!({}), Some("stop"))].concat();
        let (_, out) = split(run(vec![text.into_bytes()]).await);
        assert_eq!(out.finish_reason.as_deref(), Some("stop"));
        assert_eq!(out.content, "ok");
    }

    #[tokio::test]
    async fn nothing_is_read_after_done() {
        let text =
            [chunk(json!({"content": "ok"}), Some("stop")), "data: [DONE]\n\ndata: {bad\n\n".into()].concat();
        let (_, out) = split(run(vec![text.into_bytes()]).await);
        assert_eq!(out.content, "ok");
    }

    #[tokio::test]
    async fn a_quiet_stream_times_out() {
        let bytes = futures::stream::iter(vec![Ok::<_, Infallible>(b"data: {\"choices\":[]}\n\n".to_vec())])
            .chain(futures::stream::pending());
        let mut stream = model_stream(sse_events(bytes, Duration::from_millis(50)));
        let err = stream.next().await.unwrap().unwrap_err();
        assert!(matches!(err, ModelError::Timeout(_)), "{err}");
        assert!(stream.next().await.is_none());
    }
}
