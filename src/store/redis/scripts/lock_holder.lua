if (KEYS[1] ~= '' and redis.call('EXISTS', KEYS[1]) == 0) then return false end
return redis.call('HGET', KEYS[2], 'turn') or ''
