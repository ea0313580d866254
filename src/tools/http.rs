//! HTTP tools declared in a config file (`PARLEY_TOOLS_FILE`), TOML or JSON by extension.
//!
//! Each tool POSTs its arguments as JSON to its URL and gives the model the response body (at
//! most [`MAX_RESPONSE_BYTES`]); a non-2xx answer is a tool error naming the status. Redirects are
//! not followed. Header values may reference environment variables as `${VAR}`, so secrets stay
//! out of the file; they are resolved when the file is loaded and never logged.
//!
//! ```toml
//! [[tools]]
//! name = "weather"
//! description = "Current weather for a city."
//! url = "https://weather.internal/api/current"
//! timeout = "10s"                      # humantime; 30s when omitted
//! parameters = { type = "object", properties = { city = { type = "string" } }, required = ["city"] }
//! headers = { Authorization = "Bearer ${WEATHER_TOKEN}" }
//! ```
//!
//! The JSON form is the same document: `{"tools": [{"name": …, "url": …, …}]}`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::Value;

use super::{DEFAULT_TOOL_TIMEOUT, Tool, ToolError, truncate};
use crate::llm::openai::install_crypto_provider;

/// The most bytes of a response body given to the model; the rest is cut.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// The longest body excerpt quoted in an error.
const MAX_ERROR_EXCERPT: usize = 300;

/// The syntax of a tools file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolsFormat {
    /// TOML (`.toml`).
    Toml,
    /// JSON (`.json`).
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolsFile {
    #[serde(default)]
    tools: Vec<ToolEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolEntry {
    name: Option<String>,
    #[serde(default)]
    description: String,
    parameters: Option<Value>,
    url: Option<String>,
    timeout: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// Loads the HTTP tools of a file; the error names the file, the tool and the problem.
pub fn load_tools_file(path: &Path) -> Result<Vec<Arc<dyn Tool>>, String> {
    let shown = path.display();
    let format = match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("toml") => ToolsFormat::Toml,
        Some("json") => ToolsFormat::Json,
        _ => return Err(format!("tools file {shown}: unsupported extension; use .toml or .json")),
    };
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("tools file {shown}: cannot read it: {e}"))?;
    parse_tools(&text, format, |var| std::env::var(var).ok()).map_err(|e| format!("tools file {shown}: {e}"))
}

/// Parses a tools document; `env` resolves `${VAR}` references in header values.
pub fn parse_tools(
    text: &str,
    format: ToolsFormat,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Vec<Arc<dyn Tool>>, String> {
    let file: ToolsFile = match format {
        ToolsFormat::Toml => toml::from_str(text).map_err(|e| toml_error(text, &e))?,
        ToolsFormat::Json => serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?,
    };
    let client = http_client()?;
    let mut seen = HashSet::new();
    let mut tools: Vec<Arc<dyn Tool>> = Vec::with_capacity(file.tools.len());
    for (i, entry) in file.tools.into_iter().enumerate() {
        let label = match &entry.name {
            Some(name) => format!("tool #{} ({name:?})", i + 1),
            None => format!("tool #{}", i + 1),
        };
        let tool = HttpTool::from_entry(entry, client.clone(), &env).map_err(|e| format!("{label}: {e}"))?;
        if !seen.insert(tool.name.clone()) {
            return Err(format!("{label}: the name is used by another tool"));
        }
        tools.push(Arc::new(tool));
    }
    Ok(tools)
}

/// A TOML error with its line, on one line.
fn toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim();
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("invalid TOML at line {line}: {message}")
        }
        None => format!("invalid TOML: {message}"),
    }
}

fn http_client() -> Result<reqwest::Client, String> {
    install_crypto_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("parley/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// A tool that POSTs its arguments to a URL.
#[derive(Clone)]
pub struct HttpTool {
    name: String,
    description: String,
    parameters: Value,
    url: reqwest::Url,
    timeout: Duration,
    headers: HeaderMap,
    client: reqwest::Client,
}

impl fmt::Debug for HttpTool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpTool")
            .field("name", &self.name)
            .field("url", &self.url.as_str())
            .field("timeout", &self.timeout)
            .field("headers", &self.headers.keys().map(HeaderName::as_str).collect::<Vec<_>>())
            .finish()
    }
}

impl HttpTool {
    fn from_entry(
        entry: ToolEntry,
        client: reqwest::Client,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let name = entry.name.ok_or("missing name")?;
        if !is_valid_tool_name(&name) {
            return Err(format!("invalid name {name:?}: use 1 to 64 of a-z, A-Z, 0-9, _ and -"));
        }
        let url = parse_url(entry.url.as_deref().ok_or("missing url")?)?;
        let timeout = parse_timeout(entry.timeout.as_deref())?;
        let parameters = parse_parameters(entry.parameters)?;
        let headers = parse_headers(&entry.headers, env)?;
        Ok(HttpTool { name, description: entry.description, parameters, url, timeout, headers, client })
    }

    /// The error of a request that got no response.
    fn request_error(&self, error: reqwest::Error) -> ToolError {
        if error.is_timeout() {
            return ToolError::Failed(format!(
                "timed out after {}",
                humantime::format_duration(self.timeout)
            ));
        }
        let error = error.without_url();
        let mut text = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(e) = source {
            text = format!("{text}: {e}");
            source = e.source();
        }
        ToolError::Failed(format!("request failed: {text}"))
    }
}

/// Whether `name` fits `[a-zA-Z0-9_-]{1,64}`.
pub fn is_valid_tool_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn parse_url(text: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(text.trim()).map_err(|e| format!("invalid url {text:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("invalid url {text:?}: the scheme must be http or https"));
    }
    Ok(url)
}

fn parse_timeout(text: Option<&str>) -> Result<Duration, String> {
    let Some(text) = text else { return Ok(DEFAULT_TOOL_TIMEOUT) };
    let timeout = humantime::parse_duration(text.trim())
        .map_err(|e| format!("invalid timeout {text:?}: {e} (use e.g. \"500ms\", \"10s\", \"1m\")"))?;
    if timeout.is_zero() {
        return Err("invalid timeout: it must be more than zero".to_owned());
    }
    Ok(timeout)
}

fn parse_parameters(parameters: Option<Value>) -> Result<Value, String> {
    match parameters {
        None => Ok(serde_json::json!({"type": "object", "properties": {}})),
        Some(schema @ Value::Object(_)) => Ok(schema),
        Some(_) => Err("parameters must be a JSON Schema object".to_owned()),
    }
}

fn parse_headers(
    headers: &BTreeMap<String, String>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let header =
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("invalid header name {name:?}"))?;
        let value = expand_env(value, env).map_err(|e| format!("header {name}: {e}"))?;
        let mut value = HeaderValue::from_str(&value)
            .map_err(|_| format!("header {name}: the value has characters not allowed in a header"))?;
        value.set_sensitive(true);
        map.insert(header, value);
    }
    Ok(map)
}

/// Replaces each `${VAR}` with the variable's value; an unset variable is an error.
pub fn expand_env(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or("an unterminated ${ reference")?;
        let var = &after[..end];
        let valid = !var.is_empty()
            && !var.starts_with(|c: char| c.is_ascii_digit())
            && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(format!("invalid variable name {var:?} in ${{…}}"));
        }
        out.push_str(&env(var).ok_or_else(|| format!("the environment variable {var} is not set"))?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[async_trait]
impl Tool for HttpTool {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> &str {
        &self.description
    }

    fn parameters(&self) -> Value {
        self.parameters.clone()
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn call(&self, arguments: Value) -> Result<String, ToolError> {
        let mut request = self.client.post(self.url.clone()).headers(self.headers.clone()).json(&arguments);
        if let Some(traceparent) = crate::telemetry::traceparent() {
            request = request.header(crate::telemetry::TRACEPARENT, traceparent);
        }
        let response = request.timeout(self.timeout).send().await.map_err(|e| self.request_error(e))?;
        let status = response.status();
        let (body, cut) =
            read_capped(response, MAX_RESPONSE_BYTES).await.map_err(|e| self.request_error(e))?;
        if !status.is_success() {
            let excerpt = truncate(body.trim(), MAX_ERROR_EXCERPT);
            return Err(ToolError::Failed(format!("HTTP {status}: {excerpt}")));
        }
        Ok(if cut { format!("{body}\n[response cut at {} KiB]", MAX_RESPONSE_BYTES / 1024) } else { body })
    }
}

/// Reads at most `max` bytes of a body as text; `true` when there was more.
async fn read_capped(mut response: reqwest::Response, max: usize) -> Result<(String, bool), reqwest::Error> {
    let mut bytes = Vec::new();
    let mut cut = false;
    while let Some(chunk) = response.chunk().await? {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > max {
            cut = true;
            break;
        }
    }
    Ok((utf8_prefix(bytes, max), cut))
}

/// The first `max` bytes as text, without a character split at the end.
fn utf8_prefix(mut bytes: Vec<u8>, max: usize) -> String {
    bytes.truncate(max);
    if let Err(e) = std::str::from_utf8(&bytes)
        && e.error_len().is_none()
    {
        bytes.truncate(e.valid_up_to());
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn env(var: &str) -> Option<String> {
        (var == "TOKEN").then(|| "s3cret".to_owned())
    }

    fn toml(text: &str) -> Result<Vec<Arc<dyn Tool>>, String> {
        parse_tools(text, ToolsFormat::Toml, env)
    }

    fn err(text: &str) -> String {
        toml(text).err().expect("an error")
    }

    #[test]
    fn a_full_entry_loads() {
        let tools = toml(
            r#"
            [[tools]]
            name = "weather"
            description = "Weather."
            url = "http://127.0.0.1:1/w"
            timeout = "250ms"
            parameters = { type = "object", properties = { city = { type = "string" } } }
            headers = { Authorization = "Bearer ${TOKEN}" }
            "#,
        )
        .unwrap();
        let tool = &tools[0];
        assert_eq!(tool.name(), "weather");
        assert_eq!(tool.description(), "Weather.");
        assert_eq!(tool.timeout(), Duration::from_millis(250));
        assert_eq!(tool.parameters()["properties"]["city"]["type"], "string");
    }

    #[test]
    fn defaults_apply_and_an_empty_file_has_no_tools() {
        let tools = toml("[[tools]]\nname = \"t\"\nurl = \"https://example.com/x\"\n").unwrap();
        assert_eq!(tools[0].timeout(), DEFAULT_TOOL_TIMEOUT);
        assert_eq!(tools[0].parameters(), json!({"type": "object", "properties": {}}));
        assert!(toml("").unwrap().is_empty());
        assert!(parse_tools(r#"{"tools": []}"#, ToolsFormat::Json, env).unwrap().is_empty());
    }

    #[test]
    fn errors_name_the_tool_and_the_problem() {
        assert_eq!(err("[[tools]]\nurl = \"http://h/\""), "tool #1: missing name");
        let e = err("[[tools]]\nname = \"has space\"\nurl = \"http://h/\"");
        assert!(e.starts_with("tool #1 (\"has space\"): invalid name"), "{e}");
        assert_eq!(err("[[tools]]\nname = \"t\""), "tool #1 (\"t\"): missing url");
        let e = err("[[tools]]\nname = \"t\"\nurl = \"ftp://h/\"");
        assert!(e.contains("scheme must be http or https"), "{e}");
        let e = err("[[tools]]\nname = \"t\"\nurl = \"http://h/\"\ntimeout = \"soon\"");
        assert!(e.contains("invalid timeout \"soon\""), "{e}");
        let e = err("[[tools]]\nname = \"t\"\nurl = \"http://h/\"\ntimeout = \"0s\"");
        assert!(e.contains("more than zero"), "{e}");
        let e = err("[[tools]]\nname = \"t\"\nurl = \"http://h/\"\nparameters = \"x\"");
        assert!(e.contains("parameters must be a JSON Schema object"), "{e}");
        let e = err("[[tools]]\nname = \"t\"\nurl = \"http://h/\"\nheaders = { X = \"${NOPE}\" }");
        assert!(e.contains("NOPE is not set"), "{e}");
        let e = err("[[tools]]\nname = \"t\"\nurl = \"http://h/\"\nheaders = { \"bad name\" = \"v\" }");
        assert!(e.contains("invalid header name"), "{e}");
        let e =
            err("[[tools]]\nname = \"t\"\nurl = \"http://h/\"\n[[tools]]\nname = \"t\"\nurl = \"http://h/\"");
        assert!(e.starts_with("tool #2 (\"t\"): the name is used"), "{e}");
        let e = err("[[tools]]\nname = \"t\"\nurl = \"http://h/\"\nheader = {}");
        assert!(e.starts_with("invalid TOML") && e.contains("header"), "{e}");
        assert!(err("[[tools]\n").starts_with("invalid TOML at line 1"), "{}", err("[[tools]\n"));
        let e = parse_tools("{\"tools\": [{\"name\": 1}]}", ToolsFormat::Json, env).err().unwrap();
        assert!(e.starts_with("invalid JSON"), "{e}");
    }

    #[test]
    fn env_references_expand_or_fail_clearly() {
        assert_eq!(expand_env("Bearer ${TOKEN}", env), Ok("Bearer s3cret".into()));
        assert_eq!(expand_env("${TOKEN}-${TOKEN}", env), Ok("s3cret-s3cret".into()));
        assert_eq!(expand_env("plain $TOKEN", env), Ok("plain $TOKEN".into()));
        assert!(expand_env("${TOKEN", env).unwrap_err().contains("unterminated"));
        assert!(expand_env("${1X}", env).unwrap_err().contains("invalid variable name"));
        assert!(expand_env("${}", env).unwrap_err().contains("invalid variable name"));
        assert!(expand_env("${MISSING}", env).unwrap_err().contains("MISSING is not set"));
    }

    #[test]
    fn debug_shows_header_names_not_values() {
        let entry = ToolEntry {
            name: Some("t".into()),
            description: String::new(),
            parameters: None,
            url: Some("http://h/".into()),
            timeout: None,
            headers: BTreeMap::from([("X-Key".to_owned(), "${TOKEN}".to_owned())]),
        };
        let tool = HttpTool::from_entry(entry, http_client().unwrap(), &env).unwrap();
        let debug = format!("{tool:?}");
        assert!(debug.contains("x-key") && !debug.contains("s3cret"), "{debug}");
    }

    #[test]
    fn names_follow_the_pattern() {
        assert!(is_valid_tool_name("get_weather-2"));
        assert!(!is_valid_tool_name(""));
        assert!(!is_valid_tool_name(&"a".repeat(65)));
        assert!(!is_valid_tool_name("dot.name"));
    }

    #[test]
    fn cut_text_never_splits_a_character() {
        assert_eq!(utf8_prefix("aé".as_bytes().to_vec(), 2), "a");
        assert_eq!(utf8_prefix("aé".as_bytes().to_vec(), 3), "aé");
        assert_eq!(utf8_prefix(vec![b'a', 0xff, b'b'], 10), "a\u{fffd}b");
    }
}
