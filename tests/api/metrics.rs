//! `/metrics`: exact counts after a scripted workload, the scrape accepted by `promtool check
//! metrics`, a real Prometheus scraping parley, and who may read the scrape.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{Backend, KEY_A, TestApp, spawn_app, spawn_app_on, two_tenants};
use crate::servers::{ParleyProcess, free_port};

/// The scrape's value of one series (a line `name{labels} value`), 0 when absent.
pub fn value(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

pub async fn scrape(app: &TestApp) -> String {
    let response = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    response.text().await.unwrap()
}

/// A scripted workload (JSON and streamed turns, a tool call, a 404, a 409, a failed turn) gives
/// exactly the expected counts, with route templates and never an id in a label.
async fn a_workload_gives_exact_counts(backend: Backend) {
    let app =
        spawn_app_on(backend, &["--metrics", "true", "--echo-delay-ms", "30", "--turn-timeout", "2s"]).await;
    app.create_session("m").await;
    app.post_message("m", "hello").await;
    app.stream_turn("m", "streamed").await;
    let tool = app.post_message("m", r#"/tool calculator {"expression": "1 + 2"}"#).await;
    assert_eq!(tool["messages"].as_array().unwrap().len(), 4, "{tool}");
    let (status, _) = app.get_json("/v1/sessions/nope").await;
    assert_eq!(status, 404);
    // A 409: a turn posted while another streams.
    let running = app.open_stream("m", "one two three four five six seven eight").await;
    let busy = app.post_message_raw("m", json!({"content": "too soon"})).await;
    assert_eq!(busy.status(), 409);
    crate::helpers::collect_events(running).await;
    // A failed turn: past the turn timeout.
    let long = "word ".repeat(100);
    assert_eq!(app.post_message_raw("m", json!({"content": long})).await.status(), 504);

    let text = scrape(&app).await;
    let count = |series: &str| value(&text, series);
    assert_eq!(count(r#"parley_turns_total{outcome="completed"}"#), 4.0, "{text}");
    assert_eq!(count(r#"parley_turns_total{outcome="failed"}"#), 1.0);
    assert_eq!(count("parley_turn_duration_seconds_count"), 5.0);
    assert_eq!(count("parley_turn_conflicts_total"), 1.0);
    assert_eq!(count("parley_running_turns"), 0.0);
    assert_eq!(count("parley_open_streams"), 0.0, "streams ended");
    assert_eq!(count(r#"parley_tool_calls_total{tool="calculator",outcome="ok"}"#), 1.0);
    assert_eq!(count(r#"parley_tool_duration_seconds_count{tool="calculator"}"#), 1.0);
    // Five turns, one with a tool round (two calls); the timed-out call never ended.
    assert_eq!(count(r#"parley_model_request_duration_seconds_count{model="echo"}"#), 5.0);
    assert!(count(r#"parley_model_tokens_total{model="echo",kind="completion"}"#) > 0.0);
    let post = r#"route="/v1/sessions/{id}/messages",method="POST""#;
    assert_eq!(count(&format!("parley_http_requests_total{{{post},status=\"200\"}}")), 4.0);
    assert_eq!(count(&format!("parley_http_requests_total{{{post},status=\"409\"}}")), 1.0);
    assert_eq!(count(&format!("parley_http_requests_total{{{post},status=\"504\"}}")), 1.0);
    assert_eq!(
        count(r#"parley_http_requests_total{route="/v1/sessions/{id}",method="GET",status="404"}"#),
        1.0
    );
    // Streamed answers are counted, but not timed.
    assert_eq!(count(&format!("parley_http_request_duration_seconds_count{{{post}}}")), 4.0);
    let backend_name = app.store.backend();
    let begins = format!(
        r#"parley_store_operation_duration_seconds_count{{backend="{backend_name}",op="begin_turn"}}"#
    );
    assert_eq!(count(&begins), 5.0, "one begin_turn per started turn");
    assert!(!text.contains("\"m\""), "no session id in a label");
    assert!(text.contains(r#"parley_build_info{version=""#));
}

for_each_backend!(a_workload_gives_exact_counts);

/// `promtool check metrics` (Debian's `prometheus` package) accepts the scrape.
#[tokio::test]
async fn promtool_accepts_the_scrape() {
    let app = spawn_app(&["--metrics", "true"]).await;
    app.create_session("p").await;
    app.post_message("p", "hello").await;
    app.stream_turn("p", "again").await;
    let text = scrape(&app).await;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian's prometheus package; scripts/test installs it)");
    use std::io::Write;
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let output = promtool.wait_with_output().unwrap();
    let said =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "promtool: {said}\n{text}");
    assert!(said.trim().is_empty(), "promtool warns: {said}");
}

/// A real Prometheus (Debian's package) scrapes parley's own metrics listener
/// (`PARLEY_METRICS_ADDR`) and answers a PromQL query for `parley_turns_total`; the main listener
/// then has no `/metrics`.
#[tokio::test]
async fn a_real_prometheus_scrapes_parley() {
    crate::helpers::install_crypto();
    let metrics_port = free_port();
    let env =
        [("PARLEY_METRICS", "true".to_owned()), ("PARLEY_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))];
    let parley = ParleyProcess::start(&env).await;
    let client = reqwest::Client::new();
    let post = |path: &str, body: Value| client.post(format!("{}{path}", parley.base)).json(&body).send();
    post("/v1/sessions", json!({"id": "prom"})).await.unwrap();
    for _ in 0..3 {
        assert_eq!(post("/v1/sessions/prom/messages", json!({"content": "hi"})).await.unwrap().status(), 200);
    }
    let main = client.get(format!("{}/metrics", parley.base)).send().await.unwrap();
    assert_eq!(main.status(), 404, "the scrape is on its own listener");

    let dir = std::env::temp_dir().join(crate::helpers::unique_name("prometheus"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: parley\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let port = free_port();
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus is installed (Debian's prometheus package; scripts/test installs it)");
    let query = format!("http://127.0.0.1:{port}/api/v1/query?query=sum(parley_turns_total)");
    let mut answer = Value::Null;
    for _ in 0..100 {
        if let Ok(response) = client.get(&query).send().await
            && let Ok(body) = response.json::<Value>().await
            && body["data"]["result"][0]["value"][1] == "3"
        {
            answer = body;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(answer["data"]["result"][0]["value"][1], "3", "Prometheus saw the three turns: {answer}");
}

/// With API keys on, `/metrics` needs one unless `PARLEY_METRICS_PUBLIC`; with metrics off (the
/// default) there is none.
#[tokio::test]
async fn who_may_read_the_scrape() {
    let mut args = two_tenants();
    args.extend(["--metrics".to_owned(), "true".to_owned()]);
    let keyed = spawn_app(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(keyed.client.get(keyed.url("/metrics")).send().await.unwrap().status(), 401);
    let with_key = keyed.client.get(keyed.url("/metrics")).bearer_auth(KEY_A).send().await.unwrap();
    assert_eq!(with_key.status(), 200);
    args.extend(["--metrics-public".to_owned(), "true".to_owned()]);
    let public = spawn_app(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(public.client.get(public.url("/metrics")).send().await.unwrap().status(), 200);
    let off = spawn_app(&["--metrics", "false"]).await;
    assert_eq!(off.client.get(off.url("/metrics")).send().await.unwrap().status(), 404);
    let default = spawn_app(&[]).await;
    assert_eq!(
        default.client.get(default.url("/metrics")).send().await.unwrap().status(),
        404,
        "off by default"
    );
}

/// The Grafana dashboard in `deploy/` is valid JSON and charts only series parley exports.
#[tokio::test]
async fn the_dashboard_charts_only_exported_series() {
    // Every family once, so that each is in the scrape.
    let metrics = std::sync::Arc::new(parley::metrics::Metrics::new(false));
    metrics.http_request("/v1/sessions", "GET", 429, "t", Some(Duration::from_millis(1)));
    metrics.turn_ended("completed", "t", Duration::from_millis(10));
    metrics.model_request("echo", Some(Duration::from_millis(1)), Duration::from_millis(2));
    metrics.model_tokens("echo", 1, 2);
    metrics.tool_call("calculator", true, Duration::from_millis(1));
    metrics.store_operation("memory", "append", false, Duration::from_millis(1));
    metrics.turn_conflict();
    metrics.idempotent_replay();
    let _running = (metrics.running_turn(), metrics.open_stream());
    let text = metrics.render();
    let dashboard = include_str!("../../deploy/grafana-dashboard.json");
    let parsed: Value = serde_json::from_str(dashboard).expect("the dashboard is JSON");
    let mut charted = 0;
    for panel in parsed["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (at, _) in expr.match_indices("parley_") {
                let name: String =
                    expr[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                let base = name.trim_end_matches("_bucket");
                assert!(text.contains(&format!("# TYPE {base} ")), "{name} in {expr} is not exported");
                charted += 1;
            }
        }
    }
    assert!(charted >= 15, "{charted}");
}

/// `PARLEY_LOG_FORMAT=json` at `info`: one access line per request with its request id, route
/// template, status, duration, tenant and turn id (when the request started or named a turn),
/// and never a message's text, metadata or a key. Metrics stay off: the log needs none.
#[tokio::test]
async fn the_access_log_has_one_line_per_request_and_no_text() {
    crate::helpers::install_crypto();
    let app = ParleyProcess::start_logged(&[
        ("PARLEY_LOG", "info".to_owned()),
        ("PARLEY_LOG_FORMAT", "json".to_owned()),
    ])
    .await;
    let client = reqwest::Client::new();
    let url = |path: &str| format!("{}{path}", app.base);
    let created = client.post(url("/v1/sessions")).json(&json!({"id": "logged"})).send().await.unwrap();
    assert_eq!(created.status(), 201);
    let turn: Value = client
        .post(url("/v1/sessions/logged/messages"))
        .header("x-request-id", "req-turn-1")
        .json(&json!({"content": "very-private-words", "metadata": {"note": "private-metadata"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let turn_id = turn["turn_id"].as_str().expect("a turn id").to_owned();
    let read = client.get(url(&format!("/v1/sessions/logged/turns/{turn_id}"))).send().await.unwrap();
    assert_eq!(read.status(), 200);
    assert_eq!(client.get(url("/v1/sessions/missing")).send().await.unwrap().status(), 404);
    // The log thread writes what has queued by the time the process has ended.
    let log = app.terminate_and_read_log();
    let lines: Vec<Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["target"] == "parley::http::access")
        // The start-up probe's.
        .filter(|line| line["fields"]["http.route"] != "/healthz")
        .collect();
    let field = |line: &Value, name: &str| line["fields"][name].clone();
    let routes: Vec<(String, u64)> = lines
        .iter()
        .map(|l| {
            (field(l, "http.route").as_str().unwrap().to_owned(), field(l, "http.status").as_u64().unwrap())
        })
        .collect();
    assert_eq!(
        routes,
        [
            ("/v1/sessions".to_owned(), 201),
            ("/v1/sessions/{id}/messages".to_owned(), 200),
            ("/v1/sessions/{id}/turns/{turn_id}".to_owned(), 200),
            ("/v1/sessions/{id}".to_owned(), 404),
        ],
        "{log}"
    );
    for line in &lines {
        assert_eq!(line["level"], "INFO", "{line}");
        assert_eq!(field(line, "tenant"), "default", "{line}");
        assert!(field(line, "duration_ms").as_f64().is_some_and(|ms| ms >= 0.0), "{line}");
        assert!(field(line, "request.id").as_str().is_some_and(|id| !id.is_empty()), "{line}");
    }
    assert_eq!(field(&lines[1], "request.id"), "req-turn-1");
    assert_eq!(field(&lines[1], "turn_id"), turn_id.as_str(), "the posted turn's id");
    assert_eq!(field(&lines[2], "turn_id"), turn_id.as_str(), "the turn the path names");
    assert!(field(&lines[0], "turn_id").is_null() && field(&lines[3], "turn_id").is_null());
    assert!(!log.contains("very-private-words") && !log.contains("private-metadata"), "{log}");
}

/// The text log (the default format) written to a file has no colour codes: they are for a
/// terminal only.
#[tokio::test]
async fn a_text_log_that_is_not_a_terminal_has_no_colour_codes() {
    crate::helpers::install_crypto();
    let app = ParleyProcess::start_logged(&[("PARLEY_LOG", "info".to_owned())]).await;
    let log = app.terminate_and_read_log();
    assert!(log.contains("parley listening"), "{log}");
    assert!(!log.contains('\u{1b}'), "{log:?}");
}
