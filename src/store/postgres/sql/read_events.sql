-- The batches of a turn's log that end after event $4 (the first may begin before it), at
-- most $5, in order.
select e.first_id, e.bodies
from turn_logs l join turn_event_batches e on e.turn_id = l.turn_id
where l.turn_id = $1 and l.tenant = $2 and l.session_id = $3 and l.expires_at > now()
  and e.last_id > $4
order by e.last_id
limit $5
