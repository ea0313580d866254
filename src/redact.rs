//! Keeping secrets out of logs and `Debug` output: the password (and secret query parameters) of
//! a connection URL, and bearer tokens, API keys and `key=value` secrets in free text such as an
//! upstream's error body.
//!
//! Below every part that logs text it did not write (the configuration, the stores, the model
//! providers), so that none of them imports another to redact.

/// What replaces a secret.
pub const REDACTED: &str = "<redacted>";

/// Query parameters of a connection URL whose value is a secret (`?password=…` is how libpq and
/// sqlx take a password outside the user info).
const SECRET_PARAMS: [&str; 6] = ["password", "passwd", "pass", "token", "secret", "sslpassword"];

/// Hides the password and any secret query parameter of a connection URL, for logs and `Debug`.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            let secret_query = parsed.query_pairs().any(|(k, _)| is_secret_name(&k));
            if secret_query {
                let pairs: Vec<(String, String)> = parsed
                    .query_pairs()
                    .map(|(k, v)| {
                        let value = if is_secret_name(&k) { "***".to_owned() } else { v.into_owned() };
                        (k.into_owned(), value)
                    })
                    .collect();
                parsed.query_pairs_mut().clear().extend_pairs(pairs);
            }
            parsed.to_string()
        }
        Err(_) => "<unparseable url>".to_owned(),
    }
}

fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PARAMS.contains(&name.as_str()) || name.contains("key") || name.contains("token")
}

/// Words that introduce a secret in `name=value`, `name: value` or `"name": "value"` form.
const SECRET_WORDS: [&str; 7] =
    ["api_key", "api-key", "apikey", "token", "secret", "password", "authorization"];

/// Prefixes of well-known API key formats (OpenAI `sk-`, parley's own `pk_`, Anthropic
/// `sk-ant-`, Slack `xox…`, Google `AIza`, GitHub `ghp_`/`github_pat_`).
const KEY_PREFIXES: [&str; 7] = ["sk-", "sk_", "pk_", "xox", "AIza", "ghp_", "github_pat_"];

/// The shortest run of token characters taken for a key when it has a known prefix.
const MIN_PREFIXED_KEY: usize = 12;

/// The shortest run of letters and digits taken for an unknown token (a random key, a JWT part).
const MIN_BARE_TOKEN: usize = 32;

/// Replaces what looks like a credential in free text: the token after `Bearer`, values of
/// `api_key=…`, `token: …`, `"password": "…"` and the like, words with a known key prefix, and
/// long random-looking runs of letters and digits. Errs on the side of hiding.
pub fn redact_secrets(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let (mut hide_next, mut hid_last) = (false, false);
    while let Some(start) = rest.find(is_token_char) {
        let (before, from) = rest.split_at(start);
        out.push_str(before);
        let end = from.find(|c: char| !is_token_char(c)).unwrap_or(from.len());
        let (word, after) = from.split_at(end);
        // A dot joins the parts of a JWT: the part after a hidden one is hidden too.
        hid_last = hide_next || looks_like_key(word) || (hid_last && before == ".");
        if hid_last {
            out.push_str(REDACTED);
        } else {
            out.push_str(word);
        }
        // The next word is hidden after "Bearer" and after a secret's name followed by `=` or `:`.
        hide_next = word.eq_ignore_ascii_case("bearer")
            || (is_secret_word(word) && introduces_value(after))
            || (hide_next && word.eq_ignore_ascii_case("basic"));
        rest = after;
    }
    out.push_str(rest);
    out
}

/// Characters of tokens and keys (base64 and base64url without padding). Dots and `=` end a word,
/// so that `token=…` and each part of a JWT are judged alone.
fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '+' | '/' | '~')
}

fn is_secret_word(word: &str) -> bool {
    let word = word.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|w| word.ends_with(w))
}

/// Whether the text after a word is a separator (`=`, `:`, quotes and spaces) before a value.
fn introduces_value(after: &str) -> bool {
    let separator: String = after.chars().take_while(|c| matches!(c, '"' | '\'' | ' ' | ':' | '=')).collect();
    separator.contains(':') || separator.contains('=')
}

fn looks_like_key(word: &str) -> bool {
    if KEY_PREFIXES.iter().any(|p| word.starts_with(p)) && word.len() >= MIN_PREFIXED_KEY {
        return true;
    }
    let has_digit = word.bytes().any(|b| b.is_ascii_digit());
    let has_letter = word.bytes().any(|b| b.is_ascii_alphabetic());
    word.len() >= MIN_BARE_TOKEN && has_digit && has_letter
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_password_and_secret_parameters() {
        assert_eq!(redact_url("redis://user:hunter2@h:6379/0"), "redis://user:***@h:6379/0");
        assert!(!redact_url("postgres://u:pw@db/x").contains("pw"));
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
        let query = redact_url("postgres://u@db/x?sslmode=require&password=hunter2&api_key=k1");
        assert!(!query.contains("hunter2") && !query.contains("k1"), "{query}");
        assert!(query.contains("sslmode=require"), "{query}");
        assert_eq!(redact_url("not a url"), "<unparseable url>");
    }

    #[test]
    fn free_text_loses_bearer_tokens_keys_and_secret_values() {
        let cases = [
            "Incorrect API key provided: sk-proj-abcdef123456. You can find your key at …",
            "header was Authorization: Bearer eyJhbGciOi.eyJzdWIiOiIx.c2lnbmF0dXJl",
            r#"{"api_key": "hunter2hunter2", "model": "x"}"#,
            "token=abc123&user=me",
            "password: correct-horse",
            "random 0123456789abcdef0123456789abcdef01 here",
            "parley key pk_keya_0123456789abcdef",
        ];
        let secrets = [
            "sk-proj-abcdef123456",
            "c2lnbmF0dXJl",
            "hunter2hunter2",
            "abc123",
            "correct-horse",
            "0123456789abcdef0123456789abcdef01",
            "pk_keya_0123456789abcdef",
        ];
        for (text, secret) in cases.iter().zip(secrets) {
            let clean = redact_secrets(text);
            assert!(!clean.contains(secret), "{text} -> {clean}");
            assert!(clean.contains(REDACTED), "{clean}");
        }
    }

    #[test]
    fn ordinary_text_is_kept() {
        let text = "The model `gpt-4o-mini` is overloaded; retry in 20 seconds (request 42).";
        assert_eq!(redact_secrets(text), text);
        assert_eq!(redact_secrets("the token expired"), "the token expired");
    }
}
