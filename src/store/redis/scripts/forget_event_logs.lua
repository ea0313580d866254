-- Drops the event logs of a session's turns (the session was deleted or its history cleared).
-- KEYS: the session's set of turns with a log. ARGV: what their logs are named with, before the
-- turn id (the same hash slot). Returns how many turns the set listed.
local turns = redis.call('SMEMBERS', KEYS[1])
for _, turn in ipairs(turns) do
  redis.call('DEL', ARGV[1] .. turn)
end
redis.call('DEL', KEYS[1])
return #turns
