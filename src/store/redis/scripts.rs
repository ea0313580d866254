//! The Lua scripts of the Redis store, one file each in `scripts/`, and their loading.
//!
//! Every write is one script, so that it is atomic and one round trip. The write scripts share
//! `write_prelude.lua` (the session's keys and arguments, `refresh`, `touch`, `save_turn`) and the
//! idempotency scripts `idempotency_prelude.lua` (the server clock, `forget_expired`): each is
//! loaded as prelude + body. What each script takes (`KEYS`, `ARGV`) and answers is on its
//! constant below.

use deadpool_redis::redis::Script;

/// Lua shared by the write scripts. `KEYS` is always `meta, messages, turns, turn_order, index,
/// lock, idem, idem_exp, superseded, turn_msgs`;
/// `ARGV` starts with `session id, now (µs), ttl (ms, 0 = none), cap (0 = none)`. Besides the
/// helpers it keeps `turn_msgs` (`index_turns` for added messages, `drop_oldest` for what the cap
/// drops), so that [`TURN_MESSAGES`] finds a turn without reading the history.
///
/// Timestamps stay strings in Lua: its numbers print with 14 digits, and µs since the epoch have 16.
const PRELUDE: &str = include_str!("scripts/write_prelude.lua");

/// Creates the session unless it exists or the tenant holds `max` sessions already. ARGV 5..: max
/// (0 = no limit), metadata JSON, `1` + prompt or `0`. Returns 1, 0 when the session exists, or -1
/// at the limit. Counting as `count_sessions` does (live index members), in the same script as the
/// creation, is what keeps concurrent creations from overshooting the limit.
const CREATE: &str = include_str!("scripts/create_session.lua");

/// Appends a batch. ARGV 5..: the fencing turn (empty = none), `1` to release its lock with the
/// batch, turn id (empty = none), turn JSON, the seq from which active messages become superseded
/// by that turn (empty = none), then per message the JSON before and after its seq. Returns the
/// first seq, 0 when the session does not exist, or -1 when the fencing turn does not hold the
/// session (nothing written; an expired lease has no lock key, so it holds nothing).
const APPEND: &str = include_str!("scripts/append.lua");

/// Creates a session holding messages (what a fork writes), as [`CREATE`] does, then adds the
/// messages with seqs from 1. ARGV 5..: max, metadata JSON, `1`/`0` has a prompt, the prompt
/// (empty when none), then per message the JSON before and after its seq. Returns as `CREATE`.
const CREATE_WITH: &str = include_str!("scripts/create_session_with.lua");

/// One page by seq over active and superseded messages together. KEYS: meta, messages,
/// superseded. ARGV as [`READ_PAGE`]. Takes up to limit + 1 from each set and merges them by seq.
const READ_PAGE_ALL: &str = include_str!("scripts/read_page_all.lua");

/// Starts a turn: claims the session unless another turn holds it, records the turn, and reads
/// the window and the system prompt. ARGV 5..: turn id, turn JSON, lease (ms), window size.
/// Returns nil when the session is missing, else `{acquired (0/1), holder when busy, window,
/// has prompt (0/1), prompt}`. A holder renewing its claim keeps its cancel flag.
const BEGIN_TURN: &str = include_str!("scripts/begin_turn.lua");

/// Drops every message, keeping the session and its seq counter. Returns 1, or 0 when missing.
const CLEAR: &str = include_str!("scripts/clear.lua");

/// Saves a turn record. ARGV 5..: turn id, turn JSON. Returns 1, or 0 when the session is missing.
const PUT_TURN: &str = include_str!("scripts/put_turn.lua");

/// Deletes every key of the session and its index entry. Returns 1 if the session existed.
const DELETE: &str = include_str!("scripts/delete_session.lua");

/// Replaces the session's metadata, leaving `updated_at` and the index alone. ARGV 5: metadata
/// JSON. Returns the meta hash, or nothing when the session is missing.
const SET_METADATA: &str = include_str!("scripts/set_metadata.lua");

/// One page by seq. KEYS: meta, messages. ARGV: min, max (ZRANGE BYSCORE bounds), `asc`/`desc`,
/// limit. Returns nil when the session is missing, else `{has_more, members}`.
const READ_PAGE: &str = include_str!("scripts/read_page.lua");

/// The messages of one turn, active and superseded (in no particular order: the caller sorts
/// them by seq). KEYS: meta, messages, superseded, turn_msgs. ARGV: turn id. Returns nil when the
/// session is missing. Reads the turn's seq span from `turn_msgs` and only that span of each
/// set, keeping the members of the turn: O(the turn's messages) when they are contiguous, as a
/// turn holding the session makes them. A session from before `turn_msgs` (no `turn_index` in its
/// meta) has no entries for its older turns: both sets are scanned instead.
const TURN_MESSAGES: &str = include_str!("scripts/turn_messages.lua");

/// The last n messages, oldest first. KEYS: meta, messages. ARGV: n, -n.
/// Returns nil when the session is missing.
const LAST_N: &str = include_str!("scripts/last_n.lua");

/// Drops index members whose session is gone, unless their score moved since it was read (the
/// session was written or re-created meanwhile). KEYS: index. ARGV: id, score, id, score…
const DROP_STALE: &str = include_str!("scripts/drop_stale_index_entries.lua");

/// Claims the session for a turn. KEYS: meta, lock. ARGV: turn id, lease (ms).
/// Returns nil when the session is missing, else the turn holding it after the call (the caller's
/// own id when it got or already had the lock). A holder renewing its claim keeps its cancel flag.
const ACQUIRE_LOCK: &str = include_str!("scripts/acquire_lock.lua");

/// Extends the lease of the turn holding the session. KEYS: meta, lock. ARGV: turn id, lease (ms).
/// Returns `{held, cancel_requested}` as 0/1.
pub(super) const RENEW_LOCK: &str = include_str!("scripts/renew_lock.lua");

/// Deletes the lock if the turn holds it. KEYS: lock. ARGV: turn id. Returns 1 if it did.
const RELEASE_LOCK: &str = include_str!("scripts/release_lock.lua");

/// The turn holding the session. KEYS: meta, lock. Returns nil when the session is missing, the
/// empty string when no turn holds it.
const LOCK_HOLDER: &str = include_str!("scripts/lock_holder.lua");

/// Flags a cancel request on the lock if the turn holds it. KEYS: meta, lock. ARGV: turn id.
/// Returns -1 when the session is missing, 1 if flagged, 0 if the turn does not hold the session.
const CANCEL_LOCK: &str = include_str!("scripts/cancel_lock.lua");

/// Lua shared by the idempotency scripts. KEYS: meta, idem, idem_exp. `idem` holds per key
/// `f:<key>` (fingerprint and turn, JSON) and, once completed, `r:<key>` (the response JSON);
/// `idem_exp` scores each key by when it is forgotten (server ms). Both go when the session goes,
/// and expire when the session or their last record does.
const IDEMPOTENCY_PRELUDE: &str = include_str!("scripts/idempotency_prelude.lua");

/// Remembers a key unless it is remembered. ARGV: key, record JSON, ttl (ms). Returns nil when
/// the session is missing, `{}` when the key was new, else `{record, response or nil}`.
const BEGIN_IDEM: &str = include_str!("scripts/begin_idempotent.lua");

/// Saves the response of a remembered key and restarts its ttl. ARGV: key, response JSON, ttl
/// (ms). Returns -1 when the session is missing, 1 if saved, 0 if the key is not remembered.
const COMPLETE_IDEM: &str = include_str!("scripts/complete_idempotent.lua");

/// Forgets a key. ARGV: key. Returns 1 if it was remembered.
const ABORT_IDEM: &str = include_str!("scripts/abort_idempotent.lua");

/// Lua shared by the wait queue scripts (`if_busy: wait` across replicas): the server clock and
/// `hold_place`. KEYS: queue, queue_exp. ARGV: turn id, lease (ms).
const QUEUE_PRELUDE: &str = include_str!("scripts/queue_prelude.lua");

/// Takes the turn's place at the end of the queue (or keeps and renews it). Returns 1.
const JOIN_QUEUE: &str = include_str!("scripts/join_queue.lua");

/// Drops lapsed places, renews the turn's own (joining again at the end if it had lapsed), and
/// returns 1 if the turn is first, else 0.
const FIRST_IN_QUEUE: &str = include_str!("scripts/first_in_queue.lua");

/// Leaves the queue. Returns 1.
const LEAVE_QUEUE: &str = include_str!("scripts/leave_queue.lua");

/// Drops the event logs of a session's turns, and their set. Returns how many turns it listed.
const FORGET_EVENT_LOGS: &str = include_str!("scripts/forget_event_logs.lua");

/// Every script, loaded on first use (`EVALSHA`, then `SCRIPT LOAD` on `NOSCRIPT`): the write
/// scripts with [`PRELUDE`] in front, the idempotency ones with [`IDEMPOTENCY_PRELUDE`].
pub(super) struct Scripts {
    pub(super) create: Script,
    pub(super) create_with: Script,
    pub(super) append: Script,
    pub(super) begin_turn: Script,
    pub(super) clear: Script,
    pub(super) put_turn: Script,
    pub(super) delete: Script,
    pub(super) set_metadata: Script,
    pub(super) read_page: Script,
    pub(super) read_page_all: Script,
    pub(super) last_n: Script,
    pub(super) turn_messages: Script,
    pub(super) drop_stale: Script,
    pub(super) acquire_lock: Script,
    pub(super) renew_lock: Script,
    pub(super) release_lock: Script,
    pub(super) lock_holder: Script,
    pub(super) cancel_lock: Script,
    pub(super) begin_idem: Script,
    pub(super) complete_idem: Script,
    pub(super) abort_idem: Script,
    pub(super) join_queue: Script,
    pub(super) first_in_queue: Script,
    pub(super) leave_queue: Script,
    pub(super) forget_event_logs: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        let write = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        let idem = |body: &str| Script::new(&format!("{IDEMPOTENCY_PRELUDE}{body}"));
        Scripts {
            create: write(CREATE),
            create_with: write(CREATE_WITH),
            append: write(APPEND),
            begin_turn: write(BEGIN_TURN),
            clear: write(CLEAR),
            put_turn: write(PUT_TURN),
            delete: write(DELETE),
            set_metadata: write(SET_METADATA),
            read_page: Script::new(READ_PAGE),
            read_page_all: Script::new(READ_PAGE_ALL),
            last_n: Script::new(LAST_N),
            turn_messages: Script::new(TURN_MESSAGES),
            drop_stale: Script::new(DROP_STALE),
            acquire_lock: Script::new(ACQUIRE_LOCK),
            renew_lock: Script::new(RENEW_LOCK),
            release_lock: Script::new(RELEASE_LOCK),
            lock_holder: Script::new(LOCK_HOLDER),
            cancel_lock: Script::new(CANCEL_LOCK),
            begin_idem: idem(BEGIN_IDEM),
            complete_idem: idem(COMPLETE_IDEM),
            abort_idem: idem(ABORT_IDEM),
            join_queue: Script::new(&format!("{QUEUE_PRELUDE}{JOIN_QUEUE}")),
            first_in_queue: Script::new(&format!("{QUEUE_PRELUDE}{FIRST_IN_QUEUE}")),
            leave_queue: Script::new(LEAVE_QUEUE),
            forget_event_logs: Script::new(FORGET_EVENT_LOGS),
        }
    }
}
