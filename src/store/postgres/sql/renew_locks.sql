update turn_locks l set expires_at = now() + $4::bigint * interval '1 microsecond'
from unnest($1::text[], $2::text[], $3::uuid[]) with ordinality as r(tenant, session_id, turn_id, ord)
where l.tenant = r.tenant and l.session_id = r.session_id and l.turn_id = r.turn_id
and l.expires_at > now()
and exists (select 1 from sessions s where s.tenant = r.tenant and s.id = r.session_id and (s.expires_at is null or s.expires_at > now())
) returning r.ord, l.cancel_requested
