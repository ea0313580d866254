-- parley conversation store, schema 4: a turn's messages, found by index.
--
-- `turn_messages` reads the messages of one turn, active and superseded, wherever they are in
-- the history (following a finished turn, regenerating the last one). These indexes make that an
-- index scan of the turn's rows instead of a scan of the session's; with `seq` last, each table's
-- rows come in seq order, from the session's floor on.
--
-- They are built in this migration's transaction, which holds off writes to the two tables while
-- they build (the longer, the more rows). To upgrade a large database without that pause,
-- create them first without blocking writers, check that neither is left invalid by a failed
-- build (`\d messages`), then migrate: this file finds them and only records itself.
--   create index concurrently if not exists messages_turn_idx
--     on messages (tenant, session_id, turn_id, seq);
--   create index concurrently if not exists superseded_messages_turn_idx
--     on superseded_messages (tenant, session_id, turn_id, seq);

create index if not exists messages_turn_idx on messages (tenant, session_id, turn_id, seq);

create index if not exists superseded_messages_turn_idx
    on superseded_messages (tenant, session_id, turn_id, seq);
