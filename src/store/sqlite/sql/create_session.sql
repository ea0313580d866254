insert into sessions (tenant, id, created_at, updated_at, system_prompt, metadata,
  message_count, last_seq, floor_seq, expires_at)
values (?1, ?2, ?5, ?5, ?3, ?4, ?7, ?8, ?9, ?6) on conflict (tenant, id) do nothing returning id, created_at, updated_at, system_prompt, metadata, message_count
