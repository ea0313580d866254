select id, created_at, updated_at, system_prompt, metadata, message_count
from sessions where tenant = ?1 and (expires_at is null or expires_at > ?2)
and (updated_at, id) < (?4, ?5) order by updated_at desc, id desc limit ?3
