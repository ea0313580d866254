with s as (select s.tenant, s.id from sessions s where s.tenant = $1 and s.id = $2 and (s.expires_at is null or s.expires_at > now())
), took as (
  insert into turn_locks as l (tenant, session_id, turn_id, expires_at, cancel_requested)
  select s.tenant, s.id, $3, now() + $4::bigint * interval '1 microsecond', false from s
  on conflict (tenant, session_id) do update set turn_id = excluded.turn_id,
  expires_at = excluded.expires_at,
  cancel_requested = l.cancel_requested and l.turn_id = excluded.turn_id and l.expires_at > now()
  where l.expires_at <= now() or l.turn_id = excluded.turn_id
  returning 1
) select exists (select 1 from s) as found, exists (select 1 from took) as acquired,
(select turn_id from turn_locks where tenant = $1 and session_id = $2 and expires_at > now())
as holder
