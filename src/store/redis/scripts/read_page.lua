if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local limit = tonumber(ARGV[4])
local found
if ARGV[3] == 'desc' then
  found = redis.call('ZRANGE', KEYS[2], ARGV[2], ARGV[1], 'BYSCORE', 'REV', 'LIMIT', 0, limit + 1)
else
  found = redis.call('ZRANGE', KEYS[2], ARGV[1], ARGV[2], 'BYSCORE', 'LIMIT', 0, limit + 1)
end
local more = 0
if #found > limit then
  found[#found] = nil
  more = 1
end
return {more, found}
