update turn_locks set expires_at = ?5 where tenant = ?1 and session_id = ?2
and turn_id = ?3 and expires_at > ?4 and exists (select 1 from sessions s where s.tenant = ?1
  and s.id = ?2 and (s.expires_at is null or s.expires_at > ?4)) returning cancel_requested
