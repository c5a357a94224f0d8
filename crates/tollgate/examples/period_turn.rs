//! The cost of a check just after a budget's period turns while many reservations from
//! the period before are still live (they must not count in the new one).
//! `cargo run --release -p tollgate --example period_turn`

use std::sync::Arc;
use std::time::Instant;

use tollgate::{Engine, ManualClock, Micros, Request};

fn main() {
    const LIVE: usize = 200_000;
    const CHECKS: usize = 2_000;
    // one minute before a UTC midnight
    let clock = Arc::new(ManualClock::new(1_767_225_600_000 - 60_000));
    let engine = Engine::builder()
        .clock(clock.clone())
        .build_from_text(
            "policies: [{name: p, rules: [{id: daily, type: budget, limit_usd: 1000000, period: day}]}]",
        )
        .unwrap();
    let mut request = Request::default();
    request.estimate.cost_usd = Some(Micros(1));
    let time = |n: usize| {
        let start = Instant::now();
        for _ in 0..n {
            assert!(engine.check(&request).allowed);
        }
        start.elapsed().as_nanos() as f64 / n as f64
    };
    let before = time(LIVE);
    clock.advance(60_000);
    let after = time(CHECKS);
    println!(
        "{before:.0} ns per check in the old period; {after:.0} ns per check after the turn, with {LIVE} reservations from before it live"
    );
}
