delete from turn_logs where turn_id in (
  select turn_id from turn_logs where expires_at <= now()
  order by expires_at limit $1 for update skip locked)
