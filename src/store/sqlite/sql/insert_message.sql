insert into messages (tenant, session_id, seq, id, turn_id, role, content, metadata, tool_calls, tool_call_id, name, created_at
) values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
