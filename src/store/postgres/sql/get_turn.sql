select t.id, t.status, t.error, t.message_ids, t.usage, t.created_at, t.completed_at
from turns t join sessions s on s.tenant = t.tenant and s.id = t.session_id
where t.tenant = $1 and t.session_id = $2 and t.id = $3 and (s.expires_at is null or s.expires_at > now())
