-- parley conversation store, schema 3: edits and regenerations supersede messages.
--
-- A session's messages are now those of `messages` with seq above `floor_seq` (what a clear or
-- the per-session cap gave up). Before, they were the seqs in (last_seq - message_count,
-- last_seq], which assumed the kept seqs were contiguous; an edit leaves a gap, so the floor is
-- kept apart. Messages an edit replaced move to `superseded_messages`, with the turn that
-- replaced them: active reads (pages, the window) scan `messages` only, and stay O(page).

alter table sessions add column floor_seq bigint;
update sessions set floor_seq = last_seq - message_count;
alter table sessions alter column floor_seq set not null;
alter table sessions alter column floor_seq set default 0;

create table superseded_messages (
    tenant        text collate "C" not null,
    session_id    text collate "C" not null,
    seq           bigint not null check (seq > 0),
    id            uuid not null,
    turn_id       uuid not null,
    role          text not null check (role in ('system', 'user', 'assistant', 'tool')),
    content       text not null,
    metadata      json not null,
    tool_calls    json,
    tool_call_id  text,
    name          text,
    created_at    timestamptz not null,
    superseded_by uuid not null,
    -- The superseded view merges a range scan of this key with one of messages'.
    primary key (tenant, session_id, seq),
    foreign key (tenant, session_id) references sessions (tenant, id) on delete cascade
);
