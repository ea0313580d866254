//! The chat page at `/`: its headers (CSP, caching), versioned asset names, the size budget, and
//! `PARLEY_UI=false`. The page's behaviour is tested in a real browser by `tests/web`.

use crate::helpers::{spawn_app, two_tenants};

/// The asset URLs the page names: `/ui/<version>/<file>`.
fn asset_urls(html: &str) -> Vec<String> {
    html.split('"').filter(|part| part.starts_with("/ui/")).map(str::to_owned).collect()
}

#[tokio::test]
async fn the_page_is_served_at_the_root_with_a_strict_policy_and_no_cache() {
    let app = spawn_app(&[]).await;
    let response = app.client.get(app.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/html"));
    assert_eq!(headers["cache-control"], "no-cache");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.starts_with("default-src 'self';"), "{csp}");
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let html = response.text().await.unwrap();
    assert!(!html.contains("<script>") && !html.contains("style="), "no inline script or style");
    assert!(!html.contains("http://") && !html.contains("https://"), "nothing from another origin");
    assert!(!html.contains("{{version}}"), "the version is filled in");
}

#[tokio::test]
async fn assets_have_versioned_names_and_are_cached_for_a_year() {
    let app = spawn_app(&[]).await;
    let html = app.client.get(app.url("/")).send().await.unwrap().text().await.unwrap();
    let urls = asset_urls(&html);
    assert!(urls.iter().any(|u| u.ends_with("/app.js")) && urls.iter().any(|u| u.ends_with("/style.css")));
    let version = parley::http::ui::VERSION.as_str();
    assert!(version.len() >= 8 && version.chars().all(|c| c.is_ascii_hexdigit()), "{version}");
    for url in &urls {
        assert!(url.starts_with(&format!("/ui/{version}/")), "{url} is versioned");
        let response = app.client.get(app.url(url)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{url}");
        assert_eq!(response.headers()["cache-control"], "public, max-age=31536000, immutable", "{url}");
        assert!(response.headers().contains_key("content-security-policy"), "{url}");
        let kind = response.headers()["content-type"].to_str().unwrap().to_owned();
        let expected = match url.rsplit('.').next() {
            Some("js") => "text/javascript",
            Some("css") => "text/css",
            Some("svg") => "image/svg+xml",
            other => panic!("unexpected asset type {other:?}"),
        };
        assert!(kind.starts_with(expected), "{url}: {kind}");
    }
    // Another version (an old page's cached URL) or an unknown file is a 404, never a stale file.
    for stale in
        ["/ui/000000000000/app.js", &format!("/ui/{version}/nope.js"), &format!("/ui/{version}/..%2Fapp.js")]
    {
        assert_eq!(app.client.get(app.url(stale)).send().await.unwrap().status(), 404, "{stale}");
    }
}

#[test]
fn the_assets_stay_within_100_kib() {
    let sizes = parley::http::ui::asset_sizes();
    let total: usize = sizes.iter().map(|(_, size)| size).sum();
    assert!(total <= 100 * 1024, "the chat page's assets are {total} bytes, over 100 KiB: {sizes:?}");
}

#[tokio::test]
async fn the_page_needs_no_key_but_the_api_does() {
    let args = two_tenants();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let app = spawn_app(&refs).await;
    assert_eq!(app.client.get(app.url("/")).send().await.unwrap().status(), 200);
    assert_eq!(app.get_json("/v1/sessions").await.0, 401);
}

#[tokio::test]
async fn parley_ui_false_turns_the_page_off() {
    let app = spawn_app(&["--ui", "false"]).await;
    let response = app.client.get(app.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let version = parley::http::ui::VERSION.as_str();
    let asset = app.client.get(app.url(&format!("/ui/{version}/app.js"))).send().await.unwrap();
    assert_eq!(asset.status(), 404);
    assert_eq!(app.get_json("/healthz").await.0, 200, "the API is unaffected");
}

#[test]
fn the_page_routes_stay_out_of_the_openapi_document() {
    let spec: serde_json::Value = serde_json::from_str(&parley::http::openapi_json()).unwrap();
    let paths = spec["paths"].as_object().unwrap();
    assert!(
        paths.keys().all(|p| p.starts_with("/v1/") || p == "/healthz" || p == "/readyz"),
        "{:?}",
        paths.keys()
    );
}
