redis.call('HDEL', idem, 'f:' .. ARGV[1], 'r:' .. ARGV[1])
return redis.call('ZREM', idem_exp, ARGV[1])
