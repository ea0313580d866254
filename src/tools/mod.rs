//! Tools the model may call: the trait, the registry the agent uses, and the built-in tools.
//!
//! - [`builtin`]: `current_time` and `calculator`.
//! - [`http`]: tools declared in a config file (`PARLEY_TOOLS_FILE`) that POST their arguments.

pub mod builtin;
pub mod http;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::llm::ToolSpec;

/// How long a tool may run when it does not say otherwise.
pub const DEFAULT_TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a tool call produced no result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolError {
    /// The arguments do not fit the tool.
    #[error("invalid arguments: {0}")]
    InvalidArguments(String),
    /// The tool ran and failed.
    #[error("{0}")]
    Failed(String),
}

/// A tool the model can call.
#[async_trait]
pub trait Tool: Send + Sync + 'static {
    /// The name the model calls it by (`[a-zA-Z0-9_-]{1,64}`).
    fn name(&self) -> &str;
    /// What it does, for the model.
    fn description(&self) -> &str;
    /// JSON Schema of its arguments (an object schema).
    fn parameters(&self) -> Value;
    /// How long one call may take.
    fn timeout(&self) -> Duration {
        DEFAULT_TOOL_TIMEOUT
    }
    /// Runs the tool with a JSON object of arguments; the text returned goes to the model.
    async fn call(&self, arguments: Value) -> Result<String, ToolError>;
}

/// The tools available to the agent, by name, in the order they were registered.
#[derive(Clone, Default)]
pub struct ToolRegistry {
    tools: Vec<Arc<dyn Tool>>,
    by_name: HashMap<String, usize>,
    /// The tools as offered to the model, built once per registration rather than per call.
    specs: Arc<[ToolSpec]>,
}

impl std::fmt::Debug for ToolRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.tools.iter().map(|t| t.name())).finish()
    }
}

impl ToolRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The built-in tools (`current_time`, `calculator`).
    pub fn with_builtins() -> Self {
        let mut registry = Self::new();
        for tool in builtin::all() {
            registry.register(tool).expect("built-in tool names are unique");
        }
        registry
    }

    /// Adds a tool; an error if the name is taken.
    pub fn register(&mut self, tool: Arc<dyn Tool>) -> Result<(), String> {
        let name = tool.name().to_owned();
        if self.by_name.contains_key(&name) {
            return Err(format!("a tool named {name:?} is already registered"));
        }
        self.by_name.insert(name, self.tools.len());
        self.tools.push(tool);
        self.specs = self
            .tools
            .iter()
            .map(|t| ToolSpec {
                name: t.name().to_owned(),
                description: t.description().to_owned(),
                parameters: t.parameters(),
            })
            .collect();
        Ok(())
    }

    /// The tool with this name.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Tool>> {
        self.by_name.get(name).map(|&i| &self.tools[i])
    }

    /// Whether there are no tools.
    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }

    /// The tools as offered to the model.
    pub fn specs(&self) -> Arc<[ToolSpec]> {
        Arc::clone(&self.specs)
    }

    /// Runs a call by name and always returns the text for the tool message: the result, or a
    /// sentence saying why there is none (unknown tool, invalid arguments, error, timeout).
    pub async fn run(&self, name: &str, arguments: &Value) -> ToolOutcome {
        let Some(tool) = self.get(name) else {
            return ToolOutcome::error(format!("error: unknown tool {name:?}"));
        };
        if !arguments.is_object() {
            return ToolOutcome::error(format!(
                "error: invalid arguments for {name}: expected a JSON object, got {}",
                truncate(&arguments.to_string(), 200)
            ));
        }
        let timeout = tool.timeout();
        match tokio::time::timeout(timeout, tool.call(arguments.clone())).await {
            Ok(Ok(text)) => ToolOutcome { content: text, is_error: false },
            Ok(Err(e)) => ToolOutcome::error(format!("error: {name} failed: {e}")),
            Err(_) => ToolOutcome::error(format!("error: {name} timed out after {} ms", timeout.as_millis())),
        }
    }
}

/// What a tool call produced, as the tool message's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOutcome {
    /// The text given to the model.
    pub content: String,
    /// Whether the call failed.
    pub is_error: bool,
}

impl ToolOutcome {
    fn error(content: String) -> Self {
        ToolOutcome { content, is_error: true }
    }
}

/// Cuts `text` to at most `max` bytes on a char boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
