//! The Redis store's key layout: every key a session owns, and how they are named.
//!
//! With prefix `P`, tenant `T` and session `S` (both percent-encoded outside `[A-Za-z0-9._:-]`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:{T/S}:meta` | hash | `id`, `created_at`/`updated_at` (µs), `system_prompt` (absent when none), `metadata` (JSON), `message_count`, `last_seq`, `turn_seq`, `turn_index` (`1`: `turn_msgs` holds every turn) |
//! | `P:{T/S}:messages` | zset | score = seq, member = the message's JSON |
//! | `P:{T/S}:turns` | hash | turn id → the turn's JSON |
//! | `P:{T/S}:turn_order` | zset | turn id scored by first-save order, to drop the oldest turns under the cap |
//! | `P:{T/S}:lock` | hash | the turn lock: `turn` (holder's id), `cancel` (`0`/`1`); expires with its lease |
//! | `P:{T/S}:idem` | hash | idempotency keys: `f:<key>` → `{"fingerprint","turn_id"}`, `r:<key>` → the response JSON |
//! | `P:{T/S}:idem_exp` | zset | idempotency key scored by when it is forgotten (Redis server time, ms) |
//! | `P:{T/S}:superseded` | zset | messages an edit replaced: score = seq, member = the message's JSON with `superseded_by` |
//! | `P:{T/S}:turn_msgs` | hash | turn id → `lo hi n`: the lowest and highest seq of the turn's messages and how many are held (active or superseded) |
//! | `P:{T/S}:queue` | zset | turns waiting for the session (`if_busy: wait`), scored by arrival (server µs) |
//! | `P:{T/S}:queue_exp` | zset | when each waiting turn's place lapses unless renewed (server ms) |
//! | `P:{T}:sessions` | zset | the tenant's index: session id scored by `updated_at` (µs) |
//! | `P:{T/S}:event_logs` | set | the turns of the session with an event log, added by each append, expiring `PARLEY_EVENT_TTL` after the last one (dropped with their logs when the session is deleted or cleared) |
//! | `P:{T/S}:events:<turn>` | stream | a running turn's events, an entry per append (`<last event id>-0` → event id, event, event id, event…), expiring `PARLEY_EVENT_TTL` after its last append |
//!
//! Appends to event logs are announced on the channel `P:events` (payload: the turn ids, comma-separated).
//!
//! The `{T/S}` hash tag puts every key of one session in one Redis Cluster slot. The seq counter
//! (`last_seq`) lives in the meta hash, so `clear` (which only drops `messages`) keeps it.
//!
//! Key names are formed here only, never in handlers.

/// Every key of one session; they share the `{tenant/session}` hash tag (the index excepted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SessionKeys {
    pub(super) meta: String,
    pub(super) messages: String,
    pub(super) turns: String,
    pub(super) turn_order: String,
    /// The tenant's sessions index (another slot).
    pub(super) index: String,
    /// The turn lock: hash `turn`, `cancel`, expiring with its lease.
    pub(super) lock: String,
    /// Idempotency records: hash `f:<key>` → fingerprint and turn, `r:<key>` → response.
    pub(super) idem: String,
    /// When each idempotency key is forgotten: zset key → server time in ms.
    pub(super) idem_exp: String,
    /// Messages an edit replaced: zset seq → message JSON with `superseded_by`, apart from the
    /// active `messages`, so that active reads never skip them.
    pub(super) superseded: String,
    /// Where each turn's messages are: hash turn id → `lo hi n` (lowest seq, highest seq, how
    /// many are held), kept by the scripts that add and drop messages.
    pub(super) turn_msgs: String,
    /// Turns waiting for the session (`if_busy: wait`): zset turn id → arrival (server µs).
    pub(super) queue: String,
    /// When each waiting turn's place lapses unless renewed: zset turn id → server ms.
    pub(super) queue_exp: String,
}

impl SessionKeys {
    pub(super) fn new(prefix: &str, tenant: &str, id: &str) -> Self {
        let base = format!("{prefix}:{{{}/{}}}", encode_key_part(tenant), encode_key_part(id));
        SessionKeys {
            meta: format!("{base}:meta"),
            messages: format!("{base}:messages"),
            turns: format!("{base}:turns"),
            turn_order: format!("{base}:turn_order"),
            index: index_key(prefix, tenant),
            lock: format!("{base}:lock"),
            idem: format!("{base}:idem"),
            idem_exp: format!("{base}:idem_exp"),
            superseded: format!("{base}:superseded"),
            turn_msgs: format!("{base}:turn_msgs"),
            queue: format!("{base}:queue"),
            queue_exp: format!("{base}:queue_exp"),
        }
    }

    /// In the order the write scripts expect them as `KEYS`.
    pub(super) fn all(&self) -> [&str; 10] {
        [
            &self.meta,
            &self.messages,
            &self.turns,
            &self.turn_order,
            &self.index,
            &self.lock,
            &self.idem,
            &self.idem_exp,
            &self.superseded,
            &self.turn_msgs,
        ]
    }
}

/// A turn's event log (a stream), in its session's hash slot.
pub(super) fn events_key(prefix: &str, tenant: &str, session: &str, turn_id: uuid::Uuid) -> String {
    format!("{}{turn_id}", events_key_prefix(prefix, tenant, session))
}

/// What the event logs of a session's turns are named with, before the turn id.
pub(super) fn events_key_prefix(prefix: &str, tenant: &str, session: &str) -> String {
    format!("{prefix}:{{{}/{}}}:events:", encode_key_part(tenant), encode_key_part(session))
}

/// The set of a session's turns that have an event log (for dropping them with the session).
pub(super) fn event_logs_key(prefix: &str, tenant: &str, session: &str) -> String {
    format!("{prefix}:{{{}/{}}}:event_logs", encode_key_part(tenant), encode_key_part(session))
}

/// The pub/sub channel where appends to every turn's event log are announced.
pub(super) fn events_channel(prefix: &str) -> String {
    format!("{prefix}:events")
}

/// The tenant's sessions index, scored by `updated_at`.
pub(super) fn index_key(prefix: &str, tenant: &str) -> String {
    format!("{prefix}:{{{}}}:sessions", encode_key_part(tenant))
}

/// Percent-encodes every byte outside `[A-Za-z0-9._:-]`, so that tenants and ids can neither end
/// the hash tag early (`}`), forge the tenant/session separator (`/`) nor act as SCAN glob syntax.
fn encode_key_part(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    for b in part.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_session_shares_one_hash_tag() {
        let keys = SessionKeys::new("p", "acme", "chat:1");
        assert_eq!(keys.meta, "p:{acme/chat:1}:meta");
        assert_eq!(keys.messages, "p:{acme/chat:1}:messages");
        assert_eq!(keys.turns, "p:{acme/chat:1}:turns");
        assert_eq!(keys.turn_order, "p:{acme/chat:1}:turn_order");
        assert_eq!(keys.index, "p:{acme}:sessions");
        assert_eq!(keys.lock, "p:{acme/chat:1}:lock");
        assert_eq!(keys.idem, "p:{acme/chat:1}:idem");
        assert_eq!(keys.idem_exp, "p:{acme/chat:1}:idem_exp");
        assert_eq!(keys.turn_msgs, "p:{acme/chat:1}:turn_msgs");
    }

    #[test]
    fn tenants_cannot_break_out_of_the_hash_tag() {
        let keys = SessionKeys::new("p", "a}b/c*", "s");
        assert_eq!(keys.meta, "p:{a%7Db%2Fc%2A/s}:meta");
        assert_ne!(SessionKeys::new("p", "a/b", "c").meta, SessionKeys::new("p", "a", "b/c").meta);
    }
}
