//! Server-Sent Events for a streamed turn: every event has a name, an id (1, 2, 3… within the
//! turn) and one line of JSON data; a keep-alive comment goes out at a fixed interval.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};

use crate::agent::TurnEvent;

/// The SSE response for a turn's events; it ends after the terminal event.
pub fn turn_stream(
    events: impl Stream<Item = TurnEvent> + Send + 'static,
    keepalive: Duration,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    turn_stream_after(events, 0, keepalive)
}

/// The same for events that come after event `after` of the turn: their ids go on from it.
pub fn turn_stream_after(
    events: impl Stream<Item = TurnEvent> + Send + 'static,
    after: u64,
    keepalive: Duration,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = events.enumerate().map(move |(i, event)| Ok(to_sse(after + i as u64 + 1, &event)));
    Sse::new(stream).keep_alive(KeepAlive::new().interval(keepalive).text("keep-alive"))
}

fn to_sse(id: u64, event: &TurnEvent) -> Event {
    // serde_json escapes newlines inside strings, so the data is always one line.
    let data = serde_json::to_string(event).unwrap_or_else(|_| "{}".to_owned());
    Event::default().event(event.name()).id(id.to_string()).data(data)
}
