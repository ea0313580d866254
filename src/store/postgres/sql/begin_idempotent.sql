with s as (select s.tenant, s.id from sessions s where s.tenant = $1 and s.id = $2 and (s.expires_at is null or s.expires_at > now())
), purged as (
  delete from idempotency_keys
  where tenant = $1 and session_id = $2 and key <> $3 and expires_at <= now()
), took as (
  insert into idempotency_keys as k (tenant, session_id, key, fingerprint, turn_id, expires_at)
  select s.tenant, s.id, $3, $4, $5, now() + $6::bigint * interval '1 microsecond' from s
  on conflict (tenant, session_id, key) do update set fingerprint = excluded.fingerprint,
  turn_id = excluded.turn_id, response = null, expires_at = excluded.expires_at
  where k.expires_at <= now()
  returning 1
) select exists (select 1 from s) as found, exists (select 1 from took) as started,
k.fingerprint, k.turn_id, k.response::text as response
from (select 1) as one left join idempotency_keys k
on k.tenant = $1 and k.session_id = $2 and k.key = $3 and k.expires_at > now()
