select id, created_at, updated_at, system_prompt, metadata, message_count from sessions s
where s.tenant = $1 and (s.expires_at is null or s.expires_at > now())
order by updated_at desc, id desc limit $2
