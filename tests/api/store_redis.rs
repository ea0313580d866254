//! The store contract against the Redis backend (needs `REDIS_URL`), plus what only Redis has:
//! key layout, behaviour when Redis is unreachable, and O(page) reads on long histories.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_redis::redis::{self, AsyncCommands};
use parley::domain::{Message, Metadata, NewSession, Role, Turn, new_id};
use parley::store::contract::Setup;
use parley::store::redis::{RedisOptions, RedisStore};
use parley::store::{
    AppendBatch, ConversationStore, DynFused, IdempotencyBegin, LockOutcome, Order, PageQuery, StoreBackend,
    StoreError, TurnCoordinator,
};

use crate::helpers::{redis_url, unique_name};

fn options(prefix: String, setup: &Setup) -> RedisOptions {
    RedisOptions {
        url: redis_url(),
        prefix,
        pool_size: 4,
        max_messages: setup.max_messages,
        ttl: setup.ttl,
        op_timeout: Duration::from_secs(5),
    }
}

/// A store on its own key prefix, so tests run in parallel.
async fn store(setup: Setup) -> DynFused {
    let opts = options(unique_name("parley_test"), &setup);
    Arc::new(RedisStore::new(opts).expect("redis store"))
}

parley::store_contract_tests!(store, distributed = true, ttl = true);

mod events {
    use super::*;

    async fn coordinated(setup: Setup) -> parley::store::contract::Coordinated {
        parley::store::contract::Coordinated::fused(store(setup).await)
    }

    parley::event_log_contract_tests!(coordinated);
}

async fn raw_connection() -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(redis_url()).expect("redis client");
    client.get_multiplexed_async_connection().await.expect("redis connection")
}

async fn keys_under(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    let mut iter = conn.scan_match::<_, String>(format!("{prefix}:*")).await.expect("scan");
    while let Some(key) = iter.next_item().await {
        keys.push(key.expect("scan item"));
    }
    keys.sort();
    keys
}

async fn create(store: &RedisStore, tenant: &str, id: &str) {
    let new =
        NewSession { id: id.into(), system_prompt: Some("Be brief.".into()), metadata: Metadata::new() };
    store.create_session(tenant, new).await.expect("create session");
}

fn batch(session: &str, count: usize) -> AppendBatch {
    let turn = new_id();
    let messages = (0..count).map(|i| Message::new(session, turn, Role::User, format!("m{i}"))).collect();
    AppendBatch { messages, turn: None, supersede_from: None }
}

#[tokio::test]
async fn every_key_of_a_session_shares_its_hash_tag_and_delete_leaves_none() {
    let prefix = unique_name("parley_test");
    let store = RedisStore::new(options(prefix.clone(), &Setup::default())).expect("store");
    create(&store, "acme", "chat-1").await;
    let mut with_turn = batch("chat-1", 3);
    with_turn.turn = Some(Turn::start("chat-1"));
    store.append("acme", "chat-1", with_turn).await.expect("append");
    let mut conn = raw_connection().await;
    let keys = keys_under(&mut conn, &prefix).await;
    let tag = "{acme/chat-1}";
    let session_keys: Vec<&String> = keys.iter().filter(|k| k.contains(tag)).collect();
    assert_eq!(session_keys.len(), 5, "meta, messages, turns, turn_order, turn_msgs: {keys:?}");
    assert!(session_keys.iter().all(|k| k.starts_with(&format!("{prefix}:{tag}:"))));
    assert_eq!(keys.len(), 6, "plus the tenant index: {keys:?}");
    assert!(keys.contains(&format!("{prefix}:{{acme}}:sessions")));

    assert!(store.delete_session("acme", "chat-1").await.expect("delete"));
    let left = keys_under(&mut conn, &prefix).await;
    assert!(left.is_empty(), "delete leaves nothing (the emptied index disappears too): {left:?}");
}

/// `turn_msgs` holds each turn's seq span and how many of its messages are held: the cap counts
/// them out, and the entry goes with the turn's last message. A session from before `turn_msgs`
/// (no `turn_index` in its meta, no entries) still finds its turns, by a scan.
#[tokio::test]
async fn turn_msgs_follows_the_cap_and_older_sessions_are_scanned() {
    let prefix = unique_name("parley_test");
    let setup = Setup { max_messages: Some(4), ttl: None };
    let store = RedisStore::new(options(prefix.clone(), &setup)).expect("store");
    create(&store, "t", "s").await;
    let first = store.append("t", "s", batch("s", 3)).await.expect("append");
    let mut conn = raw_connection().await;
    let turn_msgs = format!("{prefix}:{{t/s}}:turn_msgs");
    let turn = first[0].turn_id.to_string();
    let entry: Option<String> = conn.hget(&turn_msgs, &turn).await.expect("hget");
    assert_eq!(entry.as_deref(), Some("1 3 3"), "seqs 1 to 3, three held");
    let second = store.append("t", "s", batch("s", 2)).await.expect("append");
    let entry: Option<String> = conn.hget(&turn_msgs, &turn).await.expect("hget");
    assert_eq!(entry.as_deref(), Some("1 3 2"), "the cap dropped seq 1");
    store.append("t", "s", batch("s", 2)).await.expect("append");
    let entry: Option<String> = conn.hget(&turn_msgs, &turn).await.expect("hget");
    assert_eq!(entry, None, "gone with the turn's last message");
    assert!(store.turn_messages("t", "s", first[0].turn_id).await.expect("read").is_empty());

    let _: i64 = conn.hdel(format!("{prefix}:{{t/s}}:meta"), "turn_index").await.expect("hdel");
    let _: i64 = conn.del(&turn_msgs).await.expect("del");
    let found = store.turn_messages("t", "s", second[0].turn_id).await.expect("read");
    assert_eq!(found, second, "found by a scan");
    store.clear("t", "s").await.expect("clear");
    let third = store.append("t", "s", batch("s", 2)).await.expect("append");
    let entry: Option<String> = conn.hget(&turn_msgs, third[0].turn_id.to_string()).await.expect("hget");
    assert_eq!(entry.as_deref(), Some("8 9 2"), "indexed again from the clear on");
}

#[tokio::test]
async fn locks_and_idempotency_keys_share_the_hash_tag_and_go_with_the_session() {
    let prefix = unique_name("parley_test");
    let store = RedisStore::new(options(prefix.clone(), &Setup::default())).expect("store");
    create(&store, "acme", "chat-1").await;
    let turn = new_id();
    let lease = Duration::from_secs(30);
    assert_eq!(
        store.acquire_turn_lock("acme", "chat-1", turn, lease).await.expect("lock"),
        LockOutcome::Acquired
    );
    let ttl = Duration::from_secs(60);
    store.begin_idempotent("acme", "chat-1", "k", "fp", turn, ttl).await.expect("begin");
    let mut conn = raw_connection().await;
    let tag = format!("{prefix}:{{acme/chat-1}}");
    let keys = keys_under(&mut conn, &prefix).await;
    for suffix in ["idem", "idem_exp", "lock", "meta"] {
        assert!(keys.contains(&format!("{tag}:{suffix}")), "{suffix}: {keys:?}");
    }
    let lock_ttl: i64 = conn.pttl(format!("{tag}:lock")).await.expect("pttl");
    assert!(lock_ttl > 25_000 && lock_ttl <= 30_000, "the lock expires with its lease: {lock_ttl}");
    let idem_ttl: i64 = conn.pttl(format!("{tag}:idem")).await.expect("pttl");
    assert!(idem_ttl > 55_000 && idem_ttl <= 60_000, "records expire with the last of them: {idem_ttl}");

    assert!(store.delete_session("acme", "chat-1").await.expect("delete"));
    let left = keys_under(&mut conn, &prefix).await;
    assert!(left.is_empty(), "delete leaves nothing: {left:?}");
}

#[tokio::test]
async fn session_writes_slide_idempotency_keys_but_not_the_lease() {
    let prefix = unique_name("parley_test");
    let setup = Setup { max_messages: None, ttl: Some(Duration::from_secs(10)) };
    let store = RedisStore::new(options(prefix.clone(), &setup)).expect("store");
    create(&store, "t", "s").await;
    let turn = new_id();
    store.acquire_turn_lock("t", "s", turn, Duration::from_secs(5)).await.expect("lock");
    // A record that outlives the session goes with it.
    store.begin_idempotent("t", "s", "k", "fp", turn, Duration::from_secs(3600)).await.expect("begin");
    let mut conn = raw_connection().await;
    let tag = format!("{prefix}:{{t/s}}");
    let idem_ttl: i64 = conn.pttl(format!("{tag}:idem_exp")).await.expect("pttl");
    assert!(idem_ttl > 0 && idem_ttl <= 10_000, "capped by the session's TTL: {idem_ttl}");
    // Without the slide, the records' TTL would now be a second shorter.
    tokio::time::sleep(Duration::from_secs(1)).await;
    store.append("t", "s", batch("s", 1)).await.expect("append");
    let lock_ttl: i64 = conn.pttl(format!("{tag}:lock")).await.expect("pttl");
    assert!(lock_ttl > 0 && lock_ttl <= 5_000, "a session write leaves the lease alone: {lock_ttl}");
    let slid: i64 = conn.pttl(format!("{tag}:idem_exp")).await.expect("pttl");
    assert!(
        slid > idem_ttl - 500 && slid <= 10_000,
        "a session write slides the records: {idem_ttl} → {slid}"
    );
    store.delete_session("t", "s").await.expect("delete");
}

#[tokio::test]
async fn a_recreated_session_starts_without_the_old_lock_and_keys() {
    let prefix = unique_name("parley_test");
    let setup = Setup { max_messages: None, ttl: Some(Duration::from_secs(1)) };
    let store = RedisStore::new(options(prefix.clone(), &setup)).expect("store");
    create(&store, "t", "s").await;
    let (a, b) = (new_id(), new_id());
    store.acquire_turn_lock("t", "s", a, Duration::from_secs(30)).await.expect("lock");
    store.begin_idempotent("t", "s", "k", "fp", a, Duration::from_secs(30)).await.expect("begin");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // The session expired; its lock (30 s lease) did not, but no longer counts.
    assert!(matches!(store.turn_lock_holder("t", "s").await, Err(StoreError::SessionNotFound)));
    create(&store, "t", "s").await;
    assert_eq!(store.turn_lock_holder("t", "s").await.expect("holder"), None);
    let lease = Duration::from_secs(30);
    assert_eq!(store.acquire_turn_lock("t", "s", b, lease).await.expect("lock"), LockOutcome::Acquired);
    let fresh = store.begin_idempotent("t", "s", "k", "fp", b, Duration::from_secs(30)).await.expect("begin");
    assert_eq!(fresh, IdempotencyBegin::Started);
    store.delete_session("t", "s").await.expect("delete");
}

#[tokio::test]
async fn begin_forgets_expired_idempotency_keys() {
    let prefix = unique_name("parley_test");
    let store = RedisStore::new(options(prefix.clone(), &Setup::default())).expect("store");
    create(&store, "t", "s").await;
    let turn = new_id();
    for key in ["old-1", "old-2"] {
        store.begin_idempotent("t", "s", key, "fp", turn, Duration::from_millis(100)).await.expect("begin");
    }
    store
        .complete_idempotent("t", "s", "old-2", &serde_json::json!({"ok": true}), Duration::from_millis(100))
        .await
        .expect("complete");
    tokio::time::sleep(Duration::from_millis(200)).await;
    store.begin_idempotent("t", "s", "new", "fp", turn, Duration::from_secs(60)).await.expect("begin");
    let mut conn = raw_connection().await;
    let tag = format!("{prefix}:{{t/s}}");
    let fields: Vec<String> = conn.hkeys(format!("{tag}:idem")).await.expect("hkeys");
    assert_eq!(fields, vec!["f:new"]);
    let members: Vec<String> = conn.zrange(format!("{tag}:idem_exp"), 0, -1).await.expect("zrange");
    assert_eq!(members, vec!["new"]);
    store.delete_session("t", "s").await.expect("delete");
}

#[tokio::test]
async fn an_unreachable_redis_answers_unavailable_quickly() {
    let opts = RedisOptions {
        url: "redis://:not-this-password@127.0.0.1:1".into(),
        prefix: unique_name("parley_test"),
        pool_size: 2,
        max_messages: None,
        ttl: None,
        op_timeout: Duration::from_millis(500),
    };
    let store = RedisStore::new(opts).expect("building the store does no I/O");
    let started = Instant::now();
    let results = [
        store.ping().await.map(|_| ()),
        store.get_session("t", "s").await.map(|_| ()),
        store.append("t", "s", batch("s", 1)).await.map(|_| ()),
    ];
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    for result in results {
        let err = result.expect_err("unreachable");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(!err.to_string().contains("not-this-password"), "{err}");
    }
}

#[tokio::test]
async fn a_rejected_password_is_not_echoed() {
    let mut url = url::Url::parse(&redis_url()).expect("REDIS_URL parses");
    url.set_password(Some("wrong-secret-pw")).expect("url takes a password");
    let mut opts = options(unique_name("parley_test"), &Setup::default());
    opts.url = url.to_string();
    let store = RedisStore::new(opts).expect("store");
    let err = store.ping().await.expect_err("the password is wrong");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(!err.to_string().contains("wrong-secret-pw"), "{err}");
}

async fn median_read(store: &RedisStore, session: &str, last_seq: u64) -> Duration {
    let mut times = Vec::new();
    for round in 0..20 {
        let started = Instant::now();
        let query = PageQuery {
            limit: 20,
            order: Order::Desc,
            after: None,
            before: Some(last_seq - 100),
            ..PageQuery::default()
        };
        let page = store.read_page("t", session, query).await.expect("page");
        assert_eq!(page.messages.len(), 20);
        assert_eq!(store.last_n("t", session, 20).await.expect("last n").len(), 20);
        if round >= 5 {
            // The first rounds only warm up.
            times.push(started.elapsed());
        }
    }
    times.sort();
    times[times.len() / 2]
}

#[tokio::test]
async fn a_window_of_a_long_history_reads_as_fast_as_of_a_short_one() {
    let prefix = unique_name("parley_test");
    let store = RedisStore::new(options(prefix, &Setup::default())).expect("store");
    create(&store, "t", "long").await;
    create(&store, "t", "short").await;
    for _ in 0..100 {
        store.append("t", "long", batch("long", 1000)).await.expect("append 1000");
    }
    store.append("t", "short", batch("short", 130)).await.expect("append");
    let long = median_read(&store, "long", 100_000).await;
    let short = median_read(&store, "short", 130).await;
    store.delete_session("t", "long").await.expect("delete");
    store.delete_session("t", "short").await.expect("delete");
    assert!(long < short * 4 + Duration::from_millis(3), "long {long:?} vs short {short:?}");
}

#[tokio::test]
async fn sessions_updated_in_the_same_microsecond_list_by_id_descending() {
    let prefix = unique_name("parley_test");
    let store = RedisStore::new(options(prefix.clone(), &Setup::default())).expect("store");
    for id in ["a", "b", "c", "d", "e", "older"] {
        create(&store, "t", id).await;
    }
    // Give five sessions the same updated_at, and "older" an earlier one.
    let mut conn = raw_connection().await;
    let at: i64 = 1_767_225_600_000_000;
    for (id, micros) in [("a", at), ("b", at), ("c", at), ("d", at), ("e", at), ("older", at - 1)] {
        let _: () = conn.hset(format!("{prefix}:{{t/{id}}}:meta"), "updated_at", micros).await.expect("hset");
        let _: () = conn.zadd(format!("{prefix}:{{t}}:sessions"), id, micros).await.expect("zadd");
    }
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = store.list_sessions("t", 2, cursor.as_ref()).await.expect("list");
        seen.extend(page.sessions.iter().map(|s| s.id.clone()));
        if !page.has_more {
            break;
        }
        cursor = page.sessions.last().map(parley::store::SessionCursor::after);
    }
    assert_eq!(seen, vec!["e", "d", "c", "b", "a", "older"]);
}

#[tokio::test]
async fn listing_drops_index_entries_of_expired_sessions() {
    let prefix = unique_name("parley_test");
    let setup = Setup { max_messages: None, ttl: Some(Duration::from_secs(1)) };
    let store = RedisStore::new(options(prefix.clone(), &setup)).expect("store");
    create(&store, "t", "idle").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    create(&store, "t", "busy").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let listed = store.list_sessions("t", 10, None).await.expect("list");
    assert_eq!(listed.sessions.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), vec!["busy"]);
    let mut conn = raw_connection().await;
    let members: Vec<String> = conn.zrange(format!("{prefix}:{{t}}:sessions"), 0, -1).await.expect("zrange");
    assert_eq!(members, vec!["busy"], "the expired session left the index");
}

#[tokio::test]
async fn the_cap_also_bounds_turn_records() {
    let setup = Setup { max_messages: Some(2), ttl: None };
    let store = RedisStore::new(options(unique_name("parley_test"), &setup)).expect("store");
    create(&store, "t", "s").await;
    let turns: Vec<Turn> = (0..3).map(|_| Turn::start("s")).collect();
    for turn in &turns {
        store.put_turn("t", turn).await.expect("put turn");
    }
    // Replacing a kept record does not make it newer.
    store.put_turn("t", &turns[1]).await.expect("replace turn");
    assert!(store.get_turn("t", "s", turns[0].id).await.expect("get").is_none(), "oldest dropped");
    assert_eq!(store.get_turn("t", "s", turns[1].id).await.expect("get").as_ref(), Some(&turns[1]));
    assert_eq!(store.get_turn("t", "s", turns[2].id).await.expect("get").as_ref(), Some(&turns[2]));
}

/// Kills every client connection to logical database `db` (only the store under test uses it).
async fn kill_clients_of_db(db: u8) {
    let mut conn = raw_connection().await;
    let list: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut conn).await.expect("client list");
    for line in list.lines().filter(|l| l.split(' ').any(|f| f == format!("db={db}"))) {
        let id = line.split(' ').find_map(|f| f.strip_prefix("id=")).expect("client id");
        let _: i64 =
            redis::cmd("CLIENT").arg("KILL").arg("ID").arg(id).query_async(&mut conn).await.expect("kill");
    }
}

#[tokio::test]
async fn a_dropped_connection_is_replaced_reads_retry_and_writes_do_not() {
    const DB: u8 = 15;
    let mut url = url::Url::parse(&redis_url()).expect("REDIS_URL parses");
    url.set_path(&format!("/{DB}"));
    let mut opts = options(unique_name("parley_test"), &Setup::default());
    opts.url = url.to_string();
    let store = RedisStore::new(opts).expect("store");
    create(&store, "t", "s").await;

    kill_clients_of_db(DB).await;
    assert!(store.get_session("t", "s").await.expect("a read retries").is_some());

    kill_clients_of_db(DB).await;
    let lost = store.append("t", "s", batch("s", 1)).await;
    assert!(matches!(lost, Err(StoreError::Unanswered(_))), "a write is never sent twice: {lost:?}");
    let stored = store.append("t", "s", batch("s", 1)).await.expect("the broken connection was dropped");
    assert!(store.delete_session("t", "s").await.expect("delete"));
    assert!(stored[0].seq <= 2, "the lost write may or may not have run, but only once");
}

/// Superseded messages live in a sorted set of their own, in the session's hash slot: the active
/// set holds only active messages, so an active page is one range read of it whatever was
/// replaced (and the superseded view reads both sets, a page from each).
#[tokio::test]
async fn superseded_messages_live_in_their_own_sorted_set() {
    let prefix = unique_name("parley_test");
    let store = RedisStore::new(options(prefix.clone(), &Setup::default())).expect("store");
    create(&store, "t", "s").await;
    store.append("t", "s", batch("s", 3000)).await.expect("append");
    let mut edit = Turn::start("s");
    edit.status = parley::domain::TurnStatus::Completed;
    let messages = vec![Message::new("s", edit.id, Role::User, "edited")];
    let replace = AppendBatch { messages, turn: Some(edit.clone()), supersede_from: Some(101) };
    store.append("t", "s", replace).await.expect("edit");

    let mut conn = raw_connection().await;
    let keys = keys_under(&mut conn, &prefix).await;
    let active = keys.iter().find(|k| k.ends_with(":messages")).expect("the active set");
    let superseded = keys.iter().find(|k| k.ends_with(":superseded")).expect("the superseded set");
    assert_eq!(active.split(':').nth(1), superseded.split(':').nth(1), "one hash tag");
    let (n_active, n_superseded): (u64, u64) =
        (conn.zcard(active).await.unwrap(), conn.zcard(superseded).await.unwrap());
    assert_eq!((n_active, n_superseded), (101, 2900));
    let newest: Vec<String> = conn.zrange(superseded, -1, -1).await.unwrap();
    assert!(newest[0].contains(&format!("\"superseded_by\":\"{}\"", edit.id)), "{}", newest[0]);

    let page = PageQuery { limit: 5, order: Order::Desc, ..PageQuery::default() };
    let seqs: Vec<u64> =
        store.read_page("t", "s", page).await.unwrap().messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![3001, 100, 99, 98, 97]);
    let all = PageQuery { include_superseded: true, ..page };
    let seqs: Vec<u64> =
        store.read_page("t", "s", all).await.unwrap().messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![3001, 3000, 2999, 2998, 2997]);
    assert!(store.delete_session("t", "s").await.unwrap());
    assert!(keys_under(&mut conn, &prefix).await.iter().all(|k| k.ends_with(":sessions")), "nothing left");
}
