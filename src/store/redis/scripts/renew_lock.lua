if (KEYS[1] ~= '' and redis.call('EXISTS', KEYS[1]) == 0) or redis.call('HGET', KEYS[2], 'turn') ~= ARGV[1] then
  return {0, 0}
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
if redis.call('HGET', KEYS[2], 'cancel') == '1' then return {1, 1} end
return {1, 0}
