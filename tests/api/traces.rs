//! Traces: parley started with `PARLEY_OTLP_ENDPOINT` exports its spans over OTLP/HTTP to a test
//! receiver, which decodes the protobuf (`opentelemetry-proto`) the way a collector would.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;

use crate::fake_openai::{FakeOpenAi, Script};
use crate::servers::{ParleyProcess, free_port};

/// Every span the receiver was sent, with the `service.name` of its resource.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, Span)>>>);

impl Received {
    fn spans(&self) -> Vec<Span> {
        self.0.lock().unwrap().iter().map(|(_, span)| span.clone()).collect()
    }

    /// Waits (at most 10 s) until `done` holds of the spans received.
    async fn until(&self, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        for _ in 0..200 {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the spans never arrived; received: {:#?}", names(&self.spans()));
    }
}

/// Starts an OTLP/HTTP receiver (`POST /v1/traces`, protobuf); returns its traces URL.
async fn receiver() -> (String, Received) {
    let received = Received::default();
    let app = Router::new().route("/v1/traces", post(accept)).with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    (format!("http://{addr}/v1/traces"), received)
}

async fn accept(
    State(received): State<Received>,
    body: Bytes,
) -> ([(&'static str, &'static str); 1], Vec<u8>) {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP/HTTP protobuf request");
    let mut spans = received.0.lock().unwrap();
    for resource in request.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| r.attributes.iter())
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| text(kv.value.as_ref()?.value.as_ref()?))
            .unwrap_or_default();
        for scope in resource.scope_spans {
            spans.extend(scope.spans.into_iter().map(|span| (service.clone(), span)));
        }
    }
    // An empty ExportTraceServiceResponse: everything accepted.
    ([("content-type", "application/x-protobuf")], Vec::new())
}

fn text(value: &AnyValue) -> Option<String> {
    match value {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        AnyValue::BoolValue(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A span's attribute, as text.
fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| text(kv.value.as_ref()?.value.as_ref()?))
}

fn names(spans: &[Span]) -> Vec<&str> {
    spans.iter().map(|s| s.name.as_str()).collect()
}

/// A tools file with one HTTP tool, `lookup`, whose target records the headers it got.
async fn tool_target() -> (tempfile_path::TempPath, Arc<Mutex<Vec<axum::http::HeaderMap>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let app = Router::new().route(
        "/lookup",
        post(move |headers: axum::http::HeaderMap| async move {
            record.lock().unwrap().push(headers);
            "sunny"
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    let toml = format!(
        "[[tools]]\nname = \"lookup\"\ndescription = \"Looks up.\"\nurl = \"http://{addr}/lookup\"\n"
    );
    (tempfile_path::TempPath::new("toml", &toml), seen)
}

/// Just enough of a temporary file.
mod tempfile_path {
    /// A file in the temp directory, removed when dropped.
    pub struct TempPath(pub std::path::PathBuf);

    impl TempPath {
        pub fn new(extension: &str, text: &str) -> TempPath {
            let name = crate::helpers::unique_name("parley_traces");
            let path = std::env::temp_dir().join(format!("{name}.{extension}"));
            std::fs::write(&path, text).unwrap();
            TempPath(path)
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// One turn with a tool call, posted with a `traceparent`: the exported spans form one tree in
/// the caller's trace (request → turn → model calls, tool call, store operations), the turn span
/// names its session and turn, and the model server and the tool got a `traceparent` of the same
/// trace whose parent is the model or tool span.
#[tokio::test]
async fn a_turn_with_a_tool_call_exports_one_span_tree_in_the_callers_trace() {
    crate::helpers::install_crypto();
    let (endpoint, received) = receiver().await;
    let fake = FakeOpenAi::start(vec![
        Script::tool_call("lookup", json!({"city": "Paris"})),
        Script::text("It is sunny."),
    ])
    .await;
    let (tools, tool_headers) = tool_target().await;
    let env = [
        ("PARLEY_OTLP_ENDPOINT", endpoint),
        ("PARLEY_OTLP_SERVICE_NAME", "parley-under-test".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ("PARLEY_MODEL_PROVIDER", "openai".to_owned()),
        ("OPENAI_BASE_URL", fake.base_url.clone()),
        ("PARLEY_MODEL", "test-model".to_owned()),
        ("PARLEY_TOOLS_FILE", tools.0.display().to_string()),
    ];
    let parley = ParleyProcess::start_logged(&env).await;
    let client = reqwest::Client::new();
    let created = client.post(format!("{}/v1/sessions", parley.base)).json(&json!({"id": "traced"})).send();
    assert_eq!(created.await.unwrap().status(), 201);

    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");
    let answer = client
        .post(format!("{}/v1/sessions/traced/messages", parley.base))
        .header("traceparent", &traceparent)
        .json(&json!({"content": "Weather in Paris?"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let answer: serde_json::Value = answer.json().await.unwrap();
    let turn_id = answer["turn_id"].as_str().expect("a turn id").to_owned();

    let in_trace = |s: &Span| hex(&s.trace_id) == TRACE_ID;
    let spans = received
        .until(|spans| {
            let ours: Vec<&Span> = spans.iter().filter(|s| in_trace(s)).collect();
            ours.iter().any(|s| s.name.starts_with("POST "))
                && ours.iter().filter(|s| s.name.starts_with("chat ")).count() == 2
        })
        .await;
    let spans: Vec<Span> = spans.into_iter().filter(in_trace).collect();
    let by_id: HashMap<String, &Span> = spans.iter().map(|s| (hex(&s.span_id), s)).collect();
    let parent_of = |s: &Span| by_id.get(&hex(&s.parent_span_id)).copied();
    let one = |name: &str| -> &Span {
        let found: Vec<&Span> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "one {name} span: {:#?}", names(&spans));
        found[0]
    };

    // The request span continues the caller's span.
    let request = one("POST /v1/sessions/{id}/messages");
    assert_eq!(hex(&request.parent_span_id), CALLER_SPAN, "the incoming traceparent is continued");
    assert_eq!(attr(request, "http.route").as_deref(), Some("/v1/sessions/{id}/messages"));
    assert_eq!(attr(request, "http.request.method").as_deref(), Some("POST"));
    assert_eq!(attr(request, "http.response.status_code").as_deref(), Some("200"));

    let turn = one("turn");
    assert_eq!(hex(&turn.parent_span_id), hex(&request.span_id), "the turn is the request's child");
    assert_eq!(attr(turn, "session.id").as_deref(), Some("traced"));
    assert_eq!(attr(turn, "turn.id"), Some(turn_id));
    assert_eq!(attr(turn, "turn.status").as_deref(), Some("completed"));

    let models: Vec<&Span> = spans.iter().filter(|s| s.name == "chat test-model").collect();
    assert_eq!(models.len(), 2, "two model calls: {:#?}", names(&spans));
    for model in &models {
        assert_eq!(hex(&model.parent_span_id), hex(&turn.span_id), "a model call is the turn's child");
        assert_eq!(attr(model, "gen_ai.request.model").as_deref(), Some("test-model"));
    }
    let tool = one("execute_tool lookup");
    assert_eq!(hex(&tool.parent_span_id), hex(&turn.span_id), "the tool call is the turn's child");
    assert_eq!(attr(tool, "gen_ai.tool.name").as_deref(), Some("lookup"));

    // Store operations: the turn's own (claim, final append) under the turn span.
    let store_ops: Vec<&Span> = spans.iter().filter(|s| attr(s, "db.operation.name").is_some()).collect();
    for op in ["begin_turn", "finish_turn"] {
        let span = store_ops
            .iter()
            .find(|s| attr(s, "db.operation.name").as_deref() == Some(op))
            .unwrap_or_else(|| panic!("a {op} store span: {:#?}", names(&spans)));
        assert_eq!(attr(span, "db.system.name").as_deref(), Some("memory"));
        assert_eq!(span.name, format!("{op} memory"));
        assert_eq!(hex(&span.parent_span_id), hex(&turn.span_id), "{op} is the turn's child");
    }
    // Every span of the trace hangs from the caller's span through its parents.
    for span in &spans {
        let mut at = span;
        while let Some(parent) = parent_of(at) {
            at = parent;
        }
        assert_eq!(at.span_id, request.span_id, "{} hangs from the request span", span.name);
    }

    // The outgoing requests carried the trace: the model's from the model spans, the tool's from
    // the tool span.
    let sent: Vec<String> = fake.requests().iter().filter_map(|r| r.header("traceparent")).collect();
    assert_eq!(sent.len(), 2, "each model request carries a traceparent");
    for header in &sent {
        let parts: Vec<&str> = header.split('-').collect();
        assert_eq!((parts[0], parts[1], parts[3]), ("00", TRACE_ID, "01"), "{header}");
        assert!(models.iter().any(|m| hex(&m.span_id) == parts[2]), "parent is a model span: {header}");
    }
    let tool_sent = tool_headers.lock().unwrap()[0].get("traceparent").unwrap().to_str().unwrap().to_owned();
    assert_eq!(tool_sent, format!("00-{TRACE_ID}-{}-01", hex(&tool.span_id)));

    // The resource names the service.
    let services: Vec<String> = received.0.lock().unwrap().iter().map(|(s, _)| s.clone()).collect();
    assert!(services.iter().all(|s| s == "parley-under-test"), "{services:?}");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The exporter's endpoint refuses connections: turns are served as usual, and parley logs the
/// failure, not once per batch.
#[tokio::test]
async fn an_unreachable_endpoint_does_not_stop_turns() {
    crate::helpers::install_crypto();
    let endpoint = format!("http://127.0.0.1:{}/v1/traces", free_port());
    let env = [
        ("PARLEY_OTLP_ENDPOINT", endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "50".to_owned()),
        ("PARLEY_LOG", "warn".to_owned()),
    ];
    let parley = ParleyProcess::start_logged(&env).await;
    let client = reqwest::Client::new();
    let created = client.post(format!("{}/v1/sessions", parley.base)).json(&json!({"id": "dark"})).send();
    assert_eq!(created.await.unwrap().status(), 201);
    let failures = || {
        let log = parley.log_text();
        (log.lines().filter(|l| l.contains("could not export traces")).count(), log)
    };
    // Turns for 3 s, a span batch every 50 ms: each export fails (after the exporter's own
    // retries, under a second).
    let started = std::time::Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(3) || (i < 100 && failures().0 == 0) {
        let answer = client
            .post(format!("{}/v1/sessions/dark/messages", parley.base))
            .json(&json!({"content": format!("hello {i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (failures, log) = failures();
    assert_eq!(failures, 1, "the first failure is logged, the next ones wait a minute:\n{log}");
}

/// Spans still queued when parley stops gracefully are exported before it exits (a batch delay
/// far longer than the test).
#[tokio::test]
async fn a_graceful_stop_exports_the_spans_still_queued() {
    crate::helpers::install_crypto();
    let (endpoint, received) = receiver().await;
    let env = [("PARLEY_OTLP_ENDPOINT", endpoint), ("OTEL_BSP_SCHEDULE_DELAY", "600000".to_owned())];
    let parley = ParleyProcess::start(&env).await;
    let client = reqwest::Client::new();
    let created = client.post(format!("{}/v1/sessions", parley.base)).json(&json!({"id": "last"})).send();
    assert_eq!(created.await.unwrap().status(), 201);
    let answer =
        client.post(format!("{}/v1/sessions/last/messages", parley.base)).json(&json!({"content": "hi"}));
    assert_eq!(answer.send().await.unwrap().status(), 200);
    assert!(received.spans().is_empty(), "nothing exported before the batch delay");
    let exited = tokio::task::spawn_blocking(move || parley.terminate()).await.unwrap();
    assert!(exited, "parley exits cleanly");
    let spans = received.spans();
    assert!(spans.iter().any(|s| s.name == "turn"), "the turn was flushed at exit: {:#?}", names(&spans));
    assert!(spans.iter().any(|s| s.name == "POST /v1/sessions/{id}/messages"), "{:#?}", names(&spans));
}
