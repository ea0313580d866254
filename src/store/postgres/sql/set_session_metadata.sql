update sessions s set metadata = $3::text::json,
expires_at = now() + $4::bigint * interval '1 microsecond'
where s.tenant = $1 and s.id = $2 and (s.expires_at is null or s.expires_at > now())
returning id, created_at, updated_at, system_prompt, metadata, message_count
