insert into messages (tenant, session_id, seq, id, turn_id, role, content, metadata,
  tool_calls, tool_call_id, name, created_at)
select $1, $2, m.ord, m.id, m.turn_id, m.role, m.content, m.metadata::json,
m.tool_calls::json, m.tool_call_id, m.name, m.created_at
from unnest($4::uuid[], $5::uuid[], $6::text[], $7::text[], $8::text[], $9::text[],
  $10::text[], $11::text[], $12::timestamptz[]) with ordinality
as m(id, turn_id, role, content, metadata, tool_calls, tool_call_id, name, created_at, ord)
where m.ord > $3
