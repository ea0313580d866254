select id, created_at, updated_at, system_prompt, metadata, message_count
from sessions where tenant = ?1 and id = ?2 and (expires_at is null or expires_at > ?3)
