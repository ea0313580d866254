//! The store contract: the suites of cases that pin the store traits' behaviour, one per trait. A
//! backend that passes them is a backend.
//!
//! - [`conversation`]: any [`ConversationStore`] (sessions, history, turn records, a turn's
//!   messages), whoever coordinates its turns.
//! - [`coordination`]: any [`TurnCoordinator`] (locks with leases, cancel requests, idempotency
//!   keys), standalone or part of a store that coordinates itself.
//! - [`events`]: a coordinator that keeps a turn event log ([`TurnCoordinator::event_log`]), so
//!   that any replica serves any turn's stream.
//! - [`fused`]: a backend that owns both parts and implements [`FusedTurns`] (the start and end of
//!   a turn in one atomic step, writes fenced in that step, a session's lock and keys going with
//!   it).
//!
//! The module is compiled only with the crate's `contract` feature, so the service does not carry
//! it. Each case takes a factory that builds a fresh, isolated store (its own key prefix, schema,
//! file or instance) from a [`Setup`], so cases run in parallel; cases fail by panicking, like any
//! test. A macro per suite turns it into one `#[tokio::test]` per case, in the module where it is
//! called (one suite per module: each has a `reports_whether_it_is_distributed`).
//!
//! # Running the suites against your own backend
//! In the backend's crate, depend on parley with the feature, and on tokio for the tests:
//!
//! ```toml
//! [dev-dependencies]
//! parley = { git = "https://…/parley", features = ["contract"] }  # or a path
//! tokio = { version = "1", features = ["macros", "rt-multi-thread", "time"] }
//! ```
//!
//! Then, in a test file (`tests/contract.rs`, say):
//!
//! ```text
//! use std::sync::Arc;
//! use parley::store::contract::{Coordinated, Setup};
//! use parley::store::memory_coordinator::MemoryCoordinator;
//!
//! /// A history store on a fresh database, honouring `setup.max_messages` and `setup.ttl`.
//! async fn history(setup: Setup) -> parley::store::DynStore {
//!     Arc::new(my_backend::MyStore::connect_fresh(setup).await)
//! }
//!
//! mod conversation {
//!     use super::*;
//!     parley::conversation_contract_tests!(history, distributed = true, ttl = true);
//! }
//!
//! // A coordinator of your own, or one of parley's checked against your setup:
//! async fn coordinator(_: Setup) -> Coordinated {
//!     Coordinated::standalone(Arc::new(MemoryCoordinator::new()))
//! }
//!
//! mod coordination {
//!     use super::*;
//!     parley::coordinator_contract_tests!(coordinator, distributed = false);
//! }
//! ```
//!
//! A backend that owns both parts and their fused paths builds a [`DynFused`] and runs all three
//! suites with one macro, `parley::store_contract_tests!(store, distributed = true, ttl = true)`,
//! which makes the modules `conversation`, `coordination` and `fused` itself (parley's own
//! backends do, in `tests/api/store_*.rs`). `ttl = false` skips the expiry cases, for a backend
//! without a session TTL.

pub mod conversation;
pub mod coordination;
pub mod events;
pub mod fused;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::{AppendBatch, ConversationStore, DynCoordinator, DynFused, DynStore, Order, PageQuery};
#[cfg(doc)]
use super::{FusedTurns, TurnCoordinator};
use crate::domain::{Message, Metadata, NewSession, Role, new_id};

/// How the factory must configure the store it builds.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    /// Cap on messages per session; `None` means the backend's default (unbounded for durable
    /// stores, the memory default for memory).
    pub max_messages: Option<usize>,
    /// Session time-to-live; `None` means nothing expires.
    pub ttl: Option<Duration>,
}

/// The tenant most cases use.
pub const TENANT: &str = "tenant-a";
/// A second tenant, for isolation cases.
pub const OTHER_TENANT: &str = "tenant-b";

/// A coordinator under test, and where the sessions it coordinates are created when it needs
/// them to exist.
#[derive(Clone)]
pub struct Coordinated {
    /// The coordinator.
    pub coordinator: DynCoordinator,
    /// Where the cases create the sessions they coordinate: the store itself when it coordinates
    /// its own sessions (it may answer `SessionNotFound` for a session it does not hold); `None`
    /// for a standalone coordinator, which needs none.
    pub sessions: Option<DynStore>,
}

impl Coordinated {
    /// A coordinator that needs no session to exist (`MemoryCoordinator`, `RedisCoordinator`).
    pub fn standalone(coordinator: DynCoordinator) -> Self {
        Coordinated { coordinator, sessions: None }
    }

    /// A coordinator that needs its sessions to exist in `sessions`.
    pub fn with_sessions(coordinator: DynCoordinator, sessions: DynStore) -> Self {
        Coordinated { coordinator, sessions: Some(sessions) }
    }

    /// A backend that owns both parts: it coordinates the sessions it holds.
    pub fn fused(store: DynFused) -> Self {
        let sessions: DynStore = store.clone();
        Coordinated { coordinator: store, sessions: Some(sessions) }
    }

    /// Creates session `id` of `tenant` where the coordinator needs it (nowhere for a standalone
    /// one).
    pub async fn create_session(&self, tenant: &str, id: &str) {
        if let Some(sessions) = &self.sessions {
            new_session(sessions, tenant, id).await;
        }
    }
}

/// A message of `turn` with the given role and text.
pub fn msg(session: &str, turn: Uuid, role: Role, text: &str) -> Message {
    Message::new(session, turn, role, text)
}

/// A user + assistant pair forming one turn.
pub fn pair(session: &str, text: &str) -> Vec<Message> {
    let turn = new_id();
    vec![msg(session, turn, Role::User, text), msg(session, turn, Role::Assistant, &format!("re: {text}"))]
}

async fn build<F, Fut, T>(factory: &F, setup: Setup) -> T
where
    F: Fn(Setup) -> Fut,
    Fut: Future<Output = T>,
{
    factory(setup).await
}

async fn new_session<S: ConversationStore + ?Sized>(store: &Arc<S>, tenant: &str, id: &str) {
    store
        .create_session(tenant, NewSession { id: id.into(), system_prompt: None, metadata: Metadata::new() })
        .await
        .expect("create session");
}

async fn append<S: ConversationStore + ?Sized>(
    store: &Arc<S>,
    tenant: &str,
    session: &str,
    messages: Vec<Message>,
) -> Vec<Message> {
    store
        .append(tenant, session, AppendBatch { messages, turn: None, supersede_from: None })
        .await
        .expect("append")
}

/// Appends `count` messages of one new turn to the session of [`TENANT`].
async fn fill<S: ConversationStore + ?Sized>(store: &Arc<S>, session: &str, count: usize) {
    let turn = new_id();
    let batch: Vec<Message> = (1..=count).map(|i| msg(session, turn, Role::User, &format!("m{i}"))).collect();
    append(store, TENANT, session, batch).await;
}

fn seqs(messages: &[Message]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

fn query(limit: usize, order: Order, after: Option<u64>, before: Option<u64>) -> PageQuery {
    PageQuery { limit, order, after, before, ..PageQuery::default() }
}

fn named(id: &str) -> NewSession {
    NewSession { id: id.into(), system_prompt: None, metadata: Metadata::new() }
}

/// Expands to one `#[tokio::test]` per case of [`conversation`] for a history store.
///
/// `$factory` is an `async fn(Setup) -> DynStore` building an isolated store; `distributed` is
/// what `is_distributed()` must answer; `ttl` (`true` or `false`) says whether the backend
/// supports session expiry.
#[macro_export]
macro_rules! conversation_contract_tests {
    ($factory:path, distributed = $distributed:expr, ttl = $ttl:tt) => {
        $crate::conversation_contract_tests!(@cases $factory;
            append_and_read_back_in_order,
            pages_by_cursor_in_both_orders,
            last_n_returns_the_newest_messages_oldest_first,
            clear_keeps_the_session_and_never_reuses_a_seq,
            delete_removes_everything,
            the_per_session_cap_drops_the_oldest,
            concurrent_appenders_lose_nothing,
            a_one_mib_message_round_trips,
            non_ascii_text_and_emoji_round_trip,
            metadata_and_tool_calls_round_trip_exactly,
            turn_records_round_trip,
            conflicts_and_unknown_sessions_are_reported,
            session_metadata_is_replaced_in_place,
            sessions_list_newest_first_by_cursor,
            cursors_at_the_ends_of_the_range_are_positions,
            tenants_are_isolated,
            another_tenant_reaches_nothing_of_a_session,
            the_same_id_in_two_tenants_is_two_sessions,
            sessions_are_counted_per_tenant,
            concurrent_creations_never_overshoot_the_session_limit,
            a_terminal_turn_record_never_changes,
            turn_records_are_capped_like_messages,
            an_edit_supersedes_in_the_same_append,
            a_turns_messages_are_found_at_any_depth,
            a_turns_superseded_messages_are_included,
            turn_messages_of_an_unknown_turn_or_another_tenant_are_none,
            turn_messages_go_with_the_cap_and_a_clear,
            a_session_is_created_holding_messages
        );
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn reports_whether_it_is_distributed() {
            $crate::store::contract::conversation::reports_whether_it_is_distributed(&$factory, $distributed)
                .await;
        }
        $crate::conversation_contract_tests!(@ttl $factory, $ttl);
    };
    (@cases $factory:path; $($case:ident),+) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::store::contract::conversation::$case(&$factory).await;
            }
        )+
    };
    (@ttl $factory:path, true) => {
        $crate::conversation_contract_tests!(@cases $factory;
            sessions_expire_after_the_ttl_and_writes_slide_it,
            expired_sessions_are_not_counted,
            expired_sessions_leave_room_under_the_limit
        );
    };
    (@ttl $factory:path, false) => {};
}

/// Expands to one `#[tokio::test]` per case of [`coordination`] for a coordinator.
///
/// `$factory` is an `async fn(Setup) -> Coordinated` building an isolated coordinator (and, if
/// it needs them, the store its sessions are created in); `distributed` is what
/// `is_distributed()` must answer.
#[macro_export]
macro_rules! coordinator_contract_tests {
    ($factory:path, distributed = $distributed:expr) => {
        $crate::coordinator_contract_tests!(@cases $factory;
            turn_locks_admit_one_turn_per_session,
            turn_locks_expire_after_their_lease,
            renew_turn_locks_renews_each_and_reports_in_order,
            cancel_requests_reach_the_lock_holder,
            idempotency_keys_remember_the_first_request
        );
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn reports_whether_it_is_distributed() {
            $crate::store::contract::coordination::reports_whether_it_is_distributed(&$factory, $distributed)
                .await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn waiting_turns_are_first_in_arrival_order() {
            $crate::store::contract::coordination::waiting_turns_are_first_in_arrival_order(
                &$factory,
                $distributed,
            )
            .await;
        }
    };
    (@cases $factory:path; $($case:ident),+) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::store::contract::coordination::$case(&$factory).await;
            }
        )+
    };
}

/// Expands to one `#[tokio::test]` per case of [`events`] for a coordinator that keeps an event
/// log.
///
/// `$factory` is an `async fn(Setup) -> Coordinated` building an isolated coordinator.
#[macro_export]
macro_rules! event_log_contract_tests {
    ($factory:path) => {
        $crate::event_log_contract_tests!(@cases $factory;
            events_are_read_back_in_order_after_any_id,
            a_retried_batch_is_added_once,
            several_turns_append_at_once,
            a_log_keeps_its_newest_events,
            forgetting_a_session_drops_its_turns_logs,
            a_log_is_read_only_by_its_turn,
            an_append_wakes_the_turns_watchers,
            a_log_expires_after_its_ttl
        );
    };
    (@cases $factory:path; $($case:ident),+) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::store::contract::events::$case(&$factory).await;
            }
        )+
    };
}

/// Expands to one `#[tokio::test]` per case of [`fused`] for a backend that owns both parts.
///
/// `$factory` is an `async fn(Setup) -> DynFused` building an isolated store.
#[macro_export]
macro_rules! fused_contract_tests {
    ($factory:path) => {
        $crate::fused_contract_tests!(@cases $factory;
            begin_turn_claims_records_and_reads_the_window,
            finish_turn_appends_and_frees_the_session,
            fenced_writes_are_refused_once_the_lease_is_lost,
            a_finished_turn_is_stored_once,
            the_window_holds_no_superseded_message,
            a_sessions_lock_and_keys_go_with_the_session
        );
    };
    (@cases $factory:path; $($case:ident),+) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::store::contract::fused::$case(&$factory).await;
            }
        )+
    };
}

/// Runs all three suites against a backend that owns both parts, each in its own module
/// (`conversation`, `coordination`, `fused`) of the module where it is called.
///
/// `$factory` is an `async fn(Setup) -> DynFused` building an isolated store, in scope where the
/// macro is called; `distributed` is what `is_distributed()` must answer; `ttl` (`true` or
/// `false`) says whether the backend supports session expiry.
#[macro_export]
macro_rules! store_contract_tests {
    ($factory:path, distributed = $distributed:expr, ttl = $ttl:tt) => {
        mod conversation {
            #[allow(unused_imports)]
            use super::*;

            async fn contract_history(setup: $crate::store::contract::Setup) -> $crate::store::DynStore {
                $factory(setup).await
            }

            $crate::conversation_contract_tests!(contract_history, distributed = $distributed, ttl = $ttl);
        }
        mod coordination {
            #[allow(unused_imports)]
            use super::*;

            async fn contract_coordinated(
                setup: $crate::store::contract::Setup,
            ) -> $crate::store::contract::Coordinated {
                $crate::store::contract::Coordinated::fused($factory(setup).await)
            }

            $crate::coordinator_contract_tests!(contract_coordinated, distributed = $distributed);
        }
        mod fused {
            #[allow(unused_imports)]
            use super::*;

            $crate::fused_contract_tests!($factory);
        }
    };
}
