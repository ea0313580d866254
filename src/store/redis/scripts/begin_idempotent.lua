if (meta ~= '' and redis.call('EXISTS', meta) == 0) then return false end
forget_expired()
local record = redis.call('HGET', idem, 'f:' .. ARGV[1])
if record then return {record, redis.call('HGET', idem, 'r:' .. ARGV[1])} end
redis.call('HSET', idem, 'f:' .. ARGV[1], ARGV[2])
redis.call('ZADD', idem_exp, string.format('%d', now_ms + tonumber(ARGV[3])), ARGV[1])
expire_with_last_record()
return {}
