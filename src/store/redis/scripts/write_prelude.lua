local meta, messages, turns, order, index = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local lock, idem, idem_exp, superseded = KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local id, now, ttl, cap = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])

local function call_chunked(command, key, list)
  for i = 1, #list, 1000 do
    redis.call(command, key, unpack(list, i, math.min(i + 999, #list)))
  end
end

-- Every key but the lock, whose expiry is its lease.
local function refresh()
  if ttl > 0 then
    for _, key in ipairs({meta, messages, turns, order, index, idem, idem_exp, superseded}) do
      redis.call('PEXPIRE', key, ttl)
    end
  end
end

local function touch(count)
  local at = now
  local old = redis.call('HGET', meta, 'updated_at')
  if old and tonumber(old) > tonumber(at) then at = old end
  redis.call('HSET', meta, 'updated_at', at, 'message_count', count)
  redis.call('ZADD', index, at, id)
end

-- A turn's outcome, once written, never changes: only a running record is replaced.
local function save_turn(turn_id, json)
  local old = redis.call('HGET', turns, turn_id)
  if old and not string.find(old, '"status":"running"', 1, true) then return end
  redis.call('HSET', turns, turn_id, json)
  if not redis.call('ZSCORE', order, turn_id) then
    redis.call('ZADD', order, redis.call('HINCRBY', meta, 'turn_seq', 1), turn_id)
  end
  local extra = 0
  if cap > 0 then extra = redis.call('ZCARD', order) - cap end
  if extra > 0 then
    local old = redis.call('ZRANGE', order, 0, extra - 1)
    redis.call('ZREMRANGEBYRANK', order, 0, extra - 1)
    call_chunked('HDEL', turns, old)
  end
end
