//! Middleware pieces: the bounds on a request's head (URI and header size, one `Authorization`),
//! the problem+json fallback for errors produced outside handlers (timeouts, body limits, unknown
//! routes, panics) and the request span.

use std::any::Any;

use axum::body::Body;
use axum::http::{Request, Response, StatusCode, Uri, header};
use axum::response::IntoResponse;
use tracing::Span;

use std::time::Duration;

use crate::error::{AppError, ErrorLog, PROBLEM_JSON, Problem, problem_response};

/// The longest request target (path and query) parley reads; a longer one answers 414. Below
/// hyper's own limit (64 KiB), past which hyper answers a bare 414 itself.
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// The most header fields parley reads; more answer 431. Below hyper's own limit
/// (`crate::server::HYPER_MAX_HEADERS`), past which hyper answers a bare 431 itself.
pub const MAX_HEADER_FIELDS: usize = 100;

/// The most bytes of header fields (names, values and their separators) parley reads; more answer
/// 431. Well below hyper's read buffer (about 400 KiB), past which hyper answers a bare 431 itself.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Refuses, as problem+json and before anything else reads them, a request whose head is over
/// parley's bounds (414, 431) or that carries more than one `Authorization` header (400: which
/// credential would count is ambiguous, and a proxy and parley might pick different ones).
pub async fn check_head(request: Request<Body>, next: axum::middleware::Next) -> Response<Body> {
    match head_problem(request.uri(), request.headers()) {
        Some(error) => error.into_response(),
        None => next.run(request).await,
    }
}

fn head_problem(uri: &Uri, headers: &axum::http::HeaderMap) -> Option<AppError> {
    let target = uri.path_and_query().map_or(uri.path().len(), |pq| pq.as_str().len());
    if target > MAX_URI_BYTES {
        return Some(AppError::UriTooLong(target));
    }
    if headers.len() > MAX_HEADER_FIELDS {
        return Some(AppError::HeadersTooLarge(format!(
            "the request has {} header fields; the limit is {MAX_HEADER_FIELDS}",
            headers.len()
        )));
    }
    // As on the wire: `name: value` and CRLF.
    let size: usize = headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum();
    if size > MAX_HEADER_BYTES {
        return Some(AppError::HeadersTooLarge(format!(
            "the request's header fields are {size} bytes; the limit is {MAX_HEADER_BYTES} bytes"
        )));
    }
    if headers.get_all(header::AUTHORIZATION).iter().nth(1).is_some() {
        return Some(AppError::BadRequest("the request has more than one Authorization header".to_owned()));
    }
    None
}

/// 404 for an unknown route, as problem+json.
pub async fn not_found(uri: Uri) -> AppError {
    AppError::RouteNotFound(uri.path().to_owned())
}

/// 405 for a known route with the wrong method, as problem+json.
pub async fn method_not_allowed() -> AppError {
    AppError::MethodNotAllowed
}

/// 500 for a panic in a handler, as problem+json; the panic text is logged, not sent.
pub fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response<Body> {
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    AppError::Internal(format!("handler panicked: {detail}")).into_response()
}

/// Rewrites an error response that is not problem+json (from a layer such as the timeout or the
/// body limit) into one, keeping its status and headers.
pub fn problem_fallback(response: Response<Body>) -> Response<Body> {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(PROBLEM_JSON));
    if is_problem {
        return response;
    }
    let (parts, _) = response.into_parts();
    let error = match status {
        StatusCode::PAYLOAD_TOO_LARGE => AppError::PayloadTooLarge(
            "the request body is larger than the limit (PARLEY_MAX_BODY_BYTES)".into(),
        ),
        StatusCode::REQUEST_TIMEOUT => AppError::RequestTimeout,
        StatusCode::NOT_FOUND => AppError::RouteNotFound(String::new()),
        StatusCode::METHOD_NOT_ALLOWED => AppError::MethodNotAllowed,
        _ => return generic(status, parts),
    };
    let mut rebuilt = problem_response(&error.problem());
    *rebuilt.status_mut() = status;
    keep_headers(&mut rebuilt, &parts);
    rebuilt
}

/// Copies the original response's headers (`Allow`, `Retry-After`, request id…), except the
/// body's own.
fn keep_headers(rebuilt: &mut Response<Body>, parts: &axum::http::response::Parts) {
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            rebuilt.headers_mut().insert(name, value.clone());
        }
    }
}

fn generic(status: StatusCode, parts: axum::http::response::Parts) -> Response<Body> {
    let code = if status.is_server_error() { "internal_error" } else { "invalid_request" };
    let problem = Problem {
        kind: format!("urn:parley:problem:{code}"),
        title: status.canonical_reason().unwrap_or("Error").to_owned(),
        status: status.as_u16(),
        detail: status.canonical_reason().unwrap_or("error").to_lowercase(),
        code: code.to_owned(),
        turn_id: None,
    };
    let mut rebuilt = problem_response(&problem);
    keep_headers(&mut rebuilt, &parts);
    rebuilt
}

/// Makes the `x-request-id` of a request that has none: a UUID v7 (time-ordered, like every id
/// parley makes), written straight into the header value.
#[derive(Debug, Clone, Copy, Default)]
pub struct MakeRequestUuidV7;

impl tower_http::request_id::MakeRequestId for MakeRequestUuidV7 {
    fn make_request_id<B>(&mut self, _request: &Request<B>) -> Option<tower_http::request_id::RequestId> {
        let mut buffer = uuid::Uuid::encode_buffer();
        let text = uuid::Uuid::now_v7().hyphenated().encode_lower(&mut buffer);
        axum::http::HeaderValue::from_str(text).ok().map(tower_http::request_id::RequestId::new)
    }
}

/// The request id of a request or response (`x-request-id`), or "".
pub fn request_id(headers: &axum::http::HeaderMap) -> &str {
    headers.get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// Logs a response as it leaves: its error line (see [`ErrorLog`]) with the request id, and at
/// `debug` (target `parley::http::access`) one line per request with its status and latency.
pub fn log_response<B>(response: &Response<B>, latency: Duration, _span: &Span) {
    let request_id = request_id(response.headers());
    if let Some(log) = response.extensions().get::<ErrorLog>() {
        log.emit(request_id);
    }
    let status = response.status().as_u16();
    let latency_ms = latency.as_secs_f64() * 1000.0;
    tracing::debug!(target: "parley::http::access", { request.id = request_id, http.status = status, latency_ms }, "request finished");
}

/// The span of one request, at `debug`: method, path and request id, then the tenant and key id
/// once authenticated (never the body or credentials). At `info` there is no per-request span
/// (it cost about 8 % of a turn): the lines logged for a request carry its id themselves.
pub fn make_span(request: &Request<Body>) -> Span {
    let request_id = request_id(request.headers());
    tracing::debug_span!(
        "request",
        http.method = %request.method(),
        http.path = %request.uri().path(),
        request.id = %request_id,
        tenant = tracing::field::Empty,
        auth.key_id = tracing::field::Empty,
    )
}

#[cfg(test)]
mod tests {
    use axum::http::{HeaderMap, HeaderValue};

    use super::*;

    fn code(uri: &str, headers: &HeaderMap) -> Option<&'static str> {
        head_problem(&uri.parse().unwrap(), headers).map(|e| e.code())
    }

    #[test]
    fn heads_within_the_bounds_pass_and_others_are_named() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer a"));
        assert_eq!(code("/v1/sessions?limit=5", &headers), None);
        let long = format!("/v1/sessions?cursor={}", "a".repeat(MAX_URI_BYTES));
        assert_eq!(code(&long, &headers), Some("uri_too_long"));
        headers.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer b"));
        assert_eq!(code("/", &headers), Some("invalid_request"));
        let mut many = HeaderMap::new();
        for i in 0..=MAX_HEADER_FIELDS {
            many.append(axum::http::HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(), 0.into());
        }
        assert_eq!(code("/", &many), Some("headers_too_large"));
        let mut big = HeaderMap::new();
        big.insert("x-big", HeaderValue::from_str(&"v".repeat(MAX_HEADER_BYTES)).unwrap());
        assert_eq!(code("/", &big), Some("headers_too_large"));
    }
}
