if (meta ~= '' and redis.call('EXISTS', meta) == 0) then return -1 end
local until_ms = redis.call('ZSCORE', idem_exp, ARGV[1])
if not until_ms or tonumber(until_ms) <= now_ms or redis.call('HEXISTS', idem, 'f:' .. ARGV[1]) == 0 then
  return 0
end
redis.call('HSET', idem, 'r:' .. ARGV[1], ARGV[2])
redis.call('ZADD', idem_exp, string.format('%d', now_ms + tonumber(ARGV[3])), ARGV[1])
expire_with_last_record()
return 1
