delete from idempotency_keys where tenant = $1 and session_id = $2 and key = $3
