if redis.call('EXISTS', meta) == 0 then return 0 end
save_turn(ARGV[5], ARGV[6])
refresh()
return 1
