//! What the HTTP layer tells an operator: the request counters and durations by route template,
//! the open streams, one log line per request, and the `/metrics` scrape.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
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

/// Tags a routed request's response with its route template and tenant, for [`observe`].
pub async fn tag_route(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let tenant = request.extensions().get::<Tenant>().cloned();
    let mut response = next.run(request).await;
    if let Some(route) = route {
        response.extensions_mut().insert(RouteTemplate(route));
    }
    if let Some(tenant) = tenant {
        response.extensions_mut().insert(tenant);
    }
    response
}

/// Counts and logs each request as its answer leaves: `parley_http_requests_total` by route
/// template, method and status; `parley_http_request_duration_seconds` for answers that are not
/// streams; a streamed answer counts in `parley_open_streams` until its body is dropped. One
/// line per request at `info`: request id, route, status, duration, tenant (never a body).
pub async fn observe(State(metrics): State<DynMetrics>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_owned();
    // Set on the request by the request-id layer; copied to the response only further out.
    let request_id = super::middleware::request_id(request.headers()).to_owned();
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    let route = match response.extensions().get::<RouteTemplate>() {
        Some(RouteTemplate(route)) => route.as_str(),
        None if response.status() == axum::http::StatusCode::NOT_FOUND => "unmatched",
        None => "other",
    }
    .to_owned();
    let tenant = response
        .extensions()
        .get::<Tenant>()
        .map_or(crate::domain::DEFAULT_TENANT, |t| t.0.as_str())
        .to_owned();
    let status = response.status().as_u16();
    let streaming = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    metrics.http_request(&route, &method, status, &tenant, (!streaming).then_some(elapsed));
    let request_id = request_id.as_str();
    let duration_ms = elapsed.as_secs_f64() * 1000.0;
    tracing::info!(
        target: "parley::http::access",
        { request.id = request_id, http.method = %method, http.route = %route, http.status = status, duration_ms, tenant = %tenant, streaming },
        "request"
    );
    if !streaming {
        return response;
    }
    let (parts, body) = response.into_parts();
    let open = metrics.open_stream();
    let body = body.into_data_stream().map(move |chunk| {
        let _open = &open;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
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
