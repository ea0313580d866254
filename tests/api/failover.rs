//! Failover with real processes, on Redis and PostgreSQL. A replica paused past its turn's lease
//! cannot write any more: its turn ends `turn_abandoned`, the replica that took the session over
//! is the only one whose turn is stored, and the paused turn's record stays failed. A store
//! frozen (SIGSTOP) during a turn's final append answers within the README's bound
//! (`PARLEY_STORE_TIMEOUT` plus at most 1 s) and truthfully: `turn_outcome_unknown` when the
//! write was sent and the store cannot say, then a record and a history that agree, and a retry
//! with the same `Idempotency-Key` that never doubles the turn. A store frozen before a request
//! answers 503 within the bound, and the session is usable as soon as the store thaws.

use std::time::{Duration, Instant};

use futures::Stream;
use serde_json::{Value, json};

use crate::helpers::{SseEvent, database_url, install_crypto, next_event, rest_of, sse_events, unique_name};
use crate::servers::{ParleyProcess, PrivatePostgres, PrivateRedis, PrivateStore};

/// `PARLEY_STORE_TIMEOUT` of the frozen-store cases: long enough that an answer which waits for
/// two store timeouts in a row (2 × 3 s) is past the bound even with the slack (3 + 1 + 1.5 s).
const STORE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long parley may take, past the store timeout, to learn a write's outcome (the README's
/// bound is the store timeout plus `min(PARLEY_STORE_TIMEOUT, 1 s)`).
const OUTCOME_MARGIN: Duration = Duration::from_secs(1);
/// Scheduling slack for a loaded 2-core machine running other tests.
const SLACK: Duration = Duration::from_millis(1500);
/// The echo model's pause before each word (`PARLEY_ECHO_DELAY_MS`).
const WORD_DELAY_MS: u64 = 100;
/// Twelve words: with the echo's four of its own, the reply streams for 1.6 s.
const LONG: &str = "one two three four five six seven eight nine ten eleven twelve";

/// A client of one parley process (no timeouts: a paused replica's stream is read to its end).
#[derive(Clone)]
struct Api {
    base: String,
    client: reqwest::Client,
}

/// A response read whole: status, `Idempotent-Replayed`, JSON body.
#[derive(Debug)]
struct Answer {
    status: u16,
    replayed: bool,
    body: Value,
}

impl Api {
    fn new(process: &ParleyProcess) -> Self {
        Api { base: process.base.clone(), client: reqwest::Client::new() }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Creates a session, asserting 201.
    async fn create(&self, id: &str) {
        let response =
            self.client.post(self.url("/v1/sessions")).json(&json!({"id": id})).send().await.unwrap();
        assert_eq!(response.status(), 201, "create session {id}");
    }

    /// Posts a JSON turn, with an `Idempotency-Key` when given.
    async fn post(&self, session: &str, body: Value, key: Option<&str>) -> Answer {
        let mut request = self.client.post(self.url(&format!("/v1/sessions/{session}/messages"))).json(&body);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let replayed = response.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
        Answer { status, replayed, body: response.json().await.unwrap_or(Value::Null) }
    }

    /// Posts a JSON turn, asserting 200; returns the turn.
    async fn turn(&self, session: &str, content: &str) -> Value {
        let answer = self.post(session, json!({"content": content}), None).await;
        assert_eq!(answer.status, 200, "turn: {}", answer.body);
        answer.body
    }

    /// `GET` a path: status and JSON body.
    async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.client.get(self.url(path)).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The whole history (at most 100 messages, plenty here), asserting 200.
    async fn history(&self, session: &str) -> Vec<Value> {
        let (status, page) = self.get(&format!("/v1/sessions/{session}/messages?limit=100")).await;
        assert_eq!(status, 200, "history: {page}");
        page["data"].as_array().unwrap().clone()
    }

    /// A turn's record, asserting 200.
    async fn record(&self, session: &str, turn_id: &str) -> Value {
        let (status, record) = self.get(&format!("/v1/sessions/{session}/turns/{turn_id}")).await;
        assert_eq!(status, 200, "turn record: {record}");
        record
    }

    /// Posts a streamed turn, asserting 200; returns its events as they come.
    async fn stream(&self, session: &str, content: &str) -> impl Stream<Item = SseEvent> + Unpin {
        let response = self
            .client
            .post(self.url(&format!("/v1/sessions/{session}/messages?stream=true")))
            .json(&json!({"content": content}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        sse_events(response)
    }
}

/// The names of events, for assertion messages.
fn names(events: &[SseEvent]) -> Vec<&str> {
    events.iter().map(|e| e.event.as_str()).collect()
}

/// The contents of messages, in order.
fn contents(messages: &[Value]) -> Vec<&str> {
    messages.iter().map(|m| m["content"].as_str().unwrap()).collect()
}

/// The messages of one turn.
fn of_turn<'a>(messages: &'a [Value], turn_id: &str) -> Vec<&'a Value> {
    messages.iter().filter(|m| m["turn_id"] == turn_id).collect()
}

/// The echo model's reply to `content` after `context` messages of history.
fn echo(content: &str, context: usize) -> String {
    format!("echo: {content} (context: {context} messages)")
}

/// Replica A streams a turn and is paused (SIGSTOP) past its 1 s lease; replica B takes the
/// session and completes a turn; A resumes. A's turn must end `turn_abandoned` with nothing of it
/// stored, and its failed record must never change again (the old code completed A's turn and
/// appended it after B's, turning its record from `failed` back to `completed`).
async fn a_replica_paused_past_its_lease_writes_nothing_more(store: Vec<(&'static str, String)>) {
    install_crypto();
    let mut env = store;
    env.extend([
        ("PARLEY_DISTRIBUTED", "true".to_owned()),
        ("PARLEY_TURN_LEASE", "1s".to_owned()),
        ("PARLEY_ECHO_DELAY_MS", WORD_DELAY_MS.to_string()),
        ("PARLEY_IF_BUSY_TIMEOUT", "10s".to_owned()),
        ("PARLEY_LOG", "info".to_owned()),
    ]);
    // A first: on PostgreSQL it creates and migrates the fresh schema before it answers.
    let replica_a = ParleyProcess::start_logged(&env).await;
    let replica_b = ParleyProcess::start_logged(&env).await;
    let (a, b) = (Api::new(&replica_a), Api::new(&replica_b));
    a.create("s").await;
    a.turn("s", "before").await;

    // A's turn is streaming (its reply takes 1.6 s) when A stops.
    let mut events = a.stream("s", LONG).await;
    let started = next_event(&mut events, Duration::from_secs(10)).await;
    assert_eq!(started.event, "turn.started");
    let abandoned = started.data["turn_id"].as_str().unwrap().to_owned();
    assert_eq!(next_event(&mut events, Duration::from_secs(10)).await.event, "message.delta");
    replica_a.pause();
    // The lease (1 s, renewed every 1/3 s until the pause) runs out well within this.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // B takes the session over (waiting, should A's lease still be running) and completes a turn.
    let taken = b.post("s", json!({"content": "bee", "if_busy": "wait"}), None).await;
    assert_eq!(taken.status, 200, "B's turn: {}", taken.body);
    assert_eq!(taken.body["messages"][1]["content"], echo("bee", 2), "B saw nothing of A's turn");
    let record = b.record("s", &abandoned).await;
    assert_eq!(record["status"], "failed", "{record}");
    assert_eq!(record["error"]["code"], "turn_abandoned", "{record}");

    // A resumes: its turn finds its lease gone and stops, writing nothing.
    replica_a.resume();
    let rest = rest_of(events, Duration::from_secs(20)).await;
    let last = rest.last().expect("A's stream ends with an event");
    assert_eq!(last.event, "turn.failed", "{:?}", names(&rest));
    assert_eq!(last.data["error"]["code"], "turn_abandoned", "{:?}", last.data);
    assert!(!rest.iter().any(|e| e.event.ends_with(".completed")), "{:?}", names(&rest));

    // Only B's turn follows what came before; A's record is as it was, now and a second later.
    let expected = ["before", &echo("before", 0), "bee", &echo("bee", 2)];
    for pause in [Duration::ZERO, Duration::from_secs(1)] {
        tokio::time::sleep(pause).await;
        for api in [&a, &b] {
            let history = api.history("s").await;
            assert_eq!(contents(&history), expected, "{history:?}");
            assert!(of_turn(&history, &abandoned).is_empty());
            assert_eq!(api.record("s", &abandoned).await, record, "a terminal record never changes");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_paused_past_its_lease_writes_nothing_more_on_redis() {
    // A private server: the shared one's `parley_test_*` keys are dropped by every start of
    // `scripts/test`, which another run may do meanwhile.
    let redis = PrivateRedis::start();
    let env = vec![("PARLEY_STORE", "redis".into()), ("REDIS_URL", redis.url())];
    a_replica_paused_past_its_lease_writes_nothing_more(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_paused_past_its_lease_writes_nothing_more_on_postgres() {
    let env = vec![
        ("PARLEY_STORE", "postgres".into()),
        ("DATABASE_URL", database_url()),
        ("PARLEY_PG_SCHEMA", unique_name("t")),
    ];
    a_replica_paused_past_its_lease_writes_nothing_more(env).await;
}

/// How many store connections parley has when the store freezes under a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pool {
    /// Several, opened beforehand: the final append finds one idle and sends its write.
    Warm,
    /// Every open one taken by reads stuck on the frozen store (sent just after the freeze): the
    /// final append must open a new connection, which the store never accepts.
    Busy,
}

/// parley's environment for a private store that a test freezes: the store, the store timeout,
/// and a lease long enough (30 s) not to run out while the store is frozen.
fn frozen_store_env(store: &PrivateStore) -> Vec<(&'static str, String)> {
    let mut env = store.env();
    env.extend([
        ("PARLEY_STORE_TIMEOUT", format!("{}s", STORE_TIMEOUT.as_secs())),
        ("PARLEY_TURN_LEASE", "30s".to_owned()),
        ("PARLEY_LOG", "info".to_owned()),
    ]);
    env
}

/// Opens several store connections (concurrent reads), so that a turn's final append finds an
/// idle one even while a lease renewal is stuck on the frozen store.
async fn warm_the_pool(api: &Api, session: &str) {
    let path = format!("/v1/sessions/{session}/messages");
    let reads = (0..8).map(|_| api.get(&path));
    for (status, page) in futures::future::join_all(reads).await {
        assert_eq!(status, 200, "{page}");
    }
}

/// A read sent to a frozen store: it holds a store connection until the store timeout.
async fn stuck_read(api: Api) {
    let (status, body) = api.get("/v1/sessions/s/messages").await;
    assert!([200, 503].contains(&status), "{status} {body}");
}

/// Polls a turn's record until it is no longer `running` (at most 15 s).
async fn settled(api: &Api, session: &str, turn_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, record) = api.get(&format!("/v1/sessions/{session}/turns/{turn_id}")).await;
        if status == 200 && record["status"] != "running" {
            return record;
        }
        assert!(Instant::now() < deadline, "the turn was not settled within 15 s: {status} {record}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Checks that the answer to a turn agrees with what the store holds once it answers again;
/// returns the turn's settled record (`None` when the answer says nothing was stored).
async fn stored_as_told(api: &Api, session: &str, before: &[Value], answer: &Answer) -> Option<Value> {
    let code = answer.body["code"].as_str().unwrap_or_default();
    let turn_id = match (answer.status, code) {
        (200, _) | (503, "turn_outcome_unknown") => answer.body["turn_id"].as_str(),
        (503, "store_unavailable") => None,
        _ => panic!("an answer that does not say what was stored: {answer:?}"),
    };
    let Some(turn_id) = turn_id else {
        assert_eq!(api.history(session).await, before, "told store_unavailable, yet something was stored");
        return None;
    };
    let record = settled(api, session, turn_id).await;
    let history = api.history(session).await;
    let stored = of_turn(&history, turn_id);
    match record["status"].as_str() {
        Some("completed") => {
            let ids: Vec<&Value> = stored.iter().map(|m| &m["id"]).collect();
            assert_eq!(ids, record["message_ids"].as_array().unwrap().iter().collect::<Vec<_>>(), "{record}");
            assert_eq!(stored.len(), 2, "the turn is in the history once: {history:?}");
            assert_eq!(history.len(), before.len() + 2, "{history:?}");
        }
        Some("failed") => {
            assert_ne!(answer.status, 200, "told the turn was saved, yet its record says failed: {record}");
            assert_eq!(history, before, "the record says failed, yet the history holds the turn");
        }
        _ => panic!("a turn that ended neither completed nor failed: {record}"),
    }
    Some(record)
}

/// Freezes the store while a JSON turn's reply is still streaming, so that the turn's next
/// store call is its final append. The client must be answered within the README's bound (the
/// old code took 3.3 times the store timeout) with a 503 that tells the truth: the store says
/// nothing until it thaws, so `turn_outcome_unknown` when the write was sent, `store_unavailable`
/// only when it was not (then nothing may be stored). Once the store thaws, the record and the
/// history must agree, and a retry with the same `Idempotency-Key` must leave the turn in the
/// history exactly once (the old code answered `store_unavailable` for a turn it then saved).
async fn a_store_frozen_during_the_final_append_answers_in_time_and_truthfully(
    store: PrivateStore,
    pool: Pool,
) {
    install_crypto();
    let mut env = frozen_store_env(&store);
    env.push(("PARLEY_ECHO_DELAY_MS", WORD_DELAY_MS.to_string()));
    let app = ParleyProcess::start_logged(&env).await;
    let api = Api::new(&app);
    api.create("s").await;
    api.turn("s", "before").await;
    let before = api.history("s").await;
    if pool == Pool::Warm {
        warm_the_pool(&api, "s").await;
    }

    let key = unique_name("key");
    let body = json!({"content": LONG});
    let streaming = Duration::from_millis(WORD_DELAY_MS * (LONG.split(' ').count() as u64 + 4));
    let sent = Instant::now();
    let first = tokio::spawn({
        let (api, body, key) = (api.clone(), body.clone(), key.clone());
        async move {
            let answer = api.post("s", body, Some(&key)).await;
            (answer, Instant::now())
        }
    });
    // Well after the claim (a few ms), and more than a renewal period (1 s) before the reply's
    // last word: a lease renewal is stuck on the frozen store when the final append comes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    store.freeze();
    let frozen = Instant::now();
    let stuck = match pool {
        Pool::Warm => Vec::new(),
        Pool::Busy => (0..4).map(|_| tokio::spawn(stuck_read(api.clone()))).collect(),
    };
    let (answer, answered) =
        tokio::time::timeout(Duration::from_secs(30), first).await.expect("an answer within 30 s").unwrap();
    let waited = answered.duration_since(frozen);
    let left = streaming.saturating_sub(frozen.duration_since(sent));
    let bound = left + STORE_TIMEOUT + OUTCOME_MARGIN + SLACK;
    assert!(waited <= bound, "answered {waited:?} after the freeze; the bound is {bound:?}: {answer:?}");
    assert_eq!(answer.status, 503, "the store was frozen: {answer:?}");
    store.thaw();
    for read in stuck {
        tokio::time::timeout(Duration::from_secs(20), read).await.expect("the stuck read ended").unwrap();
    }

    // What the client was told agrees with what was stored.
    let record = stored_as_told(&api, "s", &before, &answer).await;
    let first_turn = answer.body["turn_id"].as_str();
    let saved = record.as_ref().is_some_and(|r| r["status"] == "completed");

    // The same request again, with the same key: the turn is in the history once.
    let deadline = Instant::now() + Duration::from_secs(15);
    let retry = loop {
        let retry = api.post("s", body.clone(), Some(&key)).await;
        if retry.status != 409 || Instant::now() > deadline {
            break retry;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(retry.status, 200, "{retry:?}");
    assert_eq!(retry.replayed, saved, "a saved turn is replayed, an unsaved one runs again: {retry:?}");
    assert_eq!(retry.body["turn_id"].as_str() == first_turn, saved, "{retry:?}");
    let history = api.history("s").await;
    assert_eq!(contents(&history[before.len()..]), [LONG, &echo(LONG, 2)], "{history:?}");
    if let (Some(turn_id), Some(record)) = (first_turn, record) {
        assert_eq!(api.record("s", turn_id).await, record, "a terminal record never changes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_frozen_during_the_final_append_answers_in_time_and_truthfully() {
    let store = PrivateStore::Redis(PrivateRedis::start());
    a_store_frozen_during_the_final_append_answers_in_time_and_truthfully(store, Pool::Warm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_frozen_during_the_final_append_answers_in_time_and_truthfully() {
    let store = PrivateStore::Postgres(PrivatePostgres::start());
    a_store_frozen_during_the_final_append_answers_in_time_and_truthfully(store, Pool::Warm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_frozen_during_the_final_append_answers_in_time_when_its_connections_are_busy() {
    let store = PrivateStore::Redis(PrivateRedis::start());
    a_store_frozen_during_the_final_append_answers_in_time_and_truthfully(store, Pool::Busy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_frozen_during_the_final_append_answers_in_time_when_its_connections_are_busy() {
    let store = PrivateStore::Postgres(PrivatePostgres::start());
    a_store_frozen_during_the_final_append_answers_in_time_and_truthfully(store, Pool::Busy).await;
}

/// Freezes the store before the requests: reading a session and posting a turn each answer 503
/// `store_unavailable` within the README's bound; once the store thaws, the refused turn left
/// nothing behind (no message, no lock: the session takes a turn at once, not after the 30 s
/// lease).
async fn a_frozen_store_answers_503_in_time_and_the_session_recovers(store: PrivateStore) {
    install_crypto();
    let app = ParleyProcess::start_logged(&frozen_store_env(&store)).await;
    let api = Api::new(&app);
    api.create("s").await;
    api.turn("s", "before").await;
    let before = api.history("s").await;

    store.freeze();
    let bound = STORE_TIMEOUT + OUTCOME_MARGIN + SLACK;
    let started = Instant::now();
    let (status, problem) = api.get("/v1/sessions/s").await;
    let waited = started.elapsed();
    assert_eq!((status, problem["code"].as_str()), (503, Some("store_unavailable")), "{problem}");
    assert!(waited <= bound, "GET answered in {waited:?}; the bound is {bound:?}");
    let started = Instant::now();
    let answer = api.post("s", json!({"content": "during"}), None).await;
    let waited = started.elapsed();
    assert_eq!((answer.status, answer.body["code"].as_str()), (503, Some("store_unavailable")), "{answer:?}");
    assert!(waited <= bound, "POST answered in {waited:?}; the bound is {bound:?}");
    store.thaw();

    let deadline = Instant::now() + Duration::from_secs(8);
    let after = loop {
        let answer = api.post("s", json!({"content": "after"}), None).await;
        if answer.status == 200 || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(after.status, 200, "the session takes a turn once the store is back: {after:?}");
    let history = api.history("s").await;
    assert_eq!(history[..before.len()], before[..]);
    assert_eq!(contents(&history[before.len()..]), ["after", &echo("after", 2)], "{history:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_answers_503_in_time_and_the_session_recovers() {
    let store = PrivateStore::Redis(PrivateRedis::start());
    a_frozen_store_answers_503_in_time_and_the_session_recovers(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_postgres_answers_503_in_time_and_the_session_recovers() {
    let store = PrivateStore::Postgres(PrivatePostgres::start());
    a_frozen_store_answers_503_in_time_and_the_session_recovers(store).await;
}
