select pg_advisory_xact_lock(hashtextextended('parley.create_session:' || $1, 0))
