//! Streams on any replica, with real processes sharing one Redis or one PostgreSQL: every replica
//! serves any running turn's events live, from any event id, not only the replica running it.
//!
//! A turn streams on replica A, and replica B:
//! - resumes it after `Last-Event-ID` with the original ids, live, and no delta lost or doubled;
//! - serves 100 followers the very events A's own stream has (ids, names, data);
//! - attaches a streaming retry with the same `Idempotency-Key` to it, the turn stored once;
//! - ends its followers with `turn.failed` `turn_abandoned` within the lease after A is killed
//!   (SIGKILL) mid-turn;
//! - never leaves a follower hanging when the store restarts mid-turn: the follower ends, or
//!   goes on cleanly, within the store timeout and some slack;
//! - resumes the AI SDK UI message stream live;
//! - still tells a finished turn from the store (`turn.started`, `message.completed`,
//!   `turn.completed`) once its event log has expired (`PARLEY_EVENT_TTL`).
//!
//! Every case needs B to serve the turn while it runs (deltas before it ends, the original ids),
//! so a replica that only waits for a turn running elsewhere and then rebuilds it from its record
//! (`turn.started`, `message.completed`, `turn.completed`) fails each of them.

use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt};
use serde_json::{Value, json};

use crate::helpers::{SseEvent, database_url, install_crypto, next_event, rest_of, sse_events, unique_name};
use crate::servers::{ParleyProcess, PrivatePostgres, PrivateRedis, PrivateStore};

/// Runs each listed `async fn case(backend: Backend)` on Redis and on PostgreSQL, as
/// `any_replica::<backend>::<case>`.
macro_rules! on_redis_and_postgres {
    ($($case:ident),+ $(,)?) => {
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Backend::Redis).await
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Backend::Postgres).await
                }
            )+
        }
    };
}

on_redis_and_postgres!(
    a_turn_is_resumed_on_another_replica_after_last_event_id,
    a_hundred_followers_on_another_replica_see_the_turn_as_its_own_stream,
    a_streaming_idempotent_retry_on_another_replica_attaches_to_the_turn,
    followers_on_another_replica_learn_the_turn_was_abandoned_when_its_replica_is_killed,
    a_follower_on_another_replica_never_hangs_when_the_store_restarts,
    the_ai_sdk_stream_is_resumed_live_on_another_replica,
    a_finished_turn_is_told_from_the_store_once_its_event_log_has_expired,
);

/// The echo model's pause before each word (`PARLEY_ECHO_DELAY_MS`).
const WORD_DELAY_MS: u64 = 100;
/// Twelve words: with the echo's four of its own, the reply streams for 1.6 s.
const LONG: &str = "one two three four five six seven eight nine ten eleven twelve";
/// Thirty words: the reply streams for 3.4 s, for a turn that must still run once B's followers
/// were seen live.
const LONGER: &str = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen \
                      fifteen sixteen seventeen eighteen nineteen twenty twenty-one twenty-two \
                      twenty-three twenty-four twenty-five twenty-six twenty-seven twenty-eight \
                      twenty-nine thirty";
/// Three words: the reply streams for 0.7 s.
const SHORT: &str = "short and sweet";
/// The longest wait for the next event of a running turn (a word comes every 100 ms).
const NEXT: Duration = Duration::from_secs(5);
/// The longest wait for a whole stream of a turn to end.
const WHOLE: Duration = Duration::from_secs(20);

/// The store the replicas share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Redis,
    Postgres,
}

/// Where that store runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    /// Redis: a private server (the shared one's `parley_test_*` keys are dropped by every start
    /// of `scripts/test`). PostgreSQL: the shared server (`DATABASE_URL`), in a fresh schema.
    Usual,
    /// A private server, which the test may kill and start again.
    Private,
}

/// Parley processes sharing one store.
struct Replicas {
    /// A, B, … (dropped, so killed, before the store).
    processes: Vec<ParleyProcess>,
    /// The private server, if any.
    store: Option<PrivateStore>,
}

impl Replicas {
    /// Starts `n` replicas on `backend` (the echo model streaming a word every 100 ms), with
    /// these settings on top.
    async fn start(backend: Backend, server: Server, n: usize, settings: &[(&'static str, &str)]) -> Self {
        install_crypto();
        let store = match (backend, server) {
            (Backend::Redis, _) => Some(PrivateStore::Redis(PrivateRedis::start())),
            (Backend::Postgres, Server::Private) => Some(PrivateStore::Postgres(PrivatePostgres::start())),
            (Backend::Postgres, Server::Usual) => None,
        };
        let mut env = match &store {
            Some(store) => store.env(),
            None => vec![("PARLEY_STORE", "postgres".into()), ("DATABASE_URL", database_url())],
        };
        env.push(match backend {
            Backend::Redis => ("PARLEY_REDIS_PREFIX", unique_name("replicas")),
            Backend::Postgres => ("PARLEY_PG_SCHEMA", unique_name("t")),
        });
        env.extend([
            ("PARLEY_DISTRIBUTED", "true".to_owned()),
            ("PARLEY_ECHO_DELAY_MS", WORD_DELAY_MS.to_string()),
            ("PARLEY_LOG", "info".to_owned()),
        ]);
        env.extend(settings.iter().map(|&(key, value)| (key, value.to_owned())));
        // A first: on PostgreSQL it creates and migrates the fresh schema before it answers.
        let mut processes = vec![ParleyProcess::start_logged(&env).await];
        processes.extend(futures::future::join_all((1..n).map(|_| ParleyProcess::start_logged(&env))).await);
        Replicas { processes, store }
    }

    /// A client of replica `i` (0 is A).
    fn api(&self, i: usize) -> Api {
        Api { base: self.processes[i].base.clone(), client: reqwest::Client::new() }
    }

    /// The private store.
    fn store(&mut self) -> &mut PrivateStore {
        self.store.as_mut().expect("started on a private server")
    }
}

/// Where a follower starts.
#[derive(Debug, Clone, Copy)]
enum From {
    /// The first event (no `Last-Event-ID`, no `?after=`).
    Start,
    /// After this event, by `Last-Event-ID`.
    LastEventId(u64),
    /// After this event, by `?after=`.
    After(u64),
}

/// A client of one replica (no timeouts: every read is bounded by the test).
#[derive(Clone)]
struct Api {
    base: String,
    client: reqwest::Client,
}

impl Api {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Creates a session, asserting 201.
    async fn create(&self, id: &str) {
        let response =
            self.client.post(self.url("/v1/sessions")).json(&json!({"id": id})).send().await.unwrap();
        assert_eq!(response.status(), 201, "create session {id}");
    }

    /// Posts a streamed turn, with an `Idempotency-Key` when given: the response as it is.
    async fn post_stream(&self, session: &str, content: &str, key: Option<&str>) -> reqwest::Response {
        let url = self.url(&format!("/v1/sessions/{session}/messages?stream=true"));
        let mut request = self.client.post(url).json(&json!({"content": content}));
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request.send().await.unwrap()
    }

    /// Posts a streamed turn, asserting 200; its events as they come.
    async fn stream(
        &self,
        session: &str,
        content: &str,
    ) -> impl Stream<Item = SseEvent> + Send + Unpin + use<> {
        let response = self.post_stream(session, content, None).await;
        assert_eq!(response.status(), 200, "a streamed turn");
        sse_events(response)
    }

    /// Follows a turn (`GET …/turns/{turn_id}/events`), asserting an SSE answer; its events as
    /// they come.
    async fn follow(
        &self,
        session: &str,
        turn_id: &str,
        from: From,
    ) -> impl Stream<Item = SseEvent> + Send + Unpin + use<> {
        let path = format!("/v1/sessions/{session}/turns/{turn_id}/events");
        let request = match from {
            From::Start => self.client.get(self.url(&path)),
            From::LastEventId(id) => self.client.get(self.url(&path)).header("last-event-id", id.to_string()),
            From::After(id) => self.client.get(self.url(&format!("{path}?after={id}"))),
        };
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "follow {turn_id} from {from:?}");
        let kind = response.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(kind.starts_with("text/event-stream"), "follow {turn_id}: {kind}");
        sse_events(response)
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
}

/// The names of events, for assertion messages.
fn names(events: &[SseEvent]) -> Vec<&str> {
    events.iter().map(|e| e.event.as_str()).collect()
}

/// The ids of events, as numbers.
fn ids(events: &[SseEvent]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e.id.parse().unwrap_or_else(|_| panic!("event id {:?} is a number", e.id)))
        .collect()
}

/// Asserts that the events' ids are `first`, `first + 1`, … (no gap, no duplicate).
fn assert_consecutive(events: &[SseEvent], first: u64, what: &str) {
    let expected: Vec<u64> = (first..first + events.len() as u64).collect();
    assert_eq!(
        ids(events),
        expected,
        "{what}: ids from {first} on, no gap or duplicate; events {:?}",
        names(events)
    );
}

/// How many `message.delta`s.
fn delta_count(events: &[SseEvent]) -> usize {
    events.iter().filter(|e| e.event == "message.delta").count()
}

/// The `message.delta`s' text, concatenated.
fn text(events: &[SseEvent]) -> String {
    events.iter().filter(|e| e.event == "message.delta").map(|e| e.data["delta"].as_str().unwrap()).collect()
}

fn is_terminal(event: &SseEvent) -> bool {
    ["turn.completed", "turn.failed", "turn.cancelled"].contains(&event.event.as_str())
}

/// The turn id of a `turn.started`.
fn turn_id(started: &SseEvent) -> String {
    assert_eq!(started.event, "turn.started", "{:?}", started.data);
    started.data["turn_id"].as_str().unwrap().to_owned()
}

/// The final assistant message's text of a `turn.completed`.
fn final_text(completed: &SseEvent) -> &str {
    assert_eq!(completed.event, "turn.completed", "{:?}", completed.data);
    let last = completed.data["messages"].as_array().and_then(|m| m.last()).expect("the turn's messages");
    assert_eq!(last["role"], "assistant", "{last}");
    last["content"].as_str().unwrap()
}

/// The contents of messages, in order.
fn contents(messages: &[Value]) -> Vec<&str> {
    messages.iter().map(|m| m["content"].as_str().unwrap()).collect()
}

/// The echo model's reply to `content` after `context` messages of history.
fn echo(content: &str, context: usize) -> String {
    format!("echo: {content} (context: {context} messages)")
}

/// Reads events until `n` `message.delta`s have come, and returns them all: the follower is live.
/// Fails if the turn or the stream ends first, or if no event comes within [`NEXT`].
async fn until_deltas(
    events: &mut (impl Stream<Item = SseEvent> + Unpin),
    n: usize,
    who: &str,
) -> Vec<SseEvent> {
    let mut seen = Vec::new();
    while delta_count(&seen) < n {
        let next = tokio::time::timeout(NEXT, events.next()).await.unwrap_or_else(|_| {
            panic!("{who}: no event within {NEXT:?} after {:?} while the turn streams", names(&seen))
        });
        let Some(event) = next else {
            panic!("{who}: the stream ended after {:?}, before {n} live message.delta", names(&seen));
        };
        let terminal = is_terminal(&event);
        seen.push(event);
        assert!(
            !terminal,
            "{who}: the turn had ended before {n} message.delta came ({:?}): its events were not served live",
            names(&seen)
        );
    }
    seen
}

/// A streams a turn; the client reads 3 events and loses the connection, then resumes on B with
/// `Last-Event-ID: 3`: B goes on with events 4… to `turn.completed`, live (its deltas come while
/// the turn runs), and with A's 3 events they tell the whole reply, no delta lost or doubled.
async fn a_turn_is_resumed_on_another_replica_after_last_event_id(backend: Backend) {
    let replicas = Replicas::start(backend, Server::Usual, 2, &[]).await;
    let (a, b) = (replicas.api(0), replicas.api(1));
    a.create("s").await;
    let mut on_a = a.stream("s", LONG).await;
    let mut head = Vec::new();
    for _ in 0..3 {
        head.push(next_event(&mut on_a, NEXT).await);
    }
    assert_consecutive(&head, 1, "A's first events");
    let turn = turn_id(&head[0]);
    assert_eq!(names(&head[1..]), ["message.delta", "message.delta"]);
    // The connection drops after event 3 (the turn goes on); the client reconnects to B.
    drop(on_a);

    let mut on_b = b.follow("s", &turn, From::LastEventId(3)).await;
    let mut tail = Vec::new();
    // The turn's record when B's first delta came.
    let mut status_at_first_delta = None;
    let read = async {
        while let Some(event) = on_b.next().await {
            if event.event == "message.delta" && status_at_first_delta.is_none() {
                status_at_first_delta = Some(b.record("s", &turn).await["status"].clone());
            }
            tail.push(event);
        }
    };
    tokio::time::timeout(WHOLE, read)
        .await
        .unwrap_or_else(|_| panic!("B's stream did not end within {WHOLE:?}"));

    assert!(
        delta_count(&tail) >= 2,
        "B sent {:?} (ids {:?}): the turn's deltas after event 3 were not streamed live from A's turn",
        names(&tail),
        ids(&tail)
    );
    assert_eq!(status_at_first_delta, Some(json!("running")), "B's first delta came while the turn ran");
    assert_consecutive(&tail, 4, "B after Last-Event-ID: 3");
    let completed = tail.last().unwrap();
    assert_eq!(completed.event, "turn.completed", "{:?}", names(&tail));
    let whole: Vec<SseEvent> = head.iter().chain(&tail).cloned().collect();
    assert_eq!(text(&whole), echo(LONG, 0), "A's deltas then B's tell the reply, none lost or doubled");
    assert_eq!(final_text(completed), text(&whole));
    let history = b.history("s").await;
    assert_eq!(contents(&history), [LONG, &echo(LONG, 0)], "{history:?}");
    assert_eq!(completed.data["messages"], json!(history), "turn.completed has the stored messages");
}

/// A streams a turn; 100 followers on B (half without `Last-Event-ID`, half with `?after=0`) each
/// get exactly A's own stream: every event's id, name and data, to `turn.completed`.
async fn a_hundred_followers_on_another_replica_see_the_turn_as_its_own_stream(backend: Backend) {
    let replicas = Replicas::start(backend, Server::Usual, 2, &[]).await;
    let (a, b) = (replicas.api(0), replicas.api(1));
    a.create("s").await;
    let mut on_a = a.stream("s", LONG).await;
    let started = next_event(&mut on_a, NEXT).await;
    let turn = turn_id(&started);
    let followers: Vec<_> = (0..100)
        .map(|i| {
            let (b, turn) = (b.clone(), turn.clone());
            tokio::spawn(async move {
                let from = if i % 2 == 0 { From::Start } else { From::After(0) };
                rest_of(b.follow("s", &turn, from).await, WHOLE).await
            })
        })
        .collect();
    let mut own = vec![started];
    own.extend(rest_of(on_a, WHOLE).await);
    assert_consecutive(&own, 1, "A's stream");
    assert_eq!(own.last().unwrap().event, "turn.completed", "{:?}", names(&own));
    assert_eq!(text(&own), echo(LONG, 0));

    // Every follower has ended before any is judged: none is left reading when the test fails.
    let all = tokio::time::timeout(WHOLE, futures::future::join_all(followers))
        .await
        .unwrap_or_else(|_| panic!("B's followers did not all end within {WHOLE:?}"));
    for (i, seen) in all.into_iter().enumerate() {
        let seen = seen.expect("follower task");
        assert_eq!(
            (names(&seen), ids(&seen)),
            (names(&own), ids(&own)),
            "follower {i} on B: the events of A's own stream, with their ids"
        );
        assert_eq!(seen, own, "follower {i} on B: the data of A's own stream");
    }
}

/// A streams a turn with an `Idempotency-Key`; the same request, streaming, on B while it runs
/// attaches to it: the same turn, every event from id 1 as A's stream has it, and the turn is
/// stored once.
async fn a_streaming_idempotent_retry_on_another_replica_attaches_to_the_turn(backend: Backend) {
    let replicas = Replicas::start(backend, Server::Usual, 2, &[]).await;
    let (a, b) = (replicas.api(0), replicas.api(1));
    a.create("s").await;
    let key = unique_name("key");
    let response = a.post_stream("s", LONG, Some(&key)).await;
    assert_eq!(response.status(), 200);
    let mut on_a = sse_events(response);
    let mut own = vec![next_event(&mut on_a, NEXT).await, next_event(&mut on_a, NEXT).await];
    let turn = turn_id(&own[0]);
    assert_eq!(own[1].event, "message.delta", "the turn runs");

    let retry = b.post_stream("s", LONG, Some(&key)).await;
    let status = retry.status();
    if status != 200 {
        let body = retry.text().await.unwrap_or_default();
        panic!("B answered the streaming retry {status} {body}: it must attach to the turn running on A");
    }
    let (rest, attached) =
        futures::future::join(rest_of(on_a, WHOLE), rest_of(sse_events(retry), WHOLE)).await;
    own.extend(rest);
    assert_consecutive(&own, 1, "A's stream");
    assert_eq!(own.last().unwrap().event, "turn.completed", "{:?}", names(&own));
    assert_eq!(turn_id(&attached[0]), turn, "B's stream is A's turn");
    assert_eq!((names(&attached), ids(&attached)), (names(&own), ids(&own)), "B's stream from id 1");
    assert_eq!(attached, own, "B's stream has the data of A's");

    let history = b.history("s").await;
    assert_eq!(contents(&history), [LONG, &echo(LONG, 0)], "the turn is stored once: {history:?}");
    assert!(history.iter().all(|m| m["turn_id"] == turn.as_str()), "{history:?}");
}

/// A streams a long turn, followers on B (two) and on C see it live, then A is killed (SIGKILL):
/// with a 2 s lease, every follower ends with `turn.failed` `turn_abandoned` within the lease and
/// 5 s, its ids consecutive, its deltas a beginning of the reply.
async fn followers_on_another_replica_learn_the_turn_was_abandoned_when_its_replica_is_killed(
    backend: Backend,
) {
    const LEASE: Duration = Duration::from_secs(2);
    const BOUND: Duration = Duration::from_secs(LEASE.as_secs() + 5);
    let mut replicas = Replicas::start(backend, Server::Usual, 3, &[("PARLEY_TURN_LEASE", "2s")]).await;
    let (a, b, c) = (replicas.api(0), replicas.api(1), replicas.api(2));
    a.create("s").await;
    let mut on_a = a.stream("s", LONGER).await;
    let turn = turn_id(&next_event(&mut on_a, NEXT).await);
    let mut followers = Vec::new();
    for (name, replica, from, first) in
        [("B", &b, From::Start, 1), ("B", &b, From::LastEventId(1), 2), ("C", &c, From::After(2), 3)]
    {
        followers.push((
            format!("a follower on {name} from {from:?}"),
            replica.follow("s", &turn, from).await,
            first,
        ));
    }
    let mut seen = Vec::new();
    for (who, follower, _) in &mut followers {
        seen.push(until_deltas(follower, 2, who).await);
    }

    let killed = Instant::now();
    replicas.processes.remove(0).kill();
    drop(on_a);
    for ((who, follower, first), mut events) in followers.into_iter().zip(seen) {
        let left = BOUND.saturating_sub(killed.elapsed());
        let rest = tokio::time::timeout(left, follower.collect::<Vec<_>>())
            .await
            .unwrap_or_else(|_| panic!("{who} did not end within {BOUND:?} of A's death (lease {LEASE:?})"));
        events.extend(rest);
        assert_consecutive(&events, first, &who);
        let last = events.last().unwrap();
        assert_eq!(last.event, "turn.failed", "{who}: {:?}", names(&events));
        assert_eq!(last.data["error"]["code"], "turn_abandoned", "{who}: {}", last.data);
        assert!(!events.iter().any(|e| e.event.ends_with(".completed")), "{who}: {:?}", names(&events));
        let said = text(&events);
        let reply = echo(LONGER, 0);
        let piece = if first == 1 { reply.starts_with(&said) } else { reply.contains(&said) };
        assert!(piece, "{who}: its deltas are a piece of the reply: {said:?}");
    }
    let record = b.record("s", &turn).await;
    assert_eq!(record["status"], "failed", "{record}");
    assert_eq!(record["error"]["code"], "turn_abandoned", "{record}");
}

/// A follower on B of a turn on A, live; the store is killed and started again mid-turn. The
/// follower must not hang: within the store timeout (2 s) and 15 s, it has ended (a terminal
/// event, or the stream closed) or gone on cleanly to the turn's end. Its ids never go back or
/// repeat, and if it saw `turn.completed`, its deltas tell the stored reply, ids consecutive.
async fn a_follower_on_another_replica_never_hangs_when_the_store_restarts(backend: Backend) {
    const STORE_TIMEOUT: Duration = Duration::from_secs(2);
    const BOUND: Duration = Duration::from_secs(STORE_TIMEOUT.as_secs() + 15);
    let settings = [("PARLEY_STORE_TIMEOUT", "2s"), ("PARLEY_TURN_LEASE", "3s")];
    let mut replicas = Replicas::start(backend, Server::Private, 2, &settings).await;
    let (a, b) = (replicas.api(0), replicas.api(1));
    a.create("s").await;
    let mut on_a = a.stream("s", LONGER).await;
    let turn = turn_id(&next_event(&mut on_a, NEXT).await);
    // A's client goes away; the turn goes on.
    drop(on_a);
    let mut follower = b.follow("s", &turn, From::Start).await;
    let mut seen = until_deltas(&mut follower, 2, "the follower on B").await;
    // The rest of the follower's events, read meanwhile.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Some(event) = follower.next().await {
            if tx.send(event).is_err() {
                return;
            }
        }
    });

    let killed = Instant::now();
    tokio::task::block_in_place(|| replicas.store().kill());
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::block_in_place(|| replicas.store().up());
    let deadline = tokio::time::Instant::from_std(killed + BOUND);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(event)) => seen.push(event),
            Ok(None) => break,
            Err(_) => panic!(
                "the follower on B neither ended nor went on to the turn's end within {BOUND:?} of the \
                 store's restart (store timeout {STORE_TIMEOUT:?}): it hangs after {:?}",
                names(&seen)
            ),
        }
    }
    reader.await.expect("the follower's stream is valid SSE");

    let numbers = ids(&seen);
    assert!(
        numbers.windows(2).all(|w| w[0] < w[1]),
        "ids never go back or repeat: {numbers:?} {:?}",
        names(&seen)
    );
    assert_eq!(numbers[0], 1, "{:?}", names(&seen));
    assert!(
        seen.iter().filter(|e| is_terminal(e)).count() <= 1
            && seen[..seen.len() - 1].iter().all(|e| !is_terminal(e)),
        "a terminal event is the last one: {:?}",
        names(&seen)
    );
    // However the turn ended, B tells it once the store is back.
    let deadline = Instant::now() + Duration::from_secs(15);
    let record = loop {
        let (status, record) = b.get(&format!("/v1/sessions/s/turns/{turn}")).await;
        if status == 200 && record["status"] != "running" {
            break record;
        }
        assert!(Instant::now() < deadline, "the turn did not settle within 15 s: {status} {record}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let last = seen.last().unwrap();
    if last.event == "turn.completed" {
        assert_consecutive(&seen, 1, "the follower on B, to turn.completed");
        assert_eq!(text(&seen), final_text(last), "its deltas tell the reply, none lost or doubled");
        assert_eq!(record["status"], "completed", "{record}");
        let history = b.history("s").await;
        assert_eq!(last.data["messages"], json!(history), "turn.completed has the stored messages");
    }
}

/// A streams a turn; B's `GET /v1/ai-sdk/chat/{id}/stream` while it runs answers its UI message
/// stream from `start`, live (text deltas before A's turn has ended), the deltas telling the
/// stored reply, then `finish` and `[DONE]`.
async fn the_ai_sdk_stream_is_resumed_live_on_another_replica(backend: Backend) {
    let replicas = Replicas::start(backend, Server::Usual, 2, &[]).await;
    let (a, b) = (replicas.api(0), replicas.api(1));
    a.create("c").await;
    let mut on_a = a.stream("c", LONG).await;
    turn_id(&next_event(&mut on_a, NEXT).await);
    // When A's own stream told the turn's end.
    let a_ended = tokio::spawn(async move {
        let rest = rest_of(on_a, WHOLE).await;
        assert_eq!(rest.last().map(|e| e.event.as_str()), Some("turn.completed"), "{:?}", names(&rest));
        Instant::now()
    });

    let response = b.client.get(b.url("/v1/ai-sdk/chat/c/stream")).send().await.unwrap();
    assert_eq!(response.status(), 200, "B resumes the chat's running turn");
    assert_eq!(response.headers()["x-vercel-ai-ui-message-stream"], "v1");
    // Each chunk's data, and when it came.
    let read = response
        .bytes_stream()
        .eventsource()
        .map(|event| (event.expect("valid SSE").data, Instant::now()))
        .collect::<Vec<_>>();
    let frames = tokio::time::timeout(WHOLE, read)
        .await
        .unwrap_or_else(|_| panic!("B's UI message stream did not end within {WHOLE:?}"));
    let a_ended = tokio::time::timeout(WHOLE, a_ended).await.expect("A's stream ended").unwrap();

    let (last, chunks) = frames.split_last().expect("chunks");
    assert_eq!(last.0, "[DONE]", "the stream ends with [DONE]");
    let chunks: Vec<(Value, Instant)> = chunks
        .iter()
        .map(|(data, at)| {
            (serde_json::from_str(data).unwrap_or_else(|_| panic!("a JSON chunk: {data}")), *at)
        })
        .collect();
    let types: Vec<&str> = chunks.iter().map(|(c, _)| c["type"].as_str().unwrap()).collect();
    assert_eq!(types.first(), Some(&"start"), "{types:?}");
    assert_eq!(types.last(), Some(&"finish"), "{types:?}");
    let deltas: Vec<&(Value, Instant)> = chunks.iter().filter(|(c, _)| c["type"] == "text-delta").collect();
    let said: String = deltas.iter().map(|(c, _)| c["delta"].as_str().unwrap()).collect();
    let history = b.history("c").await;
    assert_eq!(contents(&history), [LONG, &echo(LONG, 0)], "{history:?}");
    assert_eq!(said, echo(LONG, 0), "the text deltas tell the stored reply");
    let first = deltas.first().expect("a text-delta").1;
    assert!(
        first < a_ended,
        "B's first text-delta came {:?} after A's turn ended: B did not stream the turn live ({types:?})",
        first - a_ended
    );
    assert!(deltas.len() >= 2, "B streamed the reply delta by delta: {types:?}");
}

/// With `PARLEY_EVENT_TTL=1s`: B follows a short turn on A live (its events as A streams them);
/// 2.5 s after the turn ended its event log is gone, and B still tells the turn from the store:
/// `turn.started`, `message.completed`, `turn.completed` with the stored messages.
async fn a_finished_turn_is_told_from_the_store_once_its_event_log_has_expired(backend: Backend) {
    let replicas = Replicas::start(backend, Server::Usual, 2, &[("PARLEY_EVENT_TTL", "1s")]).await;
    let (a, b) = (replicas.api(0), replicas.api(1));
    a.create("s").await;
    let mut on_a = a.stream("s", SHORT).await;
    let started = next_event(&mut on_a, NEXT).await;
    let turn = turn_id(&started);
    let follower = b.follow("s", &turn, From::Start).await;
    let (rest, followed) = futures::future::join(rest_of(on_a, WHOLE), rest_of(follower, WHOLE)).await;
    let ended = Instant::now();
    let mut own = vec![started];
    own.extend(rest);
    assert_eq!(own.last().unwrap().event, "turn.completed", "{:?}", names(&own));
    assert_eq!((names(&followed), ids(&followed)), (names(&own), ids(&own)), "B follows the turn live");
    assert_eq!(followed, own);

    tokio::time::sleep_until(tokio::time::Instant::from_std(ended + Duration::from_millis(2500))).await;
    let told = rest_of(b.follow("s", &turn, From::Start).await, WHOLE).await;
    assert_eq!(
        names(&told),
        ["turn.started", "message.completed", "turn.completed"],
        "rebuilt from the store"
    );
    assert_consecutive(&told, 1, "the rebuilt events");
    let history = b.history("s").await;
    assert_eq!(contents(&history), [SHORT, &echo(SHORT, 0)], "{history:?}");
    assert_eq!(told[0].data["user_message"], history[0]);
    assert_eq!(told[1].data["message"], history[1]);
    assert_eq!(told[2].data["messages"], json!(history));
}
