-- parley conversation store, schema 7: the turn event log keeps a batch of events per row.
--
-- A replica appends what its running turns produced since its last append, all turns in one
-- statement: one row per turn and append (its events' bodies, ids `first_id`..`last_id`) costs a
-- fraction of a row per event. A batch retried after an unknown outcome has the same `last_id`
-- (skipped) or a greater one (added whole; readers skip the events it repeats). Rows of up to
-- 8 kB stay in the heap page uncompressed. The per-event table of schema 5 goes: what it held is
-- the log of turns running during the upgrade, whose followers are then told their outcome.

drop table if exists turn_events;

create table if not exists turn_event_batches (
    turn_id uuid not null references turn_logs (turn_id) on delete cascade,
    last_id bigint not null,
    first_id bigint not null,
    bodies text[] not null,
    primary key (turn_id, last_id)
) with (toast_tuple_target = 8160);

-- A session's logs go with it when it is deleted or its history cleared.
create index if not exists turn_logs_session_idx on turn_logs (tenant, session_id);
