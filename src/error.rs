//! One error type for the HTTP API, rendered as RFC 9457 `application/problem+json`.
//!
//! Every error has a stable `code`; `type` is `urn:parley:problem:<code>`. Internal details are
//! logged where the error is turned into a response and never sent to the client.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tracing::Level;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::llm::ModelError;
use crate::store::StoreError;

/// The media type of problem responses.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Short alias used by handlers.
pub type Result<T, E = AppError> = std::result::Result<T, E>;

/// An RFC 9457 problem object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// `urn:parley:problem:<code>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the problem type.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What happened, for a person.
    pub detail: String,
    /// A stable machine-readable code.
    pub code: String,
    /// The turn concerned: the running one for `turn_in_progress`, the one whose outcome to read
    /// later for `turn_outcome_unknown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_id: Option<Uuid>,
}

/// Every error the API reports.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// 400: unparseable input (malformed JSON, an invalid session id, a bad cursor).
    #[error("{0}")]
    BadRequest(String),
    /// 422: well-formed input that breaks a rule (wrong types, missing or empty fields, ranges).
    #[error("{0}")]
    Validation(String),
    /// 413: a body or a field over its limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 414: a request target (path and query) over parley's limit.
    #[error("the request URI is {0} bytes; the limit is {max} bytes", max = crate::http::middleware::MAX_URI_BYTES)]
    UriTooLong(usize),
    /// 431: more header fields, or more bytes of them, than parley reads.
    #[error("{0}")]
    HeadersTooLarge(String),
    /// 404: no session with this id.
    #[error("session {0:?} not found")]
    SessionNotFound(String),
    /// 404: no turn with this id in the session.
    #[error("turn {0} not found")]
    TurnNotFound(Uuid),
    /// 404: no such route.
    #[error("no route for {0}")]
    RouteNotFound(String),
    /// 405: the route exists but not with this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 409: the session id is taken.
    #[error("session {0:?} already exists")]
    SessionExists(String),
    /// 409: another turn is running in this session.
    #[error("another turn is running in this session")]
    TurnInProgress(Uuid),
    /// 409: the turn has already ended.
    #[error("turn {0} has already ended")]
    TurnFinished(Uuid),
    /// 422: `replace_from` does not name a user message of the active history.
    #[error("{0}")]
    InvalidReplaceFrom(String),
    /// 409: only the last turn of a session can be regenerated.
    #[error("turn {0} is not the last turn of the session; only the last one can be regenerated")]
    TurnNotLast(Uuid),
    /// 413: a fork would copy more messages than `PARLEY_FORK_MAX_MESSAGES`.
    #[error("{0}")]
    ForkTooLarge(String),
    /// 422: an `Idempotency-Key` reused with a different request.
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyKeyReused,
    /// 502: the model endpoint failed. Clients see the upstream status only; the detail (an
    /// excerpt of the upstream's answer, redacted) is logged.
    #[error("the model failed: {detail}")]
    Upstream {
        /// The upstream's HTTP status, when it answered with an error status.
        status: Option<u16>,
        /// What went wrong, for the log.
        detail: String,
    },
    /// 504: the model endpoint timed out.
    #[error("the model timed out: {0}")]
    UpstreamTimeout(String),
    /// 503: the store cannot be reached.
    #[error("the conversation store is unavailable")]
    StoreUnavailable(String),
    /// 503: the service is shutting down.
    #[error("the service is shutting down")]
    ShuttingDown,
    /// 503: the turn lost its session lock (its lease ran out while this replica stalled, and
    /// another turn may have taken the session): nothing more of it was saved.
    #[error(
        "the turn lost its hold on the session (its lease ran out) and was stopped; nothing more of it was saved"
    )]
    TurnAbandoned,
    /// 503: the store did not say whether the turn's last write was applied; read the turn
    /// (`GET /v1/sessions/{id}/turns/{turn_id}`) later to learn how it ended.
    #[error(
        "the conversation store did not confirm whether turn {0} was saved; read the turn later to learn its outcome"
    )]
    TurnOutcomeUnknown(Uuid),
    /// 503: the service holds as many connections as `PARLEY_MAX_CONNECTIONS` allows; answered on
    /// the new connection before it is closed, with `Retry-After`.
    #[error("the service has as many open connections as it accepts (PARLEY_MAX_CONNECTIONS); retry later")]
    TooManyConnections,
    /// 408: the request took too long.
    #[error("the request took too long")]
    RequestTimeout,
    /// 500: a bug or an unexpected backend failure.
    #[error("internal error")]
    Internal(String),
    /// 401: no valid API key; answered with `WWW-Authenticate: Bearer realm="parley"`.
    #[error("{0}")]
    Unauthorized(String),
    /// 429: a rate limit of the key was reached; answered with `Retry-After`.
    #[error("{detail}")]
    RateLimited {
        /// Which limit, for a person.
        detail: String,
        /// Seconds until a retry may succeed.
        retry_after_secs: u64,
    },
    /// 409: the tenant holds as many sessions as `PARLEY_MAX_SESSIONS_PER_TENANT` allows.
    #[error(
        "this tenant already has {0} sessions, the most allowed (PARLEY_MAX_SESSIONS_PER_TENANT); delete some first"
    )]
    SessionLimitReached(u64),
}

impl AppError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::Validation(_) | AppError::IdempotencyKeyReused | AppError::InvalidReplaceFrom(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            AppError::PayloadTooLarge(_) | AppError::ForkTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            AppError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            AppError::SessionNotFound(_) | AppError::TurnNotFound(_) | AppError::RouteNotFound(_) => {
                StatusCode::NOT_FOUND
            }
            AppError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            AppError::SessionExists(_)
            | AppError::TurnInProgress(_)
            | AppError::TurnFinished(_)
            | AppError::TurnNotLast(_)
            | AppError::SessionLimitReached(_) => StatusCode::CONFLICT,
            AppError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            AppError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            AppError::StoreUnavailable(_)
            | AppError::ShuttingDown
            | AppError::TooManyConnections
            | AppError::TurnAbandoned
            | AppError::TurnOutcomeUnknown(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AppError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            AppError::BadRequest(_) => "invalid_request",
            AppError::Validation(_) => "validation_failed",
            AppError::PayloadTooLarge(_) => "payload_too_large",
            AppError::UriTooLong(_) => "uri_too_long",
            AppError::HeadersTooLarge(_) => "headers_too_large",
            AppError::SessionNotFound(_) => "session_not_found",
            AppError::TurnNotFound(_) => "turn_not_found",
            AppError::RouteNotFound(_) => "not_found",
            AppError::MethodNotAllowed => "method_not_allowed",
            AppError::SessionExists(_) => "session_exists",
            AppError::TurnInProgress(_) => "turn_in_progress",
            AppError::TurnFinished(_) => "turn_finished",
            AppError::IdempotencyKeyReused => "idempotency_key_reused",
            AppError::InvalidReplaceFrom(_) => "invalid_replace_from",
            AppError::TurnNotLast(_) => "turn_not_last",
            AppError::ForkTooLarge(_) => "fork_too_large",
            AppError::Upstream { .. } => "upstream_error",
            AppError::UpstreamTimeout(_) => "upstream_timeout",
            AppError::StoreUnavailable(_) => "store_unavailable",
            AppError::ShuttingDown => "shutting_down",
            AppError::TooManyConnections => "too_many_connections",
            AppError::TurnAbandoned => "turn_abandoned",
            AppError::TurnOutcomeUnknown(_) => "turn_outcome_unknown",
            AppError::RequestTimeout => "request_timeout",
            AppError::Internal(_) => "internal_error",
            AppError::Unauthorized(_) => "unauthorized",
            AppError::RateLimited { .. } => "rate_limited",
            AppError::SessionLimitReached(_) => "session_limit_reached",
        }
    }

    /// The text shown to clients: never internal details of stores or upstreams (an upstream's
    /// error body may name its infrastructure, quote the request or echo a credential).
    fn public_detail(&self) -> String {
        match self {
            AppError::StoreUnavailable(_) => "the conversation store is unavailable; retry later".to_owned(),
            AppError::Upstream { status: Some(status), .. } => {
                format!("the model endpoint answered with HTTP status {status}")
            }
            AppError::Upstream { status: None, .. } => "the model endpoint failed".to_owned(),
            AppError::Internal(_) => "an internal error occurred".to_owned(),
            other => other.to_string(),
        }
    }

    /// The problem object for this error.
    pub fn problem(&self) -> Problem {
        let status = self.status();
        Problem {
            kind: format!("urn:parley:problem:{}", self.code()),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: self.public_detail(),
            code: self.code().to_owned(),
            turn_id: match self {
                AppError::TurnInProgress(id)
                | AppError::TurnFinished(id)
                | AppError::TurnOutcomeUnknown(id) => Some(*id),
                _ => None,
            },
        }
    }

    /// What the response should log once it leaves (see [`ErrorLog`]).
    fn log_entry(&self) -> ErrorLog {
        let (level, message, detail) = match self {
            AppError::Internal(detail) => (Level::ERROR, "request failed", Some(detail.clone())),
            AppError::StoreUnavailable(detail) => (Level::WARN, "store unavailable", Some(detail.clone())),
            AppError::Upstream { .. } | AppError::UpstreamTimeout(_) => {
                (Level::WARN, "model failed", Some(self.to_string()))
            }
            _ => (Level::DEBUG, "request rejected", None),
        };
        ErrorLog { level, message, code: self.code(), detail }
    }
}

/// The log line of an error response. [`AppError`] attaches it to its response, and the request
/// layer logs it as the response leaves, with the request id (see
/// `crate::http::middleware::log_response`), so that no per-request span is needed at `info`.
#[derive(Debug, Clone)]
pub struct ErrorLog {
    level: Level,
    message: &'static str,
    code: &'static str,
    detail: Option<String>,
}

impl ErrorLog {
    /// Logs the error for the request with this id.
    pub fn emit(&self, request_id: &str) {
        let (code, detail, message) = (self.code, self.detail.as_deref().unwrap_or(""), self.message);
        match self.level {
            Level::ERROR => tracing::error!(
                request.id = request_id,
                error.code = code,
                error.detail = detail,
                "{message}"
            ),
            Level::WARN => {
                tracing::warn!(request.id = request_id, error.code = code, error.detail = detail, "{message}")
            }
            _ => tracing::debug!(request.id = request_id, error.code = code, "{message}"),
        }
    }
}

/// Builds a problem+json response from a problem object.
pub fn problem_response(problem: &Problem) -> Response {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(problem).unwrap_or_default();
    let mut response = (status, body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    response
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let log = self.log_entry();
        let mut response = problem_response(&self.problem());
        response.extensions_mut().insert(log);
        let headers = response.headers_mut();
        match self {
            AppError::StoreUnavailable(_)
            | AppError::ShuttingDown
            | AppError::TooManyConnections
            | AppError::TurnOutcomeUnknown(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            AppError::Unauthorized(_) => {
                headers
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(r#"Bearer realm="parley""#));
            }
            AppError::RateLimited { retry_after_secs, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs.max(1)));
            }
            AppError::TurnInProgress(_) => {
                // Generated SDKs retry 409s by default; this one only clears when the turn ends.
                headers.insert("x-should-retry", HeaderValue::from_static("false"));
            }
            _ => {}
        }
        response
    }
}

impl AppError {
    /// Maps a store error, naming the session for not-found errors.
    pub fn from_store(err: StoreError, session_id: &str) -> Self {
        match err {
            StoreError::SessionNotFound => AppError::SessionNotFound(session_id.to_owned()),
            StoreError::SessionExists => AppError::SessionExists(session_id.to_owned()),
            other => other.into(),
        }
    }
}

impl From<StoreError> for AppError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::SessionNotFound => AppError::SessionNotFound(String::new()),
            StoreError::SessionExists => AppError::SessionExists(String::new()),
            StoreError::SessionLimitReached(max) => AppError::SessionLimitReached(max),
            StoreError::InvalidCursor => AppError::BadRequest("invalid cursor".to_owned()),
            StoreError::Unavailable(detail) | StoreError::Unanswered(detail) => {
                AppError::StoreUnavailable(detail)
            }
            StoreError::Fenced => AppError::TurnAbandoned,
            StoreError::Backend(detail) => AppError::Internal(detail),
        }
    }
}

impl From<ModelError> for AppError {
    fn from(err: ModelError) -> Self {
        match err {
            ModelError::Timeout(_) => AppError::UpstreamTimeout(err.to_string()),
            ModelError::Status { status, .. } => {
                AppError::Upstream { status: Some(status), detail: err.to_string() }
            }
            other => AppError::Upstream { status: None, detail: other.to_string() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_outages_do_not_leak_their_detail() {
        let err = AppError::StoreUnavailable("redis://user:secret@host refused".into());
        let p = err.problem();
        assert_eq!(p.status, 503);
        assert_eq!(p.code, "store_unavailable");
        assert!(!p.detail.contains("secret"));
    }

    #[test]
    fn auth_and_rate_limit_errors_carry_their_headers() {
        let response = AppError::Unauthorized("invalid API key".into()).into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], r#"Bearer realm="parley""#);
        let limited = AppError::RateLimited { detail: "slow down".into(), retry_after_secs: 3 };
        assert_eq!(limited.code(), "rate_limited");
        let response = limited.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
        assert_eq!(AppError::SessionLimitReached(5).status(), StatusCode::CONFLICT);
    }

    #[test]
    fn model_timeouts_are_504_and_failures_502() {
        assert_eq!(AppError::from(ModelError::Timeout("x".into())).status(), StatusCode::GATEWAY_TIMEOUT);
        let e = AppError::from(ModelError::Status { status: 500, message: "boom".into() });
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(e.code(), "upstream_error");
    }

    #[test]
    fn upstream_failures_show_their_status_but_never_their_text() {
        let body = "internal: shard db-7 at 10.0.0.3 rejected key sk-live-1234567890";
        let e = AppError::from(ModelError::Status { status: 401, message: body.into() });
        let p = e.problem();
        assert_eq!((p.status, p.code.as_str()), (502, "upstream_error"));
        assert!(p.detail.contains("401") && !p.detail.contains("shard"), "{}", p.detail);
        assert!(e.log_entry().detail.is_some_and(|d| d.contains("shard")), "the log keeps it");
        for other in [ModelError::Protocol(body.into()), ModelError::Connect(body.into())] {
            let p = AppError::from(other).problem();
            assert!(!p.detail.contains("shard"), "{}", p.detail);
        }
    }
}
