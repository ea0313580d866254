//! Authentication: which requests need a key, what a refused one answers, keys from the file and
//! the variable, revocation while running.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Backend, KEY_A, KEY_B, spawn_app, spawn_app_on, two_tenants, unique_name};

/// Asserts a 401 problem with the bearer challenge, whose text does not repeat the key.
async fn unauthorized(response: reqwest::Response, what: &str) -> Value {
    assert_eq!(response.status(), 401, "{what}");
    assert_eq!(response.headers()["www-authenticate"], r#"Bearer realm="parley""#, "{what}");
    assert_eq!(response.headers()["content-type"], "application/problem+json", "{what}");
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "unauthorized", "{what}: {problem}");
    assert_eq!(problem["status"], 401);
    for secret in ["hunter2", "0123456789abcdef", "wrong"] {
        assert!(!problem.to_string().contains(secret), "{what}: {problem}");
    }
    problem
}

/// Every way of not presenting a valid key, as an `Authorization` header (`None`: no header).
const BAD_CREDENTIALS: &[(&str, Option<&str>)] = &[
    ("no header", None),
    ("an empty header", Some("")),
    ("the scheme alone", Some("Bearer")),
    ("an empty key", Some("Bearer  ")),
    ("another scheme", Some("Basic YWNtZTpodW50ZXIy")),
    ("a key in the wrong format", Some("Bearer hunter2")),
    ("a key with no secret", Some("Bearer pk_keya_")),
    ("an unknown key id", Some("Bearer pk_nobody_0123456789abcdef")),
    ("a known id with the wrong secret", Some("Bearer pk_keya_wrong")),
    ("the key without its scheme", Some(KEY_A)),
];

async fn requests_without_a_valid_key_are_401_with_a_bearer_challenge(backend: Backend) {
    let args = two_tenants();
    let app = spawn_app_on(backend, &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    app.caller(KEY_A).create_session("s").await;
    let targets = [
        (Method::GET, "/v1/sessions"),
        (Method::POST, "/v1/sessions"),
        (Method::GET, "/v1/sessions/s"),
        (Method::DELETE, "/v1/sessions/s"),
        (Method::POST, "/v1/sessions/s/messages"),
        (Method::GET, "/v1/sessions/nobody"),
        (Method::GET, "/v1/no-such-route"),
    ];
    for (what, header) in BAD_CREDENTIALS {
        for (method, path) in &targets {
            let mut request =
                app.client.request(method.clone(), app.url(path)).json(&json!({"content": "x"}));
            if let Some(header) = header {
                request = request.header("authorization", *header);
            }
            unauthorized(request.send().await.unwrap(), &format!("{what}: {method} {path}")).await;
        }
    }
    let (status, session) = app.caller(KEY_A).get_json("/v1/sessions/s").await;
    assert_eq!((status, session["message_count"].as_u64()), (200, Some(0)), "nothing got through");
    let (status, _) = app.caller(KEY_B).get_json("/v1/sessions").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn health_the_spec_and_the_docs_stay_public() {
    let args = two_tenants();
    let app = spawn_app(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    for path in ["/healthz", "/readyz", "/openapi.json", "/docs/"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    let (_, spec) = app.get_json("/openapi.json").await;
    assert_eq!(spec["components"]["securitySchemes"]["api_key"]["scheme"], "bearer");
    assert_eq!(spec["paths"]["/v1/sessions"]["get"]["security"], json!([{"api_key": []}]));
    assert!(spec["paths"]["/v1/sessions/{id}/messages"]["post"]["responses"]["401"].is_object());
    assert!(spec["paths"]["/healthz"]["get"]["security"].is_null());
}

/// A keys file in the temporary folder, removed on drop.
pub struct KeysFile(pub std::path::PathBuf);

impl KeysFile {
    /// Writes `[[keys]]` entries: (id, tenant, key, revoked).
    pub fn toml(entries: &[(&str, &str, &str, bool)]) -> Self {
        let path = std::env::temp_dir().join(format!("{}.toml", unique_name("parley_keys")));
        let file = KeysFile(path);
        file.write(entries);
        file
    }

    /// Replaces the entries.
    pub fn write(&self, entries: &[(&str, &str, &str, bool)]) {
        let text: String = entries
            .iter()
            .map(|(id, tenant, key, revoked)| {
                let sha256 = parley::auth::key::KeyDigest::of(key).to_hex();
                format!("[[keys]]\nid = \"{id}\"\ntenant = \"{tenant}\"\nsha256 = \"{sha256}\"\nrevoked = {revoked}\n\n")
            })
            .collect();
        // Write then rename, so that a reader never sees half a file.
        let partial = self.0.with_extension("partial");
        std::fs::write(&partial, text).unwrap();
        std::fs::rename(&partial, &self.0).unwrap();
    }

    /// The path as a flag value.
    pub fn path(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for KeysFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const FILE_KEY: &str = "pk_k1_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const REVOKED_KEY: &str = "pk_k2_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const OTHER_KEY: &str = "pk_k3_cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";

#[tokio::test]
async fn keys_from_the_file_and_the_variable_work_and_revoked_ones_are_refused() {
    let file = KeysFile::toml(&[
        ("k1", "acme", FILE_KEY, false),
        ("k2", "acme", REVOKED_KEY, true),
        ("k3", "globex", OTHER_KEY, false),
    ]);
    let path = file.path();
    let dev = format!("initech:{KEY_B}");
    let app = spawn_app(&["--auth", "api_key", "--api-keys-file", &path, "--api-keys", &dev]).await;
    app.caller(FILE_KEY).create_session("mine").await;
    let (status, _) = app.caller(FILE_KEY).get_json("/v1/sessions/mine").await;
    assert_eq!(status, 200);
    let revoked = app.caller(REVOKED_KEY).send(Method::GET, "/v1/sessions/mine", None).await;
    unauthorized(revoked, "a revoked key of the same tenant").await;
    let (status, _) = app.caller(OTHER_KEY).get_json("/v1/sessions/mine").await;
    assert_eq!(status, 404, "another tenant's key");
    let (status, list) = app.caller(KEY_B).get_json("/v1/sessions").await;
    assert_eq!((status, list["data"].as_array().map(Vec::len)), (200, Some(0)), "the variable's key works");
}

#[tokio::test]
async fn keys_added_or_revoked_in_the_file_apply_without_a_restart() {
    let file = KeysFile::toml(&[("k1", "acme", FILE_KEY, false)]);
    let path = file.path();
    let app = spawn_app(&["--auth", "api_key", "--api-keys-file", &path, "--api-keys-reload", "100ms"]).await;
    app.caller(FILE_KEY).create_session("s").await;
    unauthorized(app.caller(OTHER_KEY).send(Method::GET, "/v1/sessions/s", None).await, "not yet added")
        .await;
    file.write(&[("k1", "acme", FILE_KEY, true), ("k3", "acme", OTHER_KEY, false)]);
    let mut status = 0;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        status = app.caller(FILE_KEY).send(Method::GET, "/v1/sessions/s", None).await.status().as_u16();
        if status == 401 {
            break;
        }
    }
    assert_eq!(status, 401, "the revoked key is refused within a few reloads");
    let (status, _) = app.caller(OTHER_KEY).get_json("/v1/sessions/s").await;
    assert_eq!(status, 200, "the new key of the same tenant sees its sessions");
    // A broken file keeps the keys in force.
    std::fs::write(&file.0, "this is not toml [[[").unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (status, _) = app.caller(OTHER_KEY).get_json("/v1/sessions/s").await;
    assert_eq!(status, 200);
}

for_each_backend!(requests_without_a_valid_key_are_401_with_a_bearer_challenge);
