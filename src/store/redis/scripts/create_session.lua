if redis.call('EXISTS', meta) == 1 then return 0 end
local max = tonumber(ARGV[5])
if max > 0 then
  local held
  if ttl > 0 then
    held = redis.call('ZCOUNT', index, '(' .. string.format('%d', tonumber(now) - ttl * 1000), '+inf')
  else
    held = redis.call('ZCARD', index)
  end
  if held >= max then return -1 end
end
redis.call('DEL', messages, turns, order, lock, idem, idem_exp, superseded, turn_msgs)
redis.call('HSET', meta, 'id', id, 'created_at', now, 'updated_at', now, 'metadata', ARGV[6],
  'message_count', 0, 'last_seq', 0, 'turn_seq', 0, 'turn_index', 1)
if ARGV[7] == '1' then redis.call('HSET', meta, 'system_prompt', ARGV[8]) end
redis.call('ZADD', index, now, id)
refresh()
return 1
