-- One append of several turns' event batches: each turn's log is kept (or created) until
-- now + $4 µs, its batch added as one row (a batch already held, retried, is skipped), its
-- batches ending more than the bound before its last event dropped, and every turn announced
-- in one notification.
-- Per turn: $1 id, $2 tenant, $3 session, $5 first and $6 last event id, $7 the id up to which
-- batches are dropped, $8 and $9 where its bodies are in $10 (1-based, inclusive); $11 the channel.
with turns as (
  select * from unnest($1::uuid[], $2::text[], $3::text[], $5::bigint[], $6::bigint[],
                       $7::bigint[], $8::int[], $9::int[])
    as t (turn_id, tenant, session_id, first_id, last_id, drop_up_to, lo, hi)
), logs as (
  insert into turn_logs (turn_id, tenant, session_id, expires_at)
  select turn_id, tenant, session_id, now() + make_interval(secs => $4::double precision / 1000000)
  from turns
  on conflict (turn_id) do update set expires_at = excluded.expires_at
  returning turn_id
), added as (
  insert into turn_event_batches (turn_id, last_id, first_id, bodies)
  select t.turn_id, t.last_id, t.first_id, ($10::text[])[t.lo:t.hi]
  from turns t join logs using (turn_id)
  on conflict (turn_id, last_id) do nothing
), trimmed as (
  delete from turn_event_batches e using turns t
  where t.drop_up_to > 0 and e.turn_id = t.turn_id and e.last_id <= t.drop_up_to
)
-- The log is a replay buffer (the history is what is durable): its commit does not wait for the
-- WAL flush. Set for this statement's own transaction, at its end.
select pg_notify($11, string_agg(turn_id::text, ',')),
       set_config('synchronous_commit', 'off', true)
from turns
