-- parley conversation store on SQLite, schema 1: the whole schema of the PostgreSQL store's
-- migrations 0001 to 0003 (see ../0001_init.sql for the reasoning), in SQLite's terms.
--
-- Times are integers, microseconds since the epoch (UTC); ids are 16-byte blobs (UUID v7, so
-- byte order is start order); JSON is text exactly as serde wrote it (key order kept). Text
-- compares by bytes (BINARY), the order every other backend lists sessions in.
--
-- A session's messages are the rows of `messages` with seq above `floor_seq` (what a clear or
-- the per-session cap gave up); `last_seq` is the last seq handed out and only grows. Messages an
-- edit replaced move to `superseded_messages`, so that active reads never scan them.

create table sessions (
    tenant        text not null,
    id            text not null,
    created_at    integer not null,
    updated_at    integer not null,
    system_prompt text,
    metadata      text not null,
    message_count integer not null default 0 check (message_count >= 0),
    last_seq      integer not null default 0,
    floor_seq     integer not null default 0,
    expires_at    integer,
    primary key (tenant, id)
);

-- The session list: newest updated first, ties by id descending.
create index sessions_list_idx on sessions (tenant, updated_at desc, id desc);

-- The TTL sweeper's batches.
create index sessions_expires_at_idx on sessions (expires_at) where expires_at is not null;

create table messages (
    tenant       text not null,
    session_id   text not null,
    seq          integer not null check (seq > 0),
    id           blob not null,
    turn_id      blob not null,
    role         text not null check (role in ('system', 'user', 'assistant', 'tool')),
    content      text not null,
    metadata     text not null,
    tool_calls   text,
    tool_call_id text,
    name         text,
    created_at   integer not null,
    -- Pages and windows are range scans of this key.
    primary key (tenant, session_id, seq),
    foreign key (tenant, session_id) references sessions (tenant, id) on delete cascade
);

create table superseded_messages (
    tenant        text not null,
    session_id    text not null,
    seq           integer not null check (seq > 0),
    id            blob not null,
    turn_id       blob not null,
    role          text not null check (role in ('system', 'user', 'assistant', 'tool')),
    content       text not null,
    metadata      text not null,
    tool_calls    text,
    tool_call_id  text,
    name          text,
    created_at    integer not null,
    superseded_by blob not null,
    primary key (tenant, session_id, seq),
    foreign key (tenant, session_id) references sessions (tenant, id) on delete cascade
);

create table turns (
    tenant       text not null,
    session_id   text not null,
    id           blob not null,
    status       text not null check (status in ('running', 'completed', 'failed', 'cancelled')),
    error        text,
    message_ids  text not null,
    usage        text,
    created_at   integer not null,
    completed_at integer,
    primary key (tenant, session_id, id),
    foreign key (tenant, session_id) references sessions (tenant, id) on delete cascade
);

-- At most one turn holds a session; a row whose lease ran out is free for the next claim.
create table turn_locks (
    tenant           text not null,
    session_id       text not null,
    turn_id          blob not null,
    expires_at       integer not null,
    cancel_requested integer not null default 0,
    primary key (tenant, session_id),
    foreign key (tenant, session_id) references sessions (tenant, id) on delete cascade
);

-- Remembered Idempotency-Key headers; the response is JSON text, byte for byte.
create table idempotency_keys (
    tenant      text not null,
    session_id  text not null,
    key         text not null,
    fingerprint text not null,
    turn_id     blob not null,
    response    text,
    expires_at  integer not null,
    primary key (tenant, session_id, key),
    foreign key (tenant, session_id) references sessions (tenant, id) on delete cascade
);

-- The sweeper's batches of expired keys.
create index idempotency_keys_expires_at_idx on idempotency_keys (expires_at);

-- One row, rewritten at every start: proves the file is writable before parley serves.
create table store_meta (
    k text primary key,
    v integer not null
);
