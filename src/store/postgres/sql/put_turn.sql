with s as (select 1 from sessions s where s.tenant = $1 and s.id = $2 and (s.expires_at is null or s.expires_at > now())
), put as (
  insert into turns (tenant, session_id, id, status, error, message_ids, usage, created_at, completed_at)
  select $1, $2, $3, $4, $5::text::json, $6, $7, $8, $9 from s
  on conflict (tenant, session_id, id) do update set status = excluded.status,
  error = excluded.error, message_ids = excluded.message_ids, usage = excluded.usage,
  created_at = excluded.created_at, completed_at = excluded.completed_at
  where turns.status = 'running'
) select exists (select 1 from s)
