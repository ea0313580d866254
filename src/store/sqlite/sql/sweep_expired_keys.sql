delete from idempotency_keys where rowid in (select rowid from
  idempotency_keys where expires_at <= ?1 order by expires_at limit ?2)
