insert into idempotency_keys (tenant, session_id, key, fingerprint, turn_id,
  response, expires_at) values (?1, ?2, ?3, ?4, ?5, null, ?6)
