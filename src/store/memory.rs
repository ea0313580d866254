//! The in-memory store: the default for one process. Nothing survives a restart, and replicas cannot
//! share it (`is_distributed()` is false).
//!
//! Each session keeps its messages in a `VecDeque` ordered by seq, so the window and any page are
//! found by binary search and cost O(log n + page). So are a turn's messages, by turn id, as long
//! as turn ids grow with seqs (turns taking the session one after another; else a scan of the
//! session, which `SessionData::turns_ascend` notes). A session holds at most `max_messages`
//! messages: appending past the cap drops the oldest. Locks are `std::sync` locks held only for
//! in-memory work, never across an `.await`.
//!
//! Messages are kept in a compact form ([`StoredMessage`]): no copy of the session id, the text
//! as an exact-size `Arc<str>` (a turn's window shares it instead of copying it), and the fields
//! most messages leave empty (metadata, tool calls) behind one optional box. A stored message
//! costs about 100 bytes plus its text, against about 280 plus its text as a [`Message`]; reads
//! rebuild the `Message`s they return. Turn records are
//! kept the same way ([`StoredTurn`]: no session id, the error boxed, the ids an exact-size slice).

use std::collections::{BTreeSet, VecDeque};

use foldhash::{HashMap, HashMapExt};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use uuid::Uuid;

use super::{
    AppendBatch, ConversationStore, FinishedTurn, FusedTurns, IdempotencyBegin, IdempotencyRecord,
    LockOutcome, LockStatus, MessagePage, Order, PageQuery, SessionCursor, SessionPage, StoreBackend,
    StoreError, StoreResult, TurnBegin, TurnCoordinator,
};
use chrono::{DateTime, Utc};

use crate::domain::{
    Message, Metadata, NewSession, Role, Session, ToolCall, Turn, TurnStatus, Usage, WindowMessage, now,
};

/// Default cap on messages per session (`PARLEY_MEMORY_MAX_MESSAGES`).
pub const DEFAULT_MAX_MESSAGES: usize = 10_000;

/// How many locks the sessions are spread over: turns in different sessions seldom share one.
const SHARDS: usize = 64;

/// The sessions of one shard, by tenant.
type Shard = HashMap<String, TenantShard>;

/// (updated_at micros, id) of sessions, for listing newest first. The id is the session's own
/// `SessionData::key`, shared: moving a session in the index allocates nothing.
type Index = BTreeSet<(i64, Arc<str>)>;

/// One tenant's sessions in one shard, and their order by last update. The order lives in the
/// shard, under the lock a turn already holds: with one index lock per tenant, a worker thread
/// preempted while holding it stalled every other worker's turns for a scheduler tick
/// (bench/README.md). Listing merges the shards' orders.
#[derive(Debug, Default)]
struct TenantShard {
    sessions: HashMap<String, SessionData>,
    index: Index,
}

/// Moves a session in its shard's index.
fn touch(index: &mut Index, key: &Arc<str>, old_micros: i64, new_micros: i64) {
    if old_micros != new_micros {
        index.remove(&(old_micros, Arc::clone(key)));
        index.insert((new_micros, Arc::clone(key)));
    }
}

/// The in-memory conversation store.
#[derive(Debug)]
pub struct MemoryStore {
    /// The sessions, spread over `SHARDS` locks by (tenant, id). Critical sections are short,
    /// never await, and hold one shard at a time.
    shards: Box<[RwLock<Shard>]>,
    /// Capped creations of one tenant count and create under one of these gates, picked by the
    /// tenant, so two of them cannot both see room for one more session. Nothing else takes them:
    /// deleting only makes room.
    create_gates: Box<[Mutex<()>]>,
    /// Most messages one session keeps; the oldest go first.
    max_messages: usize,
}

/// A message as the memory store keeps it; [`StoredMessage::to_message`] rebuilds the `Message`.
#[derive(Debug)]
struct StoredMessage {
    id: Uuid,
    turn_id: Uuid,
    seq: u64,
    created_at: DateTime<Utc>,
    role: Role,
    /// Shared with the windows handed to turns, which then copy nothing.
    content: Arc<str>,
    /// Metadata, tool calls, tool call id and name; `None` when all are empty (most messages).
    extra: Option<Box<Extra>>,
}

/// The rarely used fields of a stored message.
#[derive(Debug)]
struct Extra {
    metadata: Metadata,
    tool_calls: Option<Vec<ToolCall>>,
    tool_call_id: Option<String>,
    name: Option<String>,
    /// The turn that replaced it, once superseded.
    superseded_by: Option<Uuid>,
}

impl StoredMessage {
    fn of(m: &Message) -> Self {
        let plain = m.metadata.is_empty()
            && m.tool_calls.is_none()
            && m.tool_call_id.is_none()
            && m.name.is_none()
            && m.superseded_by.is_none();
        let extra = (!plain).then(|| {
            Box::new(Extra {
                metadata: m.metadata.clone(),
                tool_calls: m.tool_calls.clone(),
                tool_call_id: m.tool_call_id.clone(),
                name: m.name.clone(),
                superseded_by: m.superseded_by,
            })
        });
        StoredMessage {
            id: m.id,
            turn_id: m.turn_id,
            seq: m.seq,
            created_at: m.created_at,
            role: m.role,
            content: m.content.as_str().into(),
            extra,
        }
    }

    /// Marks it superseded by `turn_id`.
    fn supersede(&mut self, turn_id: Uuid) {
        let extra = self.extra.get_or_insert_with(|| {
            Box::new(Extra {
                metadata: Metadata::new(),
                tool_calls: None,
                tool_call_id: None,
                name: None,
                superseded_by: None,
            })
        });
        extra.superseded_by = Some(turn_id);
    }

    fn to_window(&self) -> WindowMessage {
        let extra = self.extra.as_deref();
        WindowMessage {
            turn_id: self.turn_id,
            role: self.role,
            content: Arc::clone(&self.content),
            tool_calls: extra.and_then(|e| e.tool_calls.clone()),
            tool_call_id: extra.and_then(|e| e.tool_call_id.clone()),
            name: extra.and_then(|e| e.name.clone()),
        }
    }

    fn to_message(&self, session_id: &str) -> Message {
        let extra = self.extra.as_deref();
        Message {
            id: self.id,
            session_id: session_id.to_owned(),
            seq: self.seq,
            turn_id: self.turn_id,
            role: self.role,
            content: String::from(&*self.content),
            metadata: extra.map(|e| e.metadata.clone()).unwrap_or_default(),
            tool_calls: extra.and_then(|e| e.tool_calls.clone()),
            tool_call_id: extra.and_then(|e| e.tool_call_id.clone()),
            name: extra.and_then(|e| e.name.clone()),
            created_at: self.created_at,
            superseded_by: extra.and_then(|e| e.superseded_by),
        }
    }
}

/// A turn record as the memory store keeps it (its id is the map key).
#[derive(Debug)]
struct StoredTurn {
    status: TurnStatus,
    error: Option<Box<serde_json::Value>>,
    message_ids: Box<[Uuid]>,
    usage: Option<Usage>,
    created_at: DateTime<Utc>,
    completed_at: Option<DateTime<Utc>>,
}

impl StoredTurn {
    fn of(turn: &Turn) -> Self {
        StoredTurn {
            status: turn.status,
            error: turn.error.clone().map(Box::new),
            message_ids: turn.message_ids.as_slice().into(),
            usage: turn.usage,
            created_at: turn.created_at,
            completed_at: turn.completed_at,
        }
    }

    fn to_turn(&self, id: Uuid, session_id: &str) -> Turn {
        Turn {
            id,
            session_id: session_id.to_owned(),
            status: self.status,
            error: self.error.as_deref().cloned(),
            message_ids: self.message_ids.to_vec(),
            usage: self.usage,
            created_at: self.created_at,
            completed_at: self.completed_at,
        }
    }
}

#[derive(Debug)]
struct SessionData {
    session: Session,
    /// The session id as its tenant's index holds it.
    key: Arc<str>,
    messages: VecDeque<StoredMessage>,
    /// Messages an edit replaced, by seq, kept apart so that active reads never skip them.
    superseded: VecDeque<StoredMessage>,
    /// The last seq handed out; survives clears and trimming.
    last_seq: u64,
    /// Whether every message appended since the session was created (or last cleared) had a
    /// turn id at or above the one before it, as when turns take the session one after another
    /// (UUID v7 ids grow). Both lists are then ordered by turn id as well as by seq, so a turn's
    /// messages are found by binary search; otherwise by a scan (see `turn_messages`).
    turns_ascend: bool,
    /// Ended turns' records ordered by id, which is by start time (UUID v7): found by binary
    /// search, and a new record goes at the end. No map: no hashing, no table to grow.
    turns: VecDeque<(Uuid, StoredTurn)>,
    /// The running turn's record, kept apart from `turns` until it ends: a turn's record is
    /// written twice (running, then ended), and one turn runs per session, so `turns` is touched
    /// once per turn.
    running: Option<(Uuid, StoredTurn)>,
    /// The turn holding the session, if its lease has not run out.
    lock: Option<HeldLock>,
    /// Remembered idempotency keys and when they are forgotten.
    idempotency: HashMap<String, (IdempotencyRecord, Instant)>,
}

#[derive(Debug, Clone, Copy)]
struct HeldLock {
    turn_id: Uuid,
    expires: Instant,
    cancel_requested: bool,
}

impl MemoryStore {
    /// A store that keeps at most `max_messages` messages per session (at least 1).
    pub fn new(max_messages: usize) -> Self {
        MemoryStore {
            shards: (0..SHARDS).map(|_| RwLock::new(Shard::new())).collect(),
            create_gates: (0..SHARDS).map(|_| Mutex::new(())).collect(),
            max_messages: max_messages.max(1),
        }
    }

    fn shard(&self, tenant: &str, id: &str) -> &RwLock<Shard> {
        let mut hasher = std::hash::DefaultHasher::new();
        (tenant, id).hash(&mut hasher);
        &self.shards[(hasher.finish() % SHARDS as u64) as usize]
    }

    // A panic while holding a lock leaves data that is still consistent (every mutation is
    // completed before anything can panic), so a poisoned lock is used as is.
    fn read(&self, tenant: &str, id: &str) -> RwLockReadGuard<'_, Shard> {
        self.shard(tenant, id).read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self, tenant: &str, id: &str) -> RwLockWriteGuard<'_, Shard> {
        self.shard(tenant, id).write().unwrap_or_else(|e| e.into_inner())
    }

    fn create_gate(&self, tenant: &str) -> &Mutex<()> {
        let mut hasher = std::hash::DefaultHasher::new();
        tenant.hash(&mut hasher);
        &self.create_gates[(hasher.finish() % SHARDS as u64) as usize]
    }

    /// Every shard in turn, read-locked one at a time.
    fn each_shard(&self) -> impl Iterator<Item = RwLockReadGuard<'_, Shard>> {
        self.shards.iter().map(|shard| shard.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn with_session_mut<T>(
        &self,
        tenant: &str,
        id: &str,
        f: impl FnOnce(&mut SessionData) -> T,
    ) -> StoreResult<T> {
        let mut guard = self.write(tenant, id);
        let data =
            guard.get_mut(tenant).and_then(|t| t.sessions.get_mut(id)).ok_or(StoreError::SessionNotFound)?;
        Ok(f(data))
    }

    fn with_session<T>(&self, tenant: &str, id: &str, f: impl FnOnce(&SessionData) -> T) -> StoreResult<T> {
        let guard = self.read(tenant, id);
        let data = guard.get(tenant).and_then(|t| t.sessions.get(id)).ok_or(StoreError::SessionNotFound)?;
        Ok(f(data))
    }
}

impl MemoryStore {
    /// Forgets every expired idempotency key, one shard at a time; returns how many went. A key
    /// is also forgotten when its session next starts an idempotent request, but a session that
    /// never does would keep its keys: [`MemoryStore::spawn_purger`] runs this on a timer.
    pub fn purge_expired(&self) -> usize {
        let now = Instant::now();
        let mut purged = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.write().unwrap_or_else(|e| e.into_inner());
            for tenant in shard.values_mut() {
                for d in tenant.sessions.values_mut() {
                    let before = d.idempotency.len();
                    d.idempotency.retain(|_, (_, until)| *until > now);
                    purged += before - d.idempotency.len();
                }
            }
        }
        purged
    }

    /// Runs [`MemoryStore::purge_expired`] every `every` while the store lives.
    pub fn spawn_purger(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let store = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(store) = store.upgrade() else { return };
                let purged = store.purge_expired();
                if purged > 0 {
                    tracing::debug!(keys = purged, "forgot expired idempotency keys");
                }
            }
        })
    }

    /// How many idempotency keys the store remembers (expired ones included until purged).
    pub fn idempotency_keys(&self) -> usize {
        self.each_shard()
            .map(|shard| {
                shard
                    .values()
                    .map(|t| t.sessions.values().map(|d| d.idempotency.len()).sum::<usize>())
                    .sum::<usize>()
            })
            .sum()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new(DEFAULT_MAX_MESSAGES)
    }
}

impl MemoryStore {
    /// Creates a session unless one with its id exists.
    fn create(&self, tenant: &str, new: NewSession) -> StoreResult<Session> {
        self.create_holding(tenant, new, Vec::new()).map(|(session, _)| session)
    }

    /// Creates a session holding `messages` (seqs from 1), under one write lock: no reader sees
    /// the session without them.
    fn create_holding(
        &self,
        tenant: &str,
        new: NewSession,
        mut messages: Vec<Message>,
    ) -> StoreResult<(Session, Vec<Message>)> {
        let mut guard = self.write(tenant, &new.id);
        let t = guard.entry(tenant.to_owned()).or_default();
        if t.sessions.contains_key(&new.id) {
            return Err(StoreError::SessionExists);
        }
        let at = now();
        let session = Session {
            id: new.id.clone(),
            created_at: at,
            updated_at: at,
            system_prompt: new.system_prompt,
            metadata: new.metadata,
            message_count: 0,
        };
        let key: Arc<str> = new.id.as_str().into();
        t.index.insert((at.timestamp_micros(), Arc::clone(&key)));
        for (m, seq) in messages.iter_mut().zip(1..) {
            m.seq = seq;
            m.session_id.clone_from(&new.id);
        }
        let skip = messages.len().saturating_sub(self.max_messages);
        let kept: VecDeque<StoredMessage> = messages[skip..].iter().map(StoredMessage::of).collect();
        let turns_ascend = messages.windows(2).all(|w| w[0].turn_id <= w[1].turn_id);
        let session = Session { message_count: kept.len() as u64, ..session };
        let data = SessionData {
            session: session.clone(),
            key,
            messages: kept,
            superseded: VecDeque::new(),
            last_seq: messages.len() as u64,
            turns_ascend,
            turns: VecDeque::new(),
            running: None,
            lock: None,
            idempotency: HashMap::new(),
        };
        t.sessions.insert(new.id, data);
        Ok((session, messages))
    }

    /// How many sessions the tenant holds.
    fn count(&self, tenant: &str) -> u64 {
        self.each_shard().map(|shard| shard.get(tenant).map_or(0, |t| t.sessions.len() as u64)).sum()
    }

    /// Appends a batch to a session, only while `fence` (or `release`) holds it if one is
    /// given, and, if `release` holds the session, releases it.
    fn append_to(
        &self,
        tenant: &str,
        session_id: &str,
        batch: AppendBatch,
        fence: Option<Uuid>,
        release: Option<Uuid>,
    ) -> StoreResult<(Vec<Message>, bool)> {
        let mut guard = self.write(tenant, session_id);
        let t = guard.get_mut(tenant).ok_or(StoreError::SessionNotFound)?;
        let d = t.sessions.get_mut(session_id).ok_or(StoreError::SessionNotFound)?;
        if let Some(fence) = fence.or(release)
            && d.live_lock().is_none_or(|l| l.turn_id != fence)
        {
            return Err(StoreError::Fenced);
        }
        if let Some(from) = batch.supersede_from {
            let by = batch.turn.as_ref().map(|t| t.id).ok_or_else(|| {
                StoreError::Backend("an append that supersedes messages must carry its turn".into())
            })?;
            let at = d.messages.partition_point(|m| m.seq < from);
            for mut m in d.messages.drain(at..) {
                m.supersede(by);
                d.superseded.push_back(m);
            }
            d.superseded.make_contiguous().sort_by_key(|m| m.seq);
            while d.superseded.len() > self.max_messages {
                d.superseded.pop_front();
            }
        }
        let mut stored = batch.messages;
        let mut previous = d.newest_turn();
        for m in &mut stored {
            if previous.is_some_and(|p| p > m.turn_id) {
                d.turns_ascend = false;
            }
            previous = Some(m.turn_id);
            d.last_seq += 1;
            m.seq = d.last_seq;
            if m.session_id != session_id {
                m.session_id = session_id.to_owned();
            }
        }
        d.messages.extend(stored.iter().map(StoredMessage::of));
        while d.messages.len() > self.max_messages {
            d.messages.pop_front();
        }
        if let Some(turn) = &batch.turn {
            d.remember_turn(turn, self.max_messages);
        }
        if let Some(turn_id) = release
            && d.lock.is_some_and(|l| l.turn_id == turn_id)
        {
            d.lock = None;
        }
        if stored.is_empty() && batch.supersede_from.is_none() {
            // Only a turn record (a failed turn's): the history and the session are as they were.
            return Ok((stored, release.is_some()));
        }
        let old = d.session.updated_at.timestamp_micros();
        d.session.updated_at = now().max(d.session.updated_at);
        d.session.message_count = d.messages.len() as u64;
        let new = d.session.updated_at.timestamp_micros();
        touch(&mut t.index, &d.key, old, new);
        Ok((stored, release.is_some()))
    }
}

impl SessionData {
    fn remember_turn(&mut self, turn: &Turn, cap: usize) {
        // A turn's outcome, once written, never changes.
        if self.turn_record(turn.id).is_some_and(|r| r.status != TurnStatus::Running) {
            return;
        }
        if turn.status == TurnStatus::Running {
            // Another running record (a turn that never ended, say) moves to the map first.
            if let Some((id, old)) = self.running.take()
                && id != turn.id
            {
                self.file_turn(id, old, cap);
            }
            self.running = Some((turn.id, StoredTurn::of(turn)));
            return;
        }
        if self.running.as_ref().is_some_and(|(id, _)| *id == turn.id) {
            self.running = None;
        }
        self.file_turn(turn.id, StoredTurn::of(turn), cap);
    }

    /// The record of `id`, running or not.
    fn turn_record(&self, id: Uuid) -> Option<&StoredTurn> {
        match &self.running {
            Some((running, record)) if *running == id => Some(record),
            _ => self.turns.binary_search_by_key(&id, |(k, _)| *k).ok().map(|i| &self.turns[i].1),
        }
    }

    /// Files an ended turn's record, keeping at most `cap` (the oldest go first).
    fn file_turn(&mut self, id: Uuid, record: StoredTurn, cap: usize) {
        // The common case, the newest turn, goes at the end without a search (each step of a
        // binary search would touch another cache line).
        let newest = self.turns.back().is_none_or(|(last, _)| *last < id);
        let found =
            if newest { Err(self.turns.len()) } else { self.turns.binary_search_by_key(&id, |(k, _)| *k) };
        match found {
            Ok(at) => self.turns[at].1 = record,
            Err(at) => self.turns.insert(at, (id, record)),
        }
        while self.turns.len() > cap {
            self.turns.pop_front();
        }
    }

    /// Claims the session for a turn unless another live turn holds it.
    fn claim(&mut self, turn_id: Uuid, lease: Duration) -> LockOutcome {
        match self.live_lock() {
            Some(held) if held.turn_id != turn_id => LockOutcome::Busy(held.turn_id),
            held => {
                // Re-acquiring keeps a pending cancel request, so none is lost.
                let cancel_requested = held.is_some_and(|h| h.cancel_requested);
                self.lock = Some(HeldLock { turn_id, expires: Instant::now() + lease, cancel_requested });
                LockOutcome::Acquired
            }
        }
    }

    /// The turn of the last message appended (the highest seq held, active or superseded).
    fn newest_turn(&self) -> Option<Uuid> {
        match (self.messages.back(), self.superseded.back()) {
            (Some(a), Some(s)) => Some(if a.seq > s.seq { a.turn_id } else { s.turn_id }),
            (a, s) => a.or(s).map(|m| m.turn_id),
        }
    }

    /// The messages of one turn, active and superseded, in seq order: by binary search on the
    /// turn id when both lists are ordered by it (`turns_ascend`, the usual case: O(log n +
    /// the turn's messages)), else by a scan of the session's messages (at most the cap).
    fn turn(&self, turn_id: Uuid) -> Vec<Message> {
        fn of(msgs: &VecDeque<StoredMessage>, turn_id: Uuid, ordered: bool) -> Vec<&StoredMessage> {
            if ordered {
                let start = msgs.partition_point(|m| m.turn_id < turn_id);
                msgs.range(start..).take_while(|m| m.turn_id == turn_id).collect()
            } else {
                msgs.iter().filter(|m| m.turn_id == turn_id).collect()
            }
        }
        let mut found = of(&self.messages, turn_id, self.turns_ascend);
        if !self.superseded.is_empty() {
            found.extend(of(&self.superseded, turn_id, self.turns_ascend));
            found.sort_by_key(|m| m.seq);
        }
        found.into_iter().map(|m| m.to_message(&self.session.id)).collect()
    }

    /// The last `n` messages, oldest first.
    fn last(&self, n: usize) -> Vec<Message> {
        let skip = self.messages.len().saturating_sub(n);
        self.messages.range(skip..).map(|m| m.to_message(&self.session.id)).collect()
    }

    /// The last `n` messages as a turn's window, oldest first.
    fn window(&self, n: usize) -> Vec<WindowMessage> {
        let skip = self.messages.len().saturating_sub(n);
        self.messages.range(skip..).map(StoredMessage::to_window).collect()
    }

    /// The live lock, dropping one whose lease ran out.
    fn live_lock(&mut self) -> Option<&mut HeldLock> {
        if self.lock.is_some_and(|l| l.expires <= Instant::now()) {
            self.lock = None;
        }
        self.lock.as_mut()
    }

    fn live_idempotency(&mut self, key: &str) -> Option<&mut IdempotencyRecord> {
        if self.idempotency.get(key).is_some_and(|(_, until)| *until <= Instant::now()) {
            self.idempotency.remove(key);
        }
        self.idempotency.get_mut(key).map(|(record, _)| record)
    }

    fn page(&self, q: PageQuery) -> MessagePage {
        if q.include_superseded && !self.superseded.is_empty() {
            return self.page_with_superseded(q);
        }
        let msgs = &self.messages;
        let start = q.after.map_or(0, |a| msgs.partition_point(|m| m.seq <= a));
        let end = q.before.map_or(msgs.len(), |b| msgs.partition_point(|m| m.seq < b));
        let end = end.max(start);
        let available = end - start;
        let take = q.limit.min(available);
        let id = self.session.id.as_str();
        let messages: Vec<Message> = match q.order {
            Order::Asc => msgs.range(start..start + take).map(|m| m.to_message(id)).collect(),
            Order::Desc => msgs.range(end - take..end).rev().map(|m| m.to_message(id)).collect(),
        };
        MessagePage { messages, has_more: available > take }
    }
}

impl SessionData {
    /// A page over active and superseded messages together, in seq order: each list's page
    /// (found by binary search), merged.
    fn page_with_superseded(&self, q: PageQuery) -> MessagePage {
        fn take(msgs: &VecDeque<StoredMessage>, q: PageQuery) -> Vec<&StoredMessage> {
            let start = q.after.map_or(0, |a| msgs.partition_point(|m| m.seq <= a));
            let end = q.before.map_or(msgs.len(), |b| msgs.partition_point(|m| m.seq < b)).max(start);
            let n = (end - start).min(q.limit + 1);
            match q.order {
                Order::Asc => msgs.range(start..start + n).collect(),
                Order::Desc => msgs.range(end - n..end).rev().collect(),
            }
        }
        let mut both: Vec<&StoredMessage> = take(&self.messages, q);
        both.extend(take(&self.superseded, q));
        match q.order {
            Order::Asc => both.sort_by_key(|m| m.seq),
            Order::Desc => both.sort_by_key(|m| std::cmp::Reverse(m.seq)),
        }
        let has_more = both.len() > q.limit;
        both.truncate(q.limit);
        let id = self.session.id.as_str();
        MessagePage { messages: both.into_iter().map(|m| m.to_message(id)).collect(), has_more }
    }
}

#[async_trait]
impl StoreBackend for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    fn is_distributed(&self) -> bool {
        false
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }
}

#[async_trait]
impl ConversationStore for MemoryStore {
    async fn create_session(&self, tenant: &str, new: NewSession) -> StoreResult<Session> {
        self.create(tenant, new)
    }

    async fn create_session_within(&self, tenant: &str, new: NewSession, max: u64) -> StoreResult<Session> {
        let _gate = self.create_gate(tenant).lock().unwrap_or_else(|e| e.into_inner());
        if self.count(tenant) >= max {
            return Err(StoreError::SessionLimitReached(max));
        }
        self.create(tenant, new)
    }

    async fn create_session_with(
        &self,
        tenant: &str,
        new: NewSession,
        messages: Vec<Message>,
        max: u64,
    ) -> StoreResult<(Session, Vec<Message>)> {
        let _gate = self.create_gate(tenant).lock().unwrap_or_else(|e| e.into_inner());
        if self.count(tenant) >= max {
            return Err(StoreError::SessionLimitReached(max));
        }
        self.create_holding(tenant, new, messages)
    }

    async fn get_session(&self, tenant: &str, id: &str) -> StoreResult<Option<Session>> {
        match self.with_session(tenant, id, |d| d.session.clone()) {
            Ok(s) => Ok(Some(s)),
            Err(StoreError::SessionNotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list_sessions(
        &self,
        tenant: &str,
        limit: usize,
        cursor: Option<&SessionCursor>,
    ) -> StoreResult<SessionPage> {
        // The page's keys first, merged from every shard's order (each shard gives at most a
        // page and one), then each session from its shard, one lock at a time.
        let want = limit.saturating_add(1);
        let before = cursor.map(|c| (c.updated_at_micros, Arc::<str>::from(c.id.as_str())));
        let mut keys: Vec<(i64, Arc<str>)> = Vec::new();
        for shard in self.each_shard() {
            let Some(t) = shard.get(tenant) else { continue };
            let newest_first: Box<dyn Iterator<Item = &(i64, Arc<str>)>> = match &before {
                Some(before) => Box::new(t.index.range(..before.clone()).rev()),
                None => Box::new(t.index.iter().rev()),
            };
            keys.extend(newest_first.take(want).cloned());
        }
        keys.sort_unstable_by(|a, b| b.cmp(a));
        keys.truncate(want);
        let has_more = keys.len() > limit;
        let sessions = keys
            .iter()
            .take(limit)
            .filter_map(|(_, id)| self.with_session(tenant, id, |d| d.session.clone()).ok())
            .collect();
        Ok(SessionPage { sessions, has_more })
    }

    async fn delete_session(&self, tenant: &str, id: &str) -> StoreResult<bool> {
        let mut guard = self.write(tenant, id);
        let Some(t) = guard.get_mut(tenant) else {
            return Ok(false);
        };
        let Some(d) = t.sessions.remove(id) else {
            return Ok(false);
        };
        t.index.remove(&(d.session.updated_at.timestamp_micros(), d.key));
        if t.sessions.is_empty() {
            guard.remove(tenant);
        }
        Ok(true)
    }

    async fn set_session_metadata(
        &self,
        tenant: &str,
        id: &str,
        metadata: Metadata,
    ) -> StoreResult<Option<Session>> {
        let set = self.with_session_mut(tenant, id, |d| {
            d.session.metadata = metadata;
            d.session.clone()
        });
        match set {
            Ok(s) => Ok(Some(s)),
            Err(StoreError::SessionNotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn append(&self, tenant: &str, session_id: &str, batch: AppendBatch) -> StoreResult<Vec<Message>> {
        Ok(self.append_to(tenant, session_id, batch, None, None)?.0)
    }

    async fn read_page(&self, tenant: &str, session_id: &str, query: PageQuery) -> StoreResult<MessagePage> {
        self.with_session(tenant, session_id, |d| d.page(query))
    }

    async fn last_n(&self, tenant: &str, session_id: &str, n: usize) -> StoreResult<Vec<Message>> {
        self.with_session(tenant, session_id, |d| d.last(n))
    }

    async fn turn_messages(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
    ) -> StoreResult<Vec<Message>> {
        self.with_session(tenant, session_id, |d| d.turn(turn_id))
    }

    async fn clear(&self, tenant: &str, session_id: &str) -> StoreResult<()> {
        let mut guard = self.write(tenant, session_id);
        let t = guard.get_mut(tenant).ok_or(StoreError::SessionNotFound)?;
        let d = t.sessions.get_mut(session_id).ok_or(StoreError::SessionNotFound)?;
        d.messages = VecDeque::new();
        d.superseded = VecDeque::new();
        d.turns_ascend = true;
        let old = d.session.updated_at.timestamp_micros();
        d.session.updated_at = now().max(d.session.updated_at);
        d.session.message_count = 0;
        let new = d.session.updated_at.timestamp_micros();
        touch(&mut t.index, &d.key, old, new);
        Ok(())
    }

    async fn put_turn(&self, tenant: &str, turn: &Turn) -> StoreResult<()> {
        let max = self.max_messages;
        self.with_session_mut(tenant, &turn.session_id, |d| d.remember_turn(turn, max))
    }

    async fn get_turn(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<Option<Turn>> {
        match self.with_session(tenant, session_id, |d| {
            d.turn_record(turn_id).map(|t| t.to_turn(turn_id, &d.session.id))
        }) {
            Err(StoreError::SessionNotFound) => Ok(None),
            other => other,
        }
    }

    async fn count_sessions(&self, tenant: &str) -> StoreResult<u64> {
        Ok(self.count(tenant))
    }
}

#[async_trait]
impl TurnCoordinator for MemoryStore {
    async fn acquire_turn_lock(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<LockOutcome> {
        self.with_session_mut(tenant, session_id, |d| d.claim(turn_id, lease))
    }

    async fn renew_turn_lock(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: Uuid,
        lease: Duration,
    ) -> StoreResult<LockStatus> {
        let status = self.with_session_mut(tenant, session_id, |d| match d.live_lock() {
            Some(held) if held.turn_id == turn_id => {
                held.expires = Instant::now() + lease;
                LockStatus { held: true, cancel_requested: held.cancel_requested }
            }
            _ => LockStatus { held: false, cancel_requested: false },
        });
        match status {
            Err(StoreError::SessionNotFound) => Ok(LockStatus { held: false, cancel_requested: false }),
            other => other,
        }
    }

    async fn release_turn_lock(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<()> {
        let released = self.with_session_mut(tenant, session_id, |d| {
            if d.lock.is_some_and(|l| l.turn_id == turn_id) {
                d.lock = None;
            }
        });
        match released {
            Err(StoreError::SessionNotFound) => Ok(()),
            other => other,
        }
    }

    async fn turn_lock_holder(&self, tenant: &str, session_id: &str) -> StoreResult<Option<Uuid>> {
        self.with_session_mut(tenant, session_id, |d| d.live_lock().map(|l| l.turn_id))
    }

    async fn request_cancel(&self, tenant: &str, session_id: &str, turn_id: Uuid) -> StoreResult<bool> {
        self.with_session_mut(tenant, session_id, |d| match d.live_lock() {
            Some(held) if held.turn_id == turn_id => {
                held.cancel_requested = true;
                true
            }
            _ => false,
        })
    }

    async fn begin_idempotent(
        &self,
        tenant: &str,
        session_id: &str,
        key: &str,
        fingerprint: &str,
        turn_id: Uuid,
        ttl: Duration,
    ) -> StoreResult<IdempotencyBegin> {
        self.with_session_mut(tenant, session_id, |d| {
            let now = Instant::now();
            d.idempotency.retain(|k, (_, until)| *until > now || k == key);
            if let Some(existing) = d.live_idempotency(key) {
                return IdempotencyBegin::Existing(existing.clone());
            }
            let record = IdempotencyRecord { fingerprint: fingerprint.to_owned(), turn_id, response: None };
            d.idempotency.insert(key.to_owned(), (record, Instant::now() + ttl));
            IdempotencyBegin::Started
        })
    }

    async fn complete_idempotent(
        &self,
        tenant: &str,
        session_id: &str,
        key: &str,
        response: &serde_json::Value,
        ttl: Duration,
    ) -> StoreResult<()> {
        self.with_session_mut(tenant, session_id, |d| {
            if d.live_idempotency(key).is_some()
                && let Some((record, until)) = d.idempotency.get_mut(key)
            {
                record.response = Some(response.clone());
                *until = Instant::now() + ttl;
            }
        })
    }

    async fn abort_idempotent(&self, tenant: &str, session_id: &str, key: &str) -> StoreResult<()> {
        match self.with_session_mut(tenant, session_id, |d| d.idempotency.remove(key)) {
            Err(StoreError::SessionNotFound) | Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[async_trait]
impl FusedTurns for MemoryStore {
    async fn begin_turn(
        &self,
        tenant: &str,
        turn: &Turn,
        window: usize,
        lease: Duration,
    ) -> StoreResult<TurnBegin> {
        self.with_session_mut(tenant, &turn.session_id, |d| match d.claim(turn.id, lease) {
            LockOutcome::Busy(holder) => TurnBegin::Busy(holder),
            LockOutcome::Acquired => {
                d.remember_turn(turn, self.max_messages);
                TurnBegin::Started {
                    system_prompt: d.session.system_prompt.clone(),
                    window: d.window(window),
                }
            }
        })
    }

    async fn append_fenced(
        &self,
        tenant: &str,
        session_id: &str,
        batch: AppendBatch,
        turn_id: Uuid,
    ) -> StoreResult<Vec<Message>> {
        Ok(self.append_to(tenant, session_id, batch, Some(turn_id), None)?.0)
    }

    async fn finish_turn(
        &self,
        tenant: &str,
        session_id: &str,
        batch: AppendBatch,
        turn_id: Uuid,
    ) -> StoreResult<FinishedTurn> {
        let (messages, lock_released) = self.append_to(tenant, session_id, batch, None, Some(turn_id))?;
        Ok(FinishedTurn { messages, lock_released })
    }
}
