update sessions set last_seq = ?3, floor_seq = ?4, message_count = ?5,
updated_at = ?6, expires_at = ?7 where tenant = ?1 and id = ?2
