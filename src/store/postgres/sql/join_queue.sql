insert into turn_queue (tenant, session_id, turn_id, expires_at)
values ($1, $2, $3, now() + $4::bigint * interval '1 microsecond')
on conflict (tenant, session_id, turn_id) do update set expires_at = excluded.expires_at
