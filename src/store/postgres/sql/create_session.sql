insert into sessions
(tenant, id, created_at, updated_at, system_prompt, metadata, message_count, last_seq, expires_at)
values ($1, $2, now(), now(), $3, $4::text::json, 0, 0, now() + $5::bigint * interval '1 microsecond')
returning id, created_at, updated_at, system_prompt, metadata, message_count
