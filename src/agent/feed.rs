//! A turn's events as a feed that any number of clients can follow from the first event: the
//! client that posted the turn, and an idempotent retry that attaches to the running turn.

use std::sync::{Arc, Mutex, OnceLock};

use futures::Stream;
use tokio::sync::{Notify, watch};

use super::TurnEvent;

/// The events of one turn so far, and whether more will come.
#[derive(Debug)]
pub struct TurnFeed {
    /// Every event so far, in order.
    log: Mutex<Vec<TurnEvent>>,
    /// How many events there are, and whether the feed is closed; followers wait on it.
    progress: watch::Sender<(usize, bool)>,
    /// Told of every push and of the close: the process's event log writer, if it relays the feed.
    writer: OnceLock<Arc<Notify>>,
}

impl TurnFeed {
    /// An empty, open feed.
    pub fn new() -> Arc<Self> {
        Arc::new(TurnFeed {
            log: Mutex::new(Vec::new()),
            progress: watch::Sender::new((0, false)),
            writer: OnceLock::new(),
        })
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Vec<TurnEvent>> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends an event and wakes the followers.
    pub fn push(&self, event: TurnEvent) {
        let len = {
            let mut log = self.log();
            log.push(event);
            log.len()
        };
        // The highest count wins, should pushes ever race.
        self.progress.send_modify(|p| p.0 = p.0.max(len));
        self.tell_writer();
    }

    /// Marks the end: followers finish once they have read every event.
    pub fn close(&self) {
        self.progress.send_modify(|p| p.1 = true);
        self.tell_writer();
    }

    fn tell_writer(&self) {
        if let Some(writer) = self.writer.get() {
            writer.notify_one();
        }
    }

    /// Has `writer` told of every push and of the close from now on (once per feed).
    pub fn tell(&self, writer: Arc<Notify>) {
        let _ = self.writer.set(writer);
    }

    /// How many events there are, and whether the feed is closed.
    pub fn state(&self) -> (usize, bool) {
        *self.progress.borrow()
    }

    /// `encode` applied to at most `max` events from index `from` on (what a log writer has not
    /// written yet), without copying the events.
    pub fn encode_from<T>(
        &self,
        from: usize,
        max: usize,
        mut encode: impl FnMut(usize, &TurnEvent) -> T,
    ) -> Vec<T> {
        let log = self.log();
        let end = from.saturating_add(max).min(log.len());
        let events = log.get(from..end).unwrap_or_default();
        events.iter().enumerate().map(|(i, event)| encode(from + i, event)).collect()
    }

    /// The events from the first one on, as they come; ends when the feed is closed and read.
    pub fn follow(self: &Arc<Self>) -> impl Stream<Item = TurnEvent> + Send + 'static {
        let state = (Arc::clone(self), self.progress.subscribe(), 0usize);
        futures::stream::unfold(state, |(feed, mut progress, next)| async move {
            loop {
                // Mark progress as seen before reading the log: an event pushed after this wakes
                // `changed`, and one pushed before is in the log.
                let closed = progress.borrow_and_update().1;
                let event = feed.log().get(next).cloned();
                if let Some(event) = event {
                    return Some((event, (feed, progress, next + 1)));
                }
                if closed {
                    return None;
                }
                progress.changed().await.ok()?;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use uuid::Uuid;

    fn delta(text: &str) -> TurnEvent {
        TurnEvent::Delta { turn_id: Uuid::nil(), message_id: Uuid::nil(), delta: text.to_owned() }
    }

    #[tokio::test]
    async fn every_follower_reads_every_event_from_the_first() {
        let feed = TurnFeed::new();
        feed.push(delta("a"));
        let early = tokio::spawn(feed.follow().collect::<Vec<_>>());
        feed.push(delta("b"));
        tokio::task::yield_now().await;
        let late = tokio::spawn(feed.follow().collect::<Vec<_>>());
        feed.push(delta("c"));
        feed.close();
        let expected = vec![delta("a"), delta("b"), delta("c")];
        assert_eq!(early.await.unwrap(), expected);
        assert_eq!(late.await.unwrap(), expected);
        assert_eq!(feed.follow().collect::<Vec<_>>().await, expected, "a closed feed replays");
    }
}
