with lapsed as (
  delete from turn_queue
  where tenant = $1 and session_id = $2 and turn_id <> $3 and expires_at <= now()
), mine as (
  insert into turn_queue (tenant, session_id, turn_id, expires_at)
  values ($1, $2, $3, now() + $4::bigint * interval '1 microsecond')
  on conflict (tenant, session_id, turn_id) do update set expires_at = excluded.expires_at
  returning ticket
)
select not exists (
  select 1 from turn_queue q, mine
  where q.tenant = $1 and q.session_id = $2 and q.turn_id <> $3 and q.expires_at > now()
    and q.ticket < mine.ticket
) as first
