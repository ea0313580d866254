//! The event log contract: what a coordinator's [`TurnEventLog`] must do so that any replica
//! serves any turn's stream (appends in id order, retried batches added once, reads after any id,
//! wake-ups through the backend, per-turn scoping, expiry). Each case takes a factory building a
//! fresh, isolated [`Coordinated`] whose coordinator keeps a log;
//! [`event_log_contract_tests!`] turns them into tests.
//!
//! [`TurnEventLog`]: crate::store::event_log::TurnEventLog
//! [`event_log_contract_tests!`]: crate::event_log_contract_tests

use std::future::Future;
use std::time::Duration;

use super::{Coordinated, OTHER_TENANT, Setup, TENANT, build};
use crate::domain::new_id;
use crate::store::LeaseKey;
use crate::store::event_log::{LoggedEvent, MAX_EVENTS_PER_TURN, TurnAppend, TurnEventLog};

const TTL: Duration = Duration::from_secs(60);

fn events(ids: std::ops::RangeInclusive<u64>) -> Vec<LoggedEvent> {
    ids.map(|id| LoggedEvent { id, body: format!("event {id}: ünïcødé ✓\nsecond line") }).collect()
}

fn key(tenant: &str, session: &str) -> LeaseKey {
    LeaseKey { tenant: tenant.into(), session_id: session.into(), turn_id: new_id() }
}

/// Appends one turn's events.
async fn append(log: &dyn TurnEventLog, turn: &LeaseKey, events: Vec<LoggedEvent>, ttl: Duration) {
    log.append_events(&[TurnAppend { turn: turn.clone(), events }], ttl).await.expect("appended");
}

fn log(coordinated: &Coordinated) -> &dyn TurnEventLog {
    coordinated.coordinator.event_log().expect("this coordinator keeps an event log")
}

/// Batches are read back in id order, after any id, at most `limit` at a time, bodies exact.
pub async fn events_are_read_back_in_order_after_any_id<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = Coordinated>,
{
    let coordinated = build(factory, Setup::default()).await;
    coordinated.create_session(TENANT, "s1").await;
    let log = log(&coordinated);
    let turn = key(TENANT, "s1");
    assert!(log.read_events(&turn, 0, 100).await.unwrap().is_empty(), "an unknown turn has no events");
    append(log, &turn, events(1..=3), TTL).await;
    append(log, &turn, events(4..=4), TTL).await;
    append(log, &turn, events(5..=12), TTL).await;
    assert_eq!(log.read_events(&turn, 0, 100).await.unwrap(), events(1..=12));
    assert_eq!(log.read_events(&turn, 3, 100).await.unwrap(), events(4..=12));
    assert_eq!(log.read_events(&turn, 4, 5).await.unwrap(), events(5..=9));
    assert!(log.read_events(&turn, 12, 100).await.unwrap().is_empty());
    assert!(log.read_events(&turn, u64::MAX - 1, 100).await.unwrap().is_empty());
}

/// A batch retried after an unknown outcome adds nothing twice, and its new events once.
pub async fn a_retried_batch_is_added_once<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = Coordinated>,
{
    let coordinated = build(factory, Setup::default()).await;
    coordinated.create_session(TENANT, "s1").await;
    let log = log(&coordinated);
    let turn = key(TENANT, "s1");
    append(log, &turn, events(1..=4), TTL).await;
    append(log, &turn, events(1..=4), TTL).await;
    append(log, &turn, events(3..=6), TTL).await;
    append(log, &turn, events(5..=6), TTL).await;
    assert_eq!(log.read_events(&turn, 0, 100).await.unwrap(), events(1..=6));
    assert_eq!(log.read_events(&turn, 2, 100).await.unwrap(), events(3..=6));
    assert_eq!(log.read_events(&turn, 3, 2).await.unwrap(), events(4..=5));
    assert_eq!(log.read_events(&turn, 0, 5).await.unwrap(), events(1..=5));
}

/// One append of several turns (of other sessions and tenants too) lands in each turn's own log,
/// after what each held, and wakes each turn's watchers.
pub async fn several_turns_append_at_once<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = Coordinated>,
{
    let coordinated = build(factory, Setup::default()).await;
    coordinated.create_session(TENANT, "s1").await;
    coordinated.create_session(TENANT, "s2").await;
    coordinated.create_session(OTHER_TENANT, "s1").await;
    let log = log(&coordinated);
    let turns = [key(TENANT, "s1"), key(TENANT, "s1"), key(TENANT, "s2"), key(OTHER_TENANT, "s1")];
    let mut watches: Vec<_> = turns.iter().map(|t| log.watch(t.turn_id)).collect();
    tokio::time::timeout(Duration::from_secs(10), watches[0].changed()).await.expect("listening within 10 s");
    for watch in &mut watches[1..] {
        // The wake-up everyone gets once listening, if it came.
        let _ = tokio::time::timeout(Duration::from_millis(50), watch.changed()).await;
    }
    append(log, &turns[0], events(1..=2), TTL).await;
    let appends: Vec<TurnAppend> = turns
        .iter()
        .enumerate()
        .map(|(i, turn)| {
            let first = if i == 0 { 3 } else { 1 };
            TurnAppend { turn: turn.clone(), events: events(first..=first + i as u64) }
        })
        .collect();
    log.append_events(&appends, TTL).await.unwrap();
    for (i, (turn, watch)) in turns.iter().zip(&mut watches).enumerate() {
        tokio::time::timeout(Duration::from_secs(5), watch.changed())
            .await
            .unwrap_or_else(|_| panic!("turn {i}'s watcher woken within 5 s"));
        let expected = if i == 0 { events(1..=3) } else { events(1..=1 + i as u64) };
        assert_eq!(log.read_events(turn, 0, 100).await.unwrap(), expected, "turn {i}'s log");
    }
    log.append_events(&appends, TTL).await.unwrap();
    assert_eq!(
        log.read_events(&turns[3], 0, 100).await.unwrap(),
        events(1..=4),
        "a retry adds nothing twice"
    );
}

/// A turn's log keeps its newest [`MAX_EVENTS_PER_TURN`] events: an append drops those more than
/// that before its last.
pub async fn a_log_keeps_its_newest_events<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = Coordinated>,
{
    let coordinated = build(factory, Setup::default()).await;
    coordinated.create_session(TENANT, "s1").await;
    let log = log(&coordinated);
    let turn = key(TENANT, "s1");
    append(log, &turn, events(1..=3), TTL).await;
    let newest = MAX_EVENTS_PER_TURN + 3;
    append(log, &turn, events(4..=4), TTL).await;
    append(log, &turn, events(newest..=newest), TTL).await;
    assert_eq!(
        log.read_events(&turn, 0, 100).await.unwrap(),
        [events(4..=4), events(newest..=newest)].concat(),
        "events 1 to 3 are more than {MAX_EVENTS_PER_TURN} before the last"
    );
}

/// Forgetting a session drops the logs of its turns (several, written in several appends), and
/// only theirs: another session's, or the same session id's in another tenant, stay.
pub async fn forgetting_a_session_drops_its_turns_logs<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = Coordinated>,
{
    let coordinated = build(factory, Setup::default()).await;
    coordinated.create_session(TENANT, "s1").await;
    coordinated.create_session(TENANT, "s2").await;
    coordinated.create_session(OTHER_TENANT, "s1").await;
    let log = log(&coordinated);
    let (first, second) = (key(TENANT, "s1"), key(TENANT, "s1"));
    let kept = [key(TENANT, "s2"), key(OTHER_TENANT, "s1")];
    for turn in [&first, &second].into_iter().chain(&kept) {
        append(log, turn, events(1..=2), TTL).await;
        append(log, turn, events(3..=3), TTL).await;
    }
    log.forget_session(TENANT, "s1").await.unwrap();
    for turn in [&first, &second] {
        assert!(log.read_events(turn, 0, 100).await.unwrap().is_empty(), "{turn:?} is dropped");
    }
    for turn in &kept {
        assert_eq!(log.read_events(turn, 0, 100).await.unwrap(), events(1..=3), "{turn:?} stays");
    }
    log.forget_session(TENANT, "s1").await.expect("forgetting again is harmless");
    log.forget_session(TENANT, "never").await.expect("a session without logs");
}

/// A turn's log is its own: another turn, session or tenant reads nothing of it.
pub async fn a_log_is_read_only_by_its_turn<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = Coordinated>,
{
    let coordinated = build(factory, Setup::default()).await;
    coordinated.create_session(TENANT, "s1").await;
    coordinated.create_session(TENANT, "s2").await;
    coordinated.create_session(OTHER_TENANT, "s1").await;
    let log = log(&coordinated);
    let turn = key(TENANT, "s1");
    append(log, &turn, events(1..=2), TTL).await;
    let elsewhere = [
        LeaseKey { turn_id: new_id(), ..turn.clone() },
        LeaseKey { session_id: "s2".into(), ..turn.clone() },
        LeaseKey { tenant: OTHER_TENANT.into(), ..turn.clone() },
    ];
    for other in elsewhere {
        assert!(log.read_events(&other, 0, 100).await.unwrap().is_empty(), "{other:?} reads nothing");
    }
}

/// An append wakes the turn's watchers, through the backend (as on every replica), and only
/// them; a watch taken before a read misses nothing appended after it.
pub async fn an_append_wakes_the_turns_watchers<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = Coordinated>,
{
    let coordinated = build(factory, Setup::default()).await;
    coordinated.create_session(TENANT, "s1").await;
    let log = log(&coordinated);
    let (turn, other) = (key(TENANT, "s1"), key(TENANT, "s1"));
    let mut watch = log.watch(turn.turn_id);
    // The first watch starts listening: give it until the backend has it subscribed, which the
    // first wake-up (everyone, once listening) tells.
    tokio::time::timeout(Duration::from_secs(10), watch.changed()).await.expect("listening within 10 s");
    let mut other_watch = log.watch(other.turn_id);
    for round in 1..=3u64 {
        append(log, &turn, events(round..=round), TTL).await;
        tokio::time::timeout(Duration::from_secs(5), watch.changed())
            .await
            .unwrap_or_else(|_| panic!("append {round} woke the watcher within 5 s"));
        assert_eq!(log.read_events(&turn, round - 1, 100).await.unwrap(), events(round..=round));
    }
    let quiet = tokio::time::timeout(Duration::from_millis(200), other_watch.changed()).await;
    assert!(quiet.is_err(), "another turn's watcher is not woken");
}

/// A turn's log goes `ttl` after its last append.
pub async fn a_log_expires_after_its_ttl<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = Coordinated>,
{
    let coordinated = build(factory, Setup::default()).await;
    coordinated.create_session(TENANT, "s1").await;
    let log = log(&coordinated);
    let turn = key(TENANT, "s1");
    let ttl = Duration::from_millis(400);
    append(log, &turn, events(1..=2), ttl).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    append(log, &turn, events(3..=3), ttl).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(log.read_events(&turn, 0, 100).await.unwrap().len(), 3, "the last append slid the ttl");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(log.read_events(&turn, 0, 100).await.unwrap().is_empty(), "gone after the ttl");
}
