local meta, messages, turns, order, index = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local lock, idem, idem_exp, superseded, turn_msgs = KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local id, now, ttl, cap = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])

local function call_chunked(command, key, list)
  for i = 1, #list, 1000 do
    redis.call(command, key, unpack(list, i, math.min(i + 999, #list)))
  end
end

-- Every key but the lock, whose expiry is its lease.
local function refresh()
  if ttl > 0 then
    for _, key in ipairs({meta, messages, turns, order, index, idem, idem_exp, superseded, turn_msgs}) do
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

-- Where each turn's messages are, for `turn_messages`: turn_msgs maps a turn id to "lo hi n", the
-- lowest and highest seq of its messages and how many of them are held (active or superseded).
-- Every script that adds or drops messages keeps it; a session whose meta has `turn_index` = 1
-- (created or cleared since) has every turn in it.
local function entry(turn_id)
  local old = redis.call('HGET', turn_msgs, turn_id)
  if not old then return nil end
  local lo, hi, n = string.match(old, '^(%d+) (%d+) (%d+)$')
  return tonumber(lo), tonumber(hi), tonumber(n)
end

-- Indexes n new messages with seqs from `first`, whose JSON tails (the text after the seq, which
-- starts with the turn id) are ARGV[at], ARGV[at + 2]... A run of one turn's messages is one write.
local function index_turns(first, n, at)
  local i = 0
  while i < n do
    local turn_id = string.match(ARGV[at + 2 * i], '^,"turn_id":"([^"]+)"')
    local j = i
    while j + 1 < n and string.match(ARGV[at + 2 * (j + 1)], '^,"turn_id":"([^"]+)"') == turn_id do
      j = j + 1
    end
    if turn_id then
      local lo, hi, count = first + i, first + j, j - i + 1
      local old_lo, old_hi, old_n = entry(turn_id)
      if old_lo then lo, hi, count = math.min(lo, old_lo), math.max(hi, old_hi), count + old_n end
      redis.call('HSET', turn_msgs, turn_id, string.format('%d %d %d', lo, hi, count))
    end
    i = j + 1
  end
end

-- Counts out messages about to be dropped (their JSON), deleting the entries of turns left with none.
local function unindex(dropped)
  local turns_seen, counts = {}, {}
  for _, json in ipairs(dropped) do
    local turn_id = string.match(json, '"seq":%d+,"turn_id":"([^"]+)"')
    if turn_id then
      if not counts[turn_id] then
        turns_seen[#turns_seen + 1] = turn_id
        counts[turn_id] = 0
      end
      counts[turn_id] = counts[turn_id] + 1
    end
  end
  for _, turn_id in ipairs(turns_seen) do
    local lo, hi, n = entry(turn_id)
    if lo then
      if n > counts[turn_id] then
        redis.call('HSET', turn_msgs, turn_id, string.format('%d %d %d', lo, hi, n - counts[turn_id]))
      else
        redis.call('HDEL', turn_msgs, turn_id)
      end
    end
  end
end

-- Drops the `k` lowest messages of a zset (messages or superseded), counting them out of turn_msgs.
local function drop_oldest(key, k)
  unindex(redis.call('ZRANGE', key, 0, k - 1))
  redis.call('ZREMRANGEBYRANK', key, 0, k - 1)
end
