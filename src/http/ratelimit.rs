//! Rate limits per key: requests per second on `/v1/*`, turns per window and concurrent streams
//! on `POST /v1/sessions/{id}/messages` and the chat clients' turns (`POST /v1/ai-sdk/chat`,
//! `POST /v1/ag-ui`; their resume stream holds a stream slot too).
//!
//! A request over a limit answers 429 `rate_limited` with `Retry-After` (seconds). Limited
//! responses carry `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` (seconds until
//! the window closes) for the tightest of the limits that applied. Every `POST …/messages` counts
//! as a turn, whatever its outcome. A stream holds a slot from its request until its body ends
//! (the turn ended or the client went away).
//!
//! Counts are per [`Principal::key_id`]: per API key, or per client address with authentication
//! off. If the limiter's backend fails, requests go through and a warning is logged: an outage of
//! the limiter must not become an outage of the service.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use crate::auth::Principal;
use crate::config::{AuthMode, Config, LimiterKind, StoreKind};
use crate::error::AppError;
use crate::ratelimit::memory::MemoryLimiter;
use crate::ratelimit::redis::RedisLimiter;
use crate::ratelimit::{DynLimiter, LimiterError, Slot, WindowHit};

/// The window of the requests-per-second limit.
const SECOND: Duration = Duration::from_secs(1);

/// How long a stream slot outlives the turn timeout at most, in case its release is lost.
const STREAM_LEASE_MARGIN: Duration = Duration::from_secs(60);

/// The limits in force and the limiter that counts them.
#[derive(Clone)]
pub struct RateLimits {
    /// `None` when every limit is off.
    limiter: Option<DynLimiter>,
    /// Requests per second per key; 0 is off.
    pub rps: u64,
    /// Turns per `turns_window` per key; 0 is off.
    pub turns: u64,
    /// The window of `turns`.
    pub turns_window: Duration,
    /// Concurrent streams per key; 0 is off.
    pub max_streams: u64,
    /// Longest a stream slot is held if its release is lost (Redis).
    pub stream_lease: Duration,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("limiter", &self.limiter.as_ref().map(|l| l.backend()))
            .field("rps", &self.rps)
            .field("turns", &self.turns)
            .field("turns_window", &self.turns_window)
            .field("max_streams", &self.max_streams)
            .finish()
    }
}

/// Defaults that apply with `PARLEY_AUTH=api_key` when a limit is not set.
const DEFAULT_RPS: u64 = 100;
const DEFAULT_TURNS_PER_WINDOW: u64 = 120;
const DEFAULT_STREAMS: u64 = 32;

impl RateLimits {
    /// No limit.
    pub fn off() -> Self {
        RateLimits {
            limiter: None,
            rps: 0,
            turns: 0,
            turns_window: Duration::from_secs(60),
            max_streams: 0,
            stream_lease: Duration::from_secs(3600),
        }
    }

    /// Whether any limit applies.
    pub fn is_on(&self) -> bool {
        self.limiter.is_some()
    }

    /// These limits, counted by `limiter`.
    pub fn new(limiter: DynLimiter, rps: u64, turns: u64, turns_window: Duration, max_streams: u64) -> Self {
        RateLimits { limiter: Some(limiter), rps, turns, turns_window, max_streams, ..RateLimits::off() }
    }

    /// The configured limits: unset ones default to generous values with `PARLEY_AUTH=api_key` and
    /// to off otherwise. The limiter is Redis with the Redis store (or when asked), else memory.
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let limits = &config.limits;
        let keyed = config.auth.mode == Some(AuthMode::ApiKey);
        let pick = |set: Option<u64>, default: u64| set.unwrap_or(if keyed { default } else { 0 });
        let rps = pick(limits.rate_limit_rps, DEFAULT_RPS);
        let turns = pick(limits.rate_limit_turns_per_min, DEFAULT_TURNS_PER_WINDOW);
        let max_streams = pick(limits.max_streams_per_key, DEFAULT_STREAMS);
        if rps == 0 && turns == 0 && max_streams == 0 {
            return Ok(RateLimits::off());
        }
        let limiter = build_limiter(config)?;
        tracing::info!(limiter = limiter.backend(), rps, turns, max_streams, "rate limits on");
        let mut built = RateLimits::new(limiter, rps, turns, limits.rate_limit_turns_window, max_streams);
        built.stream_lease = config.agent.turn_timeout + STREAM_LEASE_MARGIN;
        Ok(built)
    }
}

fn build_limiter(config: &Config) -> anyhow::Result<DynLimiter> {
    let redis = match config.limits.rate_limit_store {
        LimiterKind::Auto => config.store.kind == StoreKind::Redis,
        LimiterKind::Redis => true,
        LimiterKind::Memory => false,
    };
    if !redis {
        return Ok(Arc::new(MemoryLimiter::new()));
    }
    let store = &config.store;
    let limiter = RedisLimiter::new(&store.redis_url, &store.redis_prefix, store.store_timeout)?;
    Ok(Arc::new(limiter))
}

/// What the `RateLimit-*` headers report: one limit and where it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Quota {
    limit: u64,
    remaining: u64,
    /// Whole seconds until the window closes, at least 1.
    reset_secs: u64,
}

impl Quota {
    fn of(hit: WindowHit, limit: u64) -> Self {
        let reset_secs = hit.reset.as_millis().div_ceil(1000).max(1) as u64;
        Quota { limit, remaining: limit.saturating_sub(hit.count), reset_secs }
    }

    fn exceeded(hit: WindowHit, limit: u64) -> bool {
        hit.count > limit
    }

    /// The tighter of two quotas: fewer remaining, then the later reset.
    fn tighter(self, other: Option<Quota>) -> Quota {
        match other {
            Some(o)
                if (o.remaining, std::cmp::Reverse(o.reset_secs))
                    < (self.remaining, std::cmp::Reverse(self.reset_secs)) =>
            {
                o
            }
            _ => self,
        }
    }

    fn write(&self, headers: &mut HeaderMap) {
        headers.insert("ratelimit-limit", HeaderValue::from(self.limit));
        headers.insert("ratelimit-remaining", HeaderValue::from(self.remaining));
        headers.insert("ratelimit-reset", HeaderValue::from(self.reset_secs));
    }
}

/// The 429 answer, with `Retry-After` and the quota headers.
fn refuse(detail: String, retry_after_secs: u64, quota: Option<Quota>) -> Response {
    let mut response = AppError::RateLimited { detail, retry_after_secs }.into_response();
    if let Some(quota) = quota {
        quota.write(response.headers_mut());
    }
    response
}

/// Whether a request posts a turn: `POST /v1/sessions/{id}/messages`, or a chat client's
/// (`POST /v1/ai-sdk/chat`, `POST /v1/ag-ui`, which always stream).
fn is_turn(request: &Request) -> bool {
    let mut parts = request.uri().path().split('/');
    request.method() == Method::POST
        && (is_client_turn(request)
            || matches!(
                (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next()),
                (Some(""), Some("v1"), Some("sessions"), Some(_), Some("messages"), None)
            ))
}

/// Whether a request posts a chat client's turn, always streamed.
fn is_client_turn(request: &Request) -> bool {
    request.method() == Method::POST && matches!(request.uri().path(), "/v1/ai-sdk/chat" | "/v1/ag-ui")
}

/// Whether a request resumes an AI SDK chat's stream: `GET /v1/ai-sdk/chat/{id}/stream`.
fn is_resume(request: &Request) -> bool {
    let mut parts = request.uri().path().split('/');
    request.method() == Method::GET
        && matches!(
            (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next()
            ),
            (Some(""), Some("v1"), Some("ai-sdk"), Some("chat"), Some(_), Some("stream"), None)
        )
}

/// Whether a request follows a turn's events: `GET /v1/sessions/{id}/turns/{turn_id}/events`.
fn is_follow(request: &Request) -> bool {
    let mut parts = request.uri().path().split('/');
    request.method() == Method::GET
        && matches!(
            (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next()
            ),
            (Some(""), Some("v1"), Some("sessions"), Some(_), Some("turns"), Some(_), Some("events"), None)
        )
}

/// Whether a turn asks for a stream (as the messages handler decides: `?stream=true` or an
/// `Accept` that lists `text/event-stream`).
fn wants_stream(request: &Request) -> bool {
    let query = request.uri().query().unwrap_or("");
    query.split('&').any(|pair| pair == "stream=true")
        || request
            .headers()
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|part| part.trim().starts_with("text/event-stream")))
}

/// A limit counted in fixed windows.
#[derive(Debug, Clone, Copy)]
struct Windowed {
    /// The counter's name (`rps`, `turns`).
    kind: &'static str,
    /// Events allowed per window.
    limit: u64,
    /// The window.
    window: Duration,
    /// What is counted, for the 429 text.
    what: &'static str,
}

/// The outcome of one check: go on (maybe with a quota to report) or refuse.
enum Check<T> {
    Pass(T),
    Refuse(Response),
}

fn limiter_down(error: &LimiterError) {
    tracing::warn!(%error, "rate limiter unavailable: request let through");
}

impl RateLimits {
    /// Counts a hit against a windowed limit; `Pass(None)` when the limiter failed.
    async fn window(&self, limiter: &DynLimiter, p: &Principal, rule: Windowed) -> Check<Option<Quota>> {
        let Windowed { kind, limit, window, what } = rule;
        match limiter.hit(&p.key_id, kind, window).await {
            Ok(hit) if Quota::exceeded(hit, limit) => {
                let quota = Quota::of(hit, limit);
                let detail = format!(
                    "rate limit reached: {limit} {what} per {} for this key; retry in {} s",
                    humantime::format_duration(window),
                    quota.reset_secs
                );
                Check::Refuse(refuse(detail, quota.reset_secs, Some(quota)))
            }
            Ok(hit) => Check::Pass(Some(Quota::of(hit, limit))),
            Err(error) => {
                limiter_down(&error);
                Check::Pass(None)
            }
        }
    }

    /// Takes a stream slot; `Pass(None)` when the limiter failed.
    async fn stream_slot(
        &self,
        limiter: &DynLimiter,
        p: &Principal,
        quota: Option<Quota>,
    ) -> Check<Option<Slot>> {
        match limiter.acquire(&p.key_id, "streams", self.max_streams, self.stream_lease).await {
            Ok(Some(slot)) => Check::Pass(Some(slot)),
            Ok(None) => {
                let detail = format!(
                    "{} streams are already open for this key (PARLEY_MAX_STREAMS_PER_KEY); retry when one ends",
                    self.max_streams
                );
                Check::Refuse(refuse(detail, 1, quota))
            }
            Err(error) => {
                limiter_down(&error);
                Check::Pass(None)
            }
        }
    }

    /// Runs every check that applies to a request (`turn`: `None` for other requests, else whether
    /// it asks for a stream); the quota to report and the stream slot to hold.
    async fn check(
        &self,
        limiter: &DynLimiter,
        p: &Principal,
        turn: bool,
        stream: bool,
    ) -> Check<(Option<Quota>, Option<Slot>)> {
        let mut quota = None;
        if self.rps > 0 {
            let rule = Windowed { kind: "rps", limit: self.rps, window: SECOND, what: "requests" };
            match self.window(limiter, p, rule).await {
                Check::Pass(q) => quota = q,
                Check::Refuse(r) => return Check::Refuse(r),
            }
        }
        let mut slot = None;
        if self.max_streams > 0 && stream {
            match self.stream_slot(limiter, p, quota).await {
                Check::Pass(s) => slot = s,
                Check::Refuse(r) => return Check::Refuse(r),
            }
        }
        if self.turns > 0 && turn {
            let rule =
                Windowed { kind: "turns", limit: self.turns, window: self.turns_window, what: "turns" };
            match self.window(limiter, p, rule).await {
                Check::Pass(Some(q)) => quota = Some(q.tighter(quota)),
                Check::Pass(None) => {}
                Check::Refuse(r) => return Check::Refuse(r),
            }
        }
        Check::Pass((quota, slot))
    }
}

/// Moves the slot into the body of a stream, so that it is given back when the stream ends.
fn hold_until_body_ends(response: Response, slot: Slot) -> Response {
    let is_stream = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if !is_stream {
        return response;
    }
    let (parts, body) = response.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        let _held = &slot;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}

/// The middleware: applies the limits to requests that carry a [`Principal`] (set by
/// [`super::auth::authenticate`] on `/v1/*`).
pub async fn enforce(State(limits): State<Arc<RateLimits>>, request: Request, next: Next) -> Response {
    let (Some(limiter), Some(principal)) =
        (&limits.limiter, request.extensions().get::<Principal>().cloned())
    else {
        return next.run(request).await;
    };
    // Read before awaiting: a request is not `Sync`, so no reference to it may cross an await.
    let turn = is_turn(&request);
    let stream = (turn && (wants_stream(&request) || is_client_turn(&request)))
        || is_follow(&request)
        || is_resume(&request);
    let id = request.headers().get("x-request-id").cloned();
    let (quota, slot) = match limits.check(limiter, &principal, turn, stream).await {
        Check::Pass(pass) => pass,
        Check::Refuse(response) => {
            let request_id = id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("");
            tracing::info!(request.id = request_id, auth.key_id = %principal.key_id, "rate limited");
            return response;
        }
    };
    let mut response = next.run(request).await;
    if let Some(quota) = quota {
        quota.write(response.headers_mut());
    }
    match slot {
        Some(slot) => hold_until_body_ends(response, slot),
        None => response,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, uri: &str, accept: Option<&str>) -> Request {
        let mut builder = axum::http::Request::builder().method(method).uri(uri);
        if let Some(accept) = accept {
            builder = builder.header(header::ACCEPT, accept);
        }
        builder.body(Body::empty()).unwrap()
    }

    #[test]
    fn turns_and_streams_are_recognised() {
        assert!(is_turn(&request(Method::POST, "/v1/sessions/s1/messages", None)));
        assert!(is_turn(&request(Method::POST, "/v1/sessions/s1/messages?stream=true", None)));
        assert!(!is_turn(&request(Method::GET, "/v1/sessions/s1/messages", None)));
        assert!(!is_turn(&request(Method::POST, "/v1/sessions", None)));
        assert!(!is_turn(&request(Method::POST, "/v1/sessions/s1/messages/x", None)));
        assert!(is_turn(&request(Method::POST, "/v1/ai-sdk/chat", None)));
        assert!(is_turn(&request(Method::POST, "/v1/ag-ui", None)));
        assert!(!is_turn(&request(Method::POST, "/v1/ai-sdk/chat/c/stop", None)));
        assert!(is_resume(&request(Method::GET, "/v1/ai-sdk/chat/c/stream", None)));
        assert!(!is_resume(&request(Method::POST, "/v1/ai-sdk/chat/c/stream", None)));
        assert!(is_follow(&request(Method::GET, "/v1/sessions/s1/turns/t/events", None)));
        assert!(!is_follow(&request(Method::GET, "/v1/sessions/s1/turns/t", None)));
        assert!(!is_follow(&request(Method::POST, "/v1/sessions/s1/turns/t/events", None)));
        assert!(!is_follow(&request(Method::GET, "/v1/sessions/s1/turns/t/events/x", None)));
        assert!(wants_stream(&request(Method::POST, "/v1/sessions/s/messages?a=1&stream=true", None)));
        assert!(wants_stream(&request(
            Method::POST,
            "/v1/sessions/s/messages",
            Some("application/json, text/event-stream")
        )));
        assert!(!wants_stream(&request(
            Method::POST,
            "/v1/sessions/s/messages?stream=false",
            Some("application/json")
        )));
    }

    #[test]
    fn quotas_report_whole_seconds_and_the_tighter_limit_wins() {
        let hit = WindowHit { count: 3, reset: Duration::from_millis(1200) };
        let q = Quota::of(hit, 10);
        assert_eq!(q, Quota { limit: 10, remaining: 7, reset_secs: 2 });
        assert!(!Quota::exceeded(hit, 3) && Quota::exceeded(hit, 2));
        let over = Quota::of(WindowHit { count: 12, reset: Duration::ZERO }, 10);
        assert_eq!((over.remaining, over.reset_secs), (0, 1));
        let turns = Quota { limit: 5, remaining: 1, reset_secs: 50 };
        assert_eq!(turns.tighter(Some(q)), turns);
        assert_eq!(q.tighter(Some(turns)), turns);
    }
}
