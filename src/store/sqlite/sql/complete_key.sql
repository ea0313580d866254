update idempotency_keys set response = ?4, expires_at = ?6
where tenant = ?1 and session_id = ?2 and key = ?3 and expires_at > ?5
