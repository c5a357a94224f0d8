//! Property: random sequences of engine calls with extreme amounts, over the Redis ledger,
//! never panic and never report less than nothing left — the memory ledger's property
//! (`tollgate/tests/no_panic.rs`), on the same calls (needs `TOLLGATE_TEST_REDIS`).
//! `PROPTEST_CASES=<n>` runs more cases than the default.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use tollgate_redis::RedisLedger;

#[path = "../../tollgate/tests/random_calls/mod.rs"]
mod random_calls;

/// Each case's counters under a prefix of its own.
static CASE: AtomicU64 = AtomicU64::new(0);

proptest! {
    #![proptest_config(random_calls::cases(64))]
    #[test]
    fn random_engine_calls_over_redis_never_panic(
        calls in prop::collection::vec(random_calls::call(), 1..60),
    ) {
        let Ok(url) = std::env::var("TOLLGATE_TEST_REDIS") else {
            eprintln!("note: TOLLGATE_TEST_REDIS is not set; skipping");
            return Ok(());
        };
        let case = CASE.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("tollgate-test:random:{}:{case}", std::process::id());
        let ledger = Arc::new(RedisLedger::connect(&url, &prefix, 1).unwrap());
        let (engine, clock) = random_calls::engine(ledger);
        random_calls::run(&engine, &clock, calls)?;
    }
}
