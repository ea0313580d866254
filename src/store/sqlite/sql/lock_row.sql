select turn_id, expires_at, cancel_requested from turn_locks where tenant = ?1 and session_id = ?2
