//! HTTP tools over real HTTP against a tiny local server, and tools files on disk (TOML, JSON).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use parley::tools::http::{MAX_RESPONSE_BYTES, load_tools_file};
use parley::tools::{Tool, ToolError, ToolRegistry};
use serde_json::{Value, json};

use crate::helpers::unique_name;

/// Starts the target server; returns its base URL.
async fn target() -> String {
    let app = Router::new()
        .route("/echo", post(echo))
        .route(
            "/fail",
            post(|| async { (StatusCode::SERVICE_UNAVAILABLE, "down for maintenance ".repeat(100)) }),
        )
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        )
        .route("/big", post(|| async { "é".repeat(MAX_RESPONSE_BYTES) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    format!("http://{addr}")
}

/// Answers with what it received: the JSON body and some headers.
async fn echo(headers: HeaderMap, body: String) -> axum::Json<Value> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    axum::Json(json!({
        "body": serde_json::from_str::<Value>(&body).unwrap_or(Value::String(body)),
        "content_type": header("content-type"),
        "x_api_key": header("x-api-key"),
        "x_from_env": header("x-from-env"),
    }))
}

/// A file in the temp directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(extension: &str, text: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!("{}.{extension}", unique_name("parley_tools")));
        std::fs::write(&path, text).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn load(extension: &str, text: &str) -> Result<Vec<Arc<dyn Tool>>, String> {
    let file = TempFile::new(extension, text);
    load_tools_file(&file.0)
}

fn registry(tools: Vec<Arc<dyn Tool>>) -> ToolRegistry {
    let mut registry = ToolRegistry::new();
    for tool in tools {
        registry.register(tool).unwrap();
    }
    registry
}

#[tokio::test]
async fn a_toml_tool_posts_its_arguments_with_its_headers() {
    let base = target().await;
    let tools = load(
        "toml",
        &format!(
            r#"
            [[tools]]
            name = "echo"
            description = "Echoes."
            url = "{base}/echo"
            timeout = "5s"
            parameters = {{ type = "object", properties = {{ city = {{ type = "string" }} }} }}
            headers = {{ X-Api-Key = "k-123", X-From-Env = "path=${{PATH}}" }}
            "#
        ),
    )
    .unwrap();
    let args = json!({"city": "Zürich", "days": [1, 2]});
    let text = tools[0].call(args.clone()).await.unwrap();
    let seen: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(seen["body"], args);
    assert_eq!(seen["content_type"], "application/json");
    assert_eq!(seen["x_api_key"], "k-123");
    assert_eq!(seen["x_from_env"], format!("path={}", std::env::var("PATH").unwrap()));
}

#[tokio::test]
async fn a_json_tools_file_loads_the_same_way() {
    let base = target().await;
    let doc = json!({"tools": [
        {"name": "echo", "description": "Echoes.", "url": format!("{base}/echo"), "headers": {"X-Api-Key": "j"}},
        {"name": "fail", "url": format!("{base}/fail"), "timeout": "2s"}
    ]});
    let tools = load("json", &doc.to_string()).unwrap();
    assert_eq!(tools.iter().map(|t| t.name()).collect::<Vec<_>>(), vec!["echo", "fail"]);
    assert_eq!(tools[1].timeout(), Duration::from_secs(2));
    let outcome = registry(tools).run("echo", &json!({"q": 1})).await;
    assert!(!outcome.is_error, "{}", outcome.content);
    assert!(outcome.content.contains("\"x_api_key\":\"j\""), "{}", outcome.content);
}

#[tokio::test]
async fn a_non_2xx_answer_is_an_error_with_the_status_and_an_excerpt() {
    let base = target().await;
    let tools = load("toml", &format!("[[tools]]\nname = \"fail\"\nurl = \"{base}/fail\"\n")).unwrap();
    let err = tools[0].call(json!({})).await.unwrap_err();
    let ToolError::Failed(message) = err else { panic!("{err:?}") };
    assert!(message.starts_with("HTTP 503 Service Unavailable: down for maintenance"), "{message}");
    assert!(message.len() < 400, "the excerpt is short: {}", message.len());
}

#[tokio::test]
async fn a_slow_target_times_out() {
    let base = target().await;
    let tools =
        load("toml", &format!("[[tools]]\nname = \"slow\"\nurl = \"{base}/slow\"\ntimeout = \"200ms\"\n"))
            .unwrap();
    let started = std::time::Instant::now();
    let outcome = registry(tools).run("slow", &json!({})).await;
    assert!(outcome.is_error);
    assert!(outcome.content.contains("timed out"), "{}", outcome.content);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_large_body_is_cut_at_the_limit_on_a_character_boundary() {
    let base = target().await;
    let tools = load("toml", &format!("[[tools]]\nname = \"big\"\nurl = \"{base}/big\"\n")).unwrap();
    let text = tools[0].call(json!({})).await.unwrap();
    let (body, note) = text.rsplit_once('\n').unwrap();
    assert!(body.len() <= MAX_RESPONSE_BYTES && body.len() > MAX_RESPONSE_BYTES - 4);
    assert!(body.chars().all(|c| c == 'é'));
    assert_eq!(note, "[response cut at 64 KiB]");
}

#[tokio::test]
async fn an_unreachable_target_is_a_tool_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let tools = load("toml", &format!("[[tools]]\nname = \"gone\"\nurl = \"http://{addr}/x\"\n")).unwrap();
    let err = tools[0].call(json!({})).await.unwrap_err();
    assert!(matches!(&err, ToolError::Failed(m) if m.starts_with("request failed")), "{err:?}");
}

#[test]
fn file_errors_name_the_file_and_the_problem() {
    let missing = std::env::temp_dir().join(format!("{}.toml", unique_name("parley_missing")));
    let err = load_tools_file(&missing).err().unwrap();
    assert!(err.contains(&missing.display().to_string()) && err.contains("cannot read it"), "{err}");
    let err = load("yaml", "tools: []").err().unwrap();
    assert!(err.contains("unsupported extension"), "{err}");
    let err = load("toml", "[[tools]]\nname = \"bad name!\"\nurl = \"http://h/\"").err().unwrap();
    assert!(err.contains("tool #1 (\"bad name!\"): invalid name"), "{err}");
    let err = load("json", r#"{"tools": [{"name": "t"}]}"#).err().unwrap();
    assert!(err.contains("tool #1 (\"t\"): missing url"), "{err}");
    let err = load("toml", "[[tools]]\nname = \"t\"\nurl = \"http://h/\"\ntimeout = \"fast\"").err().unwrap();
    assert!(err.contains("invalid timeout \"fast\""), "{err}");
    let err = load(
        "toml",
        "[[tools]]\nname = \"t\"\nurl = \"http://h/\"\nheaders = { A = \"${PARLEY_TEST_SURELY_UNSET_VAR}\" }",
    )
    .err()
    .unwrap();
    assert!(err.contains("PARLEY_TEST_SURELY_UNSET_VAR is not set"), "{err}");
}
