//! Rows of the PostgreSQL store to domain values and back: a session, message or turn from its
//! row, and a batch of messages split into one array per column for `unnest`.

use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use uuid::Uuid;

use crate::domain::{Message, Metadata, Session, ToolCall, Turn, Usage};
use crate::store::sql_common::{json_text, parse_role, parse_status, to_u64};
use crate::store::{IdempotencyBegin, IdempotencyRecord, StoreError, StoreResult};

pub(super) fn decode(error: sqlx::Error) -> StoreError {
    StoreError::Backend(format!("unexpected row from PostgreSQL: {error}"))
}

pub(super) fn session_from_row(row: &PgRow) -> StoreResult<Session> {
    let metadata: Json<Metadata> = row.try_get("metadata").map_err(decode)?;
    let count: i64 = row.try_get("message_count").map_err(decode)?;
    Ok(Session {
        id: row.try_get("id").map_err(decode)?,
        created_at: row.try_get("created_at").map_err(decode)?,
        updated_at: row.try_get("updated_at").map_err(decode)?,
        system_prompt: row.try_get("system_prompt").map_err(decode)?,
        metadata: metadata.0,
        message_count: to_u64(count),
    })
}

/// The message of a `left join lateral` row, or `None` when the session has none.
pub(super) fn message_from_row(row: &PgRow, session_id: &str) -> StoreResult<Option<Message>> {
    let Some(seq) = row.try_get::<Option<i64>, _>("seq").map_err(decode)? else {
        return Ok(None);
    };
    let role: String = row.try_get("role").map_err(decode)?;
    let metadata: Json<Metadata> = row.try_get("metadata").map_err(decode)?;
    let tool_calls: Option<Json<Vec<ToolCall>>> = row.try_get("tool_calls").map_err(decode)?;
    Ok(Some(Message {
        id: row.try_get("id").map_err(decode)?,
        session_id: session_id.to_owned(),
        seq: to_u64(seq),
        turn_id: row.try_get("turn_id").map_err(decode)?,
        role: parse_role(&role, "PostgreSQL")?,
        content: row.try_get("content").map_err(decode)?,
        metadata: metadata.0,
        tool_calls: tool_calls.map(|c| c.0),
        tool_call_id: row.try_get("tool_call_id").map_err(decode)?,
        name: row.try_get("name").map_err(decode)?,
        created_at: row.try_get("created_at").map_err(decode)?,
        // Only the superseded view selects the column.
        superseded_by: row.try_get::<Option<Uuid>, _>("superseded_by").unwrap_or(None),
    }))
}

pub(super) fn turn_from_row(row: &PgRow, session_id: &str) -> StoreResult<Turn> {
    let status: String = row.try_get("status").map_err(decode)?;
    let error: Option<Json<serde_json::Value>> = row.try_get("error").map_err(decode)?;
    let usage: Option<Json<Usage>> = row.try_get("usage").map_err(decode)?;
    Ok(Turn {
        id: row.try_get("id").map_err(decode)?,
        session_id: session_id.to_owned(),
        status: parse_status(&status, "PostgreSQL")?,
        error: error.map(|e| e.0),
        message_ids: row.try_get("message_ids").map_err(decode)?,
        usage: usage.map(|u| u.0),
        created_at: row.try_get("created_at").map_err(decode)?,
        completed_at: row.try_get("completed_at").map_err(decode)?,
    })
}

/// An existing idempotency record from its columns (the response as stored JSON text).
pub(super) fn idempotency_record(
    fingerprint: String,
    turn_id: Uuid,
    response: Option<String>,
) -> StoreResult<IdempotencyBegin> {
    let response = response
        .map(|text| serde_json::from_str(&text))
        .transpose()
        .map_err(|e| StoreError::Backend(format!("stored idempotent response is not JSON: {e}")))?;
    Ok(IdempotencyBegin::Existing(IdempotencyRecord { fingerprint, turn_id, response }))
}

/// A batch split into one array per column, for `unnest`.
pub(super) struct Columns<'a> {
    pub(super) ids: Vec<Uuid>,
    pub(super) turn_ids: Vec<Uuid>,
    pub(super) roles: Vec<&'static str>,
    pub(super) contents: Vec<&'a str>,
    pub(super) metadata: Vec<String>,
    pub(super) tool_calls: Vec<Option<String>>,
    pub(super) tool_call_ids: Vec<Option<&'a str>>,
    pub(super) names: Vec<Option<&'a str>>,
    pub(super) created_at: Vec<DateTime<Utc>>,
}

impl<'a> Columns<'a> {
    pub(super) fn of(messages: &'a [Message]) -> Self {
        Columns {
            ids: messages.iter().map(|m| m.id).collect(),
            turn_ids: messages.iter().map(|m| m.turn_id).collect(),
            roles: messages.iter().map(|m| m.role.as_str()).collect(),
            contents: messages.iter().map(|m| m.content.as_str()).collect(),
            metadata: messages.iter().map(|m| json_text(&m.metadata)).collect(),
            tool_calls: messages.iter().map(|m| m.tool_calls.as_ref().map(json_text)).collect(),
            tool_call_ids: messages.iter().map(|m| m.tool_call_id.as_deref()).collect(),
            names: messages.iter().map(|m| m.name.as_deref()).collect(),
            created_at: messages.iter().map(|m| m.created_at).collect(),
        }
    }
}
