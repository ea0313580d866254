-- parley conversation store, schema 6: the queue of turns waiting for a session.
--
-- A turn posted with `if_busy: wait` while another runs takes a place here, so that waiters are
-- served in arrival order across every replica. A waiter renews its place while it waits; a place
-- not renewed for `PARLEY_TURN_LEASE` lapses (its replica died) and is dropped.

create table if not exists turn_queue (
    tenant text not null,
    session_id text not null,
    turn_id uuid not null,
    ticket bigint generated always as identity,
    expires_at timestamptz not null,
    primary key (tenant, session_id, turn_id)
);

create index if not exists turn_queue_order_idx on turn_queue (tenant, session_id, ticket);
create index if not exists turn_queue_expiry_idx on turn_queue (expires_at);
