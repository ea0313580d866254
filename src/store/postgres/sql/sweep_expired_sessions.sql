delete from sessions where (tenant, id) in (
  select tenant, id from sessions where expires_at <= now()
  order by expires_at limit $1 for update skip locked)
