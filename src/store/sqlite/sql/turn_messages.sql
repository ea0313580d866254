select seq, id, turn_id, role, content, metadata, tool_calls, tool_call_id, name, created_at, null as superseded_by from messages
where tenant = ?1 and session_id = ?2 and turn_id = ?3 and seq > ?4
union all
select seq, id, turn_id, role, content, metadata, tool_calls, tool_call_id, name, created_at, superseded_by from superseded_messages
where tenant = ?1 and session_id = ?2 and turn_id = ?3 and seq > ?4
order by seq asc
