if redis.call('EXISTS', meta) == 0 then return 0 end
redis.call('DEL', messages, superseded)
touch(0)
refresh()
return 1
