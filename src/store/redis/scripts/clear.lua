if redis.call('EXISTS', meta) == 0 then return 0 end
redis.call('DEL', messages, superseded, turn_msgs)
redis.call('HSET', meta, 'turn_index', 1)
touch(0)
refresh()
return 1
