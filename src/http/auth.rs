//! Authentication of `/v1/*`: the bearer key, the caller's tenant, the 401 answer, and the
//! bearer scheme in the OpenAPI document.
//!
//! With `PARLEY_AUTH=api_key`, every `/v1/*` request needs `Authorization: Bearer <key>`; a
//! missing, malformed, unknown or revoked key answers 401 problem+json with
//! `WWW-Authenticate: Bearer realm="parley"`. `/healthz`, `/readyz`, `/openapi.json` and `/docs`
//! stay public. With `PARLEY_AUTH=none`, every request acts for the `default` tenant and is rate
//! limited per client address.
//!
//! The middleware puts a [`Principal`] and a [`Tenant`] in the request's extensions and records
//! `tenant` and `auth.key_id` on the request span. The key itself is never logged.
//!
//! A request with more than one `Authorization` header never reaches it: `check_head` (in
//! [`super::middleware`]) answers 400 first, whether authentication is on or off.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ComponentsBuilder, ContentBuilder, OpenApi, Ref, ResponseBuilder};

use super::extract::Tenant;
use crate::auth::keyring::KeyRing;
use crate::auth::{AuthFailure, Principal};
use crate::config::{AuthMode, Config};
use crate::domain::DEFAULT_TENANT;
use crate::error::{AppError, PROBLEM_JSON};

/// How requests are authenticated.
#[derive(Debug, Clone)]
pub struct Auth {
    /// The accepted keys; `None` when authentication is off.
    keys: Option<Arc<KeyRing>>,
}

impl Auth {
    /// Authentication off: every request acts for the default tenant.
    pub fn off() -> Self {
        Auth { keys: None }
    }

    /// Whether requests need a key.
    pub fn is_on(&self) -> bool {
        self.keys.is_some()
    }

    /// API keys from this ring.
    pub fn api_keys(keys: Arc<KeyRing>) -> Self {
        Auth { keys: Some(keys) }
    }

    /// The configured authentication: loads the keys (and starts re-reading the keys file) for
    /// `api_key`; warns when it is off on an address other than loopback.
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let auth = &config.auth;
        match auth.mode.unwrap_or(AuthMode::None) {
            AuthMode::None => {
                if !config.addr.ip().is_loopback() {
                    tracing::warn!(addr = %config.addr, "PARLEY_AUTH=none on an address other than loopback: \
                        every caller can read every session of the default tenant");
                }
                Ok(Auth::off())
            }
            AuthMode::ApiKey => {
                let ring = KeyRing::load(auth.api_keys_file.as_deref(), auth.api_keys.as_ref())
                    .map_err(anyhow::Error::msg)?;
                let ring = Arc::new(ring);
                ring.spawn_reloader(auth.api_keys_reload);
                tracing::info!(keys.active = ring.active_keys(), "API key authentication on");
                Ok(Auth::api_keys(ring))
            }
        }
    }

    /// The caller of a request, or why it has none.
    pub fn principal(&self, request: &Request) -> Result<Principal, AuthFailure> {
        match &self.keys {
            Some(keys) => keys.verify(bearer_token(request.headers())?),
            None => Ok(anonymous(request)),
        }
    }
}

/// Only the API needs a key; health, the spec and the docs stay public.
fn is_protected(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/")
}

/// The token of `Authorization: Bearer <token>` (the scheme in any case).
fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthFailure> {
    let value = headers.get(header::AUTHORIZATION).ok_or(AuthFailure::Missing)?;
    let text = value.to_str().map_err(|_| AuthFailure::Malformed)?;
    let (scheme, token) = text.split_once(' ').ok_or(AuthFailure::Malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthFailure::Malformed);
    }
    Ok(token)
}

/// With authentication off: the default tenant, limited per client address.
fn anonymous(request: &Request) -> Principal {
    let key_id = match request.extensions().get::<ConnectInfo<SocketAddr>>() {
        Some(ConnectInfo(addr)) => format!("ip:{}", addr.ip()),
        None => DEFAULT_TENANT.to_owned(),
    };
    Principal { key_id, tenant: DEFAULT_TENANT.to_owned() }
}

/// The middleware: authenticates `/v1/*`, hands the tenant to the handlers, or answers 401.
pub async fn authenticate(State(auth): State<Arc<Auth>>, mut request: Request, next: Next) -> Response {
    if !is_protected(request.uri().path()) {
        return next.run(request).await;
    }
    let principal = match auth.principal(&request) {
        Ok(principal) => principal,
        Err(failure) => {
            let request_id = super::middleware::request_id(request.headers());
            tracing::info!(request.id = request_id, auth.failure = ?failure, "request not authenticated");
            return AppError::Unauthorized(failure.to_string()).into_response();
        }
    };
    let span = tracing::Span::current();
    span.record("tenant", principal.tenant.as_str());
    span.record("auth.key_id", principal.key_id.as_str());
    request.extensions_mut().insert(Tenant(principal.tenant.clone()));
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// The name of the bearer scheme in the OpenAPI document.
const SCHEME: &str = "api_key";

/// Adds the bearer scheme to the document, and to every `/v1` operation the scheme and its 401
/// and 429 answers.
pub fn document(spec: &mut OpenApi) {
    let scheme = HttpBuilder::new()
        .scheme(HttpAuthScheme::Bearer)
        .bearer_format("pk_<id>_<secret>")
        .description(Some("An API key, required when the service runs with PARLEY_AUTH=api_key."))
        .build();
    let components = spec.components.get_or_insert_with(|| ComponentsBuilder::new().build());
    components.add_security_scheme(SCHEME, SecurityScheme::Http(scheme));
    for (path, item) in spec.paths.paths.iter_mut() {
        if !is_protected(path) {
            continue;
        }
        for operation in [&mut item.get, &mut item.post, &mut item.put, &mut item.delete, &mut item.patch] {
            if let Some(operation) = operation.as_mut() {
                secure(operation);
            }
        }
    }
}

fn secure(operation: &mut Operation) {
    operation.security = Some(vec![SecurityRequirement::new(SCHEME, Vec::<String>::new())]);
    let problem = |description: &str| {
        let content = ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem"))).build();
        ResponseBuilder::new().description(description).content(PROBLEM_JSON, content).build()
    };
    let responses = &mut operation.responses.responses;
    responses.insert("401".to_owned(), problem("Missing, malformed, unknown or revoked API key").into());
    responses
        .insert("429".to_owned(), problem("A rate limit of the key was reached; see Retry-After").into());
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn bearer_tokens_are_read_from_the_header() {
        assert_eq!(bearer_token(&headers("Bearer pk_a_b")), Ok("pk_a_b"));
        assert_eq!(bearer_token(&headers("bearer   pk_a_b ")), Ok("pk_a_b"));
        assert_eq!(bearer_token(&HeaderMap::new()), Err(AuthFailure::Missing));
        for bad in ["Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "pk_a_b", "Token pk_a_b"] {
            assert_eq!(bearer_token(&headers(bad)), Err(AuthFailure::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn only_the_api_is_protected() {
        assert!(is_protected("/v1/sessions"));
        assert!(is_protected("/v1/anything"));
        for public in ["/healthz", "/readyz", "/openapi.json", "/docs", "/docs/", "/v10", "/v1x"] {
            assert!(!is_protected(public), "{public}");
        }
    }
}
