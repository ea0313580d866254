-- parley conversation store, schema 5: the turn event log.
--
-- Every event of a running turn, with its event id, so that any replica can serve any turn's
-- stream from any event id. A turn's log (`turn_logs`) goes `PARLEY_EVENT_TTL` after its last
-- append (the sweeper deletes it, its events with it). Appends are announced with `pg_notify`
-- (channel `parley_events`, or `parley_events_<schema>`; payload: the turn id).

create table if not exists turn_logs (
    turn_id uuid primary key,
    tenant text not null,
    session_id text not null,
    expires_at timestamptz not null
);

create index if not exists turn_logs_expiry_idx on turn_logs (expires_at);

create table if not exists turn_events (
    turn_id uuid not null references turn_logs (turn_id) on delete cascade,
    id bigint not null,
    body text not null,
    primary key (turn_id, id)
);
