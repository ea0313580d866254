//! The coordination contract: what any [`TurnCoordinator`] must do (turn locks with leases,
//! cancel requests, idempotency keys), standalone or as part of a store that coordinates itself.
//! Each case takes a factory building a fresh, isolated [`Coordinated`] from a [`Setup`];
//! [`coordinator_contract_tests!`] turns them into tests. What only a store that owns both parts
//! promises (a session's lock and keys go with it) is in [`fused`](super::fused).
//!
//! [`TurnCoordinator`]: crate::store::TurnCoordinator
//! [`coordinator_contract_tests!`]: crate::coordinator_contract_tests

use std::future::Future;
use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use super::{Coordinated, OTHER_TENANT, Setup, TENANT, build};
use crate::domain::new_id;
use crate::store::{IdempotencyBegin, IdempotencyRecord, LeaseKey, LockOutcome, LockStatus};

/// One turn at a time holds a session; the lock is compare-and-delete, and per tenant.
pub async fn turn_locks_admit_one_turn_per_session<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = Coordinated>,
{
    let coordinated: Coordinated = build(factory, Setup::default()).await;
    let store = &coordinated.coordinator;
    coordinated.create_session(TENANT, "s1").await;
    coordinated.create_session(OTHER_TENANT, "s1").await;
    let (a, b) = (new_id(), new_id());
    let lease = Duration::from_secs(30);
    assert_eq!(store.turn_lock_holder(TENANT, "s1").await.unwrap(), None);
    assert_eq!(store.acquire_turn_lock(TENANT, "s1", a, lease).await.unwrap(), LockOutcome::Acquired);
    assert_eq!(store.acquire_turn_lock(TENANT, "s1", b, lease).await.unwrap(), LockOutcome::Busy(a));
    assert_eq!(store.acquire_turn_lock(OTHER_TENANT, "s1", b, lease).await.unwrap(), LockOutcome::Acquired);
    assert_eq!(store.turn_lock_holder(TENANT, "s1").await.unwrap(), Some(a));
    let held = store.renew_turn_lock(TENANT, "s1", a, lease).await.unwrap();
    assert_eq!(held, LockStatus { held: true, cancel_requested: false });
    assert!(!store.renew_turn_lock(TENANT, "s1", b, lease).await.unwrap().held);
    store.release_turn_lock(TENANT, "s1", b).await.unwrap();
    assert_eq!(store.turn_lock_holder(TENANT, "s1").await.unwrap(), Some(a), "only the owner releases");
    store.release_turn_lock(TENANT, "s1", a).await.unwrap();
    assert_eq!(store.turn_lock_holder(TENANT, "s1").await.unwrap(), None);
    assert_eq!(store.acquire_turn_lock(TENANT, "s1", b, lease).await.unwrap(), LockOutcome::Acquired);
}

/// A lease that is not renewed runs out, and the session is free again.
pub async fn turn_locks_expire_after_their_lease<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = Coordinated>,
{
    let coordinated: Coordinated = build(factory, Setup::default()).await;
    let store = &coordinated.coordinator;
    coordinated.create_session(TENANT, "s1").await;
    let (a, b) = (new_id(), new_id());
    let short = Duration::from_millis(300);
    assert_eq!(store.acquire_turn_lock(TENANT, "s1", a, short).await.unwrap(), LockOutcome::Acquired);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(store.renew_turn_lock(TENANT, "s1", a, short).await.unwrap().held, "renewed in time");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(store.turn_lock_holder(TENANT, "s1").await.unwrap(), Some(a), "the renewal extended it");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(store.turn_lock_holder(TENANT, "s1").await.unwrap(), None);
    assert_eq!(store.acquire_turn_lock(TENANT, "s1", b, short).await.unwrap(), LockOutcome::Acquired);
    assert!(!store.renew_turn_lock(TENANT, "s1", a, short).await.unwrap().held, "the old holder lost it");
}

/// Renewing many leases at once renews each held one and reports every turn's status in the
/// order asked, across the backend's batches.
pub async fn renew_turn_locks_renews_each_and_reports_in_order<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = Coordinated>,
{
    let coordinated: Coordinated = build(factory, Setup::default()).await;
    let store = &coordinated.coordinator;
    coordinated.create_session(TENANT, "s1").await;
    coordinated.create_session(TENANT, "s2").await;
    let (a, b) = (new_id(), new_id());
    let short = Duration::from_millis(300);
    store.acquire_turn_lock(TENANT, "s1", a, short).await.unwrap();
    store.acquire_turn_lock(TENANT, "s2", b, short).await.unwrap();
    assert!(store.request_cancel(TENANT, "s2", b).await.unwrap());
    let key = |session: &str, turn_id: Uuid| LeaseKey {
        tenant: TENANT.to_owned(),
        session_id: session.to_owned(),
        turn_id,
    };
    // More than any backend's batch: the two held locks come first and last.
    let mut keys = vec![key("s1", a)];
    keys.extend((0..1200).map(|i| key(&format!("missing-{i}"), new_id())));
    keys.push(key("s1", b));
    keys.push(key("s2", b));
    let statuses = store.renew_turn_locks(&keys, Duration::from_secs(30)).await.unwrap();
    assert_eq!(statuses.len(), keys.len());
    assert_eq!(statuses[0], LockStatus { held: true, cancel_requested: false });
    assert!(statuses[1..keys.len() - 1].iter().all(|s| !s.held), "others hold nothing");
    assert_eq!(statuses[keys.len() - 1], LockStatus { held: true, cancel_requested: true });
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(store.turn_lock_holder(TENANT, "s1").await.unwrap(), Some(a), "renewed past the short lease");
    assert_eq!(store.turn_lock_holder(TENANT, "s2").await.unwrap(), Some(b));
    assert_eq!(store.renew_turn_locks(&[], Duration::from_secs(1)).await.unwrap(), Vec::new());
}

/// A cancel request reaches the turn holding the session through its next renewal.
pub async fn cancel_requests_reach_the_lock_holder<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = Coordinated>,
{
    let coordinated: Coordinated = build(factory, Setup::default()).await;
    let store = &coordinated.coordinator;
    coordinated.create_session(TENANT, "s1").await;
    let (a, b) = (new_id(), new_id());
    let lease = Duration::from_secs(30);
    store.acquire_turn_lock(TENANT, "s1", a, lease).await.unwrap();
    assert!(!store.request_cancel(TENANT, "s1", b).await.unwrap(), "b does not hold the session");
    assert!(!store.request_cancel(OTHER_TENANT, "s1", a).await.unwrap_or(false));
    assert!(!store.renew_turn_lock(TENANT, "s1", a, lease).await.unwrap().cancel_requested);
    assert!(store.request_cancel(TENANT, "s1", a).await.unwrap());
    let status = store.renew_turn_lock(TENANT, "s1", a, lease).await.unwrap();
    assert_eq!(status, LockStatus { held: true, cancel_requested: true });
    store.release_turn_lock(TENANT, "s1", a).await.unwrap();
    store.acquire_turn_lock(TENANT, "s1", b, lease).await.unwrap();
    assert!(
        !store.renew_turn_lock(TENANT, "s1", b, lease).await.unwrap().cancel_requested,
        "a new turn starts clean"
    );
}

/// An idempotency key remembers its first request, its turn and, once saved, its answer.
pub async fn idempotency_keys_remember_the_first_request<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = Coordinated>,
{
    let coordinated: Coordinated = build(factory, Setup::default()).await;
    let store = &coordinated.coordinator;
    coordinated.create_session(TENANT, "s1").await;
    coordinated.create_session(OTHER_TENANT, "s1").await;
    let ttl = Duration::from_secs(60);
    let (t1, t2) = (new_id(), new_id());
    let begin = store.begin_idempotent(TENANT, "s1", "key-1", "fp-a", t1, ttl).await.unwrap();
    assert_eq!(begin, IdempotencyBegin::Started);
    let again = store.begin_idempotent(TENANT, "s1", "key-1", "fp-b", t2, ttl).await.unwrap();
    let pending = IdempotencyRecord { fingerprint: "fp-a".into(), turn_id: t1, response: None };
    assert_eq!(again, IdempotencyBegin::Existing(pending));
    let other = store.begin_idempotent(OTHER_TENANT, "s1", "key-1", "fp-b", t2, ttl).await.unwrap();
    assert_eq!(other, IdempotencyBegin::Started, "keys are per tenant");
    let answer = json!({"turn_id": t1.to_string(), "messages": [{"content": "ü ✓"}], "z": 1, "a": 2});
    store.complete_idempotent(TENANT, "s1", "key-1", &answer, ttl).await.unwrap();
    let done = store.begin_idempotent(TENANT, "s1", "key-1", "fp-a", t2, ttl).await.unwrap();
    let IdempotencyBegin::Existing(record) = done else { panic!("the key is remembered") };
    assert_eq!((record.fingerprint.as_str(), record.turn_id), ("fp-a", t1));
    assert_eq!(
        serde_json::to_string(&record.response).unwrap(),
        serde_json::to_string(&Some(answer)).unwrap()
    );
    store.abort_idempotent(TENANT, "s1", "key-1").await.unwrap();
    let fresh = store.begin_idempotent(TENANT, "s1", "key-1", "fp-c", t2, ttl).await.unwrap();
    assert_eq!(fresh, IdempotencyBegin::Started, "an aborted key is forgotten");
    let short = Duration::from_millis(300);
    store.begin_idempotent(TENANT, "s1", "key-2", "fp", t1, short).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let expired = store.begin_idempotent(TENANT, "s1", "key-2", "fp", t2, ttl).await.unwrap();
    assert_eq!(expired, IdempotencyBegin::Started, "keys are forgotten after their ttl");
}

/// Whether the coordinator reports itself as shareable across replicas, and answers.
pub async fn reports_whether_it_is_distributed<F, Fut>(factory: &F, expected: bool)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = Coordinated>,
{
    let coordinated: Coordinated = build(factory, Setup::default()).await;
    assert_eq!(coordinated.coordinator.is_distributed(), expected);
    coordinated.coordinator.ping().await.expect("ping");
}

/// Turns waiting for a session (`if_busy: wait`) are first in arrival order, across every
/// replica; a place not renewed within its lease lapses, and its turn joins again at the end. A
/// distributed coordinator must keep such a queue; another may (then the same holds) or not.
pub async fn waiting_turns_are_first_in_arrival_order<F, Fut>(factory: &F, distributed: bool)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = Coordinated>,
{
    let coordinated: Coordinated = build(factory, Setup::default()).await;
    let store = &coordinated.coordinator;
    coordinated.create_session(TENANT, "q").await;
    coordinated.create_session(OTHER_TENANT, "q").await;
    let lease = Duration::from_secs(30);
    let (a, b, c) = (new_id(), new_id(), new_id());
    let queued = store.join_queue(TENANT, "q", a, lease).await.unwrap();
    if !queued {
        assert!(!distributed, "a distributed coordinator keeps a wait queue");
        assert!(store.first_in_queue(TENANT, "q", b, lease).await.unwrap(), "no queue: every waiter may try");
        return;
    }
    store.join_queue(TENANT, "q", b, lease).await.unwrap();
    store.join_queue(TENANT, "q", c, lease).await.unwrap();
    assert!(store.first_in_queue(TENANT, "q", a, lease).await.unwrap());
    assert!(!store.first_in_queue(TENANT, "q", b, lease).await.unwrap());
    assert!(!store.first_in_queue(TENANT, "q", c, lease).await.unwrap());
    assert!(store.first_in_queue(OTHER_TENANT, "q", c, lease).await.unwrap(), "another tenant's queue");
    store.join_queue(TENANT, "q", a, lease).await.unwrap();
    assert!(store.first_in_queue(TENANT, "q", a, lease).await.unwrap(), "joining again keeps the place");
    store.leave_queue(TENANT, "q", a).await.unwrap();
    assert!(store.first_in_queue(TENANT, "q", b, lease).await.unwrap());
    assert!(!store.first_in_queue(TENANT, "q", c, lease).await.unwrap());
    // b's place lapses (its replica died): c is first; b, back, joins again behind c.
    store.join_queue(TENANT, "q", b, Duration::from_millis(200)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(store.first_in_queue(TENANT, "q", c, lease).await.unwrap(), "a lapsed place is dropped");
    assert!(!store.first_in_queue(TENANT, "q", b, lease).await.unwrap(), "back at the end");
    store.leave_queue(TENANT, "q", c).await.unwrap();
    assert!(store.first_in_queue(TENANT, "q", b, lease).await.unwrap());
    store.leave_queue(TENANT, "q", b).await.unwrap();
}
