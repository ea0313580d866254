//! parley: a chat-session microservice. Sessions, history and streamed agent replies that never
//! lose a message.
//!
//! # Layout
//! - [`config`]: the typed configuration (flags and environment variables).
//! - [`error`]: the API error type, rendered as RFC 9457 problem+json.
//! - [`domain`]: sessions, messages, tool calls, turns.
//! - [`store`]: the store's traits (`ConversationStore` for the history, `TurnCoordinator` for
//!   locks, leases and idempotency keys, `FusedTurns` for the one-round-trip paths of a backend
//!   owning both), its backends and its contract suites (`store::contract`, one per trait, with
//!   the `contract` feature only). Each durable backend is a folder of
//!   one-job files: `store/sqlite/` and `store/postgres/` (the store, `sql/*.sql` statements,
//!   rows, errors; PostgreSQL's own connection pool), `store/redis/` (the store, key layout,
//!   `scripts/*.lua`, pool, the standalone coordinator); `store/memory.rs` is one file, and
//!   `store/memory_coordinator.rs` coordinates in one process for a history kept elsewhere.
//! - [`llm`]: the chat model trait and its providers (echo, OpenAI-compatible).
//! - [`tools`]: the tool trait, the registry and the built-in and HTTP tools.
//! - [`agent`]: the turn: load the window, call the model, run tools, append.
//! - [`http`]: the HTTP API: one module per resource, extractors, middleware, OpenAPI; the chat
//!   page at `/` (its files are in `web/`).
//! - [`auth`]: API keys (format, digests, the key ring) and the tenants they act for.
//! - [`ratelimit`]: fixed-window counters and concurrency slots, in memory or in Redis.
//! - [`metrics`]: the Prometheus series parley exports at `/metrics`.
//! - [`redact`]: secrets kept out of logs and `Debug` output (URL passwords, keys, tokens).
//! - [`telemetry`]: traces (OpenTelemetry): the process-wide switch, the spans parts open, the
//!   `traceparent` of outgoing requests, and the OTLP/HTTP exporter the wiring installs.
//! - [`runtime`]: the Tokio runtime, with worker threads optionally pinned one per CPU.
//! - [`server`]: the accept loop: HTTP/1.1 and h2c connections, head and idle timeouts, the
//!   connection cap, graceful shutdown.
//! - [`app`]: wiring: build the state from a config, serve until shutdown.

pub mod agent;
pub mod app;
pub mod auth;
pub mod config;
pub mod domain;
pub mod error;
pub mod http;
pub mod llm;
pub mod logwriter;
pub mod metrics;
pub mod ratelimit;
pub mod redact;
pub mod runtime;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tools;
