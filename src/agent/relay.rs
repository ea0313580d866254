//! A turn's events through the store's event log, so that any replica serves any turn's stream:
//! this process's [`LogWriter`] relays every streamed turn's feed into the log, all turns at
//! once (one append of every turn with news per round trip, however many events came
//! meanwhile), and a follower on any replica reads the log after the last event it sent, then
//! sleeps until the log announces more.
//!
//! A follower that hears nothing for [`IDLE_CHECK`] reads the turn's record once: a turn that
//! ended without logging its end (its log expired, it was a JSON turn, its replica died and the
//! lease ran out) is then told by its outcome, as a replica without a log tells it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::feed::TurnFeed;
use super::{Agent, TurnEvent};
use crate::domain::{Turn, TurnStatus};
use crate::store::event_log::{EventWatch, LoggedEvent, MAX_TURNS_PER_APPEND, TurnAppend, TurnEventLog};
use crate::store::{DynCoordinator, LeaseKey, StoreResult};

/// How long a follower waits for news before it reads the turn's record.
pub const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Most events a follower reads from the log at once.
const READ_BATCH: usize = 256;

/// Most events of one turn in one append.
const TURN_BATCH: usize = 512;

/// Most events in one append, all turns together.
const APPEND_BATCH: usize = 4096;

/// Appends in flight at once (each turn in at most one of them): while one waits for the store,
/// the next carries what came meanwhile.
const IN_FLIGHT: usize = 2;

/// How long the writer keeps retrying a turn's append the store refuses, once the turn has ended.
const GIVE_UP_AFTER_END: Duration = Duration::from_secs(30);

/// The first pause after a failed append (doubling up to a second while the store fails).
const FIRST_PAUSE: Duration = Duration::from_millis(20);

/// Relays the feeds of this process's streamed turns into the coordinator's event log: one task,
/// running while there are turns to relay, appends every turn's new events together, the turns
/// served longest ago first. A failed append is retried (with what came since) until it
/// succeeds: the log never has a gap. A turn that has ended while the store refuses its appends,
/// and goes on refusing them for [`GIVE_UP_AFTER_END`], is given up; followers then learn its
/// outcome from the turn's record. The task, once running, appends to the source and with the
/// ttl it was started with (an agent's are always the same).
#[derive(Debug)]
pub(super) struct LogWriter {
    shared: Arc<Shared>,
    /// [`GIVE_UP_AFTER_END`], but for tests.
    give_up_after_end: Duration,
}

impl Default for LogWriter {
    fn default() -> Self {
        LogWriter { shared: Arc::default(), give_up_after_end: GIVE_UP_AFTER_END }
    }
}

#[derive(Debug, Default)]
struct Shared {
    /// Told by every relayed feed of each push and of its close, and of what joins.
    news: Arc<Notify>,
    state: Mutex<Joining>,
}

#[derive(Debug, Default)]
struct Joining {
    /// Turns to relay that the task has not taken yet.
    turns: Vec<Relayed>,
    /// Sessions forgotten (deleted, or their history cleared) whose turns the task is to drop.
    forgotten: Vec<(String, String)>,
    /// Whether the task runs (it ends once it has nothing left to write).
    running: bool,
}

/// A turn being relayed.
#[derive(Debug)]
struct Relayed {
    key: LeaseKey,
    feed: Arc<TurnFeed>,
    /// Events written so far.
    written: usize,
    /// Whether an append carrying its events is in flight.
    in_flight: bool,
    /// Whether its session was forgotten: nothing more of it is written.
    dropped: bool,
    /// Since when its feed has been closed.
    ended_at: Option<Instant>,
    /// Since when the store has refused its appends, while it does.
    failing_since: Option<Instant>,
    /// The append it was last sent in (a count): the turns served longest ago go first.
    last_sent: u64,
}

impl Relayed {
    /// A turn whose events are all to be written.
    fn new(key: LeaseKey, feed: Arc<TurnFeed>) -> Self {
        Relayed {
            key,
            feed,
            written: 0,
            in_flight: false,
            dropped: false,
            ended_at: None,
            failing_since: None,
            last_sent: 0,
        }
    }

    fn of_session(&self, (tenant, session): &(String, String)) -> bool {
        self.key.tenant == *tenant && self.key.session_id == *session
    }
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, Joining> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What holds the event log the writer appends to: the coordinator (or, in tests, a log alone).
pub(super) trait LogSource: Clone + Send + Sync + 'static {
    /// The log, if there is one.
    fn log(&self) -> Option<&dyn TurnEventLog>;
}

impl LogSource for DynCoordinator {
    fn log(&self) -> Option<&dyn TurnEventLog> {
        self.event_log()
    }
}

impl LogWriter {
    /// Relays `feed` (the events of turn `key`) into the log, keeping the turn's log for `ttl`
    /// after each append. The writing task runs on `tracker`.
    pub(super) fn relay<S: LogSource>(
        &self,
        source: &S,
        key: LeaseKey,
        feed: &Arc<TurnFeed>,
        ttl: Duration,
        tracker: &TaskTracker,
    ) {
        feed.tell(Arc::clone(&self.shared.news));
        let turn = Relayed::new(key, Arc::clone(feed));
        let mut state = self.shared.state();
        state.turns.push(turn);
        if !std::mem::replace(&mut state.running, true) {
            let give_up = self.give_up_after_end;
            tracker.spawn(write(Arc::clone(&self.shared), source.clone(), ttl, give_up));
        }
        drop(state);
        self.shared.news.notify_one();
    }

    /// Stops relaying the turns of a session whose logs are being dropped (it was deleted, or its
    /// history cleared): nothing more of them is written here, and an append of theirs that was
    /// in flight is followed by dropping the session's logs again.
    pub(super) fn forget_session(&self, tenant: &str, session_id: &str) {
        let session = (tenant.to_owned(), session_id.to_owned());
        let mut state = self.shared.state();
        state.turns.retain(|turn| !turn.of_session(&session));
        if state.running {
            state.forgotten.push(session);
            drop(state);
            self.shared.news.notify_one();
        }
    }
}

/// What an append carried: each turn and how many of its events.
type Sent = (Vec<(Uuid, usize)>, StoreResult<()>);

/// The writing task: until no turn is left, appends what the turns not in flight have new (up to
/// [`IN_FLIGHT`] appends at once), then waits for news or an answer.
async fn write<S: LogSource>(shared: Arc<Shared>, source: S, ttl: Duration, give_up: Duration) {
    if source.log().is_none() {
        let mut joining = shared.state();
        joining.turns.clear();
        joining.running = false;
        return;
    }
    let mut turns: HashMap<Uuid, Relayed> = HashMap::new();
    let mut in_flight: FuturesUnordered<BoxFuture<'static, Sent>> = FuturesUnordered::new();
    let mut appends = 0u64;
    let mut pause = FIRST_PAUSE;
    let mut paused_until: Option<Instant> = None;
    let mut warned = false;
    loop {
        {
            let mut joining = shared.state();
            turns.extend(joining.turns.drain(..).map(|t| (t.key.turn_id, t)));
            for session in joining.forgotten.drain(..) {
                turns.values_mut().filter(|t| t.of_session(&session)).for_each(|t| t.dropped = true);
            }
            forget_done(&mut turns, give_up);
            if turns.is_empty() && in_flight.is_empty() {
                joining.running = false;
                return;
            }
        }
        if paused_until.is_some_and(|at| at <= Instant::now()) {
            paused_until = None;
        }
        let can_send = in_flight.len() < IN_FLIGHT && paused_until.is_none();
        if can_send {
            appends += 1;
            let batch = compose(&mut turns, appends);
            if !batch.is_empty() {
                let source = source.clone();
                in_flight.push(Box::pin(async move {
                    let log = source.log().expect("checked when the writer started");
                    let result = log.append_events(&batch, ttl).await;
                    (batch.iter().map(|a| (a.turn.turn_id, a.events.len())).collect(), result)
                }));
                continue;
            }
        }
        let pause_over = async {
            match paused_until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(sent) = in_flight.next(), if !in_flight.is_empty() => {
                let refound = settle(&mut turns, &sent);
                if !refound.is_empty() {
                    // An append of a forgotten session's turn was in flight: it may have logged
                    // again after the session's logs were dropped. Drop them once more.
                    let source = source.clone();
                    in_flight.push(Box::pin(async move {
                        let log = source.log().expect("checked when the writer started");
                        let mut result = Ok(());
                        for (tenant, session) in &refound {
                            result = result.and(log.forget_session(tenant, session).await);
                        }
                        (Vec::new(), result)
                    }));
                }
                match sent.1 {
                    Ok(()) => {
                        pause = FIRST_PAUSE;
                        warned = false;
                    }
                    Err(e) => {
                        if !std::mem::replace(&mut warned, true) {
                            tracing::warn!(error = %e, "cannot log the turns' events; retrying");
                        }
                        paused_until = Some(Instant::now() + pause);
                        pause = (pause * 2).min(Duration::from_secs(1));
                    }
                }
            }
            // Only when an append could go: what came meanwhile is read after every answer.
            () = shared.news.notified(), if can_send => {}
            () = pause_over => {}
        }
    }
}

/// Forgets the turns whose feed is closed and written, those of forgotten sessions, and those
/// given up: ended, and refused by the store for `give_up` since (the later of the two).
fn forget_done(turns: &mut HashMap<Uuid, Relayed>, give_up: Duration) {
    turns.retain(|_, turn| {
        if turn.in_flight {
            return true;
        }
        if turn.dropped {
            return false;
        }
        let (len, closed) = turn.feed.state();
        if closed && turn.ended_at.is_none() {
            turn.ended_at = Some(Instant::now());
        }
        if closed && turn.written >= len {
            return false;
        }
        if let (Some(ended), Some(failing)) = (turn.ended_at, turn.failing_since)
            && ended.max(failing).elapsed() > give_up
        {
            tracing::warn!(turn.id = %turn.key.turn_id, "gave up logging the turn's events");
            return false;
        }
        true
    });
}

/// The next append (number `append`): the new events of the turns not in flight, those served
/// longest ago first, within the bounds of one append; its turns are marked in flight.
fn compose(turns: &mut HashMap<Uuid, Relayed>, append: u64) -> Vec<TurnAppend> {
    let mut waiting: Vec<&mut Relayed> =
        turns.values_mut().filter(|t| !t.in_flight && !t.dropped && t.feed.state().0 > t.written).collect();
    waiting.sort_unstable_by_key(|t| t.last_sent);
    let mut appends = Vec::new();
    let mut room = APPEND_BATCH;
    for turn in waiting {
        if room == 0 || appends.len() == MAX_TURNS_PER_APPEND {
            break;
        }
        let events = turn.feed.encode_from(turn.written, TURN_BATCH.min(room), |i, event| LoggedEvent {
            id: i as u64 + 1,
            body: event.encode(),
        });
        if events.is_empty() {
            continue;
        }
        room -= events.len();
        turn.in_flight = true;
        turn.last_sent = append;
        appends.push(TurnAppend { turn: turn.key.clone(), events });
    }
    appends
}

/// Records what an append wrote (or, if it failed, that its turns are to be sent again). Returns
/// the forgotten sessions it carried turns of.
fn settle(turns: &mut HashMap<Uuid, Relayed>, (sent, result): &Sent) -> Vec<(String, String)> {
    let mut refound: Vec<(String, String)> = Vec::new();
    for (turn_id, count) in sent {
        if let Some(turn) = turns.get_mut(turn_id) {
            turn.in_flight = false;
            if result.is_ok() {
                turn.written += count;
                turn.failing_since = None;
            } else {
                turn.failing_since.get_or_insert_with(Instant::now);
            }
            let session = (turn.key.tenant.clone(), turn.key.session_id.clone());
            if turn.dropped && !refound.contains(&session) {
                refound.push(session);
            }
        }
    }
    refound
}

/// What a read of the log gives its followers: the events, or why it failed.
type ReadResult = Result<Arc<Vec<LoggedEvent>>, Arc<str>>;

/// Reads the turn's log after `after`.
fn read_log(agent: Arc<Agent>, turn: LeaseKey, after: u64) -> BoxFuture<'static, ReadResult> {
    Box::pin(async move {
        let log = agent.event_log().ok_or_else(|| Arc::<str>::from("no event log"))?;
        let events = log.read_events(&turn, after, READ_BATCH).await;
        events.map(Arc::new).map_err(|e| Arc::from(e.to_string()))
    })
}

/// The reads of the log in flight in this process, each shared by the followers of one turn at
/// one place: N followers woken by one append make one read, not N. A follower joins a read only
/// if it started once the hub had received the announcement that last woke the follower, so
/// the read sees what the follower was woken for.
#[derive(Default)]
pub(super) struct SharedReads {
    reads: Mutex<HashMap<(LeaseKey, u64), InFlightRead>>,
    started: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for SharedReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedReads").finish_non_exhaustive()
    }
}

struct InFlightRead {
    /// Which read (to forget only this one once done).
    id: u64,
    /// The hub's count of announcements when it started.
    announced: u64,
    read: futures::future::Shared<BoxFuture<'static, ReadResult>>,
}

impl SharedReads {
    /// The turn's events after `after`: from a read in flight that started once `generation`
    /// announcements had been received, or else from one `start`ed now (the hub's count being
    /// `announced`).
    async fn read(
        &self,
        turn: &LeaseKey,
        after: u64,
        generation: u64,
        announced: u64,
        start: impl FnOnce() -> BoxFuture<'static, ReadResult>,
    ) -> ReadResult {
        let key = (turn.clone(), after);
        let (id, read) = {
            let mut reads = self.reads.lock().unwrap_or_else(|e| e.into_inner());
            match reads.get(&key) {
                Some(in_flight) if in_flight.announced >= generation => {
                    (in_flight.id, in_flight.read.clone())
                }
                _ => {
                    let id = self.started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let read = start().shared();
                    reads.insert(key.clone(), InFlightRead { id, announced, read: read.clone() });
                    (id, read)
                }
            }
        };
        let result = read.await;
        let mut reads = self.reads.lock().unwrap_or_else(|e| e.into_inner());
        if reads.get(&key).is_some_and(|in_flight| in_flight.id == id) {
            reads.remove(&key);
        }
        result
    }
}

/// Where a log follower is.
struct Follower {
    agent: Arc<Agent>,
    turn: LeaseKey,
    /// The id of the last event sent (or the client's `Last-Event-ID`).
    next_after: u64,
    /// Whether any event came from the log.
    logged_any: bool,
    /// Whether the turn is known to have ended.
    ended: bool,
    watch: EventWatch,
    ready: VecDeque<TurnEvent>,
    done: bool,
    /// Since when the store has failed to answer, while it fails.
    failing_since: Option<Instant>,
}

impl Agent {
    /// A turn's events after event `after`, from the event log (replayed, then live), on any
    /// replica; then, if the log does not hold the turn's end, its outcome. `turn` is its record,
    /// as read.
    pub(super) fn follow_log(
        self: &Arc<Self>,
        tenant: &str,
        turn: &Turn,
        after: u64,
    ) -> Option<impl Stream<Item = TurnEvent> + Send + 'static> {
        let log = self.event_log()?;
        let key =
            LeaseKey { tenant: tenant.to_owned(), session_id: turn.session_id.clone(), turn_id: turn.id };
        // Watch before the first read: an append after it wakes the follower.
        let watch = log.watch(turn.id);
        let follower = Follower {
            agent: Arc::clone(self),
            turn: key,
            next_after: after,
            logged_any: false,
            ended: turn.status != TurnStatus::Running,
            watch,
            ready: VecDeque::new(),
            done: false,
            failing_since: None,
        };
        Some(futures::stream::unfold(follower, |mut f| async move {
            let event = f.next().await?;
            Some((event, f))
        }))
    }
}

impl Follower {
    async fn next(&mut self) -> Option<TurnEvent> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                if event.is_terminal() {
                    self.done = true;
                    self.ready.clear();
                }
                return Some(event);
            }
            if self.done {
                return None;
            }
            match self.read().await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(()) => return None,
            }
            if self.ended {
                self.tell_outcome().await?;
                continue;
            }
            if tokio::time::timeout(IDLE_CHECK, self.watch.changed()).await.is_ok() {
                continue;
            }
            if self.agent.registry().is_closed() {
                return None;
            }
            // Nothing for a while: has the turn ended (or been abandoned) without logging it?
            let agent = Arc::clone(&self.agent);
            let (tenant, session) = (&self.turn.tenant, &self.turn.session_id);
            match agent.repaired_turn(tenant, session, self.turn.turn_id).await {
                Ok(Some(turn)) => self.ended = turn.status != TurnStatus::Running,
                Ok(None) => return None,
                Err(e) => {
                    tracing::debug!(turn.id = %self.turn.turn_id, error = %e, "a turn's follower stops");
                    return None;
                }
            }
        }
    }

    /// Reads what the log holds after the last event sent into `ready`, up to any gap: `Ok(true)`
    /// if it got any. A gap at the start (events dropped by the log's bound, or lost by a store
    /// that crashed) counts as the log not holding the turn: the follower waits for the end and
    /// tells the outcome. `Err` once the store has failed for
    /// longer than its timeout.
    async fn read(&mut self) -> Result<bool, ()> {
        self.agent.event_log().ok_or(())?;
        let read = match (self.watch.generation(), self.watch.announced()) {
            // Followers of the turn at the same place share a read that saw what woke them.
            (Some(generation), Some(announced)) => {
                let (agent, turn, after) = (Arc::clone(&self.agent), self.turn.clone(), self.next_after);
                let reads = &self.agent.shared_reads;
                reads
                    .read(&self.turn, after, generation, announced, move || read_log(agent, turn, after))
                    .await
            }
            _ => read_log(Arc::clone(&self.agent), self.turn.clone(), self.next_after).await,
        };
        match read {
            Ok(events) => {
                self.failing_since = None;
                let Some(first) = events.first() else { return Ok(false) };
                if first.id != self.next_after + 1 {
                    self.ended = self.wait_for_end().await?;
                    return Ok(false);
                }
                for event in events.iter() {
                    if event.id != self.next_after + 1 {
                        // A gap after what this read queued: the next read starts at it.
                        break;
                    }
                    match TurnEvent::decode(&event.body) {
                        Some(decoded) => self.ready.push_back(decoded),
                        None => {
                            tracing::warn!(turn.id = %self.turn.turn_id, id = event.id, "unreadable event in the turn's log");
                            return Err(());
                        }
                    }
                    self.next_after = event.id;
                }
                self.logged_any = true;
                Ok(true)
            }
            Err(e) => {
                let since = *self.failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.agent.settings.store_timeout {
                    tracing::debug!(turn.id = %self.turn.turn_id, error = %e, "a turn's follower stops: the store does not answer");
                    return Err(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(false)
            }
        }
    }

    /// Waits (reading the record every [`IDLE_CHECK`]) until the turn has ended: `Ok(true)`.
    async fn wait_for_end(&mut self) -> Result<bool, ()> {
        loop {
            let (tenant, session) = (&self.turn.tenant, &self.turn.session_id);
            match self.agent.repaired_turn(tenant, session, self.turn.turn_id).await {
                Ok(Some(turn)) if turn.status != TurnStatus::Running => return Ok(true),
                Ok(Some(_)) if !self.agent.registry().is_closed() => tokio::time::sleep(IDLE_CHECK).await,
                _ => return Err(()),
            }
        }
    }

    /// Queues what tells the ended turn's outcome: every event of it if the log gave none, else
    /// only its terminal event. `None` if it cannot be read.
    async fn tell_outcome(&mut self) -> Option<()> {
        let (tenant, session) = (&self.turn.tenant, &self.turn.session_id);
        let turn = match self.agent.repaired_turn(tenant, session, self.turn.turn_id).await {
            Ok(Some(turn)) => turn,
            _ => return None,
        };
        let events = self.agent.ended_events(tenant, session, turn).await.ok()?;
        if self.logged_any {
            self.ready.extend(events.into_iter().filter(TurnEvent::is_terminal));
        } else {
            self.ready.extend(events);
        }
        // Whatever comes, the stream ends with it.
        self.ended = false;
        if self.ready.is_empty() {
            self.done = true;
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    /// A log in memory that keeps each turn's events once (as the contract asks), records every
    /// append, and fails the appends it is told to: `fail_applied` after applying them (an
    /// unknown outcome), `fail_all` before.
    #[derive(Default)]
    struct FakeLog {
        appends: Mutex<Vec<Vec<TurnAppend>>>,
        kept: Mutex<HashMap<Uuid, Vec<LoggedEvent>>>,
        fail_applied: std::sync::atomic::AtomicUsize,
        fail_all: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl TurnEventLog for FakeLog {
        async fn append_events(&self, appends: &[TurnAppend], _ttl: Duration) -> StoreResult<()> {
            use std::sync::atomic::Ordering::SeqCst;
            self.appends.lock().unwrap().push(appends.to_vec());
            if self.fail_all.load(SeqCst) {
                return Err(StoreError::Backend("down".into()));
            }
            let mut kept = self.kept.lock().unwrap();
            for append in appends {
                let log = kept.entry(append.turn.turn_id).or_default();
                for event in &append.events {
                    let last = log.last().map_or(0, |e| e.id);
                    assert!(event.id <= last + 1, "no gap: {} after {last}", event.id);
                    if event.id > last {
                        log.push(event.clone());
                    }
                }
            }
            let fail = self.fail_applied.load(SeqCst);
            if fail > 0 {
                self.fail_applied.store(fail - 1, SeqCst);
                return Err(StoreError::Backend("no answer".into()));
            }
            Ok(())
        }

        async fn read_events(&self, _: &LeaseKey, _: u64, _: usize) -> StoreResult<Vec<LoggedEvent>> {
            unreachable!("the writer only appends")
        }

        async fn forget_session(&self, tenant: &str, session: &str) -> StoreResult<()> {
            let mut kept = self.kept.lock().unwrap();
            let appends = self.appends.lock().unwrap();
            let of_session = |turn_id: &Uuid| {
                appends.iter().flatten().any(|a| {
                    a.turn.turn_id == *turn_id && a.turn.tenant == tenant && a.turn.session_id == session
                })
            };
            kept.retain(|turn_id, _| !of_session(turn_id));
            Ok(())
        }

        fn watch(&self, _: Uuid) -> EventWatch {
            EventWatch::never()
        }
    }

    impl LogSource for Arc<FakeLog> {
        fn log(&self) -> Option<&dyn TurnEventLog> {
            Some(self.as_ref())
        }
    }

    fn delta(text: &str) -> TurnEvent {
        TurnEvent::Delta { turn_id: Uuid::nil(), message_id: Uuid::nil(), delta: text.to_owned() }
    }

    /// A turn of a session of its own.
    fn turn() -> LeaseKey {
        let turn_id = Uuid::now_v7();
        LeaseKey { tenant: "t".into(), session_id: format!("s-{turn_id}"), turn_id }
    }

    /// Feeds of `n` events each, relayed (not yet written: the writer has not run).
    fn relayed(
        writer: &LogWriter,
        log: &Arc<FakeLog>,
        tracker: &TaskTracker,
        n: usize,
    ) -> Vec<(LeaseKey, Arc<TurnFeed>)> {
        (0..3)
            .map(|_| {
                let (key, feed) = (turn(), TurnFeed::new());
                for i in 0..n {
                    feed.push(delta(&format!("d{i}")));
                }
                writer.relay(log, key.clone(), &feed, Duration::from_secs(60), tracker);
                (key, feed)
            })
            .collect()
    }

    fn expected(feed: &TurnFeed) -> Vec<LoggedEvent> {
        feed.encode_from(0, usize::MAX, |i, e| LoggedEvent { id: i as u64 + 1, body: e.encode() })
    }

    /// Ends every turn with one more event, then waits until the writer has ended.
    async fn end_all(turns: &[(LeaseKey, Arc<TurnFeed>)], last: &str, tracker: &TaskTracker) {
        for (_, feed) in turns {
            feed.push(delta(last));
            feed.close();
        }
        tracker.close();
        tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await.expect("the writer ends");
    }

    #[tokio::test]
    async fn turns_are_written_together_and_the_writer_ends_once_all_are_written() {
        let (writer, log, tracker) = (LogWriter::default(), Arc::new(FakeLog::default()), TaskTracker::new());
        let turns = relayed(&writer, &log, &tracker, 2);
        tokio::task::yield_now().await;
        end_all(&turns, "more", &tracker).await;
        let appends = log.appends.lock().unwrap().clone();
        assert_eq!(appends[0].len(), 3, "the first append carries the three turns: {appends:?}");
        assert!(appends.len() <= 2, "one more append for what came since: {appends:?}");
        let kept = log.kept.lock().unwrap();
        for (key, feed) in &turns {
            assert_eq!(kept[&key.turn_id], expected(feed));
        }
        assert!(!writer.shared.state().running);
    }

    #[tokio::test]
    async fn a_failed_append_is_sent_again_with_what_came_since() {
        let (writer, log, tracker) = (LogWriter::default(), Arc::new(FakeLog::default()), TaskTracker::new());
        log.fail_applied.store(2, std::sync::atomic::Ordering::SeqCst);
        let turns = relayed(&writer, &log, &tracker, 3);
        tokio::task::yield_now().await;
        end_all(&turns, "after the failure", &tracker).await;
        let appends = log.appends.lock().unwrap().clone();
        assert!(appends.len() >= 3, "two failed appends, then one that succeeds: {appends:?}");
        let last = appends.last().unwrap();
        assert!(last.iter().all(|a| a.events[0].id == 1), "the failed events are sent again: {last:?}");
        let kept = log.kept.lock().unwrap();
        for (key, feed) in &turns {
            assert_eq!(kept[&key.turn_id], expected(feed), "every event, once, in order");
        }
    }

    #[test]
    fn the_turns_served_longest_ago_go_first() {
        let mut turns: HashMap<Uuid, Relayed> = HashMap::new();
        for _ in 0..300 {
            let (key, feed) = (turn(), TurnFeed::new());
            feed.push(delta("a"));
            turns.insert(key.turn_id, Relayed::new(key, feed));
        }
        let first = compose(&mut turns, 1);
        let second = compose(&mut turns, 2);
        assert_eq!((first.len(), second.len()), (MAX_TURNS_PER_APPEND, MAX_TURNS_PER_APPEND));
        let sent: Sent = (first.iter().map(|a| (a.turn.turn_id, a.events.len())).collect(), Ok(()));
        settle(&mut turns, &sent);
        for turn in turns.values() {
            turn.feed.push(delta("b"));
        }
        let third = compose(&mut turns, 3);
        let served: std::collections::HashSet<Uuid> =
            first.iter().chain(&second).chain(&third).map(|a| a.turn.turn_id).collect();
        assert_eq!(served.len(), 300, "the 44 turns not served yet come before those served first");
    }

    #[tokio::test]
    async fn a_forgotten_sessions_turns_are_no_longer_written() {
        let (writer, log, tracker) = (LogWriter::default(), Arc::new(FakeLog::default()), TaskTracker::new());
        let turns = relayed(&writer, &log, &tracker, 2);
        let (gone, _) = &turns[0];
        let deadline = Instant::now() + Duration::from_secs(5);
        while log.kept.lock().unwrap().len() < turns.len() {
            assert!(Instant::now() < deadline, "the first events written within 5 s");
            tokio::task::yield_now().await;
        }
        writer.forget_session(&gone.tenant, &gone.session_id);
        log.forget_session(&gone.tenant, &gone.session_id).await.unwrap();
        end_all(&turns, "after the delete", &tracker).await;
        let kept = log.kept.lock().unwrap();
        assert!(!kept.contains_key(&gone.turn_id), "nothing of the forgotten turn is logged again");
        for (key, feed) in &turns[1..] {
            assert_eq!(kept[&key.turn_id], expected(feed), "the other sessions' turns are written whole");
        }
    }

    #[tokio::test]
    async fn followers_at_one_place_share_a_read_that_saw_what_woke_them() {
        let reads = SharedReads::default();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (open, gate) = tokio::sync::watch::channel(false);
        let start = || {
            let (calls, mut gate) = (Arc::clone(&calls), gate.clone());
            move || -> BoxFuture<'static, ReadResult> {
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Box::pin(async move {
                    gate.wait_for(|open| *open).await.expect("the gate opens");
                    Ok(Arc::new(vec![LoggedEvent { id: 4, body: "four".into() }]))
                })
            }
        };
        let key = turn();
        // Ten followers after event 3, woken by announcement 5 (the hub at 5): one read.
        let mut waiting: Vec<BoxFuture<'_, ReadResult>> = (0..10)
            .map(|_| Box::pin(reads.read(&key, 3, 5, 5, start())) as BoxFuture<'_, ReadResult>)
            .collect();
        // One woken by announcement 6, after that read started: a read of its own.
        waiting.push(Box::pin(reads.read(&key, 3, 6, 6, start())));
        // One at another place: a read of its own.
        waiting.push(Box::pin(reads.read(&key, 2, 5, 6, start())));
        let opener = async {
            tokio::task::yield_now().await;
            open.send_replace(true);
        };
        let (results, ()) = tokio::join!(futures::future::join_all(waiting), opener);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3, "twelve followers, three reads");
        assert!(results.iter().all(|r| r.as_ref().is_ok_and(|events| events[0].id == 4)));
        assert!(reads.reads.lock().unwrap().is_empty(), "finished reads are forgotten");
    }

    #[tokio::test]
    async fn an_ended_turn_the_store_keeps_refusing_is_given_up() {
        let give_up = Duration::from_millis(300);
        let writer = LogWriter { give_up_after_end: give_up, ..LogWriter::default() };
        let (log, tracker) = (Arc::new(FakeLog::default()), TaskTracker::new());
        log.fail_all.store(true, std::sync::atomic::Ordering::SeqCst);
        let turns = relayed(&writer, &log, &tracker, 1);
        for (_, feed) in &turns {
            feed.close();
        }
        tracker.close();
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await.expect("the writer gives up");
        assert!(started.elapsed() >= give_up, "not before {give_up:?}");
        assert!(log.appends.lock().unwrap().len() > 3, "it kept retrying meanwhile");
        assert!(log.kept.lock().unwrap().is_empty());
    }
}
