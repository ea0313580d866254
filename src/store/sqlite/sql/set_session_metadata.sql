update sessions set metadata = ?3, expires_at = ?5 where tenant = ?1 and id = ?2
and (expires_at is null or expires_at > ?4)
returning id, created_at, updated_at, system_prompt, metadata, message_count
