if redis.call('EXISTS', meta) == 0 then return false end
local holder = redis.call('HGET', lock, 'turn')
if holder and holder ~= ARGV[5] then return {0, holder, {}, 0, ''} end
if not holder then redis.call('HSET', lock, 'turn', ARGV[5], 'cancel', '0') end
redis.call('PEXPIRE', lock, ARGV[7])
save_turn(ARGV[5], ARGV[6])
refresh()
local n = tonumber(ARGV[8])
local window = {}
if n > 0 then window = redis.call('ZRANGE', messages, -n, -1) end
local prompt = redis.call('HGET', meta, 'system_prompt')
if prompt then return {1, '', window, 1, prompt} end
return {1, '', window, 0, ''}
