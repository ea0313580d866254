//! The store contract and PostgreSQL-specific checks against the postgres backend.
//!
//! Each test gets its own schema (`search_path`), so tests run in parallel on one database.
//! Needs `DATABASE_URL`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parley::domain::{Message, Metadata, NewSession, Role, ToolCall, Turn, new_id};
use parley::store::contract::Setup;
use parley::store::postgres::{PgOptions, PgStore, sql};
use parley::store::{
    AppendBatch, ConversationStore, DynFused, IdempotencyBegin, LockOutcome, Order, PageQuery, StoreBackend,
    StoreError, TurnCoordinator,
};
use sqlx::Connection;

use crate::helpers::{database_url, unique_name};

const TENANT: &str = "tenant-a";

fn options(setup: &Setup) -> PgOptions {
    PgOptions {
        url: database_url(),
        pool_size: 4,
        schema: Some(unique_name("t")),
        max_messages: setup.max_messages,
        ttl: setup.ttl,
        op_timeout: Duration::from_secs(10),
    }
}

/// A migrated store on a fresh schema.
async fn pg_store(setup: Setup) -> Arc<PgStore> {
    let store = PgStore::new(options(&setup)).expect("build store");
    store.migrate().await.expect("migrate");
    if !OLD_SCHEMAS_DROPPED.swap(true, Ordering::SeqCst) {
        drop_old_schemas(&store).await;
    }
    Arc::new(store)
}

static OLD_SCHEMAS_DROPPED: AtomicBool = AtomicBool::new(false);

/// Drops the schemas earlier runs left (the contract cases cannot drop theirs): those named
/// `t_<uuid v7>` whose id is more than ten minutes old, so no running test loses its schema.
async fn drop_old_schemas(store: &PgStore) {
    let old: Vec<String> = sqlx::query_scalar(
        "select nspname::text from pg_namespace where nspname ~ '^t_[0-9a-f]{32}$' \
         and to_timestamp(('x' || substr(nspname, 3, 12))::bit(48)::bigint / 1000.0) \
             < now() - interval '10 minutes'",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    for schema in old {
        let sql = format!("drop schema if exists \"{schema}\" cascade");
        // Another run may be dropping it too; either way it goes.
        let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(store.pool()).await;
    }
}

async fn store(setup: Setup) -> DynFused {
    pg_store(setup).await
}

parley::store_contract_tests!(store, distributed = true, ttl = true);

mod events {
    use super::*;

    async fn coordinated(setup: Setup) -> parley::store::contract::Coordinated {
        parley::store::contract::Coordinated::fused(store(setup).await)
    }

    parley::event_log_contract_tests!(coordinated);
}

/// Drops the test's schema; the contract cases leave theirs (they only get a `DynStore`).
async fn drop_schema(store: &PgStore) {
    let schema: String = sqlx::query_scalar("select current_schema()").fetch_one(store.pool()).await.unwrap();
    assert!(schema.starts_with("t_"), "only test schemas are dropped, not {schema}");
    let sql = format!("drop schema \"{schema}\" cascade");
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(store.pool()).await.unwrap();
}

async fn new_session(store: &PgStore, id: &str) {
    let new = NewSession { id: id.into(), system_prompt: None, metadata: Metadata::new() };
    store.create_session(TENANT, new).await.expect("create session");
}

async fn fill(store: &PgStore, session: &str, count: usize) -> Vec<Message> {
    let turn = new_id();
    let messages = (1..=count).map(|i| Message::new(session, turn, Role::User, format!("m{i}"))).collect();
    store
        .append(TENANT, session, AppendBatch { messages, turn: None, supersede_from: None })
        .await
        .expect("append")
}

async fn count(store: &PgStore, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(store.pool()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_comes_back_byte_for_byte_with_its_key_order() {
    // `Map` equality ignores key order, so compare the serialised text.
    let store = pg_store(Setup::default()).await;
    let meta: Metadata =
        serde_json::from_str(r#"{"z":1,"a":{"y":[1,2.5,"\u0000"],"b":null},"m":"ü"}"#).unwrap();
    let new = NewSession { id: "s1".into(), system_prompt: None, metadata: meta.clone() };
    let created = store.create_session(TENANT, new).await.unwrap();
    let read = store.get_session(TENANT, "s1").await.unwrap().unwrap();
    for session in [&created, &read] {
        assert_eq!(serde_json::to_string(&session.metadata).unwrap(), serde_json::to_string(&meta).unwrap());
    }
    let mut call = Message::new("s1", new_id(), Role::Assistant, "");
    call.metadata = meta.clone();
    call.tool_calls = Some(vec![ToolCall {
        id: "c1".into(),
        name: "calc".into(),
        arguments: serde_json::from_str(r#"{"zeta":1,"alpha":2}"#).unwrap(),
    }]);
    let stored = store
        .append(TENANT, "s1", AppendBatch { messages: vec![call], turn: None, supersede_from: None })
        .await
        .unwrap();
    let back = store.last_n(TENANT, "s1", 1).await.unwrap();
    assert_eq!(serde_json::to_string(&back).unwrap(), serde_json::to_string(&stored).unwrap());
    let mut turn = Turn::start("s1");
    turn.error =
        Some(serde_json::from_str(r#"{"type":"about:blank","title":"Bad Gateway","status":502}"#).unwrap());
    store.put_turn(TENANT, &turn).await.unwrap();
    let back = store.get_turn(TENANT, "s1", turn.id).await.unwrap().unwrap();
    assert_eq!(serde_json::to_string(&back).unwrap(), serde_json::to_string(&turn).unwrap());
    drop_schema(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_deletes_expired_sessions_in_batches() {
    let store = pg_store(Setup { max_messages: None, ttl: Some(Duration::from_millis(500)) }).await;
    // 1200 expired sessions: more than two sweep batches.
    sqlx::query(
        "insert into sessions (tenant, id, created_at, updated_at, metadata, expires_at) \
         select 'bulk', 'b' || i, now(), now(), '{}', now() - interval '1 second' \
         from generate_series(1, 1200) as i",
    )
    .execute(store.pool())
    .await
    .unwrap();
    assert_eq!(store.sweep_expired().await.unwrap(), 1200);
    new_session(&store, "old").await;
    fill(&store, "old", 3).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    new_session(&store, "fresh").await;
    fill(&store, "fresh", 2).await;
    let sweeper = store.spawn_ttl_sweeper(Duration::from_millis(50));
    let deadline = Instant::now() + Duration::from_secs(5);
    while count(&store, "select count(*) from sessions").await > 1 {
        assert!(Instant::now() < deadline, "the sweeper did not delete the expired session");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sweeper.abort();
    let ids: Vec<String> =
        sqlx::query_scalar("select id from sessions").fetch_all(store.pool()).await.unwrap();
    assert_eq!(ids, vec!["fresh"]);
    assert_eq!(count(&store, "select count(*) from messages").await, 2, "messages went with their session");
    drop_schema(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_id_can_be_created_again() {
    let store = pg_store(Setup { max_messages: None, ttl: Some(Duration::from_millis(300)) }).await;
    new_session(&store, "s1").await;
    fill(&store, "s1", 3).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(store.get_session(TENANT, "s1").await.unwrap().is_none(), "expired, not yet swept");
    new_session(&store, "s1").await;
    assert!(store.last_n(TENANT, "s1", 10).await.unwrap().is_empty());
    let again = fill(&store, "s1", 1).await;
    assert_eq!(again[0].seq, 1);
    drop_schema(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_unavailable_quickly() {
    let store = PgStore::new(PgOptions {
        url: "postgres://postgres:hunter2@127.0.0.1:1/x".into(),
        pool_size: 2,
        schema: None,
        max_messages: None,
        ttl: None,
        op_timeout: Duration::from_millis(500),
    })
    .expect("building the store does no I/O");
    let ping = timed(store.ping()).await;
    let read = timed(store.get_session(TENANT, "s1")).await;
    let migrate = timed(store.migrate()).await;
    for result in [ping.map(|_| ()), read.map(|_| ()), migrate] {
        match result {
            Err(StoreError::Unavailable(message)) => assert!(!message.contains("hunter2"), "{message}"),
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
}

/// Awaits `fut` and checks that it answered within two seconds.
async fn timed<T>(fut: impl std::future::Future<Output = T>) -> T {
    let started = Instant::now();
    let out = fut.await;
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_session_stays_exact_under_concurrent_appenders() {
    let store = pg_store(Setup { max_messages: Some(10), ttl: None }).await;
    new_session(&store, "s1").await;
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move { fill(&store, "s1", 3).await }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let session = store.get_session(TENANT, "s1").await.unwrap().unwrap();
    assert_eq!(session.message_count, 10);
    let page = PageQuery { limit: 100, order: Order::Asc, after: None, before: None, ..PageQuery::default() };
    let all = store.read_page(TENANT, "s1", page).await.unwrap();
    assert_eq!(all.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), (87..=96).collect::<Vec<u64>>());
    // One more append deletes whatever a concurrent trim could not see.
    fill(&store, "s1", 1).await;
    assert_eq!(count(&store, "select count(*) from messages").await, 10);
    drop_schema(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_and_window_reads_use_the_primary_key() {
    let store = pg_store(Setup::default()).await;
    for session in ["a", "b", "c"] {
        new_session(&store, session).await;
        fill(&store, session, 3000).await;
    }
    sqlx::query("analyze").execute(store.pool()).await.unwrap();
    let cases: [(&str, i64, i64, i64); 3] = [
        (sql::PAGE_ASC, 1500, i64::MAX, 21),
        (sql::PAGE_DESC, 0, 1500, 21),
        (sql::PAGE_DESC, 0, i64::MAX, 20),
    ];
    for (query, after, before, limit) in cases {
        let explain = format!("explain {query}");
        let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(explain))
            .bind(TENANT)
            .bind("b")
            .bind(after)
            .bind(before)
            .bind(limit)
            .fetch_all(store.pool())
            .await
            .unwrap();
        let plan = plan.join("\n");
        assert!(!plan.contains("Seq Scan on messages"), "{plan}");
        assert!(plan.contains("using messages_pkey"), "{plan}");
    }
    drop_schema(&store).await;
}

/// Superseded messages live in their own table: an active page never scans them, and the
/// superseded view is two range scans of primary keys, merged (O(page) either way), even with
/// thousands of superseded messages in the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_stay_range_scans_with_superseded_messages() {
    let store = pg_store(Setup::default()).await;
    for session in ["a", "b", "c"] {
        new_session(&store, session).await;
        fill(&store, session, 3000).await;
        // An edit from seq 100 on: 2,900 messages move to superseded_messages.
        let mut edit = Turn::start(session);
        edit.status = parley::domain::TurnStatus::Completed;
        let messages = vec![parley::store::contract::msg(session, edit.id, Role::User, "edited")];
        let batch = AppendBatch { messages, turn: Some(edit), supersede_from: Some(100) };
        store.append(TENANT, session, batch).await.unwrap();
    }
    assert_eq!(count(&store, "select count(*) from superseded_messages").await, 3 * 2901);
    sqlx::query("analyze").execute(store.pool()).await.unwrap();
    let cases: [(&str, i64, i64, bool); 4] = [
        (sql::PAGE_DESC, 0, i64::MAX, false),
        (sql::PAGE_ASC, 50, i64::MAX, false),
        (sql::PAGE_ALL_ASC, 1500, i64::MAX, true),
        (sql::PAGE_ALL_DESC, 0, 2000, true),
    ];
    for (query, after, before, both) in cases {
        let explain = format!("explain {query}");
        let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(explain))
            .bind(TENANT)
            .bind("b")
            .bind(after)
            .bind(before)
            .bind(21i64)
            .fetch_all(store.pool())
            .await
            .unwrap();
        let plan = plan.join("\n");
        assert!(!plan.contains("Seq Scan on messages"), "{plan}");
        assert!(!plan.contains("Seq Scan on superseded_messages"), "{plan}");
        assert!(plan.contains("using messages_pkey"), "{plan}");
        assert_eq!(plan.contains("superseded_messages"), both, "{plan}");
        if both {
            assert!(plan.contains("using superseded_messages_pkey"), "{plan}");
        }
    }
    let page = PageQuery { limit: 5, order: Order::Desc, include_superseded: true, ..PageQuery::default() };
    let newest = store.read_page(TENANT, "b", page).await.unwrap();
    assert_eq!(newest.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3001, 3000, 2999, 2998, 2997]);
    drop_schema(&store).await;
}

/// A turn's messages are found through the turn indexes of both tables (migration 0004), never
/// by scanning the session, in a history of 300 turns of which half are superseded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turns_messages_are_read_by_the_turn_indexes() {
    let store = pg_store(Setup::default()).await;
    let mut old_turn = None;
    for session in ["a", "b", "c"] {
        new_session(&store, session).await;
        let mut messages = Vec::new();
        for t in 0..300 {
            let turn = new_id();
            messages.extend((0..10).map(|i| Message::new(session, turn, Role::User, format!("t{t} m{i}"))));
        }
        let stored = store.append(TENANT, session, AppendBatch { messages, ..AppendBatch::default() }).await;
        let stored = stored.unwrap();
        let mut edit = Turn::start(session);
        edit.status = parley::domain::TurnStatus::Completed;
        let messages = vec![parley::store::contract::msg(session, edit.id, Role::User, "edited")];
        let batch = AppendBatch { messages, turn: Some(edit), supersede_from: Some(1501) };
        store.append(TENANT, session, batch).await.unwrap();
        if session == "b" {
            old_turn = Some((stored[100].turn_id, stored[2000].turn_id));
        }
    }
    sqlx::query("analyze").execute(store.pool()).await.unwrap();
    let (active, superseded) = old_turn.unwrap();
    for turn in [active, superseded] {
        let explain = format!("explain {}", sql::TURN_MESSAGES);
        let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(explain))
            .bind(TENANT)
            .bind("b")
            .bind(turn)
            .fetch_all(store.pool())
            .await
            .unwrap();
        let plan = plan.join("\n");
        assert!(!plan.contains("Seq Scan on messages"), "{plan}");
        assert!(!plan.contains("Seq Scan on superseded_messages"), "{plan}");
        assert!(plan.contains(" messages_turn_idx"), "{plan}");
        assert!(plan.contains("superseded_messages_turn_idx"), "{plan}");
    }
    let found = store.turn_messages(TENANT, "b", superseded).await.unwrap();
    assert_eq!(found.iter().map(|m| m.seq).collect::<Vec<_>>(), (2001..=2010).collect::<Vec<_>>());
    assert!(found.iter().all(|m| m.superseded_by.is_some()));
    drop_schema(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_start_reads_its_window_by_the_primary_key() {
    let store = pg_store(Setup::default()).await;
    for session in ["a", "b", "c"] {
        new_session(&store, session).await;
        fill(&store, session, 3000).await;
    }
    sqlx::query("analyze").execute(store.pool()).await.unwrap();
    let explain = format!("explain {}", sql::BEGIN_TURN);
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(explain))
        .bind(TENANT)
        .bind("b")
        .bind(uuid::Uuid::now_v7())
        .bind(15_000_000i64)
        .bind(20i64)
        .bind("running")
        .bind(None::<String>)
        .bind(Vec::<uuid::Uuid>::new())
        .bind(None::<sqlx::types::Json<parley::domain::Usage>>)
        .bind(chrono::Utc::now())
        .bind(None::<chrono::DateTime<chrono::Utc>>)
        .fetch_all(store.pool())
        .await
        .unwrap();
    let plan = plan.join("\n");
    assert!(!plan.contains("Seq Scan on messages"), "{plan}");
    assert!(plan.contains("using messages_pkey"), "{plan}");
    drop_schema(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_admit_exactly_one_turn_and_one_request() {
    let store = pg_store(Setup { max_messages: None, ttl: None }).await;
    new_session(&store, "s1").await;
    for round in 0..5 {
        let lease = Duration::from_secs(30);
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let store = Arc::clone(&store);
            let turn = new_id();
            tasks.push(tokio::spawn(async move {
                (turn, store.acquire_turn_lock(TENANT, "s1", turn, lease).await.unwrap())
            }));
        }
        let mut winners = Vec::new();
        let mut busy_with = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                (turn, LockOutcome::Acquired) => winners.push(turn),
                (_, LockOutcome::Busy(holder)) => busy_with.push(holder),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}");
        assert!(busy_with.iter().all(|h| *h == winners[0]), "round {round}");
        store.release_turn_lock(TENANT, "s1", winners[0]).await.unwrap();

        let key = format!("key-{round}");
        let mut tasks = Vec::new();
        for i in 0..16 {
            let (store, key) = (Arc::clone(&store), key.clone());
            let turn = new_id();
            tasks.push(tokio::spawn(async move {
                let ttl = Duration::from_secs(60);
                let fingerprint = format!("fp-{i}");
                (turn, store.begin_idempotent(TENANT, "s1", &key, &fingerprint, turn, ttl).await.unwrap())
            }));
        }
        let mut started = Vec::new();
        let mut seen = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                (turn, IdempotencyBegin::Started) => started.push(turn),
                (_, IdempotencyBegin::Existing(record)) => seen.push(record.turn_id),
            }
        }
        assert_eq!(started.len(), 1, "round {round}");
        assert!(seen.iter().all(|t| *t == started[0]), "round {round}");
    }
    drop_schema(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_and_idempotency_keys_go_with_their_session() {
    let store = pg_store(Setup { max_messages: None, ttl: Some(Duration::from_secs(1)) }).await;
    new_session(&store, "s1").await;
    let turn = new_id();
    store.acquire_turn_lock(TENANT, "s1", turn, Duration::from_secs(30)).await.unwrap();
    store.begin_idempotent(TENANT, "s1", "k", "fp", turn, Duration::from_secs(30)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Expired, not yet swept: its lock and keys no longer count.
    let missing = store.acquire_turn_lock(TENANT, "s1", new_id(), Duration::from_secs(30)).await;
    assert!(matches!(missing, Err(StoreError::SessionNotFound)), "{missing:?}");
    assert!(matches!(store.turn_lock_holder(TENANT, "s1").await, Err(StoreError::SessionNotFound)));
    assert!(!store.renew_turn_lock(TENANT, "s1", turn, Duration::from_secs(30)).await.unwrap().held);
    let begin = store.begin_idempotent(TENANT, "s1", "k", "fp", turn, Duration::from_secs(30)).await;
    assert!(matches!(begin, Err(StoreError::SessionNotFound)), "{begin:?}");
    new_session(&store, "s1").await;
    assert_eq!(store.turn_lock_holder(TENANT, "s1").await.unwrap(), None);
    assert_eq!(count(&store, "select count(*) from idempotency_keys").await, 0, "re-creating dropped them");

    store.acquire_turn_lock(TENANT, "s1", turn, Duration::from_secs(30)).await.unwrap();
    store.begin_idempotent(TENANT, "s1", "k", "fp", turn, Duration::from_secs(30)).await.unwrap();
    assert!(store.delete_session(TENANT, "s1").await.unwrap());
    assert_eq!(count(&store, "select count(*) from turn_locks").await, 0);
    assert_eq!(count(&store, "select count(*) from idempotency_keys").await, 0);
    drop_schema(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_idempotency_keys_are_deleted_by_begin_and_by_the_sweeper() {
    let store = pg_store(Setup::default()).await;
    new_session(&store, "s1").await;
    new_session(&store, "s2").await;
    // Expired keys, written directly so that no begin can purge them before the checks below.
    sqlx::query(
        "insert into idempotency_keys (tenant, session_id, key, fingerprint, turn_id, expires_at) \
         select $1, s, k, 'fp', gen_random_uuid(), now() - interval '1 second' \
         from unnest(array['s1', 's2']) as s, unnest(array['a', 'b']) as k",
    )
    .bind(TENANT)
    .execute(store.pool())
    .await
    .unwrap();
    let turn = new_id();
    store.begin_idempotent(TENANT, "s1", "c", "fp", turn, Duration::from_secs(60)).await.unwrap();
    let keys: Vec<String> =
        sqlx::query_scalar("select session_id || '/' || key from idempotency_keys order by 1")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(keys, vec!["s1/c", "s2/a", "s2/b"], "begin deleted its session's expired keys");
    assert_eq!(store.sweep_expired().await.unwrap(), 0, "no session expired");
    let keys: Vec<String> = sqlx::query_scalar("select session_id || '/' || key from idempotency_keys")
        .fetch_all(store.pool())
        .await
        .unwrap();
    assert_eq!(keys, vec!["s1/c"], "the sweeper deleted the rest");
    drop_schema(&store).await;
}

/// A pooled connection that died while idle (here its backend is terminated) is found by the ping
/// before use and replaced: the next operation succeeds. `new` pings only connections idle 10 s
/// or more; this store pings any idle connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_died_idle_is_replaced_before_use() {
    let setup = Setup::default();
    let store = PgStore::pinging_idle_after(PgOptions { pool_size: 1, ..options(&setup) }, Duration::ZERO)
        .expect("build store");
    store.migrate().await.expect("migrate");
    new_session(&store, "s1").await;
    let pid: i32 = sqlx::query_scalar("select pg_backend_pid()").fetch_one(store.conns()).await.unwrap();
    let mut admin = sqlx::PgConnection::connect(&database_url()).await.unwrap();
    let killed: bool =
        sqlx::query_scalar("select pg_terminate_backend($1)").bind(pid).fetch_one(&mut admin).await.unwrap();
    assert!(killed);
    // The backend is gone once the server no longer lists it.
    for _ in 0..100 {
        let alive: bool = sqlx::query_scalar("select exists(select 1 from pg_stat_activity where pid = $1)")
            .bind(pid)
            .fetch_one(&mut admin)
            .await
            .unwrap();
        if !alive {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let session = store.get_session(TENANT, "s1").await.expect("a fresh connection answers");
    assert!(session.is_some());
    let now: i32 = sqlx::query_scalar("select pg_backend_pid()").fetch_one(store.conns()).await.unwrap();
    assert_ne!(now, pid, "another backend");
    drop_schema(&store).await;
}

/// A statement interrupted midway (its future dropped, as the operation timeout does) leaves its
/// connection in the middle of a statement: the pool closes that connection instead of reusing
/// it, so the next operation neither waits for the interrupted statement nor reads its results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_interrupted_mid_statement_is_not_reused() {
    let setup = Setup::default();
    let store = PgStore::new(PgOptions { pool_size: 1, ..options(&setup) }).expect("build store");
    store.migrate().await.expect("migrate");
    let pid: i32 = sqlx::query_scalar("select pg_backend_pid()").fetch_one(store.conns()).await.unwrap();
    let slow = sqlx::query("select pg_sleep(5)").execute(store.conns());
    assert!(tokio::time::timeout(Duration::from_millis(200), slow).await.is_err(), "interrupted");
    let started = Instant::now();
    new_session(&store, "s1").await;
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    let now: i32 = sqlx::query_scalar("select pg_backend_pid()").fetch_one(store.conns()).await.unwrap();
    assert_ne!(now, pid, "a fresh connection");
    drop_schema(&store).await;
}
