//! Property: a token bucket never admits more than `burst + rate × elapsed` in any interval.

use std::sync::Arc;

use proptest::prelude::*;
use tollgate::{Engine, ManualClock, Request};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn never_more_than_burst_plus_refill(
        limit in 1u64..20,
        per_ms in 1i64..5_000,
        burst in 1u64..30,
        steps in prop::collection::vec((0i64..3_000, 1usize..8), 1..40),
    ) {
        let clock = Arc::new(ManualClock::new(0));
        let policy = format!("policies: [{{name: p, rules: [{{id: r, type: rate, limit: {limit}, per: {per_ms}ms, burst: {burst}}}]}}]");
        let engine = Engine::builder().clock(clock.clone()).build_from_text(&policy).unwrap();
        let mut admitted: Vec<i64> = Vec::new();
        let mut now = 0;
        for (advance, checks) in steps {
            clock.advance(advance);
            now += advance;
            for _ in 0..checks {
                if engine.check(&Request::default()).allowed {
                    admitted.push(now);
                }
            }
        }
        for (i, &start) in admitted.iter().enumerate() {
            for (j, &end) in admitted.iter().enumerate().skip(i) {
                let count = (j - i + 1) as i128;
                // Tokens available in [start, end]: the burst plus the refill.
                let bound = i128::from(burst) + i128::from(limit) * i128::from(end - start) / i128::from(per_ms);
                prop_assert!(count <= bound, "{count} admitted in [{start}, {end}] > {bound}");
            }
        }
    }
}
