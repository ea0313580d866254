//! What the HTTP layer tells an operator: the request counters and durations by route template,
//! the open streams, one log line per request, and the `/metrics` scrape.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;

use super::auth::Auth;
use super::extract::Tenant;
use crate::error::AppError;
use crate::metrics::DynMetrics;

/// The route template that answered a request (never its raw path, which holds ids).
#[derive(Debug, Clone)]
struct RouteTemplate(String);

/// The turn a request started or named, for the access log line.
#[derive(Debug, Clone, Copy)]
pub struct TurnRef(pub uuid::Uuid);

/// Tags a routed request's response with its route template and tenant, for [`observe`], and,
/// when the access log is on, with the turn id its path names.
pub async fn tag_route(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let tenant = request.extensions().get::<Tenant>().cloned();
    let (mut parts, body) = request.into_parts();
    let named = if route.as_deref().is_some_and(|r| r.contains("{turn_id}")) && access_log_enabled() {
        RawPathParams::from_request_parts(&mut parts, &()).await.ok().and_then(|params| {
            params.iter().find(|(name, _)| *name == "turn_id").and_then(|(_, v)| v.parse().ok())
        })
    } else {
        None
    };
    let mut response = next.run(Request::from_parts(parts, body)).await;
    if let Some(turn) = named
        && response.extensions().get::<TurnRef>().is_none()
    {
        response.extensions_mut().insert(TurnRef(turn));
    }
    if let Some(route) = route {
        response.extensions_mut().insert(RouteTemplate(route));
    }
    if let Some(tenant) = tenant {
        response.extensions_mut().insert(tenant);
    }
    response
}

/// Whether the one line per request is logged (`parley::http::access` at `info`).
pub fn access_log_enabled() -> bool {
    tracing::enabled!(target: "parley::http::access", tracing::Level::INFO)
}

/// Counts and logs each request as its answer leaves. With metrics: `parley_http_requests_total`
/// by route template, method and status; `parley_http_request_duration_seconds` for answers that
/// are not streams; a streamed answer counts in `parley_open_streams` until its body is dropped.
/// With the access log on, one line per request at `info`: request id, route, status, duration,
/// tenant and turn id (never a body). The router installs this layer only when one of the two is on.
pub async fn observe(State(metrics): State<Option<DynMetrics>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let log = access_log_enabled();
    // Set on the request by the request-id layer; copied to the response only further out.
    let request_id = log.then(|| super::middleware::request_id(request.headers()).to_owned());
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    let route = match response.extensions().get::<RouteTemplate>() {
        Some(RouteTemplate(route)) => route.as_str(),
        None if response.status() == axum::http::StatusCode::NOT_FOUND => "unmatched",
        None => "other",
    };
    let tenant =
        response.extensions().get::<Tenant>().map_or(crate::domain::DEFAULT_TENANT, |t| t.0.as_str());
    let status = response.status().as_u16();
    let streaming = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if let Some(metrics) = &metrics {
        metrics.http_request(route, method.as_str(), status, tenant, (!streaming).then_some(elapsed));
    }
    if let Some(request_id) = request_id {
        let turn_id = response.extensions().get::<TurnRef>().map(|t| tracing::field::display(t.0));
        let duration_ms = elapsed.as_secs_f64() * 1000.0;
        tracing::info!(
            target: "parley::http::access",
            { request.id = %request_id, http.method = %method, http.route = %route, http.status = status, duration_ms, tenant = %tenant, turn_id, streaming },
            "request"
        );
    }
    let Some(metrics) = metrics.filter(|_| streaming) else {
        return response;
    };
    let (parts, body) = response.into_parts();
    let open = metrics.open_stream();
    let body = body.into_data_stream().map(move |chunk| {
        let _open = &open;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}

/// The span of one request, for traces (installed only when they are on): `{method} {route}`,
/// with the route template, the method and the status; it continues the trace of an incoming
/// W3C `traceparent`. A 5xx marks it as an error.
pub async fn trace_request(request: Request, next: Next) -> Response {
    use tracing::field::Empty;
    let method = request.method().clone();
    let span = tracing::info_span!(target: crate::telemetry::TARGET, "request",
        otel.kind = "server", otel.status_code = Empty,
        http.request.method = %method, http.route = Empty, http.response.status_code = Empty,
    );
    crate::telemetry::continue_trace(&span, request.headers());
    let response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    let route = match response.extensions().get::<RouteTemplate>() {
        Some(RouteTemplate(route)) => route.as_str(),
        None if response.status() == axum::http::StatusCode::NOT_FOUND => "unmatched",
        None => "other",
    };
    let status = response.status();
    crate::telemetry::rename(&span, format!("{method} {route}"));
    span.record("http.route", route);
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    response
}

/// `GET /metrics`: the scrape, in the Prometheus text format; with `auth`, a request needs an
/// API key like any `/v1` route.
pub fn metrics_router(metrics: DynMetrics, auth: Option<Arc<Auth>>) -> Router {
    Router::new().route("/metrics", get(scrape)).with_state((metrics, auth))
}

async fn scrape(
    State((metrics, auth)): State<(DynMetrics, Option<Arc<Auth>>)>,
    request: Request,
) -> Response {
    if let Some(auth) = auth.filter(|a| a.is_on())
        && let Err(failure) = auth.principal(&request)
    {
        return AppError::Unauthorized(failure.to_string()).into_response();
    }
    let mut response = metrics.render().into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(crate::metrics::Metrics::CONTENT_TYPE));
    response
}
