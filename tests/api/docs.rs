//! The OpenAPI document and the API reference page; health endpoints.

use serde_json::Value;

use crate::helpers::spawn_app;

#[test]
fn the_committed_openapi_document_matches_the_code() {
    let generated = parley::http::openapi_json();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == generated,
        "openapi/openapi.json is out of date: run `cargo run -- openapi > openapi/openapi.json` \
         (or UPDATE_OPENAPI=1 cargo test --test api the_committed_openapi) and commit it"
    );
}

#[test]
fn the_readme_documents_every_environment_variable() {
    use clap::CommandFactory;
    let readme = include_str!("../../README.md");
    let mut commands = vec![parley::config::Cli::command()];
    let mut missing = Vec::new();
    while let Some(command) = commands.pop() {
        for arg in command.get_arguments() {
            if let Some(var) = arg.get_env().and_then(|v| v.to_str())
                && !readme.contains(&format!("`{var}`"))
            {
                missing.push(var.to_owned());
            }
        }
        commands.extend(command.get_subcommands().cloned());
    }
    assert!(missing.is_empty(), "README.md's configuration table lacks {missing:?}");
}

#[tokio::test]
async fn the_spec_and_an_offline_reference_page_are_served() {
    let app = spawn_app(&[]).await;
    let (status, spec) = app.get_json("/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(spec, serde_json::from_str::<Value>(&parley::http::openapi_json()).unwrap());
    for path in [
        "/v1/sessions",
        "/v1/sessions/{id}",
        "/v1/sessions/{id}/messages",
        "/v1/sessions/{id}/turns/{turn_id}",
    ] {
        assert!(spec["paths"][path].is_object(), "{path} is documented");
    }
    let page = app.client.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "the reference page is Swagger UI");
    assert!(!html.contains("https://"), "no asset is loaded from the internet");
    let redirect = app.client.get(app.url("/docs")).send().await.unwrap();
    assert_eq!(redirect.status(), 200, "/docs redirects to the page");
    let script = app.client.get(app.url("/docs/swagger-ui-bundle.js")).send().await.unwrap();
    assert_eq!(script.status(), 200, "the UI's JavaScript is served from the binary");
}

#[tokio::test]
async fn health_and_readiness_answer() {
    let app = spawn_app(&[]).await;
    let (status, body) = app.get_json("/healthz").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, body) = app.get_json("/readyz").await;
    assert_eq!(
        (status, body["status"].as_str(), body["store"].as_str()),
        (200, Some("ready"), Some("memory"))
    );
}
