//! The API key format, its digest and key generation.
//!
//! A key reads `pk_<id>_<secret>`: the key id (`[A-Za-z0-9-]`, at most 64 characters) names the
//! key in the keys file and in logs and is not secret; the secret (`[A-Za-z0-9_-]`) is 32 random
//! bytes in hex for generated keys. The service stores only the SHA-256 of the whole key.
//!
//! Why SHA-256 and not argon2: a generated key carries 256 random bits, so neither a dictionary
//! nor brute force can find it from its digest; a slow password hash protects low-entropy secrets
//! and would cost every request tens of milliseconds.

use rand::TryRngCore;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Every key starts with this.
pub const KEY_PREFIX: &str = "pk_";

/// The longest key id.
pub const MAX_KEY_ID_LEN: usize = 64;

/// The longest key accepted; longer ones are refused before hashing.
pub const MAX_KEY_LEN: usize = 512;

/// The longest tenant name.
pub const MAX_TENANT_LEN: usize = 64;

/// A string that never shows in `Debug` output (API keys, the development key list).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret string.
    pub fn new(text: impl Into<String>) -> Self {
        Secret(text.into())
    }

    /// The secret itself; the caller must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The SHA-256 digest of a whole key. Compared only in constant time ([`KeyDigest::matches`]).
#[derive(Clone, Copy)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    /// All zeros: the digest of no known input.
    pub(crate) const ZERO: KeyDigest = KeyDigest([0; 32]);

    /// The digest of `key`.
    pub fn of(key: &str) -> Self {
        KeyDigest(Sha256::digest(key.as_bytes()).into())
    }

    /// Parses 64 hex digits (either case).
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes)
            .map_err(|_| "sha256 must be 64 hex digits (the SHA-256 of the whole key)".to_owned())?;
        Ok(KeyDigest(bytes))
    }

    /// The digest as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Constant-time equality.
    pub fn matches(&self, other: &KeyDigest) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl std::fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyDigest({}…)", &self.to_hex()[..8])
    }
}

/// Splits a presented key into its id, checking its shape; `None` if it is not `pk_<id>_<secret>`.
pub fn key_id(key: &str) -> Option<&str> {
    if key.len() > MAX_KEY_LEN {
        return None;
    }
    let (id, secret) = key.strip_prefix(KEY_PREFIX)?.split_once('_')?;
    let secret_ok =
        !secret.is_empty() && secret.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
    (is_valid_key_id(id) && secret_ok).then_some(id)
}

/// Whether `id` is a valid key id: 1 to 64 characters from `A-Z a-z 0-9 -`.
pub fn is_valid_key_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_KEY_ID_LEN && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Whether `tenant` is a valid tenant name: 1 to 64 characters from `A-Z a-z 0-9 . _ : -`.
pub fn is_valid_tenant(tenant: &str) -> bool {
    !tenant.is_empty()
        && tenant.len() <= MAX_TENANT_LEN
        && tenant.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A freshly generated key.
#[derive(Debug)]
pub struct NewKey {
    /// The key id.
    pub id: String,
    /// The whole key, to hand to the client once.
    pub key: Secret,
    /// Its digest, for the keys file.
    pub digest: KeyDigest,
}

/// Generates a key with this id (12 random hex digits when `None`) and a 32-byte random secret
/// from the operating system's generator.
pub fn generate(id: Option<&str>) -> Result<NewKey, String> {
    let id = match id {
        Some(id) if is_valid_key_id(id) => id.to_owned(),
        Some(_) => return Err("the key id must be 1 to 64 characters from A-Z a-z 0-9 -".to_owned()),
        None => hex::encode(random_bytes::<6>()?),
    };
    let key = format!("{KEY_PREFIX}{id}_{}", hex::encode(random_bytes::<32>()?));
    let digest = KeyDigest::of(&key);
    Ok(NewKey { id, key: Secret::new(key), digest })
}

fn random_bytes<const N: usize>() -> Result<[u8; N], String> {
    let mut bytes = [0u8; N];
    OsRng.try_fill_bytes(&mut bytes).map_err(|e| format!("the system random generator failed: {e}"))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_id_and_secret() {
        assert_eq!(key_id("pk_abc_0123"), Some("abc"));
        assert_eq!(key_id("pk_dev-1_secret_with-underscores"), Some("dev-1"));
        for bad in ["", "pk_", "pk_abc", "pk_abc_", "pk__secret", "sk_abc_secret", "pk_a b_c", "pk_a_sec ret"]
        {
            assert_eq!(key_id(bad), None, "{bad:?}");
        }
        assert_eq!(key_id(&format!("pk_a_{}", "x".repeat(MAX_KEY_LEN))), None);
    }

    #[test]
    fn generated_keys_parse_and_match_their_digest() {
        let new = generate(Some("k1")).unwrap();
        assert_eq!(key_id(new.key.expose()), Some("k1"));
        assert_eq!(new.key.expose().len(), "pk_k1_".len() + 64);
        assert!(KeyDigest::of(new.key.expose()).matches(&new.digest));
        assert!(!KeyDigest::of("pk_k1_other").matches(&new.digest));
        let random = generate(None).unwrap();
        assert_eq!(random.id.len(), 12);
        assert!(generate(Some("bad_id")).is_err());
    }

    #[test]
    fn digests_round_trip_through_hex() {
        let digest = KeyDigest::of("pk_a_b");
        let back = KeyDigest::from_hex(&digest.to_hex().to_uppercase()).unwrap();
        assert!(back.matches(&digest));
        assert!(KeyDigest::from_hex("abc").is_err());
    }

    #[test]
    fn secrets_and_digests_do_not_show_in_debug_output() {
        let secret = Secret::new("pk_a_topsecret");
        assert!(!format!("{secret:?}").contains("topsecret"));
        let new = generate(None).unwrap();
        let shown = format!("{new:?}");
        assert!(!shown.contains(&new.key.expose()[6..]), "{shown}");
    }
}
