//! The `openai` provider: any OpenAI-compatible `/chat/completions` endpoint, streamed.
//!
//! One call POSTs `{base}/chat/completions` with `stream: true` and reads the SSE reply as it comes
//! (module `stream`). Failures before the first chunk are retried when safe (module `retry`); after
//! it, never.
//! `request_timeout` bounds the wait for the response, for its first chunk and between two chunks,
//! not the length of a long reply. The API key is never logged and never part of an error.

mod request;
mod retry;
mod stream;

use std::fmt;
use std::sync::{Arc, Once};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde_json::Value;

use self::retry::Failure;
use super::{ChatModel, ChatRequest, ModelError, ModelStream};
use crate::config::{MaxTokensParam, ModelConfig};
use crate::redact::{REDACTED, redact_secrets, redact_url};
use crate::tools::truncate;

/// The first backoff of [`OpenAiSettings::new`] and of the settings built from the configuration.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(500);

/// The most bytes of an error response read to explain it.
const MAX_ERROR_BODY: usize = 8 * 1024;

/// The longest upstream message kept in an error.
const MAX_MESSAGE: usize = 300;

/// The field that carries the token limit to `host`: OpenAI's own API (and Azure OpenAI's) reads
/// `max_completion_tokens` and refuses `max_tokens` for its reasoning models; the compatible
/// servers (vLLM, Ollama, llama.cpp server…) all read `max_tokens`, and not all of them know the
/// newer name.
fn max_tokens_param_for(param: MaxTokensParam, host: Option<&str>) -> MaxTokensParam {
    if param != MaxTokensParam::Auto {
        return param;
    }
    let host = host.unwrap_or_default().to_ascii_lowercase();
    if host == "api.openai.com" || host.ends_with(".openai.azure.com") {
        MaxTokensParam::MaxCompletionTokens
    } else {
        MaxTokensParam::MaxTokens
    }
}

/// Installs rustls' `ring` crypto provider for the process, once; reqwest panics without one.
/// Anything that builds a reqwest client (the provider, HTTP tools, tests) calls it first.
pub fn install_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Settings of the OpenAI-compatible provider.
#[derive(Clone, PartialEq)]
pub struct OpenAiSettings {
    /// Base URL of the API, up to and including the version (`https://api.openai.com/v1`).
    pub base_url: String,
    /// API key, sent as `Authorization: Bearer` when set. Never logged.
    pub api_key: Option<String>,
    /// Model name sent upstream.
    pub model: String,
    /// Sampling temperature; the upstream default when unset.
    pub temperature: Option<f32>,
    /// Most tokens per reply; the upstream default when unset.
    pub max_tokens: Option<u32>,
    /// The request field that carries `max_tokens`; `Auto` is settled by the host when the model
    /// is built.
    pub max_tokens_param: MaxTokensParam,
    /// Timeout to connect.
    pub connect_timeout: Duration,
    /// Timeout until the response and its first chunk, and between two chunks.
    pub request_timeout: Duration,
    /// Retries of a call that failed before its first chunk.
    pub max_retries: u32,
    /// The wait before the first retry; doubled for each further one, with jitter.
    pub retry_backoff: Duration,
}

impl OpenAiSettings {
    /// Settings for `model` at `base_url`: no key, upstream sampling defaults, 5 s to connect,
    /// 60 s for the first chunk and between chunks, 2 retries.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        OpenAiSettings {
            base_url: base_url.into(),
            api_key: None,
            model: model.into(),
            temperature: None,
            max_tokens: None,
            max_tokens_param: MaxTokensParam::Auto,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
            max_retries: 2,
            retry_backoff: DEFAULT_RETRY_BACKOFF,
        }
    }
}

impl fmt::Debug for OpenAiSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiSettings")
            .field("base_url", &redact_url(&self.base_url))
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("model", &self.model)
            .field("temperature", &self.temperature)
            .field("max_tokens", &self.max_tokens)
            .field("max_tokens_param", &self.max_tokens_param)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("max_retries", &self.max_retries)
            .field("retry_backoff", &self.retry_backoff)
            .finish()
    }
}

impl From<&ModelConfig> for OpenAiSettings {
    fn from(c: &ModelConfig) -> Self {
        OpenAiSettings {
            base_url: c.openai_base_url.clone(),
            api_key: c.openai_api_key.clone().filter(|k| !k.trim().is_empty()),
            model: c.name.clone(),
            temperature: c.temperature,
            max_tokens: c.max_tokens,
            max_tokens_param: c.max_tokens_param,
            connect_timeout: c.connect_timeout,
            request_timeout: c.request_timeout,
            max_retries: c.max_retries,
            retry_backoff: DEFAULT_RETRY_BACKOFF,
        }
    }
}

/// A chat model behind an OpenAI-compatible endpoint.
#[derive(Clone)]
pub struct OpenAiModel {
    settings: OpenAiSettings,
    client: reqwest::Client,
    url: reqwest::Url,
    authorization: Option<HeaderValue>,
}

impl fmt::Debug for OpenAiModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiModel")
            .field("url", &redact_url(self.url.as_str()))
            .field("settings", &self.settings)
            .finish()
    }
}

impl OpenAiModel {
    /// A model with these settings; an error for an unusable base URL or API key.
    pub fn new(mut settings: OpenAiSettings) -> Result<Self, ModelError> {
        install_crypto_provider();
        let url = completions_url(&settings.base_url)?;
        settings.max_tokens_param = max_tokens_param_for(settings.max_tokens_param, url.host_str());
        let authorization = settings.api_key.as_deref().map(bearer).transpose()?;
        let client = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .user_agent(concat!("parley/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ModelError::Connect(format!("cannot build the HTTP client: {}", error_chain(e))))?;
        Ok(OpenAiModel { settings, client, url, authorization })
    }

    /// The settings in use.
    pub fn settings(&self) -> &OpenAiSettings {
        &self.settings
    }

    /// One attempt: the request, its status, and its first SSE event.
    async fn attempt(&self, body: Bytes) -> Result<ModelStream, Failure> {
        let response = self.send(body).await?;
        let response = check_status(response, self.settings.request_timeout).await?;
        let mut events = stream::sse_events(response.bytes_stream(), self.settings.request_timeout);
        match events.next().await {
            Some(Ok(first)) => {
                Ok(stream::model_stream(futures::stream::once(async { Ok(first) }).chain(events).boxed()))
            }
            Some(Err(e @ (ModelError::Timeout(_) | ModelError::Connect(_)))) => Err(Failure::transient(e)),
            Some(Err(e)) => Err(Failure::permanent(e)),
            None => {
                Err(Failure::permanent(ModelError::Protocol("the reply ended before any data".to_owned())))
            }
        }
    }

    /// Sends the request and waits for the response head, within `request_timeout`.
    async fn send(&self, body: Bytes) -> Result<reqwest::Response, Failure> {
        let mut request = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "text/event-stream")
            .body(body);
        if let Some(auth) = &self.authorization {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        if let Some(traceparent) = crate::telemetry::traceparent() {
            request = request.header(crate::telemetry::TRACEPARENT, traceparent);
        }
        let timeout = self.settings.request_timeout;
        match tokio::time::timeout(timeout, request.send()).await {
            Err(_) => Err(Failure::transient(ModelError::Timeout(format!(
                "no response within {}",
                humantime::format_duration(timeout)
            )))),
            Ok(Err(e)) if e.is_timeout() => Err(Failure::transient(ModelError::Timeout(error_chain(e)))),
            Ok(Err(e)) => Err(Failure::transient(ModelError::Connect(error_chain(e)))),
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// Removes the API key from an error's text, should an upstream ever echo it.
    fn scrub(&self, error: ModelError) -> ModelError {
        scrub(error, self.settings.api_key.as_deref())
    }
}

#[async_trait]
impl ChatModel for OpenAiModel {
    fn name(&self) -> &str {
        &self.settings.model
    }

    async fn stream(&self, request: &ChatRequest) -> Result<ModelStream, ModelError> {
        let body = serde_json::to_vec(&request::body(&self.settings, request))
            .map_err(|e| ModelError::Protocol(format!("cannot encode the request: {e}")))?;
        let body = Bytes::from(body);
        let mut attempt = 0;
        loop {
            let failure = match self.attempt(body.clone()).await {
                Ok(stream) => {
                    let key: Option<Arc<str>> = self.settings.api_key.as_deref().map(Arc::from);
                    return Ok(stream.map(move |item| item.map_err(|e| scrub(e, key.as_deref()))).boxed());
                }
                Err(failure) => failure,
            };
            let s = &self.settings;
            let Some(wait) = retry::delay(&failure, attempt, s.max_retries, s.retry_backoff) else {
                return Err(self.scrub(failure.error));
            };
            attempt += 1;
            let error = self.scrub(failure.error);
            let wait_ms = wait.as_millis() as u64;
            tracing::warn!(model = %s.model, attempt, wait_ms, %error, "model call failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }
}

/// `{base}/chat/completions`, for an http(s) base URL.
fn completions_url(base: &str) -> Result<reqwest::Url, ModelError> {
    let invalid = |why: &str| ModelError::Connect(format!("invalid model base URL: {why}"));
    let url = reqwest::Url::parse(&format!("{}/chat/completions", base.trim().trim_end_matches('/')))
        .map_err(|e| invalid(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("the scheme must be http or https"));
    }
    Ok(url)
}

/// The `Authorization` header for a key, marked sensitive.
fn bearer(key: &str) -> Result<HeaderValue, ModelError> {
    let mut value = HeaderValue::from_str(&format!("Bearer {}", key.trim())).map_err(|_| {
        ModelError::Connect("the API key contains characters not allowed in an HTTP header".to_owned())
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// Turns an error status into a failure, with the upstream's message and `Retry-After`.
async fn check_status(response: reqwest::Response, timeout: Duration) -> Result<reqwest::Response, Failure> {
    let status = response.status();
    if status.is_success() {
        return check_content_type(response, timeout).await;
    }
    let retry_after = retry::retry_after(response.headers());
    let message = error_message(response, timeout).await;
    // The one place the upstream's own words are kept: clients get the status only.
    tracing::warn!(upstream.status = status.as_u16(), upstream.error = %message, "the model endpoint answered an error");
    let error = ModelError::Status { status: status.as_u16(), message };
    Err(Failure { error, retryable: retry::is_retryable_status(status.as_u16()), retry_after })
}

/// A 2xx JSON body is not a stream: most likely an error the server reports with a 200.
async fn check_content_type(
    response: reqwest::Response,
    timeout: Duration,
) -> Result<reqwest::Response, Failure> {
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    if !is_json {
        return Ok(response);
    }
    let message = error_message(response, timeout).await;
    Err(Failure::permanent(ModelError::Protocol(format!("expected an event stream, got JSON: {message}"))))
}

/// A short description of an error body, credentials redacted: its `error.message` when it has
/// one, else its start.
async fn error_message(response: reqwest::Response, timeout: Duration) -> String {
    let status = response.status();
    let body: String =
        tokio::time::timeout(timeout, read_capped(response, MAX_ERROR_BODY)).await.unwrap_or_default();
    let from_json = serde_json::from_str::<Value>(&body).ok().and_then(|v| {
        let inner = v.get("error").cloned().unwrap_or(v);
        inner
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| inner.as_str().map(str::to_owned))
    });
    let text = from_json.unwrap_or_else(|| body.trim().to_owned());
    if text.is_empty() {
        status.canonical_reason().unwrap_or("no details").to_owned()
    } else {
        redact_secrets(truncate(&text, MAX_MESSAGE))
    }
}

/// Reads at most `max` bytes of a body, as (lossy) text.
async fn read_capped(mut response: reqwest::Response, max: usize) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < max {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            _ => break,
        }
    }
    bytes.truncate(max);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// An error and its sources, without the URL (which may carry credentials).
fn error_chain(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

/// Replaces any occurrence of the key, and anything else that looks like a credential, in the
/// error's text.
fn scrub(error: ModelError, key: Option<&str>) -> ModelError {
    let key = key.map(str::trim).filter(|k| !k.is_empty());
    let clean = |text: String| {
        let text = match key {
            Some(key) => text.replace(key, REDACTED),
            None => text,
        };
        redact_secrets(&text)
    };
    match error {
        ModelError::Status { status, message } => ModelError::Status { status, message: clean(message) },
        ModelError::Timeout(m) => ModelError::Timeout(clean(m)),
        ModelError::Connect(m) => ModelError::Connect(clean(m)),
        ModelError::Protocol(m) => ModelError::Protocol(clean(m)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_key() {
        let mut s = OpenAiSettings::new("http://localhost:1/v1", "m");
        s.api_key = Some("sk-secret-123".into());
        s.base_url = "http://user:urlsecret@localhost:1/v1".into();
        assert!(!format!("{s:?}").contains("sk-secret-123"));
        assert!(!format!("{s:?}").contains("urlsecret"));
        let model = OpenAiModel::new(s).unwrap();
        assert!(!format!("{model:?}").contains("sk-secret-123"));
        assert!(!format!("{model:?}").contains("urlsecret"));
    }

    #[test]
    fn the_url_is_the_base_plus_chat_completions() {
        assert_eq!(completions_url("http://h:1/v1/").unwrap().as_str(), "http://h:1/v1/chat/completions");
        assert_eq!(
            completions_url("https://api.openai.com/v1").unwrap().as_str(),
            "https://api.openai.com/v1/chat/completions"
        );
        assert!(completions_url("ftp://h/v1").is_err());
        assert!(completions_url("not a url").is_err());
    }

    #[test]
    fn a_key_with_a_newline_is_refused_without_echoing_it() {
        let mut s = OpenAiSettings::new("http://localhost:1/v1", "m");
        s.api_key = Some("sk-bad\nkey".into());
        let err = OpenAiModel::new(s).unwrap_err().to_string();
        assert!(!err.contains("sk-bad"), "{err}");
    }

    #[test]
    fn auto_sends_the_new_token_field_to_openai_and_azure_only() {
        use MaxTokensParam::*;
        let auto = |host| max_tokens_param_for(Auto, host);
        assert_eq!(auto(Some("api.openai.com")), MaxCompletionTokens);
        assert_eq!(auto(Some("API.OpenAI.com")), MaxCompletionTokens);
        assert_eq!(auto(Some("my-resource.openai.azure.com")), MaxCompletionTokens);
        assert_eq!(auto(Some("localhost")), MaxTokens);
        assert_eq!(auto(Some("api.openai.com.example.net")), MaxTokens);
        assert_eq!(auto(None), MaxTokens);
        assert_eq!(max_tokens_param_for(MaxTokens, Some("api.openai.com")), MaxTokens, "a choice stands");
        let model = OpenAiModel::new(OpenAiSettings::new("https://api.openai.com/v1", "m")).unwrap();
        assert_eq!(model.settings.max_tokens_param, MaxCompletionTokens, "settled when built");
    }

    #[test]
    fn scrub_removes_the_key_from_every_variant() {
        let e = scrub(ModelError::Status { status: 401, message: "bad key sk-x1".into() }, Some("sk-x1"));
        assert_eq!(e.to_string(), "model endpoint answered 401: bad key <redacted>");
        assert_eq!(scrub(ModelError::Protocol("a".into()), None).to_string(), "model stream error: a");
    }

    #[test]
    fn settings_from_the_config_drop_a_blank_key() {
        let config = ModelConfig {
            provider: crate::config::ModelProvider::Openai,
            openai_base_url: "http://h/v1".into(),
            openai_api_key: Some("  ".into()),
            name: "m".into(),
            temperature: Some(0.5),
            max_tokens: None,
            max_tokens_param: MaxTokensParam::Auto,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(2),
            max_retries: 3,
            echo_delay_ms: 0,
        };
        let s = OpenAiSettings::from(&config);
        assert_eq!(s.api_key, None);
        assert_eq!((s.model.as_str(), s.temperature, s.max_retries), ("m", Some(0.5), 3));
        assert_eq!(s.request_timeout, Duration::from_secs(2));
    }
}
