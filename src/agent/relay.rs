//! A turn's events through the store's event log, so that any replica serves any turn's stream:
//! the replica running a streamed turn relays its feed into the log, in batches (one append per
//! round trip, however many events came meanwhile), and a follower on any replica reads the log
//! after the last event it sent, then sleeps until the log announces more.
//!
//! A follower that hears nothing for [`IDLE_CHECK`] reads the turn's record once: a turn that
//! ended without logging its end (its log expired, it was a JSON turn, its replica died and the
//! lease ran out) is then told by its outcome, as a replica without a log tells it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::time::Instant;

use super::feed::TurnFeed;
use super::{Agent, TurnEvent};
use crate::domain::{Turn, TurnStatus};
use crate::store::event_log::{EventWatch, LoggedEvent};
use crate::store::{DynCoordinator, LeaseKey};

/// How long a follower waits for news before it reads the turn's record.
pub const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Most events a follower reads from the log at once.
const READ_BATCH: usize = 256;

/// Most events the relay appends at once.
const WRITE_BATCH: usize = 512;

/// How long the relay keeps retrying an append the store refuses, once its turn has ended.
const GIVE_UP_AFTER_END: Duration = Duration::from_secs(30);

/// Relays a turn's feed into the coordinator's event log until the feed is closed and written.
/// An append that fails is retried (with what came since) until it succeeds: the log never has a
/// gap. If the store stays unreachable past [`GIVE_UP_AFTER_END`] after the turn ended, the relay
/// gives up; followers then learn the outcome from the turn's record.
pub(super) async fn relay(coordinator: DynCoordinator, turn: LeaseKey, feed: Arc<TurnFeed>, ttl: Duration) {
    let Some(log) = coordinator.event_log() else { return };
    let mut progress = feed.progress();
    let mut written = 0usize;
    let mut pause = Duration::from_millis(20);
    let mut ended_at: Option<Instant> = None;
    let mut warned = false;
    loop {
        let closed = progress.borrow_and_update().1;
        if closed && ended_at.is_none() {
            ended_at = Some(Instant::now());
        }
        let pending = feed.events_from(written, WRITE_BATCH);
        if pending.is_empty() {
            if closed || progress.changed().await.is_err() {
                return;
            }
            continue;
        }
        let batch: Vec<LoggedEvent> = pending
            .iter()
            .enumerate()
            .map(|(i, event)| LoggedEvent { id: (written + i + 1) as u64, body: event.encode() })
            .collect();
        match log.append_events(&turn, &batch, ttl).await {
            Ok(()) => {
                written += batch.len();
                pause = Duration::from_millis(20);
            }
            Err(e) => {
                if !std::mem::replace(&mut warned, true) {
                    tracing::warn!(turn.id = %turn.turn_id, error = %e, "cannot log the turn's events; retrying");
                }
                if ended_at.is_some_and(|at| at.elapsed() > GIVE_UP_AFTER_END) {
                    tracing::warn!(turn.id = %turn.turn_id, "gave up logging the turn's events");
                    return;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
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

    /// Reads what the log holds after the last event sent into `ready`: `Ok(true)` if it got
    /// any. A gap (events dropped by the log's bound) counts as the log not holding the turn: the
    /// follower waits for the end and tells the outcome. `Err` once the store has failed for
    /// longer than its timeout.
    async fn read(&mut self) -> Result<bool, ()> {
        let log = self.agent.event_log().ok_or(())?;
        match log.read_events(&self.turn, self.next_after, READ_BATCH).await {
            Ok(events) => {
                self.failing_since = None;
                let Some(first) = events.first() else { return Ok(false) };
                if first.id != self.next_after + 1 {
                    self.ended = self.wait_for_end().await?;
                    return Ok(false);
                }
                for event in events {
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
