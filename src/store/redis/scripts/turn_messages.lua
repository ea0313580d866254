if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local lo, hi = '-inf', '+inf'
if redis.call('HGET', KEYS[1], 'turn_index') == '1' then
  local where = redis.call('HGET', KEYS[4], ARGV[1])
  if not where then return {} end
  lo, hi = string.match(where, '^(%d+) (%d+)')
end
local found = {}
for _, key in ipairs({KEYS[2], KEYS[3]}) do
  for _, json in ipairs(redis.call('ZRANGE', key, lo, hi, 'BYSCORE')) do
    if string.match(json, '"seq":%d+,"turn_id":"([^"]+)"') == ARGV[1] then found[#found + 1] = json end
  end
end
return found
