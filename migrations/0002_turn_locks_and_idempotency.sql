-- parley conversation store, schema 2: turn locks and idempotency keys.
--
-- Both live with their session: the foreign keys cascade, so deleting a session (or the TTL
-- sweeper deleting an expired one) deletes its lock and its keys. Expiry is a column, compared
-- with now() by every statement: a row past its expires_at counts as absent until something
-- deletes or replaces it.

-- At most one turn holds a session. A row whose lease ran out is free for the next acquire, which
-- replaces it (and its cancel flag) in place.
create table turn_locks (
    tenant           text collate "C" not null,
    session_id       text collate "C" not null,
    turn_id          uuid not null,
    expires_at       timestamptz not null,
    cancel_requested boolean not null default false,
    primary key (tenant, session_id),
    foreign key (tenant, session_id) references sessions (tenant, id) on delete cascade
);

-- Remembered Idempotency-Key headers. The response is json, not jsonb, for the reason 0001
-- gives: it must come back byte for byte, key order included.
create table idempotency_keys (
    tenant      text collate "C" not null,
    session_id  text collate "C" not null,
    key         text collate "C" not null,
    fingerprint text not null,
    turn_id     uuid not null,
    response    json,
    expires_at  timestamptz not null,
    primary key (tenant, session_id, key),
    foreign key (tenant, session_id) references sessions (tenant, id) on delete cascade
);

-- The TTL sweeper's batches of expired keys.
create index idempotency_keys_expires_at_idx on idempotency_keys (expires_at);
