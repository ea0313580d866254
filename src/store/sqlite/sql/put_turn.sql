insert into turns (tenant, session_id, id, status, error, message_ids, usage,
  created_at, completed_at) values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
on conflict (tenant, session_id, id) do update set status = excluded.status, error = excluded.error,
message_ids = excluded.message_ids, usage = excluded.usage, created_at = excluded.created_at,
completed_at = excluded.completed_at where turns.status = 'running'
