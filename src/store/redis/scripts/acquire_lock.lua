if (KEYS[1] ~= '' and redis.call('EXISTS', KEYS[1]) == 0) then return false end
local holder = redis.call('HGET', KEYS[2], 'turn')
if holder and holder ~= ARGV[1] then return holder end
if not holder then redis.call('HSET', KEYS[2], 'turn', ARGV[1], 'cancel', '0') end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return ARGV[1]
