update turn_locks set expires_at = now() + $4::bigint * interval '1 microsecond'
where tenant = $1 and session_id = $2 and turn_id = $3 and expires_at > now()
and exists (select 1 from sessions s where s.tenant = $1 and s.id = $2 and (s.expires_at is null or s.expires_at > now())
) returning cancel_requested
