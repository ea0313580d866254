//! The turn: load the session's history window, call the model, run the tools it asks for, loop
//! until it answers, and append every message of the turn to the store.
//!
//! - [`window`]: the history window that never separates a tool call from its results.
//! - [`events`]: the typed events streamed to clients, and the turn result.
//! - [`registry`]: the turns running in this process (one per session, cancellable).
//!
//! A turn runs in its own task: a client that disconnects does not stop it. Messages are appended
//! in one atomic batch when the turn completes (or, with save-on-iteration, one batch per tool
//! round and one at the end); a turn that fails appends nothing more and records why.

pub mod claim;
pub mod events;
pub mod feed;
pub mod registry;
pub mod window;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use events::{TurnEvent, TurnResult};
use feed::TurnFeed;
use registry::TurnRegistry;

use crate::config::IfBusy;
use crate::domain::{Message, Metadata, Role, ToolCall, Turn, TurnStatus, Usage, new_id, now};
use crate::error::AppError;
use crate::llm::{ChatRequest, DynModel, ModelError, ModelEvent, ModelOutput, PromptMessage};
use crate::store::{AppendBatch, DynStore};
use crate::tools::ToolRegistry;

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
}

/// How a turn request was answered.
#[derive(Debug)]
pub enum TurnStart {
    /// A new turn runs.
    Started(StartedTurn),
    /// A retry of a completed request: its saved answer.
    Replayed(TurnResult),
    /// A streaming retry of a request whose turn still runs here: its events from the first.
    Attached(Arc<TurnFeed>),
}

/// A turn that has started: its events as they happen, and its outcome.
#[derive(Debug)]
pub struct StartedTurn {
    /// The turn id.
    pub turn_id: Uuid,
    /// Its events, when the client streams it (or may retry it with an idempotency key).
    pub feed: Option<Arc<TurnFeed>>,
    /// The outcome; the turn runs to the end even if this handle is dropped.
    pub outcome: tokio::task::JoinHandle<Result<TurnResult, AppError>>,
}

/// The agent: the store, the model, the tools, and the turns running here.
pub struct Agent {
    store: DynStore,
    model: DynModel,
    tools: Arc<ToolRegistry>,
    settings: AgentSettings,
    registry: TurnRegistry,
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
    /// The request's idempotency key, settled when the turn ends.
    idempotency_key: Option<String>,
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
    deadline: tokio::time::Instant,
    timeout: Duration,
}

impl Interrupt {
    async fn guard<F: std::future::Future>(&self, work: F) -> Result<F::Output, Stop> {
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Err(Stop::Cancelled),
            _ = tokio::time::sleep_until(self.deadline) => Err(Stop::Error(AppError::UpstreamTimeout(format!(
                "the turn exceeded its time limit of {} s (PARLEY_TURN_TIMEOUT)",
                self.timeout.as_secs()
            )))),
            out = work => Ok(out),
        }
    }
}

impl Agent {
    /// An agent over this store, model and tools.
    pub fn new(store: DynStore, model: DynModel, tools: ToolRegistry, settings: AgentSettings) -> Self {
        Agent { store, model, tools: Arc::new(tools), settings, registry: TurnRegistry::new() }
    }

    /// The store.
    pub fn store(&self) -> &DynStore {
        &self.store
    }

    /// The turns running in this process.
    pub fn registry(&self) -> &TurnRegistry {
        &self.registry
    }

    /// The settings.
    pub fn settings(&self) -> &AgentSettings {
        &self.settings
    }

    /// Starts a turn: checks the session, records the turn as running and spawns the loop.
    pub async fn start_turn(self: &Arc<Self>, input: TurnInput) -> Result<TurnStart, AppError> {
        let session = self
            .store
            .get_session(&input.tenant, &input.session_id)
            .await?
            .ok_or_else(|| AppError::SessionNotFound(input.session_id.clone()))?;
        let turn = Turn::start(&session.id);
        match self.begin_idempotent(&input, turn.id).await? {
            claim::Replay::Run => {}
            claim::Replay::Done(result) => return Ok(TurnStart::Replayed(result)),
            claim::Replay::Attach(feed) => return Ok(TurnStart::Attached(feed)),
        }
        match self.launch(&input, session.system_prompt.as_deref(), turn).await {
            Ok(started) => Ok(TurnStart::Started(started)),
            Err(e) => {
                if let Some(key) = &input.idempotency_key {
                    let _ = self.store.abort_idempotent(&input.tenant, &input.session_id, key).await;
                }
                Err(e)
            }
        }
    }

    /// Claims the session, prepares the prompt and spawns the turn.
    async fn launch(
        self: &Arc<Self>,
        input: &TurnInput,
        session_prompt: Option<&str>,
        turn: Turn,
    ) -> Result<StartedTurn, AppError> {
        let cancel = self.claim_session(input, turn.id).await?;
        let turn_id = turn.id;
        let prepared = self.prepare(input, session_prompt, turn).await;
        let (turn, prompt) = match prepared {
            Ok(parts) => parts,
            Err(e) => {
                let _ = self.store.release_turn_lock(&input.tenant, &input.session_id, turn_id).await;
                return Err(e);
            }
        };
        // Events are kept for a streaming client, and for a streaming retry that may attach.
        let feed = (input.stream || input.idempotency_key.is_some()).then(TurnFeed::new);
        if let Some(feed) = &feed {
            self.registry.set_feed(&input.tenant, &input.session_id, turn_id, Arc::clone(feed));
        }
        let mut state = new_state(input, turn, prompt, feed.clone());
        state.idempotency_key = input.idempotency_key.clone();
        let session = &input.session_id;
        state.emit(|| TurnEvent::Started {
            turn_id,
            session_id: session.clone(),
            user_message: state.pending[0].clone(),
        });
        let agent = Arc::clone(self);
        let outcome = self.registry.tracker().spawn(async move { agent.drive(state, cancel).await });
        Ok(StartedTurn { turn_id, feed, outcome })
    }

    /// Loads the window and records the turn as running.
    async fn prepare(
        &self,
        input: &TurnInput,
        session_prompt: Option<&str>,
        turn: Turn,
    ) -> Result<(Turn, Vec<PromptMessage>), AppError> {
        let result = async {
            let window = self.load_window(&input.tenant, &input.session_id).await?;
            self.store.put_turn(&input.tenant, &turn).await?;
            let mut prompt = Vec::with_capacity(window.len() + 2);
            if let Some(system) =
                session_prompt.or(self.settings.system_prompt.as_deref()).filter(|s| !s.is_empty())
            {
                prompt.push(PromptMessage::text(Role::System, system));
            }
            prompt.extend(window.iter().map(PromptMessage::from));
            Ok::<_, AppError>(prompt)
        }
        .await;
        match result {
            Ok(prompt) => Ok((turn, prompt)),
            Err(e) => {
                self.registry.finish(&input.tenant, &input.session_id, turn.id);
                Err(match e {
                    AppError::SessionNotFound(_) => AppError::SessionNotFound(input.session_id.clone()),
                    other => other,
                })
            }
        }
    }

    /// The messages the model sees from the past: the last `history_size`, without the saved
    /// rounds of turns that never finished, and without broken tool pairs.
    async fn load_window(&self, tenant: &str, session_id: &str) -> Result<Vec<Message>, AppError> {
        let messages = self.store.last_n(tenant, session_id, self.settings.history_size).await?;
        Ok(window::fit_window(drop_unfinished_turns(messages), self.settings.history_size))
    }

    /// Runs the loop to its end (completed, failed, cancelled or timed out) and records it.
    async fn drive(
        self: Arc<Self>,
        mut state: TurnState,
        cancel: CancellationToken,
    ) -> Result<TurnResult, AppError> {
        let timeout = self.settings.turn_timeout;
        let renewer = tokio::spawn(claim::renew_lease(
            Arc::clone(&self.store),
            state.tenant.clone(),
            state.session_id().to_owned(),
            state.turn.id,
            self.settings.turn_lease,
            cancel.clone(),
        ));
        let interrupt = Interrupt { cancel, deadline: tokio::time::Instant::now() + timeout, timeout };
        let result = match self.run(&mut state, &interrupt).await {
            Ok(result) => Ok(result),
            Err(Stop::Error(e)) => Err(self.fail(&mut state, e).await),
            Err(Stop::Cancelled) => self.save_cancelled(&mut state).await,
        };
        renewer.abort();
        self.settle_idempotency(&state, &result).await;
        let (tenant, session, turn_id) = (&state.tenant, state.session_id(), state.turn.id);
        if let Err(e) = self.store.release_turn_lock(tenant, session, turn_id).await {
            tracing::warn!(turn.id = %turn_id, error = %e, "could not release the session lock; retrying");
            let lease = self.settings.turn_lease;
            tokio::spawn(claim::release_when_possible(
                Arc::clone(&self.store),
                tenant.clone(),
                session.to_owned(),
                turn_id,
                lease,
            ));
        }
        self.registry.finish(tenant, session, turn_id);
        result
    }

    /// Saves the answer for the turn's idempotency key, or forgets the key if the turn failed.
    async fn settle_idempotency(&self, state: &TurnState, result: &Result<TurnResult, AppError>) {
        let Some(key) = &state.idempotency_key else { return };
        let (tenant, session) = (&state.tenant, state.session_id());
        let saved = match result {
            Ok(answer) => match serde_json::to_value(answer) {
                Ok(value) => {
                    self.store
                        .complete_idempotent(tenant, session, key, &value, self.settings.idempotency_ttl)
                        .await
                }
                Err(_) => Ok(()),
            },
            Err(_) if state.stored.is_empty() => self.store.abort_idempotent(tenant, session, key).await,
            Err(_) => Ok(()),
        };
        if let Err(e) = saved {
            tracing::warn!(turn.id = %state.turn.id, error = %e, "could not save the idempotency record");
        }
    }

    /// The agent loop proper.
    async fn run(&self, state: &mut TurnState, interrupt: &Interrupt) -> Result<TurnResult, Stop> {
        let max = self.settings.max_iterations;
        for iteration in 0..=max {
            let offer_tools = iteration < max && !self.tools.is_empty();
            let output = interrupt.guard(self.call_model(state, offer_tools)).await??;
            let mut assistant =
                Message::new(state.session_id(), state.turn.id, Role::Assistant, output.content);
            assistant.id = state.partial_id;
            if offer_tools && !output.tool_calls.is_empty() {
                assistant.tool_calls = Some(output.tool_calls.clone());
                state.emit(|| TurnEvent::ToolCall { turn_id: state.turn.id, message: assistant.clone() });
                state.pending.push(assistant);
                state.partial_text.clear();
                interrupt.guard(self.run_tools(state, &output.tool_calls)).await?;
                if self.settings.save_on_iteration {
                    self.save_round(state).await?;
                }
                continue;
            }
            state.pending.push(assistant);
            state.partial_text.clear();
            break;
        }
        Ok(self.complete(state).await?)
    }

    /// One model call, streaming its text to the client as it comes.
    async fn call_model(&self, state: &mut TurnState, offer_tools: bool) -> Result<ModelOutput, AppError> {
        state.partial_id = new_id();
        state.partial_text.clear();
        let mut messages = state.prompt.clone();
        messages.extend(state.turn_messages().map(PromptMessage::from));
        let tools = if offer_tools { self.tools.specs() } else { Vec::new() };
        let mut stream = self.model.stream(ChatRequest { messages, tools }).await?;
        while let Some(event) = stream.next().await {
            match event? {
                ModelEvent::Delta(delta) => {
                    state.partial_text.push_str(&delta);
                    let (turn_id, message_id) = (state.turn.id, state.partial_id);
                    state.emit(move || TurnEvent::Delta { turn_id, message_id, delta });
                }
                ModelEvent::Done(output) => {
                    state.add_usage(output.usage);
                    return Ok(output);
                }
            }
        }
        Err(ModelError::Protocol("the model stream ended before the reply was complete".to_owned()).into())
    }

    /// Runs one round of tool calls concurrently; results keep the calls' order.
    async fn run_tools(&self, state: &mut TurnState, calls: &[ToolCall]) {
        let runs = calls.iter().map(|call| self.tools.run(&call.name, &call.arguments));
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

    /// Appends the pending messages of a finished tool round (save-on-iteration).
    async fn save_round(&self, state: &mut TurnState) -> Result<(), AppError> {
        let mut turn = state.turn.clone();
        turn.message_ids = state.turn_messages().map(|m| m.id).collect();
        turn.usage = state.usage;
        let batch = AppendBatch { messages: std::mem::take(&mut state.pending), turn: Some(turn.clone()) };
        let stored = self.store.append(&state.tenant, state.session_id(), batch).await?;
        state.stored.extend(stored);
        state.turn = turn;
        Ok(())
    }

    /// Appends the rest of the turn with its completed record.
    async fn complete(&self, state: &mut TurnState) -> Result<TurnResult, AppError> {
        let mut turn = state.turn.clone();
        turn.status = TurnStatus::Completed;
        turn.message_ids = state.turn_messages().map(|m| m.id).collect();
        turn.usage = state.usage;
        turn.completed_at = Some(now());
        let batch = AppendBatch { messages: state.pending.clone(), turn: Some(turn.clone()) };
        let stored = self.store.append(&state.tenant, state.session_id(), batch).await?;
        state.pending.clear();
        state.stored.extend(stored);
        state.turn = turn;
        let turn_id = state.turn.id;
        if let Some(last) = state.stored.last() {
            state.emit(|| TurnEvent::MessageCompleted { turn_id, message: last.clone() });
        }
        let result = TurnResult { turn_id, messages: state.stored.clone(), usage: state.usage };
        state.emit(|| TurnEvent::Completed {
            turn_id,
            messages: result.messages.clone(),
            usage: result.usage,
        });
        Ok(result)
    }

    /// Records a failure (best effort: the store may be the thing that failed) and reports it.
    async fn fail(&self, state: &mut TurnState, error: AppError) -> AppError {
        let problem = error.problem();
        state.turn.status = TurnStatus::Failed;
        state.turn.error = serde_json::to_value(&problem).ok();
        state.turn.message_ids = state.stored.iter().map(|m| m.id).collect();
        state.turn.usage = state.usage;
        state.turn.completed_at = Some(now());
        if let Err(e) = self.store.put_turn(&state.tenant, &state.turn).await {
            tracing::warn!(turn.id = %state.turn.id, error = %e, "could not record the failed turn");
        }
        tracing::info!(turn.id = %state.turn.id, session.id = %state.turn.session_id, error.code = error.code(), "turn failed");
        state.emit(|| TurnEvent::Failed { turn_id: state.turn.id, error: problem });
        error
    }

    /// Saves what a cancelled turn produced: the user message, finished tool rounds, and the
    /// partial assistant text marked `status: cancelled` (none if the model had said nothing).
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
        let batch = AppendBatch { messages: std::mem::take(&mut state.pending), turn: Some(turn.clone()) };
        match self.store.append(&state.tenant, state.session_id(), batch).await {
            Ok(stored) => state.stored.extend(stored),
            Err(e) => return Err(self.fail(state, e.into()).await),
        }
        state.turn = turn;
        state.emit(|| TurnEvent::Cancelled { turn_id: state.turn.id, messages: state.stored.clone() });
        Ok(TurnResult { turn_id: state.turn.id, messages: state.stored.clone(), usage: state.usage })
    }
}

fn new_state(
    input: &TurnInput,
    turn: Turn,
    prompt: Vec<PromptMessage>,
    events: Option<Arc<TurnFeed>>,
) -> TurnState {
    let mut user = Message::new(&input.session_id, turn.id, Role::User, input.content.clone());
    user.metadata = input.metadata.clone();
    TurnState {
        tenant: input.tenant.clone(),
        turn,
        prompt,
        pending: vec![user],
        stored: Vec::new(),
        partial_id: new_id(),
        partial_text: String::new(),
        usage: None,
        events,
        idempotency_key: None,
    }
}

/// Drops the messages of turns that stopped in the middle of a tool round: turns whose last
/// stored message is a tool result or a tool call. Those are rounds saved by save-on-iteration
/// for a turn that then failed (or is still running); they stay readable but are not sent again.
pub fn drop_unfinished_turns(messages: Vec<Message>) -> Vec<Message> {
    let mut last: HashMap<Uuid, &Message> = HashMap::new();
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
        let kept = drop_unfinished_turns(history.clone());
        assert_eq!(kept, history[..2].to_vec());
    }
}
