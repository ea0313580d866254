with s as (select s.tenant, s.id, s.system_prompt, s.floor_seq from sessions s
  where s.tenant = $1 and s.id = $2 and (s.expires_at is null or s.expires_at > now())
), took as (
  insert into turn_locks as l (tenant, session_id, turn_id, expires_at, cancel_requested)
  select s.tenant, s.id, $3, now() + $4::bigint * interval '1 microsecond', false from s
  on conflict (tenant, session_id) do update set turn_id = excluded.turn_id,
  expires_at = excluded.expires_at,
  cancel_requested = l.cancel_requested and l.turn_id = excluded.turn_id and l.expires_at > now()
  where l.expires_at <= now() or l.turn_id = excluded.turn_id
  returning 1
), saved_turn as (
  insert into turns (tenant, session_id, id, status, error, message_ids, usage, created_at, completed_at)
  select $1, $2, $3, $6, $7::text::json, $8, $9, $10, $11 from took
  on conflict (tenant, session_id, id) do update set status = excluded.status,
  error = excluded.error, message_ids = excluded.message_ids, usage = excluded.usage,
  created_at = excluded.created_at, completed_at = excluded.completed_at
  where turns.status = 'running'
), head as (select exists (select 1 from s) as found, exists (select 1 from took) as acquired,
  (select turn_id from turn_locks where tenant = $1 and session_id = $2 and expires_at > now()) as holder,
  (select system_prompt from s) as system_prompt
) select h.found, h.acquired, h.holder, h.system_prompt, m.* from head h left join lateral (
  select w.seq, w.id, w.turn_id, w.role, w.content, w.metadata, w.tool_calls, w.tool_call_id, w.name,
  w.created_at from messages w where h.acquired and w.tenant = $1 and w.session_id = $2
  and w.seq > (select s.floor_seq from s) order by w.seq desc limit $5
) m on true order by m.seq asc
