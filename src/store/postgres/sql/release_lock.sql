delete from turn_locks where tenant = $1 and session_id = $2 and turn_id = $3
