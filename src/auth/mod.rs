//! API keys and the tenants they act for.
//!
//! - [`key`]: the key format (`pk_<id>_<secret>`), SHA-256 digests, generation, and [`key::Secret`],
//!   a string that never shows in logs.
//! - [`keyring`]: the keys the service accepts, loaded from `PARLEY_API_KEYS_FILE` and
//!   `PARLEY_API_KEYS`, re-read while running, and checked in constant time.
//!
//! The HTTP side (the bearer header, the 401 answer, the tenant handed to handlers) is in
//! [`crate::http::auth`].

pub mod key;
pub mod keyring;

/// Who a request comes from: the key that authenticated it and the tenant that key acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key id (never the secret); rate limits count per key id. With authentication off it is
    /// `ip:<client address>`, or `default` when the address is unknown.
    pub key_id: String,
    /// The tenant whose sessions the request may see.
    pub tenant: String,
}

/// Why a request was not authenticated. The texts are safe to send: none includes the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    /// No `Authorization` header.
    #[error("missing credentials: send `Authorization: Bearer <API key>`")]
    Missing,
    /// A header that is not `Bearer <key>` or a key that is not `pk_<id>_<secret>`.
    #[error("malformed credentials: send `Authorization: Bearer pk_<id>_<secret>`")]
    Malformed,
    /// A well-formed key that is unknown, revoked, or whose secret does not match.
    #[error("invalid API key")]
    Invalid,
}
