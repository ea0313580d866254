//! The turn: load the session's history window, call the model, run the tools it asks for, loop
//! until it answers, and append every message of the turn to the store.
//!
//! - [`window`]: the history window that never separates a tool call from its results.
//! - [`events`]: the typed events streamed to clients, and the turn result.
//! - [`registry`]: the turns running in this process (one per session, cancellable).
//! - [`turn_store`]: the port to the store: history, coordinator, fused or composed turn steps.
//! - [`clients`]: what the chat-client dialects need: sessions made on first use, messages found
//!   by a client's ids, the last turn, the running turn.
//!
//! A turn runs in its own task: a client that disconnects does not stop it. Messages are appended
//! in one atomic batch when the turn completes (or, with save-on-iteration, one batch per tool
//! round and one at the end); a turn that fails appends nothing more and records why.

pub mod claim;
pub mod clients;
pub mod events;
pub mod feed;
mod follow;
pub mod history;
pub mod registry;
mod relay;
mod sessions;
pub mod turn_store;
pub mod window;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;
use uuid::Uuid;

/// The store's query types, as the HTTP layer passes them through the agent.
pub use crate::store::{MessagePage, Order, PageQuery, SessionCursor, SessionPage};
pub use events::{TurnEvent, TurnResult};
use feed::TurnFeed;
use registry::{TurnRegistry, TurnTokens};

use crate::config::IfBusy;
use crate::domain::{Message, Metadata, Role, ToolCall, Turn, TurnStatus, Usage, WindowMessage, new_id, now};
use crate::error::AppError;
use crate::llm::{ChatRequest, DynModel, ModelError, ModelEvent, ModelOutput, PromptMessage};
use crate::store::{AppendBatch, StoreError};
use crate::telemetry;
use crate::tools::ToolRegistry;
use tracing::Instrument;
pub use turn_store::TurnStore;

/// How the agent loop behaves.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// Most past messages sent to the model.
    pub history_size: usize,
    /// System prompt for sessions without one.
    pub system_prompt: Option<String>,
    /// Most tool rounds before a last call without tools forces an answer.
    pub max_iterations: usize,
    /// Append each tool round as soon as it completes.
    pub save_on_iteration: bool,
    /// Longest a turn may run.
    pub turn_timeout: Duration,
    /// Lease of a turn's lock on its session.
    pub turn_lease: Duration,
    /// Longest a turn waits for a busy session with `IfBusy::Wait`.
    pub if_busy_timeout: Duration,
    /// How long idempotency keys are remembered.
    pub idempotency_ttl: Duration,
    /// How long a turn's event log is kept after its last event (`PARLEY_EVENT_TTL`).
    pub event_ttl: Duration,
    /// Whether streamed turns are relayed into the coordinator's event log, when it keeps one
    /// (`PARLEY_EVENT_LOG`).
    pub event_log: bool,
    /// The store's time limit per call (`PARLEY_STORE_TIMEOUT`): bounds how long the agent waits
    /// to learn the outcome of a write the store did not answer.
    pub store_timeout: Duration,
    /// Most messages a fork copies (`PARLEY_FORK_MAX_MESSAGES`).
    pub fork_max_messages: usize,
    /// Where turns, model calls, tool calls and conflicts are counted (`None`: metrics off).
    pub metrics: Option<crate::metrics::DynMetrics>,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            history_size: 20,
            system_prompt: None,
            max_iterations: 8,
            save_on_iteration: false,
            turn_timeout: Duration::from_secs(300),
            turn_lease: Duration::from_secs(15),
            if_busy_timeout: Duration::from_secs(30),
            idempotency_ttl: Duration::from_secs(24 * 3600),
            event_ttl: Duration::from_secs(3600),
            event_log: true,
            store_timeout: Duration::from_secs(5),
            fork_max_messages: 10_000,
            metrics: None,
        }
    }
}

/// A user turn to run.
#[derive(Debug, Clone)]
pub struct TurnInput {
    /// The caller's tenant.
    pub tenant: String,
    /// The session.
    pub session_id: String,
    /// The user's text (validated).
    pub content: String,
    /// The user message's metadata.
    pub metadata: Metadata,
    /// What to do if another turn runs in the session.
    pub if_busy: IfBusy,
    /// The client's `Idempotency-Key`, if any.
    pub idempotency_key: Option<String>,
    /// Whether the client streams the turn (its events are built only then).
    pub stream: bool,
    /// An edit: the seq of a user message of the active history; the turn runs with the history
    /// before it, and its save supersedes every active message from it on.
    pub replace_from: Option<u64>,
}

/// How a turn request was answered.
pub enum TurnStart {
    /// A new turn runs.
    Started(StartedTurn),
    /// A retry of a completed request: its saved answer.
    Replayed(TurnResult),
    /// A streaming retry of a request whose turn still runs (here, or on any replica when the
    /// store keeps an event log): its events from the first.
    Attached {
        /// The turn.
        turn_id: Uuid,
        /// Its events from the first.
        events: futures::stream::BoxStream<'static, TurnEvent>,
    },
}

impl std::fmt::Debug for TurnStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TurnStart::Started(started) => f.debug_tuple("Started").field(started).finish(),
            TurnStart::Replayed(result) => f.debug_tuple("Replayed").field(result).finish(),
            TurnStart::Attached { turn_id, .. } => {
                f.debug_struct("Attached").field("turn_id", turn_id).finish()
            }
        }
    }
}

impl TurnStart {
    /// The turn's id.
    pub fn turn_id(&self) -> Option<Uuid> {
        match self {
            TurnStart::Started(started) => Some(started.turn_id),
            TurnStart::Replayed(result) => Some(result.turn_id),
            TurnStart::Attached { turn_id, .. } => Some(*turn_id),
        }
    }
}

/// A turn that has started: its events as they happen, and its outcome.
#[derive(Debug)]
pub struct StartedTurn {
    /// The turn id.
    pub turn_id: Uuid,
    /// Its events, when the client streams it (or may retry it with an idempotency key).
    pub feed: Option<Arc<TurnFeed>>,
    /// The outcome; the turn runs to the end even if this handle is dropped.
    pub outcome: TurnRun,
}

/// Work that runs to its end once started, whoever waits for it: awaited, it runs inside the
/// task that awaits it (no task of its own, no wake-up across tasks); dropped before the end
/// (the client went away), the rest runs in a task of its own. Either way it counts as running
/// for graceful shutdown.
pub struct RunToEnd<T: Send + 'static> {
    run: Option<futures::future::BoxFuture<'static, T>>,
    tracker: TaskTracker,
    _running: TaskTrackerToken,
}

/// A turn's run, to await for its outcome; dropping it before the end does not stop the turn.
pub type TurnRun = RunToEnd<Result<TurnResult, AppError>>;

impl<T: Send + 'static> RunToEnd<T> {
    /// Starts owning `run`.
    pub fn new(run: impl Future<Output = T> + Send + 'static, tracker: &TaskTracker) -> Self {
        RunToEnd { run: Some(Box::pin(run)), tracker: tracker.clone(), _running: tracker.token() }
    }
}

impl<T: Send + 'static> std::fmt::Debug for RunToEnd<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunToEnd").field("done", &self.run.is_none()).finish()
    }
}

impl<T: Send + 'static> Future for RunToEnd<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<T> {
        let run = self.run.as_mut().expect("a RunToEnd is not polled after it completed");
        let outcome = run.as_mut().poll(cx);
        if outcome.is_ready() {
            self.run = None;
        }
        outcome
    }
}

impl RunToEnd<Result<TurnResult, AppError>> {
    /// The turn's events, with the turn run by whoever reads them: a streaming client's
    /// connection runs its turn, so each event is written in the poll that produced it, with no
    /// wake-up of another task in between. If the reader goes away first, the turn goes on in a
    /// task of its own (see [`TurnRun`]). A reader that stops reading without going away would
    /// pause its own turn only once hyper's and the socket's buffers are full (hundreds of KiB of
    /// events, more than a turn usually sends).
    pub fn driving<S: futures::Stream<Item = TurnEvent> + Unpin>(self, events: S) -> Driven<S> {
        Driven { events, run: Some(self) }
    }
}

/// A turn's events together with its run (see [`TurnRun::driving`]).
pub struct Driven<S> {
    events: S,
    run: Option<TurnRun>,
}

impl<S: futures::Stream<Item = TurnEvent> + Unpin> futures::Stream for Driven<S> {
    type Item = TurnEvent;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<TurnEvent>> {
        if let Some(run) = self.run.as_mut()
            && Pin::new(run).poll(cx).is_ready()
        {
            // The outcome is in the events too: the turn's last event closes the feed.
            self.run = None;
        }
        Pin::new(&mut self.events).poll_next(cx)
    }
}

impl<T: Send + 'static> Drop for RunToEnd<T> {
    fn drop(&mut self) {
        // Unwinding from a panic inside the work: it cannot be resumed (its guards give back
        // what it held).
        if std::thread::panicking() {
            return;
        }
        if let Some(rest) = self.run.take() {
            self.tracker.spawn(async move {
                drop(rest.await);
            });
        }
    }
}

/// The agent: the store, the model, the tools, and the turns running here.
pub struct Agent {
    store: TurnStore,
    model: DynModel,
    tools: Arc<ToolRegistry>,
    settings: AgentSettings,
    registry: TurnRegistry,
    /// Relays streamed turns' events into the coordinator's event log.
    log_writer: relay::LogWriter,
    /// Reads of the event log shared by the followers of one turn.
    shared_reads: relay::SharedReads,
    /// Set once the lease keeper runs (it starts with the first turn).
    keeper: std::sync::OnceLock<()>,
    /// The empty tool list of a call that offers none.
    no_tools: Arc<[crate::llm::ToolSpec]>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("model", &self.model.name()).field("settings", &self.settings).finish()
    }
}

/// What a turn has produced so far; kept outside the loop so a cancelled turn can save it.
struct TurnState {
    tenant: String,
    turn: Turn,
    /// The prompt before this turn: system prompt and history window.
    prompt: Vec<PromptMessage>,
    /// Messages of this turn not yet stored.
    pending: Vec<Message>,
    /// Messages of this turn already stored (save-on-iteration).
    stored: Vec<Message>,
    /// Id and text of the assistant message being streamed.
    partial_id: Uuid,
    partial_text: String,
    usage: Option<Usage>,
    events: Option<Arc<TurnFeed>>,
    /// The turn's last events, sent once the session is free again, so that a client that
    /// posts its next turn as soon as it sees them does not find the session still busy.
    closing: Vec<TurnEvent>,
    /// The request's idempotency key, settled when the turn ends.
    idempotency_key: Option<String>,
    /// The turn's claim on its session, given back when the turn ends (or is dropped).
    claim: claim::ClaimGuard,
    /// For an edit: the seq from which its save supersedes the active messages.
    replace_from: Option<u64>,
}

impl TurnState {
    /// Sends an event built by `event`, only when a client streams the turn (a JSON answer needs
    /// no events, and building them clones every message).
    fn emit(&self, event: impl FnOnce() -> TurnEvent) {
        if let Some(feed) = &self.events {
            // A client that went away does not stop the turn: the feed keeps every event.
            feed.push(event());
        }
    }

    /// Keeps a closing event (see `closing`), only when a client streams the turn.
    fn emit_last(&mut self, event: impl FnOnce(&Self) -> TurnEvent) {
        if self.events.is_some() {
            let event = event(self);
            self.closing.push(event);
        }
    }

    /// Sends the closing events.
    fn flush_closing(&mut self) {
        if let Some(feed) = &self.events {
            for event in self.closing.drain(..) {
                feed.push(event);
            }
        }
    }

    fn session_id(&self) -> &str {
        &self.turn.session_id
    }

    fn turn_messages(&self) -> impl Iterator<Item = &Message> {
        self.stored.iter().chain(self.pending.iter())
    }

    fn add_usage(&mut self, usage: Option<Usage>) {
        if let Some(u) = usage {
            self.usage.get_or_insert_with(Usage::default).add(u);
        }
    }
}

impl Drop for TurnState {
    fn drop(&mut self) {
        // However the turn ended (even by a panic), its followers see the end of the stream.
        self.flush_closing();
        if let Some(feed) = &self.events {
            feed.close();
        }
    }
}

/// Why the loop stopped early.
enum Stop {
    /// It failed.
    Error(AppError),
    /// It was cancelled.
    Cancelled,
    /// Its last write got no answer from the store: whether it was applied is not known yet.
    Unanswered(AppError),
}

impl From<AppError> for Stop {
    fn from(e: AppError) -> Self {
        Stop::Error(e)
    }
}

/// What may interrupt the model calls and tool runs of a turn (never a store write, so that a
/// write is never half-done by an interruption).
struct Interrupt {
    cancel: CancellationToken,
    /// Fires when the turn lost its session lock: it stops without saving anything more.
    lost: CancellationToken,
    deadline: tokio::time::Instant,
    timeout: Duration,
}

impl Interrupt {
    async fn guard<F: std::future::Future>(&self, work: F) -> Result<F::Output, Stop> {
        // The work is polled first: work that is done at once (the echo model) never arms the
        // deadline's timer, and a cancel request that comes after the work is done changes nothing.
        tokio::select! {
            biased;
            out = work => Ok(out),
            _ = self.lost.cancelled() => Err(Stop::Error(AppError::TurnAbandoned)),
            _ = self.cancel.cancelled() => Err(Stop::Cancelled),
            _ = tokio::time::sleep_until(self.deadline) => Err(Stop::Error(AppError::UpstreamTimeout(format!(
                "the turn exceeded its time limit of {} s (PARLEY_TURN_TIMEOUT)",
                self.timeout.as_secs()
            )))),
        }
    }
}

impl Agent {
    /// An agent over this store, model and tools.
    pub fn new(store: TurnStore, model: DynModel, tools: ToolRegistry, settings: AgentSettings) -> Self {
        Agent {
            store,
            model,
            tools: Arc::new(tools),
            settings,
            registry: TurnRegistry::new(),
            log_writer: relay::LogWriter::default(),
            shared_reads: relay::SharedReads::default(),
            keeper: std::sync::OnceLock::new(),
            no_tools: Arc::from([]),
        }
    }

    /// An agent that needs nothing outside the process: the memory store, the echo model and no
    /// tools (what the OpenAPI document is built with).
    pub fn offline() -> Self {
        Agent::new(
            TurnStore::fused(Arc::new(crate::store::memory::MemoryStore::default())),
            Arc::new(crate::llm::echo::EchoModel::default()),
            ToolRegistry::new(),
            AgentSettings::default(),
        )
    }

    /// The store: the history, its coordinator, the fused paths.
    pub fn store(&self) -> &TurnStore {
        &self.store
    }

    /// The coordinator's turn event log, unless there is none or it is turned off.
    pub(crate) fn event_log(&self) -> Option<&dyn crate::store::event_log::TurnEventLog> {
        self.settings.event_log.then(|| self.store.coordinator().event_log()).flatten()
    }

    /// The turns running in this process.
    pub fn registry(&self) -> &TurnRegistry {
        &self.registry
    }

    /// The settings.
    pub fn settings(&self) -> &AgentSettings {
        &self.settings
    }

    /// Starts a turn: claims the session, records the turn as running and hands the turn to its
    /// run. Once called, the start runs to its end even if the caller goes away (the request's
    /// connection closed): then the turn runs to its end too, in a task of its own, and is saved
    /// (a disconnect is not a cancel). Nothing of a request is left half-done.
    pub async fn start_turn(self: &Arc<Self>, input: TurnInput) -> Result<TurnStart, AppError> {
        let agent = Arc::clone(self);
        let tracker = self.registry.tracker();
        if telemetry::enabled() {
            let span = turn_span(&input.session_id);
            return RunToEnd::new(async move { agent.begin(input).instrument(span).await }, tracker).await;
        }
        RunToEnd::new(async move { agent.begin(input).await }, tracker).await
    }

    async fn begin(self: Arc<Self>, mut input: TurnInput) -> Result<TurnStart, AppError> {
        let turn = Turn::start(&input.session_id);
        if telemetry::enabled() {
            tracing::Span::current().record("turn.id", tracing::field::display(turn.id));
        }
        if input.idempotency_key.is_some() {
            // The key is remembered with the session: a missing session is a 404 before anything.
            self.store
                .history()
                .get_session(&input.tenant, &input.session_id)
                .await?
                .ok_or_else(|| AppError::SessionNotFound(input.session_id.clone()))?;
            match self.begin_idempotent(&input, turn.id).await? {
                claim::Replay::Run => {}
                claim::Replay::Done(result) => {
                    self.count_replay();
                    return Ok(TurnStart::Replayed(result));
                }
                claim::Replay::Attach { turn_id, events } => {
                    self.count_replay();
                    return Ok(TurnStart::Attached { turn_id, events });
                }
            }
        }
        match self.launch(&mut input, turn).await {
            Ok(started) => Ok(TurnStart::Started(started)),
            Err(e) => {
                if let Some(key) = input.idempotency_key.take() {
                    // In the background: the answer does not wait for a store that may be down.
                    let (store, tenant, session) =
                        (Arc::clone(self.store.coordinator()), input.tenant, input.session_id);
                    tokio::spawn(async move {
                        let _ = store.abort_idempotent(&tenant, &session, &key).await;
                    });
                }
                Err(e)
            }
        }
    }

    /// Claims the session (which also loads the window and records the turn as running in the
    /// store, in one step) and hands the turn to its run.
    async fn launch(self: &Arc<Self>, input: &mut TurnInput, turn: Turn) -> Result<StartedTurn, AppError> {
        if let Some(seq) = input.replace_from {
            // Refused before anything is written (and checked again once the session is held).
            self.edit_window(&input.tenant, &input.session_id, seq).await?;
        }
        let claimed = self.claim_session(input, &turn).await?;
        let turn_id = turn.id;
        let prompt = self.prompt(claimed.system_prompt.as_deref(), claimed.window);
        // Events are kept for a streaming client, and for a streaming retry that may attach.
        let feed = (input.stream || input.idempotency_key.is_some()).then(TurnFeed::new);
        self.registry.started(&input.tenant, &input.session_id, turn_id, feed.clone());
        if let Some(feed) = &feed
            && self.event_log().is_some()
        {
            // Any replica serves the turn's stream from the store's event log.
            let key = crate::store::LeaseKey {
                tenant: input.tenant.clone(),
                session_id: input.session_id.clone(),
                turn_id,
            };
            self.log_writer.relay(
                self.store.coordinator(),
                key,
                feed,
                self.settings.event_ttl,
                self.registry.tracker(),
            );
        }
        self.keeper.get_or_init(|| {
            tokio::spawn(claim::keep_leases(Arc::downgrade(self), self.renew_every()));
        });
        let state = new_state(input, turn, prompt, feed.clone(), claimed.guard);
        let session = &input.session_id;
        state.emit(|| TurnEvent::Started {
            turn_id,
            session_id: session.clone(),
            user_message: state.pending[0].clone(),
            replaces_from: state.replace_from,
        });
        let agent = Arc::clone(self);
        let tokens = claimed.tokens;
        let run = async move { agent.drive(state, tokens).await };
        let outcome = if telemetry::enabled() {
            // The turn's span (see `start_turn`) lasts until the turn ends, streamed or not.
            TurnRun::new(run.instrument(tracing::Span::current()), self.registry.tracker())
        } else {
            TurnRun::new(run, self.registry.tracker())
        };
        Ok(StartedTurn { turn_id, feed, outcome })
    }

    /// The prompt before the turn: the system prompt and the history window, without the saved
    /// rounds of turns that never finished, and without broken tool pairs.
    fn prompt(&self, session_prompt: Option<&str>, messages: Vec<WindowMessage>) -> Vec<PromptMessage> {
        let window = window::fit_window(drop_unfinished_turns(messages), self.settings.history_size);
        let mut prompt = Vec::with_capacity(window.len() + 3);
        if let Some(system) =
            session_prompt.or(self.settings.system_prompt.as_deref()).filter(|s| !s.is_empty())
        {
            prompt.push(PromptMessage::text(Role::System, system));
        }
        prompt.extend(window.into_iter().map(PromptMessage::from));
        prompt
    }

    /// Runs the loop to its end (completed, failed, cancelled or timed out) and records it. A
    /// panic inside the loop (a provider, a tool, a parser) ends the turn `failed` with
    /// `internal_error` like any other failure.
    async fn drive(
        self: Arc<Self>,
        mut state: TurnState,
        tokens: TurnTokens,
    ) -> Result<TurnResult, AppError> {
        use futures::FutureExt;
        let timeout = self.settings.turn_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let interrupt = Interrupt { cancel: tokens.cancel, lost: tokens.lost, deadline, timeout };
        let started = std::time::Instant::now();
        let _running = self.settings.metrics.as_ref().map(|m| m.running_turn());
        let run = std::panic::AssertUnwindSafe(self.run(&mut state, &interrupt)).catch_unwind().await;
        let result = match run {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(Stop::Error(e))) => Err(self.fail(&mut state, e).await),
            Ok(Err(Stop::Cancelled)) => self.save_cancelled(&mut state).await,
            Ok(Err(Stop::Unanswered(e))) => self.resolve_unanswered(&mut state, e).await,
            Err(panic) => {
                let what = panic_message(panic.as_ref());
                tracing::error!(turn.id = %state.turn.id, panic = %what, "the turn panicked");
                Err(self.fail(&mut state, AppError::Internal(format!("the turn panicked: {what}"))).await)
            }
        };
        self.settle_idempotency(&state, &result).await;
        if telemetry::enabled() {
            let span = tracing::Span::current();
            let status = match state.turn.status {
                TurnStatus::Running => "running",
                TurnStatus::Completed => "completed",
                TurnStatus::Failed => "failed",
                TurnStatus::Cancelled => "cancelled",
            };
            span.record("turn.status", status);
            if result.is_err() {
                span.record("otel.status_code", "ERROR");
            }
        }
        if let Some(metrics) = &self.settings.metrics {
            let outcome = match &result {
                Ok(_) if state.turn.status == TurnStatus::Cancelled => "cancelled",
                Ok(_) => "completed",
                Err(AppError::TurnAbandoned) => "abandoned",
                Err(_) => "failed",
            };
            metrics.turn_ended(outcome, &state.tenant, started.elapsed());
        }
        state.claim.give_back();
        state.flush_closing();
        result
    }

    /// Saves the answer for the turn's idempotency key, or forgets the key if the turn failed
    /// before storing anything (in the background: the answer does not wait for it). A turn whose
    /// outcome is unknown keeps its key, so a retry learns the outcome instead of running again.
    async fn settle_idempotency(&self, state: &TurnState, result: &Result<TurnResult, AppError>) {
        let Some(key) = &state.idempotency_key else { return };
        let (tenant, session) = (&state.tenant, state.session_id());
        match result {
            Ok(answer) => {
                let Ok(value) = serde_json::to_value(answer) else { return };
                let ttl = self.settings.idempotency_ttl;
                if let Err(e) =
                    self.store.coordinator().complete_idempotent(tenant, session, key, &value, ttl).await
                {
                    tracing::warn!(turn.id = %state.turn.id, error = %e, "could not save the idempotency record");
                }
            }
            Err(AppError::TurnOutcomeUnknown(_)) => {}
            Err(_) if state.stored.is_empty() => {
                let (store, tenant, session, key) =
                    (Arc::clone(self.store.coordinator()), tenant.clone(), session.to_owned(), key.clone());
                tokio::spawn(async move {
                    if let Err(e) = store.abort_idempotent(&tenant, &session, &key).await {
                        tracing::warn!(error = %e, "could not forget the idempotency key of a failed turn");
                    }
                });
            }
            Err(_) => {}
        }
    }

    /// The agent loop proper.
    async fn run(&self, state: &mut TurnState, interrupt: &Interrupt) -> Result<TurnResult, Stop> {
        let max = self.settings.max_iterations;
        for iteration in 0..=max {
            let offer_tools = iteration < max && !self.tools.is_empty();
            let call = telemetry::traced(|| model_span(self.model.name()), async {
                telemetry::failed_if(self.call_model(state, offer_tools).await, Result::is_err)
            });
            let output = interrupt.guard(call).await??;
            let mut assistant =
                Message::new(state.session_id(), state.turn.id, Role::Assistant, output.content);
            assistant.id = state.partial_id;
            if offer_tools && !output.tool_calls.is_empty() {
                assistant.tool_calls = Some(output.tool_calls.clone());
                state.emit(|| TurnEvent::ToolCall { turn_id: state.turn.id, message: assistant.clone() });
                state.pending.push(assistant);
                state.partial_text.clear();
                interrupt.guard(self.run_tools(state, &output.tool_calls)).await?;
                // An edit is saved in one step with its supersession, so that a failed edit
                // leaves the history exactly as it was.
                if self.settings.save_on_iteration && state.replace_from.is_none() {
                    self.save_round(state).await?;
                }
                continue;
            }
            state.pending.push(assistant);
            state.partial_text.clear();
            break;
        }
        self.complete(state).await
    }

    /// One model call, streaming its text to the client as it comes.
    async fn call_model(&self, state: &mut TurnState, offer_tools: bool) -> Result<ModelOutput, AppError> {
        state.partial_id = new_id();
        state.partial_text.clear();
        // The prompt is lent to the request and taken back, not copied for every call.
        let before = state.prompt.len();
        let tools = if offer_tools { self.tools.specs() } else { Arc::clone(&self.no_tools) };
        let mut request = ChatRequest { messages: std::mem::take(&mut state.prompt), tools };
        request.messages.extend(state.turn_messages().map(PromptMessage::from));
        let asked = std::time::Instant::now();
        let mut first_token = None;
        let started = self.model.stream(&request).await;
        request.messages.truncate(before);
        state.prompt = request.messages;
        let mut stream = started?;
        while let Some(event) = stream.next().await {
            match event? {
                ModelEvent::Delta(delta) => {
                    first_token.get_or_insert_with(|| asked.elapsed());
                    state.partial_text.push_str(&delta);
                    let (turn_id, message_id) = (state.turn.id, state.partial_id);
                    state.emit(move || TurnEvent::Delta { turn_id, message_id, delta });
                }
                ModelEvent::Done(output) => {
                    if let Some(metrics) = &self.settings.metrics {
                        let model = self.model.name();
                        metrics.model_request(model, first_token, asked.elapsed());
                        if let Some(u) = output.usage {
                            metrics.model_tokens(model, u.prompt_tokens, u.completion_tokens);
                        }
                    }
                    state.add_usage(output.usage);
                    return Ok(output);
                }
            }
        }
        Err(ModelError::Protocol("the model stream ended before the reply was complete".to_owned()).into())
    }

    /// Runs one round of tool calls concurrently; results keep the calls' order.
    async fn run_tools(&self, state: &mut TurnState, calls: &[ToolCall]) {
        let runs = calls.iter().map(|call| async {
            let started = std::time::Instant::now();
            let run = async {
                telemetry::failed_if(self.tools.run(&call.name, &call.arguments).await, |o| o.is_error)
            };
            let outcome = telemetry::traced(|| tool_span(&call.name), run).await;
            if let Some(metrics) = &self.settings.metrics {
                metrics.tool_call(&call.name, !outcome.is_error, started.elapsed());
            }
            outcome
        });
        let outcomes = futures::future::join_all(runs).await;
        for (call, outcome) in calls.iter().zip(outcomes) {
            let mut message = Message::new(state.session_id(), state.turn.id, Role::Tool, outcome.content);
            message.tool_call_id = Some(call.id.clone());
            message.name = Some(call.name.clone());
            if outcome.is_error {
                message.metadata.insert("is_error".to_owned(), json!(true));
            }
            state.emit(|| TurnEvent::ToolResult { turn_id: state.turn.id, message: message.clone() });
            state.pending.push(message);
        }
    }

    /// Appends the pending messages of a finished tool round (save-on-iteration), fenced: only
    /// while the turn holds its session.
    async fn save_round(&self, state: &mut TurnState) -> Result<(), AppError> {
        let mut turn = state.turn.clone();
        turn.message_ids = state.turn_messages().map(|m| m.id).collect();
        turn.usage = state.usage;
        let batch = AppendBatch {
            messages: std::mem::take(&mut state.pending),
            turn: Some(turn.clone()),
            supersede_from: None,
        };
        let stored = self.store.append_fenced(&state.tenant, state.session_id(), batch, turn.id).await?;
        state.stored.extend(stored);
        state.turn = turn;
        Ok(())
    }

    /// Appends the rest of the turn with its completed record, fenced, releasing the session in
    /// the same step.
    async fn complete(&self, state: &mut TurnState) -> Result<TurnResult, Stop> {
        let turn_id = state.turn.id;
        let completed_at = Some(now());
        let record = Turn {
            status: TurnStatus::Completed,
            message_ids: state.turn_messages().map(|m| m.id).collect(),
            usage: state.usage,
            completed_at,
            ..state.turn.clone()
        };
        // On failure the batch is gone with the error, but `pending` is not needed any more:
        // the turn fails, and a failed turn saves nothing more.
        let batch = AppendBatch {
            messages: std::mem::take(&mut state.pending),
            turn: Some(record),
            supersede_from: state.replace_from,
        };
        let finished = match self.store.finish_turn(&state.tenant, state.session_id(), batch, turn_id).await {
            Ok(finished) => finished,
            Err(e) if e.outcome_unknown() => return Err(Stop::Unanswered(e.into())),
            Err(e) => return Err(Stop::Error(e.into())),
        };
        state.claim.lock_released = finished.lock_released;
        state.stored.extend(finished.messages);
        state.turn.status = TurnStatus::Completed;
        state.turn.message_ids = state.stored.iter().map(|m| m.id).collect();
        state.turn.usage = state.usage;
        state.turn.completed_at = completed_at;
        Ok(self.answer(state, TurnStatus::Completed))
    }

    /// The answer of a saved turn, and its closing events for a streaming client.
    fn answer(&self, state: &mut TurnState, status: TurnStatus) -> TurnResult {
        let (turn_id, usage) = (state.turn.id, state.usage);
        if state.events.is_none() {
            // A JSON answer: the stored messages go to the client, nothing else needs them.
            return TurnResult { turn_id, messages: std::mem::take(&mut state.stored), usage };
        }
        let result = TurnResult { turn_id, messages: state.stored.clone(), usage };
        let messages = &result.messages;
        if status == TurnStatus::Cancelled {
            state.emit_last(|_| TurnEvent::Cancelled { turn_id, messages: messages.clone() });
            return result;
        }
        if let Some(last) = messages.last() {
            let message = last.clone();
            state.emit_last(|_| TurnEvent::MessageCompleted { turn_id, message });
        }
        state.emit_last(|_| TurnEvent::Completed { turn_id, messages: messages.clone(), usage });
        result
    }

    /// Records a failure and reports it: the failed record, fenced, releasing the session in the
    /// same step; a turn that no longer holds its session writes the record alone, which changes
    /// nothing if the turn already ended (a terminal record never changes).
    async fn fail(&self, state: &mut TurnState, error: AppError) -> AppError {
        let problem = error.problem();
        self.mark_failed(state, &problem);
        // The answer waits for the record at most the margin: a store that failed the turn may
        // not answer this write either, and the answer's bound is the store timeout plus the
        // margin. Past it, the record is written in the background once the store answers.
        let margin = claim::OUTCOME_MARGIN.min(self.store_timeout());
        match tokio::time::timeout(margin, self.write_failure(state)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(turn.id = %state.turn.id, error = %e, "could not record the failed turn")
            }
            Err(_) => {
                tracing::warn!(turn.id = %state.turn.id, "the store did not record the failed turn in time; retrying in the background");
                state.claim.settle = Some(state.turn.clone());
            }
        }
        tracing::info!(turn.id = %state.turn.id, session.id = %state.turn.session_id, error.code = error.code(), "turn failed");
        state.emit_last(|s| TurnEvent::Failed { turn_id: s.turn.id, error: problem });
        error
    }

    fn mark_failed(&self, state: &mut TurnState, problem: &crate::error::Problem) {
        state.turn.status = TurnStatus::Failed;
        state.turn.error = serde_json::to_value(problem).ok();
        state.turn.message_ids = state.stored.iter().map(|m| m.id).collect();
        state.turn.usage = state.usage;
        state.turn.completed_at = Some(now());
    }

    /// Writes the failed record (see [`Agent::fail`]).
    async fn write_failure(&self, state: &mut TurnState) -> Result<(), StoreError> {
        let (tenant, session, turn_id) = (&state.tenant, state.turn.session_id.as_str(), state.turn.id);
        let batch = AppendBatch { turn: Some(state.turn.clone()), ..AppendBatch::default() };
        match self.store.finish_turn(tenant, session, batch, turn_id).await {
            Ok(finished) => {
                state.claim.lock_released = finished.lock_released;
                Ok(())
            }
            Err(StoreError::Fenced) => {
                // The lock is not the turn's any more: nothing of it to release.
                state.claim.lock_released = true;
                self.store.history().put_turn(tenant, &state.turn).await
            }
            Err(e) => Err(e),
        }
    }

    /// The turn's last write got no answer. Settles it within [`claim::OUTCOME_MARGIN`]: writes
    /// the failed record fenced (if that is applied, the earlier write cannot be any more, since
    /// it was fenced by the lock this one releases); if the fence refuses it, the earlier write
    /// was applied (or the lease ran out): the record says which. If the store still does not
    /// answer, the client is told `turn_outcome_unknown` and the settling goes on in the
    /// background; the record is never marked failed for a turn that was saved.
    async fn resolve_unanswered(
        &self,
        state: &mut TurnState,
        error: AppError,
    ) -> Result<TurnResult, AppError> {
        let margin = claim::OUTCOME_MARGIN.min(self.store_timeout());
        let problem = error.problem();
        self.mark_failed(state, &problem);
        let settled = tokio::time::timeout(margin, self.settle_or_read(state)).await;
        match settled {
            Ok(Ok(None)) => {
                tracing::info!(turn.id = %state.turn.id, "turn failed: its last write got no answer, and was not applied");
                state.emit_last(|s| TurnEvent::Failed { turn_id: s.turn.id, error: problem });
                Err(error)
            }
            Ok(Ok(Some(turn))) if matches!(turn.status, TurnStatus::Completed | TurnStatus::Cancelled) => {
                let stored = self.turn_messages(state, &turn).await;
                state.stored = stored;
                state.turn = turn;
                let status = state.turn.status;
                Ok(self.answer(state, status))
            }
            Ok(Ok(Some(turn))) => {
                state.turn = turn;
                let e = AppError::TurnAbandoned;
                state.emit_last(|s| TurnEvent::Failed { turn_id: s.turn.id, error: e.problem() });
                Err(e)
            }
            Ok(Err(_)) | Err(_) => {
                state.claim.settle = Some(state.turn.clone());
                let e = AppError::TurnOutcomeUnknown(state.turn.id);
                tracing::warn!(turn.id = %state.turn.id, "the store did not confirm the turn's last write");
                state.emit_last(|s| TurnEvent::Failed { turn_id: s.turn.id, error: e.problem() });
                Err(e)
            }
        }
    }

    /// Writes the failed record fenced; `None` if it was applied, else the turn's record as the
    /// store has it (the fence refused: the turn's earlier write was applied, or its lease ran
    /// out).
    async fn settle_or_read(&self, state: &mut TurnState) -> Result<Option<Turn>, StoreError> {
        let (tenant, turn_id) = (state.tenant.clone(), state.turn.id);
        let batch = AppendBatch { turn: Some(state.turn.clone()), ..AppendBatch::default() };
        match self.store.finish_turn(&tenant, state.session_id(), batch, turn_id).await {
            Ok(finished) => {
                state.claim.lock_released = finished.lock_released;
                Ok(None)
            }
            Err(StoreError::Fenced) => {
                state.claim.lock_released = true;
                let turn = self.store.history().get_turn(&tenant, state.session_id(), turn_id).await?;
                Ok(Some(turn.unwrap_or_else(|| state.turn.clone())))
            }
            Err(e) => Err(e),
        }
    }

    /// The stored messages of a turn, with their seqs, read back by turn.
    async fn turn_messages(&self, state: &TurnState, turn: &Turn) -> Vec<Message> {
        let history = self.store.history();
        history.turn_messages(&state.tenant, state.session_id(), turn.id).await.unwrap_or_default()
    }

    fn count_replay(&self) {
        if let Some(metrics) = &self.settings.metrics {
            metrics.idempotent_replay();
        }
    }

    /// The store's time limit per call, as the agent was told it.
    fn store_timeout(&self) -> Duration {
        self.settings.store_timeout
    }

    /// Saves what a cancelled turn produced: the user message, finished tool rounds, and the
    /// partial assistant text marked `status: cancelled` (none if the model had said nothing),
    /// fenced, releasing the session in the same step.
    async fn save_cancelled(&self, state: &mut TurnState) -> Result<TurnResult, AppError> {
        // A round whose tool results are not all in is dropped, so no tool call is left unanswered.
        if let Some(pos) = state.pending.iter().rposition(Message::calls_tools) {
            let answered =
                state.pending[pos + 1..].len() == state.pending[pos].tool_calls.as_ref().map_or(0, Vec::len);
            if !answered {
                state.pending.truncate(pos);
            }
        }
        if !state.partial_text.is_empty() {
            let mut partial =
                Message::new(state.session_id(), state.turn.id, Role::Assistant, state.partial_text.clone());
            partial.id = state.partial_id;
            partial.metadata.insert("status".to_owned(), json!("cancelled"));
            state.pending.push(partial);
        }
        let mut turn = state.turn.clone();
        turn.status = TurnStatus::Cancelled;
        turn.message_ids = state.turn_messages().map(|m| m.id).collect();
        turn.usage = state.usage;
        turn.completed_at = Some(now());
        let batch = AppendBatch {
            messages: std::mem::take(&mut state.pending),
            turn: Some(turn.clone()),
            // A cancelled edit supersedes what it replaces in the same write: the user chose to.
            supersede_from: state.replace_from,
        };
        match self.store.finish_turn(&state.tenant, state.session_id(), batch, turn.id).await {
            Ok(finished) => {
                state.claim.lock_released = finished.lock_released;
                state.stored.extend(finished.messages);
            }
            Err(e) if e.outcome_unknown() => return self.resolve_unanswered(state, e.into()).await,
            Err(e) => return Err(self.fail(state, e.into()).await),
        }
        state.turn = turn;
        Ok(self.answer(state, TurnStatus::Cancelled))
    }
}

/// The span of a turn, for traces: its session and turn ids (recorded once made) and status.
fn turn_span(session_id: &str) -> tracing::Span {
    use tracing::field::Empty;
    tracing::info_span!(target: telemetry::TARGET, "turn",
        session.id = %session_id, turn.id = Empty, turn.status = Empty, otel.status_code = Empty)
}

/// The span of one model call, for traces: `chat {model}`.
fn model_span(model: &str) -> tracing::Span {
    tracing::info_span!(target: telemetry::TARGET, "model",
        otel.name = %format_args!("chat {model}"), otel.kind = "client", otel.status_code = tracing::field::Empty,
        gen_ai.operation.name = "chat", gen_ai.request.model = %model)
}

/// The span of one tool call, for traces: `execute_tool {tool}`.
fn tool_span(tool: &str) -> tracing::Span {
    tracing::info_span!(target: telemetry::TARGET, "tool",
        otel.name = %format_args!("execute_tool {tool}"), otel.status_code = tracing::field::Empty,
        gen_ai.operation.name = "execute_tool",
        gen_ai.tool.name = %tool)
}

/// The text of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// The state of a turn that starts: the user's message takes the input's text and metadata.
fn new_state(
    input: &mut TurnInput,
    turn: Turn,
    prompt: Vec<PromptMessage>,
    events: Option<Arc<TurnFeed>>,
    claim: claim::ClaimGuard,
) -> TurnState {
    let mut user = Message::new(&input.session_id, turn.id, Role::User, std::mem::take(&mut input.content));
    user.metadata = std::mem::take(&mut input.metadata);
    TurnState {
        tenant: input.tenant.clone(),
        turn,
        prompt,
        pending: vec![user],
        stored: Vec::new(),
        partial_id: Uuid::nil(),
        partial_text: String::new(),
        usage: None,
        events,
        closing: Vec::new(),
        idempotency_key: input.idempotency_key.clone(),
        claim,
        replace_from: input.replace_from,
    }
}

/// Drops the messages of turns that stopped in the middle of a tool round: turns whose last
/// stored message is a tool result or a tool call. Those are rounds saved by save-on-iteration
/// for a turn that then failed (or is still running); they stay readable but are not sent again.
pub fn drop_unfinished_turns(messages: Vec<WindowMessage>) -> Vec<WindowMessage> {
    // Without tool messages no turn can have stopped in a tool round (the common case: no map).
    if !messages.iter().any(|m| m.role == Role::Tool || m.calls_tools()) {
        return messages;
    }
    let mut last: HashMap<Uuid, &WindowMessage> = HashMap::new();
    for m in &messages {
        last.insert(m.turn_id, m);
    }
    let unfinished: Vec<Uuid> =
        last.iter().filter(|(_, m)| m.role == Role::Tool || m.calls_tools()).map(|(id, _)| *id).collect();
    if unfinished.is_empty() {
        return messages;
    }
    messages.into_iter().filter(|m| !unfinished.contains(&m.turn_id)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ToolCall;

    #[test]
    fn rounds_of_turns_that_never_finished_are_left_out() {
        let done = new_id();
        let broken = new_id();
        let mut call = Message::new("s", broken, Role::Assistant, "");
        call.tool_calls = Some(vec![ToolCall { id: "c".into(), name: "x".into(), arguments: json!({}) }]);
        let mut result = Message::new("s", broken, Role::Tool, "r");
        result.tool_call_id = Some("c".into());
        let history = vec![
            Message::new("s", done, Role::User, "q1"),
            Message::new("s", done, Role::Assistant, "a1"),
            Message::new("s", broken, Role::User, "q2"),
            call,
            result,
        ];
        let history: Vec<WindowMessage> = history.into_iter().map(WindowMessage::from).collect();
        let kept = drop_unfinished_turns(history.clone());
        assert_eq!(kept, history[..2].to_vec());
    }
}
