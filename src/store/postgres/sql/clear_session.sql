update sessions s set message_count = 0, floor_seq = last_seq, updated_at = greatest(now(), updated_at),
expires_at = now() + $3::bigint * interval '1 microsecond'
where s.tenant = $1 and s.id = $2 and (s.expires_at is null or s.expires_at > now())
returning last_seq
