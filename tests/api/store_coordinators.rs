//! The coordination contract against the standalone coordinators, which keep no sessions (a
//! history store kept elsewhere has them): `MemoryCoordinator`, and `RedisCoordinator` (needs
//! `REDIS_URL`). The backends that coordinate themselves run it in `store_*.rs`.

mod memory {
    use std::sync::Arc;

    use parley::store::contract::{Coordinated, Setup};
    use parley::store::memory_coordinator::MemoryCoordinator;

    async fn coordinator(_: Setup) -> Coordinated {
        Coordinated::standalone(Arc::new(MemoryCoordinator::new()))
    }

    parley::coordinator_contract_tests!(coordinator, distributed = false);
}

mod redis {
    use std::sync::Arc;
    use std::time::Duration;

    use parley::store::contract::{Coordinated, Setup};
    use parley::store::redis::{RedisCoordinator, RedisOptions};

    use crate::helpers::{redis_url, unique_name};

    /// A coordinator on its own key prefix, so cases run in parallel.
    async fn coordinator(_: Setup) -> Coordinated {
        let options = RedisOptions {
            url: redis_url(),
            prefix: unique_name("parley_test"),
            pool_size: 4,
            max_messages: None,
            ttl: None,
            op_timeout: Duration::from_secs(5),
        };
        Coordinated::standalone(Arc::new(RedisCoordinator::new(options).expect("redis coordinator")))
    }

    parley::coordinator_contract_tests!(coordinator, distributed = true);

    mod events {
        use super::*;

        parley::event_log_contract_tests!(coordinator);
    }
}
