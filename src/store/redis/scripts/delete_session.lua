local existed = redis.call('DEL', meta)
redis.call('DEL', messages, turns, order, lock, idem, idem_exp, superseded, turn_msgs)
redis.call('ZREM', index, id)
return existed
