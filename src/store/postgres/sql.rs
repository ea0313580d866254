//! The statements the PostgreSQL store sends, one file each in `sql/` (public so that tests and the
//! benchmark's floor can `EXPLAIN` and run them). `$N` placeholders; what each binds and returns is
//! on its constant. The append and the end of a turn share one statement body
//! (`append_writes.sql`, then `append_result.sql`); ending a turn adds the release of its lock.
//!
//! Every read filters on the live session (`expires_at is null or expires_at > now()`), and every
//! turn insert keeps a terminal record as it is (`on conflict … where turns.status = 'running'`).
/// One page, oldest first. Binds: tenant, session, after, before, limit.
pub const PAGE_ASC: &str = include_str!("sql/page_asc.sql");
/// One page (or the last N), newest first. Binds: tenant, session, after, before, limit.
pub const PAGE_DESC: &str = include_str!("sql/page_desc.sql");
/// [`PAGE_ASC`] over active and superseded messages together.
pub const PAGE_ALL_ASC: &str = include_str!("sql/page_with_superseded_asc.sql");
/// [`PAGE_DESC`] over active and superseded messages together.
pub const PAGE_ALL_DESC: &str = include_str!("sql/page_with_superseded_desc.sql");
/// The messages of one turn, active and superseded, in seq order (index scans of
/// `messages_turn_idx` and `superseded_messages_turn_idx`, migration 0004). Binds: tenant,
/// session, turn id. No row when the session is missing; one row of null message columns when
/// the turn has no message.
pub const TURN_MESSAGES: &str = include_str!("sql/turn_messages.sql");

/// Creates a session. Binds: tenant, id, system prompt, metadata text, ttl in µs.
pub const CREATE_SESSION: &str = include_str!("sql/create_session.sql");

/// Serialises a tenant's capped session creations until the transaction ends. Binds: tenant.
pub const LOCK_TENANT_CREATIONS: &str = include_str!("sql/lock_tenant_creations.sql");

/// Deletes one session if it has expired. Binds: tenant, id.
pub const DROP_EXPIRED: &str = include_str!("sql/drop_expired_session.sql");

/// Reads a live session. Binds: tenant, id.
pub const GET_SESSION: &str = include_str!("sql/get_session.sql");

/// The first page of the session list. Binds: tenant, limit.
pub const LIST_FIRST: &str = include_str!("sql/list_sessions_first.sql");

/// A later page of the session list. Binds: tenant, limit, cursor's updated_at, cursor's id.
pub const LIST_AFTER: &str = include_str!("sql/list_sessions_after.sql");

/// Replaces a live session's metadata (not its `updated_at`) and slides its TTL. Binds: tenant,
/// id, metadata text, ttl in µs.
pub const SET_SESSION_METADATA: &str = include_str!("sql/set_session_metadata.sql");

/// Deletes a session (cascading to its messages and turns); returns whether it was live.
/// Binds: tenant, id.
pub const DELETE_SESSION: &str = include_str!("sql/delete_session.sql");

/// The whole append in one statement. Binds: $1 tenant, $2 session, $3 batch size, $4 cap
/// (null: none), $5 ttl in µs (null: none), $6..$14 the message columns, $15..$21 the turn
/// (null id: no turn), $22 the fencing turn (null: none). Returns one row: the session's new
/// `last_seq` (null when nothing was written) and whether the session is live (`found`); a
/// live session with a null `last_seq` means the fence refused the write.
///
/// `fence` row-locks the fencing turn's lock if it still holds it with a live lease, so no
/// other turn can take the session before this statement commits; `s` (only if the fence
/// held) row-locks the session and takes the next seqs; `ins` writes the batch (skipping what the
/// cap would drop at once); `trimmed` deletes what fell out of the window; `saved_turn` upserts the
/// turn. Rows that a concurrent appender committed after this statement's snapshot are
/// invisible to `trimmed`; they are outside the window already and the next trim deletes them.
/// Without a cap, `trimmed` stops at a one-time filter on `$4`: a generic plan cached while
/// the table was small would otherwise scan every message of every session on each append
/// (the benchmark's growth figure caught appends at 80 ms on a 100,000-message table).
pub const APPEND: &str =
    concat!(include_str!("sql/append_writes.sql"), include_str!("sql/append_result.sql"));

/// Ends a turn: [`APPEND`] fenced by the turn, plus the release of its session lock, in the
/// same statement. Binds: those of [`APPEND`], with $22 the turn.
pub const FINISH_TURN: &str = concat!(
    include_str!("sql/append_writes.sql"),
    ", released as (delete from turn_locks l using s where l.tenant = $1 and l.session_id = $2 and l.turn_id = $22::uuid)\n",
    include_str!("sql/append_result.sql")
);

/// Starts a turn in one statement: claims the live session's lock for the turn (as
/// [`ACQUIRE_LOCK`]), records the turn when it got it (as [`PUT_TURN`]), and reads the
/// system prompt and the last messages. Binds: $1 tenant, $2 session, $3 turn id, $4 lease
/// in µs, $5 window size, $6..$11 the turn's status, error, message ids, usage, created_at,
/// completed_at. Returns one row per message of the window, oldest first (or one row of
/// null message columns), each with `found`, `acquired`, `holder` and `system_prompt`.
pub const BEGIN_TURN: &str = include_str!("sql/begin_turn.sql");

/// Empties a live session's window and returns its `last_seq`. Binds: tenant, id, ttl in µs.
pub const CLEAR_SESSION: &str = include_str!("sql/clear_session.sql");

/// Deletes the messages a clear gave up. Binds: tenant, session, last seq.
pub const CLEAR_MESSAGES: &str = include_str!("sql/clear_messages.sql");

/// Creates a session holding a fork's messages, in the transaction that counted the tenant's
/// sessions. Binds: tenant, id, system prompt, metadata text, ttl in µs, message count, the
/// number kept (the cap). Returns the session row, or no row when the id is taken.
pub const CREATE_SESSION_HOLDING: &str = include_str!("sql/create_session_holding.sql");

/// Writes a fork's messages with seqs from 1, skipping those under the floor. Binds: tenant,
/// session, floor seq, then the message columns as [`APPEND`]'s $6..$14.
pub const INSERT_MESSAGES: &str = include_str!("sql/insert_messages.sql");

/// Creates or replaces a turn of a live session (a terminal record stays as it is). Binds:
/// tenant, session, then the turn's fields. Returns whether the session is live.
pub const PUT_TURN: &str = include_str!("sql/put_turn.sql");

/// Reads a turn of a live session. Binds: tenant, session, turn id.
pub const GET_TURN: &str = include_str!("sql/get_turn.sql");

/// Claims a live session for a turn: inserts the lock, or takes over a row whose lease ran out
/// (or that the same turn holds, keeping its cancel flag). Binds: tenant, session, turn id,
/// lease in µs. Returns one row: whether the session is live, whether the turn got the lock,
/// and the holder this statement's snapshot saw (the other turn, when it did not).
pub const ACQUIRE_LOCK: &str = include_str!("sql/acquire_lock.sql");

/// Extends the lease of the turn holding a live session. Binds: tenant, session, turn id, lease
/// in µs. Returns `cancel_requested`, or no row when the turn does not hold the session.
pub const RENEW_LOCK: &str = include_str!("sql/renew_lock.sql");

/// Extends the leases of many turns at once. Binds: tenants, sessions, turn ids (arrays of one
/// length), lease in µs. Returns `(ord, cancel_requested)` for each turn that still holds its
/// live session, `ord` being its 1-based position in the arrays.
pub const RENEW_LOCKS: &str = include_str!("sql/renew_locks.sql");

/// Deletes the lock if the turn holds it. Binds: tenant, session, turn id.
pub const RELEASE_LOCK: &str = include_str!("sql/release_lock.sql");

/// The turn holding a live session. Binds: tenant, session. No row when the session is missing;
/// a null `turn_id` when no turn holds it.
pub const LOCK_HOLDER: &str = include_str!("sql/lock_holder.sql");

/// Flags a cancel request if the turn holds the live session. Binds: tenant, session, turn id.
/// Returns whether the session is live and whether the flag was set.
pub const CANCEL_LOCK: &str = include_str!("sql/cancel_lock.sql");

/// Remembers an idempotency key of a live session unless a live record has it, and deletes the
/// session's other expired keys. Binds: tenant, session, key, fingerprint, turn id, ttl in µs.
/// Returns one row: whether the session is live, whether the key was stored, and the live
/// record this statement's snapshot saw (null when none).
pub const BEGIN_IDEMPOTENT: &str = include_str!("sql/begin_idempotent.sql");

/// Saves the response of a live idempotency key and restarts its ttl. Binds: tenant, session,
/// key, response JSON text, ttl in µs. Returns whether the session is live.
pub const COMPLETE_IDEMPOTENT: &str = include_str!("sql/complete_idempotent.sql");

/// Forgets an idempotency key. Binds: tenant, session, key.
pub const ABORT_IDEMPOTENT: &str = include_str!("sql/abort_idempotent.sql");

/// Deletes up to `$1` expired idempotency keys, skipping rows others hold.
pub const SWEEP_IDEMPOTENCY: &str = include_str!("sql/sweep_expired_keys.sql");
/// Counts a tenant's live sessions (an index-only range of `sessions_list_idx`, mostly).
/// Binds: tenant.
pub const COUNT_SESSIONS: &str = include_str!("sql/count_sessions.sql");

/// Deletes up to `$1` expired sessions, skipping rows other sweepers hold.
pub const SWEEP: &str = include_str!("sql/sweep_expired_sessions.sql");

/// Appends a batch of events of each of several turns (a row per turn; a batch already held is
/// skipped), keeps each turn's log `$4` µs from now, drops its batches beyond the per-turn bound
/// and announces the turns in one notification. Binds: see the file.
pub const APPEND_EVENTS: &str = include_str!("sql/append_events.sql");

/// The batches of a turn's log that end after an id, in order. Binds: turn id, tenant, session,
/// after, limit.
pub const READ_EVENTS: &str = include_str!("sql/read_events.sql");

/// Drops the event logs of a session's turns (their batches go with them). Binds: tenant, session.
pub const FORGET_EVENT_LOGS: &str = include_str!("sql/forget_event_logs.sql");

/// Deletes up to `$1` expired turn event logs (their events with them), skipping rows others hold.
pub const SWEEP_EVENT_LOGS: &str = include_str!("sql/sweep_expired_event_logs.sql");

/// Takes (or renews) a turn's place in its session's wait queue. Binds: tenant, session, turn
/// id, lease in µs.
pub const JOIN_QUEUE: &str = include_str!("sql/join_queue.sql");

/// Drops the session's lapsed places, renews the turn's own (joining again at the end if it had
/// lapsed), and answers whether no live place comes before it. Binds as [`JOIN_QUEUE`].
pub const FIRST_IN_QUEUE: &str = include_str!("sql/first_in_queue.sql");

/// Leaves the wait queue. Binds: tenant, session, turn id.
pub const LEAVE_QUEUE: &str = include_str!("sql/leave_queue.sql");

/// Deletes up to `$1` lapsed wait queue places (of sessions nobody waits for any more).
pub const SWEEP_QUEUE: &str = include_str!("sql/sweep_lapsed_queue_places.sql");
