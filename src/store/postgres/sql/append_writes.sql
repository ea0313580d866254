with fence as (
  select 1 from turn_locks where $22::uuid is not null and tenant = $1 and session_id = $2
  and turn_id = $22::uuid and expires_at > now() for update
), pre as (
  select last_seq, floor_seq from sessions
  where tenant = $1 and id = $2 and (expires_at is null or expires_at > now())
  and ($22::uuid is null or exists (select 1 from fence)) for update
), bounds as (
  select pre.last_seq + $3 as last_seq, pre.floor_seq as old_floor,
  case when $4::bigint is null then pre.floor_seq
  else greatest(pre.floor_seq, pre.last_seq + $3 - $4::bigint) end as floor_seq from pre
), moved as (
  delete from messages d using bounds where $23::bigint is not null and d.tenant = $1
  and d.session_id = $2 and d.seq >= $23::bigint and d.seq > bounds.old_floor
  returning d.*
), kept_moved as (
  insert into superseded_messages (tenant, session_id, seq, id, turn_id, role, content, metadata,
    tool_calls, tool_call_id, name, created_at, superseded_by)
  select tenant, session_id, seq, id, turn_id, role, content, metadata, tool_calls, tool_call_id,
  name, created_at, $15::uuid from moved, bounds where moved.seq > bounds.floor_seq
), trimmed as (
  delete from messages d using bounds where $4::bigint is not null and d.tenant = $1
  and d.session_id = $2 and d.seq <= bounds.floor_seq
  and ($23::bigint is null or d.seq < $23::bigint) returning (d.seq > bounds.old_floor) as counted
), trimmed_superseded as (
  delete from superseded_messages d using bounds where $4::bigint is not null and d.tenant = $1
  and d.session_id = $2 and d.seq <= bounds.floor_seq
), s as (
  update sessions set last_seq = bounds.last_seq, floor_seq = bounds.floor_seq,
  message_count = least(bounds.last_seq - bounds.floor_seq, greatest(0, sessions.message_count
      + least($3, bounds.last_seq - bounds.floor_seq)
      - (select count(*) from moved) - (select count(*) from trimmed where counted))),
  updated_at = case when $3 > 0 or $23::bigint is not null then greatest(now(), updated_at)
  else updated_at end,
  expires_at = now() + $5::bigint * interval '1 microsecond'
  from bounds where tenant = $1 and id = $2
  returning sessions.last_seq
), ins as (
  insert into messages (tenant, session_id, seq, id, turn_id, role, content, metadata,
    tool_calls, tool_call_id, name, created_at)
  select $1, $2, s.last_seq - $3 + m.ord, m.id, m.turn_id, m.role, m.content, m.metadata::json,
  m.tool_calls::json, m.tool_call_id, m.name, m.created_at
  from s, unnest($6::uuid[], $7::uuid[], $8::text[], $9::text[], $10::text[], $11::text[],
    $12::text[], $13::text[], $14::timestamptz[]) with ordinality
  as m(id, turn_id, role, content, metadata, tool_calls, tool_call_id, name, created_at, ord)
  where $4::bigint is null or m.ord > $3 - $4::bigint
), saved_turn as (
  insert into turns (tenant, session_id, id, status, error, message_ids, usage, created_at, completed_at)
  select $1, $2, $15::uuid, $16, $17::text::json, $18, $19, $20, $21 from s where $15::uuid is not null
  on conflict (tenant, session_id, id) do update set status = excluded.status,
  error = excluded.error, message_ids = excluded.message_ids, usage = excluded.usage,
  created_at = excluded.created_at, completed_at = excluded.completed_at
  where turns.status = 'running'
), trimmed_turns as (
  delete from turns t using s
  where $4::bigint is not null and $15::uuid is not null and t.tenant = $1 and t.session_id = $2
  and t.id <> $15::uuid and t.id <= (select o.id from turns o where o.tenant = $1
    and o.session_id = $2 and o.id <> $15::uuid order by o.id desc offset $4::bigint - 1 limit 1)
)
