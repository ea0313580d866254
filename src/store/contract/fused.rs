//! The fused contract: what a backend that owns both parts promises beyond each of them
//! ([`FusedTurns`]: a turn's start and end in one atomic step, and writes fenced by the turn's
//! lock in that same step), and that a session's lock and keys live and go with it. Each case
//! takes a factory building a fresh, isolated [`DynFused`] from a [`Setup`];
//! [`fused_contract_tests!`] turns them into tests.
//!
//! [`FusedTurns`]: crate::store::FusedTurns
//! [`fused_contract_tests!`]: crate::fused_contract_tests

use std::future::Future;
use std::time::Duration;

use super::{OTHER_TENANT, Setup, TENANT, append, build, fill, msg, new_session, pair, seqs};
use crate::domain::{Metadata, NewSession, Role, Turn, TurnStatus, WindowMessage, new_id};
use crate::store::{AppendBatch, DynFused, IdempotencyBegin, LockOutcome, StoreError, TurnBegin};

/// Starting a turn claims the session, records the turn and reads the window and the system
/// prompt in one call; a busy session is reported with its holder and nothing is written.
pub async fn begin_turn_claims_records_and_reads_the_window<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynFused>,
{
    let store = build(factory, Setup::default()).await;
    let prompted =
        NewSession { id: "s1".into(), system_prompt: Some("Be brief.".into()), metadata: Metadata::new() };
    store.create_session(TENANT, prompted).await.unwrap();
    new_session(&store, OTHER_TENANT, "s1").await;
    fill(&store, "s1", 6).await;
    let lease = Duration::from_secs(30);
    let first = Turn::start("s1");
    let TurnBegin::Started { system_prompt, window } =
        store.begin_turn(TENANT, &first, 4, lease).await.unwrap()
    else {
        panic!("a free session is claimed")
    };
    assert_eq!(system_prompt.as_deref(), Some("Be brief."));
    let last = store.last_n(TENANT, "s1", 4).await.unwrap();
    assert_eq!(seqs(&last), vec![3, 4, 5, 6]);
    let last: Vec<WindowMessage> = last.into_iter().map(WindowMessage::from).collect();
    assert_eq!(window, last, "the last 4 messages, oldest first");
    assert_eq!(store.turn_lock_holder(TENANT, "s1").await.unwrap(), Some(first.id));
    assert_eq!(store.get_turn(TENANT, "s1", first.id).await.unwrap(), Some(first.clone()));

    let second = Turn::start("s1");
    assert_eq!(store.begin_turn(TENANT, &second, 4, lease).await.unwrap(), TurnBegin::Busy(first.id));
    // A running record left by a turn that never ended stays readable when the next one starts.
    store.release_turn_lock(TENANT, "s1", first.id).await.unwrap();
    let next = Turn::start("s1");
    assert!(matches!(store.begin_turn(TENANT, &next, 4, lease).await.unwrap(), TurnBegin::Started { .. }));
    assert_eq!(store.get_turn(TENANT, "s1", first.id).await.unwrap(), Some(first.clone()));
    assert_eq!(store.get_turn(TENANT, "s1", next.id).await.unwrap(), Some(next.clone()));
    store.release_turn_lock(TENANT, "s1", next.id).await.unwrap();
    assert!(matches!(store.begin_turn(TENANT, &first, 4, lease).await.unwrap(), TurnBegin::Started { .. }));
    assert_eq!(store.get_turn(TENANT, "s1", second.id).await.unwrap(), None, "a busy start writes nothing");

    let other = Turn::start("s1");
    let TurnBegin::Started { system_prompt, window } =
        store.begin_turn(OTHER_TENANT, &other, 4, lease).await.unwrap()
    else {
        panic!("another tenant's session is another session")
    };
    assert_eq!((system_prompt, window), (None, Vec::new()));
    let empty = Turn::start("s1");
    store.release_turn_lock(OTHER_TENANT, "s1", other.id).await.unwrap();
    let begun = store.begin_turn(OTHER_TENANT, &empty, 0, lease).await.unwrap();
    assert_eq!(begun, TurnBegin::Started { system_prompt: None, window: Vec::new() });
    assert!(matches!(
        store.begin_turn(TENANT, &Turn::start("missing"), 4, lease).await,
        Err(StoreError::SessionNotFound)
    ));
}

/// Finishing a turn appends its batch with its record and frees the session it holds, and only
/// that: it never releases another turn's claim.
pub async fn finish_turn_appends_and_frees_the_session<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynFused>,
{
    let store = build(factory, Setup::default()).await;
    new_session(&store, TENANT, "s1").await;
    let lease = Duration::from_secs(30);
    let mut turn = Turn::start("s1");
    assert!(matches!(store.begin_turn(TENANT, &turn, 20, lease).await.unwrap(), TurnBegin::Started { .. }));
    let messages = pair("s1", "hello");
    turn.status = TurnStatus::Completed;
    turn.message_ids = messages.iter().map(|m| m.id).collect();
    let batch = AppendBatch { messages: messages.clone(), turn: Some(turn.clone()), supersede_from: None };
    let finished = store.finish_turn(TENANT, "s1", batch, turn.id).await.unwrap();
    assert!(finished.lock_released);
    assert_eq!(seqs(&finished.messages), vec![1, 2]);
    assert_eq!(store.turn_lock_holder(TENANT, "s1").await.unwrap(), None, "the session is free");
    assert_eq!(store.get_turn(TENANT, "s1", turn.id).await.unwrap(), Some(turn.clone()));
    assert_eq!(store.last_n(TENANT, "s1", 10).await.unwrap(), finished.messages);

    let holder = Turn::start("s1");
    assert!(matches!(store.begin_turn(TENANT, &holder, 20, lease).await.unwrap(), TurnBegin::Started { .. }));
    let late = AppendBatch { messages: pair("s1", "late"), turn: None, supersede_from: None };
    assert!(matches!(store.finish_turn(TENANT, "s1", late, turn.id).await, Err(StoreError::Fenced)));
    assert_eq!(store.turn_lock_holder(TENANT, "s1").await.unwrap(), Some(holder.id), "not its claim");
    assert_eq!(store.last_n(TENANT, "s1", 10).await.unwrap().len(), 2, "a fenced write writes nothing");
    let gone = AppendBatch { messages: pair("missing", "x"), turn: None, supersede_from: None };
    assert!(matches!(
        store.finish_turn(TENANT, "missing", gone, turn.id).await,
        Err(StoreError::SessionNotFound)
    ));
}

/// Fencing: once a turn's lease ran out and another turn took the session, every write of the
/// first turn (a round, its last batch, its cancel's save) is refused whole, and the new holder's
/// writes go through.
pub async fn fenced_writes_are_refused_once_the_lease_is_lost<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynFused>,
{
    let store = build(factory, Setup::default()).await;
    new_session(&store, TENANT, "s1").await;
    let stale = Turn::start("s1");
    let short = Duration::from_millis(200);
    assert!(matches!(store.begin_turn(TENANT, &stale, 20, short).await.unwrap(), TurnBegin::Started { .. }));
    let round =
        AppendBatch { messages: pair("s1", "round"), turn: Some(stale.clone()), supersede_from: None };
    assert_eq!(
        seqs(&store.append_fenced(TENANT, "s1", round, stale.id).await.unwrap()),
        vec![1, 2],
        "held: written"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let fresh = Turn::start("s1");
    let long = Duration::from_secs(30);
    assert!(matches!(store.begin_turn(TENANT, &fresh, 20, long).await.unwrap(), TurnBegin::Started { .. }));

    let round = AppendBatch { messages: pair("s1", "stale"), turn: None, supersede_from: None };
    assert!(matches!(store.append_fenced(TENANT, "s1", round, stale.id).await, Err(StoreError::Fenced)));
    let mut done = stale.clone();
    done.status = TurnStatus::Completed;
    let last = AppendBatch { messages: pair("s1", "stale"), turn: Some(done), supersede_from: None };
    assert!(matches!(store.finish_turn(TENANT, "s1", last, stale.id).await, Err(StoreError::Fenced)));
    assert_eq!(store.last_n(TENANT, "s1", 10).await.unwrap().len(), 2, "nothing of the stale turn");
    assert_eq!(store.get_turn(TENANT, "s1", stale.id).await.unwrap().unwrap().status, TurnStatus::Running);
    assert_eq!(store.turn_lock_holder(TENANT, "s1").await.unwrap(), Some(fresh.id), "still the new turn's");
    assert_eq!(store.get_session(TENANT, "s1").await.unwrap().unwrap().message_count, 2);

    let mine = AppendBatch { messages: pair("s1", "fresh"), turn: None, supersede_from: None };
    assert_eq!(
        seqs(&store.append_fenced(TENANT, "s1", mine, fresh.id).await.unwrap()),
        vec![3, 4],
        "seqs go on"
    );
    // A fenced write to a missing session is still a missing session.
    let gone = AppendBatch { messages: pair("nope", "x"), turn: None, supersede_from: None };
    assert!(matches!(
        store.append_fenced(TENANT, "nope", gone, fresh.id).await,
        Err(StoreError::SessionNotFound)
    ));
}

/// A turn's last write is idempotent: applied twice, it is stored once (the first frees the
/// session, so the second is fenced).
pub async fn a_finished_turn_is_stored_once<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynFused>,
{
    let store = build(factory, Setup::default()).await;
    new_session(&store, TENANT, "s1").await;
    let mut turn = Turn::start("s1");
    store.begin_turn(TENANT, &turn, 20, Duration::from_secs(30)).await.unwrap();
    let messages = pair("s1", "once");
    turn.status = TurnStatus::Completed;
    turn.message_ids = messages.iter().map(|m| m.id).collect();
    let batch = AppendBatch { messages, turn: Some(turn.clone()), supersede_from: None };
    store.finish_turn(TENANT, "s1", batch.clone(), turn.id).await.unwrap();
    assert!(matches!(store.finish_turn(TENANT, "s1", batch, turn.id).await, Err(StoreError::Fenced)));
    assert_eq!(store.last_n(TENANT, "s1", 10).await.unwrap().len(), 2);
    assert_eq!(store.get_turn(TENANT, "s1", turn.id).await.unwrap(), Some(turn));
}

/// A turn's window, read by `begin_turn`, holds no message an edit superseded.
pub async fn the_window_holds_no_superseded_message<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynFused>,
{
    let store = build(factory, Setup::default()).await;
    new_session(&store, TENANT, "s1").await;
    for i in 0..3 {
        append(&store, TENANT, "s1", pair("s1", &format!("q{i}"))).await;
    }
    let mut edit = Turn::start("s1");
    edit.status = TurnStatus::Completed;
    let messages =
        vec![msg("s1", edit.id, Role::User, "q1 edited"), msg("s1", edit.id, Role::Assistant, "ok")];
    let batch = AppendBatch { messages, turn: Some(edit.clone()), supersede_from: Some(3) };
    store.append(TENANT, "s1", batch).await.unwrap();
    let next = Turn::start("s1");
    let TurnBegin::Started { window, .. } =
        store.begin_turn(TENANT, &next, 20, Duration::from_secs(30)).await.unwrap()
    else {
        panic!("busy")
    };
    let texts: Vec<&str> = window.iter().map(|m| &*m.content).collect();
    assert_eq!(texts, vec!["q0", "re: q0", "q1 edited", "ok"]);
}

/// A store that coordinates itself keeps a session's lock and keys with the session: it answers
/// `SessionNotFound` for a session it does not hold, and deleting a session drops its lock and
/// its idempotency keys (a session created again with the same id starts free).
pub async fn a_sessions_lock_and_keys_go_with_the_session<F, Fut>(factory: &F)
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = DynFused>,
{
    let store = build(factory, Setup::default()).await;
    let (a, b) = (new_id(), new_id());
    let lease = Duration::from_secs(30);
    let ttl = Duration::from_secs(60);
    assert!(matches!(
        store.acquire_turn_lock(TENANT, "missing", a, lease).await,
        Err(StoreError::SessionNotFound)
    ));
    new_session(&store, TENANT, "s1").await;
    assert_eq!(store.acquire_turn_lock(TENANT, "s1", a, lease).await.unwrap(), LockOutcome::Acquired);
    let begun = store.begin_idempotent(TENANT, "s1", "k", "fp", a, ttl).await.unwrap();
    assert_eq!(begun, IdempotencyBegin::Started);
    assert!(store.delete_session(TENANT, "s1").await.unwrap());
    new_session(&store, TENANT, "s1").await;
    assert_eq!(store.turn_lock_holder(TENANT, "s1").await.unwrap(), None, "the lock goes with the session");
    assert_eq!(store.acquire_turn_lock(TENANT, "s1", b, lease).await.unwrap(), LockOutcome::Acquired);
    let again = store.begin_idempotent(TENANT, "s1", "k", "fp", b, ttl).await.unwrap();
    assert_eq!(again, IdempotencyBegin::Started, "the keys go with the session");
}
