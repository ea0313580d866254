local meta, idem, idem_exp = KEYS[1], KEYS[2], KEYS[3]
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local now_text = string.format('%d', now_ms)

local function forget_expired()
  local old = redis.call('ZRANGE', idem_exp, '-inf', now_text, 'BYSCORE')
  if #old == 0 then return end
  for i = 1, #old do redis.call('HDEL', idem, 'f:' .. old[i], 'r:' .. old[i]) end
  redis.call('ZREMRANGEBYSCORE', idem_exp, '-inf', now_text)
end

local function expire_with_last_record()
  local last = redis.call('ZRANGE', idem_exp, -1, -1, 'WITHSCORES')
  if #last == 0 then return end
  local at = tonumber(last[2])
  local session_ttl = redis.call('PTTL', meta)
  if session_ttl >= 0 and now_ms + session_ttl < at then at = now_ms + session_ttl end
  at = string.format('%d', at)
  redis.call('PEXPIREAT', idem, at)
  redis.call('PEXPIREAT', idem_exp, at)
end
