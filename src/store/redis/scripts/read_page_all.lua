if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local limit = tonumber(ARGV[4])
local function take(key)
  if ARGV[3] == 'desc' then
    return redis.call('ZRANGE', key, ARGV[2], ARGV[1], 'BYSCORE', 'REV', 'LIMIT', 0, limit + 1, 'WITHSCORES')
  end
  return redis.call('ZRANGE', key, ARGV[1], ARGV[2], 'BYSCORE', 'LIMIT', 0, limit + 1, 'WITHSCORES')
end
local a, b = take(KEYS[2]), take(KEYS[3])
local found, i, j = {}, 1, 1
while #found <= limit and (i <= #a or j <= #b) do
  local pick_a
  if i > #a then pick_a = false
  elseif j > #b then pick_a = true
  elseif ARGV[3] == 'desc' then pick_a = tonumber(a[i + 1]) > tonumber(b[j + 1])
  else pick_a = tonumber(a[i + 1]) < tonumber(b[j + 1]) end
  if pick_a then found[#found + 1] = a[i]; i = i + 2 else found[#found + 1] = b[j]; j = j + 2 end
end
local more = 0
if #found > limit then
  found[#found] = nil
  more = 1
end
return {more, found}
