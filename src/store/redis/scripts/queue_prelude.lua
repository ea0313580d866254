-- Shared by the wait queue scripts. KEYS: queue (zset turn -> arrival, server µs), queue_exp
-- (zset turn -> when its place lapses, server ms). ARGV[1]: the turn; ARGV[2]: lease (ms).
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
-- Takes (or keeps) the turn's place and renews it; both keys live while any waiter renews.
local function hold_place()
  redis.call('ZADD', KEYS[1], 'NX', now_us, ARGV[1])
  redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
