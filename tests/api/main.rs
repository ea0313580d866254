//! Integration tests: one binary. `helpers` starts parley on a free port; each module covers one
//! part of the API or one backend.

mod fake_openai;
mod helpers;
mod openai;
mod store_memory;
mod tools_http;
