select last_seq, floor_seq, message_count, updated_at, system_prompt
from sessions where tenant = ?1 and id = ?2 and (expires_at is null or expires_at > ?3)
