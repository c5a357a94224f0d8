//! `decision`: a 10-rule policy (4 stateful rules on a plain check) over 100,000 distinct
//! users, single-threaded and on 2 threads, with a same-run baseline of a bare
//! `DashMap<u64, AtomicU64>` increment so the ratio means something on a noisy machine.
//!
//! Time passes as the checks run (1 ms a check, moved in steps of 64), and reservations
//! lapse after a minute: the ledger reaches the steady state of a check-only stream (about
//! 60,000 live reservations and 120,000 decision records) within the warm-up. With the
//! clock stopped, every check adds a reservation and a record that never lapse, so the
//! ledger grows for as long as the bench runs: `check-10-rules-1-thread-clock-stopped`
//! measures that, for comparison.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dashmap::DashMap;
use std::hint::black_box;
use tollgate::{Engine, ManualClock};

mod common;

// The same allocator as the `tollgate` server binary, so the figures match what it serves.
#[global_allocator]
static ALLOCATOR: tollgate_alloc::Mimalloc = tollgate_alloc::Mimalloc;

const USERS: usize = 100_000;
const STATEFUL: u32 = 4;

const POLICY: &str = r#"
pricing:
  gpt-4o: {input: 2.50, output: 10.00}
  gpt-4o-mini: {input: 0.15, output: 0.60}
policies:
  - name: tenant
    guardrails: [pii-mask]
    rules:
      - {id: rpm, type: rate, limit: 1000000, per: 1m, by: [user]}
      - {id: monthly, type: budget, limit_usd: 1000000, period: month, by: [user], alert_at: 0.9}
      - {id: velocity, type: cost_velocity, limit_usd: 1000000, window: 1h, by: [team]}
      - {id: forecast, type: forecast, monthly_budget_usd: 100000000, lookback: 7d}
      - {id: engines, type: quota, resource: engines, max: 10, by: [user]}
      - id: access
        type: access
        label_keys: [input]
        clearances: {analyst: [public, internal]}
      - {id: no-gpt4, type: restrict_models, deny: ["gpt-4"]}
      - {id: trial, type: downgrade, to: gpt-4o-mini, when: 'labels.plan == "trial"'}
      - {id: cap, type: max_cost_per_request, limit_usd: 5}
      - {id: huge, type: expression, deny_if: 'has(estimate.input_tokens) && estimate.input_tokens > 1000000'}
"#;

/// How many checks pass between two moves of the clock (by as many milliseconds), so
/// that two threads rarely write the clock's cache line.
const TICK_EVERY: u64 = 64;

fn engine_with(reservation_ttl: &str) -> (Engine, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(1_767_225_600_000));
    let engine = Engine::builder()
        .clock(clock.clone())
        .build_from_text(&format!("reservation_ttl: {reservation_ttl}\n{POLICY}"))
        .unwrap();
    (engine, clock)
}

/// Moves the clock on by `TICK_EVERY` ms every `TICK_EVERY` checks.
fn tick(clock: &ManualClock, i: u64) {
    if i.is_multiple_of(TICK_EVERY) {
        clock.advance(TICK_EVERY as i64);
    }
}

/// Runs `per_thread` calls of `f` on each of 2 threads and returns the wall time.
fn two_threads(per_thread: u64, f: impl Fn(u64) + Sync) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..2 {
            let f = &f;
            s.spawn(move || {
                for i in 0..per_thread {
                    f(t * 1_000_003 + i);
                }
            });
        }
    });
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let reqs = common::requests(USERS);
    let (engine, clock) = engine_with("1m");
    assert!(engine.check(&reqs[0]).allowed);
    let (stopped, _) = engine_with("15m");
    let baseline: DashMap<u64, AtomicU64> =
        (0..USERS as u64).map(|i| (i, AtomicU64::new(0))).collect();

    let mut g = c.benchmark_group("decision");
    // One element an iteration: criterion also prints decisions (increments) a second,
    // over both threads in the two-thread benches.
    g.throughput(Throughput::Elements(1));
    let mut i = 0;
    g.bench_function("baseline-dashmap-increment", |b| {
        b.iter(|| {
            i = (i + 1) % USERS;
            baseline
                .get(&(i as u64))
                .map(|v| v.fetch_add(1, Ordering::Relaxed))
        })
    });
    let mut i = 0;
    g.bench_function("check-10-rules-1-thread", |b| {
        b.iter(|| {
            i = (i + 1) % USERS;
            tick(&clock, i as u64);
            black_box(engine.check(black_box(&reqs[i])))
        })
    });
    let mut i = 0;
    g.bench_function("check-10-rules-1-thread-clock-stopped", |b| {
        b.iter(|| {
            i = (i + 1) % USERS;
            black_box(stopped.check(black_box(&reqs[i])))
        })
    });
    g.bench_function("baseline-dashmap-increment-2-threads", |b| {
        b.iter_custom(|iters| {
            two_threads(iters.div_ceil(2), |k| {
                let key = k % USERS as u64;
                baseline
                    .get(&key)
                    .map(|v| v.fetch_add(1, Ordering::Relaxed));
            })
        })
    });
    g.bench_function("check-10-rules-2-threads", |b| {
        b.iter_custom(|iters| {
            two_threads(iters.div_ceil(2), |k| {
                tick(&clock, k);
                black_box(engine.check(&reqs[(k % USERS as u64) as usize]));
            })
        })
    });
    g.finish();
    eprintln!(
        "decision: {STATEFUL} stateful rules apply to each plain check (quota applies to acquire only)"
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
