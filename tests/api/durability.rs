//! Durability and faults with real servers: history survives a restart of parley (Redis and
//! PostgreSQL); a store outage during turns answers 503 quickly, leaves the history as it was,
//! and parley recovers by itself when the store comes back; SIGTERM drains turns.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{collect_events, database_url, install_crypto, redis_url, unique_name};
use crate::servers::{ParleyProcess, PrivatePostgres, PrivateRedis};

async fn create(client: &reqwest::Client, base: &str, id: &str) {
    let response = client.post(format!("{base}/v1/sessions")).json(&json!({"id": id})).send().await.unwrap();
    assert_eq!(response.status(), 201);
}

async fn turn(client: &reqwest::Client, base: &str, id: &str, content: &str) -> reqwest::Response {
    client
        .post(format!("{base}/v1/sessions/{id}/messages"))
        .json(&json!({"content": content}))
        .send()
        .await
        .unwrap()
}

async fn history(client: &reqwest::Client, base: &str, id: &str) -> Vec<Value> {
    let page: Value = client
        .get(format!("{base}/v1/sessions/{id}/messages?limit=100"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    page["data"].as_array().unwrap().clone()
}

async fn history_survives_a_restart(env: Vec<(&str, String)>) {
    install_crypto();
    let client = reqwest::Client::new();
    let first = ParleyProcess::start(&env).await;
    create(&client, &first.base, "durable").await;
    assert_eq!(turn(&client, &first.base, "durable", "remember me").await.status(), 200);
    let before = history(&client, &first.base, "durable").await;
    assert!(first.terminate(), "parley exits cleanly on SIGTERM");
    let second = ParleyProcess::start(&env).await;
    assert_eq!(history(&client, &second.base, "durable").await, before, "the history is intact");
    let next: Value = turn(&client, &second.base, "durable", "still there?").await.json().await.unwrap();
    assert_eq!(next["messages"][1]["content"], "echo: still there? (context: 2 messages)");
    second.kill();
}

#[tokio::test]
async fn history_survives_a_restart_of_parley_on_redis() {
    let prefix = unique_name("parley_test");
    history_survives_a_restart(vec![
        ("PARLEY_STORE", "redis".into()),
        ("REDIS_URL", redis_url()),
        ("PARLEY_REDIS_PREFIX", prefix),
    ])
    .await;
}

#[tokio::test]
async fn history_survives_a_restart_of_parley_on_postgres() {
    history_survives_a_restart(vec![
        ("PARLEY_STORE", "postgres".into()),
        ("DATABASE_URL", database_url()),
        ("PARLEY_PG_SCHEMA", unique_name("t")),
    ])
    .await;
}

/// Polls `/readyz` until it answers `status`, for at most 20 s.
async fn wait_ready(client: &reqwest::Client, base: &str, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = client.get(format!("{base}/readyz")).send().await.unwrap().status().as_u16();
        if got == status {
            return;
        }
        assert!(Instant::now() < deadline, "/readyz stayed {got}, expected {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the outage scenario against a store that `stop`/`start` take down and bring back.
async fn outage(env: Vec<(&str, String)>, stop: impl Fn(), start: impl Fn()) {
    install_crypto();
    let client = reqwest::Client::new();
    let mut env = env;
    env.extend([("PARLEY_STORE_TIMEOUT", "1s".to_owned()), ("PARLEY_ECHO_DELAY_MS", "60".to_owned())]);
    let app = ParleyProcess::start(&env).await;
    wait_ready(&client, &app.base, 200).await;
    create(&client, &app.base, "o").await;
    assert_eq!(turn(&client, &app.base, "o", "before").await.status(), 200);
    let before = history(&client, &app.base, "o").await;

    // A turn is streaming when the store goes down: its final append fails.
    let stream = client
        .post(format!("{}/v1/sessions/o/messages?stream=true", app.base))
        .json(&json!({"content": "one two three four five six seven eight nine ten"}))
        .send()
        .await
        .unwrap();
    let reader = tokio::spawn(collect_events(stream));
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop();
    let events = reader.await.unwrap();
    let last = events.last().unwrap();
    assert_eq!(last.event, "turn.failed", "{:?}", last.data);
    // The store went away with the turn's last write sent, or about to be: parley cannot know
    // whether it was applied, and says so (the record tells, once the store is back).
    let code = last.data["error"]["code"].as_str().unwrap_or_default().to_owned();
    assert!(["store_unavailable", "turn_outcome_unknown"].contains(&code.as_str()), "{code}");
    let failed_turn = last.data["turn_id"].as_str().unwrap().to_owned();

    // While it is down: 503 quickly, readiness 503.
    for path in ["/v1/sessions/o", "/v1/sessions/o/messages"] {
        let started = Instant::now();
        let response = client.get(format!("{}{path}", app.base)).send().await.unwrap();
        assert_eq!(response.status(), 503, "{path}");
        assert!(started.elapsed() < Duration::from_secs(4), "{path} answered in {:?}", started.elapsed());
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "store_unavailable");
    }
    let started = Instant::now();
    assert_eq!(turn(&client, &app.base, "o", "during").await.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(4));
    wait_ready(&client, &app.base, 503).await;

    // Back up: parley recovers by itself; the failed turn left the history as it was.
    start();
    wait_ready(&client, &app.base, 200).await;
    let mut after = Vec::new();
    for _ in 0..10 {
        let response =
            client.get(format!("{}/v1/sessions/o/messages?limit=100", app.base)).send().await.unwrap();
        if response.status() == 200 {
            after = response.json::<Value>().await.unwrap()["data"].as_array().unwrap().clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(after, before, "nothing of the failed turn was stored");
    let record: Value = client
        .get(format!("{}/v1/sessions/o/turns/{failed_turn}", app.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(record["status"], "completed", "the record agrees with the history: {record}");
    let mut status = 0;
    for _ in 0..10 {
        status = turn(&client, &app.base, "o", "after").await.status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(status, 200, "turns work again");
    assert_eq!(history(&client, &app.base, "o").await.len(), 4);
    app.kill();
}

#[tokio::test]
async fn a_redis_outage_during_turns_is_503_and_parley_recovers() {
    let redis = std::sync::Arc::new(std::sync::Mutex::new(PrivateRedis::start()));
    let url = redis.lock().unwrap().url();
    let (down, up) = (redis.clone(), redis.clone());
    outage(
        vec![("PARLEY_STORE", "redis".into()), ("REDIS_URL", url)],
        move || down.lock().unwrap().kill(),
        move || up.lock().unwrap().up(),
    )
    .await;
}

#[tokio::test]
async fn a_postgres_outage_during_turns_is_503_and_parley_recovers() {
    let pg = std::sync::Arc::new(PrivatePostgres::start());
    let url = pg.url();
    let (down, up) = (pg.clone(), pg.clone());
    outage(
        vec![("PARLEY_STORE", "postgres".into()), ("DATABASE_URL", url)],
        move || down.kill(),
        move || up.up(),
    )
    .await;
}

#[tokio::test]
async fn sigterm_lets_the_running_turn_finish_before_exiting() {
    install_crypto();
    let client = reqwest::Client::new();
    let app = ParleyProcess::start(&[("PARLEY_ECHO_DELAY_MS", "100".into())]).await;
    create(&client, &app.base, "t").await;
    let stream = client
        .post(format!("{}/v1/sessions/t/messages?stream=true", app.base))
        .json(&json!({"content": "a b c d e"}))
        .send()
        .await
        .unwrap();
    let reader = tokio::spawn(collect_events(stream));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let base = app.base.clone();
    let exited = tokio::task::spawn_blocking(move || app.terminate());
    let events = reader.await.unwrap();
    assert_eq!(events.last().unwrap().event, "turn.completed");
    assert!(exited.await.unwrap(), "clean exit");
    assert!(client.get(format!("{base}/healthz")).send().await.is_err(), "the process is gone");
}

/// Starts parley while its store is down: it starts anyway, reports 503, and works once the
/// store comes up (for PostgreSQL, after applying the migrations it could not apply at start-up).
async fn starts_while_the_store_is_down(env: Vec<(&str, String)>, start_store: impl Fn()) {
    install_crypto();
    let client = reqwest::Client::new();
    let mut env = env;
    env.push(("PARLEY_STORE_TIMEOUT", "1s".to_owned()));
    let app = ParleyProcess::start(&env).await;
    wait_ready(&client, &app.base, 503).await;
    let response = client.get(format!("{}/v1/sessions", app.base)).send().await.unwrap();
    assert_eq!(response.status(), 503);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "store_unavailable");
    start_store();
    wait_ready(&client, &app.base, 200).await;
    let mut created = 0;
    for _ in 0..30 {
        let response =
            client.post(format!("{}/v1/sessions", app.base)).json(&json!({"id": "late"})).send().await;
        created = response.map(|r| r.status().as_u16()).unwrap_or(0);
        if created == 201 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(created, 201, "parley recovered by itself");
    assert_eq!(turn(&client, &app.base, "late", "hello").await.status(), 200);
}

#[tokio::test]
async fn parley_starts_while_redis_is_down_and_recovers() {
    let redis = std::sync::Arc::new(std::sync::Mutex::new(PrivateRedis::start()));
    let url = redis.lock().unwrap().url();
    redis.lock().unwrap().kill();
    let up = redis.clone();
    starts_while_the_store_is_down(vec![("PARLEY_STORE", "redis".into()), ("REDIS_URL", url)], move || {
        up.lock().unwrap().up()
    })
    .await;
}

#[tokio::test]
async fn parley_starts_while_postgres_is_down_and_migrates_when_it_is_back() {
    let pg = std::sync::Arc::new(PrivatePostgres::start());
    pg.kill();
    let up = pg.clone();
    starts_while_the_store_is_down(
        vec![("PARLEY_STORE", "postgres".into()), ("DATABASE_URL", pg.url())],
        move || up.up(),
    )
    .await;
}

#[tokio::test]
async fn parley_migrate_applies_the_migrations_and_exits() {
    let schema = unique_name("t");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .arg("migrate")
        .env("DATABASE_URL", database_url())
        .env("PARLEY_PG_SCHEMA", &schema)
        .env("PARLEY_LOG", "warn")
        .status()
        .unwrap();
    assert!(status.success());
    let store = parley::store::postgres::PgStore::new(parley::store::postgres::PgOptions {
        url: database_url(),
        pool_size: 1,
        schema: Some(schema.clone()),
        max_messages: None,
        ttl: None,
        op_timeout: Duration::from_secs(10),
    })
    .unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "select table_name::text from information_schema.tables where table_schema = $1 order by 1",
    )
    .bind(&schema)
    .fetch_all(store.pool())
    .await
    .unwrap();
    for table in ["idempotency_keys", "messages", "sessions", "turn_locks", "turns"] {
        assert!(tables.iter().any(|t| t == table), "{table} in {tables:?}");
    }
}
