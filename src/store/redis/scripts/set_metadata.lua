if redis.call('EXISTS', meta) == 0 then return {} end
redis.call('HSET', meta, 'metadata', ARGV[5])
refresh()
return redis.call('HGETALL', meta)
