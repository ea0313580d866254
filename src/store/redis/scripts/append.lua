if redis.call('EXISTS', meta) == 0 then return 0 end
if ARGV[5] ~= '' and redis.call('HGET', lock, 'turn') ~= ARGV[5] then return -1 end
local n = (#ARGV - 9) / 2
local first = redis.call('HINCRBY', meta, 'last_seq', n) - n + 1
if ARGV[9] ~= '' then
  local moved = redis.call('ZRANGE', messages, ARGV[9], '+inf', 'BYSCORE', 'WITHSCORES')
  local marked = {}
  local tag = ',"superseded_by":"' .. ARGV[7] .. '"}'
  for i = 1, #moved, 2 do
    marked[#marked + 1] = moved[i + 1]
    marked[#marked + 1] = string.sub(moved[i], 1, -2) .. tag
  end
  if #marked > 0 then
    call_chunked('ZADD', superseded, marked)
    redis.call('ZREMRANGEBYSCORE', messages, ARGV[9], '+inf')
    local kept = redis.call('ZCARD', superseded)
    if cap > 0 and kept > cap then drop_oldest(superseded, kept - cap) end
  end
end
if n > 0 or ARGV[9] ~= '' then
  if n > 0 then
    local members = {}
    for i = 0, n - 1 do
      local seq = string.format('%d', first + i)
      members[#members + 1] = seq
      members[#members + 1] = ARGV[10 + 2 * i] .. seq .. ARGV[11 + 2 * i]
    end
    call_chunked('ZADD', messages, members)
    index_turns(first, n, 11)
  end
  local count = redis.call('ZCARD', messages)
  if cap > 0 and count > cap then
    drop_oldest(messages, count - cap)
    count = cap
  end
  touch(count)
end
if ARGV[7] ~= '' then save_turn(ARGV[7], ARGV[8]) end
refresh()
if ARGV[6] == '1' then redis.call('DEL', lock) end
return first
