//! The chat page at `/`: a few static files from `web/`, embedded in the binary at compile time.
//!
//! `/` is the page itself (`Cache-Control: no-cache`), and every asset lives under
//! `/ui/<version>/<file>` (cached for a year, `immutable`), where the version is a hash of all the
//! assets: a new build with changed assets gets new URLs, so a browser never mixes old and new
//! files. Every answer carries a Content-Security-Policy that allows nothing but this origin's own
//! scripts, styles and API (no inline script). `PARLEY_UI=false` leaves the routes out (404).

use std::sync::LazyLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use crate::error::AppError;

/// The page's policy: this origin only, no inline script or style, no framing, no plugins.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
    frame-ancestors 'none'";

/// `Cache-Control` of the versioned assets.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// The assets: name, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("app.js", "text/javascript; charset=utf-8", include_bytes!("../../web/app.js")),
    ("api.js", "text/javascript; charset=utf-8", include_bytes!("../../web/api.js")),
    ("sse.js", "text/javascript; charset=utf-8", include_bytes!("../../web/sse.js")),
    ("views.js", "text/javascript; charset=utf-8", include_bytes!("../../web/views.js")),
    ("style.css", "text/css; charset=utf-8", include_bytes!("../../web/style.css")),
    ("icon.svg", "image/svg+xml", include_bytes!("../../web/icon.svg")),
];

/// The page, with `{{version}}` where the assets' version goes.
const INDEX: &str = include_str!("../../web/index.html");

/// The assets' version: the first 12 hex digits of a SHA-256 over every asset and the page.
pub static VERSION: LazyLock<String> = LazyLock::new(|| {
    let mut hash = Sha256::new();
    for (name, _, bytes) in ASSETS {
        hash.update(name.as_bytes());
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(bytes);
    }
    hash.update(INDEX.as_bytes());
    hex::encode(hash.finalize())[..12].to_owned()
});

static PAGE: LazyLock<String> = LazyLock::new(|| INDEX.replace("{{version}}", &VERSION));

/// The page's routes.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/", get(page)).route("/ui/{version}/{file}", get(asset))
}

/// The asset names and their sizes in bytes (the tests bound the total).
pub fn asset_sizes() -> Vec<(&'static str, usize)> {
    let mut sizes: Vec<_> = ASSETS.iter().map(|(name, _, bytes)| (*name, bytes.len())).collect();
    sizes.push(("index.html", INDEX.len()));
    sizes
}

async fn page() -> Response {
    let mut response = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE.as_str()).into_response();
    secure(&mut response, "no-cache");
    response
}

async fn asset(Path((version, file)): Path<(String, String)>) -> Response {
    let found = ASSETS.iter().find(|(name, _, _)| *name == file);
    let Some((_, content_type, bytes)) = found.filter(|_| version == *VERSION) else {
        return AppError::RouteNotFound(format!("/ui/{version}/{file}")).into_response();
    };
    let mut response = ([(header::CONTENT_TYPE, *content_type)], *bytes).into_response();
    secure(&mut response, IMMUTABLE);
    response
}

fn secure(response: &mut Response, cache: &'static str) {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
}
