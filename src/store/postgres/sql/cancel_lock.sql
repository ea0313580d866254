with s as (select 1 from sessions s where s.tenant = $1 and s.id = $2 and (s.expires_at is null or s.expires_at > now())
), flagged as (
  update turn_locks l set cancel_requested = true from s
  where l.tenant = $1 and l.session_id = $2 and l.turn_id = $3 and l.expires_at > now()
  returning 1
) select exists (select 1 from s) as found, exists (select 1 from flagged) as flagged
