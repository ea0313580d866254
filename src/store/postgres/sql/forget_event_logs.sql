delete from turn_logs where tenant = $1 and session_id = $2
