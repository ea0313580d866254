//! The statements the SQLite store sends, one file each in `sql/`. `?N` placeholders; times in µs
//! since the epoch, computed in Rust (one clock for leases, TTLs and the session order). What
//! each binds and returns is on its constant.

/// A live session. Binds: tenant, id, now.
pub const GET_SESSION: &str = include_str!("sql/get_session.sql");

/// The first page of the list. Binds: tenant, now, limit.
pub const LIST_FIRST: &str = include_str!("sql/list_sessions_first.sql");

/// A later page of the list. Binds: tenant, now, limit, cursor's updated_at, cursor's id.
pub const LIST_AFTER: &str = include_str!("sql/list_sessions_after.sql");

/// Counts a tenant's live sessions. Binds: tenant, now.
pub const COUNT_SESSIONS: &str = include_str!("sql/count_sessions.sql");

/// Deletes one session if it has expired. Binds: tenant, id, now.
pub const DROP_EXPIRED: &str = include_str!("sql/drop_expired_session.sql");

/// Deletes a session (cascading to its messages, turns, lock and keys); returns whether it was
/// live, or no row when there was none. Binds: tenant, id, now.
pub const DELETE_SESSION: &str = include_str!("sql/delete_session.sql");

/// Replaces a live session's metadata (not its `updated_at`) and slides its TTL. Binds: tenant,
/// id, metadata text, now, expires_at. Returns the session row, or no row when it is missing.
pub const SET_SESSION_METADATA: &str = include_str!("sql/set_session_metadata.sql");

/// Creates a session unless the id is taken (then no row). Binds: tenant, id, system prompt,
/// metadata, now, expires_at, message count, last seq, floor seq.
pub const CREATE_SESSION: &str = include_str!("sql/create_session.sql");

/// Writes one message. Binds: tenant, session, seq, then the message's columns.
pub const INSERT_MESSAGE: &str = include_str!("sql/insert_message.sql");

/// A live session's counters. Binds: tenant, id, now.
pub const SESSION_STATE: &str = include_str!("sql/session_state.sql");

/// Saves a session's counters after a write. Binds: tenant, id, last seq, floor seq, message
/// count, updated_at, expires_at.
pub const SAVE_STATE: &str = include_str!("sql/save_session_state.sql");

/// Whether a turn holds a session with a live lease. Binds: tenant, session, turn, now.
pub const FENCE: &str = include_str!("sql/fence.sql");

/// Moves active messages from a seq on to the superseded ones. Binds: tenant, session, from
/// seq, the superseding turn.
pub const SUPERSEDE: &str = include_str!("sql/supersede_messages.sql");

/// Deletes active messages from a seq on. Binds: tenant, session, from seq.
pub const DELETE_FROM: &str = include_str!("sql/delete_messages_from.sql");

/// Deletes active messages up to a seq. Binds: tenant, session, seq.
pub const TRIM: &str = include_str!("sql/trim_messages.sql");

/// Deletes superseded messages up to a seq. Binds: tenant, session, seq.
pub const TRIM_SUPERSEDED: &str = include_str!("sql/trim_superseded.sql");

/// Creates or replaces a turn record, unless it is terminal already. Binds: tenant, session,
/// id, status, error, message ids, usage, created_at, completed_at.
pub const PUT_TURN: &str = include_str!("sql/put_turn.sql");

/// Keeps the newest `cap` turn records (the given turn among them). Binds: tenant, session,
/// turn, cap.
pub const TRIM_TURNS: &str = include_str!("sql/trim_turns.sql");

/// A turn record of a live session. Binds: tenant, session, turn, now.
pub const GET_TURN: &str = include_str!("sql/get_turn.sql");

/// A page of active messages, oldest first. Binds: tenant, session, above seq, below seq, limit.
pub const PAGE_ASC: &str = include_str!("sql/page_asc.sql");

/// [`PAGE_ASC`], newest first.
pub const PAGE_DESC: &str = include_str!("sql/page_desc.sql");

/// [`PAGE_ASC`] over active and superseded messages.
pub const PAGE_ALL_ASC: &str = include_str!("sql/page_with_superseded_asc.sql");
/// [`PAGE_DESC`] over active and superseded messages.
pub const PAGE_ALL_DESC: &str = include_str!("sql/page_with_superseded_desc.sql");

/// The messages of one turn above the floor, active and superseded, in seq order (searches of
/// `messages_turn_idx` and `superseded_messages_turn_idx`, migration 0002). Binds: tenant,
/// session, turn id, floor seq.
pub const TURN_MESSAGES: &str = include_str!("sql/turn_messages.sql");

/// The lock row of a session. Binds: tenant, session.
pub const LOCK_ROW: &str = include_str!("sql/lock_row.sql");

/// Claims a session for a turn. Binds: tenant, session, turn, expires_at, cancel flag kept.
pub const TAKE_LOCK: &str = include_str!("sql/take_lock.sql");

/// Extends a held lease. Binds: tenant, session, turn, now, new expires_at. Returns the cancel flag.
pub const RENEW_LOCK: &str = include_str!("sql/renew_lock.sql");

/// Releases the lock if the turn holds it. Binds: tenant, session, turn.
pub const RELEASE_LOCK: &str = include_str!("sql/release_lock.sql");

/// The turn holding a live session (null: none; no row: no session). Binds: tenant, session, now.
pub const LOCK_HOLDER: &str = include_str!("sql/lock_holder.sql");

/// Flags a cancel request. Binds: tenant, session, turn, now.
pub const CANCEL: &str = include_str!("sql/request_cancel.sql");

/// Forgets a session's expired keys. Binds: tenant, session, now.
pub const PURGE_KEYS: &str = include_str!("sql/purge_expired_keys.sql");

/// A live key. Binds: tenant, session, key, now.
pub const GET_KEY: &str = include_str!("sql/get_key.sql");

/// Remembers a key. Binds: tenant, session, key, fingerprint, turn, expires_at.
pub const PUT_KEY: &str = include_str!("sql/put_key.sql");

/// Saves a live key's answer and restarts its ttl. Binds: tenant, session, key, response,
/// now, expires_at.
pub const COMPLETE_KEY: &str = include_str!("sql/complete_key.sql");

/// Forgets a key. Binds: tenant, session, key.
pub const ABORT_KEY: &str = include_str!("sql/abort_key.sql");

/// Deletes up to `?2` expired sessions. Binds: now, batch.
pub const SWEEP: &str = include_str!("sql/sweep_expired_sessions.sql");

/// Deletes up to `?2` expired idempotency keys. Binds: now, batch.
pub const SWEEP_IDEMPOTENCY: &str = include_str!("sql/sweep_expired_keys.sql");
