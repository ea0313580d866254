delete from turn_queue where (tenant, session_id, turn_id) in (
  select tenant, session_id, turn_id from turn_queue where expires_at <= now()
  order by expires_at limit $1 for update skip locked)
