select e.id, e.body
from turn_logs l join turn_events e on e.turn_id = l.turn_id
where l.turn_id = $1 and l.tenant = $2 and l.session_id = $3 and l.expires_at > now() and e.id > $4
order by e.id
limit $5
