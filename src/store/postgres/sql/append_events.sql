with log as (
  insert into turn_logs (turn_id, tenant, session_id, expires_at)
  values ($1, $2, $3, now() + make_interval(secs => $4::double precision / 1000000))
  on conflict (turn_id) do update set expires_at = excluded.expires_at
  returning turn_id
), added as (
  insert into turn_events (turn_id, id, body)
  select log.turn_id, e.id, e.body from log, unnest($5::bigint[], $6::text[]) as e (id, body)
  on conflict (turn_id, id) do nothing
), trimmed as (
  delete from turn_events where turn_id = $1 and id <= $7
)
select pg_notify($8, $1::text)
