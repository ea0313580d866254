//! What the Redis store keeps, as text: a message is its JSON (with the seq spliced in by the
//! append script), a turn its JSON, a session the fields of its meta hash, an idempotency key's
//! record a small JSON head beside the response's own JSON.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::{Message, Session};
use crate::store::{StoreError, StoreResult};

/// The message's JSON (serialized with seq 0) cut around its seq, so the append script can splice
/// in the seq it allocates. The top-level `seq` comes right after `id` and `session_id`, whose
/// JSON cannot contain an unescaped quote, so the first match is the field itself.
pub(super) fn split_at_seq(message: &mut Message) -> StoreResult<(String, String)> {
    const MARKER: &str = ",\"seq\":0,";
    message.seq = 0;
    let json = to_json(message)?;
    let at = json.find(MARKER).ok_or_else(|| StoreError::Backend("unexpected message encoding".into()))?;
    let cut = at + MARKER.len() - 2;
    Ok((json[..cut].to_owned(), json[cut + 1..].to_owned()))
}

/// What an idempotency key remembers besides the response (stored apart, so that the response's
/// JSON is kept byte for byte and never re-encoded by Lua).
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct IdemHead {
    pub(super) fingerprint: String,
    pub(super) turn_id: Uuid,
}

pub(super) fn parse_uuid(text: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(text).map_err(|_| StoreError::Backend("stored turn id is not a UUID".into()))
}

pub(super) fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Backend(format!("encoding JSON: {e}")))
}

pub(super) fn from_json<T: serde::de::DeserializeOwned>(json: &str) -> StoreResult<T> {
    serde_json::from_str(json).map_err(|e| StoreError::Backend(format!("stored JSON is invalid: {e}")))
}

pub(super) fn parse_messages(members: &[String]) -> StoreResult<Vec<Message>> {
    members.iter().map(|m| from_json(m)).collect()
}

/// A session from its meta hash; `None` when the hash is empty (no such session).
pub(super) fn parse_session(fields: HashMap<String, String>) -> StoreResult<Option<Session>> {
    if fields.is_empty() {
        return Ok(None);
    }
    let field = |name: &str| {
        fields.get(name).ok_or_else(|| StoreError::Backend(format!("session record lacks `{name}`")))
    };
    let number = |name: &str| {
        field(name)?
            .parse::<i64>()
            .map_err(|_| StoreError::Backend(format!("session `{name}` is not a number")))
    };
    Ok(Some(Session {
        id: field("id")?.clone(),
        created_at: micros_to_time(number("created_at")?)?,
        updated_at: micros_to_time(number("updated_at")?)?,
        system_prompt: fields.get("system_prompt").cloned(),
        metadata: from_json(field("metadata")?)?,
        message_count: u64::try_from(number("message_count")?).unwrap_or(0),
    }))
}

pub(super) fn micros_to_time(micros: i64) -> StoreResult<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| StoreError::Backend("timestamp out of range".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Role, new_id};

    #[test]
    fn the_seq_is_spliced_into_the_message_json() {
        let mut m = Message::new("s1", new_id(), Role::User, r#"he said ,"seq":0, twice"#);
        m.metadata.insert("seq".into(), serde_json::json!(0));
        let (head, tail) = split_at_seq(&mut m).unwrap();
        let back: Message = serde_json::from_str(&format!("{head}42{tail}")).unwrap();
        m.seq = 42;
        assert_eq!(back, m);
    }
}
