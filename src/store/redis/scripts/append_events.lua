-- Appends a batch of one turn's events to its stream, skipping any it already holds (a retried
-- batch whose first try was applied), keeps the stream ARGV[1] ms, and announces the append.
-- KEYS: the turn's stream. ARGV: ttl (ms), max length, channel, announcement, then id, body pairs.
-- Stream ids are `0-<event id>`. Returns how many events were added.
local key = KEYS[1]
local last = 0
local top = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
if #top > 0 then
  last = tonumber(string.match(top[1][1], '^0%-(%d+)$')) or 0
end
local added = 0
for i = 5, #ARGV, 2 do
  local id = tonumber(ARGV[i])
  if id > last then
    redis.call('XADD', key, 'MAXLEN', '~', ARGV[2], '0-' .. ARGV[i], 'e', ARGV[i + 1])
    last = id
    added = added + 1
  end
end
redis.call('PEXPIRE', key, ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return added
