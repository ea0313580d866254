//! The store contract against the memory backend.

use std::sync::Arc;

use parley::store::DynStore;
use parley::store::contract::Setup;
use parley::store::memory::{DEFAULT_MAX_MESSAGES, MemoryStore};

async fn store(setup: Setup) -> DynStore {
    Arc::new(MemoryStore::new(setup.max_messages.unwrap_or(DEFAULT_MAX_MESSAGES)))
}

parley::store_contract_tests!(store, distributed = false, ttl = false);
