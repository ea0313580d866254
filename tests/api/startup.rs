//! The binary itself: start-up refuses unsafe or incomplete authentication settings with a
//! message naming the fix, `parley keys new` makes a working key, and no key reaches the logs.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::auth::KeysFile;
use crate::helpers::{install_crypto, unique_name};

/// The `parley` binary with an empty environment plus these variables (on the memory store unless
/// they say otherwise, so that no run leaves a `parley.db` in the repository).
fn parley(env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_parley"));
    command.env_clear().env("PARLEY_STORE", "memory").envs(env.iter().copied()).kill_on_drop(true);
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    command
}

/// Runs the binary to its exit (within 20 s); returns success and stderr.
async fn run_to_exit(env: &[(&str, &str)]) -> (bool, String) {
    let child = parley(env).spawn().expect("spawn parley");
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("parley should exit, not serve")
        .unwrap();
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

async fn refuses_to_start(env: &[(&str, &str)], expected: &[&str]) {
    let (ok, stderr) = run_to_exit(env).await;
    assert!(!ok, "parley started with {env:?}");
    for text in expected {
        assert!(stderr.contains(text), "the error names {text:?}: {stderr}");
    }
}

#[tokio::test]
async fn a_public_address_without_parley_auth_refuses_to_start() {
    refuses_to_start(&[("PARLEY_ADDR", "0.0.0.0:0")], &["PARLEY_AUTH=api_key", "PARLEY_AUTH=none"]).await;
}

#[tokio::test]
async fn api_key_auth_without_keys_refuses_to_start() {
    refuses_to_start(&[("PARLEY_AUTH", "api_key")], &["PARLEY_API_KEYS_FILE", "parley keys new"]).await;
}

#[tokio::test]
async fn a_keys_file_without_an_active_key_or_unreadable_refuses_to_start() {
    let file = KeysFile::toml(&[("old", "acme", "pk_old_secret", true)]);
    let path = file.path();
    refuses_to_start(&[("PARLEY_AUTH", "api_key"), ("PARLEY_API_KEYS_FILE", &path)], &["no active key"])
        .await;
    let missing = std::env::temp_dir().join(format!("{}.toml", unique_name("absent")));
    let missing = missing.display().to_string();
    let env = [("PARLEY_AUTH", "api_key"), ("PARLEY_API_KEYS_FILE", missing.as_str())];
    refuses_to_start(&env, &["PARLEY_API_KEYS_FILE", &missing, "cannot read it"]).await;
}

#[tokio::test]
async fn malformed_dev_keys_refuse_to_start_without_showing_them() {
    let (ok, stderr) = run_to_exit(&[("PARLEY_AUTH", "api_key"), ("PARLEY_API_KEYS", "acme:hunter2")]).await;
    assert!(!ok);
    assert!(stderr.contains("PARLEY_API_KEYS pair #1"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// A running parley: its address and every line it logged so far.
struct Running {
    child: Child,
    addr: String,
    logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Running {
    /// Starts the binary on a free port (JSON logs) and waits until it listens.
    async fn start(env: &[(&str, &str)]) -> Running {
        install_crypto();
        let mut all = vec![("PARLEY_LOG_FORMAT", "json")];
        all.extend_from_slice(env);
        if !env.iter().any(|(k, _)| *k == "PARLEY_ADDR") {
            all.push(("PARLEY_ADDR", "127.0.0.1:0"));
        }
        let mut child = parley(&all).spawn().expect("spawn parley");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let addr = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                logs.lock().unwrap().push(line.clone());
                let Ok(entry) = serde_json::from_str::<Value>(&line) else { continue };
                if entry["fields"]["message"] == "parley listening" {
                    return entry["fields"]["addr"].as_str().unwrap().to_owned();
                }
            }
            panic!("parley exited: {:?}", logs.lock().unwrap());
        })
        .await
        .expect("parley listens within 20 s");
        let sink = std::sync::Arc::clone(&logs);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        Running { child, addr: addr.replace("0.0.0.0", "127.0.0.1"), logs }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops the process and returns everything it logged.
    /// Stops parley as an operator does (SIGTERM, so its log thread writes what has queued; a
    /// SIGKILL after 10 s) and returns everything it logged.
    async fn stop(mut self) -> String {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_err() {
            self.child.kill().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.logs.lock().unwrap().join("\n")
    }
}

#[tokio::test]
async fn auth_none_on_a_public_address_starts_with_a_warning() {
    let running = Running::start(&[("PARLEY_ADDR", "0.0.0.0:0"), ("PARLEY_AUTH", "none")]).await;
    let status = reqwest::get(running.url("/v1/sessions")).await.unwrap().status();
    assert_eq!(status, 200);
    let logs = running.stop().await;
    let warning = logs.lines().find(|l| l.contains("PARLEY_AUTH=none")).expect("a warning");
    assert!(warning.contains("WARN"), "{warning}");
}

/// Runs `parley keys new`, returning the key and the TOML entry it printed.
async fn new_key(tenant: &str, id: &str) -> (String, String) {
    let output = parley(&[]).args(["keys", "new", "--tenant", tenant, "--id", id]).output().await.unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let key = stdout.split_whitespace().find(|w| w.starts_with("pk_")).expect("the key").to_owned();
    let entry = stdout[stdout.find("[[keys]]").expect("the entry")..].to_owned();
    assert!(!entry.contains(&key), "the entry holds the hash, not the key");
    (key, entry)
}

#[tokio::test]
async fn a_key_from_parley_keys_new_works_and_no_key_reaches_the_logs() {
    let (key, entry) = new_key("acme", "ci").await;
    assert!(key.starts_with("pk_ci_") && key.len() == "pk_ci_".len() + 64, "{key}");
    let file = KeysFile::toml(&[]);
    std::fs::write(&file.0, &entry).unwrap();
    let path = file.path();
    let dev_key = "pk_dev_devsecret0123456789";
    let dev = format!("globex:{dev_key}");
    let env = [
        ("PARLEY_AUTH", "api_key"),
        ("PARLEY_API_KEYS_FILE", path.as_str()),
        ("PARLEY_API_KEYS", dev.as_str()),
        ("PARLEY_LOG", "trace"),
    ];
    let running = Running::start(&env).await;
    let client = reqwest::Client::new();
    let send = |key: String, path: &'static str| {
        client.post(running.url(path)).bearer_auth(key).json(&serde_json::json!({"content": "hi"})).send()
    };
    assert_eq!(send(key.clone(), "/v1/sessions").await.unwrap().status(), 201);
    assert_eq!(send(dev_key.to_owned(), "/v1/sessions").await.unwrap().status(), 201);
    let wrong = format!("{}ff", &key[..key.len() - 2]);
    assert_eq!(send(wrong.clone(), "/v1/sessions").await.unwrap().status(), 401);
    assert_eq!(send("pk_zz_wrongsecretvalue".into(), "/v1/sessions").await.unwrap().status(), 401);
    let logs = running.stop().await;
    assert!(logs.contains("\"auth.key_id\":\"ci\""), "the key id is logged");
    assert!(logs.contains("\"tenant\":\"acme\""), "the tenant is logged");
    for secret in [&key[6..], "devsecret0123456789", &wrong[6..], "wrongsecretvalue"] {
        assert!(!logs.contains(secret), "a secret reached the logs");
    }
}

#[tokio::test]
async fn an_error_is_logged_once_with_the_request_id_of_its_response() {
    // Redis on a port where nothing listens: parley starts, and writes fail with 503.
    let env = [("PARLEY_STORE", "redis"), ("REDIS_URL", "redis://127.0.0.1:1"), ("PARLEY_LOG", "info")];
    let running = Running::start(&env).await;
    let response = reqwest::Client::new()
        .post(running.url("/v1/sessions"))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let request_id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let logs = running.stop().await;
    let (access, lines): (Vec<Value>, Vec<Value>) = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|entry| entry["fields"]["request.id"] == request_id.as_str())
        .partition(|entry| entry["target"] == "parley::http::access");
    assert_eq!(lines.len(), 1, "one error line for the failed request: {logs}");
    assert_eq!(access.len(), 1, "and its access line: {logs}");
    assert_eq!(access[0]["fields"]["http.status"], 503);
    assert_eq!(lines[0]["level"], "WARN");
    assert_eq!(lines[0]["fields"]["message"], "store unavailable");
    assert_eq!(lines[0]["fields"]["error.code"], "store_unavailable");
}

/// The `status` file of a process or thread, as (field, value) lines.
#[cfg(target_os = "linux")]
fn proc_status(path: &str) -> std::collections::HashMap<String, String> {
    let text = std::fs::read_to_string(format!("{path}/status")).unwrap_or_default();
    text.lines().filter_map(|l| l.split_once(':')).map(|(k, v)| (k.to_owned(), v.trim().to_owned())).collect()
}

/// By default the server turns transparent huge pages off for itself and leaves its worker
/// threads free to run anywhere; PARLEY_DISABLE_THP=false leaves the pages as the system sets
/// them, and PARLEY_PIN_WORKERS=true pins one worker to each CPU.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_server_turns_huge_pages_off_and_pins_workers_when_asked() {
    let all_cpus = proc_status("/proc/self")["Cpus_allowed_list"].clone();
    let workers = |pid: u32| -> Vec<String> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .map(|t| proc_status(&t.unwrap().path().to_string_lossy()))
            .filter(|s| s.get("Name").is_some_and(|n| n == "tokio-rt-worker"))
            .map(|s| s["Cpus_allowed_list"].clone())
            .collect()
    };

    let running = Running::start(&[]).await;
    let pid = running.child.id().unwrap();
    assert_eq!(proc_status(&format!("/proc/{pid}"))["THP_enabled"], "0");
    assert!(workers(pid).iter().all(|cpus| *cpus == all_cpus), "{:?}", workers(pid));
    running.stop().await;

    let running = Running::start(&[("PARLEY_DISABLE_THP", "false"), ("PARLEY_PIN_WORKERS", "true")]).await;
    let pid = running.child.id().unwrap();
    assert_eq!(proc_status(&format!("/proc/{pid}"))["THP_enabled"], "1");
    // Workers pin themselves the first time they go idle, which an idle server does at once.
    let mut pinned = Vec::new();
    for _ in 0..100 {
        pinned = workers(pid);
        if !pinned.is_empty() && pinned.iter().all(|cpus| !cpus.contains([',', '-'])) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut sorted = pinned.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), pinned.len(), "one CPU per worker: {pinned:?}");
    assert!(pinned.iter().all(|cpus| !cpus.contains([',', '-'])), "each on one CPU: {pinned:?}");
    running.stop().await;
}

#[tokio::test]
async fn a_database_that_does_not_exist_stops_start_up_at_once_with_a_clear_message() {
    let mut url = url::Url::parse(&crate::helpers::database_url()).unwrap();
    let missing = unique_name("parley_missing");
    url.set_path(&format!("/{missing}"));
    let env = [("PARLEY_STORE", "postgres"), ("DATABASE_URL", url.as_str())];
    let started = std::time::Instant::now();
    let (ok, stderr) = run_to_exit(&env).await;
    assert!(!ok, "parley started without its database");
    // The retries of an unreachable server come every 2 s, forever; this one is not retried.
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    for text in [missing.as_str(), "does not exist", "retrying cannot fix it", "DATABASE_URL"] {
        assert!(stderr.contains(text), "the error names {text:?}: {stderr}");
    }
}

#[tokio::test]
async fn an_unreachable_postgres_is_retried_at_start_up_and_each_failure_is_logged() {
    let port = crate::servers::free_port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let env = [("PARLEY_STORE", "postgres"), ("DATABASE_URL", url.as_str()), ("PARLEY_STORE_TIMEOUT", "1s")];
    let running = Running::start(&env).await;
    let retried = |logs: &[String]| {
        logs.iter().filter(|l| l.contains("postgres still unreachable; retrying the migrations")).count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while retried(&running.logs.lock().unwrap()) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no logged retries: {:?}",
            running.logs.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(reqwest::get(running.url("/readyz")).await.unwrap().status(), 503);
    let logs = running.stop().await;
    let attempts: Vec<Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["fields"]["message"] == "postgres still unreachable; retrying the migrations")
        .map(|e| e["fields"]["attempt"].clone())
        .collect();
    assert_eq!(&attempts[..2], &[Value::from(2), Value::from(3)], "{logs}");
}

/// The SQLite store (the default) keeps a conversation across a restart of the binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_store_keeps_history_across_a_restart_of_the_binary() {
    use crate::servers::ParleyProcess;
    // Its client is the first this process may build (when run alone, or with a filter).
    crate::helpers::install_crypto();
    let path = crate::helpers::fresh_sqlite_path();
    // ParleyProcess runs the memory store unless told: name the default explicitly.
    let env = [("PARLEY_STORE", "sqlite".to_owned()), ("PARLEY_SQLITE_PATH", path.display().to_string())];
    let first = ParleyProcess::start(&env).await;
    let client = reqwest::Client::new();
    let created = client
        .post(format!("{}/v1/sessions", first.base))
        .json(&serde_json::json!({"id": "kept"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let turn = client
        .post(format!("{}/v1/sessions/kept/messages", first.base))
        .json(&serde_json::json!({"content": "remember me"}))
        .send()
        .await
        .unwrap();
    assert!(turn.status().is_success(), "{}", turn.status());
    assert!(first.terminate(), "a clean exit");
    let second = ParleyProcess::start(&env).await;
    let page: Value = client
        .get(format!("{}/v1/sessions/kept/messages", second.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let texts: Vec<&str> =
        page["data"].as_array().unwrap().iter().map(|m| m["content"].as_str().unwrap()).collect();
    assert_eq!(texts.first(), Some(&"remember me"), "{page}");
    assert_eq!(texts.len(), 2, "the question and its answer: {page}");
}

/// A SQLite file another parley holds, and a distributed deployment on SQLite, refuse to start
/// with a message naming the fix.
#[tokio::test]
async fn sqlite_refuses_a_file_in_use_and_a_distributed_deployment() {
    let path = crate::helpers::fresh_sqlite_path();
    let held = crate::helpers::sqlite_store_at(&path).await;
    let shown = path.display().to_string();
    let env = [("PARLEY_STORE", "sqlite"), ("PARLEY_SQLITE_PATH", shown.as_str())];
    refuses_to_start(&env, &["in use by another parley", &shown, "PARLEY_SQLITE_PATH"]).await;
    drop(held);
    let env =
        [("PARLEY_STORE", "sqlite"), ("PARLEY_SQLITE_PATH", shown.as_str()), ("PARLEY_DISTRIBUTED", "true")];
    refuses_to_start(&env, &["PARLEY_STORE=sqlite", "PARLEY_STORE=redis", "PARLEY_STORE=postgres"]).await;
}
