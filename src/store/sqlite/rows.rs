//! Rows of the SQLite store to domain values: a session, message or turn from its row (times are
//! µs since the epoch, JSON is text).

use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use uuid::Uuid;

use crate::domain::{Message, Session, ToolCall, Turn, Usage};
use crate::store::sql_common::{parse_role, parse_status, to_u64};
use crate::store::{StoreError, StoreResult};

pub(super) fn decode(error: sqlx::Error) -> StoreError {
    StoreError::Backend(format!("unexpected row from SQLite: {error}"))
}

pub(super) fn from_json<T: serde::de::DeserializeOwned>(text: &str) -> StoreResult<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Backend(format!("invalid JSON in SQLite: {e}")))
}

pub(super) fn session_from_row(row: &SqliteRow) -> StoreResult<Session> {
    let metadata: String = row.try_get("metadata").map_err(decode)?;
    Ok(Session {
        id: row.try_get("id").map_err(decode)?,
        created_at: time(row.try_get("created_at").map_err(decode)?)?,
        updated_at: time(row.try_get("updated_at").map_err(decode)?)?,
        system_prompt: row.try_get("system_prompt").map_err(decode)?,
        metadata: from_json(&metadata)?,
        message_count: to_u64(row.try_get("message_count").map_err(decode)?),
    })
}

pub(super) fn message_from_row(row: &SqliteRow, session_id: &str) -> StoreResult<Message> {
    let role: String = row.try_get("role").map_err(decode)?;
    let metadata: String = row.try_get("metadata").map_err(decode)?;
    let tool_calls: Option<String> = row.try_get("tool_calls").map_err(decode)?;
    Ok(Message {
        id: row.try_get("id").map_err(decode)?,
        session_id: session_id.to_owned(),
        seq: to_u64(row.try_get("seq").map_err(decode)?),
        turn_id: row.try_get("turn_id").map_err(decode)?,
        role: parse_role(&role, "SQLite")?,
        content: row.try_get("content").map_err(decode)?,
        metadata: from_json(&metadata)?,
        tool_calls: tool_calls.map(|t| from_json::<Vec<ToolCall>>(&t)).transpose()?,
        tool_call_id: row.try_get("tool_call_id").map_err(decode)?,
        name: row.try_get("name").map_err(decode)?,
        created_at: time(row.try_get("created_at").map_err(decode)?)?,
        superseded_by: row.try_get::<Option<Uuid>, _>("superseded_by").map_err(decode)?,
    })
}

pub(super) fn turn_from_row(row: &SqliteRow, session_id: &str) -> StoreResult<Turn> {
    let status: String = row.try_get("status").map_err(decode)?;
    let error: Option<String> = row.try_get("error").map_err(decode)?;
    let ids: String = row.try_get("message_ids").map_err(decode)?;
    let usage: Option<String> = row.try_get("usage").map_err(decode)?;
    let completed_at: Option<i64> = row.try_get("completed_at").map_err(decode)?;
    Ok(Turn {
        id: row.try_get("id").map_err(decode)?,
        session_id: session_id.to_owned(),
        status: parse_status(&status, "SQLite")?,
        error: error.map(|e| from_json(&e)).transpose()?,
        message_ids: from_json(&ids)?,
        usage: usage.map(|u| from_json::<Usage>(&u)).transpose()?,
        created_at: time(row.try_get("created_at").map_err(decode)?)?,
        completed_at: completed_at.map(time).transpose()?,
    })
}

/// A time from its column (µs since the epoch).
pub(super) fn time(micros: i64) -> StoreResult<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| StoreError::Backend(format!("invalid time {micros} in SQLite")))
}
