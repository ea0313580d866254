if (KEYS[1] ~= '' and redis.call('EXISTS', KEYS[1]) == 0) then return -1 end
if redis.call('HGET', KEYS[2], 'turn') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], 'cancel', '1')
return 1
