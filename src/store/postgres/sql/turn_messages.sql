select m.* from sessions s left join lateral (
  select seq, id, turn_id, role, content, metadata, tool_calls, tool_call_id, name, created_at,
  null::uuid as superseded_by from messages
  where tenant = s.tenant and session_id = s.id and turn_id = $3 and seq > s.floor_seq
  union all
  select seq, id, turn_id, role, content, metadata, tool_calls, tool_call_id, name, created_at,
  superseded_by from superseded_messages
  where tenant = s.tenant and session_id = s.id and turn_id = $3 and seq > s.floor_seq
) m on true where s.tenant = $1 and s.id = $2 and (s.expires_at is null or s.expires_at > now())
order by m.seq asc
