//! Integration tests: one binary. `helpers` starts parley on a free port; each module covers one
//! part of the API or one backend.

mod helpers;
mod store_memory;
mod store_redis;
