//! Extractors that reject bad input in the service's own problem+json shape.

use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::domain::{DEFAULT_TENANT, is_valid_session_id};
use crate::error::AppError;

/// A JSON body; malformed JSON is 400, JSON of the wrong shape 422, a body over the limit 413.
/// The content type is not checked, so `curl -d` works as is.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

/// Parses a JSON body (see [`ApiJson`]). Every body of this API is an object: an array is 422
/// even where serde would read it as the struct's fields in order.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AppError> {
    if bytes.iter().find(|b| !is_json_whitespace(b)) == Some(&b'[')
        && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
    {
        return Err(AppError::Validation(
            "invalid request body: expected a JSON object, not an array".to_owned(),
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => AppError::Validation(format!("invalid request body: {e}")),
        _ => AppError::BadRequest(format!("malformed JSON body: {e}")),
    })
}

/// JSON's own whitespace (RFC 8259 §2). Not `u8::is_ascii_whitespace`, which also takes form
/// feed: a body of one form feed is malformed JSON, not an empty body.
fn is_json_whitespace(b: &u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn body_error(rejection: BytesRejection) -> AppError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        AppError::PayloadTooLarge(
            "the request body is larger than the limit (PARLEY_MAX_BODY_BYTES)".to_owned(),
        )
    } else {
        AppError::BadRequest(format!("could not read the request body: {rejection}"))
    }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(body_error)?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// An optional JSON body: an empty body gives `T::default()`.
#[derive(Debug, Clone)]
pub struct OptionalJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJson<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(body_error)?;
        if bytes.iter().all(is_json_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        parse_json::<Option<T>>(&bytes).map(|body| OptionalJson(body.unwrap_or_default()))
    }
}

/// Query parameters; values of the wrong type are 422.
#[derive(Debug, Clone)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| ApiQuery(q))
            .map_err(|e: QueryRejection| AppError::Validation(format!("invalid query: {}", e.body_text())))
    }
}

/// The session id in a path, as documented in the OpenAPI spec.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct SessionIdParam {
    /// Session id.
    #[param(pattern = r"^(?!\.\.?$)[A-Za-z0-9._:-]{1,128}$", min_length = 1, max_length = 128)]
    pub id: String,
}

/// A session id and a turn id in a path, as documented in the OpenAPI spec.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct TurnIdParams {
    /// Session id.
    #[param(pattern = r"^(?!\.\.?$)[A-Za-z0-9._:-]{1,128}$", min_length = 1, max_length = 128)]
    pub id: String,
    /// Turn id (a UUID).
    pub turn_id: uuid::Uuid,
}

/// Checks a session id from a path: `[A-Za-z0-9._:-]{1,128}`, not `.` or `..`, else 400.
pub fn session_id(id: String) -> Result<String, AppError> {
    if is_valid_session_id(&id) {
        Ok(id)
    } else {
        Err(AppError::BadRequest(
            "invalid session id: use 1 to 128 characters from A-Z a-z 0-9 . _ : - (not `.` or `..`)"
                .to_owned(),
        ))
    }
}

/// The caller's tenant, set by the authentication layer; the default tenant when auth is off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(parts.extensions.get::<Tenant>().cloned().unwrap_or_else(|| Tenant(DEFAULT_TENANT.to_owned())))
    }
}

/// Checks a page size: 1 to 100, default 20.
pub fn page_limit(limit: Option<i64>) -> Result<usize, AppError> {
    match limit {
        None => Ok(20),
        Some(n @ 1..=100) => Ok(n as usize),
        Some(n) => Err(AppError::Validation(format!("limit must be between 1 and 100, got {n}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_are_classified() {
        #[derive(serde::Deserialize, Debug)]
        struct B {
            #[expect(dead_code, reason = "only parsed")]
            content: String,
        }
        assert!(matches!(parse_json::<B>(b"{"), Err(AppError::BadRequest(_))));
        assert!(matches!(parse_json::<B>(b"{\"content\": 1}"), Err(AppError::Validation(_))));
        assert!(matches!(parse_json::<B>(b"{}"), Err(AppError::Validation(_))));
        assert!(parse_json::<B>(b"{\"content\": \"x\"}").is_ok());
        // serde reads a struct from an array of its fields in order; the API takes objects only.
        assert!(matches!(parse_json::<B>(b" [\"x\"]"), Err(AppError::Validation(_))));
        assert!(matches!(parse_json::<B>(b"[\"x\""), Err(AppError::BadRequest(_))));
    }

    #[test]
    fn limits_are_checked() {
        assert_eq!(page_limit(None).unwrap(), 20);
        assert_eq!(page_limit(Some(100)).unwrap(), 100);
        assert!(page_limit(Some(0)).is_err());
        assert!(page_limit(Some(101)).is_err());
    }
}
