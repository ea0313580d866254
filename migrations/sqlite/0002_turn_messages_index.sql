-- parley conversation store on SQLite, schema 2: a turn's messages, found by index (as
-- ../0004_turn_messages_index.sql for PostgreSQL). `turn_messages` reads the messages of one
-- turn, active and superseded, wherever they are in the history: an index search of each table
-- instead of a scan of the session (`seq` last: the rows come in order, above the floor).

create index messages_turn_idx on messages (tenant, session_id, turn_id, seq);

create index superseded_messages_turn_idx on superseded_messages (tenant, session_id, turn_id, seq);
