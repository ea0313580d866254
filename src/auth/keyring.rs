//! The keys the service accepts: loaded from the keys file and the development variable,
//! re-read while running, and checked in constant time.
//!
//! # The keys file (`PARLEY_API_KEYS_FILE`)
//! TOML (`.toml`) or JSON (`.json`); each key has an id, a tenant, the SHA-256 of the whole key in
//! hex, and optionally `revoked = true`. The plain key is never stored.
//!
//! ```toml
//! [[keys]]
//! id = "3f9a1c0b2d4e"
//! tenant = "acme"
//! sha256 = "9b71d224bd62f3785d96d46ad3ea3d73319bfbc2890caadae2dff72519673ca7"
//! revoked = false
//! ```
//!
//! JSON has the same fields: `{"keys": [{"id": …, "tenant": …, "sha256": …}]}`.
//!
//! # Development keys (`PARLEY_API_KEYS`)
//! `tenant:key` pairs separated by commas (`acme:pk_dev_secret1,globex:pk_dev2_secret2`); they are
//! hashed at load and the text is dropped. Errors name the pair's position, never its text.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Deserialize;

use super::key::{KeyDigest, Secret, is_valid_key_id, is_valid_tenant, key_id};
use super::{AuthFailure, Principal};

/// One key as the service knows it.
#[derive(Debug, Clone)]
pub struct KeyEntry {
    /// The key id.
    pub id: String,
    /// The tenant the key acts for.
    pub tenant: String,
    /// SHA-256 of the whole key.
    pub digest: KeyDigest,
    /// A revoked key is refused like an unknown one.
    pub revoked: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<FileEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    id: String,
    tenant: String,
    sha256: String,
    #[serde(default)]
    revoked: bool,
}

/// The syntax of a keys file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeysFormat {
    /// `[[keys]]` tables.
    Toml,
    /// `{"keys": [...]}`.
    Json,
}

impl KeysFormat {
    /// The format a file's extension names.
    pub fn of(path: &Path) -> Result<Self, String> {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("toml") => Ok(KeysFormat::Toml),
            Some("json") => Ok(KeysFormat::Json),
            _ => Err("unsupported extension; use .toml or .json".to_owned()),
        }
    }
}

/// Parses a keys document.
pub fn parse_keys_file(text: &str, format: KeysFormat) -> Result<Vec<KeyEntry>, String> {
    let file: KeysFile = match format {
        KeysFormat::Toml => toml::from_str(text).map_err(|e| format!("invalid TOML: {}", e.message()))?,
        KeysFormat::Json => serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?,
    };
    file.keys
        .into_iter()
        .enumerate()
        .map(|(i, entry)| file_entry(entry).map_err(|e| format!("key #{}: {e}", i + 1)))
        .collect()
}

fn file_entry(entry: FileEntry) -> Result<KeyEntry, String> {
    if !is_valid_key_id(&entry.id) {
        return Err("id must be 1 to 64 characters from A-Z a-z 0-9 -".to_owned());
    }
    check_tenant(&entry.tenant)?;
    let digest = KeyDigest::from_hex(&entry.sha256)?;
    Ok(KeyEntry { id: entry.id, tenant: entry.tenant, digest, revoked: entry.revoked })
}

fn check_tenant(tenant: &str) -> Result<(), String> {
    if is_valid_tenant(tenant) {
        Ok(())
    } else {
        Err("tenant must be 1 to 64 characters from A-Z a-z 0-9 . _ : -".to_owned())
    }
}

/// Reads and parses a keys file.
pub fn load_keys_file(path: &Path) -> Result<Vec<KeyEntry>, String> {
    let text = read_keys_file(path)?;
    parse_keys_file(&text, KeysFormat::of(path).map_err(|e| keys_file_error(path, &e))?)
        .map_err(|e| keys_file_error(path, &e))
}

fn read_keys_file(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| keys_file_error(path, &format!("cannot read it: {e}")))
}

fn keys_file_error(path: &Path, error: &str) -> String {
    format!("PARLEY_API_KEYS_FILE {}: {error}", path.display())
}

/// Parses `tenant:key,tenant:key` (the development keys). Errors never include the text.
pub fn parse_dev_keys(text: &Secret) -> Result<Vec<KeyEntry>, String> {
    let pairs = text.expose().split(',').map(str::trim).filter(|p| !p.is_empty());
    pairs
        .enumerate()
        .map(|(i, pair)| dev_entry(pair).map_err(|e| format!("PARLEY_API_KEYS pair #{}: {e}", i + 1)))
        .collect()
}

fn dev_entry(pair: &str) -> Result<KeyEntry, String> {
    let (tenant, key) = pair.split_once(':').ok_or("expected tenant:key")?;
    check_tenant(tenant)?;
    let id = key_id(key).ok_or("the key must read pk_<id>_<secret>")?;
    Ok(KeyEntry { id: id.to_owned(), tenant: tenant.to_owned(), digest: KeyDigest::of(key), revoked: false })
}

type KeyMap = HashMap<String, KeyEntry>;

fn key_map(entries: impl IntoIterator<Item = KeyEntry>) -> Result<KeyMap, String> {
    let mut map = KeyMap::new();
    for entry in entries {
        if map.contains_key(&entry.id) {
            return Err(format!("the key id {:?} appears twice", entry.id));
        }
        map.insert(entry.id.clone(), entry);
    }
    Ok(map)
}

/// A digest no key has (no known input hashes to all zeros): unknown ids are compared against
/// it, so that an unknown id costs the same as a wrong secret.
const NO_KEY: KeyDigest = KeyDigest::ZERO;

/// The keys the service accepts.
#[derive(Debug)]
pub struct KeyRing {
    keys: RwLock<Arc<KeyMap>>,
    file: Option<PathBuf>,
    /// The development keys, kept to merge with every reload of the file.
    dev: Vec<KeyEntry>,
    /// The file's text when it was last loaded, to skip reloads of an unchanged file.
    loaded_text: RwLock<Option<String>>,
}

impl KeyRing {
    /// Loads the keys file and the development keys; fails when no key is active.
    pub fn load(file: Option<&Path>, dev: Option<&Secret>) -> Result<Self, String> {
        let dev = dev.map(parse_dev_keys).transpose()?.unwrap_or_default();
        let text = file.map(read_keys_file).transpose()?;
        let ring = KeyRing {
            keys: RwLock::new(Arc::new(KeyMap::new())),
            file: file.map(Path::to_path_buf),
            dev,
            loaded_text: RwLock::new(None),
        };
        ring.install(text)?;
        if ring.active_keys() == 0 {
            return Err("PARLEY_AUTH=api_key but no active key was found: add one with `parley keys new \
                        --tenant NAME` to PARLEY_API_KEYS_FILE (or set PARLEY_API_KEYS for development)"
                .to_owned());
        }
        Ok(ring)
    }

    /// A ring of these keys (tests and embedders).
    pub fn from_entries(entries: Vec<KeyEntry>) -> Result<Self, String> {
        Ok(KeyRing {
            keys: RwLock::new(Arc::new(key_map(entries)?)),
            file: None,
            dev: Vec::new(),
            loaded_text: RwLock::new(None),
        })
    }

    /// Parses the file text (if any), merges the development keys and swaps the key map in.
    fn install(&self, text: Option<String>) -> Result<(), String> {
        let from_file = match (&self.file, &text) {
            (Some(path), Some(text)) => {
                parse_keys_file(text, KeysFormat::of(path).map_err(|e| keys_file_error(path, &e))?)
                    .map_err(|e| keys_file_error(path, &e))?
            }
            _ => Vec::new(),
        };
        let map = key_map(from_file.into_iter().chain(self.dev.iter().cloned()))?;
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(map);
        *self.loaded_text.write().unwrap_or_else(|e| e.into_inner()) = text;
        Ok(())
    }

    fn snapshot(&self) -> Arc<KeyMap> {
        Arc::clone(&self.keys.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// How many keys are accepted (not revoked).
    pub fn active_keys(&self) -> usize {
        self.snapshot().values().filter(|k| !k.revoked).count()
    }

    /// Checks a presented key: its shape, then its digest against the entry of its id, in
    /// constant time; a revoked key fails like an unknown one.
    pub fn verify(&self, key: &str) -> Result<Principal, AuthFailure> {
        let id = key_id(key).ok_or(AuthFailure::Malformed)?;
        let digest = KeyDigest::of(key);
        let keys = self.snapshot();
        let entry = keys.get(id);
        let matched = digest.matches(entry.map_or(&NO_KEY, |e| &e.digest));
        match entry {
            Some(e) if matched && !e.revoked => {
                Ok(Principal { key_id: e.id.clone(), tenant: e.tenant.clone() })
            }
            _ => Err(AuthFailure::Invalid),
        }
    }

    /// Re-reads the keys file; true if it changed and was installed. On an error the keys in
    /// force stay.
    pub fn reload(&self) -> Result<bool, String> {
        let Some(path) = &self.file else { return Ok(false) };
        let text = read_keys_file(path)?;
        let unchanged =
            self.loaded_text.read().unwrap_or_else(|e| e.into_inner()).as_deref() == Some(text.as_str());
        if unchanged {
            return Ok(false);
        }
        self.install(Some(text))?;
        Ok(true)
    }

    /// Re-reads the keys file every `every` while the ring lives (nothing when there is no file or
    /// `every` is zero). Failures are logged and the keys in force stay.
    pub fn spawn_reloader(self: &Arc<Self>, every: Duration) -> Option<tokio::task::JoinHandle<()>> {
        if self.file.is_none() || every.is_zero() {
            return None;
        }
        let ring = Arc::downgrade(self);
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(ring) = ring.upgrade() else { return };
                match ring.reload() {
                    Ok(true) => tracing::info!(keys.active = ring.active_keys(), "API keys reloaded"),
                    Ok(false) => {}
                    Err(error) => {
                        tracing::warn!(%error, "API keys file not reloaded; the previous keys stay")
                    }
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::key::generate;

    fn entry(id: &str, tenant: &str, key: &str, revoked: bool) -> KeyEntry {
        KeyEntry { id: id.into(), tenant: tenant.into(), digest: KeyDigest::of(key), revoked }
    }

    #[test]
    fn a_key_is_accepted_only_with_its_secret_and_unrevoked() {
        let ring = KeyRing::from_entries(vec![
            entry("a", "acme", "pk_a_secret", false),
            entry("old", "acme", "pk_old_secret", true),
        ])
        .unwrap();
        assert_eq!(
            ring.verify("pk_a_secret").unwrap(),
            Principal { key_id: "a".into(), tenant: "acme".into() }
        );
        assert_eq!(ring.verify("pk_a_wrong"), Err(AuthFailure::Invalid));
        assert_eq!(ring.verify("pk_old_secret"), Err(AuthFailure::Invalid));
        assert_eq!(ring.verify("pk_nobody_secret"), Err(AuthFailure::Invalid));
        assert_eq!(ring.verify("secret"), Err(AuthFailure::Malformed));
        assert_eq!(ring.verify(""), Err(AuthFailure::Malformed));
    }

    #[test]
    fn toml_and_json_files_parse_with_clear_errors() {
        let new = generate(Some("k1")).unwrap();
        let toml =
            format!("[[keys]]\nid = \"k1\"\ntenant = \"acme\"\nsha256 = \"{}\"\n", new.digest.to_hex());
        let keys = parse_keys_file(&toml, KeysFormat::Toml).unwrap();
        assert_eq!((keys[0].id.as_str(), keys[0].tenant.as_str(), keys[0].revoked), ("k1", "acme", false));
        let json = format!(
            r#"{{"keys": [{{"id": "k1", "tenant": "acme", "sha256": "{}", "revoked": true}}]}}"#,
            new.digest.to_hex()
        );
        assert!(parse_keys_file(&json, KeysFormat::Json).unwrap()[0].revoked);
        let bad =
            parse_keys_file("[[keys]]\nid = \"k1\"\ntenant = \"acme\"\nsha256 = \"xyz\"\n", KeysFormat::Toml);
        assert!(bad.unwrap_err().starts_with("key #1: sha256"));
        let plain = parse_keys_file(
            "[[keys]]\nid = \"k1\"\ntenant = \"acme\"\nkey = \"pk_k1_s\"\n",
            KeysFormat::Toml,
        );
        assert!(plain.is_err(), "a plain key field is refused");
        let twice =
            KeyRing::from_entries(vec![entry("a", "t", "pk_a_1", false), entry("a", "u", "pk_a_2", false)]);
        assert!(twice.unwrap_err().contains("twice"));
    }

    #[test]
    fn dev_keys_parse_and_their_errors_hide_the_text() {
        let keys = parse_dev_keys(&Secret::new("acme:pk_dev_secret1, globex:pk_dev2_secret2")).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!((keys[1].id.as_str(), keys[1].tenant.as_str()), ("dev2", "globex"));
        for bad in ["acme-pk_dev_hunter2", "acme:hunter2", "a/b:pk_dev_hunter2"] {
            let err = parse_dev_keys(&Secret::new(bad)).unwrap_err();
            assert!(err.contains("pair #1") && !err.contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn a_ring_without_active_keys_is_refused() {
        let err = KeyRing::load(None, Some(&Secret::new(""))).unwrap_err();
        assert!(err.contains("parley keys new"), "{err}");
    }
}
