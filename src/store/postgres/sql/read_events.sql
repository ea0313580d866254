-- The batches of a turn's log that end within $5 events after event $4 (the first may begin
-- before it), then the one batch after them (which may begin within, or past a gap), in order:
-- at most $5 events past $4 are read, plus one batch and what a batch repeats.
with log as (
  select turn_id from turn_logs
  where turn_id = $1 and tenant = $2 and session_id = $3 and expires_at > now()
)
(select e.first_id, e.bodies, e.last_id
 from log join turn_event_batches e using (turn_id)
 where e.last_id > $4 and e.last_id - $5 <= $4
 order by e.last_id
 limit $5)
union all
(select e.first_id, e.bodies, e.last_id
 from log join turn_event_batches e using (turn_id)
 where e.last_id - $5 > $4
 order by e.last_id
 limit 1)
order by last_id
