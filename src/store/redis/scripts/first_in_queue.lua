for _, lapsed in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms)) do
  if lapsed ~= ARGV[1] then
    redis.call('ZREM', KEYS[1], lapsed)
    redis.call('ZREM', KEYS[2], lapsed)
  end
end
hold_place()
local first = redis.call('ZRANGE', KEYS[1], 0, 0)
if first[1] == ARGV[1] then return 1 end
return 0
