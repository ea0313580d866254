//! Integration tests: one binary. `helpers` starts parley on a free port; each module covers one
//! part of the API, and `for_each_backend!` runs a module's cases against every store.

/// Runs each listed `async fn case(backend: Backend)` of the calling module once per backend, as
/// `<module>::<backend>::<case>`.
macro_rules! for_each_backend {
    ($($case:ident),+ $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(crate::helpers::Backend::Memory).await
                }
            )+
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(crate::helpers::Backend::Redis).await
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(crate::helpers::Backend::Postgres).await
                }
            )+
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(crate::helpers::Backend::Sqlite).await
                }
            )+
        }
    };
}

mod agent_loop;
mod any_replica;
mod auth;
mod clients;
mod connections;
mod coordinator;
mod docs;
mod durability;
mod editing;
mod errors;
mod failover;
mod fake_openai;
mod faulty_store;
mod follow;
mod helpers;
mod history;
mod integrity;
mod lifecycle;
mod limits;
mod metrics;
mod openai;
mod raw_http;
mod safety;
mod servers;
mod sessions;
mod startup;
mod store_coordinators;
mod store_memory;
mod store_postgres;
mod store_redis;
mod store_sqlite;
mod streaming;
mod tenancy;
mod tools_http;
mod traces;
mod turns;
mod ui;
