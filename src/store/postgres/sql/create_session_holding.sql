insert into sessions
(tenant, id, created_at, updated_at, system_prompt, metadata, message_count, last_seq, floor_seq, expires_at)
values ($1, $2, now(), now(), $3, $4::text::json, $7, $6, $6 - $7, now() + $5::bigint * interval '1 microsecond')
on conflict (tenant, id) do nothing
returning id, created_at, updated_at, system_prompt, metadata, message_count
