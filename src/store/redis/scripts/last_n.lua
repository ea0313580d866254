if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if ARGV[1] == '0' then return {} end
return redis.call('ZRANGE', KEYS[2], ARGV[2], -1)
