//! Built-in tools: `current_time` and `calculator`.
//!
//! - `current_time {utc_offset?}`: the current time in RFC 3339, in UTC or at a fixed offset.
//! - `calculator {expression}`: arithmetic with [`arith`], a safe hand-written evaluator.

pub mod arith;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, FixedOffset, SecondsFormat, Utc};
use serde_json::{Value, json};

use super::{Tool, ToolError};

/// How long a built-in tool may take (they answer at once).
const BUILTIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Every built-in tool.
pub fn all() -> Vec<Arc<dyn Tool>> {
    vec![Arc::new(CurrentTime), Arc::new(Calculator)]
}

/// `current_time`: the current date and time.
#[derive(Debug, Clone, Copy, Default)]
pub struct CurrentTime;

#[async_trait]
impl Tool for CurrentTime {
    fn name(&self) -> &str {
        "current_time"
    }

    fn description(&self) -> &str {
        "Returns the current date and time in RFC 3339 format, in UTC or at a given UTC offset."
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "utc_offset": {
                    "type": "string",
                    "description": "Offset from UTC such as \"+02:00\", \"-05:30\" or \"Z\"; UTC when omitted."
                }
            },
            "additionalProperties": false
        })
    }

    fn timeout(&self) -> Duration {
        BUILTIN_TIMEOUT
    }

    async fn call(&self, arguments: Value) -> Result<String, ToolError> {
        let offset = match arguments.get("utc_offset") {
            None | Some(Value::Null) => FixedOffset::east_opt(0).expect("zero offset"),
            Some(Value::String(text)) => parse_utc_offset(text)?,
            Some(other) => {
                return Err(ToolError::InvalidArguments(format!(
                    "utc_offset must be a string such as \"+02:00\", got {other}"
                )));
            }
        };
        Ok(time_at(Utc::now(), offset))
    }
}

/// `now` at `offset`, in RFC 3339 to the second (`Z` for UTC).
pub fn time_at(now: DateTime<Utc>, offset: FixedOffset) -> String {
    now.with_timezone(&offset).to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Parses `Z`, `UTC`, `±HH:MM`, `±HHMM` or `±HH`, up to ±14:00.
pub fn parse_utc_offset(text: &str) -> Result<FixedOffset, ToolError> {
    let invalid = || {
        ToolError::InvalidArguments(format!(
            "invalid utc_offset {text:?}: expected \"Z\" or ±HH:MM between -14:00 and +14:00, e.g. \"+02:00\" or \"-05:30\""
        ))
    };
    let trimmed = text.trim();
    if matches!(trimmed, "Z" | "z" | "UTC" | "utc") {
        return Ok(FixedOffset::east_opt(0).expect("zero offset"));
    }
    let (sign, rest) = match trimmed.chars().next() {
        Some('+') => (1, &trimmed[1..]),
        Some('-') => (-1, &trimmed[1..]),
        _ => return Err(invalid()),
    };
    let (hours, minutes) = split_hours_minutes(rest).ok_or_else(invalid)?;
    if hours > 14 || minutes > 59 || (hours == 14 && minutes > 0) {
        return Err(invalid());
    }
    FixedOffset::east_opt(sign * (hours * 3600 + minutes * 60)).ok_or_else(invalid)
}

/// `HH:MM`, `HHMM` or `HH` (two digits each).
fn split_hours_minutes(text: &str) -> Option<(i32, i32)> {
    if !text.is_ascii() {
        return None;
    }
    let two_digits =
        |s: &str| (s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok())?;
    match text.len() {
        2 => Some((two_digits(text)?, 0)),
        4 => Some((two_digits(&text[..2])?, two_digits(&text[2..])?)),
        5 if text.as_bytes()[2] == b':' => Some((two_digits(&text[..2])?, two_digits(&text[3..])?)),
        _ => None,
    }
}

/// `calculator`: evaluates an arithmetic expression.
#[derive(Debug, Clone, Copy, Default)]
pub struct Calculator;

#[async_trait]
impl Tool for Calculator {
    fn name(&self) -> &str {
        "calculator"
    }

    fn description(&self) -> &str {
        "Evaluates an arithmetic expression exactly as written: numbers (decimals and 1e3 notation), \
         + - * / % ^ (power) and parentheses. Returns the result as a number."
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "expression": {
                    "type": "string",
                    "description": "The expression, e.g. \"(2 + 3) * 4 ^ 2 / 7\"."
                }
            },
            "required": ["expression"],
            "additionalProperties": false
        })
    }

    fn timeout(&self) -> Duration {
        BUILTIN_TIMEOUT
    }

    async fn call(&self, arguments: Value) -> Result<String, ToolError> {
        let Some(expression) = arguments.get("expression").and_then(Value::as_str) else {
            return Err(ToolError::InvalidArguments(
                "expected {\"expression\": \"<arithmetic expression>\"}".to_owned(),
            ));
        };
        match arith::evaluate(expression) {
            Ok(value) => Ok(arith::format_number(value)),
            Err(e) if e.is_syntax() => Err(ToolError::InvalidArguments(e.to_string())),
            Err(e) => Err(ToolError::Failed(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::tools::ToolRegistry;

    fn offset(text: &str) -> Result<i32, ToolError> {
        parse_utc_offset(text).map(|o| o.local_minus_utc())
    }

    #[test]
    fn offsets_parse_in_the_usual_forms() {
        assert_eq!(offset("Z"), Ok(0));
        assert_eq!(offset("UTC"), Ok(0));
        assert_eq!(offset("+02:00"), Ok(7200));
        assert_eq!(offset("-05:30"), Ok(-(5 * 3600 + 30 * 60)));
        assert_eq!(offset("+0545"), Ok(5 * 3600 + 45 * 60));
        assert_eq!(offset("-03"), Ok(-3 * 3600));
        assert_eq!(offset("+14:00"), Ok(14 * 3600));
        assert_eq!(offset(" +01:00 "), Ok(3600));
    }

    #[test]
    fn bad_offsets_are_refused_with_the_expected_form() {
        for bad in [
            "",
            "2",
            "+2",
            "+02:60",
            "+15:00",
            "+14:30",
            "02:00",
            "+02-00",
            "+ab:cd",
            "+aé1",
            "Europe/Paris",
            "+٠٢:٠٠",
        ] {
            let err = offset(bad).unwrap_err();
            assert!(matches!(&err, ToolError::InvalidArguments(m) if m.contains("+02:00")), "{bad}: {err}");
        }
    }

    #[test]
    fn time_is_rfc3339_in_the_offset() {
        let now = Utc.with_ymd_and_hms(2025, 3, 1, 23, 30, 5).unwrap();
        assert_eq!(time_at(now, parse_utc_offset("Z").unwrap()), "2025-03-01T23:30:05Z");
        assert_eq!(time_at(now, parse_utc_offset("+02:00").unwrap()), "2025-03-02T01:30:05+02:00");
        assert_eq!(time_at(now, parse_utc_offset("-05:30").unwrap()), "2025-03-01T18:00:05-05:30");
    }

    #[tokio::test]
    async fn current_time_defaults_to_utc_and_checks_its_argument() {
        let text = CurrentTime.call(json!({})).await.unwrap();
        let parsed = DateTime::parse_from_rfc3339(&text).unwrap();
        assert!(text.ends_with('Z'), "{text}");
        assert!((Utc::now() - parsed.with_timezone(&Utc)).num_seconds().abs() < 5);
        let text = CurrentTime.call(json!({"utc_offset": "+09:00"})).await.unwrap();
        assert!(text.ends_with("+09:00"), "{text}");
        assert!(CurrentTime.call(json!({"utc_offset": 2})).await.is_err());
        assert!(CurrentTime.call(json!({"utc_offset": null})).await.unwrap().ends_with('Z'));
    }

    #[tokio::test]
    async fn calculator_answers_and_reports_errors_by_kind() {
        assert_eq!(Calculator.call(json!({"expression": "(2 + 3) * 4 ^ 2"})).await, Ok("80".into()));
        assert_eq!(Calculator.call(json!({"expression": "10 / 4"})).await, Ok("2.5".into()));
        assert!(matches!(Calculator.call(json!({})).await, Err(ToolError::InvalidArguments(_))));
        assert!(matches!(
            Calculator.call(json!({"expression": 12})).await,
            Err(ToolError::InvalidArguments(_))
        ));
        assert!(matches!(
            Calculator.call(json!({"expression": "1 +"})).await,
            Err(ToolError::InvalidArguments(_))
        ));
        assert_eq!(
            Calculator.call(json!({"expression": "1/0"})).await,
            Err(ToolError::Failed("division by zero".into()))
        );
    }

    #[tokio::test]
    async fn the_registry_offers_both_and_runs_them() {
        let registry = ToolRegistry::with_builtins();
        let names: Vec<String> = registry.specs().iter().map(|s| s.name.clone()).collect();
        assert_eq!(names, vec!["current_time", "calculator"]);
        for spec in registry.specs().iter() {
            assert_eq!(spec.parameters["type"], "object");
            assert!(!spec.description.is_empty());
        }
        let outcome = registry.run("calculator", &json!({"expression": "2^10"})).await;
        assert_eq!((outcome.content.as_str(), outcome.is_error), ("1024", false));
        let outcome = registry.run("calculator", &json!({"expression": "2/0"})).await;
        assert!(outcome.is_error && outcome.content.contains("division by zero"), "{}", outcome.content);
    }
}
