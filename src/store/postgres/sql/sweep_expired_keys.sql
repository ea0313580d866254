delete from idempotency_keys where (tenant, session_id, key) in (
  select tenant, session_id, key from idempotency_keys where expires_at <= now()
  order by expires_at limit $1 for update skip locked)
