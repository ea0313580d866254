//! Keeps the Redis URL's password, raw and percent-decoded, out of every error text and `Debug`
//! output of the Redis store (the driver's errors may quote the URL).

/// Removes the URL's password from any text before it leaves the store.
#[derive(Debug, Clone, Default)]
pub(super) struct Redactor {
    pub(super) secrets: Vec<String>,
}

impl Redactor {
    /// Finds the password in `url` (raw and percent-decoded), even when the URL is malformed.
    pub(super) fn new(url: &str) -> Self {
        let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
        let password = rest
            .rsplit_once('@')
            .and_then(|(userinfo, _)| userinfo.split_once(':'))
            .map(|(_, password)| password)
            .filter(|p| !p.is_empty());
        let mut secrets = Vec::new();
        if let Some(raw) = password {
            let decoded = percent_decode(raw);
            secrets.push(raw.to_owned());
            if decoded != raw && !decoded.is_empty() {
                secrets.push(decoded);
            }
        }
        Redactor { secrets }
    }

    pub(super) fn apply(&self, text: &str) -> String {
        self.secrets.iter().fold(text.to_owned(), |acc, secret| acc.replace(secret.as_str(), "***"))
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_redactor_finds_raw_and_decoded_passwords() {
        let r = Redactor::new("redis://user:p%40ss%3Aword@host:6379/0");
        assert_eq!(r.apply("x p%40ss%3Aword y p@ss:word z"), "x *** y *** z");
        let r = Redactor::new("redis://:hunter2@host");
        assert_eq!(r.apply("auth hunter2 failed"), "auth *** failed");
        assert!(Redactor::new("redis://host:6379").secrets.is_empty());
    }
}
