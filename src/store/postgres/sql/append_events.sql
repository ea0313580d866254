-- One append of several turns' event batches: each turn's log is kept (or created) until
-- now + $4 µs, its events added (those it already holds are skipped: a retried batch), its
-- oldest events beyond the bound dropped, and every turn announced in one notification.
-- $1 turn ids, $2 tenants, $3 sessions, $5 ids up to which each turn's events are dropped (one
-- per turn); $6 turn id, $7 id and $8 body of each event; $9 the channel.
with turns as (
  select * from unnest($1::uuid[], $2::text[], $3::text[], $5::bigint[])
    as t (turn_id, tenant, session_id, drop_up_to)
), logs as (
  insert into turn_logs (turn_id, tenant, session_id, expires_at)
  select turn_id, tenant, session_id, now() + make_interval(secs => $4::double precision / 1000000)
  from turns
  on conflict (turn_id) do update set expires_at = excluded.expires_at
  returning turn_id
), added as (
  insert into turn_events (turn_id, id, body)
  select e.turn_id, e.id, e.body
  from unnest($6::uuid[], $7::bigint[], $8::text[]) as e (turn_id, id, body)
  join logs using (turn_id)
  on conflict (turn_id, id) do nothing
), trimmed as (
  delete from turn_events e using turns t
  where t.drop_up_to > 0 and e.turn_id = t.turn_id and e.id <= t.drop_up_to
)
select pg_notify($9, string_agg(turn_id::text, ',')) from turns
