select l.turn_id from sessions s left join turn_locks l
on l.tenant = s.tenant and l.session_id = s.id and l.expires_at > ?3
where s.tenant = ?1 and s.id = ?2 and (s.expires_at is null or s.expires_at > ?3)
