delete from messages where tenant = ?1 and session_id = ?2 and seq >= ?3
