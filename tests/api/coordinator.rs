//! `PARLEY_COORDINATOR`: a history store whose turns another backend coordinates, composed by
//! the agent, and the start-up check that a distributed deployment has both parts distributed.

use std::sync::Arc;

use parley::agent::TurnStore;
use parley::store::memory::MemoryStore;
use parley::store::memory_coordinator::MemoryCoordinator;
use serde_json::json;

use crate::helpers::{Spawn, TestApp, config, database_url, redis_url, spawn_app_with, unique_name};

/// PostgreSQL history, Redis coordination, on a fresh schema and key prefix.
fn pg_with_redis(extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--store".into(),
        "postgres".into(),
        "--coordinator".into(),
        "redis".into(),
        "--database-url".into(),
        database_url(),
        "--pg-schema".into(),
        unique_name("coord"),
        "--redis-url".into(),
        redis_url(),
        "--redis-prefix".into(),
        unique_name("parley_test_coord"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

async fn spawn_on(store: &TurnStore, args: &[String]) -> TestApp {
    spawn_app_with(Spawn { args: args.to_vec(), store: Some(store.clone()), ..Spawn::default() }).await
}

/// Two posts to one session at once, through `a` and `b`: their statuses, sorted.
async fn race(a: &TestApp, b: &TestApp, session: &str) -> [u16; 2] {
    let (first, second) = tokio::join!(
        a.post_message_raw(session, json!({"content": "one two three four"})),
        b.post_message_raw(session, json!({"content": "five six seven eight"})),
    );
    let mut statuses = [first.status().as_u16(), second.status().as_u16()];
    statuses.sort();
    statuses
}

#[tokio::test]
async fn a_postgres_history_coordinated_by_redis_runs_turns_and_locks_across_replicas() {
    let args = pg_with_redis(&["--echo-delay-ms", "50"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let store = parley::app::build_store(&config(&refs)).await.expect("build the store");
    assert!(!store.is_fused(), "two backends: the turn steps are composed");
    assert_eq!((store.history().backend(), store.coordinator().backend()), ("postgres", "redis"));
    let (a, b) = (spawn_on(&store, &args).await, spawn_on(&store, &args).await);

    a.create_session("s").await;
    let turn = a.post_message("s", "hello").await;
    assert_eq!(turn["messages"].as_array().unwrap().len(), 2, "{turn}");
    let turn_id = turn["turn_id"].as_str().unwrap();
    let (status, record) = b.get_json(&format!("/v1/sessions/s/turns/{turn_id}")).await;
    assert_eq!((status, record["status"].as_str()), (200, Some("completed")), "{record}");
    assert!(store.coordinator().turn_lock_holder("default", "s").await.unwrap().is_none(), "released");

    // Each replica's registry knows only its own turns: the 409 comes from the shared lock.
    for round in 0..3 {
        assert_eq!(race(&a, &b, "s").await, [200, 409], "round {round}");
    }
    assert_eq!(a.history("s").await.len(), 8, "one turn and three winners, two messages each");
}

#[tokio::test]
async fn a_memory_history_coordinated_apart_runs_turns_idempotently() {
    let history = Arc::new(MemoryStore::default());
    let store = TurnStore::composed(history, Arc::new(MemoryCoordinator::new()));
    let args = vec!["--echo-delay-ms".to_owned(), "50".to_owned()];
    let app = spawn_on(&store, &args).await;
    app.create_session("s").await;
    assert_eq!(race(&app, &app, "s").await, [200, 409]);

    let keyed = || {
        app.client
            .post(app.url("/v1/sessions/s/messages"))
            .header("idempotency-key", "k1")
            .json(&json!({"content": "once"}))
            .send()
    };
    let first: serde_json::Value = keyed().await.unwrap().json().await.unwrap();
    let again: serde_json::Value = keyed().await.unwrap().json().await.unwrap();
    assert_eq!(first["turn_id"], again["turn_id"], "the retry is the same turn");
    assert_eq!(app.history("s").await.len(), 4, "stored once");
}

#[tokio::test]
async fn a_distributed_deployment_refuses_a_coordinator_in_one_process() {
    // From the configuration: refused before anything is built.
    let args = ["--distributed", "true", "--store", "postgres", "--coordinator", "memory"];
    let err = parley::app::build_state(&config(&args)).await.err().expect("refused").to_string();
    assert!(err.contains("PARLEY_COORDINATOR=memory") && err.contains("PARLEY_COORDINATOR=redis"), "{err}");

    // Parts built in code are checked too: each part must be distributed.
    let cfg = config(&["--distributed", "true", "--store", "redis"]);
    let state = |store: TurnStore| {
        let (model, tools) =
            (parley::app::build_model(&cfg).unwrap(), parley::app::build_tools(&cfg).unwrap());
        parley::app::state_from_parts(&cfg, store, model, tools).err().map(|e| e.to_string())
    };
    let memory = || Arc::new(MemoryStore::default());
    let err = state(TurnStore::composed(memory(), Arc::new(MemoryCoordinator::new()))).expect("refused");
    assert!(err.contains("memory history store") && err.contains("PARLEY_STORE=redis"), "{err}");
    let mut options = parley::app::redis_options(&cfg);
    options.url = redis_url();
    let redis = Arc::new(parley::store::redis::RedisStore::new(options).unwrap());
    let err = state(TurnStore::composed(redis.clone(), Arc::new(MemoryCoordinator::new()))).expect("refused");
    assert!(err.contains("memory coordinator") && err.contains("PARLEY_COORDINATOR=redis"), "{err}");
    assert_eq!(state(TurnStore::fused(redis)), None, "both parts distributed");
}
