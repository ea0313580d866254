select m.* from sessions s left join lateral (
  select * from ((
      select seq, id, turn_id, role, content, metadata, tool_calls, tool_call_id, name, created_at,
      null::uuid as superseded_by from messages
      where tenant = s.tenant and session_id = s.id and seq > s.floor_seq and seq > $3 and seq < $4
      order by seq desc
      limit $5
    ) union all (
      select seq, id, turn_id, role, content, metadata, tool_calls, tool_call_id, name, created_at,
      superseded_by from superseded_messages
      where tenant = s.tenant and session_id = s.id and seq > s.floor_seq and seq > $3 and seq < $4
      order by seq desc
      limit $5
  )) both_sets order by seq desc
  limit $5
) m on true where s.tenant = $1 and s.id = $2 and (s.expires_at is null or s.expires_at > now())
order by m.seq desc
