hold_place()
return 1
