delete from turn_queue where tenant = $1 and session_id = $2 and turn_id = $3
