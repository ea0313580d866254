local existed = redis.call('DEL', meta)
redis.call('DEL', messages, turns, order, lock, idem, idem_exp, superseded)
redis.call('ZREM', index, id)
return existed
