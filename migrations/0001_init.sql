-- parley conversation store, schema 1: sessions, their messages and their turn records.
--
-- Every table is keyed by tenant first: one tenant never reaches another's rows.
-- Ids and tenants use the "C" collation so that list order (updated_at desc, id desc) is byte
-- order, exactly as the other backends sort.
--
-- Why `json` and not `jsonb` for metadata, tool calls and turn errors: the API promises that
-- client JSON comes back exactly as given, key order included. jsonb re-sorts keys, drops
-- duplicate keys and rejects "\u0000", so it cannot keep that promise; json keeps the text as
-- sent (it is still validated on write). The json operators (->, ->>, json_typeof) work on these
-- columns, and an expression index such as `((metadata::jsonb) jsonb_path_ops)` can be added
-- the day a query needs one. Turn usage is parley's own fixed struct, so it is jsonb.
--
-- Message seqs: sessions.last_seq is the last seq handed out; it only grows (clear and trimming
-- keep it), so a seq is never reused. The messages a session holds are exactly those with
-- seq in (last_seq - message_count, last_seq]; readers filter on that window, so a row that a
-- cap or a clear has already given up is never shown even before it is physically deleted.

create table sessions (
    tenant        text collate "C" not null,
    id            text collate "C" not null,
    created_at    timestamptz not null,
    updated_at    timestamptz not null,
    system_prompt text,
    metadata      json not null,
    message_count bigint not null default 0 check (message_count >= 0),
    last_seq      bigint not null default 0 check (last_seq >= message_count),
    expires_at    timestamptz,
    primary key (tenant, id)
);

-- The session list: newest updated first, ties by id descending.
create index sessions_list_idx on sessions (tenant, updated_at desc, id desc);

-- The TTL sweeper's batches.
create index sessions_expires_at_idx on sessions (expires_at) where expires_at is not null;

create table messages (
    tenant       text collate "C" not null,
    session_id   text collate "C" not null,
    seq          bigint not null check (seq > 0),
    id           uuid not null,
    turn_id      uuid not null,
    role         text not null check (role in ('system', 'user', 'assistant', 'tool')),
    content      text not null,
    metadata     json not null,
    tool_calls   json,
    tool_call_id text,
    name         text,
    created_at   timestamptz not null,
    -- Pages and windows are range scans of this key.
    primary key (tenant, session_id, seq),
    foreign key (tenant, session_id) references sessions (tenant, id) on delete cascade
);

create table turns (
    tenant       text collate "C" not null,
    session_id   text collate "C" not null,
    id           uuid not null,
    status       text not null check (status in ('running', 'completed', 'failed', 'cancelled')),
    error        json,
    message_ids  uuid[] not null,
    usage        jsonb,
    created_at   timestamptz not null,
    completed_at timestamptz,
    primary key (tenant, session_id, id),
    foreign key (tenant, session_id) references sessions (tenant, id) on delete cascade
);
