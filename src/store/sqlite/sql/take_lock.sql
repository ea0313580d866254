insert into turn_locks (tenant, session_id, turn_id, expires_at, cancel_requested)
values (?1, ?2, ?3, ?4, ?5) on conflict (tenant, session_id) do update set turn_id = excluded.turn_id,
expires_at = excluded.expires_at, cancel_requested = excluded.cancel_requested
