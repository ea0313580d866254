#![allow(dead_code, reason = "each backend module uses only some helpers")]
//! Shared test helpers: environment requirements and, later, `spawn_app()`.

/// The value of a variable a test needs; fails the test, naming the variable, when it is unset.
pub fn require_env(var: &str, what: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!(
            "{var} is not set: this test needs {what}. Run the suite with `scripts/test`, which starts \
             the services and exports {var}, or set {var} yourself."
        ),
    }
}

/// The Redis URL the tests use (`REDIS_URL`).
pub fn redis_url() -> String {
    require_env("REDIS_URL", "a running Redis (e.g. redis://127.0.0.1:6379)")
}

/// The PostgreSQL URL the tests use (`DATABASE_URL`).
pub fn database_url() -> String {
    require_env("DATABASE_URL", "a running PostgreSQL (e.g. postgres://postgres@127.0.0.1:5432/postgres)")
}

/// A short unique name for isolating a test's data (key prefix, schema).
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}
