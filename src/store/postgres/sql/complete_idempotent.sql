with s as (select 1 from sessions s where s.tenant = $1 and s.id = $2 and (s.expires_at is null or s.expires_at > now())
), saved as (
  update idempotency_keys k set response = $4::text::json,
  expires_at = now() + $5::bigint * interval '1 microsecond' from s
  where k.tenant = $1 and k.session_id = $2 and k.key = $3 and k.expires_at > now()
) select exists (select 1 from s)
